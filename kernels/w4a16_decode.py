"""W4A16 decode GEMM (small M): `out[M, N] = x[M, K] @ w_hat[N, K]^T`, weights prefetched in registers.

    w_hat[n, k] = (q[n, k] - z[g, n]) * s[g, n],   g = k // G,  G in (32, 64, 128)

Reads layout `planes64` (lmq/pack/planes64.py): qweight int16 [K/64, N, 16], nibble i of lane j in
chunk c = code of k = 64c + 16i + j; scales fp16 / zeros uint8 [K/G, N].

Differs from w4a16_gemm's decode config in how weights travel: Triton's software pipeline stages
every dot operand through shared memory, which capped w4a16_gemm at 3 blocks per SM with warps
waiting on shared-memory loads (benchmarks/NOTES-gemm.md). Here `num_stages=1` and the loop carries
the *next* tile's weights in registers (`h_next`), loaded before the current tile is dequantized,
so the load latency hides under the dequantization and the dot, with no shared-memory staging.

One tile is KT = max(G, 64) input channels of BLOCK_N rows, loaded as one `[BLOCK_N, KT/4]` int16
block (its KT/64 chunks side by side). Plane i of that block holds k = 64c + 16i + j for column
16c + j; the four planes laid side by side are one `[BLOCK_N, KT]` operand whose column order is
(i, c, j), so the activation tile (loaded contiguous) is permuted to that order, and a whole group
is one dot whose partial sum gets the group's scale once. G = 32: a tile holds two
groups of two planes each (k contiguous), one K = 32 dot per group.

The weights are the dot's first operand (out^T = w_hat @ x^T), the activation rows its narrow
second operand (BLOCK_M = 16, rows past M masked). Split-K programs add into the zeroed output with
atomics. `w4a16_decode_ref` is the plain-PyTorch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels.w4a16_gemm import (
    _cat,
    _dequant_pair,
    _num_sms,
    _store_or_add,
    check_inputs,
    w4a16_gemm_ref,
)

from lmq.pack import planes64


@triton.jit
def _w4a16_decode_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    IS_BF16: tl.constexpr, CHUNK_K: tl.constexpr, LANES: tl.constexpr, FAST_CVT: tl.constexpr,
):
    KT: tl.constexpr = max(CHUNK_K, G)  # input channels per tile
    COLS: tl.constexpr = KT // 4  # int16 lanes per tile row
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # the few row blocks of one column block run side by side (weights in L2)
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_mask = offs_m < M
    n_mask = offs_n < N
    if IS_BF16:
        MAGIC: tl.constexpr = 0x4300  # bf16 128.0
        wdt: tl.constexpr = tl.bfloat16
    else:
        MAGIC: tl.constexpr = 0x6400  # fp16 1024.0
        wdt: tl.constexpr = tl.float16

    k_tiles = K // KT
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * tiles_per_split * KT
    k_hi = tl.minimum(K, k_lo + tiles_per_split * KT)

    # -- address of one tile: column 16c + j of row n is lane j of chunk c -------------------------
    cols = tl.arange(0, COLS)  # [COLS]
    qw_tile = qw_ptr + (cols // LANES)[None, :] * (N * LANES) + offs_n[:, None] * LANES \
        + (cols % LANES)[None, :]  # [BN, COLS], tile 0
    # -- activations in the operand's column order ---------------------------------------------------
    if G >= CHUNK_K:
        x_koff = tl.arange(0, KT)  # loaded contiguous, reordered to the operand's (i, c, j) below
    else:
        x_koff = tl.arange(0, 2 * LANES)  # one group = planes 2g, 2g + 1 = 32 contiguous k
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T tile
    h_next = tl.load(qw_tile + (k_lo // CHUNK_K) * N * LANES, mask=n_mask[:, None] & (k_lo < k_hi), other=0)
    for kt in range(k_lo, k_hi, KT):
        h = h_next  # [BN, COLS] int16, loaded one iteration ago
        # -- prefetch the next tile before touching this one -------------------------------------
        h_next = tl.load(qw_tile + ((kt + KT) // CHUNK_K) * N * LANES,
                         mask=n_mask[:, None] & (kt + KT < k_hi), other=0)
        if G >= CHUNK_K:
            g = kt // G
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0)  # [BN] uint8
            zq = (z.to(tl.int16) | MAGIC).to(wdt, bitcast=True)  # [BN] MAGIC + z
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            w0, w1 = _dequant_pair(h, zq, 0, MAGIC, IS_BF16, FAST_CVT)  # [BN, COLS] q - z, exact
            w2, w3 = _dequant_pair(h, zq, 2, MAGIC, IS_BF16, FAST_CVT)
            w = _cat(_cat(w0, w1), _cat(w2, w3))  # [BN, KT], columns (i, c, j)
            a = tl.load(x_rows + (kt + x_koff)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, KT], k order
            # (c, i, j) -> (i, c, j): the activations follow the weights' column order
            a = tl.reshape(tl.permute(tl.reshape(a, (BLOCK_M, KT // CHUNK_K, 4, LANES)), (0, 2, 1, 3)),
                           (BLOCK_M, KT))
            part = tl.dot(w, tl.trans(a))  # [BN, BM]
            acc += part * s[:, None]
        else:
            for gi in tl.static_range(2):  # G = 32: two groups per 64-wide tile
                g = kt // G + gi
                z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0)
                zq = (z.to(tl.int16) | MAGIC).to(wdt, bitcast=True)
                s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                w0, w1 = _dequant_pair(h, zq, 2 * gi, MAGIC, IS_BF16, FAST_CVT)  # [BN, 16]
                w = _cat(w0, w1)  # [BN, 32]
                a = tl.load(x_rows + (kt + gi * G + x_koff)[None, :], mask=m_mask[:, None], other=0.0)
                acc += tl.dot(w, tl.trans(a)) * s[:, None]

    out = acc.to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]  # [BN, BM]
    mask = m_mask[None, :] & n_mask[:, None]
    _store_or_add(out_ptrs, out, mask, SPLIT_K)


def w4a16_decode(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, config: dict | None = None) -> torch.Tensor:
    """`x [..., K]` fp16/bf16 (small M) times the packed `[N, K]` weight -> `[..., N]` in x's dtype."""
    # -- 1. check ---------------------------------------------------------------------------------
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_decode")
    M = x2.shape[0]
    cfg = config or {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 0, "num_warps": 4}
    kt = max(group_size, planes64.CHUNK_K)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if cfg["SPLIT_K"] > 0:
        split_k = min(cfg["SPLIT_K"], K // kt)
    else:
        split_k = max(1, min(triton.cdiv(cfg.get("WAVES", 4) * _num_sms(x.device), tiles), K // kt, 32))
    # -- 2. allocate ------------------------------------------------------------------------------
    out = (torch.zeros if split_k > 1 else torch.empty)((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    if M == 0:
        return out.reshape(*lead, N)
    # -- 3. launch --------------------------------------------------------------------------------
    _w4a16_decode_kernel[(tiles, split_k)](
        x2, qweight, scales, zeros, out, M, N, K, x2.stride(0), out.stride(0),
        G=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SPLIT_K=split_k,
        IS_BF16=x.dtype == torch.bfloat16, CHUNK_K=planes64.CHUNK_K, LANES=planes64.LANES,
        FAST_CVT=x.device.type == "cuda", num_warps=cfg["num_warps"], num_stages=1,
    )
    return out.reshape(*lead, N)


def w4a16_decode_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """Plain-PyTorch twin (the same function as the GEMM's reference)."""
    return w4a16_gemm_ref(x, qweight, scales, zeros, group_size)
