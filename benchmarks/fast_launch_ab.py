"""Eager prefill TTFT with the direct launch on and off (lmq.kernels.launch.FAST_LAUNCH), toggled between the
requests of one process (the lent machine's host times vary from one process to the next), interleaved, in either
order by turns. "Through Triton" is the launch path alone: the prefill GEMM's per-shape plan stays kept.
Synthetic Llama-3-8B, int8 KV, prefill CUDA graphs off (as multi-sequence and mixed steps run).

    python benchmarks/fast_launch_ab.py [--new 256,1024] [--reps 15]
"""

import argparse
import statistics

from host_profile_eager import eager_engine, ttft
from lmq.kernels import launch

ap = argparse.ArgumentParser()
ap.add_argument("--new", default="256,1024")
ap.add_argument("--reps", type=int, default=15)
args = ap.parse_args()
llm = eager_engine()

for n in (int(v) for v in args.new.split(",")):
    times = {True: [], False: []}
    for fast in (True, False, True, False):  # warm-up: every kind compiled and kept
        launch.FAST_LAUNCH = fast
        ttft(llm, n)
    for rep in range(args.reps):
        for fast in ((True, False) if rep % 2 == 0 else (False, True)):  # either order, in turn
            launch.FAST_LAUNCH = fast
            times[fast].append(ttft(llm, n))
    launch.FAST_LAUNCH = True
    print(f"new={n}: TTFT median direct {statistics.median(times[True]):.1f} ms, through Triton "
          f"{statistics.median(times[False]):.1f} ms (min {min(times[True]):.1f} / {min(times[False]):.1f}; "
          f"{args.reps} each, interleaved)", flush=True)
