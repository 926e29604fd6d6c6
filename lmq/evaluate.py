"""`lmq eval`: what quantization cost in quality, measured on the reference decoder.

- perplexity: the text is tokenized once and cut into non-overlapping windows of `seqlen` tokens
  (the first `max_windows` if given, so every model is scored on the same windows); perplexity is
  exp(mean next-token NLL) over all predicted tokens;
- KL divergence: the same windows through a reference model and a checkpoint; mean over tokens of
  KL(p_ref || p_q), and how often both pick the same top token.

A quantized checkpoint (lmq's or AutoAWQ's) is dequantized into the reference decoder, so this
measures the checkpoint's numbers, not a kernel. `kv_dtype` passes K and V through the KV cache's
quantize -> dequantize round trip to measure what a quantized KV cache costs; `lm_head="int8"` scores with the
LM head's int8 rows, dequantized (what `lmq chat --lm-head int8` computes with).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmq.console import progress, warn
from lmq.errors import InputError
from lmq.format.manifest import quantization_manifest
from lmq.format.source import WeightSource, load_tokenizer, resolve_model_path
from lmq.models.llama import KVTransform, layer_forward, rms_norm, rope_cos_sin
from lmq.quant.rows import check_lm_head, fake_quantize_rows


class DenseModel:
    """All weights of a checkpoint, dequantized, on one device: logits for token windows."""

    def __init__(self, src: WeightSource, device: torch.device, dtype: torch.dtype,
                 kv_transform: KVTransform | None = None, lm_head: str = "auto"):
        self.src, self.cfg, self.device, self.dtype = src, src.cfg, device, dtype
        self.kv_transform = kv_transform
        self.embed = src.embed(dtype).to(device)
        self.layers = [{k: v.to(device) for k, v in src.layer(i, dtype).items()} for i in range(self.cfg.num_layers)]
        self.norm = src.final_norm(dtype).to(device)
        self.head = src.lm_head(dtype).to(device)
        if lm_head == "int8":  # the engine's --lm-head int8 (lmq.kernels.w8a16_gemm)
            self.head = fake_quantize_rows(self.head)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids [B, T]` -> fp32 logits `[B, T, V]`."""
        ids = ids.to(self.device)
        cos, sin = rope_cos_sin(self.cfg, torch.arange(ids.shape[1], device=self.device), self.dtype)
        x = self.embed[ids]  # [B, T, C]
        for lw in self.layers:
            x = layer_forward(lw, x, cos, sin, self.cfg, self.kv_transform)
        return F.linear(rms_norm(x, self.norm, self.cfg.rms_eps), self.head).float()


def pick_device(name: str) -> torch.device:
    """`auto` -> CUDA when torch sees a GPU, else CPU; `cuda`/`cuda:N` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def kv_transform_for(kv_dtype: str) -> KVTransform | None:
    """What a KV cache of `kv_dtype` does to K and V: nothing for fp16 / auto (the model's own precision; the
    reference decoder runs in fp16, or bf16 for a bf16 model, fp32 on a CPU), a round trip through bf16 for bf16
    (the engine's bf16 cache of an fp16 model rounds them), the cache's quantize -> dequantize for int8 / int4."""
    if kv_dtype in ("fp16", "auto", "none"):
        return None
    if kv_dtype == "bf16":
        return lambda t: t.to(torch.bfloat16).to(t.dtype)
    if kv_dtype not in ("int8", "int4"):
        raise InputError(f"--kv-dtype must be fp16, bf16, int8 or int4, got {kv_dtype!r}")
    from lmq.kernels.kv_quant import fake_quantize_kv

    return lambda t: fake_quantize_kv(t, kv_dtype)


def load_model(path: str, device: str = "auto", kv_dtype: str = "fp16", lm_head: str = "auto") -> DenseModel:
    check_lm_head(lm_head)
    src = WeightSource(resolve_model_path(path))
    src.check_shapes()
    dev = pick_device(device)
    # CPUs run fp16 matmuls slowly and inexactly: evaluate in fp32 there, in the model's dtype on GPU.
    dtype = torch.float32 if dev.type == "cpu" else (torch.bfloat16 if src.source_dtype() == torch.bfloat16
                                                     else torch.float16)
    return DenseModel(src, dev, dtype, kv_transform_for(kv_dtype), lm_head)


def check_data(data: str, seqlen: int, max_windows: int | None = None, batch_size: int = 1) -> Path:
    """Fail fast, before any model is loaded, on a missing text file or a silly window size, window count or
    batch size."""
    p = Path(data).expanduser()
    if not p.is_file():
        raise InputError(f"evaluation text {data} is not a file; pass e.g. --data wikitext-2-raw/wiki.test.raw")
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows must be 1 or more, got {max_windows}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be 1 or more, got {batch_size}")
    return p


def check_seqlen(model: DenseModel, seqlen: int) -> None:
    """The reference decoder attends to the whole window: refuse windows the model cannot see whole."""
    cfg = model.cfg
    if cfg.sliding_window and seqlen > cfg.sliding_window:
        raise InputError(f"--seqlen {seqlen} exceeds {model.src.path}'s sliding window of {cfg.sliding_window} "
                         f"tokens, which lmq's evaluation does not model; use --seqlen {cfg.sliding_window} or less")
    if seqlen > cfg.max_position_embeddings:
        raise InputError(f"--seqlen {seqlen} exceeds the model's context of {cfg.max_position_embeddings} tokens; "
                         "use a shorter --seqlen")


def warn_quantized_reference(ref: DenseModel, reference: str) -> None:
    """KL divergence says what quantization cost only against the float model. A quantized reference is allowed
    (the same checkpoint as both, with --kv-dtype, measures a KV cache precision alone) but said loudly, with the
    float model the manifest names where it names one."""
    src = ref.src
    if src.quant is None:
        return
    source = quantization_manifest(src.manifest or {}).get("source") or {}  # the float model quantize read
    fix = f"--reference {source['path']}" if source.get("path") else "the float model it was made from as --reference"
    warn(f"the reference {reference} is a 4-bit checkpoint ({src.kind}), so this is the KL divergence "
        f"to a quantized model, not to the float one; for what quantization cost, pass {fix}")


def windows(model_path: Path, data: str, seqlen: int, max_windows: int | None, tok=None) -> torch.Tensor:
    """Token windows `[W, seqlen]` of the text file `data`, tokenized with the model's tokenizer (`tok`: that
    tokenizer, already loaded)."""
    p = check_data(data, seqlen, max_windows)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{data} is not UTF-8 text ({e}); give a text file such as wikitext-2's wiki.test.raw") from e
    tok = tok or load_tokenizer(model_path)
    tok.model_max_length = 1 << 62  # the text is tokenized whole, then cut into windows
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise InputError(f"{data} has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


@dataclass
class PplResult:
    model: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    kv_dtype: str
    seconds: float
    lm_head: str = "auto"


@dataclass
class KldResult:
    model: str
    reference: str
    kld: float
    top1_agree: float
    ppl: float
    ppl_ref: float
    tokens: int
    windows: int
    seqlen: int
    kv_dtype: str
    seconds: float
    lm_head: str = "auto"


def perplexity(path: str, data: str, seqlen: int = 1024, max_windows: int | None = None,
               device: str = "auto", kv_dtype: str = "fp16", batch_size: int = 1, lm_head: str = "auto") -> PplResult:
    t0 = time.time()
    check_data(data, seqlen, max_windows, batch_size)
    model = load_model(path, device, kv_dtype, lm_head)
    check_seqlen(model, seqlen)
    ids = windows(model.src.path, data, seqlen, max_windows)
    nll, count = 0.0, 0
    with progress() as bar:
        task = bar.add_task("perplexity", total=ids.shape[0], info="")
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i:i + batch_size].to(model.device)
            logits = model.logits(batch)  # [B, T, V]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            nll += loss.item()
            count += batch[:, 1:].numel()
            bar.update(task, advance=batch.shape[0], info=f"ppl {math.exp(nll / count):.3f}")
    return PplResult(model=path, ppl=math.exp(nll / count), nll=nll / count, tokens=count, windows=ids.shape[0],
                     seqlen=seqlen, kv_dtype=kv_dtype, seconds=time.time() - t0, lm_head=lm_head)


def check_same_tokenizer(model_path: Path, ref_path: Path, ref_tok) -> None:
    """KL divergence compares the two models' distributions id by id: a reference whose tokenizer (`ref_tok`) maps
    tokens to other ids (same vocabulary size, another model) would give a number about nothing. Checked where the
    model has a tokenizer too (the windows are the reference's tokens)."""
    from lmq.format.source import has_tokenizer

    if not has_tokenizer(model_path):
        return
    mine, theirs = load_tokenizer(model_path).get_vocab(), ref_tok.get_vocab()
    if mine != theirs:
        token = next((t for t, i in mine.items() if theirs.get(t) != i), None) \
            or next(t for t in theirs if t not in mine)
        raise InputError(f"{model_path} and reference {ref_path} have different tokenizers (token {token!r} is id "
                         f"{mine.get(token)} in one and {theirs.get(token)} in the other): KL divergence compares the "
                         "same token ids; give the reference the model was quantized from")


def kl_divergence(path: str, reference: str, data: str, seqlen: int = 1024, max_windows: int | None = None,
                  device: str = "auto", kv_dtype: str = "fp16", batch_size: int = 1,
                  lm_head: str = "auto") -> KldResult:
    t0 = time.time()
    check_data(data, seqlen, max_windows, batch_size)
    model = load_model(path, device, kv_dtype, lm_head)
    ref = load_model(reference, device)
    warn_quantized_reference(ref, reference)
    if ref.cfg.vocab_size != model.cfg.vocab_size:
        raise InputError(f"{path} (vocab {model.cfg.vocab_size}) and reference {reference} "
                         f"(vocab {ref.cfg.vocab_size}) are not the same model family")
    ref_tok = load_tokenizer(ref.src.path)
    check_same_tokenizer(model.src.path, ref.src.path, ref_tok)
    check_seqlen(ref, seqlen)
    check_seqlen(model, seqlen)
    ids = windows(ref.src.path, data, seqlen, max_windows, ref_tok)
    kld = agree = nll_q = nll_r = 0.0
    count = 0
    with progress() as bar:
        task = bar.add_task("KL divergence", total=ids.shape[0], info="")
        for i in range(0, ids.shape[0], batch_size):
            w = ids[i:i + batch_size]  # [B, T]
            lp_r = F.log_softmax(ref.logits(w)[:, :-1], dim=-1)  # [B, T-1, V]
            lp_q = F.log_softmax(model.logits(w)[:, :-1], dim=-1)
            tgt = w[:, 1:].to(lp_r.device)  # [B, T-1]
            kld += (lp_r.exp() * (lp_r - lp_q)).sum().item()
            agree += (lp_r.argmax(-1) == lp_q.argmax(-1)).sum().item()
            nll_r -= lp_r.gather(-1, tgt[..., None]).sum().item()
            nll_q -= lp_q.gather(-1, tgt[..., None]).sum().item()
            count += tgt.numel()
            bar.update(task, advance=w.shape[0], info=f"kld {kld / count:.4f}")
    return KldResult(model=path, reference=reference, kld=kld / count, top1_agree=agree / count,
                     ppl=math.exp(nll_q / count), ppl_ref=math.exp(nll_r / count), tokens=count,
                     windows=ids.shape[0], seqlen=seqlen, kv_dtype=kv_dtype, seconds=time.time() - t0,
                     lm_head=lm_head)
