"""The engine and its Python API: `LLM(path).generate(prompts, params)` and `LLM.stream(...)`.

    engine step = scheduler.schedule() -> runner.run(step) -> sample -> advance / finish

`LLM` loads a packed checkpoint (or a portable one, packed for the local GPU while loading), sizes
the paged KV cache from the memory it may use, captures the decode CUDA graphs, and runs requests
with continuous batching. `add_request` + `step` let a caller (the chat loop, the benchmarks)
interleave requests; `generate` and `stream` are the two ways in that most users need.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmq.console import log
from lmq.engine.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    BlockManager,
    KVCacheSpec,
    num_blocks_for_budget,
    parse_memory,
    resolve_kv_dtype,
)
from lmq.engine.model import EngineModel
from lmq.engine.runner import PREFILL_BUCKETS, ModelRunner
from lmq.engine.sampling import SamplingParams, TextStream, make_generator, sample
from lmq.engine.scheduler import Scheduler, Span, Step
from lmq.engine.sequence import RequestOutput, Sequence, Status
from lmq.errors import InputError
from lmq.evaluate import pick_device
from lmq.format.source import WeightSource, resolve_model_path

CPU_CACHE_BYTES = 1 << 30  # the torch backend on CPU: 1 GiB of KV cache unless told otherwise
ACTIVATION_SLACK_BYTES = 1 << 30  # GPU memory left free for activations, graphs and the allocator


def eos_token_ids(path: Path, tokenizer) -> set[int]:
    """EOS ids from generation_config.json (an int or a list) and the tokenizer."""
    ids: set[int] = set()
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            e = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            e = None
        ids.update(e if isinstance(e, list) else [e] if isinstance(e, int) else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@dataclass
class _Launched:
    """A step queued on the device: its sampled tokens (device), and for CUDA their pinned host copy
    and the event after which that copy is complete."""

    step: Step
    tokens: torch.Tensor | None
    host: torch.Tensor | None
    done: torch.cuda.Event | None


class LLM:
    """A 4-bit model served by lmq's engine on one device."""

    def __init__(self, model: str | Path | EngineModel, *, device: str = "auto", kv_dtype: str = "auto",
                 cache_max_memory: str | int | None = None, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True, cuda_graphs: bool = True,
                 backend: str = "auto", dtype: str | None = None, overlap: bool = True,
                 prefill_graphs: bool | None = None, deterministic: bool = False, lm_head: str = "auto"):
        from lmq.format.source import load_tokenizer

        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise InputError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, "
                             f"{max_num_batched_tokens}")
        resolve_kv_dtype(kv_dtype, torch.float16)  # a bad --kv-dtype is refused before the weights load
        if not 0 < gpu_memory_utilization <= 1:  # also where it is not used (CPU, --cache-max-memory): a typo anyway
            raise InputError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 2:
            raise InputError(f"--max-model-len must be 2 tokens or more (a prompt and an answer), got {max_model_len}")
        budget = None if cache_max_memory is None else parse_memory(cache_max_memory)  # a typo: before the load too
        if isinstance(model, EngineModel):  # weights already loaded (benchmarks, tests): a new cache only
            if deterministic and not model.deterministic:
                raise InputError("deterministic=True needs a model loaded that way: EngineModel(..., deterministic=True)")
            if lm_head != "auto" and lm_head != model.lm_head_mode:
                raise InputError(f"lm_head={lm_head!r} needs a model loaded that way: EngineModel(..., lm_head=...)")
            source, cfg, dev = None, model.cfg, model.device
        else:
            dev = pick_device(device)
            source = WeightSource(resolve_model_path(str(model)))  # config.json only: the weights load below
            cfg = source.cfg
        if max_model_len is not None and max_model_len > cfg.context:  # before the weights load
            raise InputError(f"--max-model-len {max_model_len} exceeds the model's context of {cfg.context} tokens; "
                             f"give {cfg.context} or less")
        self.model = model if source is None else EngineModel(source, dev, backend, dtype, deterministic, lm_head)
        # a synthetic model (random weights, `EngineModel.synthetic`) has no tokenizer: token ids only
        self.path = self.model.src.path if self.model.src is not None else None
        self.tokenizer = load_tokenizer(self.path) if self.path else None
        self.eos_ids = eos_token_ids(self.path, self.tokenizer) if self.path else set()
        self.max_model_len = max_model_len or cfg.context
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.model.dtype)
        spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype, block_size)
        if budget is None and dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            reserved = ACTIVATION_SLACK_BYTES + self._activation_bytes(max_num_batched_tokens) \
                + self._graph_logits_bytes(max_num_seqs)
            budget = int(free - (1 - gpu_memory_utilization) * total) - reserved
            if budget < spec.bytes_per_block:
                raise InputError(
                    f"no GPU memory is left for the KV cache: {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free "
                    f"after loading the weights, and --gpu-memory-utilization {gpu_memory_utilization} keeps "
                    f"{(1 - gpu_memory_utilization) * total / 2**30:.1f} GiB back plus "
                    f"{reserved / 2**30:.1f} GiB for activations and CUDA graphs; free the GPU, raise "
                    "--gpu-memory-utilization, or give --cache-max-memory")
        elif budget is None:
            budget = CPU_CACHE_BYTES
        num_blocks = num_blocks_for_budget(spec, budget)
        self.cache_tokens = num_blocks * block_size
        if self.cache_tokens < self.max_model_len:
            log(f"the KV cache holds {self.cache_tokens} tokens, fewer than the context of {self.max_model_len}: "
                f"sequences are capped at {self.cache_tokens} tokens (raise --cache-max-memory for more)")
            self.max_model_len = self.cache_tokens
        # every running sequence must get its decode token each step (vLLM asks the same)
        max_num_seqs = min(max_num_seqs, num_blocks, max_num_batched_tokens)
        self.max_num_seqs = max_num_seqs
        self.manager = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.manager, max_num_seqs, max(max_num_batched_tokens, 1))
        if prefill_graphs is None:  # on unless LMQ_PREFILL_GRAPHS=0; "single": one-sequence steps only (ModelRunner)
            env = os.environ.get("LMQ_PREFILL_GRAPHS", "1")
            prefill_graphs = "single" if env == "single" else env != "0"
        self.runner = ModelRunner(self.model, spec, num_blocks, max_num_seqs, self.max_model_len, cuda_graphs,
                                  prefill_graphs, max_num_batched_tokens)
        log(f"KV cache: {num_blocks} blocks x {block_size} tokens ({self.cache_tokens} tokens, "
            f"{self.runner.cache.nbytes / 2**30:.2f} GiB, {self.kv_dtype})")
        self._ids = itertools.count()
        self.seqs: dict[int, Sequence] = {}
        # overlapped decode: the next decode step is launched before this one's tokens are read back
        self.overlap = overlap and os.environ.get("LMQ_OVERLAP", "1") != "0"
        self._pending: _Launched | None = None  # a launched step whose tokens are not applied yet

    def _graph_logits_bytes(self, max_num_seqs: int) -> int:
        """The logits every captured CUDA graph keeps as its output (fp16 / bf16 from the LM head, then fp32; the
        int8 head writes fp32 only): the decode graphs' buckets hold at most 4 x max_num_seqs rows in all (3.3 x at
        64), each prefill token bucket 1 + max_num_seqs (its one-sequence and many-sequence graphs)."""
        rows = 4 * max_num_seqs + len(PREFILL_BUCKETS) * (1 + max_num_seqs)
        return rows * self.model.cfg.vocab_size * (4 if self.model.head_q is not None else 6)

    def _activation_bytes(self, tokens: int) -> int:
        """A generous bound on one prefill step's activations (fp16/bf16), logits of one row each."""
        cfg = self.model.cfg
        width = 2 * cfg.intermediate_size + 3 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        return 4 * tokens * width * 2

    # -- requests ---------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer (synthetic weights): give prompts as token ids")
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [int(t) for t in prompt]

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InputError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise InputError(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                             f"(prompt + answer); shorten it, or raise --max-model-len / --cache-max-memory")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary of {vocab}")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        self.check_prompt(ids)
        sid = next(self._ids)
        seq = Sequence(sid, ids, params,
                       stream=TextStream(self.tokenizer, params.stop) if self.tokenizer else None,
                       generator=make_generator(params, self.model.device))
        self.seqs[sid] = seq
        self.scheduler.add(seq)
        return sid

    def abort(self, request_id: int) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix not held by a running request (`BlockManager.forget_cached`); returns how many
        blocks were forgotten."""
        return self.manager.forget_cached()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one engine step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns an update for every request that got a token (or finished).

        Overlapped decode: when the step just launched is a plain decode step of every running
        sequence and the next one is certain to be the same sequences one token further (nothing
        waiting, no sequence at its length limit, no new block needed, no repetition penalty), the
        next step is launched first, with the sampled tokens fed to it on the device, and only then
        are this step's tokens read back and applied. The host's work then overlaps the GPU's. A
        sequence that stops on EOS or a stop string meanwhile has its extra row dropped.
        """
        if self._pending is not None and not any(sp.seq.status is Status.RUNNING for sp in self._pending.step.spans):
            self._pending = None  # a lookahead of requests that all stopped meanwhile: nothing to read
        if self._pending is None:
            step = self.scheduler.schedule()
            if step is None:
                if self.scheduler.waiting:  # nothing fits and nothing runs: cannot happen with check_prompt
                    raise InputError("the KV cache cannot hold the next request; raise --cache-max-memory")
                return []
            self._pending = self._launch(step)
        cur, self._pending = self._pending, None
        nxt = self._lookahead(cur)
        if nxt is not None:
            self._pending = self._launch(nxt, cur.tokens)
        try:
            return self._apply(cur)
        except BaseException:  # Ctrl-C while reading back: `cur` is computed again by the next step,
            self._pending = None  # so the lookahead fed from its tokens is dropped (its slot stays reserved)
            raise

    def _launch(self, step: Step, ids: torch.Tensor | None = None) -> _Launched:
        """Queue the step and the sampling of its tokens on the device; `ids` [B] (on the device)
        are the input tokens of a lookahead step, whose last token the host does not have yet."""
        now = time.perf_counter()
        for sp in step.spans:
            if sp.seq.metrics.first_scheduled is None:
                sp.seq.metrics.first_scheduled = now
        self.runner.cache.copy_blocks(step.copies)
        try:
            logits = self.runner.run(step, self.manager, ids)  # [S, V]
        except torch.cuda.OutOfMemoryError as e:  # the cache took what the activations needed
            raise InputError(
                f"the GPU ran out of memory in a step of {step.num_tokens} tokens over {len(step.spans)} "
                "sequences; leave more room for activations: lower --gpu-memory-utilization or "
                "--cache-max-memory, or --max-num-batched-tokens (lmq bench e2e; max_num_batched_tokens in Python)") from e
        sampled = [sp.seq for sp in step.spans if sp.sample]
        if not sampled:
            return _Launched(step, None, None, None)
        tokens = sample(logits, [s.params for s in sampled], [s.token_ids for s in sampled],
                        [s.generator for s in sampled])  # [S] on the device
        if tokens.device.type != "cuda":
            return _Launched(step, tokens, None, None)
        # read back through pinned memory with an event: a .tolist() would queue behind the next step
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Launched(step, tokens, host, done)

    def _lookahead(self, cur: _Launched) -> Step | None:
        """The next decode step, if it is certain to be `cur`'s sequences one token further; the
        slots of the new tokens are reserved here."""
        step = cur.step
        if not self.overlap or cur.tokens is None or not step.is_decode or self.scheduler.waiting:
            return None
        running = self.scheduler.running
        if len(step.spans) != len(running) or not all(sp.sample for sp in step.spans):
            return None
        for sp in step.spans:
            seq = sp.seq
            if (seq.status is not Status.RUNNING or seq.params.repetition_penalty != 1.0
                    or len(seq.output_ids) + 2 > seq.params.max_new_tokens
                    or seq.num_tokens + 2 > self.max_model_len or not self.manager.has_room(seq.seq_id)):
                return None
        spans = []
        for sp in step.spans:
            self.manager.append_slot(sp.seq.seq_id)  # has_room: no new block, no copy
            spans.append(Span(sp.seq, sp.end, sp.end + 1))
        return Step(spans, [])

    def _apply(self, cur: _Launched) -> list[RequestOutput]:
        """Read the step's tokens back and apply them: advance, append, stop checks, outputs."""
        if cur.tokens is None:
            tokens = []
        elif cur.host is None:
            tokens = cur.tokens.tolist()
        else:
            cur.done.synchronize()
            tokens = cur.host.tolist()
        # only now, with the tokens in hand: an interrupted step (Ctrl-C, an error) is recomputed by
        # the next one, instead of leaving sequences computed to the end with no token to add.
        # A lookahead step's rows of sequences that stopped or were aborted meanwhile are dropped.
        live = [sp for sp in cur.step.spans if sp.seq.status is Status.RUNNING]
        for sp in live:
            self.scheduler.advance(sp)
        if not tokens:
            return []
        now = time.perf_counter()
        outputs = []
        sampled = [sp for sp in cur.step.spans if sp.sample]  # the rows of `tokens`, in order
        for sp, tok in zip(sampled, tokens):
            seq = sp.seq
            if seq.status is not Status.RUNNING:
                continue
            seq.token_ids.append(tok)
            m = seq.metrics
            m.token_times.append(now)
            if m.first_token is None:
                m.first_token = now
            delta = seq.stream.push(tok) if seq.stream else ""
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                delta += seq.stream.finish() if seq.stream else ""
                self.scheduler.finish(seq, reason)
                m.finished = now
            outputs.append(self._output(seq, delta))
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        if (seq.stream is not None and seq.stream.stopped) or (tok in self.eos_ids and not seq.params.ignore_eos):
            return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, delta: str = "") -> RequestOutput:
        text = seq.stream.text if seq.stream else ""
        return RequestOutput(seq.seq_id, seq.prompt_ids, seq.output_ids, text, seq.is_finished,
                             seq.finish_reason, seq.metrics, delta)

    # -- the two ways in ---------------------------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InputError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        try:
            while any(not self.seqs[i].is_finished for i in ids):
                self.step()
        except BaseException:
            for i in ids:
                self.abort(i)
            raise
        return [self._output(self.seqs.pop(i)) for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an update (with `.delta`, the new text) for every token of one request. Closing the
        iterator early (break, Ctrl-C) aborts the request and keeps everything else."""
        rid = self.add_request(prompt, params)
        seq = self.seqs[rid]
        try:
            while not seq.is_finished:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
        finally:
            self.abort(rid)
            self.seqs.pop(rid, None)
