"""Where an eager prefill step's host time goes: cProfile of whole requests (prefill of N new tokens, one
token out) on the synthetic Llama-3-8B with prefill CUDA graphs off (as multi-sequence and mixed steps run).
`eager_engine` and `ttft` are shared with benchmarks/fast_launch_ab.py.

    python benchmarks/host_profile_eager.py [--new 512] [--reps 5] [--rows 45]
"""

import argparse
import cProfile
import itertools
import pstats
import time

import torch

from lmq.engine.llm import LLM
from lmq.engine.model import EngineModel
from lmq.engine.sampling import SamplingParams

_serial = itertools.count()


def eager_engine() -> LLM:
    """Synthetic Llama-3-8B, int8 KV, prefill CUDA graphs off."""
    return LLM(EngineModel.synthetic("llama3-8b", torch.device("cuda")), kv_dtype="int8", max_model_len=4096,
               cache_max_memory="8GiB", max_num_seqs=4, prefill_graphs=False)


def ttft(llm: LLM, n: int) -> float:
    """ms for a request of `n` new tokens (never cached) and one token out, synchronized on both sides."""
    tokens = [20000 + 7 * next(_serial) % 9000 + i for i in range(n)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.add_request(tokens, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while llm.has_unfinished():
        llm.step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=45)
    args = ap.parse_args()
    llm = eager_engine()
    for _ in range(3):
        ttft(llm, args.new)
    print("TTFT ms without the profiler:", " ".join(f"{ttft(llm, args.new):.1f}" for _ in range(args.reps)),
          flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.reps):
        ttft(llm, args.new)
    prof.disable()
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumtime").print_stats(args.rows)


if __name__ == "__main__":
    main()
