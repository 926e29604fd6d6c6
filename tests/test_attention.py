"""Paged KV write path, decode and prefill attention against their plain-PyTorch twins.

CPU runs use the Triton interpreter (tests/conftest.py); bf16 and long sequences run on GPU only.
"""

from __future__ import annotations

import math

import lmq.kernels.attention_decode as dec
import lmq.kernels.kv_quant as kvq
import pytest
import torch
from lmq.kernels.attention_decode import (
    balanced_split_len,
    decode_attention,
    decode_attention_ref,
)
from lmq.kernels.attention_prefill import (
    pick_block_m,
    prefill_attention,
    prefill_attention_ref,
)
from lmq.kernels.kv_quant import (
    PagedKV,
    fake_quantize_kv,
    gather_kv_ref,
    quantize_kv_ref,
    write_kv,
    write_kv_ref,
)

from lmq.errors import ShapeError

# relative error ||out - ref|| / ||ref|| allowed, per KV dtype (the ref runs fp32 on the same cache)
TOL = {"fp16": 3e-3, "bf16": 2e-2, "int8": 5e-3, "int4": 5e-3}
CPU_KV = ["fp16", "int8", "int4"]
HEAD_DIMS = [64, 80, 96, 128, 256]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def act_dtype(kv_dtype: str) -> torch.dtype:
    return torch.bfloat16 if kv_dtype == "bf16" else torch.float16


def make_paged(kv_dtype, lens, num_kv_heads, head_dim, device, block_size=16, shared_blocks=0, seed=0):
    """A poisoned pool holding random K/V for sequences of `lens` tokens in shuffled blocks.

    Sequences 1.. reuse the first `shared_blocks` blocks of sequence 0 (a shared prefix, written
    once). Returns cache, block_tables [B, max_blocks] int32 (padding -1), seq_lens int32, and the
    raw K/V per sequence ([L, H_kv, D] each, what was written).
    """
    g = torch.Generator().manual_seed(seed)
    dtype = act_dtype(kv_dtype)
    assert all(L >= shared_blocks * block_size for L in lens[1:]), "a shared prefix needs full blocks"
    n_own = [-(-L // block_size) - (shared_blocks if b else 0) for b, L in enumerate(lens)]
    total = sum(n_own) + 3
    perm = torch.randperm(total, generator=g).tolist()
    cache = PagedKV.allocate(total, block_size, num_kv_heads, head_dim, kv_dtype, device)
    # poison: whatever the kernels read without it being written shows up as garbage
    for t in (cache.k, cache.v):
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
        else:
            t.copy_(torch.full(t.shape, 1e4, dtype=t.dtype))
    for t in (cache.k_scales, cache.v_scales):
        if t is not None:
            t.copy_(torch.full(t.shape, 1e3))
    max_blocks = max(-(-L // block_size) for L in lens) + 1
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    raw = []
    pos = 0
    for b, L in enumerate(lens):
        own = perm[pos:pos + n_own[b]]
        pos += n_own[b]
        blocks = (tables[0, :shared_blocks].tolist() if b else []) + own
        tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(L, num_kv_heads, head_dim, generator=g) * 2 + torch.randn(num_kv_heads, head_dim, generator=g)
        v = torch.randn(L, num_kv_heads, head_dim, generator=g)
        first = shared_blocks * block_size if b else 0
        if b:  # the shared prefix holds sequence 0's tokens
            k[:first], v[:first] = raw[0][0][:first], raw[0][1][:first]
        raw.append((k.to(dtype), v.to(dtype)))
        tok = torch.arange(first, L)
        slots = (tables[b, tok // block_size].long() * block_size + tok % block_size)
        # the interpreter runs one program per token: on CPU fill through the (exactly equal) twin
        write = write_kv if torch.device(device).type == "cuda" else write_kv_ref
        write(k[first:].to(dtype).to(device), v[first:].to(dtype).to(device), cache, slots.to(device))
    return cache, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device), raw


# ---------------------------------------------------------------------------------------------
# write path and fake quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_write_kv_matches_ref(device, kv_dtype, head_dim):
    T, H = 19, 3
    k = (torch.randn(T, H, head_dim) * 3 + 1).half().to(device)
    v = torch.randn(T, H, head_dim).half().to(device)
    slots = torch.randperm(4 * 16)[:T].to(device)
    slots[5] = -1  # a padding token is skipped
    a = PagedKV.allocate(4, 16, H, head_dim, kv_dtype, device)
    b = PagedKV.allocate(4, 16, H, head_dim, kv_dtype, device)
    for x, y in ((a.k, b.k), (a.v, b.v), (a.k_scales, b.k_scales), (a.v_scales, b.v_scales)):
        if x is not None:
            x.zero_()
            y.zero_()
    write_kv(k, v, a, slots)
    write_kv_ref(k, v, b, slots)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    if a.k_scales is not None:
        assert torch.equal(a.k_scales, b.k_scales) and torch.equal(a.v_scales, b.v_scales)
    # what the cache holds, dequantized, is exactly fake_quantize_kv of the input
    table = torch.arange(4, dtype=torch.int32, device=device)
    kd, vd = gather_kv_ref(a, table, 64)  # [64, H, D]
    keep = slots >= 0
    assert torch.equal(kd[slots[keep]].half(), fake_quantize_kv(k[keep], kv_dtype))
    assert torch.equal(vd[slots[keep]].half(), fake_quantize_kv(v[keep], kv_dtype))
    # write_back: k and v rows become what the cache holds (a padding row stays), the same cache written
    for write, c in ((write_kv, a), (write_kv_ref, b)):
        kb, vb = k.clone(), v.clone()
        write(kb, vb, c, slots, write_back=True)
        for x, y in ((kb, k), (vb, v)):
            want = fake_quantize_kv(y[keep], kv_dtype)
            if device == "cpu" or write is write_kv_ref:
                assert torch.equal(x[keep], want)
            else:  # the kernel's c * s + z may fuse into one rounding: at most one fp16 step apart
                assert ((x[keep].float() - want.float()).abs() <= want.float().abs() * 2**-10 + 2**-24).all()
            assert torch.equal(x[5], y[5])
        assert torch.equal(c.k, b.k) and torch.equal(c.v, b.v)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_fake_quantize_error_bound(kv_dtype):
    x = torch.randn(2, 33, 4, 128) * 5 - 2  # [B, T, H, D]
    codes, scale, zero = quantize_kv_ref(x, kv_dtype)
    assert int(codes.max()) <= (255 if kv_dtype == "int8" else 15)
    y = fake_quantize_kv(x, kv_dtype)
    assert y.shape == x.shape and y.dtype == x.dtype
    # within half a step, plus the fp16 rounding of the stored zero
    bound = scale.float() / 2 + zero.float().abs() * 2.0**-11 + 1e-6
    assert ((y - x).abs() <= bound[..., None]).all()
    assert (y - x).abs().max() > 0
    const = torch.full((3, 2, 64), 0.75)  # zero range: exact, no division by zero
    assert torch.equal(fake_quantize_kv(const, kv_dtype), const)


def test_write_kv_rejects_bad_inputs(device):
    cache = PagedKV.allocate(2, 16, 2, 64, "int8", device)
    k = torch.randn(3, 2, 64, device=device).half()
    with pytest.raises(ShapeError, match="heads"):
        write_kv(torch.randn(3, 4, 64, device=device).half(), torch.randn(3, 4, 64, device=device).half(),
                 cache, torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ShapeError, match="slot_mapping"):
        write_kv(k, k, cache, torch.zeros(3, dtype=torch.float32, device=device))
    with pytest.raises(ShapeError, match="power of two"):
        PagedKV.allocate(2, 12, 2, 64, "int8", device)
    with pytest.raises(ShapeError, match=">= 16"):
        PagedKV.allocate(2, 8, 2, 64, "int8", device)
    with pytest.raises(ShapeError, match="kv_dtype"):
        PagedKV.allocate(2, 16, 2, 64, "int3", device)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------


def _check_decode(device, kv_dtype, head_dim, lens, num_heads, num_kv_heads, shared_blocks=0,
                  split_len=None, block_size=16, q_dtype=None):
    cache, tables, seq_lens, _ = make_paged(kv_dtype, lens, num_kv_heads, head_dim, device,
                                            block_size=block_size, shared_blocks=shared_blocks)
    q = torch.randn(len(lens), num_heads, head_dim, device=device).to(q_dtype or act_dtype(kv_dtype))
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, tables, seq_lens, split_len=split_len, out=out)
    ref = decode_attention_ref(q, cache, tables, seq_lens)
    assert rel_err(out, ref) < TOL["bf16" if q.dtype == torch.bfloat16 else kv_dtype]


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_matches_ref(device, kv_dtype, head_dim):
    _check_decode(device, kv_dtype, head_dim, [1, 2, 17, 255], num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_values_scaled_either_way(device, kv_dtype, monkeypatch):
    # both value paths of attend_tile (scales on the probabilities, or per V element) are right,
    # whichever one the table picks for this dtype
    monkeypatch.setitem(kvq._SCALE_PROBS, kv_dtype, not kvq._SCALE_PROBS[kv_dtype])
    _check_decode(device, kv_dtype, 80, [1, 17, 40], num_heads=4, num_kv_heads=2, split_len=16)
    _check_prefill(device, kv_dtype, 64, q_lens=[1, 17, 2], prefix_lens=[0, 0, 21], num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("split_len", [16, 48])
def test_decode_split_merge_and_shared_prefix(device, kv_dtype, split_len):
    # several splits per sequence, uneven last split; sequences 1.. share 2 blocks of sequence 0
    _check_decode(device, kv_dtype, 128, [40, 33, 70], num_heads=6, num_kv_heads=2, shared_blocks=2,
                  split_len=split_len)


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("split_len", [64, 160])
@pytest.mark.parametrize("balanced", [True, False])
def test_decode_planned_for_a_longer_context(device, kv_dtype, split_len, balanced, monkeypatch):
    # as the engine's decode graphs launch it: planned for a max_seq_len (max_model_len) far past every live
    # context, over block tables as wide as that (8 or 4 splits); each sequence spreads its tokens over all
    # the splits (BALANCED), or, switched off, is cut into pieces of split_len
    monkeypatch.setattr(dec, "BALANCED", balanced)
    # the split outputs start as NaN (stale memory): the merge must mask the splits past a sequence's own
    monkeypatch.setattr(dec, "torch", _StaleTorch())
    lens = [3, 40, 70]
    cache, tables, seq_lens, _ = make_paged(kv_dtype, lens, 2, 64, device)
    wide = torch.zeros(len(lens), 32, dtype=torch.int32, device=device)  # 32 blocks of 16: 512 tokens
    wide[:, :tables.shape[1]] = tables
    q = torch.randn(len(lens), 4, 64, device=device).to(act_dtype(kv_dtype))
    out = decode_attention(q, cache, wide, seq_lens, max_seq_len=512, split_len=split_len)
    assert rel_err(out, decode_attention_ref(q, cache, tables, seq_lens)) < TOL[kv_dtype]


class _StaleTorch:
    """torch, but `empty` float tensors come back full of NaN, as stale memory may."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


def test_decode_merge_masks_stale_splits(device, monkeypatch):
    # one short sequence beside long ones: most of the launch's splits are past its end, their outputs stale NaN
    monkeypatch.setattr(dec, "torch", _StaleTorch())
    lens = [5, 90, 130]
    cache, tables, seq_lens, _ = make_paged("int8", lens, 2, 64, device)
    q = torch.randn(len(lens), 4, 64, device=device).to(act_dtype("int8"))
    out = decode_attention(q, cache, tables, seq_lens, max_seq_len=max(lens), split_len=16)
    assert torch.isfinite(out).all()
    assert rel_err(out, decode_attention_ref(q, cache, tables, seq_lens)) < TOL["int8"]


def test_balanced_split_len():
    # whole tiles, as few per split as spread the sequence over every split of the launch
    assert balanced_split_len(70, 4, 16) == 32  # 3 splits of the 4 hold tokens (the plan's 64: 2)
    assert balanced_split_len(3, 32, 128) == 128
    assert balanced_split_len(1000, 32, 128) == 128  # 8 splits busy, not 1 of 1,024 tokens
    assert balanced_split_len(16384, 32, 128) == 512
    assert balanced_split_len(3000, 8, 128) == 384
    assert balanced_split_len(4096, 1, 128) == 4096
    assert balanced_split_len(0, 4, 128) == 128  # never 0 (no division by it in the merge)


@pytest.mark.parametrize("block_size", [32, 64])
def test_decode_block_sizes(device, block_size):
    _check_decode(device, "int4", 64, [17, 50], num_heads=8, num_kv_heads=1, block_size=block_size)


def test_decode_rejects_bad_inputs(device):
    cache, tables, seq_lens, _ = make_paged("int8", [5], 2, 64, device)
    q = torch.randn(1, 4, 64, device=device).half()
    with pytest.raises(ShapeError, match="multiple"):
        decode_attention(torch.randn(1, 3, 64, device=device).half(), cache, tables, seq_lens)
    with pytest.raises(ShapeError, match="head_dim"):
        decode_attention(torch.randn(1, 4, 32, device=device).half(), cache, tables, seq_lens)
    with pytest.raises(ShapeError, match="seq_lens"):
        decode_attention(q, cache, tables, seq_lens.long())
    with pytest.raises(ShapeError, match="fp16 or bf16"):
        decode_attention(q.float(), cache, tables, seq_lens)
    with pytest.raises(ShapeError, match="block table"):
        decode_attention(q, cache, tables, seq_lens, max_seq_len=10_000)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_gpu_long(device, kv_dtype, head_dim):
    # the GPU's own tile sizes (blocks of 128 tokens) and small blocks, shared prefixes, one long split run
    _check_decode(device, kv_dtype, head_dim, [1000, 1, 2, 17, 255, 3000, 1000, 5],
                  num_heads=32, num_kv_heads=8, block_size=128)
    _check_decode(device, kv_dtype, head_dim, [1000, 300, 3000], num_heads=32, num_kv_heads=8, shared_blocks=2,
                  block_size=128)
    _check_decode(device, kv_dtype, head_dim, [1000, 3, 300], num_heads=32, num_kv_heads=8)
    _check_decode(device, kv_dtype, head_dim, [4096], num_heads=8, num_kv_heads=8, block_size=128)


@pytest.fixture
def gluon_launches(monkeypatch):
    """The launches of the Gluon split kernel (attention_decode_mma) during a test, counted."""
    from lmq.kernels import attention_decode_mma

    calls = []
    launch = attention_decode_mma.launch_split
    monkeypatch.setattr(attention_decode_mma, "launch_split", lambda *a, **k: calls.append(1) or launch(*a, **k))
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("mma", [True, False])
def test_decode_gpu_int4_long_context(device, mma, monkeypatch, gluon_launches):
    # 8 sequences of 16k tokens, the shape the benchmark times, through either int4 split kernel (the Gluon
    # one, or the Triton one at three programs per SM); over this many tokens a lossy value path shows
    # (scales on the probabilities with raw low nibbles read 6.7e-3 here, per-element values 3.5e-4)
    import lmq.kernels.attention_decode as dec

    monkeypatch.setattr(dec, "MMA_KERNEL", mma)
    cache, tables, seq_lens, _ = make_paged("int4", [16384] * 8, 8, 128, device, block_size=128)
    q = torch.randn(8, 32, 128, device=device).half()
    out = decode_attention(q, cache, tables, seq_lens)
    assert len(gluon_launches) == mma  # the plan took the Gluon kernel (4 splits of 4096 tokens) when it may
    assert rel_err(out, decode_attention_ref(q, cache, tables, seq_lens)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_decode_gpu_int4_mma_kernel(device, head_dim, block_size, monkeypatch, gluon_launches):
    # the Gluon int4 split kernel (attention_decode_mma) on odd lengths, partial and empty warp slices of
    # the last tile, several splits, a shared prefix, GQA groups of 1, 4, 7 and 16
    import lmq.kernels.attention_decode as dec

    monkeypatch.setattr(dec, "MMA_MIN_SPLIT", 0)  # its plan everywhere, short splits too
    lens = [1, 2, 17, 31, 33, 63, 64, 65, 127, 128, 129, 255, 1000, 3000]
    for heads, kv_heads in ((8, 8), (32, 8), (28, 4), (16, 1)):
        _check_decode(device, "int4", head_dim, lens, heads, kv_heads, block_size=block_size)
    _check_decode(device, "int4", head_dim, [1000, 600, 3000], 32, 8, shared_blocks=2, block_size=block_size)
    tile = min(128, block_size)
    for split_len in (tile, 3 * tile, 2048):  # 2048: one split, the output written directly
        _check_decode(device, "int4", head_dim, [700, 1, 130, 2000], 32, 8, split_len=split_len,
                      block_size=block_size)
    _check_decode(device, "int4", head_dim, [1, 129, 3000], 28, 4, split_len=3072, block_size=block_size)
    assert len(gluon_launches) == 9


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype, mma", [("int4", True), ("int4", False), ("int8", False)])
def test_decode_gpu_stale_scales_are_not_read(device, kv_dtype, mma, monkeypatch):
    # slots past a sequence's end inside its last block hold stale bytes, here NaN scale words: the split
    # kernels (for int4 both) may read those slots' codes unmasked but must weigh them by zero
    import lmq.kernels.attention_decode as dec

    monkeypatch.setattr(dec, "MMA_KERNEL", mma)
    monkeypatch.setattr(dec, "MMA_MIN_SPLIT", 0)  # the Gluon kernel's plan at these short lengths too
    cache, tables, seq_lens, _ = make_paged(kv_dtype, [100, 37, 300], 8, 128, device, block_size=128)
    live = torch.zeros(cache.k_scales.shape[:3], dtype=torch.bool, device=device)  # [nb, H_kv, B_s]
    for b, L in enumerate(seq_lens.tolist()):
        for t in range(L):
            live[tables[b, t // 128], :, t % 128] = True
    for sc in (cache.k_scales, cache.v_scales):
        sc[~live] = float("nan")
    q = torch.randn(3, 32, 128, device=device).half()
    ref = decode_attention_ref(q, cache, tables, seq_lens)
    for split_len in (None, 128, 384):  # 384: one split, the output written directly
        out = decode_attention(q, cache, tables, seq_lens, split_len=split_len)
        assert rel_err(out, ref) < TOL[kv_dtype]


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------


def fresh_kv(raw, q_lens, kv_dtype, dtype, device):
    """The new rows of each sequence's raw K/V (its last q_len tokens), packed as q is, [T, H_kv, D] each, as the
    cache holds them: what `write_kv(..., write_back=True)` leaves in the engine's k and v."""
    k = torch.cat([r[0][len(r[0]) - n:] for r, n in zip(raw, q_lens)]).float()
    v = torch.cat([r[1][len(r[1]) - n:] for r, n in zip(raw, q_lens)]).float()
    return (fake_quantize_kv(k, kv_dtype).to(dtype).to(device), fake_quantize_kv(v, kv_dtype).to(dtype).to(device))


def _check_prefill(device, kv_dtype, head_dim, q_lens, prefix_lens, num_heads, num_kv_heads,
                   shared_blocks=0, block_size=16, q_dtype=None, tiled=False, fresh=False, has_prefix=True):
    lens = [n + p for n, p in zip(q_lens, prefix_lens)]
    cache, tables, seq_lens, raw = make_paged(kv_dtype, lens, num_kv_heads, head_dim, device,
                                              block_size=block_size, shared_blocks=shared_blocks)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device=device).to(q_dtype or act_dtype(kv_dtype))
    out = torch.full_like(q, float("nan"))
    kw = {}
    if fresh:  # the chunks' own K/V from float tensors laid out as in the engine: views into one wider row
        k, v = fresh_kv(raw, q_lens, kv_dtype, q.dtype, device)
        wide = torch.full((k.shape[0], 3, num_kv_heads, head_dim), float("nan"), dtype=q.dtype, device=device)
        wide[:, 0], wide[:, 2] = k, v
        kw = {"k_new": wide[:, 0], "v_new": wide[:, 2], "has_prefix": has_prefix}
    if tiled:  # a tile map with spare entries, as a CUDA graph of many sequences launches it
        from lmq.kernels.attention_prefill import graph_block_m, max_tiles, tile_map

        bm = graph_block_m(q.device, head_dim)
        n = max_tiles(sum(q_lens), len(q_lens) + 3, bm)
        kw |= {"tiles": torch.tensor(tile_map(q_lens, bm, n), dtype=torch.int32, device=device).view(-1, 2),
               "block_m": bm}
    prefill_attention(q, cache, tables, cu, seq_lens, out=out, **kw)
    ref = prefill_attention_ref(q, cache, tables, cu, seq_lens)
    err = rel_err(out, ref)
    assert err < TOL["bf16" if q.dtype == torch.bfloat16 else kv_dtype]
    return err


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("fresh", [False, True])
def test_prefill_matches_ref(device, kv_dtype, head_dim, fresh):
    # packed varlen batch; sequence 2 continues after a 21-token prefix already in the cache; `fresh`: the chunks'
    # own keys and values from float tensors, the prefix from the cache
    _check_prefill(device, kv_dtype, head_dim, q_lens=[1, 17, 2], prefix_lens=[0, 0, 21],
                   num_heads=4, num_kv_heads=2, fresh=fresh)


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("fresh", [False, True])
def test_prefill_unmasked_key_tiles_at_their_edges(device, kv_dtype, fresh):
    """Query tiles whose first row sits just before, on and just after a key-tile edge (prefixes 12..17, three new
    rows each; 16-token key tiles on the CPU): the unmasked loop takes exactly the tiles every row sees whole (a bound
    one token too far fails here). `fresh`: the prefix's last partial tile and the chunk's diagonal at the edges."""
    _check_prefill(device, kv_dtype, 64, q_lens=[3] * 6 + [40, 33], prefix_lens=[12, 13, 14, 15, 16, 17, 14, 32],
                   num_heads=2, num_kv_heads=1, fresh=fresh)


@pytest.mark.parametrize("kv_dtype", CPU_KV)
def test_prefill_unmasked_key_tiles_change_nothing(device, kv_dtype, monkeypatch):
    """`UNMASKED_TILES` on and off give the same output (bit for bit under the interpreter), with key tiles smaller
    than the cache's blocks (64-token blocks)."""
    import lmq.kernels.attention_prefill as pre

    q_lens, prefix_lens = [70, 5, 33], [0, 90, 31]
    lens = [n + p for n, p in zip(q_lens, prefix_lens)]
    cache, tables, seq_lens, _ = make_paged(kv_dtype, lens, 2, 64, device, block_size=64)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), 4, 64, device=device).to(act_dtype(kv_dtype))
    outs = []
    for unmasked in (True, False):
        monkeypatch.setattr(pre, "UNMASKED_TILES", unmasked)
        outs.append(prefill_attention(q, cache, tables, cu, seq_lens))
    if device == "cpu":
        assert torch.equal(outs[0], outs[1])
    else:
        assert rel_err(outs[0], outs[1]) < 1e-3


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("tiled", [False, True])
def test_prefill_fresh_without_prefixes_in_one_launch(device, kv_dtype, tiled):
    """No sequence has a cached prefix and the caller says so: one launch over the chunks (the one over the prefixes,
    whose state the chunks merge with, is left out), the same attention; also through a tile map."""
    _check_prefill(device, kv_dtype, 64, q_lens=[1, 17, 40, 16], prefix_lens=[0, 0, 0, 0], num_heads=4,
                   num_kv_heads=2, fresh=True, has_prefix=False, tiled=tiled)


@pytest.mark.parametrize("has_prefix", [False, True])
def test_prefill_reads_the_chunk_from_k_new(device, has_prefix):
    """With k_new / v_new the chunk's keys come from them, not from the cache (the other tests give them what the
    cache holds, which a launch that ignored them would also pass): other values there move the output."""
    q_lens, prefix_lens = [17, 40], [0, 21 if has_prefix else 0]
    lens = [n + p for n, p in zip(q_lens, prefix_lens)]
    cache, tables, seq_lens, raw = make_paged("int8", lens, 2, 64, device)
    cu = torch.tensor([0, 17, 57], dtype=torch.int32, device=device)
    q = torch.randn(57, 4, 64, device=device).half()
    k, v = fresh_kv(raw, q_lens, "int8", q.dtype, device)
    ref = prefill_attention_ref(q, cache, tables, cu, seq_lens)
    kw = {"has_prefix": has_prefix}
    assert rel_err(prefill_attention(q, cache, tables, cu, seq_lens, k_new=k, v_new=v, **kw), ref) < TOL["int8"]
    assert rel_err(prefill_attention(q, cache, tables, cu, seq_lens, k_new=torch.ones_like(k), v_new=v, **kw),
                   ref) > 0.1
    assert rel_err(prefill_attention(q, cache, tables, cu, seq_lens, k_new=k, v_new=v + 1, **kw), ref) > 0.1


def test_prefill_rejects_bad_fresh_kv(device):
    cache, tables, seq_lens, _ = make_paged("int8", [5], 2, 64, device)
    q = torch.randn(5, 4, 64, device=device).half()
    cu = torch.tensor([0, 5], dtype=torch.int32, device=device)
    k = torch.randn(5, 2, 64, device=device).half()
    with pytest.raises(ShapeError, match="come together"):
        prefill_attention(q, cache, tables, cu, seq_lens, k_new=k)
    with pytest.raises(ShapeError, match=r"v_new must be \[5, 2, 64\]"):
        prefill_attention(q, cache, tables, cu, seq_lens, k_new=k, v_new=k[:4])
    with pytest.raises(ShapeError, match="k_new must be"):
        prefill_attention(q, cache, tables, cu, seq_lens, k_new=k.float(), v_new=k)


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("fresh", [False, True])
def test_prefill_through_a_tile_map(device, kv_dtype, fresh):
    """Programs take their (sequence, query tile) from a map, spare entries past every sequence's rows: the same
    attention (every row written once: the output starts as NaN)."""
    _check_prefill(device, kv_dtype, 64, q_lens=[1, 17, 2, 40], prefix_lens=[0, 0, 21, 5], num_heads=4,
                   num_kv_heads=2, tiled=True, fresh=fresh)


def test_tile_map_covers_every_query_tile_once():
    from lmq.kernels.attention_prefill import SPARE_TILE, max_tiles, tile_map

    q_lens, bm = [1, 64, 65, 0, 130], 64
    n = max_tiles(sum(q_lens), len(q_lens), bm)
    pairs = tile_map(q_lens, bm, n)
    tiles = list(zip(pairs[0::2], pairs[1::2]))
    real = [t for t in tiles if t[1] != SPARE_TILE]
    assert real == [(0, 0), (1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2)] and len(tiles) == n == 9
    with pytest.raises(ShapeError, match="do not fit"):
        tile_map(q_lens, bm, 6)


@pytest.mark.parametrize("kv_dtype", CPU_KV)
@pytest.mark.parametrize("fresh", [False, True])
def test_prefill_chunked_with_shared_prefix(device, kv_dtype, fresh):
    # two sequences share a 32-token prefix (2 blocks) and each prefills a new chunk after it
    _check_prefill(device, kv_dtype, 64, q_lens=[19, 7], prefix_lens=[32, 35], num_heads=2, num_kv_heads=1,
                   shared_blocks=2, fresh=fresh)


@pytest.mark.gpu  # the interpreter computes bf16 dots on raw bits (TRITON-CPU.md)
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("head_dim", [64, 96])
def test_bf16_queries_over_a_quantized_cache(device, kv_dtype, head_dim):
    # bf16 models read exact codes (1024 + c is not a bf16 number): the other conversion path
    _check_decode(device, kv_dtype, head_dim, [1, 17, 40], num_heads=4, num_kv_heads=2, split_len=16,
                  q_dtype=torch.bfloat16)
    for fresh in (False, True):
        _check_prefill(device, kv_dtype, head_dim, q_lens=[1, 17, 2], prefix_lens=[0, 0, 21], num_heads=4,
                       num_kv_heads=2, q_dtype=torch.bfloat16, fresh=fresh)


def test_prefill_equals_decode_on_last_row(device):
    # the last prefill row and a decode step over the same cache compute the same thing
    lens = [30]
    cache, tables, seq_lens, _ = make_paged("int4", lens, 2, 96, device)
    q = torch.randn(30, 4, 96, device=device).half()
    cu = torch.tensor([0, 30], dtype=torch.int32, device=device)
    full = prefill_attention(q, cache, tables, cu, seq_lens)
    last = decode_attention(q[-1:].contiguous(), cache, tables, seq_lens)
    assert rel_err(full[-1:], last) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("fresh", [False, True])
def test_prefill_gpu_long(device, kv_dtype, head_dim, fresh):
    _check_prefill(device, kv_dtype, head_dim, q_lens=[1000, 1, 2, 17, 255, 300], prefix_lens=[0, 0, 5, 0, 100, 700],
                   num_heads=32, num_kv_heads=8, fresh=fresh)
    _check_prefill(device, kv_dtype, head_dim, q_lens=[1000, 2, 255], prefix_lens=[0, 300, 129],
                   num_heads=32, num_kv_heads=8, block_size=128, fresh=fresh)
    _check_prefill(device, kv_dtype, head_dim, q_lens=[1000, 1, 2, 17, 255], prefix_lens=[0, 0, 5, 0, 100],
                   num_heads=32, num_kv_heads=8, tiled=True, fresh=fresh)
    # a chat turn: a short chunk over a long cached prefix runs in 16-row query tiles
    _check_prefill(device, kv_dtype, head_dim, q_lens=[33], prefix_lens=[1119], num_heads=32, num_kv_heads=8,
                   block_size=128, fresh=fresh)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_prefill_fresh_is_as_exact_over_a_long_prefix(device, kv_dtype):
    """A long chunk over a long prefix in two launches (the prefix, then the chunk merged with its state) is as exact
    as one launch over the cache: the state is a max and a sum, not a log-sum-exp (from which int8's scaled
    probabilities fell to fp16 subnormals when the softmax continued from it: 1.3e-3 against 6.3e-4 on an H100)."""
    errs = []
    for fresh in (False, True):
        torch.manual_seed(0)  # the same queries both ways
        errs.append(_check_prefill(device, kv_dtype, 128, q_lens=[2048], prefix_lens=[2048], num_heads=32,
                                   num_kv_heads=8, block_size=128, fresh=fresh))
    print(kv_dtype, errs)
    assert errs[1] < 1.5 * errs[0], errs  # the subnormal form read 2.1x; rounding to fp16 twice, 1.2x (int4)


def test_prefill_query_tile_shrinks_for_short_chunks():
    assert pick_block_m(33, 32, 1, 64, 132) == 16  # 32 programs of 64 rows -> 96 of 16
    assert pick_block_m(300, 32, 1, 64, 132) == 32  # 160 -> 320 programs
    assert pick_block_m(1024, 32, 1, 64, 132) == 64  # 512 programs already
    assert pick_block_m(1, 4, 1, 64, 132) == 16  # never below tl.dot's 16


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["fp16", "bf16", "int8", "int4"])
def test_decode_matches_sdpa_on_float_cache(device, kv_dtype):
    # an independent reference: torch SDPA on the dequantized, contiguous K/V
    L, H, Hkv, D = 777, 32, 8, 128
    cache, tables, seq_lens, _ = make_paged(kv_dtype, [L], Hkv, D, device, block_size=128)
    k, v = gather_kv_ref(cache, tables[0], L)  # [L, H_kv, D]
    q = torch.randn(1, H, D, device=device).to(act_dtype(kv_dtype))
    out = decode_attention(q, cache, tables, seq_lens)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], enable_gqa=True)
    assert rel_err(out, ref[:, :, 0]) < TOL[kv_dtype] * math.sqrt(2)


def test_split_plan():
    # 132 SMs (H100), 8 KV heads, 128-token tiles: the plan measured best in docs/benchmarks.md
    from lmq.kernels.attention_decode import plan_splits

    def splits(B, L):
        split_len = plan_splits(B, 8, L, 128, 132)
        assert split_len % 128 == 0
        return -(-L // split_len)

    assert [splits(64, L) for L in (1024, 16384)] == [1, 1]  # B * H_kv already fills the GPU
    assert [splits(8, L) for L in (1024, 4096, 16384, 32768)] == [4, 8, 16, 16]
    assert [splits(1, L) for L in (100, 1024, 4096, 16384, 32768)] == [1, 8, 32, 32, 32]


def test_int4_programs_per_sm_follow_the_waves():
    # three int4 programs per SM only where their waves beat two per SM (132 SMs, 8 KV heads)
    from lmq.kernels.attention_decode import int4_three_per_sm

    programs = {(8, 16384): 16 * 8 * 8, (8, 32768): 16 * 8 * 8, (8, 4096): 8 * 8 * 8, (64, 16384): 64 * 8,
                (1, 16384): 32 * 8}
    assert {bl: int4_three_per_sm(p, 132) for bl, p in programs.items()} == {
        (8, 16384): True, (8, 32768): True, (8, 4096): False, (64, 16384): False, (1, 16384): False}
    assert int4_three_per_sm(390, 132) and not int4_three_per_sm(264, 132)  # one wave of three vs one of two


def test_mma_kernel_plan():
    # the Gluon int4 kernel: one wave of programs at two per SM (132 SMs, 8 KV heads, 128-token tiles), only
    # where that leaves >= 512 tokens per split, or in one split with >= 119 rows (attention_sweep.py --mma-splits)
    from lmq.kernels.attention_decode import mma_split_len

    def splits(B, L):
        split_len = mma_split_len(B, 8, L, 128, 132)
        return None if split_len is None else -(-L // split_len)

    assert [splits(8, L) for L in (4096, 16384, 32768)] == [4, 4, 4]
    assert [splits(B, 16384) for B in (2, 4, 16, 32, 64, 256)] == [16, 8, 2, 1, 1, 1]
    assert [splits(1, L) for L in (4096, 16384, 32768)] == [None, 32, 32]  # the Triton kernel below 512
    assert splits(64, 512) == 1 and splits(64, 1000) == 1
    # with >= 0.9 x SMs rows (119), one split wherever the plan's splits would be shorter than 1,024 tokens
    assert splits(64, 300) == 1 and splits(16, 512) == 1 and splits(16, 1024) == 1 and splits(16, 2048) == 2
    assert splits(9, 500) is None and splits(8, 500) is None and splits(4, 2048) is None


def test_plan_decode_takes_the_gluon_kernel_only_for_long_splits(monkeypatch):
    # plan_decode: the Gluon kernel's plan where it applies and keeps >= 512 tokens per split, else the
    # Triton plan (132 SMs, 8 KV heads, 128-token tiles); CPU tensors stand in for the queries
    import lmq.kernels.attention_decode as dec

    monkeypatch.setattr(dec, "uses_mma_kernel", lambda *a: True)
    q8 = torch.zeros(8, 32, 128)
    assert dec.plan_decode(q8, "int4", 8, 16384, 128, 132) == (4096, True, False)
    assert dec.plan_decode(q8, "int4", 8, 2048, 128, 132) == (512, True, False)
    assert dec.plan_decode(q8, "int4", 8, 1024, 128, 132)[1:] == (False, False)  # 4 splits of 256: Triton
    monkeypatch.setattr(dec, "uses_mma_kernel", lambda *a: False)
    assert dec.plan_decode(q8, "int4", 8, 16384, 128, 132)[1] is False


def test_gluon_programs_are_spread_over_every_sm():
    # attention_decode_mma.residency_pad: shared memory held beyond the rings caps the programs per SM at
    # ceil(programs / SMs) (Hopper: 228 KB per SM, 1 KB held per block; four programs at most by registers,
    # which tests/test_gemm_compile.py checks at head dim 128: the count here assumes it)
    from lmq.kernels.attention_decode_mma import (
        programs_per_sm,
        residency_pad,
        ring_bytes,
    )

    for base in (ring_bytes(128, 128, 4), ring_bytes(128, 64, 4), ring_bytes(64, 128, 4)):
        for programs in (1, 64, 132, 133, 256, 264, 265, 396, 397, 528, 1024):
            pad = residency_pad(programs, 132, base)
            fit = programs_per_sm(base, pad)
            want = -(-programs // 132)
            assert fit >= min(want, 4)  # never a second wave the plan did not make
            if want < 4 and base == ring_bytes(128, 128, 4):
                assert fit == want  # at head dim 128: exactly as many as needed
    assert ring_bytes(128, 128, 4) == 36864 and residency_pad(256, 132, 36864) == 65536


def test_decode_falls_back_when_the_gluon_kernel_cannot_build(device, monkeypatch):
    # a Triton that cannot build the Gluon kernel: the launch takes the Triton split kernel, same result
    import lmq.kernels.attention_decode as dec
    from lmq.kernels import attention_decode_mma

    if dec._mma is None:
        pytest.skip("this Triton has no Gluon")
    tried = []

    def unavailable(*a, **k):
        tried.append(1)
        raise attention_decode_mma.KernelUnavailable("test")

    monkeypatch.setattr(dec, "uses_mma_kernel", lambda *a: True)
    monkeypatch.setattr(attention_decode_mma, "launch_split", unavailable)
    _check_decode(device, "int4", 64, [17, 50], num_heads=8, num_kv_heads=2, split_len=16)
    assert tried


def test_int4_launch_plan():
    # (splits, three per SM) for int4 on 132 SMs, 8 KV heads, 128-token tiles (attention_sweep.py
    # --splits --big): B=64 takes two splits at three per SM where the plan gives one at two; B=8 keeps
    # the plan's splits; a one-tile context cannot split
    from lmq.kernels.attention_decode import int4_plan, plan_launch

    def launch(B, L, eligible=True):
        split_len, three = plan_launch(B, 8, L, 128, 132, eligible)
        assert split_len % 128 == 0
        return -(-L // split_len), three

    assert [launch(64, L) for L in (4096, 16384, 32768)] == [(2, True)] * 3
    assert launch(64, 16384, eligible=False) == (1, False)
    assert [launch(8, L) for L in (4096, 16384)] == [(8, False), (16, True)]
    assert launch(1, 16384) == (32, False)
    assert launch(64, 100) == (1, False)  # one tile
    assert launch(64, 200) == (2, True)  # two tiles of 128: 128 tokens per split
    assert int4_plan(128 * 8, 1, 132, 32) == (1, True)  # B=128: 1,024 programs, 2.6 waves of three
