"""Programmatic dependent launch (PDL, compute capability >= 9.0) for the kernel chains of decode and prefill steps.

A kernel launched with PDL may start while the kernel before it is still running, once that kernel lets its
dependents launch (`gdc_launch_dependents`) or finishes; it then waits (`gdc_wait`) for that kernel to end
and its writes to be visible before it reads anything the kernels before it write. Launched this way, each
waiting before its first such read:
- the W4A16 GEMV (it computes its offsets and reads weights first, then waits before the activations or its
  split-K workspace);
- the decode attention's split and merge kernels;
- `zero_filled`'s fill kernel, the zeroed output that split-K GEMMs add into (it waits before it writes:
  the new output may reuse a buffer the kernel before it still reads or writes);
- the small-M direct GEMM (`w4a16_gemm_direct`, every launch; it requests its first weights, then waits
  before it copies x), the decode GEMM (`w4a16_gemm`, where it splits K) and the Hopper prefill GEMM
  (`w4a16_gemm_ws`, every launch).
Letting the next kernel launch early: RMSNorm, SiLU*mul, the attention merge and the fill kernel at their
start; the direct GEMM at its start for 16-row tiles and after its K loop otherwise; the decode GEMM after its
K loop; the prefill GEMM's loader after its last copies. So a GEMM's zero fill is resident and waiting when
the GEMM before it ends: inside a CUDA graph a fill node and a plain launch had cost about 1 us a call
(NOTES-gemm.md, runs 32, 47, 48 and 50). Every other kernel is launched as usual and so waits for the whole
previous kernel.

Where a kernel lets its dependents launch matters: at its start it slowed the decode GEMM on qkv, o_proj and
down at M = 3..32 (qkv 10.8 -> 12.3 us, down 18.0 -> 22.6 at M=16; gate_up within 0.3 us or faster), whose
grids are more than one wave (presumably the early dependents' programs took SM slots from its later ones).
The GEMV and the direct GEMM read weights before they wait, and a dependent can start as early as the start
of the kernel two launches before it (the fill lets the GEMM launch at once): no kernel that lets its
dependents launch early may write packed weights (none does; weights are written by copies, at load).
`LMQ_PDL=0` turns it all off (for a comparison, or a driver that mishandles it): every launch is plain and
`zero_filled` is torch.zeros.
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
