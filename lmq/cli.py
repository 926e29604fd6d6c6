"""The `lmq` command line: parse options, call ONE library function, render the result.

Heavy imports (torch, transformers) happen inside the commands so `lmq --help` is instant.
Results go to stdout; logs, progress and errors go to stderr (lmq.console).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
import typer.core

from lmq.console import error

app = typer.Typer(
    name="lmq",
    help="Quantize LLMs to 4 bits (AWQ), pack them for your GPU, run and measure them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Measure what quantization cost in quality.", no_args_is_help=True)


class _BenchGroup(typer.core.TyperGroup):
    """`lmq bench CHECKPOINT ...` and `lmq bench --synthetic X ...` mean `lmq bench e2e ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["e2e", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(help="Measure kernel and end-to-end speed against peers. `lmq bench CHECKPOINT` runs the "
                        "end-to-end benchmark (`e2e`).", no_args_is_help=True, cls=_BenchGroup)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")


class Terminated(BaseException):
    """SIGTERM (a batch scheduler, `docker stop`, `timeout`), raised where the command is. Not a KeyboardInterrupt:
    the handlers that stop one answer on Ctrl-C must not swallow it; writers clean up on any BaseException."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def guard():
    """Every command body runs inside this: LmqError -> one `error: ...` line and exit 1.

    Anything else is a bug and keeps its traceback. Ctrl-C exits 130 and SIGTERM 143; both unwind
    the command, so writers clean up their temporary folders themselves and nothing half-written is
    left behind.
    """
    import signal

    from lmq.errors import LmqError

    unset = object()
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        previous = unset
    try:
        yield
    except LmqError as e:
        error(str(e))
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        error("interrupted; nothing partial was left behind")
        raise typer.Exit(130)
    except Terminated:
        error("terminated; nothing partial was left behind")
        raise typer.Exit(143)
    finally:
        if previous is not unset:  # (None: a handler set outside Python, restored as the default)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# ---------------------------------------------------------------------------------------------
# quantize / inspect / eval (stage 1: the portable checkpoint)
# ---------------------------------------------------------------------------------------------
# (commands added below by the quantizer)

QUANT_DEFAULTS = {
    "method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "calib_data": "pileval",
    "calib_samples": 128, "calib_seqlen": 512, "dtype": "auto", "device": "auto", "seed": 0, "refine_steps": 200,
}


def load_recipe(path: Path) -> dict:
    """A recipe (TOML) gives defaults for `lmq quantize`; options given on the command line win."""
    import tomllib

    from lmq.errors import InputError

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"recipe {path} {what}; give a .toml file, see recipes/ for examples")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"recipe {path} is not UTF-8 text ({e}); give a .toml file, see recipes/ for examples") from e
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"recipe {path} is not valid TOML ({e})") from e
    q = data.get("quantize", data)
    if not isinstance(q, dict):
        raise InputError(f"recipe {path}: quantize must be a table of settings ([quantize] then key = value lines), "
                         f"got {q!r}; see recipes/ for examples")
    unknown = sorted(set(q) - set(QUANT_DEFAULTS))
    if unknown:
        raise InputError(f"recipe {path} has unknown keys {unknown}; known: {sorted(QUANT_DEFAULTS)}")
    for key, value in q.items():  # each value of its default's type (a bool is not a number here)
        want = type(QUANT_DEFAULTS[key])
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            kind = {int: "a whole number", bool: "true or false", str: "a string"}[want]
            raise InputError(f"recipe {path}: {key} must be {kind} (e.g. {QUANT_DEFAULTS[key]!r}), got {value!r}")
    return q


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Hugging Face model folder, or a hub id (org/name) when online."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the portable 4-bit checkpoint."),
    method: Optional[str] = typer.Option(None, help="awq (activation-aware, default) or rtn (round-to-nearest)."),
    bits: Optional[int] = typer.Option(None, help="Weight bits (4)."),
    group_size: Optional[int] = typer.Option(None, help="Input channels per scale/zero group: 32, 64 or 128 (default)."),
    zero_point: Optional[bool] = typer.Option(None, "--zero-point/--symmetric",
                                              help="Asymmetric with zero points (default) or symmetric."),
    calib_data: Optional[str] = typer.Option(None, help="Calibration text: .txt/.jsonl/.parquet file or folder, "
                                             "or a hub data set (pileval, wikitext2, c4) when online."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration samples (default 128)."),
    calib_seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration sample (default 512)."),
    dtype: Optional[str] = typer.Option(None, help="auto, float16 or bfloat16: dtype of unquantized tensors."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda: where each layer is searched."),
    seed: Optional[int] = typer.Option(None, help="Seed for calibration sampling."),
    refine_steps: Optional[int] = typer.Option(None, help="AWQ: learned-rounding steps per layer after the scale "
                                               "and clipping search (default 200; 0 = round to nearest, as AutoAWQ)."),
    recipe: Optional[Path] = typer.Option(None, help="TOML recipe with defaults for these options (recipes/)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Quantize a model's linears to 4 bits (AWQ) into a portable checkpoint (AutoAWQ gemm layout)."""
    with guard():
        from dataclasses import asdict

        from lmq.quant.quantize import QuantizeSpec, quantize_model
        from lmq.render import print_json, quantize_table

        given = {"method": method, "bits": bits, "group_size": group_size, "zero_point": zero_point,
                 "calib_data": calib_data, "calib_samples": calib_samples, "calib_seqlen": calib_seqlen,
                 "dtype": dtype, "device": device, "seed": seed, "refine_steps": refine_steps}
        settings = dict(QUANT_DEFAULTS)
        if recipe is not None:
            settings.update(load_recipe(recipe))
        settings.update({k: v for k, v in given.items() if v is not None})
        report = quantize_model(QuantizeSpec(model=model, out=out, force=force, **settings))
        if json_out:
            print_json({"out": str(report.out), "bytes_in": report.bytes_in, "bytes_out": report.bytes_out,
                        "seconds": report.seconds, "layers": [asdict(s) for s in report.layers]})
        else:
            quantize_table(report)


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="A checkpoint folder (lmq or AutoAWQ) or a float model folder."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
) -> None:
    """Show a checkpoint's manifest, sizes, quantization settings and per-layer error."""
    with guard():
        from lmq.inspect import inspect_checkpoint
        from lmq.render import inspect_table, print_json

        info = inspect_checkpoint(checkpoint)
        print_json(info.to_json()) if json_out else inspect_table(info)


@eval_app.command("ppl")
def eval_ppl(
    model: str = typer.Argument(..., help="Float model, or a 4-bit checkpoint: lmq's (portable or packed), AutoAWQ or "
                                "GPTQ."),
    data: str = typer.Option(..., help="Text file to score, e.g. wikitext-2-raw/wiki.test.raw."),
    seqlen: int = typer.Option(1024, help="Tokens per window."),
    max_windows: Optional[int] = typer.Option(None, help="Score only the first N windows."),
    kv_dtype: str = typer.Option("fp16", help="KV cache precision to simulate: fp16 (the model's own, nothing "
                                 "simulated), bf16 (a round trip through bf16), int8 or int4."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(1, help="Windows per forward pass."),
    lm_head: str = typer.Option("auto", "--lm-head", help="auto: the checkpoint's LM head; int8: score with its int8 "
                                "rows (what lmq chat --lm-head int8 runs)."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
) -> None:
    """Perplexity on non-overlapping windows of a text file."""
    with guard():
        from dataclasses import asdict

        from lmq.evaluate import perplexity
        from lmq.render import ppl_table, print_json

        r = perplexity(model, data, seqlen, max_windows, device, kv_dtype, batch_size, lm_head)
        print_json(asdict(r)) if json_out else ppl_table(r)


@eval_app.command("kld")
def eval_kld(
    checkpoint: str = typer.Argument(..., help="The quantized checkpoint (or model) to score."),
    reference: str = typer.Option(..., help="The float reference model."),
    data: str = typer.Option(..., help="Text file, e.g. wikitext-2-raw/wiki.test.raw."),
    seqlen: int = typer.Option(1024, help="Tokens per window."),
    max_windows: Optional[int] = typer.Option(None, help="Score only the first N windows."),
    kv_dtype: str = typer.Option("fp16", help="KV cache precision to simulate for CHECKPOINT: fp16 (nothing "
                                 "simulated), bf16, int8 or int4."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(1, help="Windows per forward pass."),
    lm_head: str = typer.Option("auto", "--lm-head", help="auto: CHECKPOINT's LM head; int8: score CHECKPOINT with its "
                                "head's int8 rows (what lmq chat --lm-head int8 runs)."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
) -> None:
    """Mean KL divergence to a reference model and same-top-token rate."""
    with guard():
        from dataclasses import asdict

        from lmq.evaluate import kl_divergence
        from lmq.render import kld_table, print_json

        r = kl_divergence(checkpoint, reference, data, seqlen, max_windows, device, kv_dtype, batch_size, lm_head)
        print_json(asdict(r)) if json_out else kld_table(r)


# ---------------------------------------------------------------------------------------------
# pack (stage 2: the packed checkpoint) and bench gemm
# ---------------------------------------------------------------------------------------------
@app.command("pack")
def pack_cmd(
    checkpoint: Path = typer.Argument(..., help="A portable 4-bit checkpoint folder (lmq's, AutoAWQ's or GPTQ's)."),
    arch: str = typer.Option(..., "--arch", help="GPU generation: sm75, sm80, sm86, sm89, sm90, or auto (the local GPU)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the packed checkpoint to."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
) -> None:
    """Re-lay a portable 4-bit checkpoint in the order one GPU generation's kernels read fastest."""
    with guard():
        from lmq.console import log
        from lmq.pack.api import pack_checkpoint

        info = pack_checkpoint(checkpoint, output, arch, force=force)
        log(f"packed {info['linears']} linears for {info['arch']} (layout {info['layout']}) into {output}")


@bench_app.command("gemm")
def bench_gemm_cmd(
    shapes: str = typer.Option("llama3-8b", "--shapes", help="llama3-8b, qwen2.5-7b, or M,N,K triples separated by ';'."),
    m: str = typer.Option("1,4,16,64,256,1024,4096", "--m", help="Comma-separated M (rows) to time per shape."),
    group_size: int = typer.Option(128, "--group-size", help="Quantization group size: 32, 64 or 128."),
    dtype: str = typer.Option("fp16", "--dtype", help="Activations: fp16 or bf16 (cuBLAS runs in the same dtype)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
) -> None:
    """Time lmq's W4A16 GEMM against cuBLAS (fp16 or bf16) and torch's int4 kernel, with the bandwidth floor."""
    with guard():
        import json

        from lmq.bench import bench_gemm, parse_gemm_shapes, render_gemm_table
        from lmq.console import log, out
        from lmq.errors import InputError

        try:
            ms = [int(v) for v in m.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--m {m!r}: expected comma-separated positive integers, e.g. 1,16,256") from None
        if not ms or min(ms) <= 0:
            raise InputError(f"--m {m!r}: expected comma-separated positive integers, e.g. 1,16,256")
        shape_list, per_shape_ms = parse_gemm_shapes(shapes)
        report = bench_gemm(
            shape_list, ms, group_size, per_shape_ms,
            on_row=lambda r: log(f"{r.shape} M={r.M}: lmq {r.lmq_us:.1f} us ({r.lmq_path}), "
                                 f"cuBLAS {r.cublas_us:.1f} us, x{r.speedup:.2f}"),
            dtype=dtype,
        )
        if json_out:
            out.print_json(json.dumps(report))
        else:
            out.print(render_gemm_table(report))



# ---------------------------------------------------------------------------------------------
# attention: bench attention
# ---------------------------------------------------------------------------------------------


@bench_app.command("attention")
def bench_attention_cmd(
    kv_dtype: str = typer.Option("fp16,int8,int4", "--kv-dtype", help="Comma-separated KV cache dtypes: fp16, int8, int4."),
    context: str = typer.Option("1k,4k,16k,32k", "--context", help="Comma-separated context lengths (k = 1024)."),
    batch: str = typer.Option("1,8,64", "--batch", help="Comma-separated batch sizes (sequences per step)."),
    heads: int = typer.Option(32, "--heads", help="Query heads."),
    kv_heads: int = typer.Option(8, "--kv-heads", help="KV heads (grouped-query attention)."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head dimension."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
) -> None:
    """Time paged decode attention per layer against the bandwidth floor and torch SDPA (fp16 cache)."""
    with guard():
        import json

        from lmq.bench_attention import bench_attention, parse_list, render_attention_table
        from lmq.console import log, out

        report = bench_attention(
            parse_list(kv_dtype, "--kv-dtype", "str"), parse_list(context, "--context"),
            parse_list(batch, "--batch"), heads, kv_heads, head_dim,
            on_row=lambda r: log(f"{r.kv_dtype} L={r.context} B={r.batch}: {r.lmq_us:.1f} us, "
                                 f"{100 * r.floor_frac:.0f}% of floor"),
        )
        if json_out:
            out.print_json(json.dumps(report))
        else:
            out.print(render_attention_table(report))


# ---------------------------------------------------------------------------------------------
# engine options shared by `lmq bench e2e` and `lmq chat`
# ---------------------------------------------------------------------------------------------
# Flag, default and help of each engine setting the two commands share, defined once (a fresh
# typer.Option per use). `--seed` is not shared: the commands seed different things (bench's
# prompts, chat's sampling) with different defaults (0, none). The LLM(...) call is built in one
# place per command (here for chat, in lmq.bench_e2e.run_bench for bench).


def _kv_dtype_option():
    return typer.Option("auto", "--kv-dtype", help="KV cache: auto (the model's dtype), fp16, bf16, int8, int4.")


def _max_model_len_option():
    return typer.Option(None, "--max-model-len", help="Context length in tokens, prompt or conversation + answer "
                        "(default: the model's).")


def _cache_max_memory_option():
    return typer.Option(None, "--cache-max-memory", help="KV cache size, e.g. 8GiB (default: from "
                        "--gpu-memory-utilization).")


def _gpu_memory_utilization_option():
    return typer.Option(0.9, "--gpu-memory-utilization", help="Share of the GPU's memory lmq may use in all "
                        "(weights, cache, activations) when --cache-max-memory is not given.")


def _device_option():
    return typer.Option("auto", "--device", help="auto, cpu or cuda.")


def _lm_head_option():
    return typer.Option("auto", "--lm-head", help="auto: the checkpoint's fp16 / bf16 LM head; int8: its rows in int8 "
                        "with one scale each, made at load (half the bytes of a batch-1 decode step's largest read; "
                        "measure the cost with lmq eval --lm-head int8).")


# ---------------------------------------------------------------------------------------------
# engine: bench (end to end)
# ---------------------------------------------------------------------------------------------


@bench_app.command("e2e")
def bench_e2e_cmd(
    checkpoint: Optional[str] = typer.Argument(None, help="A packed or portable 4-bit checkpoint (or use --synthetic)."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Random 4-bit weights at a known shape: llama3-8b, qwen2.5-7b, smollm2-135m."),
    mode: str = typer.Option("latency,throughput,multiturn", "--mode", help="Comma-separated: latency, throughput, multiturn."),
    batch: str = typer.Option("1,8,32", "--batch", help="Latency: comma-separated batch sizes."),
    input_len: str = typer.Option("128,1024", "--input-len", help="Latency: comma-separated prompt lengths (tokens)."),
    output_len: str = typer.Option("128", "--output-len", help="Latency: comma-separated output lengths (tokens)."),
    num_requests: int = typer.Option(256, "--num-requests", help="Throughput: requests (random lengths around the first --input-len / --output-len, +-50%)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Throughput: a jsonl file of {\"prompt\", \"max_tokens\"} lines instead of random requests."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Throughput: at most this many requests in flight."),
    turns: int = typer.Option(8, "--turns", help="Multi-turn: turns of one conversation (32-token questions)."),
    answer_len: int = typer.Option(128, "--answer-len", help="Multi-turn: tokens per answer."),
    baseline: str = typer.Option("none", "--baseline", help="none, or hf: transformers generate in fp16 on the same device, printed beside."),
    kv_dtype: str = _kv_dtype_option(),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Most sequences in one batch."),
    max_num_batched_tokens: int = typer.Option(2048, "--max-num-batched-tokens", help="Most tokens in one step "
                                               "(prompt chunks and decode rows together): larger gives faster "
                                               "prefills, smaller a shorter wait for the tokens of running requests."),
    max_model_len: Optional[int] = _max_model_len_option(),
    cache_max_memory: Optional[str] = _cache_max_memory_option(),
    gpu_memory_utilization: float = _gpu_memory_utilization_option(),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Synthetic weights: quantization group size "
                                             "(default: 128, or the largest of 64, 32 that splits the shape's layers)."),
    device: str = _device_option(),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompts."),
    deterministic: bool = typer.Option(False, "--deterministic", help="The engine in its deterministic mode (every "
                                       "split-K sum order-independent), to measure what that costs."),
    lm_head: str = _lm_head_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
) -> None:
    """End-to-end engine speed: latency, throughput, multi-turn TTFT (vLLM's metric names)."""
    with guard():
        from lmq.bench_e2e import run_bench

        _, text = run_bench(
            checkpoint=checkpoint, synthetic=synthetic, modes=mode, batches=batch, input_lens=input_len,
            output_lens=output_len, num_requests=num_requests, dataset=dataset, concurrency=concurrency,
            turns=turns, answer_len=answer_len, baseline=baseline, kv_dtype=kv_dtype, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, cache_max_memory=cache_max_memory,
            gpu_memory_utilization=gpu_memory_utilization, group_size=group_size,
            device=device, seed=seed, json_out=json_out, deterministic=deterministic, lm_head=lm_head,
        )
        from lmq.console import out

        if json_out:
            out.print_json(text)
        else:
            out.print(text)


# ---------------------------------------------------------------------------------------------
# runtime: chat
# ---------------------------------------------------------------------------------------------
CHAT_HELP = "commands: /reset (new conversation), /stats (last answer's numbers), /exit (or Ctrl-D); " \
            "Ctrl-C stops an answer, Ctrl-C at the prompt quits"


@app.command()
def chat(
    checkpoint: str = typer.Argument(..., help="A packed or portable 4-bit checkpoint of a chat (instruct) model."),
    kv_dtype: str = _kv_dtype_option(),
    system: str | None = typer.Option(None, "--system", help="System message (kept by /reset)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Most tokens per answer."),
    temperature: float = typer.Option(0.7, "--temperature", help="0 for greedy decoding."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the K most likely tokens (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats (1 = off)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    prompt: str | None = typer.Option(None, "--prompt", help="Answer this one message, print only the answer, exit."),
    device: str = _device_option(),
    max_model_len: int | None = _max_model_len_option(),
    cache_max_memory: str | None = _cache_max_memory_option(),
    gpu_memory_utilization: float = _gpu_memory_utilization_option(),
    lm_head: str = _lm_head_option(),
    block_size: int | None = typer.Option(None, "--block-size", hidden=True, help="Tokens per KV block (tests)."),
) -> None:
    """Chat with a 4-bit model in the terminal; earlier turns' KV is reused from the prefix cache."""
    with guard():
        from rich.markup import escape

        from lmq.console import console, log
        from lmq.engine.chat import ChatSession
        from lmq.engine.llm import LLM
        from lmq.engine.sampling import SamplingParams
        from lmq.errors import InputError

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed).validate()
        if prompt is not None and not prompt.strip():
            raise InputError("--prompt is empty; give the message to answer, e.g. --prompt \"What is the capital of "
                             "France?\"")
        extra = {} if block_size is None else {"block_size": block_size}
        log(f"loading {checkpoint} ...")
        llm = LLM(checkpoint, device=device, kv_dtype=kv_dtype, cache_max_memory=cache_max_memory,
                  gpu_memory_utilization=gpu_memory_utilization,
                  max_model_len=max_model_len, lm_head=lm_head, **extra)
        session = ChatSession(llm, system, params)
        if prompt is not None:
            _chat_turn(session, prompt)  # InputError -> `error: ...`, exit 1
            return
        log(f"ready: context {llm.max_model_len} tokens; {CHAT_HELP}")
        if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused alone (ChatSession), instead of
            sys.stdin.reconfigure(errors="surrogateescape")  # failing the read and losing the lines buffered after it
        prompt_mark = ""  # no prompt when stdin is a pipe: the log would show a row of them
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())

            prompt_mark = "[bold green]>>> [/]"
        while True:
            try:
                line = console.input(prompt_mark)
            except EOFError:
                log("")
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.reset()
                log("conversation cleared")
            elif text == "/stats":
                log(_chat_stats(session.last_stats))
            elif text.startswith("/") and " " not in text:
                log(f"unknown command {text}; {CHAT_HELP}")
            else:
                try:
                    _chat_turn(session, text)
                except InputError as e:  # the conversation is too long, ...: say so and go on
                    console.print(f"[yellow]{escape(str(e))}[/]", highlight=False)
                except KeyboardInterrupt:  # Ctrl-C stops the answer; SIGTERM (`Terminated`) ends the chat
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    console.print("[dim](answer stopped; the part shown stays in the conversation)[/]", highlight=False)


def _chat_turn(session, text: str) -> None:
    """Stream one answer to stdout, flushed piece by piece, then a newline."""
    from contextlib import closing

    with closing(session.ask(text)) as pieces:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _chat_stats(s) -> str:
    if s is None:
        return "no answer yet"
    ttft = "-" if s.ttft_s is None else f"{s.ttft_s:.3f} s"
    rate = "-" if s.output_tok_s is None else f"{s.output_tok_s:.1f} tok/s"
    return (f"TTFT {ttft}, output {rate}, prompt {s.prompt_tokens} tokens ({s.cached_tokens} cached), "
            f"{s.generated_tokens} generated ({s.finish_reason})")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
