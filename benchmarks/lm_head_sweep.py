"""The int8 LM head kernel (kernels/w8a16_gemm.py) against cuBLAS on the fp16 head, on a GPU, same run.

    python benchmarks/lm_head_sweep.py [--vocab 128256] [--hidden 4096] [--m 1,2,4,16,64] [--sweep 1,16]

Prints, per M, the time of the fp16 head through cuBLAS (`F.linear`, what the engine runs with --lm-head auto), the
int8 kernel with the table's config, its ratio, and the int8 bytes over the measured copy bandwidth (floor). At the
--sweep values of M, every (BLOCK_N, BLOCK_K, warps, stages) of a small grid, best first. Each time is a CUDA graph of
calls cycling through two copies of the weights (2.1 GB of fp16 or 1.05 GB of int8: no L2 reuse between calls).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from lmq.kernels import w8a16_gemm as k

from lmq.bench import copy_bandwidth_bytes_s, graph_time_us
from lmq.quant.rows import quantize_rows

ap = argparse.ArgumentParser()
ap.add_argument("--vocab", type=int, default=128256)
ap.add_argument("--hidden", type=int, default=4096)
ap.add_argument("--m", default="1,2,4,16,64")
ap.add_argument("--sweep", default="1,16", help="the M values to sweep configs at (empty: none)")
args = ap.parse_args()
dev = torch.device("cuda")
V, C = args.vocab, args.hidden
g = torch.Generator(dev).manual_seed(0)
heads = [torch.randn(V, C, generator=g, device=dev, dtype=torch.float16) / C ** 0.5 for _ in range(2)]
qs = [quantize_rows(w) for w in heads]
bw = copy_bandwidth_bytes_s()
floor_us = (V * C + 4 * V) / bw * 1e6
print(f"{torch.cuda.get_device_name(dev)}, head {V} x {C}, copy bandwidth {bw / 1e9:.0f} GB/s, int8 floor "
      f"{floor_us:.1f} us")
sweep_ms = {int(m) for m in args.sweep.split(",") if m}
for M in sorted({int(m) for m in args.m.split(",")} | sweep_ms):  # the swept M values are timed too
    x = torch.randn(M, C, generator=g, device=dev, dtype=torch.float16)
    ref = F.linear(x, heads[0]).float()
    err = ((k.w8a16_matmul(x, *qs[0]) - ref).norm() / ref.norm()).item()
    cublas = graph_time_us([lambda w=w, x=x: F.linear(x, w) for w in heads], calls=20)
    table = graph_time_us([lambda q=q, s=s, x=x: k.w8a16_matmul(x, q, s) for q, s in qs], calls=20)
    print(f"M={M}: cuBLAS fp16 {cublas:.1f} us, int8 {table:.1f} us, x{cublas / table:.2f}, "
          f"{100 * floor_us / table:.0f}% of the floor, rel err vs fp16 {err:.1e}")
    if M in sweep_ms:
        res = []
        for cfg in itertools.product((64, 128), (128, 256), (4, 8), (2, 3, 4)):
            try:
                t = graph_time_us([lambda q=q, s=s, c=cfg, x=x: k.w8a16_matmul(x, q, s, c) for q, s in qs], calls=20)
            except Exception as e:  # noqa: BLE001 (out of shared memory or registers: skip that config)
                print(f"  {cfg}: {type(e).__name__}")
                continue
            res.append((t, cfg))
        res.sort()
        print("  best: " + ", ".join(f"{c} {t:.1f}" for t, c in res[:8]))
        print("  worst: " + ", ".join(f"{c} {t:.1f}" for t, c in res[-3:]))
