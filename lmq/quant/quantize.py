"""`lmq quantize`: a Hugging Face model -> a portable 4-bit checkpoint (AutoAWQ gemm layout + manifest).

Memory-bounded: weights are read one decoder layer at a time from the safetensors shards, moved to
the compute device, searched and quantized there, written to the output shards and dropped. The
calibration activations `[S, T, C]` are the only model-sized state carried from layer to layer:
each layer's search sees the output of the already-quantized layers before it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lmq.console import log, progress, warn
from lmq.errors import InputError
from lmq.format import awq_gemm
from lmq.format.manifest import write_manifest
from lmq.format.source import (
    TOKENIZER_FILES,
    TOKENIZER_MODEL_FILES,
    QuantConfig,
    WeightSource,
    has_tokenizer,
    load_tokenizer,
    resolve_model_path,
)
from lmq.format.writer import CheckpointWriter, check_output_path
from lmq.models.llama import layer_forward, linear_shapes, rope_cos_sin
from lmq.quant import awq
from lmq.quant.refine import refine_rounding
from lmq.quant.rtn import SUPPORTED_GROUP_SIZES, QuantizedWeight, check_group_size, quantize

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# awq: AWQ scales + clipping, then round-to-nearest (AutoAWQ's algorithm) or, with refine_steps > 0
# (default), learned rounding on the same grid; rtn: round-to-nearest, no calibration. All write the
# same checkpoint format.
METHODS = ("awq", "rtn")


@dataclass
class QuantizeSpec:
    model: str
    out: Path
    method: str = "awq"  # awq | rtn
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    calib_data: str = "pileval"
    calib_samples: int = 128
    calib_seqlen: int = 512
    dtype: str = "auto"  # auto | float16 | bfloat16: dtype of the tensors left unquantized
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    force: bool = False
    n_grid: int = 20
    refine_steps: int = 200  # rounding refinement steps per layer after AWQ (0: AWQ + round-to-nearest)
    max_layers: Optional[int] = None  # quantize only the first N layers' search (tests); rest RTN


@dataclass
class LayerStats:
    layer: int
    rtn_err: float  # mean squared error of the layer output with RTN weights
    awq_err: float  # ... with the weights written (== rtn_err for --method rtn)
    scaled_err: float = float("nan")  # ... with AWQ's scales and clipping, rounded to nearest (before refinement)
    ratios: dict[str, float] = field(default_factory=dict)
    clipped: list[str] = field(default_factory=list)  # linears whose clipping search was kept
    seconds: float = 0.0


@dataclass
class QuantizeReport:
    out: Path
    layers: list[LayerStats]
    bytes_in: int
    bytes_out: int
    seconds: float


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(16 * 1024 * 1024):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _finite_cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Cast a tensor left in float (norms after AWQ folding, embeddings) and refuse overflow to inf."""
    c = t.to(dtype)
    if not torch.isfinite(c).all():
        raise InputError(f"{name} overflows {str(dtype).replace('torch.', '')} (max |value| "
                         f"{t.abs().max().item():.3g}); write the unquantized tensors with --dtype bfloat16")
    return c


def _finite(d: dict) -> dict:
    """JSON has no NaN: statistics that were not measured (RTN needs no calibration) become null."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def check_layer_shapes(src: WeightSource, group_size: int) -> None:
    """Every linear (and the embedding) has the shape config.json implies, and every linear's input size splits
    into whole groups; say which one does not. (A config that does not match its weights would be written into the
    checkpoint, which other tools then refuse.)"""
    src.check_shapes()  # every layer's linears have the shapes config.json gives, the same in each layer
    for lin, (_, K) in linear_shapes(src.cfg).items():
        check_group_size(K, group_size, f"{src.layer_prefix(0)}.{lin}")


def warn_calib_seqlen(cfg, seqlen: int, path: Path) -> None:
    """Calibration samples longer than the model's context put activations at positions it never saw (and, past a
    sliding window, attention the model does not compute) into the search; say so before calibration starts."""
    limit = cfg.context
    what = "sliding window" if limit != cfg.max_position_embeddings else "context (max_position_embeddings)"
    if seqlen > limit:
        warn(f"--calib-seqlen {seqlen} exceeds the {what} of {limit} tokens in {path}/config.json: "
            f"the scales are then searched on positions the model was not trained for; use --calib-seqlen {limit} "
            "or less")


N_STAT = 8  # calibration samples the per-layer error statistics (and refinement's keep-or-drop) use


def quantize_layer(i: int, lw: dict, x: torch.Tensor | None, cos, sin, cfg, qs: awq.QuantSettings, seed: int,
                   search: bool = True, prefix: str = "layer") -> tuple[dict, dict[str, QuantizedWeight], LayerStats,
                                                                       torch.Tensor | None]:
    """Quantize decoder layer `i` (float weights `lw` on the compute device).

    `x [S, T, C]`: the layer's calibration input, i.e. the already-quantized layers' output (None:
    round to nearest, no statistics). With `search`, AWQ's scale and clipping search and, with
    `qs.refine_steps`, rounding refinement. Returns the weights with AWQ's scales folded in, the
    quantized linears, the layer's statistics and the next layer's input (this layer's quantized
    output, so the next search also absorbs the error made so far: GPU run 4, 47.3% -> 51.8% of
    RTN's perplexity loss recovered at g64, against the float layers' output as AutoAWQ uses).
    """
    st = LayerStats(layer=i, rtn_err=float("nan"), awq_err=float("nan"))
    if x is not None:
        cap = awq.capture(lw, x, cos, sin, cfg, qs.batch_size)
        xs, ref = x[:N_STAT], cap.output[:N_STAT]
        st.rtn_err = st.scaled_err = awq.layer_error(lw, xs, ref, cos, sin, cfg, qs)
        if search:
            # measured on exactly the grid written below (scales, zeros, and the codes too unless
            # rounding refinement changes them)
            lw, st.scaled_err, st.ratios, st.clipped = awq.awq_layer(lw, cap, xs, ref, cos, sin, cfg, qs)
        st.awq_err = st.scaled_err
    q = {lin: quantize(lw[f"{lin}.weight"], qs.bits, qs.group_size, qs.zero_point, f"{prefix}.{lin}")
         for lin in cfg.arch.linears}
    if x is None:
        return lw, q, st, None
    if search and qs.refine_steps > 0:
        # learned rounding on the same grid, trained on the samples the error is not measured on
        train = slice(N_STAT, None) if x.shape[0] > N_STAT else slice(None)
        q, _, st.awq_err = refine_rounding(lw, x[train], cap.output[train], xs, ref, cos, sin, cfg, qs.bits,
                                           qs.group_size, qs.zero_point, qs.refine_steps, qs.refine_batch,
                                           qs.refine_lr, seed=seed, rtn=q, before=st.scaled_err)
    qlw = dict(lw, **{f"{lin}.weight": qw.dequantize(torch.float32) for lin, qw in q.items()})
    x = torch.cat([layer_forward(qlw, xb, cos, sin, cfg) for xb in x.split(qs.batch_size)])
    return lw, q, st, x


def quantize_model(spec: QuantizeSpec) -> QuantizeReport:
    t0 = time.time()
    if spec.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {spec.method!r}")
    if spec.refine_steps < 0:
        raise InputError(f"--refine-steps must be 0 (off) or more, got {spec.refine_steps}")
    if not 0 <= spec.seed < 2**63:  # torch's generators take 64 bits; Python's shuffle reads -1 as 1
        raise InputError(f"--seed must be a whole number from 0 to 2**63 - 1, got {spec.seed}")
    if spec.dtype not in ("auto", *DTYPES):
        raise InputError(f"--dtype must be auto, float16 or bfloat16, got {spec.dtype!r}")
    if isinstance(spec.group_size, bool) or spec.group_size not in SUPPORTED_GROUP_SIZES:
        raise InputError(f"--group-size must be one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))} (what lmq's "
                         f"kernels read), got {spec.group_size!r}")
    if not isinstance(spec.zero_point, bool):
        raise InputError(f"zero_point must be true or false, got {spec.zero_point!r}")
    out = Path(spec.out)
    local = Path(spec.model).expanduser()
    # before any download: an existing output, or one that is (or holds) a local source folder
    check_output_path(out, spec.force, local if local.exists() else None)
    src_path = resolve_model_path(spec.model)
    src = WeightSource(src_path)
    bytes_in = src.weight_bytes()
    if src.quant is not None:
        raise InputError(f"{src_path} is already quantized ({src.config['quantization_config'].get('quant_method')}); "
                         "give the original float model")
    cfg = src.cfg
    qs = awq.QuantSettings(bits=spec.bits, group_size=spec.group_size, zero_point=spec.zero_point, n_grid=spec.n_grid,
                           refine_steps=spec.refine_steps)
    quantize(torch.zeros(1, spec.group_size), spec.bits, spec.group_size)  # validates bits early
    check_layer_shapes(src, spec.group_size)
    dev = _device(spec.device)
    out_dtype = src.source_dtype() if spec.dtype == "auto" else DTYPES[spec.dtype]
    if out_dtype == torch.float32:
        out_dtype = torch.float16

    tokens = None
    if spec.method != "rtn":
        from lmq.quant.calib import calibration_tokens

        warn_calib_seqlen(cfg, spec.calib_seqlen, src_path)
        tok = load_tokenizer(src_path)
        tokens = calibration_tokens(spec.calib_data, tok, spec.calib_samples, spec.calib_seqlen, spec.seed)
        log(f"calibration: {tokens.shape[0]} samples x {tokens.shape[1]} tokens from {spec.calib_data}")
        if spec.refine_steps and dev.type == "cpu":
            log(f"rounding refinement runs {spec.refine_steps} steps per layer, slow on a CPU "
                "(a GPU does it in about a second a layer for small models); --refine-steps 0 skips it")

    log(f"hashing source weights ({src.weight_bytes() / 1e9:.2f} GB)")
    src_hash = _hash_files(src.weight_files)
    torch.manual_seed(spec.seed)
    stats: list[LayerStats] = []

    with CheckpointWriter(out, spec.force) as w:
        x, cos, sin = None, None, None
        if tokens is not None:
            x = src.embed(torch.float32)[tokens].to(dev)  # [S, T, C]
            pos = torch.arange(tokens.shape[1], device=dev)
            cos, sin = rope_cos_sin(cfg, pos, torch.float32)
        with progress() as bar:
            task = bar.add_task(f"{spec.method.upper()} layers", total=cfg.num_layers, info="")
            for i in range(cfg.num_layers):
                tl = time.time()
                prefix = src.layer_prefix(i)
                lw = {k: v.to(dev) for k, v in src.layer(i, torch.float32).items()}
                searched = spec.max_layers is None or i < spec.max_layers
                lw, q, st, x = quantize_layer(i, lw, x, cos, sin, cfg, qs, spec.seed + i, searched, prefix)
                for lin, qw in q.items():
                    for k, t in awq_gemm.pack(qw).items():
                        w.add(f"{prefix}.{lin}.{k}", t)
                for k, t in lw.items():
                    if k[:-len(".weight")] not in cfg.arch.linears:
                        w.add(f"{prefix}.{k}", _finite_cast(t, out_dtype, f"{prefix}.{k}"))
                st.seconds = time.time() - tl
                stats.append(st)
                info = f"err awq/rtn {st.awq_err / st.rtn_err:.2f}" if x is not None and st.rtn_err > 0 else ""
                bar.update(task, advance=1, info=info)
                del lw, q

        arch = cfg.arch
        w.add(arch.embed, _finite_cast(src.embed(torch.float32), out_dtype, arch.embed))
        w.add(arch.final_norm, _finite_cast(src.final_norm(torch.float32), out_dtype, arch.final_norm))
        if src.has(arch.lm_head):
            w.add(arch.lm_head, _finite_cast(src.get(arch.lm_head, torch.float32), out_dtype, arch.lm_head))
        qc = QuantConfig(spec.bits, spec.group_size, spec.zero_point)
        config = dict(src.config)
        config["quantization_config"] = qc.to_hf()
        config["torch_dtype"] = str(out_dtype).replace("torch.", "")
        config.pop("dtype", None)
        w.write_json("config.json", config)
        for name in TOKENIZER_FILES:
            if (src_path / name).exists():
                w.copy_file(src_path / name)
        if not has_tokenizer(src_path):
            warn(f"{src_path} has no tokenizer files ({' or '.join(TOKENIZER_MODEL_FILES)}): "
                f"{out} will not chat or evaluate until they are copied beside it")
        settings = {k: v for k, v in asdict(spec).items() if k not in ("out", "force", "model")}
        if spec.method == "rtn":  # settings of the calibration and search that round-to-nearest does not run
            settings = {k: v for k, v in settings.items()
                        if not k.startswith(("calib_", "refine_")) and k not in ("n_grid",)}
        write_manifest(w.tmp, {
            "kind": "quantized",
            "source": {"model": spec.model, "path": str(src_path), "hash": src_hash,
                       "model_type": cfg.model_type, "num_layers": cfg.num_layers},
            "quantization": {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                             "zero_point": spec.zero_point, "layout": "awq-gemm"},
            "settings": settings,
            "calibration": None if tokens is None else {
                "data": spec.calib_data, "samples": spec.calib_samples, "seqlen": spec.calib_seqlen, "seed": spec.seed},
            "layers": [_finite(asdict(s)) for s in stats],
        })
    bytes_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return QuantizeReport(out=out, layers=stats, bytes_in=bytes_in, bytes_out=bytes_out,
                          seconds=time.time() - t0)
