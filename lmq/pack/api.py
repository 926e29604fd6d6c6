"""`lmq pack`: a portable 4-bit checkpoint -> a packed checkpoint for one GPU generation.

Input: any folder whose config.json has a 4-bit `quantization_config` that
`lmq.format.source.QuantConfig` reads, with group size 32, 64 or 128, read through
`lmq.format.source.WeightSource` (which finds the shards):
    {quant_method: "awq", version: "gemm", ...}   lmq's portable checkpoints and AutoAWQ's;
                                                  `<prefix>.qweight/.qzeros/.scales` (lmq/format/awq_gemm.py)
    {quant_method: "gptq", checkpoint_format: "gptq" | "gptq_v2", sym, desc_act, ...}
                                                  AutoGPTQ's and GPTQModel's; the same three tensors plus
                                                  `<prefix>.g_idx` (lmq/format/gptq.py; act-order refused)
Every other tensor is plain and copied.

Output (written atomically: a temporary folder beside the target, renamed at the end):
    <prefix>.qweight/.scales/.zeros  in the arch's layout (`LAYOUTS[arch]`, e.g. lmq/pack/planes64.py)
    every other tensor               unchanged
    config.json                      quantization_config.version = "lmq-<layout>" so other tools
                                     refuse the folder instead of misreading it; a GPTQ source's is
                                     rewritten as {quant_method: "awq", bits, group_size, zero_point,
                                     version: "lmq-<layout>"}, the one form every packed folder has
                                     (the packed tensors are lmq's whatever the source)
    tokenizer and other files        copied
    manifest.json                    kind "packed", arch, layout name + version, minimum compute
                                     capability, the kernel configuration, and the source (path,
                                     kind, its quantization_config)

Packing is deterministic: tensors are visited in sorted order and nothing time-dependent is written.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lmq.errors import CheckpointError, InputError, UnsupportedError
from lmq.format import awq_gemm
from lmq.format.source import QuantConfig, WeightSource, read_config_json
from lmq.pack import planes64

# arch -> (layout module, minimum compute capability). One layout serves every arch today; the
# per-arch differences (tile shapes, stages, warps, split-K, crossovers) live in the kernel's
# config table (lmq.kernels.w4a16_gemm.CONFIGS) and are recorded in the manifest.
LAYOUTS: dict[str, tuple[ModuleType, str]] = {
    "sm75": (planes64, "7.5"),
    "sm80": (planes64, "8.0"),
    "sm86": (planes64, "8.6"),
    "sm89": (planes64, "8.9"),
    "sm90": (planes64, "9.0"),
}
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales")
GPTQ_SUFFIXES = (".g_idx",)  # read with a GPTQ linear, not copied
# Not copied: weights and configs the packer writes itself, and GPTQ's quantize_config.json, which
# GPTQ loaders read before config.json and would misread the packed tensors by.
_WEIGHT_FILES = ("model.safetensors.index.json", "manifest.json", "config.json", "quantize_config.json",
                 "quant_config.json")


# ---------------------------------------------------------------------------------------------
# manifests: lmq.format.manifest owns the file; these are the packed kind's fields
# ---------------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict[str, Any] | None:
    from lmq.format.manifest import read_manifest as _read

    return _read(Path(folder))


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    from lmq.format.manifest import write_manifest as _write

    _write(Path(folder), manifest)


def resolve_arch(arch: str) -> str:
    """`auto` -> the local GPU's arch; otherwise check the name."""
    if arch == "auto":
        from lmq.engine.qlinear import local_arch

        return local_arch()
    if arch not in LAYOUTS:
        raise InputError(f"--arch {arch!r} is not one of {', '.join(LAYOUTS)} or auto")
    return arch


def check_packed_for(folder: Path, arch: str) -> dict[str, Any]:
    """The runtime's check: the packed checkpoint at `folder` must be for `arch`; returns its manifest.

    On a mismatch the error names the exact `lmq pack` command that re-packs the source for `arch`.
    """
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None or m.get("kind") != "packed":
        raise CheckpointError(f"{folder} is not a packed checkpoint (no manifest.json of kind 'packed')")
    if m.get("arch") != arch:
        src = m.get("source", {}).get("path", "<the portable checkpoint>")
        raise CheckpointError(
            f"{folder} is packed for {m.get('arch')} (compute capability >= {m.get('min_compute_capability')}), "
            f"but this GPU is {arch}; re-pack it for this GPU: lmq pack {src} --arch {arch} -o {folder}-{arch}"
        )
    layout, _ = LAYOUTS[arch]
    want = {"name": layout.NAME, "version": layout.VERSION}
    if m.get("layout") != want:
        raise CheckpointError(
            f"{folder} uses layout {m.get('layout')}, this lmq reads {want}; re-pack it: "
            f"lmq pack {m.get('source', {}).get('path', '<source>')} --arch {arch} -o {folder} --force"
        )
    return m


# ---------------------------------------------------------------------------------------------
# reading the portable checkpoint
# ---------------------------------------------------------------------------------------------
def _quant_config(src: Path, cfg: dict[str, Any] | None = None) -> tuple[dict[str, Any], QuantConfig]:
    """`(config.json, its quantization_config parsed)` of a portable checkpoint `lmq pack` can read; `cfg`: the
    config.json already parsed (a `WeightSource`'s), else it is read here."""
    if cfg is None:
        cfg = read_config_json(src, CheckpointError(
            f"{src} has no config.json; give a quantized checkpoint folder (from `lmq quantize`)"))
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(
            f"{src} is not a quantized checkpoint (config.json has no quantization_config); run `lmq quantize` first"
        )
    method, version = str(qc.get("quant_method", "")).lower(), str(qc.get("version", "gemm")).lower()
    if method not in ("awq", "gptq") or (method == "awq" and version != "gemm"):
        hint = " (it is already packed)" if version.startswith("lmq-") else ""
        raise UnsupportedError(
            f"{src}: quantization_config is {method!r} version {version!r}{hint}; lmq pack reads AWQ 'gemm' "
            f"checkpoints (from `lmq quantize` or AutoAWQ) and GPTQ ones (AutoGPTQ, GPTQModel)"
        )
    if int(qc.get("bits", qc.get("w_bit", 0))) != 4:
        raise UnsupportedError(f"{src}: bits={qc.get('bits')}; lmq packs 4-bit checkpoints only")
    quant = QuantConfig.from_hf(qc, src)
    if quant.group_size not in (32, 64, 128):
        raise UnsupportedError(f"{src}: group_size={quant.group_size}; lmq's kernels take 32, 64 or 128")
    return cfg, quant


def pack_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                arch: str, name: str = "linear") -> dict[str, torch.Tensor]:
    """One linear's AutoAWQ gemm tensors -> the arch's layout (also what a loader uses to pack on the fly)."""
    layout, _ = LAYOUTS[arch]
    q = awq_gemm.unpack(qweight, qzeros, scales, group_size, name)
    return layout.pack(q, name)


def _pack_source_linear(weights: WeightSource, quant: QuantConfig, prefix: str, arch: str) -> dict[str, torch.Tensor]:
    """One linear of a portable checkpoint (AWQ or GPTQ, as `quant` says) -> the arch's layout."""
    layout, _ = LAYOUTS[arch]
    return layout.pack(quant.unpack(weights.get, weights.has, prefix), prefix)


def quantized_prefixes(names: Iterator[str] | list[str]) -> list[str]:
    """Sorted prefixes that have all of .qweight/.qzeros/.scales."""
    names = set(names)
    return sorted(n[: -len(".qweight")] for n in names
                  if n.endswith(".qweight") and all(n[: -len(".qweight")] + s in names for s in QUANT_SUFFIXES))


# ---------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------
def pack_checkpoint(src: Path, out: Path, arch: str, force: bool = False) -> dict[str, Any]:
    """Pack the portable checkpoint `src` for `arch` into `out`; returns a summary."""
    from lmq.console import progress
    from lmq.format.writer import CheckpointWriter, check_output_path
    from lmq.kernels.w4a16_gemm import CONFIGS

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputError(f"{src} is not a folder; give a quantized checkpoint folder (from `lmq quantize`)")
    arch = resolve_arch(arch)
    check_output_path(out, force, src)
    cfg, quant = _quant_config(src)
    qc = cfg["quantization_config"]
    G = quant.group_size
    src_manifest = read_manifest(src)
    if src_manifest is not None and src_manifest.get("kind") == "packed":
        raise InputError(f"{src} is already packed (for {src_manifest.get('arch')}); pack its source instead")
    weights = WeightSource(src, config=cfg)
    if "hidden_size" in cfg:  # a config with the model's numbers (a bare quantization_config is packed as it is)
        weights.check_shapes()
    prefixes = quantized_prefixes(weights.names)
    if not prefixes:
        raise CheckpointError(f"{src} holds no quantized linears (no <name>.qweight/.qzeros/.scales tensors)")
    quant_names = {p + s for p in prefixes for s in QUANT_SUFFIXES + GPTQ_SUFFIXES}
    plain = sorted(n for n in weights.names if n not in quant_names)
    layout, min_cc = LAYOUTS[arch]

    with CheckpointWriter(out, force) as w, progress() as bar:
        task = bar.add_task(f"packing for {arch}", total=len(prefixes) + len(plain), info="")
        written = 0
        for p in prefixes:
            packed = _pack_source_linear(weights, quant, p, arch)
            for suffix, t in sorted(packed.items()):
                w.add(f"{p}.{suffix}", t)
                written += t.numel() * t.element_size()
            bar.update(task, advance=1, info=f"{p}  {written / 2**20:.0f} MiB")
        for n in plain:
            t = weights.get(n)
            w.add(n, t)
            written += t.numel() * t.element_size()
            bar.update(task, advance=1, info=f"{n}  {written / 2**20:.0f} MiB")
        # -- non-weight files, then config.json and the manifest -----------------------------------
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, w.tmp / f.name)
        packed_qc = qc if quant.method == "awq" else QuantConfig(4, G, quant.zero_point).to_hf()
        cfg = {**cfg, "quantization_config": {**packed_qc, "version": f"lmq-{layout.NAME}"}}
        w.write_json("config.json", cfg)
        write_manifest(w.tmp, {
            "kind": "packed",
            "arch": arch,
            "layout": {"name": layout.NAME, "version": layout.VERSION},
            "min_compute_capability": min_cc,
            "kernel_config": CONFIGS[arch],
            "bits": 4,
            "group_size": G,
            "zero_point": quant.zero_point,
            "quantized_linears": len(prefixes),
            "source": {
                "path": str(src),
                "kind": weights.kind,
                "quantization_config": qc,
                "format_version": (src_manifest or {}).get("format_version"),
                "settings": {k: v for k, v in (src_manifest or {}).items()
                             if k not in ("kind", "format_version", "lmq_version")},
            },
        })
    return {"arch": arch, "layout": f"{layout.NAME} v{layout.VERSION}", "linears": len(prefixes),
            "bytes": written, "out": str(out)}


def load_linears(folder: Path | WeightSource, arch: str) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """`(group_size, {prefix: {"qweight", "scales", "zeros"}})` of every quantized linear, in `arch`'s layout.

    `folder` is a checkpoint folder, or a `WeightSource` already open on one (the engine's, so the
    shards are opened once). A packed checkpoint is checked (`check_packed_for`: another arch is
    refused with the exact `lmq pack` command) and read as it is; a portable one is packed for
    `arch` while loading, and the log says so (and how to pack it once instead).
    """
    from lmq.console import log

    weights = folder if isinstance(folder, WeightSource) else WeightSource(Path(folder))
    folder, m = weights.path, weights.manifest
    if m is not None and m.get("kind") == "packed":
        check_packed_for(folder, arch)
        G = int(m["group_size"])
        prefixes = sorted(n[: -len(".qweight")] for n in weights.names if n.endswith(".qweight"))
        return G, {p: {k: weights.get(f"{p}.{k}") for k in ("qweight", "scales", "zeros")} for p in prefixes}
    _, quant = _quant_config(folder, weights.config)
    log(f"{folder} is a portable checkpoint: packing it for {arch} while loading "
        f"(to do it once: lmq pack {folder} --arch {arch} -o {folder}-{arch})")
    return quant.group_size, {p: _pack_source_linear(weights, quant, p, arch)
                              for p in quantized_prefixes(weights.names)}
