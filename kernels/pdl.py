"""Programmatic dependent launch (PDL, compute capability >= 9.0) for the decode step's kernel chain.

A kernel launched with PDL may start while the kernel before it is still running, once that kernel
lets its dependents launch (`gdc_launch_dependents`) or finishes. lmq launches the W4A16 GEMV this
way: its programs start, compute their offsets, then wait (`gdc_wait`) for the previous kernel's
writes before they read the activations or the split-K workspace. The decode attention's split and
merge kernels launch this way too and wait before their first read. The small kernels that precede
GEMVs in a decode step (RMSNorm, SiLU*mul, the attention merge) let dependents launch at their
start. Every other kernel is launched as usual and so waits for the whole previous kernel.
`LMQ_PDL=0` turns it off (for a comparison, or a driver that mishandles it).
"""

from __future__ import annotations

import os

import torch

_PDL: dict[int, bool] = {}


def use_pdl(device: torch.device) -> bool:
    """PDL for this device (module docstring): compute capability >= 9.0 and LMQ_PDL not "0"."""
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL:
        _PDL[idx] = torch.cuda.get_device_capability(idx) >= (9, 0) and os.environ.get("LMQ_PDL", "1") != "0"
    return _PDL[idx]
