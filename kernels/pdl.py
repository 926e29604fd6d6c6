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
from lmq.kernels import cuda_capability

# read once, at import: the launchers ask on every call
_ENABLED = os.environ.get("LMQ_PDL", "1") != "0"


def use_pdl(device: torch.device) -> bool:
    """PDL for this device (module docstring): compute capability >= 9.0 and LMQ_PDL not "0"."""
    return device.type == "cuda" and _ENABLED and cuda_capability(device) >= (9, 0)
