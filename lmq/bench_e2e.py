"""`lmq bench CHECKPOINT`: end-to-end speed of the engine, with vLLM's metric names.

- latency: B requests of `in` random prompt tokens generating exactly `out` tokens, all submitted
  at once; TTFT (submit -> first token), TPOT (mean gap after the first token, per request), ITL
  (every gap between tokens), output tok/s = B * out / wall time, peak GPU memory. Batch-1 decode
  is also compared with its roofline: bytes read per token (every weight the step reads, plus the
  KV cache at the mean context) over the measured device copy bandwidth.
- throughput: N requests (random lengths around `in`/`out`, or a jsonl file of
  {"prompt": ..., "max_tokens": ...}) through continuous batching, optionally at most
  `concurrency` in flight; req/s, output tok/s, total tok/s, TTFT / ITL percentiles.
- multi-turn: one conversation of token ids; turn k's prompt is the whole history plus a new
  question; TTFT per turn shows how much of the history the prefix cache gives back.
- `--baseline hf`: the same workloads through transformers `generate` in fp16 on the same device
  (the checkpoint's dequantized weights, or the same random shape), static batches for throughput.

Each workload runs once to warm up (kernel compilation, autotuning) before it is measured.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmq.bench_attention import parse_list
from lmq.console import log
from lmq.engine.llm import LLM
from lmq.engine.sampling import SamplingParams
from lmq.errors import InputError


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary_ms(xs: list[float]) -> dict[str, float]:
    ms = [1e3 * x for x in xs]
    return {"mean": statistics.fmean(ms) if ms else float("nan"), "p50": pct(ms, 50), "p99": pct(ms, 99)}


def random_requests(n: int, in_len: int, out_len: int, vocab: int, seed: int = 0, spread: float = 0.0) -> list[Request]:
    """n requests of random tokens; lengths uniform in [len (1 - spread), len (1 + spread)]."""
    rng = random.Random(seed)

    def length(v: int) -> int:
        return max(1, round(v * rng.uniform(1 - spread, 1 + spread)))

    return [Request([rng.randrange(100, vocab - 100) for _ in range(length(in_len))], length(out_len))
            for _ in range(n)]


def read_requests(path: str, llm: LLM) -> list[Request]:
    """A jsonl file: one {"prompt": str or [ids], "max_tokens": int} per line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--dataset {path} is not a file; give a jsonl file of {{\"prompt\", \"max_tokens\"}} lines")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"--dataset {path} is not UTF-8 text ({e}); give a jsonl file of {{\"prompt\", "
                         "\"max_tokens\"}} lines") from e
    reqs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            max_tokens = int(row.get("max_tokens", 128))
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be 1 or more, got {max_tokens}")
            reqs.append(Request(llm.encode(row["prompt"]), max_tokens))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}:{i}: expected {{\"prompt\": ..., \"max_tokens\": N}}, got {line[:80]!r} ({e})") from e
    if not reqs:
        raise InputError(f"--dataset {path} holds no requests")
    return reqs


# ---------------------------------------------------------------------------------------------
# lmq
# ---------------------------------------------------------------------------------------------
def run_engine(llm: LLM, requests: list[Request], concurrency: int | None = None) -> dict:
    """Serve `requests` (at most `concurrency` in flight) and summarize with vLLM's metric names."""
    sync = torch.cuda.synchronize if llm.model.device.type == "cuda" else (lambda: None)
    pending = list(requests)
    inflight: dict[int, Request] = {}
    done = []
    sync()
    t0 = time.perf_counter()
    while pending or inflight:
        while pending and (concurrency is None or len(inflight) < concurrency):
            r = pending.pop(0)
            rid = llm.add_request(r.prompt, SamplingParams(max_new_tokens=r.max_tokens, ignore_eos=True))
            inflight[rid] = r
        for out in llm.step():
            if out.finished:
                inflight.pop(out.request_id)
                done.append(llm.seqs.pop(out.request_id))
    sync()
    wall = time.perf_counter() - t0
    out_tokens = sum(len(s.output_ids) for s in done)
    in_tokens = sum(s.num_prompt_tokens for s in done)
    return {
        "requests": len(done), "wall_s": wall, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "req_s": len(done) / wall, "output_tok_s": out_tokens / wall, "total_tok_s": (in_tokens + out_tokens) / wall,
        "ttft_ms": summary_ms([s.metrics.ttft_s for s in done]),
        "tpot_ms": summary_ms([s.metrics.tpot_s for s in done if s.metrics.tpot_s is not None]),
        "itl_ms": summary_ms([x for s in done for x in s.metrics.itl_s]),
        "cached_tokens": sum(s.metrics.num_cached_tokens for s in done),
        "preemptions": sum(s.metrics.num_preemptions for s in done),
    }


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def decode_bytes_per_token(llm: LLM, context: int) -> int:
    """Bytes one batch-1 decode step must read: every weight but the embedding table (one row),
    plus `context` tokens of K and V in every layer."""
    from lmq.kernels.kv_quant import kv_bytes_per_token_head

    m = llm.model
    weights = m.weight_bytes()
    if m.lm_head is not m.embed:
        weights -= m.embed.numel() * m.embed.element_size()
    cfg = m.cfg
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * kv_bytes_per_token_head(llm.kv_dtype, cfg.head_dim) * context
    return weights + kv


def bench_latency(llm: LLM, batches: list[int], in_lens: list[int], out_lens: list[int], seed: int = 0,
                  baseline=None, on_row=None) -> list[dict]:
    rows = []
    vocab = llm.model.cfg.vocab_size
    dev = llm.model.device
    bw = None
    for B in batches:
        for n_in in in_lens:
            for n_out in out_lens:
                reqs = random_requests(B, n_in, n_out, vocab, seed)
                run_engine(llm, reqs)  # warm-up
                # cold: the rows share leading tokens (one seed), and a TTFT over a cached prefix measures less work
                llm.reset_prefix_cache()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                r = run_engine(llm, random_requests(B, n_in, n_out, vocab, seed + 1))
                row = {"batch": B, "input_len": n_in, "output_len": n_out, **r, "peak_mem_gib": peak_memory_gib(dev)}
                if B == 1 and dev.type == "cuda":
                    from lmq.bench import copy_bandwidth_bytes_s

                    bw = bw or copy_bandwidth_bytes_s()
                    nbytes = decode_bytes_per_token(llm, n_in + n_out // 2)
                    roof_tok_s = bw / nbytes
                    row["roofline"] = {"bytes_per_token": nbytes, "copy_bandwidth_gb_s": bw / 1e9,
                                       "roofline_tok_s": roof_tok_s,
                                       "decode_tok_s": 1e3 / r["tpot_ms"]["mean"],
                                       "fraction": 1e3 / r["tpot_ms"]["mean"] / roof_tok_s}
                if baseline is not None:
                    row["hf"] = baseline.latency(B, n_in, n_out, seed + 1)
                    row["speedup_output_tok_s"] = r["output_tok_s"] / row["hf"]["output_tok_s"]
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows


def bench_throughput(llm: LLM, requests: list[Request], concurrency: int | None, baseline=None,
                     hf_batch: int = 64) -> dict:
    run_engine(llm, requests[: min(len(requests), 2 * llm.max_num_seqs)], concurrency)  # warm-up
    llm.reset_prefix_cache()  # the warm-up ran the same prompts: the measured run must not find them cached
    row = {"concurrency": concurrency, **run_engine(llm, requests, concurrency)}
    if baseline is not None:
        row["hf"] = baseline.throughput(requests, hf_batch)
        row["speedup_output_tok_s"] = row["output_tok_s"] / row["hf"]["output_tok_s"]
    return row


def bench_multiturn(llm: LLM, turns: int, question_len: int, answer_len: int, seed: int = 0) -> list[dict]:
    """One conversation; returns TTFT and prefix-cache hits per turn. A short throwaway request with
    other tokens runs first, so turn 1 does not pay for first-use costs (allocations, kernel warm-up)
    that later turns do not."""
    rng = random.Random(seed)
    vocab = llm.model.cfg.vocab_size
    warm = [rng.randrange(100, vocab - 100) for _ in range(question_len)]
    llm.generate([warm], SamplingParams(max_new_tokens=2, ignore_eos=True))
    history: list[int] = []
    rows = []
    for k in range(turns):
        prompt = history + [rng.randrange(100, vocab - 100) for _ in range(question_len)]
        if len(prompt) + answer_len >= llm.max_model_len:
            break
        out = llm.generate([prompt], SamplingParams(max_new_tokens=answer_len, ignore_eos=True))[0]
        rows.append({"turn": k + 1, "prompt_tokens": len(prompt), "cached_tokens": out.metrics.num_cached_tokens,
                     "ttft_ms": 1e3 * out.metrics.ttft_s})
        history = prompt + out.token_ids
    return rows


# ---------------------------------------------------------------------------------------------
# transformers baseline
# ---------------------------------------------------------------------------------------------
@dataclass
class HFBaseline:
    """transformers' `generate` in fp16 on the same device: the checkpoint's dequantized weights, or
    random weights at the same shape for a synthetic model."""

    model: object
    device: torch.device
    notes: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, engine_model, synthetic: str | None) -> HFBaseline:
        from transformers import AutoConfig, AutoModelForCausalLM

        dev = engine_model.device
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        if synthetic:
            from lmq.models.configs import synthetic_config

            cfg = synthetic_config(synthetic)
            config = AutoConfig.for_model(**cfg)
            with torch.device(dev):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            src = engine_model.src  # the checkpoint the engine opened (its shard handles are reused)
            config = AutoConfig.from_pretrained(str(src.path))
            config.quantization_config = None
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            # built on the device, not on "meta": buffers that are not in the checkpoint (the rotary
            # inv_freq) must exist; the random weights are replaced by the checkpoint's
            with torch.device(dev):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            sd = {}
            for name in src.names:
                if name.endswith(".qweight"):
                    p = name[: -len(".qweight")]
                    sd[f"{p}.weight"] = src.dense(f"{p}.weight", dtype)
                elif not name.endswith((".qzeros", ".scales", ".zeros")):
                    sd[name] = src.get(name, dtype)
            model.load_state_dict(sd, strict=False, assign=True)  # frees the random ones on the device
            model.tie_weights()
            model.to(dev)
        model.eval()
        return cls(model, dev, {"dtype": str(dtype).replace("torch.", ""), "weights": "random" if synthetic
                                else "dequantized checkpoint"})

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, n: int) -> float:
        self._sync()
        t = time.perf_counter()
        self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        self._sync()
        return time.perf_counter() - t

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return ids, mask

    def latency(self, B: int, n_in: int, n_out: int, seed: int) -> dict:
        reqs = random_requests(B, n_in, n_out, self.model.config.vocab_size, seed)
        ids, mask = self._batch([r.prompt for r in reqs])
        self._generate(ids, mask, 2)  # warm-up
        ttft = self._generate(ids, mask, 1)
        total = self._generate(ids, mask, n_out)
        return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * (total - ttft) / max(1, n_out - 1),
                "output_tok_s": B * n_out / total, "wall_s": total}

    def throughput(self, requests: list[Request], batch: int) -> dict:
        """Static batching: batches of `batch` requests in order, each run to its longest output."""
        self._generate(*self._batch([requests[0].prompt]), 2)  # warm-up
        wall = 0.0
        for i in range(0, len(requests), batch):
            chunk = requests[i:i + batch]
            wall += self._generate(*self._batch([r.prompt for r in chunk]), max(r.max_tokens for r in chunk))
        out_tokens = sum(r.max_tokens for r in requests)
        in_tokens = sum(len(r.prompt) for r in requests)
        return {"batch": batch, "wall_s": wall, "req_s": len(requests) / wall, "output_tok_s": out_tokens / wall,
                "total_tok_s": (in_tokens + out_tokens) / wall}


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def render_e2e(report: dict) -> str:
    """Markdown tables of a report (what `lmq bench` prints and docs/benchmarks.md records)."""
    lines = [f"model: {report['model']}, device: {report['device']}, KV cache: {report['kv_dtype']}"
             + (", deterministic" if report.get("deterministic") else "")
             + (f", LM head {report['lm_head']}" if report.get("lm_head", "auto") != "auto" else ""), ""]
    if report.get("latency"):
        lines += [("| batch | in | out | TTFT ms | TPOT ms mean/p50/p99 | ITL p99 ms | out tok/s | peak GiB | "
                   "roofline | hf TTFT ms | hf TPOT ms | hf out tok/s | x hf |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["latency"]:
            t, hf, roof = r["tpot_ms"], r.get("hf"), r.get("roofline")
            lines.append(
                f"| {r['batch']} | {r['input_len']} | {r['output_len']} | {r['ttft_ms']['mean']:.1f} | "
                f"{t['mean']:.2f} / {t['p50']:.2f} / {t['p99']:.2f} | {r['itl_ms']['p99']:.2f} | "
                f"{r['output_tok_s']:.0f} | {_f(r['peak_mem_gib'], '.1f')} | "
                f"{_f(roof and 100 * roof['fraction'], '.0f', '%')} | {_f(hf and hf['ttft_ms'], '.1f')} | "
                f"{_f(hf and hf['tpot_ms'], '.2f')} | {_f(hf and hf['output_tok_s'], '.0f')} | "
                f"{_f(r.get('speedup_output_tok_s'), '.2f', 'x')} |")
        lines.append("")
    if report.get("throughput"):
        r = report["throughput"]
        hf = r.get("hf")
        lines += [("| requests | concurrency | req/s | out tok/s | total tok/s | TTFT ms p50/p99 | ITL ms p50/p99 | "
                   "preemptions | hf req/s | hf out tok/s | x hf |"), "|---|---|---|---|---|---|---|---|---|---|---|",
                  (f"| {r['requests']} | {r['concurrency'] or 'all'} | {r['req_s']:.2f} | {r['output_tok_s']:.0f} | "
                  f"{r['total_tok_s']:.0f} | {r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f} | "
                  f"{r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f} | {r['preemptions']} | "
                  f"{_f(hf and hf['req_s'], '.2f')} | {_f(hf and hf['output_tok_s'], '.0f')} | "
                  f"{_f(r.get('speedup_output_tok_s'), '.2f', 'x')} |"), ""]
    if report.get("multiturn"):
        first = report["multiturn"][0]["ttft_ms"]
        lines += ["| turn | prompt tokens | cached | TTFT ms | vs turn 1 |", "|---|---|---|---|---|"]
        for r in report["multiturn"]:
            lines.append(f"| {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft_ms']:.1f} | "
                         f"{r['ttft_ms'] / first:.2f}x |")
    return "\n".join(lines)


def _f(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def report_json(report: dict) -> str:
    return json.dumps(report, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def run_bench(checkpoint: str | None, synthetic: str | None, modes: str = "latency,throughput,multiturn",
              batches: str = "1,8,32", input_lens: str = "128,1024", output_lens: str = "128",
              num_requests: int = 256, dataset: str | None = None, concurrency: int | None = None, turns: int = 8,
              answer_len: int = 128,
              baseline: str = "none", kv_dtype: str = "auto", max_num_seqs: int = 64,
              max_num_batched_tokens: int = 2048, max_model_len: int | None = None, cache_max_memory: str | None = None,
              gpu_memory_utilization: float = 0.9, group_size: int | None = None,
              device: str = "auto", seed: int = 0, json_out: bool = False,
              deterministic: bool = False, lm_head: str = "auto") -> tuple[dict, str]:
    """Build the engine, run the chosen workloads, return (report, rendered text or JSON)."""
    from lmq.engine.model import EngineModel
    from lmq.evaluate import pick_device

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in mode_list if m not in ("latency", "throughput", "multiturn")]
    if bad or not mode_list:
        raise InputError(f"--mode {modes!r}: expected a comma-separated subset of latency, throughput, multiturn")
    if (checkpoint is None) == (synthetic is None):
        raise InputError("give a checkpoint folder or --synthetic NAME (e.g. --synthetic llama3-8b), not both")
    if baseline not in ("none", "hf"):
        raise InputError(f"--baseline {baseline!r}: expected none or hf")
    if concurrency is not None and concurrency < 1:
        raise InputError(f"--concurrency must be >= 1, got {concurrency}")
    checks = [("--max-num-seqs", max_num_seqs), ("--max-num-batched-tokens", max_num_batched_tokens)]
    if "throughput" in mode_list and dataset is None:
        checks.append(("--num-requests", num_requests))
    if "multiturn" in mode_list:
        checks += [("--turns", turns), ("--answer-len", answer_len)]
    for flag, value in checks:
        if value < 1:  # before minutes of loading
            raise InputError(f"{flag} must be >= 1, got {value}")
    B, n_in, n_out = parse_list(batches, "--batch"), parse_list(input_lens, "--input-len"), \
        parse_list(output_lens, "--output-len")
    if dataset is not None and not Path(dataset).is_file():  # before minutes of loading
        raise InputError(f"--dataset {dataset} is not a file; give a jsonl file of {{\"prompt\", \"max_tokens\"}} lines")
    if synthetic:
        from lmq.models.configs import synthetic_group_size

        group_size = synthetic_group_size(synthetic, group_size)
    dev = pick_device(device)
    model = EngineModel.synthetic(synthetic, dev, group_size, deterministic=deterministic, lm_head=lm_head) \
        if synthetic else EngineModel(checkpoint, dev, deterministic=deterministic, lm_head=lm_head)
    hf = None
    if baseline == "hf":  # before the KV cache takes the free memory
        log("loading the transformers fp16 baseline")
        hf = HFBaseline.for_model(model, synthetic)
    llm = LLM(model, kv_dtype=kv_dtype, max_num_seqs=max(max_num_seqs, max(B)),
              max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, cache_max_memory=cache_max_memory,
              gpu_memory_utilization=gpu_memory_utilization, deterministic=deterministic)
    name = f"synthetic {synthetic} (random weights, g{group_size})" if synthetic else str(llm.path)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    report: dict = {"model": name, "device": gpu, "kv_dtype": llm.kv_dtype, "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "deterministic": deterministic, "max_num_seqs": llm.max_num_seqs,
                    "max_num_batched_tokens": max_num_batched_tokens, "lm_head": lm_head}
    if hf is not None:
        import transformers

        report["hf"] = {**hf.notes, "transformers": transformers.__version__}
    if "latency" in mode_list:
        report["latency"] = bench_latency(
            llm, B, n_in, n_out, seed, hf,
            on_row=lambda r: log(f"latency B={r['batch']} in={r['input_len']} out={r['output_len']}: "
                                 f"TTFT {r['ttft_ms']['mean']:.1f} ms, TPOT {r['tpot_ms']['mean']:.2f} ms, "
                                 f"{r['output_tok_s']:.0f} tok/s"))
    if "throughput" in mode_list:
        reqs = read_requests(dataset, llm) if dataset else \
            random_requests(num_requests, n_in[0], n_out[0], llm.model.cfg.vocab_size, seed, spread=0.5)
        log(f"throughput: {len(reqs)} requests")
        report["throughput"] = bench_throughput(llm, reqs, concurrency, hf, hf_batch=max(B))
    if "multiturn" in mode_list:
        report["multiturn"] = bench_multiturn(llm, turns, 32, answer_len, seed)
    return report, (report_json(report) if json_out else render_e2e(report))
