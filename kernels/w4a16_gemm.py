"""W4A16 GEMM: `out[M, N] = x[M, K] @ w_hat[N, K]^T`, int4 weights, fp16/bf16 activations, fp32 accumulate.

    w_hat[n, k] = (q[n, k] - z[g, n]) * s[g, n],   g = k // G,  G in (32, 64, 128)

Reads layout `planes64` (lmq/pack/planes64.py, which derives it):

    qweight int16   [K/64, N, 16]  nibble i of lane j in chunk c = code of k = 64c + 16i + j
    scales  float16 [K/G, N]
    zeros   uint8   [K/G, N]

One kernel, two regimes chosen by its config (`CONFIGS`, one table per arch):
- decode (small and medium M): BLOCK_M = the next power of two >= M between 16 (tl.dot's minimum;
  rows past M are masked) and BLOCK_M_MAX, so each dequantized weight tile serves as many rows as it
  can; narrow BLOCK_N and split-K over WAVES waves of SMs so that every SM streams weights; the
  splits add their partial sums into the zeroed output with fp16 atomics (`REDUCE` "atomic", the tables'
  choice: the order of the additions, and so the last bits, follow the order in which splits finish).
  `REDUCE` "ordered" (the deterministic mode's): each split stores its fp32 partial sums in its own slice
  of a workspace and counts itself in; the last split of a tile adds the slices in split order and writes
  the output: the same bits whatever the order of arrival, no zero fill. (An fp32 workspace added into
  with atomics measured within 3% of fp16 atomics, NOTES-gemm.md run 11; the GEMV's "fixed" int64
  reduction measured slower here at every M, up to 3x from M = 32: run 34.)
- prefill (large M, compute-bound): large tensor-core tiles, dequantization in registers.
Config switches: SWAP_AB computes out^T = w_hat @ x^T so the dequantized weights are tl.dot's first
operand (on sm90 Triton then issues wgmma with that operand in registers); DOT_K = 16/32/64 joins 1,
2 or 4 planes (contiguous K) into one dot, which cuts the matrix unit's waits per chunk.
M = 1 has its own CUDA-core kernel (w4a16_gemv.py); the dispatcher is lmq/engine/qlinear.py.
Where it splits K (fp16 atomics into `pdl.zero_filled`'s output) it is launched with PDL where `use_pdl`
(`PDL`; lmq.kernels.pdl): it waits at its start and lets the next kernel launch after its K loop (`TRIGGER`:
at its start it was slower at M = 3..32, NOTES-gemm.md run 48).

Per K chunk and plane: `(h >> 4i) & 0xF | MAGIC` bitcast to fp16 (MAGIC 0x6400 = 1024.0) or bf16
(0x4300 = 128.0) is exactly MAGIC + q; minus the zero prepared the same way gives q - z exactly, so
the dot runs on small exact integers and the scale is applied once per group on the [BLOCK_M,
BLOCK_N] partial sum ("apply scales late"), never per weight element. (Scales applied per weight with
one dot per K tile measured slower: NOTES-gemm.md run 15.)

`w4a16_gemm_ref` is the plain-PyTorch twin (same function, fp32 math).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv, cuda_capability, cuda_sm_count, next_pow2
from lmq.kernels.launch import DirectLaunch, PlanCache, stream_buffer
from lmq.kernels.pdl import use_pdl, zero_filled
from triton.runtime.jit import constexpr_function

from lmq.errors import ShapeError, UnsupportedError
from lmq.pack import planes64


@constexpr_function
def _pair_asm(first, bf16, scaled=False):
    """PTX for planes `first` and `first + 1` of two packed int16 lanes ($2) minus the zero ($3).

    Each 32-bit register holds two lanes; `(r >> 4i) & 0x000F000F | MAGIC2` is plane i of both lanes
    as two fp16/bf16 values MAGIC + q (one LOP3 after the shift), and one packed subtract (fp16) or
    fma with 1.0 (bf16, sm80 has no bf16x2 sub) removes MAGIC + z: 1.5 instructions per weight.
    `scaled` multiplies by the scale too, rounding once: fp16, one packed multiply by $4 (fp16x2), 2 per
    weight; bf16, each lane's q - z widened to fp32 and multiplied by its scale ($4, $5: fp32) before one
    packed conversion, 4 per weight.
    """
    magic = "0x43004300" if bf16 else "0x64006400"
    lines = ["{", ".reg .b32 t0, t1, one, nz, lo, hi;"]
    for o, i in ((0, first), (1, first + 1)):
        src = "$2"
        if i:
            lines.append(f"shr.u32 t{o}, $2, {4 * i};")
            src = f"t{o}"
        lines.append(f"lop3.b32 t{o}, {src}, 0x000F000F, {magic}, 0xEA;")
    if bf16 and scaled:
        lines += ["mov.b32 one, 0x3F803F80;", "xor.b32 nz, $3, 0x80008000;",
                  "fma.rn.bf16x2 t0, t0, one, nz;", "fma.rn.bf16x2 t1, t1, one, nz;"]  # q - z, exact
        for o in (0, 1):  # lane 0 is the low half
            lines += [f"shl.b32 lo, t{o}, 16;", f"and.b32 hi, t{o}, 0xFFFF0000;", "mul.rn.f32 lo, lo, $4;",
                      "mul.rn.f32 hi, hi, $5;", f"cvt.rn.bf16x2.f32 ${o}, hi, lo;"]
    elif bf16:
        lines += ["mov.b32 one, 0x3F803F80;", "xor.b32 nz, $3, 0x80008000;",
                  "fma.rn.bf16x2 $0, t0, one, nz;", "fma.rn.bf16x2 $1, t1, one, nz;"]
    elif scaled:
        lines += ["sub.f16x2 t0, t0, $3;", "sub.f16x2 t1, t1, $3;", "mul.rn.f16x2 $0, t0, $4;",
                  "mul.rn.f16x2 $1, t1, $4;"]
    else:
        lines += ["sub.f16x2 $0, t0, $3;", "sub.f16x2 $1, t1, $3;"]
    return "\n".join(lines + ["}"])




@triton.jit
def _dequant_pair(h, zq, FIRST: tl.constexpr, MAGIC: tl.constexpr, IS_BF16: tl.constexpr, FAST: tl.constexpr):
    """Planes FIRST and FIRST + 1 of `h [BN, 16]` int16 as q - z in the activation dtype (exact)."""
    if IS_BF16:
        wdt: tl.constexpr = tl.bfloat16
    else:
        wdt: tl.constexpr = tl.float16
    zb = tl.broadcast_to(zq[:, None], h.shape)  # [BN, 16] MAGIC + z
    if FAST:
        p0, p1 = tl.inline_asm_elementwise(_pair_asm(FIRST, IS_BF16), "=r,=r,r,r", [h, zb], dtype=(zb.dtype, zb.dtype),
                                           is_pure=True, pack=2)
    else:
        # Plain Triton (the interpreter has no inline assembly): the same bits, one lane at a time.
        p0 = (((h >> (4 * FIRST)) & 0xF) | MAGIC).to(tl.int16).to(wdt, bitcast=True) - zb
        p1 = (((h >> (4 * FIRST + 4)) & 0xF) | MAGIC).to(tl.int16).to(wdt, bitcast=True) - zb
    return p0, p1


@triton.jit
def _store_or_add(ptrs, out, mask, SPLIT_K: tl.constexpr):
    """The epilogue of every W4A16 kernel: store, or add into the zeroed output when K is split."""
    if SPLIT_K == 1:
        tl.store(ptrs, out, mask=mask)
    else:
        tl.atomic_add(ptrs, out, mask=mask, sem="relaxed")


@triton.jit
def _cat(a, b):
    """`[R, C]`, `[R, C]` -> `[R, 2C]` (a's columns, then b's): join, swap the new axis in, merge."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    ws_ptr, cnt_ptr,  # REDUCE "ordered": fp32 partial sums [SPLIT_K, M, N], int32 arrivals per tile (else unused)
    M, N, K,
    stride_xm, stride_om,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, IS_BF16: tl.constexpr,
    CHUNK_K: tl.constexpr, LANES: tl.constexpr, PLANES: tl.constexpr,  # planes64's geometry
    SWAP_AB: tl.constexpr, DOT_K: tl.constexpr,
    FAST_CVT: tl.constexpr,  # inline-PTX int4 -> fp16/bf16 (GPU); plain Triton under the interpreter
    ORDERED: tl.constexpr = False,  # split-K: partial sums added in split order by the last split (REDUCE)
    PDL: tl.constexpr = False,  # launched early (lmq.kernels.pdl): wait for the kernel before
    TRIGGER: tl.constexpr = 0,  # let the next kernel launch: 0 never, 1 at the start, 2 after the K loop
):
    if TRIGGER == 1:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel (the next call's zero fill) may launch now
    if PDL:
        tl.extra.cuda.gdc_wait()  # x and the zeroed output are written by the kernels before this one
    # -- which output tile and which K range this program owns ------------------------------------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row-blocks share each column block while it is in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_mask = offs_m < M
    n_mask = offs_n < N
    lanes = tl.arange(0, LANES)  # [16]
    lanes2 = tl.arange(0, 2 * LANES)  # [32]
    lanes4 = tl.arange(0, CHUNK_K)  # [64]

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

    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]
    qw_rows = qw_ptr + offs_n[:, None] * LANES + lanes[None, :]  # [BN, 16], chunk 0
    # SWAP_AB computes out^T = w_hat @ x^T: the weights become tl.dot's first operand, which suits
    # small M (the activations are the narrow operand). The accumulator is then [BN, BM].
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_lo, k_hi, BLOCK_K):
        for gi in tl.static_range(BLOCK_K // G):
            # -- one group: its zero (as MAGIC + z) and scale, one contiguous row of N each -------
            g = (kt + gi * G) // G
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0)  # [BN] uint8
            zq = (z.to(tl.int16) | MAGIC).to(wdt, bitcast=True)  # [BN] MAGIC + z
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            part = tl.zeros_like(acc)
            for cc in tl.static_range(CHUNKS_PER_GROUP):
                # -- stream one chunk of weights: BLOCK_N rows x 32 contiguous bytes --------------
                # (G = 32: both groups of a chunk load it; the second load hits L1)
                chunk = (kt + gi * G) // CHUNK_K + cc
                h = tl.load(qw_rows + chunk * N * LANES, mask=n_mask[:, None], other=0,
                            eviction_policy="evict_first")  # [BN, 16] int16
                if DOT_K == 64 and PLANES_PER_GROUP == 4:
                    # -- the whole chunk in one K = 64 dot: planes 0..3 side by side are k = 0..63 -----
                    w0, w1 = _dequant_pair(h, zq, 0, MAGIC, IS_BF16, FAST_CVT)  # [BN, 16] q - z, exact
                    w2, w3 = _dequant_pair(h, zq, 2, MAGIC, IS_BF16, FAST_CVT)
                    w = _cat(_cat(w0, w1), _cat(w2, w3))  # [BN, 64]
                    a = tl.load(x_rows + (chunk * CHUNK_K + lanes4)[None, :], mask=m_mask[:, None],
                                other=0.0)  # [BM, 64]
                    if SWAP_AB:
                        part = tl.dot(w, tl.trans(a), part)  # [BN, BM]
                    else:
                        part = tl.dot(a, tl.trans(w), part)  # [BM, BN]
                else:
                    for ii in tl.static_range(PLANES_PER_GROUP // 2):
                        # -- dequantize two planes: q - z exactly, no int-to-float conversion -----
                        # first plane of the pair: i = (gi * G) % CHUNK_K // LANES + 2 * ii (a constexpr)
                        w0, w1 = _dequant_pair(h, zq, (gi * G) % CHUNK_K // LANES + 2 * ii, MAGIC, IS_BF16,
                                               FAST_CVT)  # [BN, 16] each
                        k0 = chunk * CHUNK_K + LANES * ((gi * G) % CHUNK_K // LANES + 2 * ii)  # plane i's 1st k
                        if DOT_K >= 32:
                            # one K = 32 dot per pair: planes i, i + 1 are 32 contiguous input channels
                            w01 = _cat(w0, w1)  # [BN, 32]
                            a01 = tl.load(x_rows + (k0 + lanes2)[None, :], mask=m_mask[:, None], other=0.0)
                            if SWAP_AB:
                                part = tl.dot(w01, tl.trans(a01), part)  # [BN, BM]
                            else:
                                part = tl.dot(a01, tl.trans(w01), part)  # [BM, BN]
                        else:
                            a0 = tl.load(x_rows + (k0 + lanes)[None, :], mask=m_mask[:, None], other=0.0)
                            a1 = tl.load(x_rows + (k0 + LANES + lanes)[None, :], mask=m_mask[:, None], other=0.0)
                            if SWAP_AB:
                                part = tl.dot(w0, tl.trans(a0), part)  # [BN, BM]
                                part = tl.dot(w1, tl.trans(a1), part)
                            else:
                                part = tl.dot(a0, tl.trans(w0), part)  # [BM, BN]
                                part = tl.dot(a1, tl.trans(w1), part)
            # -- the group ends: apply its scale once to the partial sum --------------------------
            if SWAP_AB:
                acc += part * s[:, None]
            else:
                acc += part * s[None, :]

    if TRIGGER == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if SWAP_AB:
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]  # [BN, BM]
        mask = m_mask[None, :] & n_mask[:, None]
        part_offs = offs_m[None, :] * N + offs_n[:, None]  # [BN, BM] in one split's [M, N] slice
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]  # [BM, BN]
        mask = m_mask[:, None] & n_mask[None, :]
        part_offs = offs_m[:, None] * N + offs_n[None, :]  # [BM, BN]
    if ORDERED and SPLIT_K > 1:
        # Each split stores its fp32 partial sums in its own slice and counts itself in; the last to arrive adds
        # the slices in split order 0, 1, ... and writes the output, so the result does not depend on which split
        # finishes first (bit-reproducible), then leaves the tile's counter at zero for the next call.
        slice_len = (M * N).to(tl.int64)  # SPLIT_K slices of M x N can pass 2^31 elements
        tl.store(ws_ptr + pid_k * slice_len + part_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's stores are issued before the program counts itself in
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")  # release our slice, acquire the others'
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for sk in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + sk * slice_len + part_offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")
    else:
        _store_or_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask, SPLIT_K)


# ---------------------------------------------------------------------------------------------
# Per-arch configurations: the one table (recorded in the packed manifest, read by the dispatcher,
# lmq/engine/qlinear.py `choose_path`):
#   M <= gemv_max_m -> w4a16_gemv ("gemv"; from M = 2 only weights of <= gemv_rows_max_numel elements);
#   M <= decode_max_m -> this kernel, "decode" (weights of >= prefill_min_numel elements leave it from
#   M = prefill_min_m); M < dequant_min_m, weights of
#   >= prefill_min_numel -> "prefill": w4a16_gemm_ws with "prefill_ws" where the table has it (sm90,
#   fp16 or bf16; dequantize + cuBLAS where it cannot run), this kernel's "prefill" config otherwise;
#   else dequantize + cuBLAS.
# sm90's entries and crossovers were measured on an H100 (benchmarks/NOTES-gemm.md, `lmq bench gemm`);
# the other archs' rows are scaled to their shared memory and not yet measured.
# ---------------------------------------------------------------------------------------------
_GEMV = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 0, "WAVES": 8, "num_warps": 4, "num_stages": 1, "SUM_PLANES": 4,
         "REDUCE": "fixed"}
# BLOCK_M_MAX: the decode tile takes min(64, next power of two >= M) rows (at least BLOCK_M), so one
# dequantized weight tile serves up to 64 rows; sm90, sum of the four shapes: M=64 99.9 us with 64-row
# tiles vs 171.6 with 16, M=128 179.5 vs 318.6, M=32 80.7 (32 rows) vs 97.8 (sweep-decode-4.log).
_DECODE = {"BLOCK_M": 16, "BLOCK_M_MAX": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 0, "WAVES": 4,
           "GROUP_M": 1, "num_warps": 4, "num_stages": 3, "SWAP_AB": True, "DOT_K": 64}
# sm90: 3 waves from M=64 and 2 above M=128 (sum of the four shapes, 4 waves -> this: M=64 99.0 -> 95.2 us,
# M=96 179.0 -> 165.3, M=128 183.2 -> 169.1, M=192 263.8 -> 243.5, M=256 318.4 -> 310.7;
# benchmarks/results/2026-11-23-session7-h100/sweep-decode-waves.log). Other archs: not measured.
_DECODE_SM90 = {**_DECODE, "WAVES_FROM_M": ((64, 3), (129, 2))}
# The deterministic mode's decode kernel (REDUCE "ordered", lmq.engine.qlinear.engine_table) on sm90: 2 waves from
# M=32. Its last split reads every split's fp32 slice back, so fewer splits pay where M is larger. H100, sums over
# the four shapes, us, the plain table's waves -> these: M=32 97.8 -> 89.5, 64 129.0 -> 110.6, 128 206.8 -> 175.4;
# M=191 245.9 either way; one wave above M=128 was slower there (304-311); at most 4 splits instead read 112.0 at
# M=64 and 205.4 at 128 (benchmarks/results/2026-11-23-session15-h100/splits-call/splits/sweep.log).
_DECODE_ORDERED_SM90 = {"WAVES_FROM_M": ((32, 2),)}
_PREFILL_BIG_SMEM = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1, "GROUP_M": 8,
                     "num_warps": 8, "num_stages": 3, "SWAP_AB": True, "DOT_K": 64}
_PREFILL_SMALL_SMEM = {**_PREFILL_BIG_SMEM, "BLOCK_M": 64, "num_warps": 4, "num_stages": 2}
# Measured on sm90 (H100, Llama-3-8B shapes, g128): at M=1 the GEMV wins on every weight (at M=2 too, with two
# rows per program, on all but gate_up: `_CROSS_SM90`); with 4-wave
# splits and rows per tile growing with M, the decode kernel wins from M=2 up to M=256, summed over the
# four shapes (M=128 / 256: decode 176 / 310 us, dequantize + cuBLAS 392 / 425, prefill kernel 351 /
# 448; benchmarks/results/2026-11-22-session4-h100/blockm/gemm-m2.json); at M=384 dequantize + cuBLAS
# wins (481 vs 561 for this kernel's prefill config). So on sm90 that config is never dispatched (it
# stays in the table for the GPU tests and the benchmark's comparisons); the other archs keep the
# crossover at 64 (not measured).
# sm90's prefill path (fp16 or bf16 activations) is the warp-specialized kernel (w4a16_gemm_ws.py, its config
# "prefill_ws"): 256 activation rows x 128 weight rows per tile (128 rows when 256-row tiles would fill at
# most half the SMs or M fits 128: `w4a16_gemm_ws.plan`), 4 stages, two warp groups that convert the codes
# straight into wgmma's register operand, one loading warp; K split in two where that fills the last wave
# much better (`SPLIT_WAVES`). It replaced a form with converting warps and an fp16 weight ring in shared
# memory (NOTES-gemm.md, run 27): H100, sums over the four shapes (us, this / converting form / cuBLAS
# fp16): M=256 185.6 / 272.1 / 206.5, 1024 653.2 / 878.3 / 670.0, 4096 2794.7 / 3370.6 / 2714.7
# (results/2026-11-23-session10-h100/sweep-rs-epi1.log).
_PREFILL_WS = {"BLOCK_M": 256, "BLOCK_M_SMALL": 128, "BLOCK_N": 128, "STAGES": 4, "GROUP_M": 8, "SPLIT_K": 0,
               "MIN_SPLIT_CHUNKS": 8, "MAX_SPLIT": 2, "SPLIT_WAVES": 1.25, "MMA_REGS": 200, "LOADER_REGS": 40}
_CROSS = {"gemv_max_m": 1, "gemv_min_numel": 0, "decode_max_m": 64, "dequant_min_m": 65}
# sm90 crossovers (`lmq bench gemm --m ...`, docs/benchmarks.md, GEMM, session 10's run, whose last column times
# every path): on GPU time the warp-specialized prefill beats the decode kernel on every Llama-3-8B shape
# from M=192 (qkv 28.1 vs 34.4 us, o_proj 19.1 vs 22.2, gate_up 87.9 vs 122.1, down 48.5 vs 61.5), and
# dequantize + cuBLAS at every M measured up to 4096 (qkv at 4096: 297.3 vs 337.1 us; bf16 there: within
# 3% over the four shapes); beyond 8192 rows dequantizing once costs little against the matmul (not
# measured). It switches at 192. (Session 10 switched at 256: the kernel's Python launch then cost 148-171 us
# against the decode kernel's 82-103 on the lent H100's host. With the direct launch (lmq.kernels.launch) it
# cost 87-112 us while the decode kernel, still launched through Triton, cost 90-101; later, both direct, 53-113
# against 34-70 on a faster host (benchmarks/results/2026-11-23-session11-h100/lean-launch/). Session
# 10's one throughput A/B, with the old launch, read 34.95 / 34.67 req/s switching at 192 against 39.32 / 35.60 at
# 257: results/2026-11-23-session10-h100/crossover-ab/. Session 11, every kernel launched directly: eager
# 192/224-token prefills 21-31% less GPU time, TTFT faster in 5 of 6 pairs; throughput 35.27 / 41.50 req/s at 191
# against 38.85 / 40.55 at 255, not settled by the run-to-run spread: session11-h100/crossover-192/.)
# Two rows (sm90): the GEMV with two rows per program (`ROWS` 2, each dequantized weight tile serving both) against the
# decode kernel at M=2, us, qkv / o_proj / gate_up / down: 8.9 / 7.0 / 31.3 / 16.5 against 10.7 / 8.6 / 28.4 / 18.4
# (H100, benchmarks/results/2026-11-23-session14-h100/check/gemv-rows.log; the H200 agrees: session14-h200/final/);
# at M = 3 and 4 the decode kernel wins on every shape (qkv 13.2 against 10.8 at M=3 with two rows; four rows per
# program lose everywhere, at 156 registers or at 48: NOTES-gemm.md run 44). So M=2 takes the GEMV for weights of at
# most `gemv_rows_max_numel` elements (down's 58.7M yes, gate_up's 117.4M no).
_CROSS_SM90 = {**_CROSS, "gemv_max_m": 2, "gemv_rows_max_numel": 64 << 20, "decode_max_m": 191,
               "dequant_min_m": 8192}
_GEMV_SM90 = {**_GEMV, "ROWS": 2}
# sm90: the Gluon kernel that loads the codes straight into wgmma's register operand and x into shared memory once
# per program (w4a16_gemm_direct.py), for fp16 activations and the (max M, max weight elements) pairs of `direct_rows`
# (from M = 2 where the GEMV does not take that M). H100 (benchmarks/results/2026-11-24-session19-h100/, NOTES-gemm.md
# run 47), us, decode kernel -> it, one run: M = 3..16 (128 weight rows per program, 2 chunks a step, 4 waves) qkv
# 10.5-10.8 -> 9.5-9.6, o_proj 8.5-8.7 -> 7.5-7.7, down 17.9-18.2 -> 17.9-18.4, gate_up (117M) 28.2-29.4 ->
# 34.4-35.3; M = 32 / 48 / 64 at 2 waves, 32 or 64 rows a tile: o_proj (16.8M) 9.1 / 10.4 / 11.1 -> 8.2 / 9.1 / 9.4,
# qkv (25.2M) 11.5 / 13.0 / 13.5 -> 13.0 / 16.5 / 16.8. Both launched with PDL (run 48, session 21's table), at
# M = 3..16 down (58.7M) reads 16.5-17.4 against the decode kernel's 16.9-17.5, so it takes the direct kernel too.
# Measured on these shapes only.
_DIRECT_SM90 = {"BLOCK_M": 16, "BLOCK_M_MAX": 64, "BLOCK_N": 128, "WAVES": 4, "WAVES_FROM_M": ((17, 2),), "STEP": 2,
                "MAX_SPLIT": 64}
CONFIGS: dict[str, dict] = {
    "sm75": {"gemv": _GEMV, "decode": {**_DECODE, "SWAP_AB": False}, "prefill": _PREFILL_SMALL_SMEM, **_CROSS},
    "sm80": {"gemv": _GEMV, "decode": _DECODE, "prefill": _PREFILL_BIG_SMEM, **_CROSS},
    "sm86": {"gemv": _GEMV, "decode": _DECODE, "prefill": _PREFILL_SMALL_SMEM, **_CROSS},
    "sm89": {"gemv": _GEMV, "decode": _DECODE, "prefill": _PREFILL_SMALL_SMEM, **_CROSS},
    "sm90": {"gemv": _GEMV_SM90, "direct": _DIRECT_SM90, "decode": _DECODE_SM90, "decode_ordered": _DECODE_ORDERED_SM90,
             "prefill": _PREFILL_BIG_SMEM, "prefill_ws": _PREFILL_WS, **_CROSS_SM90,
             "direct_rows": ((16, 64 << 20), (64, 20 << 20))},
}
# The interpreter runs one program at a time on the CPU: small tiles keep tests fast there.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 0, "GROUP_M": 1,
                    "num_warps": 4, "num_stages": 1}

def _num_sms(device: torch.device) -> int:
    return cuda_sm_count(device) if device.type == "cuda" else 4


def check_bf16_support(x: torch.Tensor, op: str) -> None:
    """bf16 activations need compute capability 8.0 (the bf16x2 instructions); Turing has none."""
    if x.dtype == torch.bfloat16 and x.device.type == "cuda" and cuda_capability(x.device) < (8, 0):
        major, minor = cuda_capability(x.device)
        raise UnsupportedError(
            f"{op}: bfloat16 activations need compute capability >= 8.0, this GPU has {major}.{minor}; "
            f"run the model in float16 (--dtype float16)"
        )



def check_inputs(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, op: str) -> tuple[int, int, tuple, torch.Tensor]:
    """Every W4A16 launcher's checks: the packed weight, the activations' dtype, width and device.

    Returns `(N, K, lead, x2)` with `x2 = x` viewed as `[M, K]`, unit stride along K.
    """
    N, K = planes64.check_tensors(qweight, scales, zeros, group_size, f"{op} weight")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ShapeError(f"{op}: activations must be float16 or bfloat16, got {x.dtype}")
    check_bf16_support(x, op)
    if x.shape[-1] != K:
        raise ShapeError(f"{op}: x has {x.shape[-1]} input features, the weight has K={K}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t.device != x.device:
            raise ShapeError(f"{op}: {name} is on {t.device}, x on {x.device}; move both to one device")
        if not t.is_contiguous():
            raise ShapeError(f"{op}: {name} must be contiguous")
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return N, K, x.shape[:-1], x2

def pick_block_k(K: int, group_size: int, want: int) -> int:
    """The largest multiple of max(G, 64) that is <= `want` and divides K (so tiles never straddle K)."""
    step = max(group_size, planes64.CHUNK_K)
    bk = max(step, want // step * step)
    while K % bk != 0:
        bk -= step
    return bk


def waves_for(M: int, cfg: dict) -> int:
    """The waves of programs a split-K launch aims for at M rows: WAVES (default 2), or the last `WAVES_FROM_M`
    [(min_m, waves), ...] (ascending) entry whose min_m M reaches."""
    waves = cfg.get("WAVES", 2)
    for min_m, w in cfg.get("WAVES_FROM_M", ()):
        if M >= min_m:
            waves = w
    return waves


def pick_split_k(M: int, N: int, K: int, cfg: dict, block_k: int, device: torch.device) -> int:
    """SPLIT_K=0 means auto: enough K splits that the grid covers ~WAVES (default 2) waves of SMs,
    at most MAX_SPLIT (default 16). `WAVES_FROM_M` [(min_m, waves), ...] (ascending) lowers the
    target for larger M: each row tile there already does more work per weight byte."""
    if cfg["SPLIT_K"] > 0:
        return min(cfg["SPLIT_K"], K // block_k)
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    want = cdiv(waves_for(M, cfg) * _num_sms(device), tiles)
    return max(1, min(want, K // block_k, cfg.get("MAX_SPLIT", 16)))


_LAUNCH = DirectLaunch(_w4a16_gemm_kernel)  # lmq.kernels.launch
# REDUCE "ordered": per (device, stream), the splits' fp32 partial sums (contents do not matter between calls) and
# one arrival counter per output tile (zero between calls: each tile's last split resets its own)
_PARTIALS: dict[tuple, list[torch.Tensor]] = {}
_ARRIVALS: dict[tuple, list[torch.Tensor]] = {}
_PLANS = PlanCache()


def _plan(M: int, N: int, K: int, group_size: int, device: torch.device, config: dict | None) -> tuple[dict, int, int, bool]:
    """(config with its rows per tile, BLOCK_K, split count, ordered reduction) of a launch, kept per shape and config
    object (`PlanCache`: working this out took ~2.5 us of Python a call)."""
    return _PLANS.get((M, N, K, group_size, device), config, lambda: _make_plan(M, N, K, group_size, device, config))


def _make_plan(M: int, N: int, K: int, group_size: int, device: torch.device,
               config: dict | None) -> tuple[dict, int, int, bool]:
    cfg = dict(config or (INTERPRET_CONFIG if device.type == "cpu" else CONFIGS["sm80"]["decode"]))
    if "BLOCK_M_MAX" in cfg:  # rows per tile grow with M: each dequantized weight tile serves more rows
        cfg["BLOCK_M"] = min(cfg["BLOCK_M_MAX"], max(cfg["BLOCK_M"], next_pow2(M)))
    block_k = pick_block_k(K, group_size, cfg["BLOCK_K"])
    split_k = pick_split_k(M, N, K, cfg, block_k, device)
    reduce = cfg.get("REDUCE", "atomic")
    if reduce not in ("atomic", "ordered"):
        raise ValueError(f"w4a16_gemm: REDUCE is 'atomic' or 'ordered', got {reduce!r}")
    return cfg, block_k, split_k, reduce == "ordered" and split_k > 1


# split-K launches (fp16 atomics into `pdl.zero_filled`) with PDL where `use_pdl` (lmq.kernels.pdl)
PDL = True
TRIGGER = 2


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: dict | None = None) -> torch.Tensor:
    """`x [..., K]` fp16/bf16 times the packed `[N, K]` weight -> `[..., N]` in x's dtype."""
    # -- 1. check ---------------------------------------------------------------------------------
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_gemm")
    M = x2.shape[0]
    cfg, block_k, split_k, ordered = _plan(M, N, K, group_size, x.device, config)
    # -- 2. allocate ------------------------------------------------------------------------------
    zero_fill = split_k > 1 and not ordered  # fp16 atomics add into a zeroed output
    out = (zero_filled if zero_fill else torch.empty)((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    pdl = PDL and zero_fill and use_pdl(x.device)
    if M == 0:
        return out.reshape(*lead, N)
    # -- 3. launch --------------------------------------------------------------------------------
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split_k)
    ws, cnt = out, out  # unused unless ordered
    if ordered:
        ws = stream_buffer(_PARTIALS, x.device, split_k * M * N, torch.float32)
        cnt = stream_buffer(_ARRIVALS, x.device, grid[0], torch.int32)
    _LAUNCH[grid](
        x2, qweight, scales, zeros, out, ws, cnt, M, N, K, x2.stride(0), out.stride(0),
        G=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        SPLIT_K=split_k, GROUP_M=cfg["GROUP_M"], IS_BF16=x.dtype == torch.bfloat16,
        CHUNK_K=planes64.CHUNK_K, LANES=planes64.LANES, PLANES=planes64.PLANES,
        FAST_CVT=x.device.type == "cuda", SWAP_AB=cfg.get("SWAP_AB", False),
        DOT_K=cfg.get("DOT_K", 16), ORDERED=ordered, PDL=pdl, TRIGGER=TRIGGER if pdl else 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )
    return out.reshape(*lead, N)


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """Plain-PyTorch twin: unpack the layout, dequantize in fp32, matmul in fp32, cast to x's dtype."""
    q = planes64.unpack(qweight, scales, zeros, group_size)
    w = q.dequantize(torch.float32).to(x.device)  # [N, K]
    return (x.float() @ w.t()).to(x.dtype)
