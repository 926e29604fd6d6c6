import pytest
import torch

from lmq.quant.gptq import gptq_quantize, hessian
from lmq.quant.rtn import quantize


@pytest.mark.parametrize("G", [32, 64, 128])
def test_identity_hessian_reduces_to_rtn(G):
    w = torch.randn(24, 256)
    q = gptq_quantize(w, torch.eye(256), 4, G, True)
    r = quantize(w, 4, G, True)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)


@pytest.mark.parametrize("zero_point", [True, False])
def test_gptq_lowers_output_error_on_correlated_inputs(zero_point):
    g = torch.Generator().manual_seed(0)
    K, N, n = 192, 48, 2048
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    x = torch.randn(n, K, generator=g) @ mix  # correlated features
    x[:, :4] *= 8  # and a few outlier channels
    w = torch.randn(N, K, generator=g) * 0.05
    q = gptq_quantize(w, hessian(x), 4, 64, zero_point)
    r = quantize(w, 4, 64, zero_point)
    assert int(q.codes.max()) <= 15 and q.scales.dtype == torch.float16
    ref = x @ w.t()
    err_gptq = (x @ q.dequantize().t() - ref).pow(2).mean()
    err_rtn = (x @ r.dequantize().t() - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_dead_inputs_are_handled():
    x = torch.randn(512, 64)
    x[:, 5] = 0  # a channel that never fires
    q = gptq_quantize(torch.randn(8, 64), hessian(x), 4, 32, True)
    assert torch.isfinite(q.dequantize()).all()


def test_awq_gptq_method_end_to_end(tmp_path, tiny_model, calib_file):
    import json

    from typer.testing import CliRunner

    from lmq.cli import app

    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(out), "--method", "awq-gptq",
                                   "--group-size", "32", "--calib-data", calib_file, "--calib-samples", "4",
                                   "--calib-seqlen", "32", "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["method"] == "awq-gptq"
    assert all(layer["awq_err"] < layer["rtn_err"] for layer in m["layers"])
