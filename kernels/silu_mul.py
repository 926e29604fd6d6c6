"""SwiGLU activation on a fused gate/up projection output (Llama MLP, arXiv:2002.05202).

gate_up [T, 2I] holds the gate projection in columns [0, I) and the up projection in [I, 2I):

    out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i],    silu(g) = g * sigmoid(g)

computed in fp32, returned in gate_up's dtype as a new contiguous [T, I] tensor. The grid is
(T, cdiv(I, BLOCK_I)): one program per row and column block. No host sync: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv, next_pow2
from lmq.kernels.launch import DirectLaunch
from lmq.kernels.pdl import use_pdl

from lmq.errors import ShapeError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_xt, I, BLOCK_I: tl.constexpr, LAUNCH_DEPS: tl.constexpr):
    if LAUNCH_DEPS:
        tl.extra.cuda.gdc_launch_dependents()  # the down GEMV may launch now (lmq.kernels.pdl)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    mask = offs < I
    # gate and up halves of row t, in fp32 (bf16 never takes part in arithmetic)
    g = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_xt + I + offs, mask=mask, other=0.0).to(tl.float32)
    # sigmoid from exp(-|g|) <= 1: no overflow for large negative gates
    e = tl.exp(-tl.abs(g))
    sig = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    y = g * sig * u
    tl.store(out_ptr + t * I + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_SILU_MUL = DirectLaunch(_silu_mul_kernel)  # lmq.kernels.launch


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] (gate first); returns a new [T, I] tensor in its dtype."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ShapeError(f"gate_up must be [T, 2I] with an even last dim, got shape {tuple(gate_up.shape)}")
    if gate_up.dtype not in DTYPES:
        raise ShapeError(f"gate_up dtype must be float16, bfloat16 or float32, got {gate_up.dtype}")
    if gate_up.stride(1) != 1:
        raise ShapeError(f"gate_up must be contiguous along its last dim, got strides {gate_up.stride()}")
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, I, dtype=gate_up.dtype, device=gate_up.device)  # [T, I]
    if T == 0 or I == 0:
        return out
    BLOCK_I = min(next_pow2(I), 1024)
    num_warps = 1 if not gate_up.is_cuda else max(1, min(8, BLOCK_I // 256))
    _SILU_MUL[(T, cdiv(I, BLOCK_I))](gate_up, out, gate_up.stride(0), I,
                                                   BLOCK_I=BLOCK_I, num_warps=num_warps,
                                                   LAUNCH_DEPS=use_pdl(gate_up.device))
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch twin: fp32 math, result in gate_up's dtype."""
    I = gate_up.shape[-1] // 2
    g, u = gate_up[..., :I].float(), gate_up[..., I:].float()
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)
