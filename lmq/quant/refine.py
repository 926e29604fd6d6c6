"""Rounding refinement: after AWQ's scales and clipping, choose each weight's rounding direction.

Round-to-nearest picks, for every weight, the code nearest to `w / s`. Rounding some weights the
other way can lower the *layer's* output error, because errors of neighbouring weights cancel on
real activations. This stage learns, per weight, an offset `v` in [-1/2, 1/2] added before rounding:

    codes = clamp(round(w / s + v) + z, 0, 2^b - 1)        s, z: the group's RTN scale and zero
    loss  = || layer(x; (codes - z) * s) - layer_float(x) ||^2   over calibration samples

with signed gradient descent (straight-through rounding; the sign of the gradient times a learning
rate, 0.005 by default, that decays linearly to 0), as in "Optimize Weight Rounding via Signed Gradient Descent"
(Cheng et al. 2023). Scales and zeros stay those of RTN on the AWQ-scaled, clipped weights, so
the result is the same AutoAWQ grid; only which of the two nearest grid points a weight takes
changes. The whole decoder layer is the objective (attention and MLP together), not each linear on
its own: a per-linear objective (GPTQ's) was measured to lower each linear's error and raise the
layer's (docs/quality.md, run 3).

The refined codes are kept only if they lower the layer's output error on held-out samples.
"""

from __future__ import annotations

import torch

from lmq.models.llama import ModelConfig, layer_forward
from lmq.quant.awq import output_error
from lmq.quant.rtn import QuantizedWeight, quantize


def _ste_round(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.round(t) - t).detach()


class _Rounding:
    """One linear's RTN grid (per group: `s`, `z` `[N, K/G, 1]`) and its learnable offsets `v`
    (`[N, K/G, G]`, like the weight; the grid is broadcast, not expanded, to bound memory)."""

    def __init__(self, qw: QuantizedWeight, w: torch.Tensor):
        N, K = qw.shape
        G = qw.group_size
        self.qw = qw
        self.qmax = 2**qw.bits - 1
        self.s = qw.scales.float()[..., None]  # [N, K/G, 1]
        self.z = qw.zeros.float()[..., None]  # [N, K/G, 1]
        self.u = w.float().reshape(N, K // G, G) / self.s  # [N, K/G, G]
        self.v = torch.zeros_like(self.u, requires_grad=True)

    def codes(self, ste: bool) -> torch.Tensor:
        r = _ste_round(self.u + self.v) if ste else torch.round(self.u + self.v)
        return torch.clamp(r + self.z, 0, self.qmax)  # [N, K/G, G]

    def weight(self) -> torch.Tensor:
        return ((self.codes(ste=True) - self.z) * self.s).reshape(self.qw.shape)  # [N, K]

    def quantized(self) -> QuantizedWeight:
        with torch.no_grad():
            c = self.codes(ste=False).reshape(self.qw.shape).to(torch.uint8)
        q = self.qw
        return QuantizedWeight(codes=c, scales=q.scales, zeros=q.zeros, bits=q.bits, group_size=q.group_size)


def _quantized_error(lw: dict, q: dict[str, QuantizedWeight], x: torch.Tensor, ref: torch.Tensor, cos, sin,
                     cfg: ModelConfig) -> float:
    return output_error(dict(lw, **{f"{lin}.weight": qw.dequantize(torch.float32) for lin, qw in q.items()}),
                        x, ref, cos, sin, cfg)


def refine_rounding(lw: dict, x: torch.Tensor, ref: torch.Tensor, xs: torch.Tensor, refs: torch.Tensor, cos, sin,
                    cfg: ModelConfig, bits: int, group_size: int, zero_point: bool, steps: int,
                    batch: int = 8, lr: float = 0.005, seed: int = 0, rtn: dict[str, QuantizedWeight] | None = None,
                    before: float | None = None) -> tuple[dict[str, QuantizedWeight], float, float]:
    """Quantize every linear of `lw` (AWQ-scaled and clipped float weights) with learned rounding.

    `x [S, T, C]` / `ref [S, T, C]`: calibration inputs of the layer and the float layer's outputs
    on them (the training set); `xs` / `refs`: held-out samples that decide whether to keep the
    result. `rtn`: the round-to-nearest quantization of `lw`'s linears if already made, and `before`
    its error on `xs` if already measured (`awq.layer_error`: the same number). Returns
    `(weights, error before, error after)`, the errors being the layer output's mean squared error
    on `xs` with RTN and with the returned weights.
    """
    lins = cfg.arch.linears
    if rtn is None:
        rtn = {lin: quantize(lw[f"{lin}.weight"], bits, group_size, zero_point) for lin in lins}
    if before is None:
        before = _quantized_error(lw, rtn, xs, refs, cos, sin, cfg)
    if steps <= 0:
        return rtn, before, before
    rnd = {lin: _Rounding(rtn[lin], lw[f"{lin}.weight"]) for lin in lins}
    params = [r.v for r in rnd.values()]
    gen = torch.Generator().manual_seed(seed)
    S = x.shape[0]
    with torch.enable_grad():
        for t in range(steps):
            idx = torch.randint(S, (min(batch, S),), generator=gen).to(x.device)
            trial = dict(lw, **{f"{lin}.weight": r.weight() for lin, r in rnd.items()})
            loss = (layer_forward(trial, x[idx], cos, sin, cfg) - ref[idx]).pow(2).mean()
            grads = torch.autograd.grad(loss, params)
            step = lr * (1.0 - t / steps)
            with torch.no_grad():
                for v, g in zip(params, grads):
                    v.sub_(step * torch.sign(g)).clamp_(-0.5, 0.5)
    refined = {lin: r.quantized() for lin, r in rnd.items()}
    after = _quantized_error(lw, refined, xs, refs, cos, sin, cfg)
    if after >= before:
        return rtn, before, before
    return refined, before, after
