"""Rounding refinement (lmq.quant.refine) on real SmolLM2 layers: it lowers the held-out layer error,
stays on the RTN grid it started from, and is deterministic."""

import pytest
import torch

from lmq.format.source import WeightSource
from lmq.models.llama import layer_forward, rope_cos_sin
from lmq.quant import awq
from lmq.quant.calib import calibration_tokens
from lmq.quant.refine import refine_rounding
from lmq.quant.rtn import quantize


@pytest.fixture(scope="module")
def layer_setup(smollm2, calib_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    src = WeightSource(smollm2)
    cfg = src.cfg
    T = 128
    ids = calibration_tokens(calib_file, tok, 36, T, seed=0)  # 4 held out, 32 to train on
    cos, sin = rope_cos_sin(cfg, torch.arange(T), torch.float32)
    x = src.embed(torch.float32)[ids]  # [36, T, C]
    for i in range(2):  # the input of layer 2
        x = layer_forward(src.layer(i, torch.float32), x, cos, sin, cfg)
    lw = src.layer(2, torch.float32)
    qs = awq.QuantSettings(group_size=64, n_grid=5)
    cap = awq.capture(lw, x, cos, sin, cfg, qs.batch_size)
    lw, *_ = awq.awq_layer(lw, cap, x[:4], cap.output[:4], cos, sin, cfg, qs)  # AWQ-scaled and clipped
    return lw, x, cap.output, cos, sin, cfg


def test_refinement_lowers_held_out_layer_error(layer_setup):
    lw, x, ref, cos, sin, cfg = layer_setup
    q, before, after = refine_rounding(lw, x[4:], ref[4:], x[:4], ref[:4], cos, sin, cfg, 4, 64, True, steps=40,
                                       batch=4)
    rtn_w = dict(lw, **{f"{n}.weight": quantize(lw[f"{n}.weight"], 4, 64).dequantize() for n in cfg.arch.linears})
    rtn_err = (layer_forward(rtn_w, x[:4], cos, sin, cfg) - ref[:4]).pow(2).mean().item()
    assert before == pytest.approx(rtn_err, rel=1e-4)
    assert after < 0.95 * before, (before, after)
    got = dict(lw, **{f"{n}.weight": w.dequantize() for n, w in q.items()})
    assert (layer_forward(got, x[:4], cos, sin, cfg) - ref[:4]).pow(2).mean().item() == pytest.approx(after, rel=1e-4)


def test_refinement_stays_on_the_rtn_grid_and_is_deterministic(layer_setup):
    lw, x, ref, cos, sin, cfg = layer_setup
    args = (lw, x[4:], ref[4:], x[:4], ref[:4], cos, sin, cfg, 4, 64, True)
    q1, _, _ = refine_rounding(*args, steps=10, batch=4, seed=3)
    q2, _, _ = refine_rounding(*args, steps=10, batch=4, seed=3)
    moved = 0
    for n in cfg.arch.linears:
        rtn = quantize(lw[f"{n}.weight"], 4, 64)
        a = q1[n]
        assert torch.equal(a.scales, rtn.scales) and torch.equal(a.zeros, rtn.zeros), n
        assert a.codes.dtype == torch.uint8 and int(a.codes.max()) <= 15
        d = (a.codes.int() - rtn.codes.int()).abs()
        assert int(d.max()) <= 1, n  # at most the other neighbouring grid point
        moved += int(d.sum())
        assert torch.equal(a.codes, q2[n].codes), n
    assert moved > 0


def test_zero_steps_is_round_to_nearest(layer_setup):
    lw, x, ref, cos, sin, cfg = layer_setup
    q, before, after = refine_rounding(lw, x[4:], ref[4:], x[:4], ref[:4], cos, sin, cfg, 4, 64, True, steps=0)
    assert before == after
    for n in cfg.arch.linears:
        assert torch.equal(q[n].codes, quantize(lw[f"{n}.weight"], 4, 64).codes)
