"""Where a multi-turn prefill's time goes: TTFT of a request whose first 1,024 tokens are already in
the prefix cache, for several counts of new tokens (64, 96, 128, 160, as in `lmq bench`'s multi-turn
rows), with host (wall) time beside the GPU kernel time of one eager prefill (torch.profiler).

    python benchmarks/profile_prefill.py [--prefix 1024] [--new 64,96,128,160] [--kv-dtype int8] [--decode-max-m M]
"""

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lmq.engine.llm import LLM
from lmq.engine.model import EngineModel
from lmq.engine.sampling import SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--prefix", type=int, default=1024)
ap.add_argument("--new", default="64,96,128,160")
ap.add_argument("--kv-dtype", default="int8")
ap.add_argument("--model", default="llama3-8b")
ap.add_argument("--reps", type=int, default=4)
ap.add_argument("--host", type=int, default=0, help="also print the N host-side ops with the most self CPU time")
ap.add_argument("--decode-max-m", type=int, default=0,
                help="try another crossover from the decode kernel to the prefill kernel (sm90 table)")
args = ap.parse_args()
if args.decode_max_m:
    from lmq.kernels.w4a16_gemm import CONFIGS

    CONFIGS["sm90"].update(decode_max_m=args.decode_max_m)

dev = torch.device("cuda")
model = EngineModel.synthetic(args.model, dev)
llm = LLM(model, kv_dtype=args.kv_dtype, max_model_len=4096, cache_max_memory="8GiB", max_num_seqs=4)
prefix = [1000 + i for i in range(args.prefix)]
news = [int(t) for t in args.new.split(",")]
serial = iter(range(10**6))


def ttft(n_new: int) -> float:
    tail = [20000 + 7 * next(serial) % 9000 + i for i in range(n_new)]  # never cached
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.add_request(prefix + tail, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while llm.has_unfinished():
        llm.step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


ttft(8)  # the prefix enters the cache
for n in news:  # warm-up of every size
    ttft(n)
for n in news:
    times = [ttft(n) for _ in range(args.reps)]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        ttft(n)
    tot, cnt = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name[:70]] += e.device_time_total
            cnt[e.name[:70]] += 1
    gpu = sum(tot.values()) / 1e3
    print(f"new={n}: TTFT median {statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f}); "
          f"GPU kernel time {gpu:.2f} ms in {sum(cnt.values())} kernels", flush=True)
    for name, us in tot.most_common(8):
        print(f"    {us / 1e3:7.3f} ms x{cnt[name]:4d}  {name}", flush=True)
    if args.host:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.host), flush=True)
