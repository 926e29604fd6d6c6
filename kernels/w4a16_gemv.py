"""W4A16 GEMV for the smallest M: `out[m, N] = x[m, K] @ w_hat[N, K]^T`, one or two activation rows per program.

    w_hat[n, k] = (q[n, k] - z[g, n]) * s[g, n],   g = k // G,  G in (32, 64, 128)

Reads layout `planes64` (lmq/pack/planes64.py): qweight int16 [K/64, N, 16], nibble i of lane j in
chunk c = code of k = 64c + 16i + j; scales fp16 / zeros uint8 [K/G, N].

Why a second kernel: at M = 1 the tensor-core kernel (w4a16_gemm) pads M to 16 and stages every
weight tile through shared memory for the matrix unit; its warps then wait on shared memory and
its shared-memory footprint caps occupancy. Here weights go straight from global memory into
registers, are converted with the same exact int4 -> fp16/bf16 trick, multiplied with the
activation in packed fp16/bf16 (each product (q - z) * x is rounded once; |q - z| <= 15, so it
overflows only where |x| > 4366), and summed in fp32; each group's partial sums get their scale
once.

Two config switches cut the instructions per weight, which bound this kernel on an H100 (SASS:
~4.5 per weight of math per thread, against ~2 that would let the weights stream at full speed):
- `SUM_PLANES` (fp16 only; 1, 2 or 4): the products of 1, 2 or 4 planes are summed in fp16 (packed
  fma) before one conversion to fp32 and one fp32 add, instead of converting and adding each product.
  Each extra plane adds one fp16 rounding of a partial sum. With 4 (the tables' choice) the weights
  are dequantized to (q - z) / 16, still exact, and the 16 comes back with the group's scale in
  fp32: a lane's four products (input channels k, k + 16, k + 32, k + 48 of one row) then overflow
  only if all four exceed |x| ~ 17466, and one channel alone cannot (fp16 itself ends at 65504).
  With 2 (q - z unscaled) the bounds are |x| > 2183 for both, 4366 for one, as with 1 plane.
  Products of activations below ~1e-3 fall into fp16's subnormal range with 4 (they lose relative
  precision, not the sum). bf16 always uses 1 (its 8-bit mantissa would round the sums too
  coarsely).
- `REDUCE` for split-K: "atomic" adds each split's fp16 result into an output zeroed first (one
  fill kernel per call); "fixed" (the tables' choice) adds each split's fp32 partial sum as a
  fixed-point integer (units of 2^-24) plus one arrival unit 2^56 into a per-stream int64 workspace
  that is all zeros between calls, one returning atomic per output (`_fx_arrive`): the
  program whose add completes the count holds the finished sum, writes that output and zeroes its
  word. No fill kernel, no counter, no fence, no read-back, and integer sums do not depend on the order
  in which the splits arrive: the output is bit-reproducible. (It replaced an fp32 workspace with an
  arrival counter per column block, whose last program read the sums back: NOTES-gemm.md, run 34.)

`ROWS` (1 or 2; the four-plane fp16 path only, one row elsewhere): activation rows per program. With 2, each
dequantized weight tile serves both rows, so M=2 reads the weights once instead of once per row. Offline SASS
(`benchmarks/sass_gemv.py`: sm90, the table's tile, 64 weights per thread per K tile): one row 204 instructions per
K tile at 64 registers (the same code as without the switch), two rows 320 at 62. Measured on an H100
(`benchmarks/sweep_gemm.py gemv-rows`, NOTES-gemm.md run 40): at M=2 two rows per program beat the decode kernel on
qkv, o_proj and down, not on gate_up. So sm90's table takes ROWS 2 at M=2 for weights of at most
`gemv_rows_max_numel` elements (`lmq.engine.qlinear.choose_path`); the other tables keep one row at M=1. Four rows per
program (636 instructions per K tile at 156 registers, or 48 registers on narrower tiles) lost to the decode kernel
at M = 3 and 4 on every shape and were removed (NOTES-gemm.md runs 40, 44).

A cp.async ring over the K tiles (Triton's pipeliner on this loop; the kernel-wide `num_stages` leaves it alone)
measured 13-27% slower at M=1 on every shape and was removed (NOTES-gemm.md runs 39, 41).

`w4a16_gemv_ref` is the plain-PyTorch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv, next_pow2
from lmq.kernels.launch import DirectLaunch, PlanCache, stream_buffer
from lmq.kernels.pdl import use_pdl
from lmq.kernels.w4a16_gemm import (
    _dequant_pair,
    _num_sms,
    _store_or_add,
    check_inputs,
    pick_block_k,
    w4a16_gemm_ref,
)

from lmq.errors import ShapeError
from lmq.pack import planes64

# Four planes of two packed int16 lanes ($4) as fp16 (q - z) / 16, exact, 9 instructions for 8
# weights: planes 0 and 2 are `(r & 0x000F000F) | 0x64006400` = 1024 + q, and one fma by 1/16 with
# -(64 + z/16) ($5) gives (q - z) / 16; planes 1 and 3 are left in place,
# `(r & 0x00F000F0) | 0x64006400` = 1024 + 16q, and one fma by 1/256 with -(4 + z/16) ($6) gives the
# same; one shift by 8 serves planes 2 and 3. Every intermediate is exact in fp16.
_QUAD_ASM = tl.constexpr("""{
.reg .b32 t0, t1, t2, t3, hi, n0, n1, r16, r256;
mov.b32 r16, 0x2C002C00;
mov.b32 r256, 0x1C001C00;
lop3.b32 t0, $4, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $4, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 hi, $4, 8;
lop3.b32 t2, hi, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, hi, 0x00F000F0, 0x64006400, 0xEA;
xor.b32 n0, $5, 0x80008000;
xor.b32 n1, $6, 0x80008000;
fma.rn.f16x2 $0, t0, r16, n0;
fma.rn.f16x2 $1, t1, r256, n1;
fma.rn.f16x2 $2, t2, r16, n0;
fma.rn.f16x2 $3, t3, r256, n1;
}""")


@triton.jit
def _dequant_quad_f16(h, zq, z64, z4, FAST: tl.constexpr):
    """All four planes of `h [BN, 16]` int16 as fp16 (q - z) / 16 (exact); `zq` = 1024 + z,
    `z64` = 64 + z/16, `z4` = 4 + z/16 (fp16, [BN])."""
    if FAST:
        c0 = tl.broadcast_to(z64[:, None], h.shape)
        c1 = tl.broadcast_to(z4[:, None], h.shape)
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            _QUAD_ASM, "=r,=r,=r,=r,r,r,r", [h, c0, c1], dtype=(c0.dtype, c0.dtype, c0.dtype, c0.dtype),
            is_pure=True, pack=2)
    else:
        w0, w1 = _dequant_pair(h, zq, 0, 0x6400, False, False)
        w2, w3 = _dequant_pair(h, zq, 2, 0x6400, False, False)
        w0, w1, w2, w3 = w0 * 0.0625, w1 * 0.0625, w2 * 0.0625, w3 * 0.0625  # exact in fp16
    return w0, w1, w2, w3


# "fixed" split-K (module docstring): one int64 word per output holds (arrivals << 56) + the sum so far
# in units of 2^-24. The count reads back only while the sum stays within +-2^55 units, so each split's
# partial sum is clamped to +-2^24 (2^48 units; MAX_FX_SPLIT of them stay within 2^54) and a NaN partial
# counts as +2^24: fp16 outputs that large are inf anyway (fp16 ends at 65504), bf16 outputs saturate at
# 2^24 * splits, and the word always finishes and is zeroed, so a call that overflows cannot leave the
# workspace dirty for the next. Each split's sum is truncated to 2^-24 (fp16's finest step): the total is
# off by less than SPLIT_K * 2^-24, toward zero.
MAX_FX_SPLIT = 64


@triton.jit
def _fx_arrive(acc, ws_ptrs, out_ptrs, mask, SPLIT_K: tl.constexpr):
    """Add this split's partial sums `acc` (fp32) into the int64 workspace words at `ws_ptrs`; where this
    add completes the count, write the finished output at `out_ptrs` and zero the word."""
    big: tl.constexpr = 16777216.0  # 2^24
    safe = tl.minimum(tl.maximum(tl.where(acc == acc, acc, big), -big), big)  # noqa: PLR0124 (NaN -> +2^24)
    v = (safe * 16777216.0).to(tl.int64)  # units of 2^-24, rounded toward zero
    mine = v + 72057594037927936  # one arrival: 1 << 56
    total = tl.atomic_add(ws_ptrs, mine, mask=mask, sem="relaxed") + mine
    count = (total + 36028797018963968) >> 56  # |sum| < 2^55: round to the nearest count
    done = mask & (count == SPLIT_K)
    value = (total - count * 72057594037927936).to(tl.float32) * (1.0 / 16777216.0)
    tl.store(out_ptrs, value.to(out_ptrs.dtype.element_ty), mask=done)
    tl.store(ws_ptrs, tl.zeros(ws_ptrs.shape, tl.int64), mask=done)


# The "fixed" reduction's int64 words, one per (device, stream): all zero between calls (each call's finishing
# programs zero what they used).
_WORKSPACES: dict[tuple, list[torch.Tensor]] = {}


def serves_rows(dtype: torch.dtype, group_size: int, cfg: dict) -> bool:
    """Whether a program of this config serves several activation rows (`ROWS` > 1 on the four-plane fp16 path:
    fp16 activations, groups of 64 or more); elsewhere each row gets its own programs."""
    return (cfg.get("ROWS", 1) > 1 and cfg.get("SUM_PLANES", 1) == 4 and group_size >= planes64.CHUNK_K
            and dtype == torch.float16)


def fx_workspace(device: torch.device, n_words: int) -> torch.Tensor:
    """This stream's all-zero int64 words for the "fixed" split-K reduction, at least `n_words` of them."""
    return stream_buffer(_WORKSPACES, device, n_words, torch.int64)


@triton.jit
def _quad_row(w0, w1, w2, w3, xk, ok, LANES: tl.constexpr):
    """One activation row's products with a chunk's four planes (`xk`: its lanes of plane 0), summed in fp16 and
    widened to fp32: [BN, LANES]. `ok`: the row exists (rows past M read zeros)."""
    a0 = tl.load(xk, mask=ok, other=0.0)  # [LANES]
    a1 = tl.load(xk + LANES, mask=ok, other=0.0)
    a2 = tl.load(xk + 2 * LANES, mask=ok, other=0.0)
    a3 = tl.load(xk + 3 * LANES, mask=ok, other=0.0)
    return (w0 * a0[None, :] + w1 * a1[None, :] + w2 * a2[None, :] + w3 * a3[None, :]).to(tl.float32)


@triton.jit
def _rope_of(pos_ptr, cos_ptr, sin_ptr, m, ok, stride_cp, col0, HALF: tl.constexpr):
    """Row m's cos / sin for this program's HALF rotating columns ([HALF] fp32 each)."""
    pos = tl.load(pos_ptr + m, mask=ok, other=0).to(tl.int64)
    return (tl.load(cos_ptr + pos * stride_cp + col0 + tl.arange(0, HALF)),
            tl.load(sin_ptr + pos * stride_cp + col0 + tl.arange(0, HALF)))


@triton.jit
def _row_out(acc, m, ok, out_ptr, ws_ptr, offs_n, n_mask, N, stride_om, head, rope_c, rope_s, rope_cols,
             SPLIT_K: tl.constexpr, REDUCE_FX: tl.constexpr, ROPE: tl.constexpr, ROPE_D: tl.constexpr,
             HALF: tl.constexpr, sub):
    """Row m's epilogue: this split's sums `acc [BN]` added into the output (`ok`: the row exists)."""
    out_ptrs = out_ptr + m * stride_om + offs_n
    if REDUCE_FX and SPLIT_K > 1:
        if ROPE:
            # rotate this program's pairs if its head lies in the first rope_cols columns (q and k of a
            # fused qkv), then add them
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (2, HALF)), (1, 0)))  # [HALF] each
            rotate = head * ROPE_D < rope_cols
            lo_out = tl.where(rotate, lo * rope_c - hi * rope_s, lo)
            hi_out = tl.where(rotate, hi * rope_c + lo * rope_s, hi)
            offs_lo = head * ROPE_D + sub * HALF + tl.arange(0, HALF)  # N is a multiple of ROPE_D
            lo_mask = ok & (offs_lo < N)
            _fx_arrive(lo_out, ws_ptr + m * N + offs_lo, out_ptr + m * stride_om + offs_lo, lo_mask, SPLIT_K)
            _fx_arrive(hi_out, ws_ptr + m * N + offs_lo + ROPE_D // 2, out_ptr + m * stride_om + offs_lo + ROPE_D // 2,
                       lo_mask, SPLIT_K)
        else:
            _fx_arrive(acc, ws_ptr + m * N + offs_n, out_ptrs, ok & n_mask, SPLIT_K)  # int64 words
    else:
        _store_or_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), ok & n_mask, SPLIT_K)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, pos_ptr, cos_ptr, sin_ptr,
    M, N, K, stride_xm, stride_om, stride_cp, rope_cols,
    G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr,
    IS_BF16: tl.constexpr, CHUNK_K: tl.constexpr, LANES: tl.constexpr, PLANES: tl.constexpr,
    FAST_CVT: tl.constexpr, SUM_PLANES: tl.constexpr, PDL: tl.constexpr, ROPE: tl.constexpr,
    REDUCE_FX: tl.constexpr, ROPE_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2) * ROWS  # this program's first activation row; ROWS (1 or 2) share each weight tile
    HALF: tl.constexpr = BLOCK_N // 2
    if ROPE:
        # a head of ROPE_D columns is ROPE_D / BLOCK_N programs; each owns HALF columns of the head's first
        # half and the HALF columns D/2 further on that rotate with them (`sub`: which slice)
        head = pid_n // (ROPE_D // BLOCK_N)
        sub = pid_n % (ROPE_D // BLOCK_N)
        j = tl.arange(0, BLOCK_N)
        offs_n = head * ROPE_D + sub * HALF + j % HALF + (j // HALF) * (ROPE_D // 2)  # [BN]
    else:
        head, sub = 0, 0
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    lanes = tl.arange(0, LANES)  # [16]
    k_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    CHUNKS_PER_GROUP: tl.constexpr = G // CHUNK_K if G > CHUNK_K else 1
    PLANES_PER_GROUP: tl.constexpr = PLANES if G >= CHUNK_K else G // LANES
    # the four-plane fp16 path (a group holds whole chunks) works on (q - z) / 16: the 16 comes back
    # with the scale, in fp32
    QUAD: tl.constexpr = SUM_PLANES == 4 and PLANES_PER_GROUP == PLANES and not IS_BF16
    QUAD_UNSCALE: tl.constexpr = 16.0 if QUAD else 1.0
    tl.static_assert(ROWS == 1 or QUAD, "several rows per program: the four-plane fp16 path only")
    if IS_BF16:
        MAGIC: tl.constexpr = 0x4300  # bf16 128.0
        wdt: tl.constexpr = tl.bfloat16
    else:
        MAGIC: tl.constexpr = 0x6400  # fp16 1024.0
        wdt: tl.constexpr = tl.float16

    x_row = x_ptr + m * stride_xm
    qw_rows = qw_ptr + offs_n[:, None] * LANES + lanes[None, :]  # [BN, 16], chunk 0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)  # row m + 1 where ROWS has it
    if PDL:
        # launched early (programmatic dependent launch): wait for the previous kernel's writes (x,
        # the workspace) before the first read of anything but weights
        tl.extra.cuda.gdc_wait()
    rope_c, rope_s, rope_c1, rope_s1 = 0.0, 0.0, 0.0, 0.0
    if ROPE:
        # every split rotates its own partial sums (the rotation is linear): its rows' cos / sin, read now
        rope_c, rope_s = _rope_of(pos_ptr, cos_ptr, sin_ptr, m, True, stride_cp, sub * HALF, HALF)
        if ROWS == 2:
            rope_c1, rope_s1 = _rope_of(pos_ptr, cos_ptr, sin_ptr, m + 1, m + 1 < M, stride_cp, sub * HALF, HALF)
    for kt in range(k_lo, k_hi, BLOCK_K):
        for gi in tl.static_range(BLOCK_K // G):
            # -- one group: zero (as MAGIC + z) and scale for BLOCK_N rows ------------------------
            g = (kt + gi * G) // G
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0)  # [BN] uint8
            zq = (z.to(tl.int16) | MAGIC).to(wdt, bitcast=True)  # [BN]
            if QUAD:
                z64 = (z.to(tl.int16) | 0x5400).to(wdt, bitcast=True)  # [BN] 64 + z/16
                z4 = ((z.to(tl.int16) << 4) | 0x4400).to(wdt, bitcast=True)  # [BN] 4 + z/16
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            part = tl.zeros((BLOCK_N, LANES), dtype=tl.float32)  # per-lane partial sums of the group
            part1 = tl.zeros((BLOCK_N, LANES), dtype=tl.float32)  # (row m + 1 where ROWS has it)
            for cc in tl.static_range(CHUNKS_PER_GROUP):
                # -- weights straight into registers: BLOCK_N rows x 32 contiguous bytes ----------
                chunk = (kt + gi * G) // CHUNK_K + cc
                h = tl.load(qw_rows + chunk * N * LANES, mask=n_mask[:, None], other=0,
                            eviction_policy="evict_first")  # [BN, 16] int16
                if QUAD:
                    # the whole chunk's four planes summed in fp16 (packed fma), then one fp32 add
                    w0, w1, w2, w3 = _dequant_quad_f16(h, zq, z64, z4, FAST_CVT)  # [BN, 16] (q - z) / 16
                    xk = x_row + chunk * CHUNK_K + lanes
                    part += _quad_row(w0, w1, w2, w3, xk, True, LANES)
                    if ROWS == 2:  # the same dequantized tile serves the program's second row
                        part1 += _quad_row(w0, w1, w2, w3, xk + stride_xm, m + 1 < M, LANES)
                else:
                    for ii in tl.static_range(PLANES_PER_GROUP // 2):
                        w0, w1 = _dequant_pair(h, zq, (gi * G) % CHUNK_K // LANES + 2 * ii, MAGIC, IS_BF16,
                                               FAST_CVT)  # [BN, 16] q - z, exact
                        k0 = chunk * CHUNK_K + LANES * ((gi * G) % CHUNK_K // LANES + 2 * ii)
                        a0 = tl.load(x_row + k0 + lanes)  # [16]
                        a1 = tl.load(x_row + k0 + LANES + lanes)  # [16]
                        if SUM_PLANES >= 2 and not IS_BF16:
                            # two planes' products summed in fp16 (one packed mul + one packed fma)
                            part += (w0 * a0[None, :] + w1 * a1[None, :]).to(tl.float32)
                        else:
                            # products in the activation dtype (packed, exact up to one rounding:
                            # |q - z| <= 15), sums in fp32
                            part += (w0 * a0[None, :]).to(tl.float32) + (w1 * a1[None, :]).to(tl.float32)
            # -- the group ends: reduce its lanes, apply its scale once ---------------------------
            acc += tl.sum(part, axis=1) * (s * QUAD_UNSCALE)
            if ROWS == 2:
                acc1 += tl.sum(part1, axis=1) * (s * QUAD_UNSCALE)

    _row_out(acc, m, True, out_ptr, ws_ptr, offs_n, n_mask, N, stride_om, head, rope_c, rope_s, rope_cols,
             SPLIT_K, REDUCE_FX, ROPE, ROPE_D, HALF, sub)
    if ROWS == 2:
        _row_out(acc1, m + 1, m + 1 < M, out_ptr, ws_ptr, offs_n, n_mask, N, stride_om, head, rope_c1, rope_s1,
                 rope_cols, SPLIT_K, REDUCE_FX, ROPE, ROPE_D, HALF, sub)


_W4A16_GEMV = DirectLaunch(_w4a16_gemv_kernel)  # lmq.kernels.launch


_PLANS = PlanCache()


def _plan(M: int, N: int, K: int, group_size: int, dtype: torch.dtype, device: torch.device, config: dict | None,
          D: int) -> tuple[dict, int, int, int]:
    """(config merged with the defaults, BLOCK_K, rows per program, split count) of a launch; `D`: the head dim of a
    fused RoPE, 0 without. Kept per shape and config object (`PlanCache`)."""
    return _PLANS.get((M, N, K, group_size, dtype, device, D), config,
                      lambda: _make_plan(M, N, K, group_size, dtype, device, config, D))


def _make_plan(M: int, N: int, K: int, group_size: int, dtype: torch.dtype, device: torch.device,
               config: dict | None, D: int) -> tuple[dict, int, int, int]:
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    block_k = pick_block_k(K, group_size, cfg["BLOCK_K"])
    if cfg.get("ROWS", 1) not in (1, 2):
        raise ValueError(f"w4a16_gemv: ROWS is 1 or 2, got {cfg.get('ROWS')}")
    if cfg["REDUCE"] not in ("atomic", "fixed") or cfg["SUM_PLANES"] not in (1, 2, 4):
        raise ValueError(f"w4a16_gemv: bad config {cfg}: REDUCE is 'atomic' or 'fixed', SUM_PLANES 1, 2 or 4")
    # activation rows per program (the four-plane fp16 path only): each dequantized weight tile serves them all
    rows = min(next_pow2(max(M, 1)), cfg.get("ROWS", 1)) if serves_rows(dtype, group_size, cfg) else 1
    if D:
        if not can_fuse_rope(N, K, group_size, D, cfg):
            raise ShapeError(f"w4a16_gemv: cannot fuse RoPE (head_dim {D}, N={N}, K={K})")
        # each split rotates its own partial sums (the rotation is linear) before the "fixed" reduction adds
        # them, so split at least 2: a program owns BLOCK_N / 2 columns of a head's first half and their
        # partners D / 2 further on (the table's BLOCK_N where it divides the head, else one whole head)
        cfg = {**cfg, "REDUCE": "fixed"}
        if D % cfg["BLOCK_N"] or cfg["BLOCK_N"] < 2:
            cfg = {**cfg, "BLOCK_N": D, "num_warps": max(cfg["num_warps"], D // 16)}
    if cfg["SPLIT_K"] > 0:
        split_k = min(cfg["SPLIT_K"], K // block_k)
    else:
        # as many splits as keep the programs within WAVES x SMs, rounded down: on an H100 (sweep_gemm.py,
        # NOTES-gemm.md run 8) rounding up put gate_up's 448 column blocks into 3 splits (1.45 resident
        # waves, 28.8 us) where 2 take 23.9 us, while the narrow shapes gain from up to 16 splits
        waves = cfg.get("WAVES", 4)
        split_k = max(1, min((waves * _num_sms(device)) // (cdiv(N, cfg["BLOCK_N"]) * max(cdiv(M, rows), 1)),
                             K // block_k, cfg.get("MAX_SPLIT", 16)))
    if D:
        split_k = max(split_k, 2)
    if cfg["REDUCE"] == "fixed":
        split_k = min(split_k, MAX_FX_SPLIT)
    return cfg, block_k, rows, split_k


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: dict | None = None, rope: tuple | None = None) -> torch.Tensor:
    """`x [..., K]` fp16/bf16 (few rows) times the packed `[N, K]` weight -> `[..., N]` in x's dtype.

    `rope = (positions [M] int, cos, sin [P, D/2] fp32, rope_cols)` also rotates (RoPE, rotate-half)
    each D-wide head among the first `rope_cols` output columns at its row's position, in the
    split-K epilogue (one rounding); check `can_fuse_rope` first.
    """
    # -- 1. check, plan ---------------------------------------------------------------------------
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_gemv")
    M = x2.shape[0]
    D = 0
    if rope is not None:
        positions, cos, sin, rope_cols = rope
        D = 2 * cos.shape[1]
        if rope_cols % D or positions.shape != (M,):
            raise ShapeError(f"w4a16_gemv: cannot fuse RoPE (head_dim {D}, rope_cols {rope_cols}, "
                             f"{tuple(positions.shape)} positions for {M} rows)")
    cfg, block_k, rows, split_k = _plan(M, N, K, group_size, x.dtype, x.device, config, D)
    # -- 2. allocate ------------------------------------------------------------------------------
    use_fx = split_k > 1 and cfg["REDUCE"] == "fixed"
    out = (torch.zeros if split_k > 1 and not use_fx else torch.empty)((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)
    n_blocks = cdiv(N, cfg["BLOCK_N"])
    ws = fx_workspace(x.device, M * N) if use_fx else out  # unused unless use_fx
    # -- 3. launch --------------------------------------------------------------------------------
    pdl = use_pdl(x.device)
    grid = (n_blocks, split_k, cdiv(M, rows))
    if rope is None:
        positions, cos, sin, rope_cols = out, out, out, 0  # unused
    _W4A16_GEMV[grid](
        x2, qweight, scales, zeros, out, ws, positions, cos, sin, M, N, K, x2.stride(0), out.stride(0),
        cos.stride(0) if rope is not None else 0, rope_cols,
        G=group_size, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, SPLIT_K=split_k, ROWS=rows,
        IS_BF16=x.dtype == torch.bfloat16, CHUNK_K=planes64.CHUNK_K, LANES=planes64.LANES,
        PLANES=planes64.PLANES, FAST_CVT=x.device.type == "cuda",
        SUM_PLANES=cfg["SUM_PLANES"], PDL=pdl, ROPE=rope is not None, REDUCE_FX=use_fx,
        ROPE_D=D if rope is not None else cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )
    return out.reshape(*lead, N)


def can_fuse_rope(N: int, K: int, group_size: int, head_dim: int, config: dict | None = None) -> bool:
    """Whether `w4a16_gemv(..., rope=...)` can rotate heads of `head_dim` in its epilogue: a power-of-two
    head dim of 32..128 that divides N, and K long enough for two splits."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    return (head_dim in (32, 64, 128) and N % head_dim == 0
            and K // pick_block_k(K, group_size, cfg["BLOCK_K"]) >= 2)


DEFAULT_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 0, "num_warps": 4, "num_stages": 1,
                  "SUM_PLANES": 1, "REDUCE": "atomic"}

def w4a16_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """Plain-PyTorch twin (the same function as the GEMM's reference)."""
    return w4a16_gemm_ref(x, qweight, scales, zeros, group_size)
