"""Probe (NOTES-gemm.md run 34): what the GEMV's split-K finish costs. Times the table GEMV at M=1 against
copies whose splits only add into the workspace (no counter, no last-program read-back: wrong output) or
only store (no atomics either), and one that lets dependents launch early. Timing only; the copies' results
are not used. The copies are kernels/w4a16_gemv.py as of 9ccd574 with the edits in gemv_*.diff here; make
them in a checkout of 9ccd574 (the probe ran from its repo root, with this file in benchmarks/probe/):
    for v in nofinish nored trigger; do
        git show 9ccd574:kernels/w4a16_gemv.py > benchmarks/probe/gemv_$v.py
        patch benchmarks/probe/gemv_$v.py < benchmarks/probe/gemv_$v.diff
    done
"""
import importlib.util
import sys

import torch

sys.path.insert(0, "benchmarks")
from lmq.kernels.w4a16_gemm import CONFIGS
from lmq.kernels.w4a16_gemv import w4a16_gemv
from sweep_gemm import random_packed

from lmq.bench import GEMM_SHAPES, copies_for, graph_time_us


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.w4a16_gemv


kerns = [("table", w4a16_gemv), ("red only", load("nofinish", "benchmarks/probe/gemv_nofinish.py")),
         ("store only", load("nored", "benchmarks/probe/gemv_nored.py")),
         ("early trigger", load("trigger", "benchmarks/probe/gemv_trigger.py"))]
cfg = CONFIGS["sm90"]["gemv"]
for name, N, K in GEMM_SHAPES["llama3-8b"]:
    q, p, nbytes = random_packed(N, K)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
    row = []
    for rep in range(2):
        for label, kern in kerns:
            t = graph_time_us([lambda pp=pp: kern(x, pp["qweight"], pp["scales"], pp["zeros"], 128, cfg) for pp in packs],
                              calls=max(20, len(packs)), reps=9)
            row.append(f"{label} {t:.2f}")
    print(f"{name}: " + " | ".join(row), flush=True)
    del packs
    torch.cuda.empty_cache()
