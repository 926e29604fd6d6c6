"""The M=1 GEMV's split-K reductions side by side (NOTES-gemm.md, run 34): the table's config with
REDUCE "workspace" (fp32 sums, arrival counter, last program reads back) and "fixed" (int64 fixed-point
sums with the arrival count in the same word), interleaved, twice each; correctness against the reference
and bit-reproducibility first. Also with RoPE fused (the qkv GEMV of a decode step).

    python3 benchmarks/gemv_reduce_ab.py

Ran from the working tree before a001d76, which removed REDUCE="workspace": at later commits only "fixed" runs.
"""

import sys

import torch

sys.path.insert(0, "benchmarks")
from lmq.kernels.rope import rope_cos_sin, rope_inv_freq
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm_ref
from lmq.kernels.w4a16_gemv import w4a16_gemv
from sweep_gemm import random_packed

from lmq.bench import GEMM_SHAPES, copies_for, graph_time_us

G = 128
REDUCES = ("workspace", "fixed")
torch.manual_seed(0)
table = CONFIGS["sm90"]["gemv"]
cos, sin = rope_cos_sin(rope_inv_freq(128, 500000.0), 8192, torch.device("cuda"))
pos = torch.tensor([4000], dtype=torch.int32, device="cuda")
for dtype in (torch.float16, torch.bfloat16):
    for name, N, K in GEMM_SHAPES["llama3-8b"]:
        q, p, nbytes = random_packed(N, K)
        x = torch.randn(1, K, device="cuda").to(dtype)
        ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G).float()
        ropes = [None] + ([(pos, cos, sin, 5120)] if name == "qkv_proj" else [])
        for rope in ropes:
            outs = {}
            for red in REDUCES:
                cfg = {**table, "REDUCE": red}
                a = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg, rope=rope)
                b = w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg, rope=rope)
                err = ((a.float() - ref).norm() / ref.norm()).item() if rope is None else float("nan")
                outs[red] = a
                print(f"{dtype} {name} rope={rope is not None} {red}: rel err {err:.1e}, repeat equal "
                      f"{torch.equal(a, b)}", flush=True)
            d = ((outs["fixed"].float() - outs["workspace"].float()).norm() / outs["workspace"].float().norm()).item()
            print(f"  fixed vs workspace rel diff {d:.1e}{'  WRONG' if not d < 2e-3 else ''}", flush=True)
        if dtype != torch.float16:
            continue
        packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
        for rope in ropes:
            row = []
            for rep in range(2):
                for red in REDUCES:
                    cfg = {**table, "REDUCE": red}
                    t = graph_time_us([lambda pp=pp: w4a16_gemv(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg,
                                                                rope=rope) for pp in packs],
                                      calls=max(20, len(packs)), reps=9)
                    row.append(f"{red} {t:.2f}")
            print(f"TIME fp16 {name}{' +rope' if rope else ''}: " + " | ".join(row), flush=True)
        del packs
        torch.cuda.empty_cache()
