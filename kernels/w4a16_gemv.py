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

Memory-level parallelism (what bounds a GEMV): a program owns BLOCK_N rows and a run of K tiles of
BLOCK_K = C * 64 input channels. Each tile is loaded whole, as one `[C, BLOCK_N, 16]` int16 block
(C chunks, every thread 16-byte vectors) with its `[C, BLOCK_N]` zeros and scales, and the next
tile's loads are issued before the current tile is computed (a register double buffer), so a
program keeps one to two tiles of `BLOCK_N * BLOCK_K / 2` bytes in flight instead of one 32-byte
row chunk. The launcher picks the K split as a divisor of the tile count (every split equal) that
gives about `WAVES * SMs` programs.

`w4a16_gemv_ref` is the plain-PyTorch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels.w4a16_gemm import _num_sms, _pair_asm, check_inputs, w4a16_gemm_ref

from lmq.errors import ShapeError
from lmq.pack import planes64


@triton.jit
def _planes_pair(h, zq, FIRST: tl.constexpr, MAGIC: tl.constexpr, IS_BF16: tl.constexpr, FAST: tl.constexpr):
    """Planes FIRST, FIRST + 1 of `h [C, BN, 16]` int16 minus `zq [C, BN, 1]` (MAGIC + z): q - z, exact."""
    if IS_BF16:
        wdt: tl.constexpr = tl.bfloat16
    else:
        wdt: tl.constexpr = tl.float16
    zb = tl.broadcast_to(zq, h.shape)  # [C, BN, 16] MAGIC + z
    if FAST:
        p0, p1 = tl.inline_asm_elementwise(_pair_asm(FIRST, IS_BF16), "=r,=r,r,r", [h, zb], dtype=(zb.dtype, zb.dtype),
                                           is_pure=True, pack=2)
    else:
        # Plain Triton (the interpreter has no inline assembly): the same bits, one lane at a time.
        p0 = (((h >> (4 * FIRST)) & 0xF) | MAGIC).to(tl.int16).to(wdt, bitcast=True) - zb
        p1 = (((h >> (4 * FIRST + 4)) & 0xF) | MAGIC).to(tl.int16).to(wdt, bitcast=True) - zb
    return p0, p1


@triton.jit
def _load_tile(qw_ptr, z_ptr, s_ptr, t, ok, N, offs_n, n_mask, cs, lanes,
               G: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr, LANES: tl.constexpr):
    """Issue the loads of K tile `t` (predicated off where `ok` is false): weights, zeros, scales.

    Returns h [C, BN, 16] int16, and for planes 0-1 and planes 2-3 of each chunk (two groups when
    G = 32, else one) z [C, BN, 1] uint8 and s [C, BN, 1] fp16.
    """
    C: tl.constexpr = BLOCK_K // CHUNK_K
    chunk = t * C + cs  # [C]
    m2 = n_mask[None, :, None] & ok  # [1, BN, 1]
    h = tl.load(qw_ptr + chunk[:, None, None] * (N * LANES) + offs_n[None, :, None] * LANES + lanes[None, None, :],
                mask=m2, other=0, eviction_policy="evict_first")  # [C, BN, 16] int16
    g01 = (chunk * CHUNK_K) // G  # [C] group of planes 0, 1
    z01 = tl.load(z_ptr + g01[:, None, None] * N + offs_n[None, :, None], mask=m2, other=0)  # [C, BN, 1]
    s01 = tl.load(s_ptr + g01[:, None, None] * N + offs_n[None, :, None], mask=m2, other=0.0)  # [C, BN, 1]
    if G < CHUNK_K:  # G = 32: planes 2, 3 are the next group
        g23 = (chunk * CHUNK_K + CHUNK_K // 2) // G  # [C]
        z23 = tl.load(z_ptr + g23[:, None, None] * N + offs_n[None, :, None], mask=m2, other=0)
        s23 = tl.load(s_ptr + g23[:, None, None] * N + offs_n[None, :, None], mask=m2, other=0.0)
    else:
        z23 = z01
        s23 = s01
    return h, z01, s01, z23, s23


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    N, K, stride_xm, stride_om,
    G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K,  # runtime: equal K splits (grid axis 1); 1 stores, more add with atomics
    IS_BF16: tl.constexpr, CHUNK_K: tl.constexpr, LANES: tl.constexpr, PLANES: tl.constexpr,
    FAST_CVT: tl.constexpr,
):
    # -- which rows and which K tiles this program owns -------------------------------------------
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)  # activation row
    C: tl.constexpr = BLOCK_K // CHUNK_K  # chunks per tile
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    lanes = tl.arange(0, LANES)  # [16]
    cs = tl.arange(0, C)  # [C]
    tiles = (K // BLOCK_K) // SPLIT_K  # the launcher makes SPLIT_K divide the tile count
    t_lo = pid_k * tiles
    if IS_BF16:
        MAGIC: tl.constexpr = 0x4300  # bf16 128.0
        wdt: tl.constexpr = tl.bfloat16
    else:
        MAGIC: tl.constexpr = 0x6400  # fp16 1024.0
        wdt: tl.constexpr = tl.float16

    x_row = x_ptr + m * stride_xm
    x_tile = cs[:, None] * CHUNK_K + lanes[None, :]  # [C, 16] plane 0's k in tile 0
    # per chunk, scaled partial sums; made by a reduction so that it has the reduction's layout (no
    # per-iteration layout conversion)
    acc = tl.sum(tl.zeros((C, BLOCK_N, LANES), dtype=tl.float32), axis=2, keep_dims=True)  # [C, BN, 1]

    # -- prologue: the first tile's loads ----------------------------------------------------------
    h_nx, z01_nx, s01_nx, z23_nx, s23_nx = _load_tile(qw_ptr, z_ptr, s_ptr, t_lo, True, N, offs_n, n_mask, cs,
                                                      lanes, G, BLOCK_K, CHUNK_K, LANES)
    for t in range(t_lo, t_lo + tiles):
        h = h_nx
        z01 = z01_nx
        s01 = s01_nx
        z23 = z23_nx
        s23 = s23_nx
        # -- the next tile's loads go out before this tile's math (register double buffer) ------
        h_nx, z01_nx, s01_nx, z23_nx, s23_nx = _load_tile(qw_ptr, z_ptr, s_ptr, t + 1, t + 1 < t_lo + tiles, N,
                                                          offs_n, n_mask, cs, lanes, G, BLOCK_K, CHUNK_K, LANES)
        # -- this tile's activations: 4 planes x [C, 16] (L1/L2 hits) ----------------------------
        xk = x_row + t * BLOCK_K + x_tile  # [C, 16]
        a0 = tl.load(xk)[:, None, :]  # [C, 1, 16]
        a1 = tl.load(xk + LANES)[:, None, :]
        a2 = tl.load(xk + 2 * LANES)[:, None, :]
        a3 = tl.load(xk + 3 * LANES)[:, None, :]
        # -- dequantize (q - z exactly, no int-to-float instruction) and multiply ----------------
        zq01 = (z01.to(tl.int16) | MAGIC).to(wdt, bitcast=True)  # [C, BN] MAGIC + z
        zq23 = (z23.to(tl.int16) | MAGIC).to(wdt, bitcast=True)
        w0, w1 = _planes_pair(h, zq01, 0, MAGIC, IS_BF16, FAST_CVT)  # [C, BN, 16] each
        w2, w3 = _planes_pair(h, zq23, 2, MAGIC, IS_BF16, FAST_CVT)
        # products in the activation dtype (packed, exact up to one rounding: |q - z| <= 15), sums in fp32
        p01 = (w0 * a0).to(tl.float32) + (w1 * a1).to(tl.float32)  # [C, BN, 16]
        p23 = (w2 * a2).to(tl.float32) + (w3 * a3).to(tl.float32)
        # -- reduce the lanes, apply each group's scale once per chunk ----------------------------
        if G < CHUNK_K:
            acc += (tl.sum(p01, axis=2, keep_dims=True) * s01.to(tl.float32)
                    + tl.sum(p23, axis=2, keep_dims=True) * s23.to(tl.float32))
        else:
            acc += tl.sum(p01 + p23, axis=2, keep_dims=True) * s01.to(tl.float32)

    out = tl.reshape(tl.sum(acc, axis=0), (BLOCK_N,)).to(out_ptr.dtype.element_ty)  # [BN]
    out_ptrs = out_ptr + m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, out, mask=n_mask)
    else:
        tl.atomic_add(out_ptrs, out, mask=n_mask, sem="relaxed")


# Default when no table is given (CPU tests, direct calls); the per-arch entries live in
# lmq.kernels.w4a16_gemm.CONFIGS["smXX"]["gemv"].
DEFAULT_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 0, "WAVES": 4, "num_warps": 4, "num_stages": 1}


def pick_tile_k(K: int, group_size: int, want: int) -> int:
    """The largest power-of-two multiple of 64 that is <= max(want, 64), a multiple of G and divides K."""
    bk = planes64.CHUNK_K
    while bk * 2 <= want and K % (bk * 2) == 0:
        bk *= 2
    while bk % group_size != 0:  # G = 128 needs BLOCK_K >= 128 (check_inputs made K % G == 0)
        bk *= 2
    if K % bk != 0:
        raise ShapeError(f"w4a16_gemv: no K tile fits K={K} with group size {group_size}")
    return bk


def pick_split(tiles: int, programs_n: int, want_programs: int) -> int:
    """The smallest divisor of `tiles` that gives >= `want_programs` programs (else all tiles split)."""
    for d in range(1, tiles + 1):
        if tiles % d == 0 and programs_n * d >= want_programs:
            return d
    return tiles


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: dict | None = None) -> torch.Tensor:
    """`x [..., K]` fp16/bf16 (few rows) times the packed `[N, K]` weight -> `[..., N]` in x's dtype."""
    # -- 1. check ---------------------------------------------------------------------------------
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_gemv")
    M = x2.shape[0]
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    block_k = pick_tile_k(K, group_size, cfg["BLOCK_K"])
    tiles = K // block_k
    programs_n = triton.cdiv(N, cfg["BLOCK_N"]) * max(M, 1)
    if cfg["SPLIT_K"] > 0:
        split_k = pick_split(tiles, 1, min(cfg["SPLIT_K"], tiles))
    else:
        split_k = pick_split(tiles, programs_n, cfg["WAVES"] * _num_sms(x.device))
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
