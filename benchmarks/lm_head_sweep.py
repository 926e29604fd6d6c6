"""The int8 LM head kernel (kernels/w8a16_gemm.py) against cuBLAS on the fp16 head, on a GPU, same run.

    python benchmarks/lm_head_sweep.py [--vocab 128256] [--hidden 4096] [--m 1,2,4,16,64] [--sweep 1,16]
                                       [--dtype float16,bfloat16]

Prints, per activation dtype and M, the time of the 16-bit head through cuBLAS (`F.linear`, what the engine runs with
--lm-head auto), the int8 kernel with the table's config, its ratio, the int8 bytes over the measured copy bandwidth
(floor), and for fp16 the kernel with Triton's int8 -> fp16 conversion instead of the inline assembly (`ASM`). At the
--sweep values of M, every (BLOCK_N, BLOCK_K, warps, stages) of a small grid, best first. Each time is a CUDA graph of
calls cycling through two copies of the weights (2.1 GB of fp16 or 1.05 GB of int8: no L2 reuse between calls).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from lmq.kernels import kv_quant
from lmq.kernels import w8a16_gemm as k

from lmq.bench import copy_bandwidth_bytes_s, graph_time_us
from lmq.quant.rows import quantize_rows

ap = argparse.ArgumentParser()
ap.add_argument("--vocab", type=int, default=128256)
ap.add_argument("--hidden", type=int, default=4096)
ap.add_argument("--m", default="1,2,4,16,64")
ap.add_argument("--sweep", default="1,16", help="the M values to sweep configs at (empty: none)")
ap.add_argument("--dtype", default="float16", help="activation dtypes, comma-separated (float16, bfloat16)")
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
for dtype, M in itertools.product(args.dtype.split(","), sorted({int(m) for m in args.m.split(",")} | sweep_ms)):
    dt = getattr(torch, dtype)
    ws = [w.to(dt) for w in heads]
    x = torch.randn(M, C, generator=g, device=dev, dtype=dt)
    ref = F.linear(x, ws[0]).float()
    err = ((k.w8a16_matmul(x, *qs[0]) - ref).norm() / ref.norm()).item()
    cublas = graph_time_us([lambda w=w, x=x: F.linear(x, w) for w in ws], calls=20)
    table = graph_time_us([lambda q=q, s=s, x=x: k.w8a16_matmul(x, q, s) for q, s in qs], calls=20)
    plain = ""
    if dt == torch.float16:  # the same kernel with Triton's conversion (one I2F per code)
        saved, kv_quant.DEQUANT_ASM = kv_quant.DEQUANT_ASM, False
        try:
            t = graph_time_us([lambda q=q, s=s, x=x: k.w8a16_matmul(x, q, s) for q, s in qs], calls=20)
        finally:
            kv_quant.DEQUANT_ASM = saved
        plain = f", without ASM {t:.1f} us"
    print(f"{dtype} M={M}: cuBLAS {cublas:.1f} us, int8 {table:.1f} us, x{cublas / table:.2f}, "
          f"{100 * floor_us / table:.0f}% of the floor, rel err vs cuBLAS {err:.1e}{plain}")
    del ws
    if M in sweep_ms and dt == torch.float16:
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
