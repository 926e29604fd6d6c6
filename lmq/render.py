"""Rendering of command results as rich tables (stdout) or JSON (stdout)."""

from __future__ import annotations

import json
import math
import sys

from rich.table import Table

from lmq.console import out, warn


def print_json(data) -> None:
    """Plain JSON on stdout (no wrapping or colour), for machines."""
    sys.stdout.write(json.dumps(data, default=str, indent=2) + "\n")
    sys.stdout.flush()


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _num(v, fmt: str = ".4g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def errors_measured(layers: list[dict]) -> bool:
    """Whether any layer holds a measured output error (RTN quantization measures none: no calibration data)."""
    return any(isinstance(v, (int, float)) and not math.isnan(v)
               for s in layers for v in (s.get("rtn_err"), s.get("scaled_err"), s.get("awq_err")))


def layer_table(layers: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("layer", "RTN err", "AWQ+RTN err", "AWQ err", "AWQ/RTN", "ratios (norm/linear -> r)", "s"):
        t.add_column(col, justify="right" if col != "ratios (norm/linear -> r)" else "left")
    for s in layers:
        # AWQ+RTN: scales and clipping rounded to nearest; AWQ: what was written (after rounding refinement)
        rtn, scaled, awq = s.get("rtn_err"), s.get("scaled_err"), s.get("awq_err")
        rel = awq / rtn if rtn and awq is not None and not math.isnan(rtn) and not math.isnan(awq) else None
        ratios = " ".join(f"{k.split('.')[-1]}:{'off' if v < 0 else format(v, '.2f')}"
                          for k, v in (s.get("ratios") or {}).items())  # v < 0: unscaled RTN won
        t.add_row(str(s["layer"]), _num(rtn), _num(scaled), _num(awq), _num(rel, ".3f"), ratios,
                  _num(s.get("seconds"), ".1f"))
    return t


def quantize_table(report) -> None:
    from dataclasses import asdict

    layers = [asdict(s) for s in report.layers]
    if errors_measured(layers):
        out.print(layer_table(layers, "per-layer output error (MSE on calibration samples)"))
    t = Table(title=f"wrote {report.out}")
    for col in ("bytes in", "bytes out", "ratio", "time"):
        t.add_column(col, justify="right")
    t.add_row(_gb(report.bytes_in), _gb(report.bytes_out), f"{report.bytes_in / max(report.bytes_out, 1):.2f}x",
              f"{report.seconds:.1f} s")
    out.print(t)


def inspect_table(info) -> None:
    t = Table(title=str(info.path), show_header=False)
    t.add_column("key")
    t.add_column("value")
    m = info.manifest or {}
    rows = [
        ("kind", info.kind),
        ("model_type", info.model_type),
        ("layers x hidden", f"{info.num_layers} x {info.hidden_size}"),
        ("parameters", f"{info.params / 1e6:.1f} M"),
        ("weight files", _gb(info.weight_bytes)),
        ("quantized linears", str(info.quantized_linears)),
        ("bits per quantized weight", _num(info.bits_per_weight, ".3f")),
        ("quantization_config", json.dumps(info.quantization) if info.quantization else "-"),
        ("manifest format_version", str(m.get("format_version", "-"))),
        ("lmq version", str(m.get("lmq_version", "-"))),
    ]
    if m.get("kind") == "packed":  # what it was packed for, and from what (not the source's whole manifest)
        layout = m.get("layout") or {}
        src = m.get("source") or {}
        rows += [("packed for", f"{m.get('arch')} (compute capability >= {m.get('min_compute_capability', '-')})"),
                 ("layout", f"{layout.get('name', '-')} v{layout.get('version', '-')}"),
                 ("packed from", f"{src.get('path', '-')} ({src.get('kind', '-')})")]
    else:
        rows += [("source", json.dumps(m.get("source")) if m.get("source") else "-"),
                 ("calibration", json.dumps(m.get("calibration")) if m.get("calibration") else "-")]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    if info.problem:
        warn(f"{info.problem} (quantize, eval, chat and pack refuse it)")
    if info.layers and errors_measured(info.layers):
        out.print(layer_table(info.layers, "per-layer output error recorded at quantization"))
    elif info.layers:
        out.print(f"per-layer output error: none recorded ({len(info.layers)} layers quantized without calibration "
                  "data, e.g. --method rtn)", highlight=False, markup=False)


def ppl_table(r) -> None:
    t = Table(title="perplexity" + (f", LM head {r.lm_head}" if r.lm_head != "auto" else ""))
    for col in ("model", "kv", "windows x seqlen", "tokens", "ppl", "time"):
        t.add_column(col, justify="right" if col != "model" else "left")
    t.add_row(r.model, r.kv_dtype, f"{r.windows} x {r.seqlen}", str(r.tokens), f"{r.ppl:.4f}", f"{r.seconds:.1f} s")
    out.print(t)


def kld_table(r) -> None:
    t = Table(title="KL divergence to reference" + (f", LM head {r.lm_head}" if r.lm_head != "auto" else ""))
    for col in ("model", "reference", "tokens", "mean KLD", "same top-1", "ppl", "ppl ref"):
        t.add_column(col, justify="right" if col not in ("model", "reference") else "left")
    t.add_row(r.model, r.reference, str(r.tokens), f"{r.kld:.5f}", f"{100 * r.top1_agree:.2f}%", f"{r.ppl:.4f}",
              f"{r.ppl_ref:.4f}")
    out.print(t)
