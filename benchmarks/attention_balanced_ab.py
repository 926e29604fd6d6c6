"""Decode attention with each sequence spread over all splits (`attention_decode.BALANCED`) or cut into the
plan's pieces, at equal-length shapes where both give the same split lengths: what the per-program split
length computation costs the kernels. Interleaved, three times each.

    python3 benchmarks/attention_balanced_ab.py
"""

import torch
from attention_sweep import _time, _workload

import lmq.bench_attention as ba
import lmq.kernels.attention_decode as dec

torch.manual_seed(0)
bw = ba.copy_bandwidth_bytes_s()
for kd in ("int4", "int8", "fp16"):
    for B, L in ((1, 4096), (1, 16384), (8, 16384), (64, 4096)):
        kv_bytes, cache, tables, lens, q = _workload(kd, B, L)
        cells = []
        for on in (True, False) * 3:
            dec.BALANCED = on
            cells.append(f"{'on' if on else 'off'} {_time(q, cache, tables, lens, L):.1f}")
        dec.BALANCED = True
        print(f"{kd} B={B} L={L}: " + ", ".join(cells), flush=True)
        del cache, tables
        torch.cuda.empty_cache()
