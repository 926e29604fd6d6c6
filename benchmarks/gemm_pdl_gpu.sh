#!/usr/bin/env bash
# The split-K GEMMs' PDL zero fill (lmq.kernels.pdl.zero_filled, benchmarks/gemm_pdl.py) on a lent GPU, by stage:
#   STAGES=check   every mode against the reference in replayed graphs, then the GEMM GPU tests
#   STAGES=sweep   gemm_pdl.py's modes interleaved (M: $MS, default 3,16,32,64)
#   STAGES=table   `lmq bench gemm --m 1,2,3,4,16,32,64 --json`
#   STAGES=ab      decode steps of synthetic Llama-3-8B at $BATCHES (default 16) with it and without
#                  (profile_decode.py --gemm-pdl 1 / 0, interleaved, two reps)
# Logs land in $OUT/<stage>/.
source "$(dirname "$0")/gpu_setup.sh"
for stage in ${STAGES:-check sweep}; do
  begin_stage "$stage"
  case $stage in
  check)
    timeout 200 python3 benchmarks/gemm_pdl.py check 2>&1 | tail -3 | tee "$OUT/check/modes.log"
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k "direct or dispatch or pdl or split" 2>&1 \
      | tail -3 | tee "$OUT/check/gemm-tests.log"
    echo "exit status ${PIPESTATUS[0]} (124: cut by its timeout)" | tee -a "$OUT/check/gemm-tests.log"
    ;;
  sweep)
    timeout 300 python3 benchmarks/gemm_pdl.py sweep --m "${MS:-3,16,32,64}" 2>&1 | tee "$OUT/sweep/sweep.log"
    ;;
  table)
    timeout 300 lmq bench gemm --m 1,2,3,4,16,32,64 --json >"$OUT/table/bench.json" 2>"$OUT/table/bench.log"
    grep -E "M=" "$OUT/table/bench.log" | tail -40
    ;;
  ab)
    decode_ab gemm-pdl "1 0" "${BATCHES:-16}"
    ;;
  esac
done
