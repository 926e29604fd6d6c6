"""Prefill attention over a paged, possibly quantized KV cache: causal, varlen-packed, GQA, prefix.

B sequences are packed along the token axis: sequence b owns query rows
cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q [T, H, D] (its n_b new tokens) and has L_b = seq_lens[b]
tokens in the cache, the new ones included (the write path ran first), so its first
P_b = L_b - n_b tokens are a prefix already there (chunked prefill, multi-turn reuse). Row i of
sequence b sits at position P_b + i and attends causally:

    out[t_b + i, h] = softmax_j<=P_b+i(q[t_b + i, h] . K_b[j, h // G] * sm_scale) @ V_b[:, h // G]

Program (query tile, head, sequence) holds a [BLOCK_M, D] tile of queries and streams the K/V tiles
it can see through the block table (keys past its last row's position are never read), with the
same dequantize-in-registers tile step as decode (`kv_quant.attend_tile`). With a tile map
(`tiles [n, 2]` int32: (sequence, query tile) per program, a query tile past its sequence's rows for
the spare ones), program (i, head) takes the map's i-th tile instead: a launch sized once for many
sequences (a CUDA graph's) then runs as many programs as its longest possible tiling, not
sequences x the longest sequence's tiles. Flash attention:
https://arxiv.org/abs/2205.14135

Given the new tokens' keys and values in float form (`k_new`, `v_new`: what the cache now holds, which
`write_kv(..., write_back=True)` leaves in the step's k / v rows), each sequence's own chunk is attended from them
in the float tile loop and only its cached prefix through the cache: two launches when a sequence has a prefix
(MODE 2: the prefixes, leaving each row's output, max and sum; MODE 1: the chunks, merged with that state), one
(MODE 1) when none has. MODE 0 reads every key through the cache.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv, cuda_sm_count, next_pow2
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
    softmax_step,
    use_asm,
)
from lmq.kernels.launch import DirectLaunch, stream_buffer

from lmq.errors import ShapeError


@triton.jit
def _attend_fresh(q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, kn_base, vn_base, stride_knt, stride_vnt, n0, offs_m,
                  offs_dh, q_len, qk_scale, HALF: tl.constexpr, BLOCK_N: tl.constexpr, OFF64: tl.constexpr,
                  MASKED: tl.constexpr):
    """One BLOCK_N tile of the chunk's own keys and values (rows n0.. of the chunk, from the float k_new / v_new
    [T, H_kv, D] rows at kn_base / vn_base), flash-attention style as `kv_quant.attend_tile` with a float cache.
    MASKED: causal in the chunk's coordinates (key j <= query row i) and inside the chunk; otherwise every row of
    the query tile sees the whole key tile."""
    rows = n0 + tl.arange(0, BLOCK_N)
    if OFF64:
        rows = rows.to(tl.int64)
    dmask = offs_dh[None, :] < HALF
    lmask = dmask
    if MASKED:
        lmask = dmask & (rows[:, None] < q_len)
    k_ptrs = kn_base + rows[:, None] * stride_knt + offs_dh[None, :]
    k_lo = tl.load(k_ptrs, mask=lmask, other=0.0)  # [BLOCK_N, BLOCK_DH]
    k_hi = tl.load(k_ptrs + HALF, mask=lmask, other=0.0)
    qk = tl.dot(q_lo, tl.trans(k_lo))
    qk += tl.dot(q_hi, tl.trans(k_hi))  # [BLOCK_M, BLOCK_N] fp32
    valid = (rows[None, :] <= offs_m[:, None]) & (rows[None, :] < q_len)  # read only when MASKED
    m_new, alpha, p = softmax_step(qk, m_i, valid, qk_scale, MASKED)
    v_ptrs = vn_base + rows[:, None] * stride_vnt + offs_dh[None, :]
    v_lo = tl.load(v_ptrs, mask=lmask, other=0.0)  # [BLOCK_N, BLOCK_DH]
    v_hi = tl.load(v_ptrs + HALF, mask=lmask, other=0.0)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(q_lo.dtype)
    acc_lo = acc_lo * alpha[:, None] + tl.dot(p, v_lo)
    acc_hi = acc_hi * alpha[:, None] + tl.dot(p, v_hi)
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, cu_q_ptr, lens_ptr, o_ptr, tiles_ptr, kn_ptr, vn_ptr, lse_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ch, stride_ct, stride_vb, stride_vh, stride_sb, stride_sh, stride_btb,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_lt,
    GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK_DH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, KV_MODE: tl.constexpr, OFF64: tl.constexpr,
    ASM: tl.constexpr, RAW: tl.constexpr, SCALE_P: tl.constexpr, TILED: tl.constexpr, UNMASKED: tl.constexpr,
    MODE: tl.constexpr, MERGE: tl.constexpr,
):
    """MODE 0: every key through the cache, causal. MODE 2: a sequence's cached prefix only (sequences without one are
    skipped), its rows' softmax state left in o_ptr and lse_ptr [T, H, 2] fp32 (running max and sum, log2 domain).
    MODE 1: the chunk's own keys from k_new / v_new (kn_ptr, vn_ptr), causal in the chunk; MERGE: then merged with
    the state MODE 2 left, for sequences with a prefix."""
    h = tl.program_id(1)
    if TILED:  # (sequence, query tile) from the map
        b = tl.load(tiles_ptr + 2 * tl.program_id(0))
        m_blk = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
    else:
        m_blk = tl.program_id(0)
        b = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    m0 = m_blk * BLOCK_M
    prefix = 0
    if MODE != 1 or MERGE:
        prefix = tl.load(lens_ptr + b) - q_len
    run = m0 < q_len
    if MODE == 2:
        run = run & (prefix > 0)
    if run:
        hkv = h // GROUP
        # -- query tile [BLOCK_M, BLOCK_DH] x 2 halves
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_dh = tl.arange(0, BLOCK_DH)
        qmask = (offs_m[:, None] < q_len) & (offs_dh[None, :] < HALF)
        q_ptrs = q_ptr + (q_start + offs_m[:, None]).to(tl.int64) * stride_qt + h * stride_qh + offs_dh[None, :]
        q_lo = tl.load(q_ptrs, mask=qmask, other=0.0)
        q_hi = tl.load(q_ptrs + HALF, mask=qmask, other=0.0)
        o_ptrs = o_ptr + (q_start + offs_m[:, None]).to(tl.int64) * stride_ot + h * stride_oh + offs_dh[None, :]
        ml_ptrs = lse_ptr + (q_start + offs_m).to(tl.int64) * stride_lt + 2 * h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_lo = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
        acc_hi = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb
        if MODE == 1:
            # the chunk's own keys from the float k_new / v_new, in chunk coordinates: tiles below the first row
            # (m0 < q_len) unmasked, then the diagonal
            kn_base = kn_ptr + q_start.to(tl.int64) * stride_knt + hkv * stride_knh
            vn_base = vn_ptr + q_start.to(tl.int64) * stride_vnt + hkv * stride_vnh
            c_full = 0
            if UNMASKED:
                c_full = (m0 + 1) // BLOCK_N * BLOCK_N
            for n0 in range(0, c_full, BLOCK_N):
                m_i, l_i, acc_lo, acc_hi = _attend_fresh(
                    q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, kn_base, vn_base, stride_knt, stride_vnt, n0, offs_m,
                    offs_dh, q_len, qk_scale, HALF, BLOCK_N, OFF64, MASKED=False)
            for n0 in range(c_full, tl.minimum(q_len, m0 + BLOCK_M), BLOCK_N):
                m_i, l_i, acc_lo, acc_hi = _attend_fresh(
                    q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, kn_base, vn_base, stride_knt, stride_vnt, n0, offs_m,
                    offs_dh, q_len, qk_scale, HALF, BLOCK_N, OFF64, MASKED=True)
        else:
            q_lo, q_hi, qsum, qoff = prepare_query(q_lo, q_hi, KV_MODE, RAW)
            # key tiles that every row of the tile sees whole (up to the first row's position, which is inside the
            # sequence: m0 < q_len) take no masks; the rest, the diagonal and a sequence's last partial tile, do
            full_end = 0
            if MODE == 2:  # the cached prefix only: every row sees all of it, so only its last partial tile is masked
                end = prefix
                if UNMASKED:
                    full_end = prefix // BLOCK_N * BLOCK_N
            else:
                end = prefix + tl.minimum(q_len, m0 + BLOCK_M)  # keys the last row can see
                if UNMASKED:
                    full_end = (prefix + m0 + 1) // BLOCK_N * BLOCK_N
            pos_m = prefix + offs_m  # [BLOCK_M] each row's position in the sequence
            for n0 in range(0, full_end, BLOCK_N):
                mask_n, krow, vcol, k_sz, v_sz = load_tile_meta(
                    bt_row, n0, end, hkv, ks_ptr, vs_ptr, stride_cb, stride_ch, stride_ct,
                    stride_vb, stride_vh, stride_sb, stride_sh, BLOCK_N, PAGE, KV_MODE, OFF64, FULL=True)
                m_i, l_i, acc_lo, acc_hi = attend_tile(
                    q_lo, q_hi, qsum, qoff, m_i, l_i, acc_lo, acc_hi, kc_ptr, vc_ptr, krow, vcol, k_sz, v_sz,
                    offs_dh, mask_n, mask_n[None, :], qk_scale, HALF, PAGE, BLOCK_N, KV_MODE, ASM, RAW, SCALE_P,
                    MASKED=False)
            for n0 in range(full_end, end, BLOCK_N):
                mask_n, krow, vcol, k_sz, v_sz = load_tile_meta(
                    bt_row, n0, end, hkv, ks_ptr, vs_ptr, stride_cb, stride_ch, stride_ct,
                    stride_vb, stride_vh, stride_sb, stride_sh, BLOCK_N, PAGE, KV_MODE, OFF64)
                offs_n = n0 + tl.arange(0, BLOCK_N)
                valid = mask_n[None, :] & (offs_n[None, :] <= pos_m[:, None])  # causal
                m_i, l_i, acc_lo, acc_hi = attend_tile(
                    q_lo, q_hi, qsum, qoff, m_i, l_i, acc_lo, acc_hi, kc_ptr, vc_ptr, krow, vcol, k_sz, v_sz,
                    offs_dh, mask_n, valid, qk_scale, HALF, PAGE, BLOCK_N, KV_MODE, ASM, RAW, SCALE_P)
        # merged with the state MODE 2 left (max m, sum l, o). Done here, not by MODE 2 after its loops: there the
        # merge's loads live across the long quantized loop (offline SASS: 1,089 instructions a tile against 925)
        if MERGE:  # noqa: SIM102 (a constexpr, then a value known at run time)
            if prefix > 0:
                m_c = tl.load(ml_ptrs, mask=offs_m < q_len, other=0.0)
                l_c = tl.load(ml_ptrs + 1, mask=offs_m < q_len, other=1.0)
                m_new = tl.maximum(m_i, m_c)
                alpha = tl.math.exp2(m_i - m_new)
                beta = tl.math.exp2(m_c - m_new) * l_c
                l_i = l_i * alpha + beta
                o_lo = tl.load(o_ptrs, mask=qmask, other=0.0).to(tl.float32)
                o_hi = tl.load(o_ptrs + HALF, mask=qmask, other=0.0).to(tl.float32)
                acc_lo = acc_lo * alpha[:, None] + o_lo * beta[:, None]
                acc_hi = acc_hi * alpha[:, None] + o_hi * beta[:, None]
        inv_l = 1.0 / l_i
        tl.store(o_ptrs, (acc_lo * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=qmask)
        tl.store(o_ptrs + HALF, (acc_hi * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=qmask)
        if MODE == 2:
            tl.store(ml_ptrs, m_i, mask=offs_m < q_len)
            tl.store(ml_ptrs + 1, l_i, mask=offs_m < q_len)


_PREFILL = DirectLaunch(_prefill_kernel)  # lmq.kernels.launch
_STATES: dict = {}  # stream_buffer pool of the MODE 2 -> MODE 1 softmax states


# Launch configuration, one place: (BLOCK_M, BLOCK_N, num_warps, num_stages) by head-dim bucket.
_GPU_CONFIG = {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 8, 2)}
_CPU_CONFIG = (16, 16, 1, 1)
# Key tiles that a query tile sees whole (below its first row's position, inside the sequence) run without the
# causal and length masks: offline SASS for sm_90 at the table's config, instructions per tile per warp, masked ->
# unmasked: fp16 734 -> 412, int8 1260 -> 931, int4 1335 -> 883 (the masks cost a compare and a select per score,
# and fp16 V tiles went through registers to be masked). H100, one 4,096-token sequence, H=32, H_kv=8, D=128, same
# call (benchmarks/attention_sweep.py --prefill-configs; docs/benchmarks.md, ATTENTION, session 17), us, masked ->
# unmasked: fp16 542 -> 396 (254 -> 347 TFLOP/s; SDPA flash 264 us), int8 850 -> 697, int4 857 -> 661; batch-1 TTFT
# of a 4,096-token prompt (synthetic Llama-3-8B, int8 KV) 96.0-96.4 -> 90.5-91.2 ms. False: every tile masked, as
# before (for A/B timing).
UNMASKED_TILES = True


def _config(device: torch.device, head_dim: int) -> tuple[int, int, int, int]:
    if device.type != "cuda":
        return _CPU_CONFIG
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return _GPU_CONFIG[bucket]


def pick_block_m(max_q_len: int, heads: int, batch: int, block_m: int, sm_count: int) -> int:
    """Query rows per program. A short chunk over a long cached prefix (a chat turn's new message)
    has too few query tiles to fill the GPU (33 rows x 32 heads: 32 programs of 64 rows for 132 SMs),
    so the tile halves, down to tl.dot's 16, while there are fewer than 2 programs per SM."""
    while block_m > 16 and cdiv(max_q_len, block_m) * heads * batch < 2 * sm_count:
        block_m //= 2
    return block_m


def prefill_attention(q: torch.Tensor, cache: PagedKV, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, max_q_len: int | None = None, sm_scale: float | None = None,
                      out: torch.Tensor | None = None, tiles: torch.Tensor | None = None,
                      block_m: int | None = None, k_new: torch.Tensor | None = None,
                      v_new: torch.Tensor | None = None, has_prefix: bool = True) -> torch.Tensor:
    """q [T, H, D] packed new tokens (already written to the cache) -> out [T, H, D].

    cu_seqlens_q [B+1] int32 (row offsets of each sequence in q), seq_lens [B] int32 (cache
    tokens per sequence, prefix + new), block_tables [B, max_blocks] int32. `max_q_len` (host
    int) avoids a device sync. `tiles` [n, 2] int32 with `block_m` (a power of two, 16 or more): the
    (sequence, query tile of block_m rows) of each of the launch's n programs per head, covering every
    query row once; spare entries name a tile past their sequence's rows (see `tile_map`).

    `k_new`, `v_new` [T, H_kv, D] in q's dtype, rows aligned with q's: the new tokens' keys and values as the
    cache holds them (`write_kv(..., write_back=True)` leaves them so). Then each sequence's own chunk is attended
    from them, in float form, and only its cached prefix through the (quantized) cache: the same attention, at
    the float cache's speed for the chunk (two launches: the prefixes, then the chunks, merged with the first
    launch's output, max and sum). Without them every key is read from the cache.
    `has_prefix` False (with k_new / v_new): the caller knows that no sequence has a cached prefix (seq_lens equal
    the chunk lengths): the second launch is left out.
    """
    G = check_query_for_cache(q, cache)
    if q.dim() != 3:
        raise ShapeError(f"q must be [T, H, D], got {tuple(q.shape)}")
    T, H, D = q.shape
    if (k_new is None) != (v_new is None):
        raise ShapeError("k_new and v_new come together: give both or neither")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x is not None and (x.shape != (T, cache.num_kv_heads, D) or x.dtype != q.dtype or x.device != q.device
                              or x.stride(-1) != 1):
            raise ShapeError(f"{name} must be [{T}, {cache.num_kv_heads}, {D}] {q.dtype} on {q.device}, contiguous "
                             f"along the head dimension, got {x.dtype} {tuple(x.shape)} on {x.device}")
    B = seq_lens.shape[0]
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ShapeError(f"seq_lens must be int32 [B], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if cu_seqlens_q.shape != (B + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ShapeError(f"cu_seqlens_q must be int32 [{B + 1}], got {cu_seqlens_q.dtype} "
                         f"{tuple(cu_seqlens_q.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype != torch.int32 \
            or block_tables.stride(1) != 1:
        raise ShapeError(f"block_tables must be int32 [{B}, max_blocks] with contiguous rows, got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or B == 0 or max_q_len == 0:
        return out
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    config_m, block_n, num_warps, num_stages = _config(q.device, D)
    if tiles is not None:
        if tiles.dim() != 2 or tiles.shape[1] != 2 or tiles.dtype != torch.int32 or block_m is None \
                or block_m < 16 or block_m & (block_m - 1):
            raise ShapeError(f"tiles must be int32 [n, 2] with block_m a power of two >= 16, got {tiles.dtype} "
                             f"{tuple(tiles.shape)} and block_m {block_m}")
    else:
        block_m = config_m
        if q.device.type == "cuda":
            block_m = pick_block_m(max_q_len, H, B, block_m, cuda_sm_count(q.device))
    block_n = min(block_n, cache.block_size)  # a tile never straddles two blocks
    half = D // 2
    ks, vs = cache.scale_words()
    grid = (tiles.shape[0], H, 1) if tiles is not None else (cdiv(max_q_len, block_m), H, B)
    fresh = k_new is not None
    kn, vn = (k_new, v_new) if fresh else (q, q)
    # the prefix launch's max and sum per row and head, [T, H, 2], in a buffer kept per stream (not one per layer)
    lse = stream_buffer(_STATES, q.device, 2 * T * H, torch.float32) if fresh and has_prefix else None
    # chunk rows' offsets are int32 unless they can reach 2^31 elements
    off64 = needs_off64(cache) or (fresh and (T + block_m) * max(kn.stride(0), vn.stride(0)) >= 2**31)
    # fresh: (has_prefix) the cached prefixes, then the chunks from k_new / v_new, merged with them; one kernel
    # doing both ran its chunk loop 1.5x slower than alone (H100, docs/benchmarks.md, ATTENTION, session 18)
    for mode in ((2, 1) if has_prefix else (1,)) if fresh else (0,):
        _PREFILL[grid](
            q, cache.k, cache.v, ks, vs, block_tables, cu_seqlens_q, seq_lens, out,
            tiles if tiles is not None else out, kn, vn, out if lse is None else lse, sm_scale * math.log2(math.e),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            cache.k.stride(0), cache.k.stride(1), cache.k.stride(2), cache.v.stride(0), cache.v.stride(1),
            ks.stride(0), ks.stride(1), block_tables.stride(0),
            kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), 2 * H,
            GROUP=G, HALF=half, BLOCK_DH=max(16, next_pow2(half)),
            BLOCK_M=block_m, BLOCK_N=block_n, PAGE=cache.block_size, KV_MODE=KV_MODE[cache.kv_dtype],
            OFF64=off64, ASM=use_asm(q), RAW=raw_codes(q, cache), SCALE_P=scale_probs(cache),
            TILED=tiles is not None, UNMASKED=UNMASKED_TILES, MODE=mode, MERGE=mode == 1 and lse is not None,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


def graph_block_m(device: torch.device, head_dim: int) -> int:
    """Query rows per tile of a launch planned once for any step (a CUDA graph's): the config's."""
    return _config(device, head_dim)[0]


SPARE_TILE = 1 << 20  # a query tile index past any sequence's rows: its programs exit at once


def tile_map(q_lens: list[int], block_m: int, n: int) -> list[int]:
    """The flat (sequence, query tile) pairs of sequences of `q_lens` rows in tiles of `block_m`, then spare
    pairs up to `n` (the launch's programs per head; at least sum(ceil(q_len / block_m)))."""
    pairs = [v for b, ql in enumerate(q_lens) for m in range(-(-ql // block_m)) for v in (b, m)]
    if len(pairs) > 2 * n:
        raise ShapeError(f"{len(pairs) // 2} query tiles do not fit a launch of {n} programs per head")
    return pairs + [0, SPARE_TILE] * (n - len(pairs) // 2)


def max_tiles(rows: int, seqs: int, block_m: int) -> int:
    """Most query tiles `rows` rows over at most `seqs` sequences can make: each sequence adds at most one
    partial tile."""
    return -(-rows // block_m) + seqs - 1


def prefill_attention_ref(q: torch.Tensor, cache: PagedKV, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch: per sequence, causal fp32 attention of its new rows over the dequantized cache."""
    _, H, D = q.shape
    G = H // cache.num_kv_heads
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(seq_lens.shape[0]):
        t0, t1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        L = int(seq_lens[b])
        k, v = gather_kv_ref(cache, block_tables[b], L)  # [L, H_kv, D] fp32
        k = k.repeat_interleave(G, dim=1)  # [L, H, D]
        v = v.repeat_interleave(G, dim=1)
        pos = torch.arange(L - (t1 - t0), L, device=q.device)  # [n] positions of the new rows
        s = torch.einsum("nhd,lhd->hnl", q[t0:t1].float(), k) * sm_scale  # [H, n, L]
        causal = torch.arange(L, device=q.device)[None, :] <= pos[:, None]  # [n, L]
        s = s.masked_fill(~causal, float("-inf"))
        out[t0:t1] = torch.einsum("hnl,lhd->nhd", s.softmax(-1), v).to(q.dtype)
    return out
