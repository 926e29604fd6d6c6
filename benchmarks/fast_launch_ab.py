"""Eager prefill TTFT with the direct launch on and off (lmq.kernels.launch.FAST_LAUNCH), toggled between the
requests of one process (the lent machine's host times vary from one process to the next), interleaved, in either
order by turns. "Through Triton" is the launch path alone: the prefill GEMM's per-shape plan stays kept.
Synthetic Llama-3-8B, int8 KV, prefill CUDA graphs off (as multi-sequence and mixed steps run).

    python benchmarks/fast_launch_ab.py [--new 256,1024] [--reps 15]
"""

import argparse
import statistics
import time

import torch
from lmq.kernels import launch

from lmq.engine.llm import LLM
from lmq.engine.model import EngineModel
from lmq.engine.sampling import SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--new", default="256,1024")
ap.add_argument("--reps", type=int, default=15)
args = ap.parse_args()
llm = LLM(EngineModel.synthetic("llama3-8b", torch.device("cuda")), kv_dtype="int8", max_model_len=4096,
          cache_max_memory="8GiB", max_num_seqs=4, prefill_graphs=False)
serial = iter(range(10**6))


def ttft(n: int) -> float:
    tokens = [20000 + 7 * next(serial) % 9000 + i for i in range(n)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.add_request(tokens, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while llm.has_unfinished():
        llm.step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


for n in (int(v) for v in args.new.split(",")):
    times = {True: [], False: []}
    for fast in (True, False, True, False):  # warm-up: every kind compiled and kept
        launch.FAST_LAUNCH = fast
        ttft(n)
    for rep in range(args.reps):
        for fast in ((True, False) if rep % 2 == 0 else (False, True)):  # either order, in turn
            launch.FAST_LAUNCH = fast
            times[fast].append(ttft(n))
    launch.FAST_LAUNCH = True
    print(f"new={n}: TTFT median direct {statistics.median(times[True]):.1f} ms, through Triton "
          f"{statistics.median(times[False]):.1f} ms (min {min(times[True]):.1f} / {min(times[False]):.1f}; "
          f"{args.reps} each, interleaved)", flush=True)
