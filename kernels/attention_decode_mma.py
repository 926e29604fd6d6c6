"""int4 decode attention with the codes read straight in tensor-core operand layouts (Gluon).

Same function, cache layout and split outputs as the split kernel of `attention_decode` (its module
docstring): program (split, kv head, b) attends the G query heads of one group over one split of the
sequence and writes the normalized partial output and log2-sum-exp per head, or the output itself
when there is one split. `attention_decode.decode_attention` launches this kernel (`supported`: int4
caches with fp16 queries on Hopper, head dims 64..128 that are multiples of 8, tiles of 64 or 128
tokens; measured on an H100 and an H200) and its merge kernel after it; `decode_attention_ref` is the
plain-PyTorch twin of both.

Why a second kernel: the Triton kernel is bound by instruction issue on int4 (34.1 warp instructions per
token and KV head, offline SASS, `benchmarks/sass_attention.py`): its K and V tiles are converted in
registers into the layouts its dots want, and its online softmax runs across the warps. Here 16.8, in
128 registers at head dims 72-88 and 128 with groups up to 8 (four programs per SM; 164 at head dims 96-120,
254-255 for groups of 9-16):

- **Products transposed, tokens on the MMA rows.** Scores^T = K q^T: each warp's TPW tokens are the
  16-row dimension of `mma_v2` (m16n8k16) and the group's query heads its HN = 8 columns (16 for groups
  above 8), not 16 rows of which GQA fills 4; the values likewise, O^T = V^T (p s)^T with head dims on
  the rows. That halves the HMMAs, accumulators and softmax work of the other orientation (heads on the
  rows: 23.3 instructions per token and KV head, 255 registers, two programs per SM; H100, us, B=64
  4k / 16k / 32k 122.2 / 435.0 / 854.0 -> 111.2 / 408.1 / 811.3, B=8 32k 119.7 -> 112.8 at each one's best
  split count: benchmarks/results/2026-11-24-session20-h100/t-first/sweep.log).
- **Codes straight into operand registers.** A 2-stage cp.async ring (`STAGES`) brings each tile's codes and
  scale words into shared memory; from there K is read in the score product's A-operand layout (k_width 8:
  each thread's 8 head-dim bytes of one token are contiguous, one 8-byte read) and V^T in the value
  product's A-operand layout (k_width 4: runs of 4 tokens, `PV_KW`). The codes are never rearranged
  for the matrix unit; only the probabilities change layout (a transpose inside each warp: stmatrix,
  then ldmatrix.trans, no block barrier).
- **Codes as fp16 subnormals.** A code c in a 16-bit lane, `(x & 0x000F)` read as fp16, is exactly
  c * 2^-24 (`(x & 0x00F0)`: 16 c * 2^-24); the matrix unit multiplies fp16 subnormals exactly and
  accumulates in fp32, and the 2^24 (2^20) comes back once per score or output element, in fp32. So a
  code costs one mask, no offset arithmetic.
- **Scales on the scores and on the probabilities.** Per token, q . (c s + z) = s (q . c) + z sum(q)
  on the score tile; sum_t p_t (c_t s_t + z_t) = (p s) @ c + sum_t p_t z_t for the values. With exact
  codes the second form loses nothing (the Triton kernel's raw 1024 + c codes did).
- **Warps split the tile's tokens.** The tile [4 warps x TPW tokens] is a batch of 4 products (a
  3-d `mma_v2`), so each warp keeps its own running max, sum and output columns and no value crosses
  warps inside the loop; the 4 partial results are merged once, at the end.

The interpreter cannot run Gluon: tested on the GPU against the reference (tests/test_attention.py),
compiled offline for sm_80 and sm_90 in CI (tests/test_gemm_compile.py).
"""

from __future__ import annotations

import functools

import torch
from lmq.kernels import cuda_capability, next_pow2
from lmq.kernels.gluon_build import BuildGuard, KernelUnavailable, gdc_wait  # noqa: F401 (KernelUnavailable: callers catch it here)
from lmq.kernels.launch import DirectLaunch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

NUM_WARPS = 4  # a tile of BLOCK_N tokens (the split plan's tile, <= the block size) is 4 warps x BLOCK_N / 4
TILES = (64, 128)  # 16 or 32 tokens per warp; smaller blocks take the Triton kernel
MIN_HEAD_DIM, MAX_HEAD_DIM = 64, 128  # and multiples of 8: K rows of D / 2 bytes copy in 4-byte pieces or wider


@gluon.jit
def _ids3(n0: gl.constexpr, n1: gl.constexpr, n2: gl.constexpr, layout: gl.constexpr):
    """Broadcastable indices [n0, 1, 1], [1, n1, 1], [1, 1, n2] of a 3-d tensor in `layout`."""
    i0 = gl.arange(0, n0, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    i1 = gl.arange(0, n1, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    i2 = gl.arange(0, n2, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    return (gl.expand_dims(gl.expand_dims(i0, 1), 2), gl.expand_dims(gl.expand_dims(i1, 0), 2),
            gl.expand_dims(gl.expand_dims(i2, 0), 1))


# Four bytes -> their low nibbles ($0, $1) and high nibbles ($2, $3) as fp16 pairs: spread the bytes
# to one per 16-bit lane (prmt), then mask: the 16-bit patterns c and 16 c are the fp16 subnormals
# c * 2^-24 and 16 c * 2^-24. Six instructions for eight codes.
_ASM_SUBNORMAL = gl.constexpr("""{
.reg .b32 x, y;
prmt.b32 x, $4, 0, 0x4140;
prmt.b32 y, $4, 0, 0x4342;
and.b32 $0, x, 0x000F000F;
and.b32 $1, y, 0x000F000F;
and.b32 $2, x, 0x00F000F0;
and.b32 $3, y, 0x00F000F0;
}""")


@gluon.jit
def _subnormal_halves(c):
    """uint8 codes -> (low nibbles, high nibbles) as fp16 c * 2^-24 and 16 c * 2^-24, exact."""
    return gl.inline_asm_elementwise(_ASM_SUBNORMAL, "=r,=r,=r,=r,r", [c], dtype=(gl.float16, gl.float16),
                                     is_pure=True, pack=4)


@gluon.jit
def _scale_zero(w):
    """int32 words holding fp16 (scale, zero) -> (scale, zero) fp32."""
    s = (w & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    z = (w >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    return s, z


@gluon.jit
def _copy_tile(kc_ptr, vc_ptr, ks_ptr, vs_ptr, k_buf, v_buf, ks_buf, vs_buf, page, n0, end, hkv,
               k_off, k_dmask, v_off, v_dmask, s_off, stride_cb, stride_ch, stride_vb, stride_vh,
               stride_sb, stride_sh, HALF: gl.constexpr, PAGE: gl.constexpr, BLOCK_N: gl.constexpr,
               OFF64: gl.constexpr):
    """Start copying the tile of tokens n0 .. n0 + BLOCK_N (inside block `page`) into one pipeline stage:
    K codes, V codes and the K and V (scale, zero) words (cp.async, one commit group); zeros when n0 >= end.
    The copies are not masked along the tokens: a tile never straddles a block, so tokens past the end still
    read inside it (their codes meet a masked score or a zero probability; the caller zeroes their V scale
    words, stale bytes may read as NaN)."""
    live = n0 < end
    if OFF64:
        page = page.to(gl.int64)
    slot0 = gl.multiple_of(n0 % PAGE, BLOCK_N)  # tiles start at multiples of BLOCK_N
    async_copy.async_copy_global_to_shared(
        k_buf, kc_ptr + (page * stride_cb + hkv * stride_ch + slot0 * HALF) + k_off, mask=k_dmask & live)
    async_copy.async_copy_global_to_shared(
        v_buf, vc_ptr + (page * stride_vb + hkv * stride_vh + slot0) + v_off, mask=v_dmask & live)
    srow = page * stride_sb + hkv * stride_sh + slot0
    async_copy.async_copy_global_to_shared(ks_buf, ks_ptr + srow + s_off, mask=live & (s_off >= 0))
    async_copy.async_copy_global_to_shared(vs_buf, vs_ptr + srow + s_off, mask=live & (s_off >= 0))
    async_copy.commit_group()


@gluon.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, o_ptr, po_ptr, plse_ptr,
    qk_scale, split_len,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cb, stride_ch, stride_vb, stride_vh, stride_sb, stride_sh, stride_btb,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: gl.constexpr, HN: gl.constexpr, HALF: gl.constexpr, BLOCK_DH: gl.constexpr, PAGE: gl.constexpr,
    TPW: gl.constexpr, STAGES: gl.constexpr, PV_KW: gl.constexpr, DIRECT: gl.constexpr, OFF64: gl.constexpr,
    PDL: gl.constexpr, BALANCED: gl.constexpr, PAD: gl.constexpr,
):
    NW: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = NW * TPW
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
    a_qk: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_qk: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    a_pv: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=PV_KW)
    b_pv: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=PV_KW)
    heads_l: gl.constexpr = gl.SliceLayout(1, mma)  # [NW, HN]: per warp, per query head
    toks_l: gl.constexpr = gl.SliceLayout(2, mma)  # [NW, TPW]: per warp, per token

    if PDL:
        # launched early (programmatic dependent launch): wait for the previous kernel's writes (q, the
        # new token's K/V) before the first read
        gdc_wait()
    split = gl.program_id(0)
    hkv = gl.program_id(1)
    b = gl.program_id(2)
    seq_len = gl.load(lens_ptr + b)
    if BALANCED:  # this sequence's tokens over all the launch's splits (attention_decode.balanced_split_len)
        split_len = gl.maximum(gl.cdiv(gl.cdiv(seq_len, gl.num_programs(0)), NW * TPW), 1) * (NW * TPW)
    start = split * split_len
    if start < seq_len:
        end = gl.minimum(start + split_len, seq_len)
        # -- the group's query heads as the B operand of the score product, the same in every warp:
        #    [NW, BLOCK_DH, HN] per half, the high half / 16 (its codes read 16 c)
        qw, qd, qh = _ids3(NW, BLOCK_DH, HN, b_qk)
        qmask = (qh < GROUP) & (qd < HALF) & (qw >= 0)
        q_ptrs = q_ptr + b * stride_qb + (hkv * GROUP + qh) * stride_qh + qd + qw * 0
        q_lo = gl.load(q_ptrs, mask=qmask, other=0.0)
        q_hi = gl.load(q_ptrs + HALF, mask=qmask, other=0.0)
        qsum = gl.convert_layout(gl.sum(q_lo.to(gl.float32) + q_hi.to(gl.float32), 1), heads_l)  # [NW, HN]
        q_hi = q_hi * 0.0625  # exact unless |q| < 2^-10 (then an fp16 subnormal, a negligible term)

        # -- shared-memory rings, STAGES tiles deep, and the copies' index tensors (up to 16 bytes a thread)
        k_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, NW, TPW, BLOCK_DH],
                                           gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[2, 1, 0]))
        v_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, NW, BLOCK_DH, TPW],
                                           gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0]))
        if PAD > 0:  # shared memory held and not used: fewer programs resident per SM (`launch_split`)
            pad = gl.allocate_shared_memory(gl.int32, [PAD // 4],  # a power of two
                                            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        ks_ring = gl.allocate_shared_memory(gl.int32, [STAGES, NW, TPW],
                                            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
        vs_ring = gl.allocate_shared_memory(gl.int32, [STAGES, NW, TPW],
                                            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
        kcp: gl.constexpr = gl.BlockedLayout([1, 1, 16], [1, 512 // BLOCK_DH, BLOCK_DH // 16], [NW, 1, 1],
                                             [2, 1, 0])  # [NW, TPW, BLOCK_DH], head-dim bytes fastest
        vcp: gl.constexpr = gl.BlockedLayout([1, 1, 16], [1, 512 // TPW, TPW // 16], [NW, 1, 1],
                                             [2, 1, 0])  # [NW, BLOCK_DH, TPW], tokens fastest
        scp: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NW, 1], [1, 0])  # [NW, TPW] words, a warp's row each
        kw, kt, kd = _ids3(NW, TPW, BLOCK_DH, kcp)
        k_off = (kw * TPW + kt) * HALF + kd  # token-major rows of HALF bytes
        k_dmask = (kd < HALF) & (kw >= 0) & (kt >= 0)
        vw, vd, vt = _ids3(NW, BLOCK_DH, TPW, vcp)
        v_off = vd * PAGE + vw * TPW + vt  # V^T rows: PAGE tokens per head-dim byte
        v_dmask = (vd < HALF) & (vw >= 0) & (vt >= 0)
        sw = gl.expand_dims(gl.arange(0, NW, layout=gl.SliceLayout(1, scp)), 1)
        st = gl.expand_dims(gl.arange(0, TPW, layout=gl.SliceLayout(0, scp)), 0)
        s_off = sw * TPW + st
        tw = gl.expand_dims(gl.arange(0, NW, layout=gl.SliceLayout(1, toks_l)), 1)
        tt = gl.expand_dims(gl.arange(0, TPW, layout=gl.SliceLayout(0, toks_l)), 0)
        t_off = tw * TPW + tt  # [NW, TPW] token within the tile, in the score layout

        m_i = gl.full([NW, HN], float("-inf"), gl.float32, heads_l)
        l_i = gl.zeros([NW, HN], gl.float32, heads_l)
        pz_i = gl.zeros([NW, HN], gl.float32, heads_l)
        o_lo = gl.zeros([NW, BLOCK_DH, HN], gl.float32, mma)
        o_hi = gl.zeros([NW, BLOCK_DH, HN], gl.float32, mma)
        bt_row = bt_ptr + b.to(gl.int64) * stride_btb
        for i in gl.static_range(STAGES - 1):  # prologue: the first STAGES - 1 tiles in flight
            n_i = start + i * BLOCK_N
            _copy_tile(kc_ptr, vc_ptr, ks_ptr, vs_ptr, k_ring.index(i), v_ring.index(i), ks_ring.index(i),
                       vs_ring.index(i), gl.load(bt_row + n_i // PAGE, mask=n_i < end, other=0), n_i, end, hkv,
                       k_off, k_dmask, v_off, v_dmask, s_off, stride_cb, stride_ch, stride_vb, stride_vh,
                       stride_sb, stride_sh, HALF, PAGE, BLOCK_N, OFF64)
        # the block id of the next tile to copy is read one iteration ahead: a load whose result is needed
        # at once would stall every iteration on the memory latency
        n_next = start + (STAGES - 1) * BLOCK_N
        page_next = gl.load(bt_row + n_next // PAGE, mask=n_next < end, other=0)
        it = 0
        for n0 in range(start, end, BLOCK_N):
            n_valid = end - n0  # tokens of this tile inside the split
            # tile `it` has landed (this thread's copies, then everyone's), and every warp is done with
            # the stage the next copy overwrites (read in the previous iteration)
            async_copy.wait_group(STAGES - 2)
            gl.thread_barrier()
            nxt = (it + STAGES - 1) % STAGES
            _copy_tile(kc_ptr, vc_ptr, ks_ptr, vs_ptr, k_ring.index(nxt), v_ring.index(nxt), ks_ring.index(nxt),
                       vs_ring.index(nxt), page_next, n0 + (STAGES - 1) * BLOCK_N, end, hkv, k_off, k_dmask, v_off,
                       v_dmask, s_off, stride_cb, stride_ch, stride_vb, stride_vh, stride_sb, stride_sh, HALF,
                       PAGE, BLOCK_N, OFF64)
            n_next = n0 + STAGES * BLOCK_N
            page_next = gl.load(bt_row + n_next // PAGE, mask=n_next < end, other=0)
            cur = it % STAGES
            it += 1  # noqa: SIM113 (a Gluon loop has no enumerate)
            # -- scores^T: [NW, TPW, HN], each warp's tokens on the MMA rows
            k_lo, k_hi = _subnormal_halves(k_ring.index(cur).load(a_qk))
            # the head dim's halves as two independent chains of HMMAs, added after: half the dependent chain
            # of one accumulation
            s = (mma_v2(k_lo, q_lo, gl.zeros([NW, TPW, HN], gl.float32, mma))
                 + mma_v2(k_hi, q_hi, gl.zeros([NW, TPW, HN], gl.float32, mma)))
            tmask = t_off < n_valid
            k_s, k_z = _scale_zero(ks_ring.index(cur).load(toks_l))
            v_s, v_z = _scale_zero(vs_ring.index(cur).load(toks_l))
            v_s = gl.where(tmask, v_s, 0.0)
            v_z = gl.where(tmask, v_z, 0.0)
            k_s = k_s * (qk_scale * 16777216.0)  # 2^24: the codes' subnormal scale
            k_z = k_z * qk_scale
            s = s * gl.expand_dims(k_s, 2) + gl.expand_dims(qsum, 1) * gl.expand_dims(k_z, 2)
            s = gl.where(gl.expand_dims(tmask, 2), s, float("-inf"))
            # -- online softmax per warp and head (log2 domain); a warp whose tokens are all past the
            #    end keeps its state (its max stays -inf: no NaN from -inf - -inf)
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - gl.expand_dims(m_use, 1))  # [NW, TPW, HN]
            l_i = l_i * alpha + gl.sum(p, 1)
            pz_i = pz_i * alpha + gl.sum(p * gl.expand_dims(v_z, 2), 1)
            # (p s)^T as the B operand of the value product: a transpose inside each warp
            pt = gl.convert_layout((p * gl.expand_dims(v_s, 2)).to(gl.float16), b_pv)
            m_i = m_new
            # -- values^T: codes^T @ (p s)^T, per half: [NW, BLOCK_DH, HN]
            v_lo, v_hi = _subnormal_halves(v_ring.index(cur).load(a_pv))
            # each tile's product starts from zero and is added in fp32 (an FFMA with the rescale): fed
            # the running sums as its accumulator, the matrix unit's adder lost precision over long splits
            # (relative error 4.0e-3 over 32k tokens in one split, 5.9-6.7e-4 in 8k splits)
            a3 = gl.expand_dims(alpha, 1)
            o_lo = o_lo * a3 + mma_v2(v_lo, pt, gl.zeros([NW, BLOCK_DH, HN], gl.float32, mma))
            o_hi = o_hi * a3 + mma_v2(v_hi, pt, gl.zeros([NW, BLOCK_DH, HN], gl.float32, mma))
        async_copy.wait_group(0)  # no copy may outlive the program

        # -- merge the warps' partial results, then normalize: [BLOCK_DH, HN]
        m = gl.max(m_i, 0)  # [HN]
        f = gl.exp2(m_i - gl.expand_dims(gl.where(m == float("-inf"), 0.0, m), 0))  # [NW, HN]
        l_col = gl.sum(l_i * f, 0)
        pz = gl.sum(pz_i * f, 0)
        f3 = gl.expand_dims(f, 1)
        out_lo = gl.sum(o_lo * f3, 0) * 16777216.0  # 2^24
        out_hi = gl.sum(o_hi * f3, 0) * 1048576.0  # 2^20: the high codes read 16 c
        ol: gl.constexpr = gl.SliceLayout(0, mma)  # [BLOCK_DH, HN]
        pz2 = gl.expand_dims(gl.convert_layout(pz, gl.SliceLayout(0, ol)), 0)
        inv_l = gl.expand_dims(gl.convert_layout(1.0 / l_col, gl.SliceLayout(0, ol)), 0)
        out_lo = (out_lo + pz2) * inv_l
        out_hi = (out_hi + pz2) * inv_l
        orow = gl.expand_dims(gl.arange(0, BLOCK_DH, layout=gl.SliceLayout(1, ol)), 1)  # head dim
        ocol = gl.expand_dims(gl.arange(0, HN, layout=gl.SliceLayout(0, ol)), 0)  # query head of the group
        omask = (ocol < GROUP) & (orow < HALF)
        heads = hkv * GROUP + ocol
        if DIRECT:
            o_ptrs = o_ptr + b * stride_ob + heads * stride_oh + orow
            gl.store(o_ptrs, out_lo.to(o_ptr.dtype.element_ty), mask=omask)
            gl.store(o_ptrs + HALF, out_hi.to(o_ptr.dtype.element_ty), mask=omask)
        else:
            p_ptrs = po_ptr + b * stride_pb + heads * stride_ph + split * stride_ps + orow
            gl.store(p_ptrs, out_lo, mask=omask)
            gl.store(p_ptrs + HALF, out_hi, mask=omask)
            lcol = gl.arange(0, HN, layout=gl.SliceLayout(0, heads_l))
            gl.store(plse_ptr + b * stride_lb + (hkv * GROUP + lcol) * stride_lh + split,
                     m + gl.log2(l_col), mask=lcol < GROUP)
        if PAD > 0:  # noqa: SIM102 (a compile-time branch: `pad` exists only under it)
            if seq_len < 0:  # never: a use at the end, so no other buffer reuses the pad's bytes
                pad.slice(0, 32 * NW).store(gl.zeros([32 * NW], gl.int32, gl.BlockedLayout([1], [32], [NW], [0])))


def supported(q: torch.Tensor, kv_dtype: str, block_n: int, head_dim: int, group: int) -> bool:
    """Whether this kernel serves a launch: int4 cache, fp16 queries on Hopper (measured on an H100 and an H200; it
    compiles for sm_80 too, but Ampere and Ada are unmeasured), head dims 64..128 that are multiples of 8,
    tiles of 64 or 128 tokens (`block_n`, the split plan's tile: 16 or 32 per warp), at most 16 query heads
    per KV head."""
    return (kv_dtype == "int4" and q.is_cuda and q.dtype == torch.float16 and torch.version.hip is None
            and cuda_capability(q.device)[0] == 9 and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM
            and head_dim % 8 == 0 and block_n in TILES and group <= 16)


# Tiles in flight per program (shared-memory ring): two, i.e. the next tile's copy runs while this one is
# computed. H100, int4, us, at each shape's best split count, 2 / 3 / 4 stages (benchmarks/attention_sweep.py
# --mma-splits --stages 2,3,4; benchmarks/results/2026-11-24-session20-h100/t-stages/sweep.log; before the
# residency cap below): B=1 16k 17.4 / 18.7 / 18.0, 32k 23.9 / 25.7 / 25.5; B=4 16k 39.5 / 42.0 / 40.9; B=8 4k 25.4 /
# 27.8 / 27.0, 16k 64.0 / 66.7 / 65.8, 32k 113.2 / 116.1 / 115.2. Deeper rings help only at split counts below
# the best (B=8 16k, 4 splits: 83.3 / 89.9 / 72.2), where few programs per SM each need more bytes in flight.
# With the cap, at the plan's split counts (stages-capped/sweep.log): B=8 4k 21.9 / 23.2 / 23.9, 16k 60.0 / 61.0 /
# 62.2; B=4 16k 34.8 / 36.1 / 37.0.
STAGES = 2
# A register cap (for sweeps; None: ptxas's choice: 126-128 at head dim 128, four programs per SM).
MAXNREG = None
# Programs resident per SM. The block scheduler fills an SM up to the kernel's occupancy (four programs at 128
# registers) before it uses the next, so a launch of P <= 2 x SMs programs ran four to an SM on a quarter of the
# SMs, each SM's programs sharing its bandwidth. Shared memory held beyond the rings (`residency_pad`) caps the
# programs per SM at ceil(P / SMs), which spreads them over every SM. H100, int4, us, each shape's best split
# count without the cap -> with it (attention_sweep.py --mma-splits --pads 0,32768,65536,131072;
# benchmarks/results/2026-11-24-session20-h100/pad-call/sweep.log): B=8 4k 26.0 (8 splits) -> 22.3 (4 splits, two
# per SM), 16k 64.6 -> 60.9, 32k 114.1 -> 109.9; B=1 16k 17.6 (22) -> 15.5 (16 splits, one per SM) or 16.0 (32,
# two per SM), 32k 24.1 (24) -> 22.1 (32, two per SM).
SMEM_PER_SM, SMEM_RESERVED = 228 * 1024, 1024  # Hopper: shared memory per SM, and what the system holds per block
MAX_PER_SM = 4  # by registers: 128 threads x 128 registers (head dims 72-88 and 128, groups up to 8)
PAD_BYTES = None  # None: `residency_pad`; an int forces that pad (sweeps)


def head_columns(group: int) -> int:
    """HN: the MMA columns the group's query heads take (8, or 16 for groups above 8)."""
    return max(8, next_pow2(group))


def ring_bytes(head_dim: int, block_n: int, group: int) -> int:
    """Shared memory one program of the kernel takes without a pad: its rings and the probabilities' transpose
    (block_n x HN fp16; checked against the compiler's count in tests/test_gemm_compile.py)."""
    tile = block_n * next_pow2(head_dim // 2)
    return STAGES * (2 * tile + 2 * 4 * block_n) + block_n * head_columns(group) * 2


def programs_per_sm(base: int, pad: int = 0) -> int:
    """Programs of `base` + `pad` bytes of shared memory that fit on one SM (at most MAX_PER_SM)."""
    return min(MAX_PER_SM, SMEM_PER_SM // (base + pad + SMEM_RESERVED))


@functools.cache  # the same few launches every decode step: no arithmetic per call
def residency_pad(programs: int, sm_count: int, base: int) -> int:
    """Bytes of shared memory (0 or a power of two) to hold beyond `base` per program so that at most
    ceil(programs / sm_count) programs stay resident per SM, and never fewer (see above). Exact at head dim 128
    with 128-token tiles, the measured shape. Elsewhere it is approximate:
    - The pads are powers of two, so with 64-token tiles or at head dim 64 three wanted leaves four resident.
    - Registers allow other counts than MAX_PER_SM: five at head dim 64 with 64-token tiles (four wanted: no pad,
      five resident); three at head dims 96-120 and two for groups of 9-16, where registers, not the pad, are
      then the tighter cap."""
    want = -(-programs // sm_count)
    pad = 0
    for p in (8192, 16384, 32768, 65536, 131072):
        if programs_per_sm(base, p) < want:
            break
        pad = p
    return pad if want < MAX_PER_SM else 0


PV_KW = 4  # k_width of the value product's operands: runs of 4 tokens (4-byte V^T loads)
_SPLIT = DirectLaunch(_decode_split_kernel)  # lmq.kernels.launch
BUILD = BuildGuard("the int4 decode-attention kernel (attention_decode_mma)",
                   "int4 caches take the Triton split kernel")


def launch_split(q: torch.Tensor, cache, ks: torch.Tensor, vs: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, out: torch.Tensor, po: torch.Tensor, plse: torch.Tensor, qk_scale: float,
                 split_len: int, n_splits: int, block_n: int, group: int, direct: bool, off64: bool,
                 pdl: bool, ps: tuple, ls: tuple, *, balanced: bool, sm_count: int) -> None:
    """The split pass of `attention_decode.decode_attention` for an int4 cache (`supported` said yes): same
    arguments and outputs as its Triton split kernel, programs spread over `sm_count` SMs (`residency_pad`).
    Raises KernelUnavailable if this Triton cannot build the kernel (warned once)."""
    BUILD.check()
    B, _, D = q.shape
    half = D // 2
    programs = n_splits * cache.num_kv_heads * B
    pad = residency_pad(programs, sm_count, ring_bytes(D, block_n, group)) if PAD_BYTES is None else PAD_BYTES
    BUILD.launch(lambda: _SPLIT[(n_splits, cache.num_kv_heads, B)](
        q, cache.k, cache.v, ks, vs, block_tables, seq_lens, out, po, plse, qk_scale, split_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache.k.stride(0), cache.k.stride(1), cache.v.stride(0), cache.v.stride(1),
        ks.stride(0), ks.stride(1), block_tables.stride(0), *ps, *ls,
        GROUP=group, HN=head_columns(group), HALF=half, BLOCK_DH=next_pow2(half), PAGE=cache.block_size,
        TPW=block_n // NUM_WARPS, STAGES=STAGES, PV_KW=PV_KW, DIRECT=direct, OFF64=off64, PDL=pdl,
        BALANCED=balanced,
        PAD=pad, num_warps=NUM_WARPS, launch_pdl=pdl, **({"maxnreg": MAXNREG} if MAXNREG else {}),
    ))
