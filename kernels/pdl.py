"""Programmatic dependent launch (PDL, compute capability >= 9.0) for the decode step's kernel chain.

A kernel launched with PDL may start while the kernel before it is still running, once that kernel
lets its dependents launch (`gdc_launch_dependents`) or finishes. lmq launches the W4A16 GEMV this
way: its programs start, compute their offsets, then wait (`gdc_wait`) for the previous kernel's
writes before they read the activations or the split-K workspace. The decode attention's split and
merge kernels launch this way too and wait before their first read. The small kernels that precede
GEMVs in a decode step (RMSNorm, SiLU*mul, the attention merge) let dependents launch at their
start. Every other kernel (but the split-K GEMMs below) is launched as usual and so waits for the whole
previous kernel.
`LMQ_PDL=0` turns it off (for a comparison, or a driver that mishandles it).

`zero_filled` gives the zeroed output that split-K GEMMs add into, filled by a kernel launched this way: it
lets the GEMM launch at its start and waits for the kernel before it (whose buffer the new output may reuse)
before it writes. The split-K GEMMs (`w4a16_gemm_direct`, and `w4a16_gemm` where it splits K) and the Hopper
prefill GEMM (`w4a16_gemm_ws`, every launch) are launched early too and let the next kernel launch before they
end, so the next call's fill is resident and waiting when they finish. Inside a CUDA graph a fill node and a
plain launch cost about 1 us a call (NOTES-gemm.md, runs 32, 47 and 48). The direct GEMM and the GEMV read
weights before they wait: packed weights are never written by the kernel launched just before a GEMM. Where a kernel lets its dependents launch matters: at its start it slowed the decode
GEMM at M = 3..32 (qkv 10.8 -> 12.3 us, down 18.0 -> 22.6), whose grids are more than one wave (presumably
the early dependents' programs took SM slots from its later ones), so the decode GEMM does it after its K loop.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv, cuda_capability
from lmq.kernels.launch import DirectLaunch

# read once, at import: the launchers ask on every call
_ENABLED = os.environ.get("LMQ_PDL", "1") != "0"


def use_pdl(device: torch.device) -> bool:
    """PDL for this device (module docstring): compute capability >= 9.0 and LMQ_PDL not "0"."""
    return device.type == "cuda" and _ENABLED and cuda_capability(device) >= (9, 0)


# `zero_filled` through the PDL fill kernel (False: torch.zeros, a fill node that waits for the kernel before it)
ZERO_KERNEL = True


@triton.jit
def _zeros_kernel(out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the GEMM that adds into this output may launch now
        tl.extra.cuda.gdc_wait()  # the memory may be a buffer the previous kernel still reads or writes
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=offs < n)


_ZEROS = DirectLaunch(_zeros_kernel)  # lmq.kernels.launch
_ZERO_BLOCK = 2048


def zero_filled(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor for split-K atomics: filled by `_zeros_kernel` launched with PDL where `use_pdl`,
    else torch.zeros (module docstring)."""
    if not (ZERO_KERNEL and use_pdl(device)):
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    n = out.numel()
    if n:
        _ZEROS[(cdiv(n, _ZERO_BLOCK),)](out, n, BLOCK=_ZERO_BLOCK, PDL=True, num_warps=4, launch_pdl=True)
    return out
