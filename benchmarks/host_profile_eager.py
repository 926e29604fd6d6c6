"""Where an eager prefill step's host time goes: cProfile of whole requests (prefill of N new tokens, one
token out) on the synthetic Llama-3-8B with prefill CUDA graphs off (as multi-sequence and mixed steps run).

    LMQ_PREFILL_GRAPHS=0 python benchmarks/host_profile_eager.py [--new 512] [--reps 5] [--rows 45]
"""

import argparse
import cProfile
import pstats
import time

import torch

from lmq.engine.llm import LLM
from lmq.engine.model import EngineModel
from lmq.engine.sampling import SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--new", type=int, default=512)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--rows", type=int, default=45)
args = ap.parse_args()

llm = LLM(EngineModel.synthetic("llama3-8b", torch.device("cuda")), kv_dtype="int8", max_model_len=4096,
          cache_max_memory="8GiB", max_num_seqs=4, prefill_graphs=False)
serial = iter(range(10**6))


def request() -> float:
    tokens = [20000 + 7 * next(serial) % 9000 + i for i in range(args.new)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.add_request(tokens, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while llm.has_unfinished():
        llm.step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


for _ in range(3):
    request()
print("TTFT ms without the profiler:", " ".join(f"{request():.1f}" for _ in range(args.reps)), flush=True)
prof = cProfile.Profile()
prof.enable()
for _ in range(args.reps):
    request()
prof.disable()
stats = pstats.Stats(prof).strip_dirs()
stats.sort_stats("tottime").print_stats(args.rows)
stats.sort_stats("cumtime").print_stats(args.rows)
