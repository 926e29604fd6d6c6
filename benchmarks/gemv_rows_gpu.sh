#!/usr/bin/env bash
# Rows per GEMV program (NOTES-gemm.md run 38) on a lent GPU, one call: the GPU tests of the GEMV and of the
# engine's GEMV decode at 2..4 rows, then the kernels at M = 2..4 (the decode kernel, one, two and four rows per
# program), then batch-2 and batch-4 decode steps of synthetic Llama-3-8B with the tables' dispatch against
# `--gemv-rows 2` and `4` (interleaved, twice). Logs land in $OUT.
set -uo pipefail
OUT=${OUT:-out}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k gemv 2>&1 | tail -3 | tee "$OUT/tests.log"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k gemv_rows 2>&1 | tail -3 \
  | tee -a "$OUT/tests.log"
timeout 240 python3 benchmarks/sweep_gemm.py gemv-rows 2>&1 | tee "$OUT/gemv-rows.log" | grep -E "^(cuBLAS|BEST)"
for rep in 1 2; do
  for b in 2 4; do
    for r in 0 2 4; do
      echo "== rep $rep batch $b gemv-rows $r" | tee -a "$OUT/decode-ab.log"
      timeout 120 python3 benchmarks/profile_decode.py --batch "$b" --gemv-rows "$r" 2>&1 | grep -E "decode step|graph replay|GPU kernel time" \
        | tee -a "$OUT/decode-ab.log"
    done
  done
done
