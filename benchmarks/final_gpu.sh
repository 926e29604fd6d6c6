#!/usr/bin/env bash
# Session 14's closing check on a lent GPU, one call (under 7 minutes): the GEMM tests that this session's changes
# touch (two-row GEMV dispatch, ordered split-K, the deterministic table), the engine's GPU tests, then
# `lmq bench gemm --m 1,2,16` (M=2: the two-row GEMV on qkv / o_proj / down). Logs land in $OUT.
set -uo pipefail
OUT=${OUT:-out}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; } | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py \
  -k "gemv or ordered or deterministic or qlinear or two_row or crossovers" 2>&1 | tail -2 | tee "$OUT/tests.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tail -2 | tee -a "$OUT/tests.log"
timeout 100 lmq bench gemm --m 1,2,16 >"$OUT/bench-gemm.txt" 2>"$OUT/bench-gemm.log"
cat "$OUT/bench-gemm.txt"
