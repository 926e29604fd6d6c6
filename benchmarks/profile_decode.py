"""Where a batch-1 decode step's time goes: per-kernel GPU time of one eager decode forward on
synthetic Llama-3-8B weights (torch.profiler), beside the CUDA-graph step time.

    python benchmarks/profile_decode.py [--batch 1] [--context 1024] [--kv-dtype int8] [--max-model-len 4096]
        [--gemv-reduce table|atomic|fixed] [--gemv-rows 0|1|2|4] [--gemv-max-m N]
"""

import argparse
import collections
import time

import torch

from lmq.engine.llm import LLM
from lmq.engine.model import EngineModel
from lmq.engine.sampling import SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--context", type=int, default=1024)
ap.add_argument("--kv-dtype", default="int8")
ap.add_argument("--model", default="llama3-8b")
ap.add_argument("--max-model-len", type=int, default=4096, help="the decode graphs plan attention for this context")
ap.add_argument("--gemv-reduce", choices=("table", "atomic", "fixed"), default="table",
                help="the M=1 GEMV's split-K reduction, for an A/B (the tables' GEMV config, changed in place; "
                     "the qkv GEMV with RoPE fused always takes 'fixed')")
rows = ap.add_mutually_exclusive_group()
rows.add_argument("--gemv-rows", type=int, choices=(0, 1, 2), default=0,
                  help="send M <= this many rows to the GEMV, this many rows per program, for every weight size (0: the "
                       "tables' dispatch), for an A/B of the decode steps at batch 2 (the tables, changed in place)")
rows.add_argument("--gemv-max-m", type=int, default=0,
                  help="send M <= this many rows to the GEMV with the tables' rows per program (0: the tables' "
                       "crossover; 1: M=1 only, as before the two-row GEMV), for an A/B of the tables' dispatch")
ap.add_argument("--direct", type=int, choices=(0, 1), default=1,
                help="0: no direct-kernel path (the decode kernel at the M it would take), for an A/B of the tables")
ap.add_argument("--gemm-pdl", type=int, choices=(0, 1), default=1,
                help="0: the GEMMs (direct, decode, prefill) launched plain and their split-K outputs zeroed by "
                     "torch.zeros (lmq.kernels.pdl's fill kernel off), for an A/B")
args = ap.parse_args()
if not args.gemm_pdl:
    from lmq.kernels import pdl, w4a16_gemm, w4a16_gemm_direct, w4a16_gemm_ws
    pdl.ZERO_KERNEL = w4a16_gemm.PDL = w4a16_gemm_direct.PDL = w4a16_gemm_ws.PDL = False
if args.gemv_reduce != "table" or args.gemv_rows or args.gemv_max_m or not args.direct:
    from lmq.kernels.w4a16_gemm import CONFIGS
    for table in CONFIGS.values():
        if not args.direct:
            table["direct_rows"] = ()
        if args.gemv_reduce != "table":
            table["gemv"]["REDUCE"] = args.gemv_reduce
        if args.gemv_rows:
            table["gemv"]["ROWS"] = args.gemv_rows
            table["gemv_max_m"] = args.gemv_rows
            table["gemv_rows_max_numel"] = 1 << 62  # every weight, as in the A/B before the table took M=2
        if args.gemv_max_m:
            table["gemv_max_m"] = args.gemv_max_m

dev = torch.device("cuda")
model = EngineModel.synthetic(args.model, dev)
llm = LLM(model, kv_dtype=args.kv_dtype, max_model_len=args.max_model_len, cache_max_memory="8GiB", max_num_seqs=max(args.batch, 1))
prompts = [[1000 + i] * args.context for i in range(args.batch)]
ids = [llm.add_request(p, SamplingParams(max_new_tokens=64, ignore_eos=True)) for p in prompts]
while any(len(llm.seqs[i].output_ids) < 2 for i in ids):
    llm.step()
# graph step time
torch.cuda.synchronize()
t = time.perf_counter()
n = 20
for _ in range(n):
    llm.step()
torch.cuda.synchronize()
print(f"decode step (graph + sampling + host): {1e3 * (time.perf_counter() - t) / n:.3f} ms")
step = llm.scheduler.schedule()
graph, _ = llm.runner.graphs[next(b for b in llm.runner.buckets if b >= len(step.spans))]
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(n):
    graph.replay()
torch.cuda.synchronize()
print(f"graph replay alone: {1e3 * (time.perf_counter() - t) / n:.3f} ms")
# eager forward under the profiler: kernel breakdown
llm.runner.graphs = {}
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    llm.runner.run(step, llm.manager)
    torch.cuda.synchronize()
tot = collections.Counter()
cnt = collections.Counter()
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        tot[e.name[:60]] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        cnt[e.name[:60]] += 1
s = sum(tot.values())
print(f"eager forward, GPU kernel time total {s / 1e3:.3f} ms")
for name, us in tot.most_common(14):
    print(f"{us / 1e3:8.3f} ms {100 * us / s:5.1f}%  x{cnt[name]:4d}  {name}")
