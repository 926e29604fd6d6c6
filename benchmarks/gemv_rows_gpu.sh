#!/usr/bin/env bash
# Rows per GEMV program and its cp.async ring (NOTES-gemm.md runs 38-39) on a lent GPU, in three device calls
# (each under 10 minutes; a machine stays warm 30 s between calls):
#   STAGES=check  the GEMV GPU tests (ROWS 1, 2, 4; PIPE 3), the engine's 3-sequence decode on 4-row GEMV programs
#                 against the torch backend, then the kernels at M = 2..4 (`sweep_gemm.py gemv-rows`: the decode
#                 kernel, one, two and four rows per program)
#   STAGES=pipe   the M=1 GEMV with a 2-4 stage cp.async ring at 6-12 waves (`sweep_gemm.py gemv-pipe`), twice
#   STAGES=ab     batch-2 and batch-4 decode steps of synthetic Llama-3-8B: the tables' dispatch (the decode kernel)
#                 against the GEMV with 2 rows (batch 2) and 4 rows (batch 4) per program, interleaved, twice
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
  pipe)
    timeout 500 python3 benchmarks/sweep_gemm.py gemv-pipe gemv-pipe 2>&1 | tee "$OUT/gemv-pipe.log" \
      | grep -E "^(cuBLAS|BEST)"
    ;;
  ab)
    for rep in 1 2; do
      for br in "2 0" "2 2" "4 0" "4 4"; do
        set -- $br
        echo "== rep $rep batch $1 gemv-rows $2" | tee -a "$OUT/decode-ab.log"
        timeout 100 python3 benchmarks/profile_decode.py --batch "$1" --gemv-rows "$2" 2>&1 \
          | grep -E "decode step|graph replay|GPU kernel time" | tee -a "$OUT/decode-ab.log"
      done
    done
    ;;
  esac
done
