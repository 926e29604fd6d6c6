"""Launch decode attention at a few shapes for Nsight Compute: where the split kernels' time goes
(issue rate, stall reasons, occupancy, memory throughput). Each shape runs twice; with the options below
ncu profiles launches 2-6, i.e. the second of each shape (the 1st, 3rd and 5th reports).

    ncu --clock-control none -k regex:"decode_split_kernel" --launch-skip 1 --launch-count 5 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        python3 benchmarks/ncu_attention.py

Shapes (H=32, H_kv=8, D=128, block 128, int4 unless named): B=8 4k and B=64 16k (the Gluon kernel),
B=1 16k (the Triton kernel).
"""

import lmq.kernels.attention_decode as dec
import torch
from attention_sweep import _workload

import lmq.bench_attention as ba

torch.manual_seed(0)
for B, L in ((8, 4096), (64, 16384), (1, 16384)):
    _, cache, tables, lens, q = _workload("int4", B, L)
    for _ in range(2):
        dec.decode_attention(q, cache, tables[0], lens, max_seq_len=L)
    torch.cuda.synchronize()
    print(f"B={B} L={L} done", flush=True)
    del cache, tables
    torch.cuda.empty_cache()
assert ba  # the bench module sets the block size the workload uses
