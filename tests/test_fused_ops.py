"""RMSNorm (+ fused residual add) and SiLU-and-mul kernels against their plain-PyTorch twins."""

from __future__ import annotations  # noqa: I001 (ruff files lmq.kernels under third-party)

import pytest
import torch

from lmq.errors import ShapeError
from lmq.kernels.rmsnorm import rms_norm, rms_norm_ref
from lmq.kernels.silu_mul import silu_mul, silu_mul_ref

# relative error ||out - ref|| / ||ref|| allowed per dtype (the refs compute in fp32 and round once;
# bf16 is looser: the CPU interpreter truncates fp32 -> bf16 instead of rounding)
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ROWS = [1, 2, 3, 17, 127]
DIMS = [64, 576, 1000]
EPS = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale + 0.1).to(dtype)  # never all zeros


# ----- RMSNorm -----

@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("T", ROWS)
def test_rms_norm_matches_ref(device, T, D, dtype, with_residual):
    x, w = rand(T, D, dtype=dtype, device=device, scale=3.0), rand(D, dtype=dtype, device=device)
    if not with_residual:
        out = rms_norm(x, w, EPS)
        assert out.shape == (T, D) and out.is_contiguous()
        assert rel_err(out, rms_norm_ref(x, w, EPS)) < TOL[dtype]
        return
    res = rand(T, D, dtype=dtype, device=device, scale=4.0)
    res_before = res.clone()
    want_out, want_res = rms_norm_ref(x, w, EPS, res_before)
    assert torch.equal(res, res_before)  # the ref is out of place
    out, new_res = rms_norm(x, w, EPS, residual=res)
    assert new_res.data_ptr() == res.data_ptr()  # written in place, and returned
    assert rel_err(new_res, want_res) < TOL[dtype]
    assert rel_err(out, want_out) < TOL[dtype]


def test_rms_norm_fp32_weight_on_fp16_rows(device):
    x, w = rand(5, 576, dtype=torch.float16, device=device), rand(576, dtype=torch.float32, device=device)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float16
    assert rel_err(out, rms_norm_ref(x, w, 1e-6)) < TOL[torch.float16]


def test_rms_norm_per_head_on_strided_view(device):
    # q/k norm: q is a [T, H, D] view into a fused qkv output, not contiguous across heads
    T, H, Hkv, D = 7, 4, 2, 64
    qkv = rand(T, (H + 2 * Hkv) * D, dtype=torch.float16, device=device, scale=2.0)
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D: (H + Hkv) * D].view(T, Hkv, D)
    w = rand(D, dtype=torch.float16, device=device)
    for t in (q, k):
        out = rms_norm(t, w, EPS)
        assert out.shape == t.shape
        assert rel_err(out, rms_norm_ref(t, w, EPS)) < TOL[torch.float16]
    # a residual given as a strided view is updated in place too
    res = rand(T, 2 * H * D, dtype=torch.float16, device=device)[:, : H * D].view(T, H, D)
    want_out, want_res = rms_norm_ref(q, w, EPS, res)
    out, new_res = rms_norm(q, w, EPS, residual=res)
    assert new_res is res
    assert rel_err(out, want_out) < TOL[torch.float16] and rel_err(res, want_res) < TOL[torch.float16]


def test_rms_norm_large_rows(device):
    x, w = rand(2, 8192, dtype=torch.float16, device=device), rand(8192, dtype=torch.float16, device=device)
    res = rand(2, 8192, dtype=torch.float16, device=device)
    want_out, want_res = rms_norm_ref(x, w, EPS, res)
    out, res = rms_norm(x, w, EPS, res)
    assert rel_err(out, want_out) < TOL[torch.float16] and rel_err(res, want_res) < TOL[torch.float16]


def test_rms_norm_rejects_bad_inputs(device):
    x = rand(3, 64, dtype=torch.float16, device=device)
    w = rand(64, dtype=torch.float16, device=device)
    with pytest.raises(ShapeError, match=r"weight must be \[64\].*\(65,\)"):
        rms_norm(x, rand(65, dtype=torch.float16, device=device), EPS)
    with pytest.raises(ShapeError, match="float64"):
        rms_norm(x.double(), w, EPS)
    with pytest.raises(ShapeError, match="int32"):
        rms_norm(x.to(torch.int32), w, EPS)
    with pytest.raises(ShapeError, match=r"residual must match.*\(3, 65\)"):
        rms_norm(x, w, EPS, residual=rand(3, 65, dtype=torch.float16, device=device))
    with pytest.raises(ShapeError, match=r"residual must match.*float32"):
        rms_norm(x, w, EPS, residual=rand(3, 64, dtype=torch.float32, device=device))
    with pytest.raises(ShapeError, match="contiguous along its last dim"):
        rms_norm(rand(64, 3, dtype=torch.float16, device=device).t(), w, EPS)
    with pytest.raises(ShapeError, match=r"\(64,\)"):
        rms_norm(w, w, EPS)


# ----- SiLU and mul -----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("I", DIMS)
@pytest.mark.parametrize("T", ROWS)
def test_silu_mul_matches_ref(device, T, I, dtype):
    gate_up = rand(T, 2 * I, dtype=dtype, device=device, scale=3.0)
    out = silu_mul(gate_up)
    assert out.shape == (T, I) and out.is_contiguous()
    assert rel_err(out, silu_mul_ref(gate_up)) < TOL[dtype]


def test_silu_mul_halves_and_strided_rows(device):
    # gate and up are not interchangeable: silu(g) * u != silu(u) * g
    T, I = 5, 576
    g = rand(T, I, dtype=torch.float32, device=device, scale=2.0)
    u = rand(T, I, dtype=torch.float32, device=device, scale=2.0)
    out = silu_mul(torch.cat([g, u], dim=1))
    assert torch.allclose(out, torch.nn.functional.silu(g) * u, rtol=1e-5, atol=1e-6)
    # row-strided input (a slice of a wider buffer); extreme gates stay finite
    wide = rand(T, 2 * I + 32, dtype=torch.float16, device=device, scale=30.0)
    gate_up = wide[:, : 2 * I]
    assert rel_err(silu_mul(gate_up), silu_mul_ref(gate_up)) < TOL[torch.float16]


def test_silu_mul_rejects_bad_inputs(device):
    with pytest.raises(ShapeError, match=r"\(3, 7\)"):
        silu_mul(rand(3, 7, dtype=torch.float16, device=device))
    with pytest.raises(ShapeError, match=r"\(2, 3, 8\)"):
        silu_mul(rand(2, 3, 8, dtype=torch.float16, device=device))
    with pytest.raises(ShapeError, match="float64"):
        silu_mul(rand(3, 8, dtype=torch.float64, device=device))
    with pytest.raises(ShapeError, match="contiguous along its last dim"):
        silu_mul(rand(8, 3, dtype=torch.float16, device=device).t())
