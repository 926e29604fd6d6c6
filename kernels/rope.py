"""Rotary position embedding (RoPE), in place on q and k, with Llama 3 frequency scaling.

Rotate-half convention (HF Llama, NeoX): for a head vector x [D], x1 = x[:D/2], x2 = x[D/2:],
position p and inv_freq f [D/2]:

    out[:D/2] = x1 * cos(p f) - x2 * sin(p f)
    out[D/2:] = x2 * cos(p f) + x1 * sin(p f)

Llama 3 scaling (rope_type "llama3", arXiv:2407.21783 / HF `_compute_llama3_parameters`): with
wavelength w = 2 pi / f, low_w = L_orig / low_freq_factor, high_w = L_orig / high_freq_factor:
w > low_w -> f / factor; w < high_w -> f; in between, a linear blend in 1 / w:
s = (L_orig / w - low_freq_factor) / (high_freq_factor - low_freq_factor), f' = (1 - s) f / factor + s f.
"linear" divides every frequency (positions) by `factor`.

The kernel runs one program per token over all heads of q [T, H, D] and k [T, H_kv, D], reading
cos/sin rows [max_positions, D/2] (fp32) at positions[t], arithmetic in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from lmq.kernels import next_pow2
from lmq.kernels.launch import DirectLaunch

from lmq.errors import ShapeError, UnsupportedError


def rope_inv_freq(head_dim: int, base: float = 10000.0, scaling: dict | None = None) -> torch.Tensor:
    """inv_freq [D/2] fp32, with the model's `rope_scaling` (HF config dict) applied."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [D/2]
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        orig = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        mid = (wavelen >= orig / high) & (wavelen <= orig / low)
        return torch.where(mid, blended, scaled).float()
    raise UnsupportedError(f"rope_scaling type {kind!r} is not supported; lmq supports default, linear and llama3")


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, D/2] fp32 (angles computed in fp64 so long positions stay exact)."""
    pos = torch.arange(max_positions, dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double()[None, :]  # [P, D/2]
    return angles.cos().float().to(device), angles.sin().float().to(device)


@triton.jit
def _rope_one(x_ptr, t, stride_t, stride_h, n_heads, c, s, offs_h, offs_dh,
              HALF: tl.constexpr):
    mask = (offs_h[:, None] < n_heads) & (offs_dh[None, :] < HALF)
    ptrs = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_dh[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_DH]
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (x1 * c[None, :] - x2 * s[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_cp,
                 H, H_KV, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DH: tl.constexpr):
    t = tl.program_id(0)
    p = tl.load(pos_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_dh = tl.arange(0, BLOCK_DH)
    c = tl.load(cos_ptr + p * stride_cp + offs_dh, mask=offs_dh < HALF, other=0.0)  # [BLOCK_DH]
    s = tl.load(sin_ptr + p * stride_cp + offs_dh, mask=offs_dh < HALF, other=0.0)
    _rope_one(q_ptr, t, stride_qt, stride_qh, H, c, s, offs_h, offs_dh, HALF)
    _rope_one(k_ptr, t, stride_kt, stride_kh, H_KV, c, s, offs_h, offs_dh, HALF)


_ROPE = DirectLaunch(_rope_kernel)  # lmq.kernels.launch


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, H_kv, D] in place at positions [T]; returns (q, k)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ShapeError(f"q and k must be [T, H, D] and [T, H_kv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    T, H, D = q.shape
    if D % 2 or cos.shape[1] != D // 2 or cos.shape != sin.shape or cos.dtype != torch.float32:
        raise ShapeError(f"cos/sin must be fp32 [max_positions, {D // 2}], got {cos.dtype} {tuple(cos.shape)}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"positions must be int32/int64 [{T}], got {positions.dtype} {tuple(positions.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ShapeError("q, k must be contiguous along the head dimension and cos/sin contiguous")
    if T == 0:
        return q, k
    half = D // 2
    _ROPE[(T,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        H, k.shape[1], HALF=half, BLOCK_H=next_pow2(max(H, k.shape[1])),
        BLOCK_DH=next_pow2(half), num_warps=4 if q.is_cuda else 1,
    )
    return q, k


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, out of place: x [T, H, D] rotated at positions [T], in x's dtype."""
    half = x.shape[-1] // 2
    c = cos[positions.long()][:, None, :]  # [T, 1, D/2]
    s = sin[positions.long()][:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
