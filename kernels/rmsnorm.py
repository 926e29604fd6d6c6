"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder layer.

For each row x [D] (Llama, arXiv:1910.07467), with weight w [D], arithmetic in fp32:

    h   = x + residual                      (only when a residual is given)
    out = h * rsqrt(mean(h^2) + eps) * w    -> x.dtype

The fused form also returns h, rounded to x.dtype: the residual stream for the next layer. It is
written IN PLACE into the `residual` tensor, which is returned (so `residual` holds h afterwards);
`out` is a new tensor. No host sync, no `.item()`: safe inside a CUDA graph.

Rows: x is [T, D] or [T, H, D] (per-head q/k norm; more leading dims are flattened), last dim
contiguous; other strides are free (q may be a view into a fused qkv output). Row r of a [T, H, D]
input is (r // H, r % H). One program normalizes BLOCK_R rows x BLOCK_D columns, BLOCK_D >= D
(the whole row sits in registers, so D <= MAX_D), BLOCK_R > 1 only for short rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv, next_pow2
from lmq.kernels.launch import DirectLaunch
from lmq.kernels.pdl import use_pdl

from lmq.errors import ShapeError

MAX_D = 16384
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr,
                    stride_xt, stride_xh, stride_rt, stride_rh,
                    R, H, D, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    LAUNCH_DEPS: tl.constexpr):
    if LAUNCH_DEPS:
        tl.extra.cuda.gdc_launch_dependents()  # the next GEMV may launch now (lmq.kernels.pdl)
    # rows handled by this program, split into (t, h) so strided [T, H, D] views need no copy
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < R
    t = (rows // H).to(tl.int64)
    h = (rows % H).to(tl.int64)
    mask = row_ok[:, None] & (offs_d[None, :] < D)  # [BLOCK_R, BLOCK_D]

    # load (bf16/fp16 -> fp32 before any arithmetic) and add the residual
    x_off = (t * stride_xt + h * stride_xh)[:, None] + offs_d[None, :]
    v = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    if HAS_RESIDUAL:
        r_off = (t * stride_rt + h * stride_rh)[:, None] + offs_d[None, :]
        v += tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(r_ptr + r_off, v.to(r_ptr.dtype.element_ty), mask=mask)

    # normalize: masked columns are 0 and do not change the sum of squares
    inv_rms = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / D + eps)  # [BLOCK_R]
    w = tl.load(w_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)  # [BLOCK_D]
    y = v * inv_rms[:, None] * w[None, :]
    # out is contiguous [R, D]
    out_off = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=mask)


_RMSNORM = DirectLaunch(_rmsnorm_kernel)  # lmq.kernels.launch


def _rows_view(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as [T, H, D] without copying (a [T, D] tensor becomes [T, 1, D])."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:
        raise ShapeError(f"{name} {tuple(t.shape)} with strides {t.stride()} cannot be viewed as rows; "
                         "pass a contiguous tensor") from None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x [T, D] or [T, H, D] with weight [D], in x.dtype.

    Returns `out` (a new contiguous tensor shaped like x), or with `residual` (same shape and dtype
    as x): `(out, residual)`, where `residual` now holds x + residual (written in place).
    """
    if x.dim() < 2:
        raise ShapeError(f"x must be [T, D] or [T, H, D], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ShapeError(f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ShapeError(f"weight must be [{D}] (x's last dim), got {tuple(weight.shape)}")
    if weight.dtype not in DTYPES or weight.device != x.device or weight.stride(0) != 1:
        raise ShapeError(f"weight must be a contiguous float tensor on {x.device}, got {weight.dtype} "
                         f"on {weight.device}")
    if D > MAX_D:
        raise ShapeError(f"D = {D} exceeds the kernel's one-block row limit MAX_D = {MAX_D}")
    if x.stride(-1) != 1:
        raise ShapeError(f"x must be contiguous along its last dim, got strides {x.stride()}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ShapeError(f"residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), got "
                             f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
        if residual.stride(-1) != 1:
            raise ShapeError(f"residual must be contiguous along its last dim, got strides {residual.stride()}")

    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [..., D] contiguous
    x3 = _rows_view(x, "x")  # [T, H, D]
    r3 = _rows_view(residual, "residual") if residual is not None else x3
    R = x3.shape[0] * x3.shape[1]
    if R > 0:
        BLOCK_D = next_pow2(D)
        BLOCK_R = max(1, min(16, 2048 // BLOCK_D))
        num_warps = 1 if not x.is_cuda else min(16, max(1, BLOCK_R * BLOCK_D // 512))
        _RMSNORM[(cdiv(R, BLOCK_R),)](
            x3, r3, weight, out, x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
            R, x3.shape[1], D, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
            LAUNCH_DEPS=use_pdl(x.device),
        )
    if residual is None:
        return out
    return out, residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Plain PyTorch, same signature and math; out of place (the residual input is not modified)."""
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    out = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if residual is None:
        return out
    return out, h.to(x.dtype)
