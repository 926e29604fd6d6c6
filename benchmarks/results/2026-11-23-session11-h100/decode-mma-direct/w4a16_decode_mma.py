"""Experiment (session 11): small-M W4A16 in Gluon with mma_v2, weights and x loaded from global memory straight
into operand registers (no shared memory, no barriers), one chunk prefetched in registers."""

from __future__ import annotations

import torch
from lmq.kernels import cdiv
from lmq.kernels.w4a16_gemm import _num_sms, _pair_asm, check_inputs
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from lmq.pack import planes64

_ASM01 = gl.constexpr(_pair_asm(0, False))
_ASM23 = gl.constexpr(_pair_asm(2, False))
_SASM01 = gl.constexpr(_pair_asm(0, False, True))
_SASM23 = gl.constexpr(_pair_asm(2, False, True))
DEFAULT_CONFIG = {"BLOCK_N": 128, "WAVES": 4, "num_warps": 4, "MAX_SPLIT": 32, "SCALED": False}


@gluon.jit
def _load_chunk(x_ptr, qw_ptr, s_ptr, z_ptr, c, c_hi, n0, M, N, stride_xm, w_off, w_nmask, xr, xk, scols, zcols,
                G: gl.constexpr):
    live = c < c_hi
    w = gl.load(qw_ptr + (c * N + n0) * 16 + w_off, mask=w_nmask & live, other=0)
    xm = (xr < M) & live
    xb = x_ptr + xr * stride_xm + c * 64 + xk
    x0 = gl.load(xb, mask=xm, other=0.0)
    x1 = gl.load(xb + 16, mask=xm, other=0.0)
    x2 = gl.load(xb + 32, mask=xm, other=0.0)
    x3 = gl.load(xb + 48, mask=xm, other=0.0)
    g = c * 64 // G
    s = gl.load(s_ptr + g * N + n0 + scols, mask=(n0 + scols < N) & live, other=0.0).to(gl.float32)
    z = gl.load(z_ptr + g * N + n0 + zcols, mask=(n0 + zcols < N) & live, other=0)
    return w, x0, x1, x2, x3, s, (z.to(gl.int16) | 0x6400).to(gl.float16, bitcast=True)


@gluon.jit
def _kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_om, chunks, per_split,
            G: gl.constexpr, BN: gl.constexpr, SPLIT: gl.constexpr, SCALED: gl.constexpr = False):
    NW: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    n0 = gl.program_id(0) * BN
    c_lo = gl.program_id(1) * per_split
    c_hi = gl.minimum(chunks, c_lo + per_split)
    wj = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, b_l)), 1)
    wn = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, b_l)), 0)
    w_off = wn * 16 + wj  # [16, BN]: lane j of column n0 + n
    w_nmask = (n0 + wn < N) & (wj >= 0)
    xr = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, a_l)), 1)
    xk = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, a_l)), 0)
    zcols = gl.arange(0, BN, layout=gl.SliceLayout(0, b_l))
    if SCALED:  # the scales applied to the weights (one fp16 rounding) beside the zeros
        scols = zcols
    else:
        scols = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    w, x0, x1, x2, x3, s, zq = _load_chunk(x_ptr, qw_ptr, s_ptr, z_ptr, c_lo, c_hi, n0, M, N, stride_xm, w_off,
                                           w_nmask, xr, xk, scols, zcols, G)
    acc = gl.zeros([16, BN], gl.float32, mma)
    for c in range(c_lo, c_hi):
        w_n, x0_n, x1_n, x2_n, x3_n, s_n, zq_n = _load_chunk(x_ptr, qw_ptr, s_ptr, z_ptr, c + 1, c_hi, n0, M, N,
                                                             stride_xm, w_off, w_nmask, xr, xk, scols, zcols, G)
        zb = gl.broadcast(gl.expand_dims(zq, 0), w)[0]
        if SCALED:
            sb = gl.broadcast(gl.expand_dims(s.to(gl.float16), 0), w)[0]
            p0, p1 = gl.inline_asm_elementwise(_SASM01, "=r,=r,r,r,r", [w, zb, sb], dtype=(gl.float16, gl.float16),
                                               is_pure=True, pack=2)
            p2, p3 = gl.inline_asm_elementwise(_SASM23, "=r,=r,r,r,r", [w, zb, sb], dtype=(gl.float16, gl.float16),
                                               is_pure=True, pack=2)
            acc = mma_v2(x0, p0, acc)
            acc = mma_v2(x1, p1, acc)
            acc = mma_v2(x2, p2, acc)
            acc = mma_v2(x3, p3, acc)
        else:
            p0, p1 = gl.inline_asm_elementwise(_ASM01, "=r,=r,r,r", [w, zb], dtype=(gl.float16, gl.float16),
                                               is_pure=True, pack=2)
            p2, p3 = gl.inline_asm_elementwise(_ASM23, "=r,=r,r,r", [w, zb], dtype=(gl.float16, gl.float16),
                                               is_pure=True, pack=2)
            part = mma_v2(x0, p0, gl.zeros([16, BN], gl.float32, mma))
            part = mma_v2(x1, p1, part)
            part = mma_v2(x2, p2, part)
            part = mma_v2(x3, p3, part)
            acc += part * gl.expand_dims(s, 0)
        w, x0, x1, x2, x3, s, zq = w_n, x0_n, x1_n, x2_n, x3_n, s_n, zq_n
    orow = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, mma)), 1)
    ocol = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, mma)), 0)
    ptrs = out_ptr + orow * stride_om + n0 + ocol
    mask = (orow < M) & (n0 + ocol < N)
    if SPLIT:
        gl.atomic_add(ptrs, acc.to(gl.float16), mask=mask, sem="relaxed")
    else:
        gl.store(ptrs, acc.to(gl.float16), mask=mask)


def w4a16_decode_mma(x, qweight, scales, zeros, group_size, config=None):
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_decode_mma")
    M = x2.shape[0]
    assert M <= 16 and x.dtype == torch.float16 and group_size in (64, 128)
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    bn = cfg["BLOCK_N"]
    chunks = K // planes64.CHUNK_K
    tiles = cdiv(N, bn)
    splits = max(1, min(chunks, cfg["MAX_SPLIT"], cdiv(cfg["WAVES"] * _num_sms(x.device), tiles)))
    per_split = cdiv(chunks, splits)
    splits = cdiv(chunks, per_split)
    out = (torch.zeros if splits > 1 else torch.empty)((M, N), dtype=x.dtype, device=x.device)
    _kernel[(tiles, splits)](x2, qweight, scales, zeros, out, M, N, x2.stride(0), out.stride(0), chunks, per_split,
                             G=group_size, BN=bn, SPLIT=splits > 1, SCALED=cfg.get("SCALED", False),
                             num_warps=cfg["num_warps"])
    return out.reshape(*lead, N)
