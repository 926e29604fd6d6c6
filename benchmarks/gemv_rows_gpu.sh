#!/usr/bin/env bash
# Rows per GEMV program (NOTES-gemm.md runs 38, 40) on a lent GPU, in device calls
# (each under 10 minutes; a machine stays warm 30 s between calls):
#   STAGES=check  the GEMV GPU tests (ROWS 1, 2), the engine's 3-sequence decode on 2-row GEMV programs
#                 against the torch backend, then the kernels at M = 2..4 (`sweep_gemm.py gemv-rows`: the decode
#                 kernel, one and two rows per program; four rows, measured in session 14, were removed)
#   STAGES=table  (session 14, after sm90 took the two-row GEMV at M=2) the GEMV and engine GPU tests, `lmq bench gemm`
#                 at M = 1..4 and 16, then batch-2 decode steps: the table against M=1-only GEMV, interleaved, twice
#   STAGES=ab     batch-2 decode steps of synthetic Llama-3-8B: the tables' dispatch against the GEMV with 2 rows
#                 per program for every weight (gate_up too), interleaved, twice
# Logs land in $OUT.
set -uo pipefail
OUT=${OUT:-out}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
: "${STAGES:=check}"
for stage in $STAGES; do
  case $stage in
  check)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k gemv 2>&1 | tail -3 | tee "$OUT/tests.log"
    timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k gemv_rows 2>&1 | tail -3 \
      | tee -a "$OUT/tests.log"
    timeout 270 python3 benchmarks/sweep_gemm.py gemv-rows 2>&1 | tee "$OUT/gemv-rows.log" | grep -E "^(cuBLAS|BEST)"
    ;;
  table)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k "gemv or qlinear or two_row" 2>&1 \
      | tail -3 | tee "$OUT/tests.log"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tail -3 | tee -a "$OUT/tests.log"
    timeout 120 lmq bench gemm --m 1,2,3,4,16 2>&1 | tee "$OUT/bench-gemm.log" | tail -30
    for rep in 1 2; do
      for m in 1 0; do
        echo "== rep $rep batch 2 gemv-max-m $m (0: the table)" | tee -a "$OUT/decode-ab.log"
        timeout 80 python3 benchmarks/profile_decode.py --batch 2 --gemv-max-m "$m" 2>&1 \
          | grep -E "decode step|graph replay|GPU kernel time" | tee -a "$OUT/decode-ab.log"
      done
    done
    ;;
  ab)
    for rep in 1 2; do
      for br in "2 0" "2 2"; do
        set -- $br
        echo "== rep $rep batch $1 gemv-rows $2" | tee -a "$OUT/decode-ab.log"
        timeout 100 python3 benchmarks/profile_decode.py --batch "$1" --gemv-rows "$2" 2>&1 \
          | grep -E "decode step|graph replay|GPU kernel time" | tee -a "$OUT/decode-ab.log"
      done
    done
    ;;
  esac
done
