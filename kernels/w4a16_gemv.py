"""W4A16 GEMV for the smallest M: `out[m, N] = x[m, K] @ w_hat[N, K]^T`, one activation row per program.

    w_hat[n, k] = (q[n, k] - z[g, n]) * s[g, n],   g = k // G,  G in (32, 64, 128)

Reads layout `planes64` (lmq/pack/planes64.py): qweight int16 [K/64, N, 16], nibble i of lane j in
chunk c = code of k = 64c + 16i + j; scales fp16 / zeros uint8 [K/G, N].

Why a second kernel: at M = 1 the tensor-core kernel (w4a16_gemm) pads M to 16 and stages every
weight tile through shared memory for the matrix unit; its warps then wait on shared memory and
its shared-memory footprint caps occupancy. Here weights go straight from global memory into
registers, are converted with the same exact int4 -> fp16/bf16 trick, multiplied with the
activation in packed fp16/bf16 (each product (q - z) * x is rounded once; |q - z| <= 15, so it
overflows only where |x| > 4366), and summed in fp32; each group's partial sums get their scale
once. Split-K programs add into the zeroed output with atomics.

`w4a16_gemv_ref` is the plain-PyTorch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels.w4a16_gemm import (
    _dequant_pair,
    _num_sms,
    _store_or_add,
    check_inputs,
    pick_block_k,
    w4a16_gemm_ref,
)

from lmq.pack import planes64


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    N, K, stride_xm, stride_om,
    G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    IS_BF16: tl.constexpr, CHUNK_K: tl.constexpr, LANES: tl.constexpr, PLANES: tl.constexpr,
    FAST_CVT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)  # activation row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    lanes = tl.arange(0, LANES)  # [16]
    k_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    CHUNKS_PER_GROUP: tl.constexpr = G // CHUNK_K if G > CHUNK_K else 1
    PLANES_PER_GROUP: tl.constexpr = PLANES if G >= CHUNK_K else G // LANES
    if IS_BF16:
        MAGIC: tl.constexpr = 0x4300  # bf16 128.0
        wdt: tl.constexpr = tl.bfloat16
    else:
        MAGIC: tl.constexpr = 0x6400  # fp16 1024.0
        wdt: tl.constexpr = tl.float16

    x_row = x_ptr + m * stride_xm
    qw_rows = qw_ptr + offs_n[:, None] * LANES + lanes[None, :]  # [BN, 16], chunk 0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kt in range(k_lo, k_hi, BLOCK_K):
        for gi in tl.static_range(BLOCK_K // G):
            # -- one group: zero (as MAGIC + z) and scale for BLOCK_N rows ------------------------
            g = (kt + gi * G) // G
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0)  # [BN] uint8
            zq = (z.to(tl.int16) | MAGIC).to(wdt, bitcast=True)  # [BN]
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            part = tl.zeros((BLOCK_N, LANES), dtype=tl.float32)  # per-lane partial sums of the group
            for cc in tl.static_range(CHUNKS_PER_GROUP):
                # -- weights straight into registers: BLOCK_N rows x 32 contiguous bytes ----------
                chunk = (kt + gi * G) // CHUNK_K + cc
                h = tl.load(qw_rows + chunk * N * LANES, mask=n_mask[:, None], other=0,
                            eviction_policy="evict_first")  # [BN, 16] int16
                for ii in tl.static_range(PLANES_PER_GROUP // 2):
                    w0, w1 = _dequant_pair(h, zq, (gi * G) % CHUNK_K // LANES + 2 * ii, MAGIC, IS_BF16,
                                           FAST_CVT)  # [BN, 16] q - z, exact
                    k0 = chunk * CHUNK_K + LANES * ((gi * G) % CHUNK_K // LANES + 2 * ii)
                    a0 = tl.load(x_row + k0 + lanes)  # [16]
                    a1 = tl.load(x_row + k0 + LANES + lanes)  # [16]
                    # products in the activation dtype (packed, exact up to one rounding: |q - z| <= 15),
                    # sums in fp32
                    part += (w0 * a0[None, :]).to(tl.float32) + (w1 * a1[None, :]).to(tl.float32)
            # -- the group ends: reduce its lanes, apply its scale once ---------------------------
            acc += tl.sum(part, axis=1) * s

    out = acc.to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + m * stride_om + offs_n
    _store_or_add(out_ptrs, out, n_mask, SPLIT_K)


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: dict | None = None) -> torch.Tensor:
    """`x [..., K]` fp16/bf16 (few rows) times the packed `[N, K]` weight -> `[..., N]` in x's dtype."""
    # -- 1. check ---------------------------------------------------------------------------------
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_gemv")
    M = x2.shape[0]
    cfg = config or {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 0, "num_warps": 4, "num_stages": 1}
    block_k = pick_block_k(K, group_size, cfg["BLOCK_K"])
    if cfg["SPLIT_K"] > 0:
        split_k = min(cfg["SPLIT_K"], K // block_k)
    else:
        split_k = max(1, min(triton.cdiv(4 * _num_sms(x.device), triton.cdiv(N, cfg["BLOCK_N"]) * max(M, 1)),
                             K // block_k, 16))
    # -- 2. allocate ------------------------------------------------------------------------------
    out = (torch.zeros if split_k > 1 else torch.empty)((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    if M == 0:
        return out.reshape(*lead, N)
    # -- 3. launch --------------------------------------------------------------------------------
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split_k, M)
    _w4a16_gemv_kernel[grid](
        x2, qweight, scales, zeros, out, N, K, x2.stride(0), out.stride(0),
        G=group_size, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, SPLIT_K=split_k,
        IS_BF16=x.dtype == torch.bfloat16, CHUNK_K=planes64.CHUNK_K, LANES=planes64.LANES,
        PLANES=planes64.PLANES, FAST_CVT=x.device.type == "cuda",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out.reshape(*lead, N)


def w4a16_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """Plain-PyTorch twin (the same function as the GEMM's reference)."""
    return w4a16_gemm_ref(x, qweight, scales, zeros, group_size)
