#!/usr/bin/env bash
# One device call: install lmq, run the GEMM/pack GPU tests, then `lmq bench gemm`.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_gemm.sh [extra bench args...]
# Logs land in $OUT (or ./out when OUT is unset).
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout 300 python3 -m pytest -q -x -m gpu tests/test_gemm.py ${EXTRA_TESTS} 2>&1 | tail -15 | tee "$OUT/tests.log"
fi
lmq bench gemm --json "$@" >"$OUT/bench.json" 2>"$OUT/bench.log"; rc=$?
tail -40 "$OUT/bench.log"
python3 -c "
import json, sys
from lmq.bench import render_gemm_table
from rich.console import Console
Console(width=200).print(render_gemm_table(json.load(open('$OUT/bench.json'))))
" 2>&1 | tee "$OUT/table.txt"
exit $rc
