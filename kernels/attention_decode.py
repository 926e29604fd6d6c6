"""Decode attention over a paged, possibly quantized KV cache: flash-decoding (split + merge).

One query token per sequence, B sequences, H query heads in groups of G = H / H_kv (GQA):

    out[b, h] = softmax(q[b, h] . K_b[:, h // G]^T * sm_scale) @ V_b[:, h // G]      [B, H, D]

where K_b, V_b [L_b, H_kv, D] are the dequantized rows of sequence b, read through its block table
(`kernels/kv_quant.py` gives the cache layout). Pass 1 splits each sequence into the launch's
n_splits chunks of whole tiles (`balanced_split_len`; the plan's `split_len` sets n_splits for the
longest context); program (split, kv head, b) loads the G query heads of one group as a
[BLOCK_G >= 16, D] tile (so the group shares one read of each K/V tile and the scores are a
tensor-core dot), and writes its normalized partial output [D] and log2-sum-exp per head.
Pass 2 merges the splits of each (b, h). With one split the first pass writes the output itself.

Flash-decoding: https://crfm.stanford.edu/2023/10/12/flashdecoding.html
PagedAttention: https://arxiv.org/abs/2309.06180
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from lmq.kernels import cuda_capability, cuda_sm_count, next_pow2
from lmq.kernels.kv_quant import (
    KV_MODE,
    PagedKV,
    attend_tile,
    check_query_for_cache,
    gather_kv_ref,
    load_tile_meta,
    needs_off64,
    prepare_query,
    raw_codes,
    scale_probs,
    use_asm,
)
from lmq.kernels.launch import DirectLaunch
from lmq.kernels.pdl import use_pdl

try:
    from lmq.kernels import attention_decode_mma as _mma
except ImportError:  # a Triton without Gluon (before 3.5): int4 takes the Triton split kernel
    _mma = None

from lmq.errors import ShapeError


@triton.jit
def _balanced_split_len(seq_len, n_splits, BLOCK_N: tl.constexpr):
    """`balanced_split_len` in the kernels (the split pass and the merge must agree)."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, n_splits), BLOCK_N), 1) * BLOCK_N


@triton.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, o_ptr, po_ptr, plse_ptr,
    qk_scale, split_len,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cb, stride_ch, stride_ct, stride_vb, stride_vh, stride_sb, stride_sh, stride_btb,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, BLOCK_DH: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, KV_MODE: tl.constexpr, DIRECT: tl.constexpr, OFF64: tl.constexpr,
    ASM: tl.constexpr, RAW: tl.constexpr, SCALE_P: tl.constexpr, PDL: tl.constexpr, BALANCED: tl.constexpr,
):
    if PDL:
        # launched early (programmatic dependent launch, lmq.kernels.pdl): wait for the previous
        # kernel's writes (q, the new token's K/V) before the first read
        tl.extra.cuda.gdc_wait()
    split = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    if BALANCED:  # this sequence's tokens over all the launch's splits (`balanced_split_len`)
        split_len = _balanced_split_len(seq_len, tl.num_programs(0), BLOCK_N)
    start = split * split_len
    if start < seq_len:
        end = tl.minimum(start + split_len, seq_len)
        # -- the group's query heads [BLOCK_G, BLOCK_DH] x 2 halves
        offs_g = tl.arange(0, BLOCK_G)
        offs_dh = tl.arange(0, BLOCK_DH)
        heads = hkv * GROUP + offs_g
        qmask = (offs_g[:, None] < GROUP) & (offs_dh[None, :] < HALF)
        q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_dh[None, :]
        q_lo = tl.load(q_ptrs, mask=qmask, other=0.0)
        q_hi = tl.load(q_ptrs + HALF, mask=qmask, other=0.0)
        q_lo, q_hi, qsum, qoff = prepare_query(q_lo, q_hi, KV_MODE, RAW)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc_lo = tl.zeros([BLOCK_G, BLOCK_DH], tl.float32)
        acc_hi = tl.zeros([BLOCK_G, BLOCK_DH], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb
        # -- stream this split's K/V tiles through the block table; the block ids and scales of
        #    tile i+1 are loaded while tile i is computed (nothing else hides their latency)
        for n0 in range(start, end, BLOCK_N):
            mask_n, krow, vcol, k_sz, v_sz = load_tile_meta(
                bt_row, n0, end, hkv, ks_ptr, vs_ptr, stride_cb, stride_ch, stride_ct,
                stride_vb, stride_vh, stride_sb, stride_sh, BLOCK_N, PAGE, KV_MODE, OFF64)
            m_i, l_i, acc_lo, acc_hi = attend_tile(
                q_lo, q_hi, qsum, qoff, m_i, l_i, acc_lo, acc_hi, kc_ptr, vc_ptr, krow, vcol, k_sz, v_sz,
                offs_dh, mask_n, mask_n[None, :], qk_scale, HALF, PAGE, BLOCK_N, KV_MODE, ASM, RAW, SCALE_P)
        # -- normalized partial (or final) output
        inv_l = 1.0 / l_i
        out_lo = acc_lo * inv_l[:, None]
        out_hi = acc_hi * inv_l[:, None]
        if DIRECT:
            o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_dh[None, :]
            tl.store(o_ptrs, out_lo.to(o_ptr.dtype.element_ty), mask=qmask)
            tl.store(o_ptrs + HALF, out_hi.to(o_ptr.dtype.element_ty), mask=qmask)
        else:
            p_ptrs = po_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_dh[None, :]
            tl.store(p_ptrs, out_lo, mask=qmask)
            tl.store(p_ptrs + HALF, out_hi, mask=qmask)
            tl.store(plse_ptr + b * stride_lb + heads * stride_lh + split, m_i + tl.math.log2(l_i),
                     mask=offs_g < GROUP)


_DECODE_SPLIT = DirectLaunch(_decode_split_kernel)  # lmq.kernels.launch


@triton.jit
def _decode_merge_kernel(
    o_ptr, po_ptr, plse_ptr, lens_ptr, split_len, n_splits,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, LAUNCH_DEPS: tl.constexpr,
    PDL: tl.constexpr, BALANCED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if LAUNCH_DEPS:
        tl.extra.cuda.gdc_launch_dependents()  # the o_proj GEMV may launch now (lmq.kernels.pdl)
    if PDL:
        tl.extra.cuda.gdc_wait()  # launched early: the split kernel's partials are all written after this
    h = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    if BALANCED:
        split_len = _balanced_split_len(seq_len, n_splits, BLOCK_N)
    n_splits = tl.cdiv(seq_len, split_len)  # this sequence's splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < n_splits
    lse = tl.load(plse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)  # [BLOCK_S]
    part = tl.load(po_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                   mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(part * w[:, None], 0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < D)


_DECODE_MERGE = DirectLaunch(_decode_merge_kernel)  # lmq.kernels.launch


# Launch configuration, one place: (BLOCK_N, num_warps, num_stages) by head-dim bucket; BLOCK_N is
# capped at the cache's block size.
# Measured on H100 (benchmarks/attention_sweep.py, docs/benchmarks.md): 128-token tiles beat 64 for
# 8/4-bit caches (per-tile overhead amortized: int8 B=64 L=4k 112% vs 88% of the copy floor); fp16
# is equal at B=64 but prefers 64 at B=8 (104% vs 91%): a per-dtype entry is the next step.
# D=256: 64-token tiles keep two programs per SM without spills.
_GPU_CONFIG = {64: (128, 4, 3), 128: (128, 4, 3), 256: (64, 4, 2)}
_CPU_CONFIG = (16, 1, 1)  # interpreter: small tiles keep programs x iterations small
MAX_SPLITS = 128
# Split plan (H100, benchmarks/attention_sweep.py --compare, docs/benchmarks.md): with B * H_kv
# programs at PROGRAMS_FULL per SM already no split pays. Below that, split to at least PROGRAMS_FULL
# programs per SM, and further, towards PROGRAMS_PER_SM, while every split keeps MIN_SPLIT_TILES
# tiles and there are at most MORE_SPLITS_MAX (a split costs a prologue and a merge row; B=1 has only
# H merge programs). B=8 L=16k: 16 splits instead of 5, int8 142 -> 110 us; B=1 keeps about 32 (64
# at 16k and 32k and 8 at 4k were all slower).
PROGRAMS_FULL = 2
PROGRAMS_PER_SM = 8
MIN_SPLIT_TILES = 4
MORE_SPLITS_MAX = 32
# Programmatic dependent launch (lmq.kernels.pdl, compute capability >= 9.0): the split kernel
# (PDL_SPLIT) and the merge kernel (PDL_MERGE) launch while the kernel before them finishes and wait
# for its writes. H100, same call (benchmarks/attention_sweep.py --compare): B=1 int4 1k / 4k / 16k
# 7.1 / 9.8 / 18.0 us without, 5.9 / 8.7 / 17.0 with both; B=8 int8 4k 35.8 -> 34.9. Letting the merge
# launch at the split kernel's start (an early trigger) was slower (B=8 int8 4k 38.8): its programs
# sat on SM slots. Also where the split programs are one wave and leave the merge room (H100, us, after ->
# early: int4 B=8 4k 24.2 -> 28.5, 16k 65.0 -> 69.6; int8 B=1 4k 10.2 -> 12.2; fp16 B=1 16k 32.1 -> 33.4;
# commit c719ad1, reverted: benchmarks/results/2026-11-23-session9-h100/attention-early-merge/early.log).
# The merge itself takes 2.3-2.9 us of GPU time at any dtype (`attention_sweep.py --profile`), and as much
# without its load of the sequence length (the same commit wrote lse = -inf for empty splits instead).
# A merge done by the last split to finish, in the same launch, was slower still (B=1 int4 4k 12.6 us
# against 9.2 for two launches): one program per head group merges serially.
PDL_SPLIT = True
PDL_MERGE = True
# Each sequence's tokens are spread over all the launch's splits (`balanced_split_len`), not cut into
# pieces of the plan's split length: the plan is made for the batch's longest context, and the engine's
# decode graphs make it for max_model_len, so a shorter sequence would otherwise leave most of its
# splits empty and run its whole context in a few programs. Decode step of synthetic Qwen2.5-7B (28 layers,
# H_kv=4), graphs planned for a 32k context, live contexts of 1k, graph replay in ms, spread over all splits
# against the plan's pieces (benchmarks/profile_decode.py --max-model-len 32768, H100,
# benchmarks/results/2026-11-23-session9-h100/balanced/balanced.log): int4 B=1 2.51 vs 2.69-2.71, B=8
# 3.02-3.06 vs 3.27-3.34; int8 B=1 2.48-2.50 vs 2.65-2.67, B=8 3.00 vs 3.34-3.35. Its cost where the split
# lengths come out the same (equal lengths, the plan's own context; benchmarks/attention_sweep.py --balanced,
# balanced/balanced-ab.log, us, on vs off): none within noise at B=8 and B=64 and at B=1 4k, but the Triton
# kernel's int4 path at B=1 16k reads 17.7-17.8 against 16.8-16.9 (it compiles to 177 registers instead of 221;
# offline SASS, head dim 128: its loop is 1,092 instructions against 1,112, neither spills, both run two programs
# per SM, and its cp.async copies issue about 50 instructions later in the loop; the cause is not found).
BALANCED = True
# int4 caches with fp16 queries (Hopper, head dims 64..128 that are multiples of 8, tiles of 64 or 128
# tokens; attention_decode_mma.supported): the Gluon split kernel that reads codes straight in
# tensor-core operand layouts (kernels/attention_decode_mma.py); False keeps the Triton split kernel.
MMA_KERNEL = True
# int4, head dims 65..128, Hopper (measured on an H100 only): three programs of 4 warps per SM instead of
# two (the split kernel capped at 168 registers: no spills in its loop, 2% more instructions), where the waves of
# programs allow it. H100, same call
# (benchmarks/attention_sweep.py --compare, us, two per SM -> three): B=8 16k 86.3 -> 79.0; slower where
# the extra slots leave the last wave thin: B=64 16k 575.6 -> 627.8 (512 programs: 2 waves of 264 slots,
# or a full one and a 29% one of 396), B=8 4k 27.6 -> 29.2. With T = a program's time at two per SM,
# three per SM take 1.5 T / SPEEDUP3 each (SPEEDUP3: the throughput gain), so three pay when
# waves(3) * 1.5 / SPEEDUP3 < waves(2); SPEEDUP3 = 1.2 fits B=8 16k (1.23) and picks two for the other
# measured shapes. (The values' scales on the probabilities read faster still there, 75.6 us, but for
# int4 that value path loses precision as the context grows, with or without the cap: relative error
# (norm ratio against the fp32 reference) 3.1e-3 at 4k, 6.2-6.7e-3 at 16k, against 3.7-3.9e-4 per
# element (benchmarks/results/2026-11-23-session7-h100/compare-errors.log). Its raw low nibbles read
# 1024 + c, and the dot carries 1024 sum(p s), taken off afterwards. `test_decode_gpu_int4_long_context`
# guards the shape.)
# Where the split plan gives one split, two splits at three per SM can beat one at two: B=64 (512 rows)
# makes 1,024 programs, 2.6 waves of three. H100, same call (attention_sweep.py --splits --big, us, one
# split at two per SM -> two at three): 4k 151.8 -> 146.8, 16k 578.0 -> 544.8, 32k 1153.0 -> 1086.5
# (three or four splits: within 2% of two; benchmarks/results/2026-11-23-session8-h100/splits-big.log).
# `int4_plan` picks among those by the same wave model.
INT4_THREE_REGS = 168
SPEEDUP3 = 1.2


def _int4_cost(programs: int, splits: int, three: bool, sm_count: int) -> float:
    """Modelled time of `programs` int4 split programs of 1/splits of the work each, in units of one
    unsplit program's time at two per SM (the wave model above)."""
    per_sm = 3 if three else 2
    waves = -(-programs // (per_sm * sm_count))
    return waves / splits * (1.5 / SPEEDUP3 if three else 1.0)


def int4_three_per_sm(programs: int, sm_count: int) -> bool:
    """Whether `programs` int4 split programs finish sooner three to an SM than two (see above)."""
    return _int4_cost(programs, 1, True, sm_count) < _int4_cost(programs, 1, False, sm_count)


def int4_plan(rows: int, splits: int, sm_count: int, tiles: int) -> tuple[int, bool]:
    """(splits, three per SM) for int4 split programs over `rows` = B * H_kv: the plan's splits at two
    or three per SM, or, where the plan gives one split and the context has two tiles or more (`tiles`),
    two splits at three per SM (see above)."""
    options = [(splits, False), (splits, True)] + ([(2, True)] if splits == 1 and tiles >= 2 else [])
    return min(options, key=lambda o: _int4_cost(rows * o[0], o[0], o[1], sm_count))


def uses_mma_kernel(q: torch.Tensor, kv_dtype: str, block_n: int, head_dim: int, group: int) -> bool:
    """Whether the split pass runs the Gluon int4 kernel (`MMA_KERNEL`, attention_decode_mma.supported) for
    queries like `q` over a `kv_dtype` cache read in tiles of `block_n` tokens."""
    return (MMA_KERNEL and _mma is not None and _mma.BUILD.failed is None
            and _mma.supported(q, kv_dtype, block_n, head_dim, group))


def int4_three_eligible(kv_dtype: str, head_dim: int, device: torch.device) -> bool:
    """Whether the three-per-SM int4 launch applies: int4 cache, head dim 65..128, Hopper."""
    return (kv_dtype == "int4" and device.type == "cuda" and 64 < head_dim <= 128
            and cuda_capability(device)[0] == 9)


def _config(device: torch.device, head_dim: int) -> tuple[int, int, int]:
    if device.type != "cuda":
        return _CPU_CONFIG
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return _GPU_CONFIG[bucket]


def _sm_count(device: torch.device) -> int:
    return cuda_sm_count(device) if device.type == "cuda" else 2


def plan_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int, sm_count: int) -> int:
    """Tokens per split (whole tiles), from the policy above."""
    rows = batch * num_kv_heads
    tiles = max(1, -(-max_len // block_n))
    want = 1
    if rows < PROGRAMS_FULL * sm_count:
        enough = -(-PROGRAMS_FULL * sm_count // rows)
        more = min(-(-PROGRAMS_PER_SM * sm_count // rows), tiles // MIN_SPLIT_TILES, MORE_SPLITS_MAX)
        want = min(max(enough, more), MAX_SPLITS, tiles)
    split_len = -(-max_len // want)
    return max(block_n, -(-split_len // block_n) * block_n)


# The Gluon int4 split kernel (attention_decode_mma) fits four programs per SM at head dim 128 with groups up to
# 8 (128 registers x 128 threads, 36 KB of shared memory; three at head dims 96-120, two for groups of 9-16) and
# streams at the copy floor once its programs are long. Its plan is one wave of MMA_SLOTS_PER_SM programs per SM,
# splits = 2 x SMs // (B x H_kv) (at most MORE_SPLITS_MAX), with the programs spread over every SM
# (attention_decode_mma.residency_pad: at most ceil(programs / SMs) per SM; without it the block scheduler packs
# them four to an SM), and it takes a launch only where that leaves MMA_MIN_SPLIT tokens or more per split (or,
# with about as many rows as SMs, in one split: below). Shorter programs pay its prologue and end-of-program
# merge of the warps' partial results, and the Triton kernel is faster there. Measured at H=32, H_kv=8, D=128.
# H100, us, the Gluon kernel at its best split count and programs per SM vs the Triton kernel at its plan
# (benchmarks/attention_sweep.py --mma-splits --pads 0,32768,65536,131072,
# benchmarks/results/2026-11-24-session20-h100/pad-call/sweep.log): B=1 4k 9.1 (16 splits of 256 tokens, one per
# SM) vs 8.6; B=1 16k 15.5 (16 splits, one per SM) or 16.0 (32 of 512, two per SM) vs 17.8; B=1 32k 22.1 (32, two
# per SM) vs 28.6; B=8 4k 22.3 (4 splits of 1024, two per SM) vs 30.1, 16k 60.9 vs 81.1, 32k 109.9 vs 148.8.
# Without the cap, four per SM (t-first/sweep.log): B=64 4k / 16k / 32k 111.2 / 408.1 / 811.3 (1 split) vs
# 147.0 / 541.5 / 1084.4. Short contexts (short-contexts/sweep.log): with about as many rows as SMs or more, one
# split beats the Triton plan below 512 tokens too (B=16 512 tokens 9.8 vs 11.7 us, B=32 14.7 vs 19.1, B=64 24.3
# vs 29.7) and beats two splits of 512 (B=16 1,024 tokens: one split 14.1, two 15.6, Triton 17.0; at 2,048 one
# split 22.8, two 22.4); with few rows the Triton kernel keeps them (B=1 512 / 1,024 / 2,048 tokens 5.6 / 6.3 /
# 7.1 vs the Gluon kernel's best 6.9 / 7.2 / 8.0; B=4 6.8 / 8.3 / 11.7 vs 7.8 / 8.6 / 11.8). B = 9-15 is not
# measured. The engine's decode graphs plan for max_model_len: with a long max_model_len and
# short live contexts the Gluon kernel then runs each sequence in short splits (`BALANCED`), where the Triton
# kernel would be faster (not measured against it end to end).
MMA_SLOTS_PER_SM = 2
MMA_MIN_SPLIT = 512
ONE_SPLIT_ROWS = 0.9  # x SMs: B=16 at H_kv=8 (128 rows, 132 SMs) is the smallest measured


def mma_split_len(batch: int, num_kv_heads: int, max_len: int, block_n: int, sm_count: int) -> int | None:
    """Tokens per split for the Gluon int4 kernel (whole tiles), or None where its plan leaves fewer than
    MMA_MIN_SPLIT tokens per split (the Triton kernel then takes the launch). With about as many (sequence, KV
    head) rows as SMs (`ONE_SPLIT_ROWS`), one split wherever the plan's splits would be shorter than
    2 x MMA_MIN_SPLIT (see above)."""
    rows = batch * num_kv_heads
    splits = max(1, min(MORE_SPLITS_MAX, MMA_SLOTS_PER_SM * sm_count // rows))
    tiles = max(1, -(-max_len // block_n))
    split_len = -(-tiles // splits) * block_n
    if rows >= ONE_SPLIT_ROWS * sm_count and split_len < 2 * MMA_MIN_SPLIT:
        return tiles * block_n
    return split_len if min(split_len, max_len) >= MMA_MIN_SPLIT else None


def plan_decode(q: torch.Tensor, kv_dtype: str, num_kv_heads: int, max_len: int, block_n: int,
                sm_count: int) -> tuple[int, bool, bool]:
    """(tokens per split, Gluon int4 kernel, three programs per SM) for a decode launch of queries `q`
    [B, H, D] over a `kv_dtype` cache read in tiles of `block_n` tokens."""
    B, H, D = q.shape
    if uses_mma_kernel(q, kv_dtype, block_n, D, H // num_kv_heads):
        split_len = mma_split_len(B, num_kv_heads, max_len, block_n, sm_count)
        if split_len is not None:
            return split_len, True, False
    split_len, three = plan_launch(B, num_kv_heads, max_len, block_n, sm_count,
                                   int4_three_eligible(kv_dtype, D, q.device))
    return split_len, False, three


def plan_launch(batch: int, num_kv_heads: int, max_len: int, block_n: int, sm_count: int,
                int4_three: bool = False) -> tuple[int, bool]:
    """(tokens per split, three programs per SM): `plan_splits`, then for an int4 cache that may run
    three per SM (`int4_three_eligible`), `int4_plan`."""
    split_len = plan_splits(batch, num_kv_heads, max_len, block_n, sm_count)
    if not int4_three:
        return split_len, False
    tiles = -(-max_len // block_n)
    planned = -(-max_len // split_len)
    splits, three = int4_plan(batch * num_kv_heads, planned, sm_count, tiles)
    if splits != planned:  # whole tiles each
        split_len = -(-tiles // splits) * block_n
    return split_len, three


def balanced_split_len(seq_len: int, n_splits: int, block_n: int) -> int:
    """Tokens per split of a `seq_len`-token sequence in a launch of `n_splits` splits (`BALANCED`): whole
    tiles, as few per split as spread the sequence over every split. The kernels compute the same."""
    per_split = -(-seq_len // n_splits)
    return max(1, -(-per_split // block_n)) * block_n


def _split_triton(q, cache, ks, vs, block_tables, seq_lens, out, po, plse, qk_scale, split_len, n_splits, G,
                  block_n, num_warps, num_stages, direct, pdl, three, ps, ls) -> None:
    """The split pass in Triton (every KV dtype)."""
    B, _, D = q.shape
    half = D // 2
    _DECODE_SPLIT[(n_splits, cache.num_kv_heads, B)](
        q, cache.k, cache.v, ks, vs, block_tables, seq_lens, out, po, plse,
        qk_scale, split_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2), cache.v.stride(0), cache.v.stride(1),
        ks.stride(0), ks.stride(1), block_tables.stride(0), *ps, *ls,
        GROUP=G, BLOCK_G=max(16, next_pow2(G)), HALF=half,
        BLOCK_DH=max(16, next_pow2(half)), BLOCK_N=block_n, PAGE=cache.block_size,
        KV_MODE=KV_MODE[cache.kv_dtype], OFF64=needs_off64(cache), ASM=use_asm(q), RAW=raw_codes(q, cache),
        SCALE_P=scale_probs(cache), DIRECT=direct, PDL=pdl and PDL_SPLIT, BALANCED=BALANCED,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl and PDL_SPLIT,
        **({"maxnreg": INT4_THREE_REGS} if three else {}),
    )


def decode_attention(q: torch.Tensor, cache: PagedKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     sm_scale: float | None = None, max_seq_len: int | None = None,
                     split_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence, already in the cache) -> out [B, H, D].

    block_tables [B, max_blocks] int32 (block ids of each sequence in order), seq_lens [B] int32
    (tokens in the cache per sequence, >= 1). `max_seq_len` (host int) avoids a device sync;
    `split_len` (a multiple of the tile) overrides the split plan: the launch then has
    cdiv(max_seq_len, split_len) splits, over which each sequence spreads its tokens (`BALANCED`).
    """
    G = check_query_for_cache(q, cache)
    if q.dim() != 3:
        raise ShapeError(f"q must be [B, H, D], got {tuple(q.shape)}")
    B, H, D = q.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype != torch.int32:
        raise ShapeError(f"block_tables must be int32 [{B}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if seq_lens.shape != (B,) or seq_lens.dtype != torch.int32:
        raise ShapeError(f"seq_lens must be int32 [{B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_tables.stride(1) != 1:
        raise ShapeError("block_tables rows must be contiguous")
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if max_seq_len > block_tables.shape[1] * cache.block_size:
        raise ShapeError(f"max_seq_len {max_seq_len} exceeds the block table's "
                         f"{block_tables.shape[1]} x {cache.block_size} tokens")
    block_n, num_warps, num_stages = _config(q.device, D)
    block_n = min(block_n, cache.block_size)  # a tile never straddles two blocks
    sms = _sm_count(q.device)
    if split_len is None:
        split_len, use_mma, three = plan_decode(q, cache.kv_dtype, cache.num_kv_heads, max_seq_len, block_n,
                                                sms)
    else:  # the caller's splits: the Gluon kernel wherever it applies
        use_mma = uses_mma_kernel(q, cache.kv_dtype, block_n, D, G)
        three = (not use_mma and int4_three_eligible(cache.kv_dtype, D, q.device)
                 and int4_three_per_sm(-(-max_seq_len // split_len) * cache.num_kv_heads * B, sms))
    if split_len % block_n:
        raise ShapeError(f"split_len {split_len} must be a multiple of BLOCK_N {block_n}")
    n_splits = -(-max_seq_len // split_len)
    if n_splits > MAX_SPLITS:
        raise ShapeError(f"{n_splits} splits exceed {MAX_SPLITS}; raise split_len")
    if out is None:
        out = torch.empty_like(q)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    direct = n_splits == 1
    if direct:
        po, plse = out, out  # unused
        ps = (0, 0, 0)
        ls = (0, 0)
    else:
        po = torch.empty((B, H, n_splits, D), dtype=torch.float32, device=q.device)  # [B, H, S, D]
        plse = torch.empty((B, H, n_splits), dtype=torch.float32, device=q.device)  # [B, H, S]
        ps = po.stride()[:3]
        ls = plse.stride()[:2]
    ks, vs = cache.scale_words()
    pdl = use_pdl(q.device)
    qk_scale = sm_scale * math.log2(math.e)
    if use_mma:
        try:
            _mma.launch_split(q, cache, ks, vs, block_tables, seq_lens, out, po, plse, qk_scale, split_len, n_splits,
                              block_n, G, direct, needs_off64(cache), pdl and PDL_SPLIT, ps, ls, balanced=BALANCED,
                              sm_count=sms)
        except _mma.KernelUnavailable:
            use_mma = False
    if not use_mma:
        _split_triton(q, cache, ks, vs, block_tables, seq_lens, out, po, plse, qk_scale, split_len, n_splits, G,
                      block_n, num_warps, num_stages, direct, pdl, three, ps, ls)
    if not direct:
        _DECODE_MERGE[(H, B)](
            out, po, plse, seq_lens, split_len, n_splits,
            out.stride(0), out.stride(1), *ps, *ls,
            D=D, BLOCK_D=next_pow2(D), BLOCK_S=max(2, next_pow2(n_splits)), BALANCED=BALANCED, BLOCK_N=block_n,
            num_warps=4 if q.device.type == "cuda" else 1, LAUNCH_DEPS=pdl, PDL=pdl and PDL_MERGE,
            launch_pdl=pdl and PDL_MERGE,
        )
    return out


def decode_attention_ref(q: torch.Tensor, cache: PagedKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         sm_scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch: per sequence, dequantize its cache rows and run fp32 attention with GQA."""
    B, H, D = q.shape
    G = H // cache.num_kv_heads
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(B):
        k, v = gather_kv_ref(cache, block_tables[b], int(seq_lens[b]))  # [L, H_kv, D] fp32
        k = k.repeat_interleave(G, dim=1)  # [L, H, D]
        v = v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].float(), k) * sm_scale  # [H, L]
        out[b] = torch.einsum("hl,lhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
