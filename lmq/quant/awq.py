"""Activation-aware weight quantization (AWQ; Lin et al. 2023, arXiv:2306.00978) for one decoder layer.

For each scaling group (arch table: a norm or linear `prev` feeding `linears`):

    x_mean[c] = mean |x[:, c]|                    over calibration tokens         [C]
    w_mean[c] = mean over rows of |W| / groupmax  (weights normalized per group)  [C]
    for r in 0, 1/n, ..., (n-1)/n:
        s = x_mean^r / w_mean^(1-r),  normalized so sqrt(max(s) * min(s)) = 1
        loss(r) = || block(x; Q(W * s) / s) - block(x; W) ||^2
    keep the best s, or s = 1 when plain RTN beats every r (r = 0 is s = 1 / w_mean, not RTN);
    fold 1/s into prev, s into the linears' input columns.

With GQA the v_proj -> o_proj group still applies (AutoAWQ skips it): one scale per v_proj output
channel multiplies the `H / Hkv` o_proj input columns that read it, and x_mean / w_mean are averaged
over those columns. o_proj is otherwise the one linear left unscaled.

Then a clipping search per linear (except q/k): for each output row and group, the max |w| kept
before quantization is searched over (1 - i/n) * max for i < 0.7 n (AutoAWQ: n/2; with zero points: the max and
the min shrink independently), minimizing the error of that group's partial dot products on a
sample of calibration tokens. That local criterion weighs typical
tokens and can ruin rare outlier tokens (seen on SmolLM2's last layers: 20x worse layer output), so
a linear's clipping is kept only if it does not raise the whole layer's output error.

All search math runs in fp32 on the compute device; a bf16-trained model never overflows fp16 here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lmq.models.arch import ScaleGroup
from lmq.models.llama import ModelConfig, attention_heads, layer_forward, linear, mlp, rms_norm
from lmq.quant.rtn import fake_quantize


NO_SCALE = -1.0  # the ratio recorded when a group keeps s = 1 (unscaled RTN won its search)


@dataclass
class QuantSettings:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    max_shrink: float = 0.7  # clipping may cut up to this share of a group's range (AutoAWQ: 0.5; CPU proxy: 0.7 better)
    clip_tokens: int = 512  # calibration tokens the clipping search looks at
    batch_size: int = 16  # calibration samples per forward chunk (bounds activation memory)
    refine_steps: int = 0  # rounding refinement after AWQ (lmq.quant.refine); lmq quantize's default is 200
    refine_lr: float = 0.005
    refine_batch: int = 8  # calibration samples per refinement step


@dataclass
class LayerCapture:
    """Inputs of every linear in one layer, from a float forward over the calibration set."""

    inputs: dict[str, torch.Tensor]  # linear name -> [S, T, K] (shared tensors for q/k/v, gate/up)
    output: torch.Tensor  # [S, T, C] the layer's float output = next layer's input


def _chunks(x: torch.Tensor, bs: int):
    for i in range(0, x.shape[0], bs):
        yield x[i:i + bs]


def capture(lw: dict, x: torch.Tensor, cos, sin, cfg: ModelConfig, bs: int) -> LayerCapture:
    """Run layer `lw` on `x [S, T, C]` in chunks and keep every linear's input and the output."""
    keys = ("qkv", "o", "gate_up", "down", "out")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for xb in _chunks(x, bs):
        xn1 = rms_norm(xb, lw["input_layernorm.weight"], cfg.rms_eps)  # [b, T, C]
        heads = attention_heads(lw, xn1, cos, sin, cfg)  # [b, T, H*D]
        h = xb + linear(heads, lw, "self_attn.o_proj")
        xn2 = rms_norm(h, lw["post_attention_layernorm.weight"], cfg.rms_eps)
        act = F.silu(linear(xn2, lw, "mlp.gate_proj")) * linear(xn2, lw, "mlp.up_proj")  # [b, T, I]
        out = h + linear(act, lw, "mlp.down_proj")
        for k, v in zip(keys, (xn1, heads, xn2, act, out)):
            parts[k].append(v)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    inputs = {
        "self_attn.q_proj": cat["qkv"], "self_attn.k_proj": cat["qkv"], "self_attn.v_proj": cat["qkv"],
        "self_attn.o_proj": cat["o"], "mlp.gate_proj": cat["gate_up"], "mlp.up_proj": cat["gate_up"],
        "mlp.down_proj": cat["down"],
    }
    return LayerCapture(inputs=inputs, output=cat["out"])


def _block_fn(group: ScaleGroup, cos, sin, cfg: ModelConfig) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """The function whose output error scores a candidate scale for `group`."""
    if group.inspect == "attn":
        return lambda lw, x: linear(attention_heads(lw, x, cos, sin, cfg), lw, "self_attn.o_proj")
    if group.inspect == "mlp":
        return mlp
    name = group.inspect
    return lambda lw, x: linear(x, lw, name)


def group_applies(group: ScaleGroup, lw: dict) -> bool:
    """A linear `prev` (v_proj -> o_proj) needs its outputs to tile the linears' inputs: equal with
    MHA, `rep` copies with GQA (each KV head serves `rep` query heads)."""
    if group.prev.endswith("_proj"):
        return lw[f"{group.linears[0]}.weight"].shape[1] % lw[f"{group.prev}.weight"].shape[0] == 0
    return True


def _rep(group: ScaleGroup, lw: dict) -> int:
    """How many input channels of the linears one scaled channel of `prev` feeds (GQA: H / Hkv)."""
    if group.prev.endswith("_proj"):
        return lw[f"{group.linears[0]}.weight"].shape[1] // lw[f"{group.prev}.weight"].shape[0]
    return 1


def _expand(s: torch.Tensor, rep: int, head_dim: int) -> torch.Tensor:
    """`s [Hkv*D]` (v_proj's outputs) -> `[H*D]` (o_proj's inputs): query head h reads KV head
    h // rep (attention_core's repeat_interleave)."""
    if rep == 1:
        return s
    hkv = s.numel() // head_dim
    return s.view(hkv, 1, head_dim).expand(hkv, rep, head_dim).reshape(-1)  # [H*D]


def _tie(v: torch.Tensor, rep: int, head_dim: int) -> torch.Tensor:
    """`[H*D]` per-input statistics -> `[Hkv*D]`: the mean over the query heads sharing a KV head."""
    if rep == 1:
        return v
    return v.view(-1, rep, head_dim).mean(1).reshape(-1)  # [Hkv*D]


@torch.no_grad()
def search_scale(group: ScaleGroup, lw: dict, x: torch.Tensor, cos, sin, cfg: ModelConfig,
                 qs: QuantSettings) -> tuple[torch.Tensor, float, float, float]:
    """Best per-channel scale `[C]` for `group` on inputs `x [S, T, C]`.

    Returns (scales, best ratio, loss of plain RTN, best loss); the ratio is `NO_SCALE` when no
    scaling beats plain RTN on this block (then `scales` is all ones).
    """
    fn = _block_fn(group, cos, sin, cfg)
    C = x.shape[-1]
    rep, D = _rep(group, lw), cfg.head_dim
    x_mean = _tie(x.abs().reshape(-1, C).float().mean(0), rep, D)  # [C / rep]
    W = torch.cat([lw[f"{n}.weight"] for n in group.linears])  # [sum N, C]
    Wg = W.abs().reshape(-1, qs.group_size)  # [sum N * C / G, G]
    Wg = Wg / Wg.amax(dim=1, keepdim=True).clamp(min=1e-12)
    w_mean = _tie(Wg.reshape(W.shape).mean(0), rep, D)  # [C / rep]

    ref = torch.cat([fn(lw, xb) for xb in _chunks(x, qs.batch_size)])
    best = (float("inf"), 0.0, None)
    loss0 = None
    for i, r in enumerate([NO_SCALE] + [i / qs.n_grid for i in range(qs.n_grid)]):
        if r == NO_SCALE:  # plain RTN is a candidate too (GPU proxy, g64: 49.3% -> 53.3% of RTN's loss)
            s = torch.ones_like(x_mean)
        else:
            s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)  # [C]
            s = s / (s.max() * s.min()).sqrt()
        sx = _expand(s, rep, D)  # [C]
        trial = dict(lw)
        for n in group.linears:
            trial[f"{n}.weight"] = fake_quantize(lw[f"{n}.weight"] * sx, qs.bits, qs.group_size, qs.zero_point) / sx
        loss = 0.0
        for xb, rb in zip(_chunks(x, qs.batch_size), _chunks(ref, qs.batch_size)):
            loss += (fn(trial, xb) - rb).float().pow(2).sum().item()
        loss /= ref.numel()
        if i == 0:
            loss0 = loss
        if loss < best[0]:
            best = (loss, r, s)
    return best[2], best[1], loss0, best[0]


def apply_scale(group: ScaleGroup, lw: dict, s: torch.Tensor, cap: LayerCapture, head_dim: int = 0) -> None:
    """Fold `s` into the weights (function unchanged in exact arithmetic) and the captured inputs.

    `s` has one entry per output channel of `prev`; with GQA (v_proj -> o_proj) each entry scales
    the `rep` o_proj inputs that read that channel, which needs `head_dim`.
    """
    prev = group.prev
    rep = _rep(group, lw)
    sx = _expand(s, rep, head_dim) if rep > 1 else s  # [linears' K]
    if prev.endswith("_proj"):  # a linear: divide its output rows (and bias)
        lw[f"{prev}.weight"] = lw[f"{prev}.weight"] / s[:, None]
        if f"{prev}.bias" in lw:
            lw[f"{prev}.bias"] = lw[f"{prev}.bias"] / s
    else:  # an RMSNorm weight
        lw[f"{prev}.weight"] = lw[f"{prev}.weight"] / s
    for n in group.linears:
        lw[f"{n}.weight"] = lw[f"{n}.weight"] * sx[None, :]
    old = {n: cap.inputs[n] for n in group.linears}  # q/k/v (gate/up) share one input tensor
    scaled: dict[int, torch.Tensor] = {}
    for n in group.linears:  # divide each distinct tensor exactly once, keep the sharing
        t = old[n]
        if id(t) not in scaled:
            scaled[id(t)] = t / sx
        cap.inputs[n] = scaled[id(t)]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, qs: QuantSettings, rows_per_chunk: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best clipping range per output row and group: returns `(lo, hi)`, each `[N, K/G]`.

    Symmetric quantization searches one threshold, `[-m, m]` with m = (1 - i/n) * max|w|.
    Asymmetric quantization (zero points) shrinks the group's max and min independently,
    `[(1 - j/n) * min, (1 - i/n) * max]`, since its grid need not be centred on zero: first the
    max with the min kept, then the min with the best max (2n candidates instead of n^2).
    """
    N, K = w.shape
    G = qs.group_size
    xs = x.reshape(-1, K)  # [tokens, K]
    step = max(1, xs.shape[0] // qs.clip_tokens)
    xs = xs[::step][: qs.clip_tokens].float()  # [n, K]
    xg = xs.reshape(-1, K // G, G).transpose(0, 1)  # [K/G, n, G]
    steps = int(qs.max_shrink * qs.n_grid)
    shrinks = [i / qs.n_grid for i in range(steps)]
    los, his = [], []
    for r0 in range(0, N, rows_per_chunk):
        wg = w[r0:r0 + rows_per_chunk].float()
        R = wg.shape[0]
        wg = wg.reshape(R, K // G, G)  # [R, K/G, G]
        if qs.zero_point:
            top, bot = wg.amax(-1, keepdim=True).clamp(min=0), wg.amin(-1, keepdim=True).clamp(max=0)
        else:
            top = wg.abs().amax(-1, keepdim=True)
            bot = -top  # [R, K/G, 1]
        # Partial dot products per group as batched matmuls: [K/G, n, G] @ [K/G, G, R] -> [K/G, n, R]
        org_out = torch.bmm(xg, wg.permute(1, 2, 0))
        best_lo, best_hi = bot.clone(), top.clone()
        min_err = torch.full_like(top, float("inf"))

        def trial(lo: torch.Tensor, hi: torch.Tensor) -> None:
            nonlocal best_lo, best_hi, min_err
            q = fake_quantize(torch.minimum(torch.maximum(wg, lo), hi).reshape(R, K), qs.bits, G, qs.zero_point)
            err = (torch.bmm(xg, q.reshape(R, K // G, G).permute(1, 2, 0)) - org_out).pow(2).mean(dim=1)
            err = err.t()[..., None]  # [R, K/G, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)

        if qs.zero_point:  # coordinate search: the max with the min kept, then the min with the best max
            for a in shrinks:
                trial(bot, top * (1 - a))
            hi_best = best_hi.clone()
            for b in shrinks[1:]:
                trial(bot * (1 - b), hi_best)
        else:
            for a in shrinks:
                trial(-top * (1 - a), top * (1 - a))
        los.append(best_lo[..., 0])
        his.append(best_hi[..., 0])
    return torch.cat(los), torch.cat(his)  # [N, K/G] each


@torch.no_grad()
def output_error(lw: dict, x: torch.Tensor, ref: torch.Tensor, cos, sin, cfg: ModelConfig) -> float:
    """MSE of the layer output with the weights `lw` as given, against `ref`."""
    return (layer_forward(lw, x, cos, sin, cfg) - ref).pow(2).mean().item()


def layer_error(lw: dict, x: torch.Tensor, ref: torch.Tensor, cos, sin, cfg: ModelConfig, qs: QuantSettings) -> float:
    """MSE of the layer output when every linear of `lw` is fake-quantized; `ref` is the float output."""
    q = {k: (fake_quantize(v, qs.bits, qs.group_size, qs.zero_point) if k[: -len(".weight")] in cfg.arch.linears
             else v) for k, v in lw.items()}
    return output_error(q, x, ref, cos, sin, cfg)


def apply_clip(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp each group of `w [N, K]` into `[lo, hi]` (each `[N, K/G]`)."""
    N, K = w.shape
    wg = w.reshape(N, K // group_size, group_size)
    return torch.minimum(torch.maximum(wg, lo[..., None]), hi[..., None]).reshape(N, K)


@torch.no_grad()
def awq_layer(lw: dict, cap: LayerCapture, xs: torch.Tensor, ref: torch.Tensor, cos, sin, cfg: ModelConfig,
              qs: QuantSettings) -> tuple[dict, float, dict[str, float], list[str]]:
    """AWQ for one decoder layer: scale search and folding, then gated clipping.

    `cap` holds the float inputs of every linear (from `capture`); `xs`/`ref` are a few samples of
    the layer's input and float output on which the whole-layer error is measured. Returns the new
    weights (not yet quantized), their whole-layer error, the chosen ratio per group, and the
    linears whose clipping was kept.
    """
    ratios: dict[str, float] = {}
    found = []
    for g in cfg.arch.scale_groups:  # every search sees the original weights, as in AutoAWQ
        if group_applies(g, lw):
            s, r, _, _ = search_scale(g, lw, cap.inputs[g.linears[0]], cos, sin, cfg, qs)
            found.append((g, s))
            ratios[g.prev] = r
    lw = dict(lw)
    for g, s in found:
        apply_scale(g, lw, s, cap, cfg.head_dim)
    err = layer_error(lw, xs, ref, cos, sin, cfg, qs)
    clipped = []
    for lin in cfg.arch.linears:
        if lin in cfg.arch.no_clip:
            continue
        lo, hi = search_clip(lw[f"{lin}.weight"], cap.inputs[lin], qs)
        trial = dict(lw, **{f"{lin}.weight": apply_clip(lw[f"{lin}.weight"], lo, hi, qs.group_size)})
        trial_err = layer_error(trial, xs, ref, cos, sin, cfg, qs)
        if trial_err <= err:
            lw, err = trial, trial_err
            clipped.append(lin.split(".")[-1])
    return lw, err, ratios, clipped
