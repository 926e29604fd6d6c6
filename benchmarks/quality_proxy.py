"""A cheap CPU proxy of the AWQ quality run (docs/quality.md): quantize in memory, score perplexity.

Runs `lmq.quant.quantize.quantize_layer` layer by layer as `lmq quantize` does, but keeps the
dequantized weights in memory and scores wikitext-2 test perplexity on the first `--windows` windows right away, next to
RTN's and the unquantized model's on the same windows. Prints one JSON line per run (recovery =
(ppl_rtn - ppl_awq) / (ppl_rtn - ppl_fp)).

    python benchmarks/quality_proxy.py --samples 16 --windows 32 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmq.evaluate import windows
from lmq.format.source import WeightSource, resolve_model_path
from lmq.models.llama import layer_forward, rms_norm, rope_cos_sin
from lmq.quant import awq
from lmq.quant.calib import calibration_tokens
from lmq.quant.quantize import quantize_layer
from lmq.quant.rtn import fake_quantize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@torch.no_grad()
def ppl(src: WeightSource, layers: list[dict], ids: torch.Tensor, dev: torch.device, bs: int = 4) -> float:
    cfg = src.cfg
    embed, norm, head = (t.to(dev) for t in (src.embed(torch.float32), src.final_norm(torch.float32),
                                              src.lm_head(torch.float32)))
    cos, sin = rope_cos_sin(cfg, torch.arange(ids.shape[1], device=dev), torch.float32)
    ids = ids.to(dev)
    nll, n = 0.0, 0
    for i in range(0, ids.shape[0], bs):
        b = ids[i:i + bs]  # [B, T]
        x = embed[b]  # [B, T, C]
        for lw in layers:
            x = layer_forward(lw, x, cos, sin, cfg)
        logits = F.linear(rms_norm(x, norm, cfg.rms_eps), head)  # [B, T, V]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        n += b[:, 1:].numel()
    return math.exp(nll / n)


def fq(lw: dict, cfg, qs: awq.QuantSettings) -> dict:
    return {k: (fake_quantize(v, qs.bits, qs.group_size, qs.zero_point) if k[:-len(".weight")] in cfg.arch.linears
                else v) for k, v in lw.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "lmq" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--calib", default=str(SHARED / "calib" / "c4.txt"))
    ap.add_argument("--data", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--eval-seqlen", type=int, default=1024, help="tokens per scored window")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--baselines", action="store_true", help="also score the unquantized model and RTN")
    ap.add_argument("--set", nargs="*", default=[], help="QuantSettings overrides, name=value")
    ap.add_argument("--tag", default="")
    ap.add_argument("--variant", action="append", help="NAME:k=v,k=v (repeatable; one process, shared baselines)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--old-vo", action="store_true", help="no v_proj -> o_proj scaling under GQA (before run 4)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    t0 = time.time()
    path = resolve_model_path(args.model)
    src = WeightSource(path)
    cfg = src.cfg
    tok = AutoTokenizer.from_pretrained(str(path))
    tokens = calibration_tokens(args.calib, tok, args.samples, args.seqlen, 0)
    ids = windows(path, args.data, args.eval_seqlen, args.windows)
    dev = torch.device(args.device)
    fp_layers = [{k: v.to(dev) for k, v in src.layer(i, torch.float32).items()} for i in range(cfg.num_layers)]
    if args.old_vo:
        awq.group_applies = lambda g, lw: (not g.prev.endswith("_proj") or
                                           lw[f"{g.prev}.weight"].shape[0] == lw[f"{g.linears[0]}.weight"].shape[1])
    base: dict = {"samples": args.samples, "windows": args.windows, "eval_seqlen": args.eval_seqlen,
                  "seqlen": args.seqlen, "group_size": args.group_size}
    if args.baselines:
        qs = awq.QuantSettings(group_size=args.group_size)
        base["ppl_fp"] = ppl(src, fp_layers, ids, dev)
        base["ppl_rtn"] = ppl(src, [fq(lw, cfg, qs) for lw in fp_layers], ids, dev)
        print(json.dumps(dict(base, tag="baselines")), flush=True)
    # --variant NAME:k=v,k=v (QuantSettings fields; refine_steps=N adds rounding refinement)
    variants = args.variant or [f"{args.tag}:{','.join(args.set)}"]
    for spec in variants:
        name, _, sets = spec.partition(":")
        qs = awq.QuantSettings(group_size=args.group_size)
        for kv in filter(None, sets.split(",")):  # QuantSettings fields, e.g. refine_steps=200
            k, v = kv.split("=")
            cur = getattr(qs, k)
            setattr(qs, k, (v in ("1", "true")) if isinstance(cur, bool) else type(cur)(v))
        res = dict(base, tag=name, settings=sets)
        t0 = time.time()
        torch.manual_seed(0)
        x = src.embed(torch.float32)[tokens].to(dev)  # [S, T, C]
        cos, sin = rope_cos_sin(cfg, torch.arange(tokens.shape[1], device=dev), torch.float32)
        q_layers = []
        for i, lw in enumerate(fp_layers):
            # what lmq quantize does per layer (each searched on the quantized layers' output)
            lw, q, st, x = quantize_layer(i, lw, x, cos, sin, cfg, qs, seed=i)
            q_layers.append(dict(lw, **{f"{lin}.weight": w.dequantize(torch.float32) for lin, w in q.items()}))
            print(f"{name} layer {i} err rtn {st.rtn_err:.4g} awq {st.scaled_err:.4g} written {st.awq_err:.4g} "
                  f"{st.ratios} {st.clipped} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        res["ppl_awq"] = ppl(src, q_layers, ids, dev)
        if "ppl_rtn" in res:
            res["recovery"] = (res["ppl_rtn"] - res["ppl_awq"]) / (res["ppl_rtn"] - res["ppl_fp"])
        res["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
