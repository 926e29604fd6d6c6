#!/usr/bin/env bash
# One device call: install lmq, run the attention GPU tests, the config sweep, `lmq bench attention`.
# Usage (on the GPU machine, repo root): bash benchmarks/attention_gpu.sh [extra bench args...]
# SKIP_TESTS=1 / SKIP_SWEEP=1 leave those steps out. Logs land in $OUT (or ./out when OUT is unset).
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } | tee "$OUT/gpu.txt"
tests_rc=0
if [ -z "$SKIP_TESTS" ]; then
  timeout 300 python3 -m pytest -q -m gpu tests/test_attention.py tests/test_attention_rope.py tests/test_kv_cache.py \
    -p no:warnings 2>&1 | tail -25 | tee "$OUT/tests.log"; tests_rc=$?
fi
if [ -z "$SKIP_SWEEP" ]; then
  timeout 360 python3 benchmarks/attention_sweep.py $SWEEP_ARGS 2>&1 | tee "$OUT/sweep.log"
fi
echo "+ lmq bench attention --json $*" | tee "$OUT/bench_cmd.txt"
if grep -qE "failed|error" "$OUT/tests.log" 2>/dev/null; then
  # the PTX conversions broke a test: time the plain-Triton conversions instead, and say so
  echo "GPU tests failed: benchmarking with DEQUANT_ASM = False" | tee -a "$OUT/bench_cmd.txt"
  timeout 300 python3 -c "import sys, lmq.kernels.kv_quant as k; k.DEQUANT_ASM = False; from lmq.cli import main; \
sys.argv = ['lmq', 'bench', 'attention', '--json'] + sys.argv[1:]; main()" "$@" >"$OUT/bench.json" 2>"$OUT/bench.log"; rc=$?
else
  timeout 300 lmq bench attention --json "$@" >"$OUT/bench.json" 2>"$OUT/bench.log"; rc=$?
fi
tail -5 "$OUT/bench.log"
python3 -c "
import json
from lmq.bench_attention import render_attention_table
from rich.console import Console
Console(width=200).print(render_attention_table(json.load(open('$OUT/bench.json'))))
" 2>&1 | tee "$OUT/table.txt"
exit $rc
