"""W4A16 GEMM and dequantize kernels against their plain-PyTorch twins.

CPU runs use the Triton interpreter (conftest sets TRITON_INTERPRET=1) with small shapes; the `gpu`
tests run every arch's decode and prefill configurations, bf16 included, at model-sized shapes.
"""

import pytest
import torch
from lmq.kernels import pdl as pdl_module
from lmq.kernels import w4a16_gemm as gemm_module
from lmq.kernels import w4a16_gemm_direct as direct_module
from lmq.kernels import w4a16_gemm_ws as w4a16_gemm_ws_module
from lmq.kernels.w4a16_dequant import w4a16_dequant, w4a16_dequant_ref
from lmq.kernels.w4a16_gemm import CONFIGS, INTERPRET_CONFIG, w4a16_gemm, w4a16_gemm_ref
from lmq.kernels.w4a16_gemm_ws import w4a16_gemm_ws, w4a16_gemm_ws_ref
from lmq.kernels.w4a16_gemv import serves_rows, w4a16_gemv, w4a16_gemv_ref

from lmq.engine import qlinear as qlinear_module
from lmq.engine.qlinear import QLinear, choose_path, qlinear
from lmq.errors import ShapeError, UnsupportedError
from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight

# Relative error ||out - ref|| / ||ref|| allowed per activation dtype: fp32 accumulation, output
# rounded to the dtype, split-K partials added in the dtype.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def random_packed(N, K, G, device):
    """Fresh random codes (0..15), zeros (0..15) and positive scales, packed as planes64."""
    q = QuantizedWeight(
        codes=torch.randint(0, 16, (N, K), dtype=torch.uint8),
        scales=(torch.rand(N, K // G) * 0.02 + 0.001).to(torch.float16),
        zeros=torch.randint(0, 16, (N, K // G), dtype=torch.uint8),
        bits=4,
        group_size=G,
    )
    return {k: v.to(device) for k, v in planes64.pack(q).items()}


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 3, 16, 17, 127])
def test_gemm_matches_ref(M, G, device):
    N, K = 40, 256  # N is not a multiple of the block
    p = random_packed(N, K, G, device)
    x = torch.randn(M, K, device=device).half()
    out = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G)
    ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)
    assert out.shape == (M, N) and out.dtype == torch.float16
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("M,N,K,G", [(3, 72, 576, 64), (5, 576, 128, 32), (2, 40, 1536, 128)])
def test_gemm_odd_shapes(M, N, K, G, device):
    p = random_packed(N, K, G, device)
    x = torch.randn(1, M, K, device=device).half()  # leading batch dim is kept
    out = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G)
    ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)
    assert out.shape == (1, M, N)
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 3])
def test_gemv_matches_ref(M, G, device):
    N, K = 40, 256
    p = random_packed(N, K, G, device)
    x = torch.randn(M, K, device=device).half()
    out = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G)
    ref = w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)
    assert out.shape == (M, N) and rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("rows,split_k,reduce", [(2, 2, "fixed"), (2, 3, "fixed"), (2, 1, "atomic"), (2, 2, "atomic")])
def test_gemv_rows_per_program(rows, split_k, reduce, device):
    """ROWS activation rows share each dequantized weight tile (the four-plane fp16 path): the same function for
    any M, rows past M masked, every split-K reduction; elsewhere (bf16, SUM_PLANES < 4, G < 64) one row a program;
    a ROWS other than 1 or 2 (four rows lost everywhere and were removed) is refused at any M."""
    N, K, G = 96, 640, 128  # 5 K tiles: uneven splits
    p = random_packed(N, K, G, device)
    cfg = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": split_k, "SUM_PLANES": 4, "REDUCE": reduce, "ROWS": rows}
    for M in (1, 2, 3, 5):
        x = torch.randn(M, K, device=device).half()
        out = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
        assert rel_err(out, w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[torch.float16], M
    # one row a program there: SUM_PLANES < 4, G < 64, bf16 with the table's SUM_PLANES 4 (bf16 on the GPU only:
    # the interpreter computes bf16 on raw bits)
    p32 = random_packed(N, K, 32, device)
    cases = [(torch.float16, 1, p, G), (torch.float16, 4, p32, 32)]
    if device == "cuda":
        cases.append((torch.bfloat16, 4, p, G))
    for dtype, planes, pk, g in cases:
        xb = torch.randn(3, K, device=device, dtype=dtype)
        out = w4a16_gemv(xb, pk["qweight"], pk["scales"], pk["zeros"], g, {**cfg, "SUM_PLANES": planes})
        assert rel_err(out, w4a16_gemv_ref(xb, pk["qweight"], pk["scales"], pk["zeros"], g)) < TOL[dtype], (dtype, g)
    for bad, m in ((4, 1), (3, 2)):  # refused whatever M is
        with pytest.raises(ValueError, match="ROWS is 1 or 2"):
            w4a16_gemv(x[:m], p["qweight"], p["scales"], p["zeros"], G, {**cfg, "ROWS": bad})


@pytest.mark.parametrize("split_k", [1, 2])
def test_gemv_odd_shape_and_split(split_k, device):
    N, K, G = 576, 192, 64
    p = random_packed(N, K, G, device)
    x = torch.randn(1, 1, K, device=device).half()
    cfg = {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 1}
    out = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    assert out.shape == (1, 1, N)
    assert rel_err(out, w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[torch.float16]
    with pytest.raises(ShapeError, match="float16 or bfloat16"):
        w4a16_gemv(x.float(), p["qweight"], p["scales"], p["zeros"], G)
    with pytest.raises(ShapeError, match="K=192"):
        w4a16_gemv(x[..., :128], p["qweight"], p["scales"], p["zeros"], G)

def test_gemv_four_plane_sums_do_not_overflow_on_large_activations(device):
    """Four channels of one lane at |x| = 3000: unscaled fp16 sums of their products would pass 65504
    (4 x 15 x 3000); the four-plane path sums (q - z) / 16 products and stays finite and exact."""
    N, K, G = 64, 256, 128
    p = random_packed(N, K, G, device)
    x = (torch.randn(1, K, device=device) * 0.5).half()
    for k in (5, 5 + 16, 5 + 32, 5 + 48):
        x[0, k] = 3000.0
    cfg = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "SUM_PLANES": 4, "REDUCE": "fixed"}
    out = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[torch.float16]


@pytest.mark.parametrize("block_n,rows", [(32, 1), (64, 1), (96, 1), (32, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gemv_fused_rope(head_dim, block_n, rows, device):
    """RoPE in the GEMV's split-K epilogue = the GEMV, then rotate the first rope_cols columns (q and k
    of a fused qkv; v untouched), per row at its own position. Each split rotates its partial sums: a
    program holds block_n / 2 columns of a head's first half and their partners, or one whole head
    where block_n does not divide it; with several rows per program, each row at its own position."""
    from lmq.kernels.rope import apply_rope_ref, rope_cos_sin, rope_inv_freq
    from lmq.kernels.w4a16_gemv import can_fuse_rope

    H, Hkv, G = 4, 2, 64
    N, K = (H + 2 * Hkv) * head_dim, 256
    p = random_packed(N, K, G, device)
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, 500000.0), 4096, device)
    x = torch.randn(3, K, device=device).half()
    positions = torch.tensor([3, 4000, 17], dtype=torch.int32, device=device)
    rope_cols = (H + Hkv) * head_dim
    assert can_fuse_rope(N, K, G, head_dim)
    out = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, {"SUM_PLANES": 4, "BLOCK_N": block_n, "ROWS": rows},
                     rope=(positions, cos, sin, rope_cols))
    y = w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)  # [3, N]
    qk = y[:, :rope_cols].view(3, H + Hkv, head_dim)
    ref = torch.cat([apply_rope_ref(qk, positions, cos, sin).view(3, rope_cols), y[:, rope_cols:]], dim=1)
    assert rel_err(out[:, :rope_cols], ref[:, :rope_cols]) < TOL[torch.float16]
    assert rel_err(out[:, rope_cols:], ref[:, rope_cols:]) < TOL[torch.float16]
    assert not can_fuse_rope(N, K, G, 96) and not can_fuse_rope(N, 64, G, head_dim)
    with pytest.raises(ShapeError, match="cannot fuse RoPE"):
        w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, rope=(positions, cos, sin, rope_cols + 1))


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("sum_planes,reduce", [(2, "atomic"), (4, "atomic"), (4, "fixed"), (1, "fixed")])
def test_gemv_fp16_sums_and_workspace_split(sum_planes, reduce, G, device):
    """Products summed in fp16 over 2 or 4 planes, and the zero-fill-free split-K reduction: the same
    function as the reference; the workspace is all zeros again after every call, so calls repeat;
    the fixed-point sums give the same bits every call."""
    from lmq.kernels.w4a16_gemv import _WORKSPACES

    N, K = 72, 512
    p = random_packed(N, K, G, device)
    cfg = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 3, "num_warps": 4, "num_stages": 1,
           "SUM_PLANES": sum_planes, "REDUCE": reduce}
    # the interpreter computes bf16 arithmetic on raw bits (../shared/TRITON-CPU.md): bf16 on the GPU only
    dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float16,)
    for dtype in dtypes:
        x = torch.randn(2, K, device=device).to(dtype)
        ref = w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)
        first = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
        assert rel_err(first, ref) < TOL[dtype]
        again = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
        if reduce == "fixed":
            # integer sums do not depend on the splits' order (a real check on the GPU only: the interpreter
            # runs the programs one after another)
            assert torch.equal(first, again)
            assert all(not ws.any() for held in _WORKSPACES.values() for ws in held)
        else:
            assert torch.equal(first, again) or rel_err(again, first) < 1e-3  # fp32 atomics: order may vary
    with pytest.raises(ValueError, match="SUM_PLANES"):
        w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, {**cfg, "SUM_PLANES": 3})


@pytest.mark.parametrize("bad", ["overflow", "nan"])
def test_gemv_fixed_split_survives_overflow_and_nan(bad, device):
    """A call whose fp16 products overflow in several splits, or whose input holds a NaN, still finishes
    every output of the "fixed" reduction and leaves its workspace all zero: the next call is exact again.
    Overflowed outputs come out inf, as the fp16 sums themselves do."""
    from lmq.kernels.w4a16_gemv import _WORKSPACES

    N, K, G = 64, 512, 64
    p = random_packed(N, K, G, device)
    cfg = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 1, "SUM_PLANES": 1,
           "REDUCE": "fixed"}
    x = torch.randn(1, K, device=device).half()
    bad_x = x.clone()
    if bad == "overflow":
        bad_x[0, [5, 133, 261, 389]] = 30000.0  # one channel per split: every split's fp16 products overflow
    else:
        bad_x[0, 7] = float("nan")
    out = w4a16_gemv(bad_x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    if bad == "overflow":
        assert torch.isinf(out).any()
    assert all(not ws.any() for held in _WORKSPACES.values() for ws in held)
    good = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    assert rel_err(good, w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[torch.float16]



@pytest.mark.parametrize("dot_k", [16, 32, 64])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemm_configs(split_k, swap_ab, dot_k, device):
    """Split-K, swapped operands and 16/32/64-wide dots (G = 32 falls back to 32) give the same result."""
    N, K, G = 48, 384, 64 if dot_k != 32 else 32
    p = random_packed(N, K, G, device)
    x = torch.randn(4, K, device=device).half()
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": split_k, "GROUP_M": 1,
           "num_warps": 4, "num_stages": 1, "SWAP_AB": swap_ab, "DOT_K": dot_k}
    out = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_engine_table_deterministic(monkeypatch):
    """The deterministic table: the W4A16 GEMM kernel adds its splits in split order (its split counts as in the
    plain table, except where the arch measured other waves for that reduction: sm90's "decode_ordered", 2 waves from
    M=32), the GEMV as integers, the Hopper prefill GEMM keeps at most two splits; nothing else changes. The plain
    table is CONFIGS itself, the deterministic one one dict per arch, made from the table as it is now."""
    from lmq.engine.qlinear import engine_table

    for arch in CONFIGS:
        plain, det = engine_table(arch), engine_table(arch, deterministic=True)
        assert plain is CONFIGS[arch]
        assert det["gemv"]["REDUCE"] == "fixed"  # the GEMV adds its splits as integers
        assert det["decode"] == {**plain["decode"], "REDUCE": "ordered", **plain.get("decode_ordered", {})}
        assert det["prefill"] == {**plain["prefill"], "REDUCE": "ordered"}
        if "prefill_ws" in det:
            assert det["prefill_ws"]["MAX_SPLIT"] <= 2 and det["prefill_ws"]["SPLIT_K"] <= 2
        assert {k: v for k, v in det.items() if not isinstance(v, dict)} == \
            {k: v for k, v in plain.items() if not isinstance(v, dict)}
    # sm90's ordered decode: Llama-3-8B's qkv at M = 64 takes 3 splits (2 waves) instead of the plain table's 5
    from lmq.kernels import w4a16_gemm as gemm_module

    monkeypatch.setattr(gemm_module, "_num_sms", lambda device: 132)
    dev = torch.device("cuda", 0)
    det_decode = {**engine_table("sm90", True)["decode"], "BLOCK_M": 64}
    assert gemm_module.pick_split_k(64, 6144, 4096, det_decode, 128, dev) == 3  # ceil(264 / 96)
    assert gemm_module.pick_split_k(64, 6144, 4096, {**CONFIGS["sm90"]["decode"], "BLOCK_M": 64}, 128, dev) == 5
    assert gemm_module.pick_split_k(16, 6144, 4096, {**det_decode, "BLOCK_M": 16}, 128, dev) == 6  # below 32: as plain
    monkeypatch.setitem(CONFIGS["sm90"], "prefill_ws", {**CONFIGS["sm90"]["prefill_ws"], "MAX_SPLIT": 8})
    assert engine_table("sm90", True)["prefill_ws"]["MAX_SPLIT"] == 2
    monkeypatch.setitem(CONFIGS["sm90"], "decode", {**CONFIGS["sm90"]["decode"], "WAVES": 6})
    assert engine_table("sm90", True)["decode"]["WAVES"] == 6


@pytest.mark.parametrize("split_k", [2, 3, 5])
@pytest.mark.parametrize("swap", [True, False])
def test_gemm_ordered_split_k(split_k, swap, device):
    """REDUCE "ordered" (the deterministic mode's split-K): the reference's result, the same bits on every call, no
    zero fill needed, and every tile's arrival counter back at zero after the call (so the next call, and a CUDA
    graph's replay, starts clean). Odd M and N (masked rows and columns), a K not split evenly."""
    from lmq.kernels.w4a16_gemm import _ARRIVALS, _PARTIALS

    N, K, G = 72, 640, 64
    p = random_packed(N, K, G, device)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": split_k, "GROUP_M": 1, "num_warps": 4,
           "num_stages": 1, "SWAP_AB": swap, "DOT_K": 64}
    for M in (1, 5, 19):
        x = torch.randn(M, K, device=device).half()
        ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)
        first = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, {**cfg, "REDUCE": "ordered"})
        assert rel_err(first, ref) < TOL[torch.float16]
        assert all(not c.any() for held in _ARRIVALS.values() for c in held)
        # the output is the splits' slices added in split order 0, 1, ... (in fp32), whichever finished last
        ws = next(held[-1] for key, held in _PARTIALS.items() if key[0] == torch.device(device).type)
        in_order = ws[:M * N].clone()
        for sk in range(1, split_k):
            in_order += ws[sk * M * N:(sk + 1) * M * N]
        assert torch.equal(first.reshape(-1), in_order.half())
        for _ in range(3):
            assert torch.equal(w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, {**cfg, "REDUCE": "ordered"}),
                               first)
        atomic = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
        assert rel_err(atomic, first) < 2e-3  # the same sums, rounded once (ordered) or per split (atomics)
    with pytest.raises(ValueError, match="REDUCE"):
        w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, {**cfg, "REDUCE": "fixed"})


@pytest.mark.parametrize("M", [5, 17, 40])
def test_gemm_rows_per_tile_grow_with_m(M, device):
    """BLOCK_M_MAX: the tile takes the next power of two >= M rows (16..64), masked past M."""
    N, K, G = 48, 256, 64
    p = random_packed(N, K, G, device)
    x = torch.randn(M, K, device=device).half()
    cfg = {"BLOCK_M": 16, "BLOCK_M_MAX": 64, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "GROUP_M": 1,
           "num_warps": 4, "num_stages": 1, "SWAP_AB": True, "DOT_K": 64}
    out = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    assert rel_err(out, w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[torch.float16]


def test_split_count_follows_the_waves_table(monkeypatch):
    """Auto split-K (SPLIT_K = 0): splits until the grid covers WAVES waves of SMs (132 here), capped by
    K's tiles and MAX_SPLIT; WAVES_FROM_M lowers the target as M grows (sm90's decode table)."""
    from lmq.kernels import w4a16_gemm as gemm_module

    monkeypatch.setattr(gemm_module, "_num_sms", lambda device: 132)  # an H100
    pick_split_k = gemm_module.pick_split_k
    cfg = {**CONFIGS["sm90"]["decode"], "BLOCK_M": 64}
    dev = torch.device("cuda", 0)
    # qkv (N = 6144 -> 96 column tiles of 64, K / 128 = 32 tiles of K): one row tile
    assert pick_split_k(16, 6144, 4096, {**cfg, "BLOCK_M": 16}, 128, dev) == 6  # 4 waves: ceil(528 / 96)
    assert pick_split_k(64, 6144, 4096, cfg, 128, dev) == 5  # 3 waves from M = 64: ceil(396 / 96)
    assert pick_split_k(128, 6144, 4096, cfg, 128, dev) == 3  # 2 row tiles: ceil(396 / 192)
    assert pick_split_k(256, 6144, 4096, cfg, 128, dev) == 1  # 2 waves above 128: ceil(264 / 384)
    assert pick_split_k(16, 64, 256, {**cfg, "BLOCK_M": 16}, 128, dev) == 2  # K has 2 tiles only
    assert pick_split_k(16, 6144, 4096, {**cfg, "SPLIT_K": 4}, 128, dev) == 4  # fixed


def test_gemm_plan_is_kept_per_shape_and_config_object():
    """The launcher works out a launch's tile rows, BLOCK_K and split count once per (shape, config object): the same
    dict gives the same plan back without recomputing it, another dict (or another M) gets its own, and a bad REDUCE
    is refused on every call (it is never kept)."""
    from lmq.kernels import w4a16_gemm as gemm_module

    dev = torch.device("cpu")
    cfg = {**INTERPRET_CONFIG, "BLOCK_M_MAX": 64, "WAVES": 4}
    first = gemm_module._plan(5, 96, 640, 64, dev, cfg)
    assert gemm_module._plan(5, 96, 640, 64, dev, cfg)[0] is first[0]  # kept
    assert first[1:] == (128, 5, False) and first[0]["BLOCK_M"] == 16
    assert gemm_module._plan(40, 96, 640, 64, dev, cfg)[0]["BLOCK_M"] == 64  # another M, its own rows per tile
    other = gemm_module._plan(5, 96, 640, 64, dev, {**cfg, "SPLIT_K": 2, "REDUCE": "ordered"})
    assert other[2:] == (2, True)
    for _ in range(2):
        with pytest.raises(ValueError, match="REDUCE"):
            gemm_module._plan(5, 96, 640, 64, dev, {**cfg, "REDUCE": "fixed"})


@pytest.mark.parametrize("M", [1, 3])
def test_qlinear_rope_rotates_only_on_the_gemv_path(M, device):
    """`qlinear_rope` (a qkv weight whose RoPE can be fused): at M=1 the GEMV rotates q and k in its
    epilogue; at larger M it returns the plain product and says the caller must rotate."""
    from lmq.kernels.rope import apply_rope_ref, rope_cos_sin, rope_inv_freq

    from lmq.engine.qlinear import qlinear_rope

    H, Hkv, D, G = 2, 1, 64, 64
    N, K = (H + 2 * Hkv) * D, 256
    p = random_packed(N, K, G, device)
    cos, sin = rope_cos_sin(rope_inv_freq(D), 64, device)
    x = torch.randn(M, K, device=device).half()
    positions = torch.arange(5, 5 + M, dtype=torch.int32, device=device)
    rope_cols = (H + Hkv) * D
    out, roped = qlinear_rope(x, p["qweight"], p["scales"], p["zeros"], G, CONFIGS["sm90"],
                              (positions, cos, sin, rope_cols))
    y = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)  # [M, N]
    assert roped == (M == 1)
    if roped:
        qk = apply_rope_ref(y[:, :rope_cols].view(M, H + Hkv, D), positions, cos, sin).view(M, rope_cols)
        y = torch.cat([qk, y[:, rope_cols:]], dim=1)
    assert rel_err(out, y) < TOL[torch.float16]


@pytest.mark.parametrize("G", [32, 128])
def test_dequant_matches_ref(G, device):
    N, K = 40, 256
    p = random_packed(N, K, G, device)
    w = w4a16_dequant(p["qweight"], p["scales"], p["zeros"], G)
    ref = w4a16_dequant_ref(p["qweight"], p["scales"], p["zeros"], G)
    assert w.shape == (N, K)
    torch.testing.assert_close(w, ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("M", [1, 8, 40, 300])
def test_qlinear_every_path(M, device):
    """The dispatcher's three paths (decode, prefill, dequant + matmul) give the reference result."""
    N, K, G = 40, 128, 64
    table = {**CONFIGS["sm80"], "gemv_max_m": 1, "gemv_min_numel": 0, "decode_max_m": 16, "dequant_min_m": 256}
    p = random_packed(N, K, G, device)
    bias = torch.randn(N, device=device).half()
    x = torch.randn(M, K, device=device).half()
    out = qlinear(x, p["qweight"], p["scales"], p["zeros"], G, table, bias)
    ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G).float() + bias.float()
    assert rel_err(out, ref) < TOL[torch.float16]
    assert choose_path(M, table, N * K) == {1: "gemv", 8: "decode", 40: "prefill", 300: "dequant"}[M]
    assert choose_path(1, {**table, "gemv_min_numel": N * K + 1}, N * K) == "decode"  # small weights
    assert choose_path(40, {**table, "prefill_min_numel": N * K + 1}, N * K) == "dequant"  # small weights
    assert choose_path(8, {**table, "prefill_min_m": 8}, N * K) == "prefill"  # large weights leave decode early
    assert choose_path(8, {**table, "prefill_min_m": 8, "prefill_min_numel": N * K + 1}, N * K) == "decode"


def test_two_row_gemv_takes_small_weights_only():
    """sm90: M=2 runs the GEMV with two rows per program for weights up to `gemv_rows_max_numel` (Llama-3-8B's qkv,
    o_proj and down), the decode kernel for larger ones (gate_up); M=1 takes the GEMV whatever the size; M=3 never."""
    table = CONFIGS["sm90"]
    assert table["gemv"]["ROWS"] == 2 and table["gemv_max_m"] == 2
    for (N, K), two in (((6144, 4096), "gemv"), ((4096, 4096), "gemv"), ((28672, 4096), "decode"),
                        ((4096, 14336), "gemv")):
        assert choose_path(1, table, N * K) == "gemv"
        assert choose_path(2, table, N * K) == two, (N, K)
        assert choose_path(3, table, N * K) == ("direct" if N * K <= 64 << 20 else "decode")
    assert choose_path(2, {**table, "gemv_rows_max_numel": 1 << 40}, 28672 * 4096) == "gemv"
    # where a GEMV program serves one row only (bf16, groups of 32), M=2 would read the weights twice: decode kernel
    assert not serves_rows(torch.bfloat16, 128, table["gemv"]) and not serves_rows(torch.float16, 32, table["gemv"])
    assert serves_rows(torch.float16, 64, table["gemv"])
    from lmq.engine.qlinear import engine_table

    assert engine_table("sm90", dtype=torch.float16, group_size=64) is table  # bound at load: unchanged here
    for one_row in (engine_table("sm90", dtype=torch.bfloat16), engine_table("sm90", group_size=32),
                    engine_table("sm90", True, torch.bfloat16, 128)):
        assert choose_path(2, one_row, 4096 * 4096) == ("direct" if "direct" in one_row else "decode")  # no GEMV
        assert choose_path(2, one_row, 28672 * 4096) == "decode"
        assert choose_path(1, one_row, 4096 * 4096) == "gemv"
    for arch in ("sm75", "sm80", "sm86", "sm89"):  # not measured there: one row, M=1 only
        assert CONFIGS[arch]["gemv_max_m"] == 1 and CONFIGS[arch]["gemv"].get("ROWS", 1) == 1


def test_direct_path_small_m_and_its_fallback(device, monkeypatch):
    """sm90, M = 3..16 for weights up to 64M elements and up to M = 64 for weights up to 20M (`direct_rows`): the
    direct kernel (w4a16_gemm_direct); where it cannot run (not Hopper: the interpreter here; more rows than its
    tiles) the dispatcher takes the decode kernel, same result. The deterministic table has no direct path (its
    splits add with fp16 atomics in any order)."""
    from lmq.engine.qlinear import engine_table

    table = CONFIGS["sm90"]
    assert choose_path(16, table, 6144 * 4096) == "direct" and choose_path(17, table, 6144 * 4096) == "decode"
    assert choose_path(64, table, 4096 * 4096) == "direct" and choose_path(65, table, 4096 * 4096) == "decode"
    assert choose_path(3, table, 4096 * 14336) == "direct" and choose_path(16, table, 4096 * 14336) == "direct"
    assert choose_path(3, table, (64 << 20) + 1) == "decode" and choose_path(17, table, 4096 * 14336) == "decode"
    assert "direct" not in engine_table("sm90", deterministic=True)
    assert "direct" not in engine_table("sm90", dtype=torch.bfloat16)  # slower than the decode kernel there
    assert "direct" in engine_table("sm90", dtype=torch.float16, group_size=32)
    assert choose_path(8, engine_table("sm90", deterministic=True), 4096 * 4096) == "decode"
    N, K, G = 40, 128, 64
    p = random_packed(N, K, G, device)
    x = torch.randn(65, K, device=device).half()  # more rows than its tiles (and on the CPU: not Hopper)
    with pytest.raises(UnsupportedError, match="use w4a16_gemm"):
        direct_module.w4a16_gemm_direct(x, p["qweight"], p["scales"], p["zeros"], G)
    calls = []
    real = qlinear_module.w4a16_gemm
    monkeypatch.setattr(qlinear_module, "w4a16_gemm", lambda *a: calls.append(a) or real(*a))
    wide = {**table, "direct_rows": ((128, N * K),)}
    assert choose_path(65, wide, N * K) == "direct"
    out = qlinear(x, p["qweight"], p["scales"], p["zeros"], G, wide)
    assert len(calls) == 1  # the decode kernel ran instead
    assert rel_err(out, w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[torch.float16]


def test_direct_plan():
    """About WAVES programs per SM over the column tiles; splits hold a multiple of STEP chunks, none is empty, and a
    split's x tile never passes MAX_X_BYTES (more splits instead); configs the kernel is not written for are refused."""
    cfg = direct_module.DEFAULT_CONFIG
    plan = direct_module.plan
    for N, K in ((6144, 4096), (4096, 4096), (4096, 14336), (576, 576), (24, 1024), (28672, 4096), (128, 131072),
                 (1024, 16384)):
        for c in (cfg, {**cfg, "STEP": 4}, {**cfg, "BLOCK_N": 64, "WAVES": 8}, {**cfg, "MAX_SPLIT": 1}):
            for M, elem in ((3, 2), (64, 2), (64, 4)):
                bm, splits, per = plan(M, N, K, c, 16, elem)  # 16 SMs (a MIG slice): few splits wanted
                chunks = K // 64
                assert per % c["STEP"] == 0 and splits * per >= chunks and (splits - 1) * per < chunks, (N, K, c)
                assert bm * per * 64 * elem <= direct_module.MAX_X_BYTES, (M, N, K, c, per)
    assert plan(16, 6144, 4096, cfg, 132) == (16, 11, 6)  # 48 tiles x 11 splits: 528 programs, 4 per SM
    assert plan(3, 4096, 14336, cfg, 132) == (16, 16, 14)  # 32 tiles x 17 wanted: 14 chunks each, 16 splits
    assert plan(3, 576, 576, cfg, 132) == (16, 5, 2)  # 9 chunks: the last split holds one
    assert plan(17, 4096, 4096, cfg, 132) == (32, 8, 8)  # from M=17: 2 waves, 32 rows
    assert plan(64, 4096, 4096, cfg, 132) == (64, 8, 8)  # x tile 64 x 512 fp16: 64 KB
    # 2 wanted, but 20 chunks of 64 rows is 160 KB: 103 splits (past MAX_SPLIT), 2,048 chunks spread over them
    assert plan(64, 128, 131072, cfg, 132) == (64, 103, 20)
    assert plan(64, 128, 42 * 64, cfg, 1) == (64, 3, 14)  # 42 chunks under a 20-chunk cap: 14 / 14 / 14, not 20 / 20 / 2
    for bad in ({"STEP": 3}, {"BLOCK_N": 96}, {"BLOCK_M_MAX": 48}, {"MAX_X_BYTES": 1 << 10}, {"MAX_X_BYTES": 1 << 20}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            direct_module.check_config({**cfg, **bad})
    direct_module.check_config(cfg)


def test_qlinear_module(device):
    p = random_packed(24, 128, 32, device)
    lin = QLinear(p["qweight"], p["scales"], p["zeros"], 32, arch="sm90")
    x = torch.randn(2, 3, 128, device=device).half()
    assert lin(x).shape == (2, 3, 24)
    assert lin.in_features == 128 and lin.out_features == 24


def test_invalid_inputs_raise(device):
    N, K, G = 40, 256, 64
    p = random_packed(N, K, G, device)
    args = (p["qweight"], p["scales"], p["zeros"])
    with pytest.raises(ShapeError, match="float16 or bfloat16"):
        w4a16_gemm(torch.randn(2, K, device=device), *args, G)
    with pytest.raises(ShapeError, match="K=256"):
        w4a16_gemm(torch.randn(2, K + 64, device=device).half(), *args, G)
    with pytest.raises(ShapeError, match="scales must be"):
        w4a16_gemm(torch.randn(2, K, device=device).half(), *args, 128)  # wrong group size for scales
    with pytest.raises(ShapeError, match="group size 48"):
        w4a16_gemm(torch.randn(2, K, device=device).half(), *args, 48)
    with pytest.raises(ShapeError, match="qweight must be int16"):
        w4a16_gemm(torch.randn(2, K, device=device).half(), p["qweight"].to(torch.int32), *args[1:], G)
    with pytest.raises(ShapeError, match="contiguous"):
        w4a16_gemm(torch.randn(2, K, device=device).half(), *args[:2], p["zeros"].t().contiguous().t(), G)


# ---------------------------------------------------------------------------------------------
# GPU: every arch's configurations, bf16, model-sized shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_gemm_gpu_configs(arch, regime, dtype):
    for (N, K, G) in [(576, 1536, 32), (1536, 576, 64), (4096, 4096, 128)]:
        p = random_packed(N, K, G, "cuda")
        for M in ([1, 2, 3, 16, 17, 33, 64, 100] if regime == "decode" else [17, 127, 300]):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            out = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, CONFIGS[arch][regime])
            ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)
            assert rel_err(out, ref) < TOL[dtype], (arch, regime, N, K, G, M)


def test_sm90_crossovers():
    """The sm90 table's dispatch by M, for any weight size: GEMV (at M=2 weights up to 64M elements only), the direct
    kernel (M = 3..16 for weights up to 64M elements, to M=64 up to 20M), decode kernel, the Hopper prefill kernel from 192 rows (where its GPU time wins on every Llama-3-8B shape),
    dequantize + cuBLAS from 8192."""
    table = CONFIGS["sm90"]
    for numel in (576 * 1536, 4096 * 4096, 6144 * 4096, 4096 * 14336, 28672 * 4096):
        small, smaller = numel <= 64 << 20, numel <= 20 << 20  # direct kernel to M=16 / to M=64
        assert [choose_path(M, table, numel) for M in (1, 2, 3, 16, 17, 64, 65, 191, 192, 8191, 8192)] == [
            "gemv", "gemv" if numel <= 64 << 20 else "decode", "direct" if small else "decode",
            "direct" if small else "decode",
            "direct" if smaller else "decode", "direct" if smaller else "decode", "decode", "decode", "prefill",
            "prefill", "dequant"]


def test_gemm_ws_plan():
    """Tile rows drop to BLOCK_M_SMALL when the 256-row tiles do not cover the SMs; K splits only when
    that fills the SMs better (never into an empty split); an explicit SPLIT_K is kept."""
    cfg = w4a16_gemm_ws_module.DEFAULT_CONFIG
    plan = w4a16_gemm_ws_module.plan
    assert plan(1024, 28672, 4096, cfg, 132) == (256, 128, 1)  # 896 tiles
    assert plan(256, 28672, 4096, cfg, 132) == (256, 128, 1)  # 224 tiles: already more than the SMs
    assert plan(1024, 4096, 4096, cfg, 132) == (256, 128, 1)  # 128 tiles: nearly one full wave
    assert plan(512, 4096, 4096, cfg, 132) == (128, 128, 1)  # 64 tiles of 256 rows -> 128 of 128
    assert plan(256, 4096, 4096, cfg, 132) == (128, 128, 2)  # 32 -> 64 tiles -> 128 work items
    assert plan(256, 6144, 4096, cfg, 132) == (128, 128, 1)  # 96 tiles: 2 splits fill no better
    assert plan(256, 6144, 4096, {**cfg, "MAX_SPLIT": 4}, 132) == (128, 128, 4)  # 4 would (3 would not)
    # more tiles than SMs: SPLIT_WAVES splits only for a much fuller last wave
    assert plan(1024, 6144, 4096, cfg, 132) == (256, 128, 2)  # 192 tiles: 73% busy -> 384 items: 97%
    assert plan(1024, 6144, 4096, {**cfg, "SPLIT_WAVES": 0}, 132) == (256, 128, 1)
    assert plan(128, 28672, 4096, cfg, 132) == (128, 128, 1)  # 224 tiles either way: the smaller one
    assert plan(2048, 6144, 4096, cfg, 132) == (256, 128, 1)  # 384 tiles: 97% already
    assert plan(1, 576, 1536, {**cfg, "BLOCK_M": 64}, 132)[0] == 64  # BLOCK_M_SMALL never grows a tile
    assert plan(0, 4096, 4096, cfg, 132)[2] == 1
    assert plan(300, 576, 576, cfg, 132) == (128, 128, 1)  # 9 chunks: too few to split
    assert plan(17, 576, 1536, {**cfg, "SPLIT_K": 4}, 132)[2] == 4
    assert plan(17, 576, 576, {**cfg, "SPLIT_K": 4}, 132)[2] == 3  # 9 chunks in 4 splits of 3: one would be empty


def test_gemm_ws_refuses_what_it_cannot_run(device, monkeypatch):
    """Not Hopper / not fp16 or bf16 / N % 16: a clear error naming the fix; the dispatcher then takes dequantize +
    cuBLAS."""
    N, K, G = 40, 256, 64
    p = random_packed(N, K, G, device)
    x = torch.randn(300, K, device=device).half()
    with pytest.raises(UnsupportedError, match="use w4a16_gemm"):
        w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], G)
    table = {**CONFIGS["sm90"], "decode_max_m": 1, "dequant_min_m": 4096, "prefill_min_numel": 0}
    assert choose_path(300, table) == "prefill"
    calls = []
    monkeypatch.setattr(qlinear_module, "w4a16_dequant", lambda *a: calls.append(a) or w4a16_dequant(*a))
    out = qlinear(x, p["qweight"], p["scales"], p["zeros"], G, table)
    assert len(calls) == 1  # the prefill path fell back to dequantize + cuBLAS
    assert rel_err(out, w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[torch.float16]


def broken_launch(tries: list, message: str):
    """A kernel launcher (DirectLaunch) whose every launch counts itself in `tries` and fails as a build would."""
    from lmq.kernels.launch import DirectLaunch

    class Broken:
        arg_names = ()

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tries.append(grid)
                raise RuntimeError(message)
            return launch

    return DirectLaunch(Broken())


@pytest.mark.parametrize("kind", ["ws", "direct"])
def test_gluon_kernel_that_does_not_build_falls_back_once(kind, monkeypatch, device):
    """A Triton whose Gluon API moved: the first launch warns, that call and every later one take the other path
    (the prefill kernel: dequantize + cuBLAS; the small-M direct kernel: the decode kernel), and the kernel is not
    tried again. The prefill kernel's build error is one BUILD_ERRORS names, the direct kernel's a failing pass."""
    from lmq.kernels import gluon_build

    mod = w4a16_gemm_ws_module if kind == "ws" else direct_module
    N, K, G = 64, 256, 64
    p = random_packed(N, K, G, device)
    x = torch.randn(300 if kind == "ws" else 5, K, device=device).half()
    tries = []
    message = "unknown op" if kind == "ws" else "PassManager::run failed"
    monkeypatch.setattr(mod, "_LAUNCH", broken_launch(tries, message))
    if kind == "ws":
        monkeypatch.setattr(gluon_build, "BUILD_ERRORS", (RuntimeError,))
    monkeypatch.setattr(mod.BUILD, "failed", None)
    # as on a Hopper GPU, until the build fails
    monkeypatch.setattr(mod, "supported" if kind == "ws" else "_can_run", lambda *a: mod.BUILD.failed is None)
    table = ({**CONFIGS["sm90"], "decode_max_m": 1, "dequant_min_m": 4096, "prefill_min_numel": 0} if kind == "ws"
             else {**CONFIGS["sm90"], "direct_rows": ((16, N * K),)})
    ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)
    with pytest.warns(RuntimeWarning, match=("" if kind == "ws" else "small-M GEMM .* ")
                      + "does not build with this Triton"):
        out = qlinear(x, p["qweight"], p["scales"], p["zeros"], G, table)
    assert rel_err(out, ref) < TOL[torch.float16]
    assert rel_err(qlinear(x, p["qweight"], p["scales"], p["zeros"], G, table), ref) < TOL[torch.float16]
    assert len(tries) == 1 and message.split(":")[0] in mod.BUILD.failed


def test_build_guard_tells_build_failures_from_launch_errors():
    # the Gluon kernels' shared fallback: a failing lowering pass is a build failure (recorded, warned once,
    # every later call refused); any other RuntimeError (a CUDA error at launch) is not
    from lmq.kernels.gluon_build import BuildGuard, KernelUnavailable

    guard = BuildGuard("a test kernel", "the other path runs")
    assert guard.failure(RuntimeError("CUDA error: an illegal memory access")) is None and guard.failed is None
    guard.check()
    with pytest.warns(RuntimeWarning, match="a test kernel does not build with this Triton"):
        unavailable = guard.failure(RuntimeError("PassManager::run failed"))
    assert isinstance(unavailable, KernelUnavailable) and "PassManager" in guard.failed
    with pytest.raises(KernelUnavailable, match="PassManager"):
        guard.check()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, {"SPLIT_K": 3}, {"BLOCK_M": 128, "BLOCK_M_SMALL": 0, "STAGES": 6},
                                    {"BLOCK_M": 64, "STAGES": 3}])
def test_gemm_ws_gpu(config, dtype):
    """The warp-specialized Hopper prefill kernel against its twin: M, N, K off the tile, every group size."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("w4a16_gemm_ws is a Hopper (sm90) kernel")
    # against the twin (the same w_hat): the output's own rounding, 2^-11 (fp16) or 2^-8 (bf16)
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    for (N, K, G) in [(576, 1536, 32), (1536, 576, 64), (4096, 4096, 128), (6144, 4096, 128)]:
        p = random_packed(N, K, G, "cuda")
        empty = w4a16_gemm_ws(torch.randn(0, K, device="cuda", dtype=dtype), p["qweight"], p["scales"], p["zeros"], G)
        assert empty.shape == (0, N) and empty.dtype == dtype
        odd = torch.randn(3 * K + 1, device="cuda").to(dtype)[1:].view(3, K)  # starts 2 bytes off 16: copied
        assert rel_err(w4a16_gemm_ws(odd, p["qweight"], p["scales"], p["zeros"], G, config),
                       w4a16_gemm_ws_ref(odd, p["qweight"], p["scales"], p["zeros"], G)) < tol
        for M in (1, 17, 127, 300, 1024):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            out = w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], G, config)
            ref = w4a16_gemm_ws_ref(x, p["qweight"], p["scales"], p["zeros"], G)
            assert out.dtype == dtype and rel_err(out, ref) < tol, (N, K, G, M)
            assert rel_err(out, w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["prefill", "decode"])
def test_direct_launch_gpu(kernel, monkeypatch):
    """The direct launch (lmq.kernels.launch): after the first launch of a kind, the compiled kernel is called
    directly. The Hopper prefill kernel gives the bits Triton's own launch gives, for M that share a kind and M
    that do not (1, multiples of 16, others; split and unsplit); the decode kernel (fp16 atomics over its K
    splits: the order of the adds varies) the same values within rounding; the direct call is taken and works."""
    from lmq.kernels import launch
    from lmq.kernels import w4a16_gemm as decode_module
    from lmq.kernels import w4a16_gemm_ws as ws

    if kernel == "prefill" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("w4a16_gemm_ws is a Hopper (sm90) kernel")
    N, K, G = 4096, 4096, 128
    p = random_packed(N, K, G, "cuda")
    if kernel == "prefill":
        module, ms = ws, (1, 16, 17, 48, 127, 256, 300, 1024, 1000)
        run = lambda x: w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], G)
    else:
        module, ms = decode_module, (1, 2, 16, 17, 33, 64, 100, 128)
        cfg = CONFIGS["sm90" if torch.cuda.get_device_capability()[0] == 9 else "sm80"]["decode"]
        run = lambda x: w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for M in ms]
    xs.append(torch.randn(17 * K + 1, device="cuda", dtype=torch.float16)[1:].view(17, K))  # x 2 bytes off 16
    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    slow = [run(x) for x in xs]
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    calls = []
    direct = launch.DirectLaunch(_Counting(module._LAUNCH.kernel, calls))
    monkeypatch.setattr(module, "_LAUNCH", direct)
    for rep in range(2):
        for x, want in zip(xs, slow):
            out = run(x)
            if kernel == "prefill":  # split-K adds two fp16 partials: the same bits in either order
                assert torch.equal(out, want), x.shape[0]
            else:
                assert rel_err(out, want) < 1e-3, (x.shape[0], rel_err(out, want))
        if rep == 0:
            first = len(calls)
    # through Triton once per kind (fewer kinds than inputs for the prefill kernel), directly after that
    assert len(calls) == first == len(direct.compiled) and (kernel == "decode" or first < len(xs))


class _Counting:
    """A kernel whose launches through Triton (`kernel[grid](...)`) are counted."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls, self.arg_names, self.params = kernel, calls, kernel.arg_names, kernel.params

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def test_gemm_ws_weight_descriptors_live_with_their_owner(device):
    """The prefill kernel's weight descriptors are made once per tile height and kept in the dict the
    weight's owner passes (QLinear.descs): the same objects on the next call, nothing kept anywhere else,
    and the old ones dropped when the weights move to a new storage."""
    import gc
    import weakref

    from lmq.kernels.w4a16_gemm_ws import weight_descriptors

    p = random_packed(64, 256, 64, device)
    held = {}
    first = weight_descriptors(p["qweight"], p["scales"], p["zeros"], 128, held)
    assert weight_descriptors(p["qweight"], p["scales"], p["zeros"], 128, held) is first
    weight_descriptors(p["qweight"], p["scales"], p["zeros"], 64, held)
    assert len(held) == 2 and first[0].base.data_ptr() == p["qweight"].data_ptr()
    moved = {k: v.clone() for k, v in p.items()}
    old = weakref.ref(p["qweight"])
    weight_descriptors(moved["qweight"], moved["scales"], moved["zeros"], 128, held)
    assert len(held) == 1  # only the new storage's
    del p, first
    gc.collect()
    assert old() is None  # nothing else held the old weight
    lin = QLinear(moved["qweight"], moved["scales"], moved["zeros"], 64, "sm90")
    assert lin.descs == {}
    lin.descs[("stale",)] = held[next(iter(held))]
    lin.cpu()  # .to() / .cuda() / .cpu() go through Module._apply, which may replace the buffers
    assert lin.descs == {}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, {"BLOCK_N": 64, "WAVES": 8}, {"STEP": 1}, {"STEP": 4}, {"MAX_SPLIT": 1}])
def test_gemm_direct_gpu(config, dtype, monkeypatch):
    """The small-M Hopper kernel against its twin (w_hat rounded to x's dtype, as it rounds): N off the tile, K not a
    multiple of the step, every group size, M = 1..64; the dispatcher takes it at M = 8 and 64 for o_proj. The
    bound is the decode kernel's (`TOL`): many K splits, each partial sum rounded to the dtype and added in it
    (STEP 1 on qkv read 1.01e-3 against the twin, above the prefill kernel's 1e-3 for at most two splits)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("w4a16_gemm_direct is a Hopper (sm90) kernel")
    tol = TOL[dtype]
    for (N, K, G) in [(576, 1536, 32), (1000, 576, 64), (24, 1024, 128), (6144, 4096, 128)]:
        p = random_packed(N, K, G, "cuda")
        empty = direct_module.w4a16_gemm_direct(torch.randn(0, K, device="cuda", dtype=dtype), p["qweight"],
                                                p["scales"], p["zeros"], G, config)
        assert empty.shape == (0, N)
        odd = torch.randn(3 * K + 1, device="cuda").to(dtype)[1:].view(3, K)  # starts 2 bytes off 16: copied
        assert rel_err(direct_module.w4a16_gemm_direct(odd, p["qweight"], p["scales"], p["zeros"], G, config),
                       w4a16_gemm_ws_ref(odd, p["qweight"], p["scales"], p["zeros"], G)) < tol
        for M in (1, 3, 8, 16, 17, 40, 64):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            out = direct_module.w4a16_gemm_direct(x, p["qweight"], p["scales"], p["zeros"], G, config)
            assert out.dtype == dtype and out.shape == (M, N)
            assert rel_err(out, w4a16_gemm_ws_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < tol, (N, K, G, M)
        with pytest.raises(UnsupportedError, match="at most 64 rows"):
            direct_module.w4a16_gemm_direct(torch.randn(65, K, device="cuda", dtype=dtype), p["qweight"], p["scales"],
                                            p["zeros"], G, config)
    table = CONFIGS["sm90"]
    p = random_packed(4096, 4096, 128, "cuda")
    calls = []
    real = qlinear_module.w4a16_gemm
    monkeypatch.setattr(qlinear_module, "w4a16_gemm", lambda *a: calls.append(a) or real(*a))
    for M in (8, 64):
        x = torch.randn(M, 4096, device="cuda", dtype=dtype)
        assert choose_path(M, table, 4096 * 4096) == "direct"
        assert rel_err(qlinear(x, p["qweight"], p["scales"], p["zeros"], 128, table),
                       w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], 128)) < TOL[dtype]
    assert not calls  # the direct kernel ran, not the decode kernel


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["direct", "decode"])
def test_split_k_pdl_chain_in_graph_gpu(path, monkeypatch):
    """Split-K calls chained in one CUDA graph, each call's x the previous call's output and no intermediate kept (so
    the graph's pool hands a later call's output the memory an earlier call still reads), with the zero fill launched
    early and each GEMM letting the next kernel launch (lmq.kernels.pdl): 16-row tiles (trigger at the start) and 64
    (after the K loop). The chain's end is right on every replay (poisoned with NaN between replays): a fill that
    wrote before the kernel before it finished, or a GEMM that read x or added before its wait, would show. The same
    with plain launches and with PDL off altogether (`LMQ_PDL=0`: torch.zeros, no fill kernel launched)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("PDL and w4a16_gemm_direct: Hopper (sm90)")
    K = 4096
    p = random_packed(K, K, 128, "cuda")  # square: a call's output is the next call's x
    run = {"direct": lambda x: direct_module.w4a16_gemm_direct(x, p["qweight"], p["scales"], p["zeros"], 128),
           "decode": lambda x: w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], 128, CONFIGS["sm90"]["decode"])}[path]
    xs = [torch.randn(m, K, device="cuda", dtype=torch.float16) for m in (3, 16, 40)]
    refs = []
    for x in xs:
        r = x
        for _ in range(3):
            r = w4a16_gemm_ws_ref(r, p["qweight"], p["scales"], p["zeros"], 128)
        refs.append(r)
    ends = {}
    for mode in ("pdl", "plain", "off"):
        for mod in (pdl_module, direct_module, gemm_module):
            monkeypatch.setattr(mod, "ZERO_KERNEL" if mod is pdl_module else "PDL", mode == "pdl")
        monkeypatch.setattr(pdl_module, "_ENABLED", mode != "off")
        if mode == "off":
            monkeypatch.setattr(pdl_module, "_ZEROS", None)  # launching the fill kernel would raise
        for x in xs:
            run(run(x))  # compile and plan outside the capture
        torch.cuda.synchronize()
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.graph(graph, stream=side):
            outs = [run(run(run(x))) for x in xs]
        for _ in range(3):
            for o in outs:
                o.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            for o, ref, x in zip(outs, refs, xs):
                assert rel_err(o, ref) < 3 * TOL[torch.float16], (path, mode, x.shape[0])
        ends[mode] = [o.clone() for o in outs]
    for mode in ("plain", "off"):
        for a, b in zip(ends["pdl"], ends[mode]):
            assert rel_err(a, b) < 3 * TOL[torch.float16]


def test_zero_filled_without_pdl(monkeypatch):
    """Where `use_pdl` says no (the CPU here; `LMQ_PDL=0` or compute capability below 9.0 on a GPU) the fill is
    torch.zeros and the fill kernel is not launched."""
    monkeypatch.setattr(pdl_module, "_ZEROS", None)  # launching the fill kernel would raise
    out = pdl_module.zero_filled((3, 5), torch.float16, torch.device("cpu"))
    assert out.dtype == torch.float16 and out.shape == (3, 5) and not out.any()
    assert not pdl_module.use_pdl(torch.device("cpu"))


@pytest.mark.gpu
def test_gemm_ws_gpu_through_qlinear():
    """QLinear on the prefill path (Hopper, fp16): its descriptors are kept and reused, results unchanged."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("w4a16_gemm_ws is a Hopper (sm90) kernel")
    N, K, G = 6144, 4096, 128
    p = random_packed(N, K, G, "cuda")
    lin = QLinear(p["qweight"], p["scales"], p["zeros"], G, "sm90")
    x = torch.randn(512, K, device="cuda", dtype=torch.float16)
    lin.table = {**lin.table, "prefill_min_numel": 0}
    assert choose_path(512, lin.table) == "prefill"
    out = lin(x)
    kept = dict(lin.descs)
    assert len(kept) == 1
    again = lin(x)
    assert list(lin.descs) == list(kept) and all(lin.descs[k] is kept[k] for k in kept)  # the same objects
    assert torch.equal(out, again)
    lin.cpu()
    assert lin.descs == {}  # moved: the old storage's descriptors are gone
    assert rel_err(out, w4a16_gemm_ws_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_gpu(dtype):
    """The table's GEMV, with 1 or 2 rows per program; its "fixed" split-K gives the same bits on every call."""
    table = CONFIGS["sm90"]["gemv"]
    for (N, K, G) in [(576, 1536, 32), (1536, 576, 64), (4096, 4096, 128)]:
        p = random_packed(N, K, G, "cuda")
        for cfg in ({**table, "ROWS": 1}, {**table, "ROWS": 2}):
            for M in (1, 2, 3, 5):
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                out = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
                assert rel_err(out, w4a16_gemv_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[dtype], \
                    (N, K, G, M, cfg)
                assert torch.equal(out, w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_and_dispatch_gpu(dtype):
    N, K, G = 1536, 576, 64
    p = random_packed(N, K, G, "cuda")
    w = w4a16_dequant(p["qweight"], p["scales"], p["zeros"], G, dtype)
    torch.testing.assert_close(w, w4a16_dequant_ref(p["qweight"], p["scales"], p["zeros"], G, dtype))
    table = CONFIGS["sm90"]
    for M in (1, 2, 64, 65, 300, 1024, 4096, 8192):  # sm90: gemv, decode, the warp-specialized prefill, dequantize
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        out = qlinear(x, p["qweight"], p["scales"], p["zeros"], G, table)
        assert rel_err(out, w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G)) < TOL[dtype]


def test_runtime_imports_no_quantizer():
    """The dispatcher and kernels load without lmq.quant (the runtime imports no calibration machinery)."""
    import subprocess
    import sys

    code = "import sys, lmq.engine.qlinear; print(sorted(m for m in sys.modules if m.startswith('lmq.quant')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
