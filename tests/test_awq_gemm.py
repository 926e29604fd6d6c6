import pytest
import torch

from lmq.errors import CheckpointError, ShapeError
from lmq.format import awq_gemm
from lmq.quant.rtn import QuantizedWeight, quantize


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """The AutoAWQ gemm packing written out independently: intweight [K, N] -> int32 [K, N/8]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    K, N = intweight.shape
    out = torch.zeros(K, N // 8, dtype=torch.int64)
    for col in range(N // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int64) << (i * 4)
    return (out - (out >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


@pytest.mark.parametrize("N,K,G", [(8, 32, 32), (64, 128, 64), (1536, 576, 64), (40, 96, 32)])
def test_pack_unpack_exact_round_trip(N, K, G):
    q = quantize(torch.randn(N, K), 4, G, True)
    t = awq_gemm.pack(q)
    assert t["qweight"].shape == (K, N // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (K // G, N // 8) and t["scales"].shape == (K // G, N)
    back = awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], G)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.scales, q.scales)


def test_layout_matches_autoawq_packing():
    N, K, G = 32, 64, 32
    q = quantize(torch.randn(N, K), 4, G, True)
    t = awq_gemm.pack(q)
    assert torch.equal(t["qweight"], autoawq_pack(q.codes.t()))
    assert torch.equal(t["qzeros"], autoawq_pack(q.zeros.t()))
    # one word by hand: column 0 -> nibble 0, column 1 -> nibble 4, column 2 -> nibble 1
    codes = torch.zeros(8, G, dtype=torch.uint8)
    codes[1, 0], codes[2, 0] = 0xA, 0x3
    word = awq_gemm.pack(QuantizedWeight(codes, torch.ones(8, 1).half(), torch.zeros(8, 1, dtype=torch.uint8), 4, G))
    assert int(word["qweight"][0, 0]) == (0xA << 16) | (0x3 << 4)


def test_unpack_rejects_inconsistent_shapes():
    t = awq_gemm.pack(quantize(torch.randn(16, 128), 4, 64, True))
    with pytest.raises(CheckpointError, match="disagree"):
        awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], 32)
    with pytest.raises(CheckpointError, match="int32"):
        awq_gemm.unpack(t["qweight"].float(), t["qzeros"], t["scales"], 64)


def test_pack_needs_n_multiple_of_8():
    with pytest.raises(ShapeError, match="N=12"):
        awq_gemm.pack(quantize(torch.randn(12, 64), 4, 32, True))
