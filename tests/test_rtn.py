import pytest
import torch

from lmq.errors import ShapeError
from lmq.quant.rtn import dequantize, fake_quantize, quantize


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rtn_codes_in_range_and_error_within_half_step(group_size, zero_point, dtype):
    N, K = 48, 4 * group_size
    w = (torch.randn(N, K) * torch.rand(N, 1) * 0.1).to(dtype)
    w[0, :5] = torch.tensor([3.0, -2.0, 0.5, 0.0, 1e-3]).to(dtype)  # an outlier row
    q = quantize(w, 4, group_size, zero_point)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (N, K)
    assert int(q.codes.max()) <= 15 and q.scales.shape == (N, K // group_size)
    assert q.scales.dtype == torch.float16 and bool((q.scales > 0).all())
    assert int(q.zeros.max()) <= 15
    if not zero_point:
        assert bool((q.zeros == 8).all())
    err = (w.float() - q.dequantize()).abs().reshape(N, K // group_size, group_size)
    bound = q.scales.float()[..., None] / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-12).all()), float((err - bound).max())


def test_asymmetric_uses_the_whole_code_range():
    w = torch.randn(16, 128)
    q = quantize(w, 4, 64, True)
    cg = q.codes.reshape(16, 2, 64)
    assert bool((cg.amax(-1) == 15).all()) or bool((cg.amin(-1) == 0).all())


def test_fake_quantize_equals_dequantized_codes_and_keeps_dtype():
    w = torch.randn(32, 256, dtype=torch.float16)
    fq = fake_quantize(w, 4, 128)
    assert fq.dtype == torch.float16
    assert torch.equal(fq, quantize(w, 4, 128).dequantize(torch.float16))
    assert len(torch.unique(fq[0, :128])) <= 16


def test_dequantize_formula():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (8, 2), dtype=torch.uint8)
    scales = torch.rand(8, 2).half() + 0.01
    w = dequantize(codes, scales, zeros, 32)
    k = 40
    assert torch.allclose(w[:, k], (codes[:, k].float() - zeros[:, 1].float()) * scales[:, 1].float())


def test_group_size_must_divide_k_and_error_names_the_layer():
    with pytest.raises(ShapeError, match=r"K=576.*model\.layers\.0\.mlp\.up_proj.*--group-size 64 or 32"):
        quantize(torch.randn(8, 576), 4, 128, name="model.layers.0.mlp.up_proj")


def test_unsupported_bits_and_shapes_raise():
    with pytest.raises(ShapeError, match=r"--bits 3 is not supported: lmq quantizes to 4 bits; pass --bits 4"):
        quantize(torch.randn(8, 128), 3, 128)
    with pytest.raises(ShapeError, match="2-D"):
        quantize(torch.randn(8, 128, 2), 4, 128)

