"""`lmq inspect`: what a checkpoint holds — manifest, sizes, quantization settings, per-layer error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lmq.errors import CheckpointError, InputError
from lmq.format.manifest import quantization_manifest
from lmq.format.source import WeightSource


@dataclass
class Inspection:
    path: str
    model_type: str
    num_layers: int
    hidden_size: int
    kind: str  # "float", "quantized", "packed", "autoawq", or a GPTQ checkpoint's format: "gptq" (v1), "gptq_v2"
    quantization: Optional[dict]
    manifest: Optional[dict]
    weight_bytes: int
    quantized_linears: int
    params: int
    bits_per_weight: Optional[float]
    layers: list[dict] = field(default_factory=list)
    problem: str | None = None  # what quantize / eval / chat / pack would refuse it for (WeightSource.check_shapes)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("manifest")
        d["manifest_format_version"] = (self.manifest or {}).get("format_version")
        return d


def inspect_checkpoint(path: str) -> Inspection:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"checkpoint path {path} does not exist")
    src = WeightSource(p)
    cfg = src.cfg  # an unsupported model is refused before any tensor is read
    m = src.manifest
    kind = src.kind
    q_count, params, q_params, q_bytes = 0, 0, 0, 0
    for name in src.names:
        shape, dtype = src.info(name)
        n = 1
        for d in shape:
            n *= d
        nbytes = n * {"I32": 4, "I16": 2, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}.get(dtype, 4)
        if name.endswith(".qweight"):  # integer words of 4-bit codes, in any layout
            q_count += 1
            q_params += nbytes * 2
            q_bytes += nbytes
        elif name.endswith((".qzeros", ".zeros", ".scales", ".g_idx")):
            q_bytes += nbytes
        else:
            params += n
    bpw = q_bytes * 8 / q_params if q_params else None
    params += q_params
    try:  # a missing tensor or a config.json that does not match: shown, as the other commands would refuse it
        src.check_shapes()
        problem = None
    except CheckpointError as e:
        problem = str(e)
    return Inspection(
        path=str(p), model_type=cfg.model_type, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        kind=kind, quantization=src.config.get("quantization_config"), manifest=m,
        weight_bytes=src.weight_bytes(), quantized_linears=q_count, params=params,
        bits_per_weight=bpw, layers=quantization_manifest(m or {}).get("layers", []), problem=problem,
    )
