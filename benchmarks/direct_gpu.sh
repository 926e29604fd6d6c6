#!/usr/bin/env bash
# The small-M Hopper kernel (kernels/w4a16_gemm_direct.py, NOTES-gemm.md run 47) on a lent GPU, by stage:
#   STAGES=check   the GEMM GPU tests (direct kernel, dispatch) and the prefill-attention GPU tests (session 18's
#                  per-stream softmax-state buffer had not run on a GPU)
#   STAGES=table   `lmq bench gemm --m 1,2,3,4,8,16,32,48,64` in fp16, then M = 4 and 16 in bf16
#   STAGES=ncu     Nsight Compute sections of the direct and decode kernels on qkv at M=16
#   STAGES=bigm    the direct kernel with 32- and 64-row tiles at M = 32 and 64 against the decode kernel
#   STAGES=ab      decode steps of synthetic Llama-3-8B at batch 4 and 16 with the direct path and without
#                  (profile_decode.py --direct 1 / 0, interleaved, two reps)
# Logs land in $OUT/<stage>/.
source "$(dirname "$0")/gpu_setup.sh"
for stage in ${STAGES:-check table}; do
  begin_stage "$stage"
  case $stage in
  check)
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k "direct or dispatch or two_row" 2>&1 \
      | tail -3 | tee "$OUT/check/gemm-tests.log"
    echo "exit status ${PIPESTATUS[0]} (124: cut by its timeout)" | tee -a "$OUT/check/gemm-tests.log"
    # the prefill tests whose chunks have a cached prefix (the prefix launch and its softmax-state buffer)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
      -k "chunked_with_shared_prefix or fresh_is_as_exact or reads_the_chunk" 2>&1 | tail -3 \
      | tee "$OUT/check/prefill-tests.log"
    ;;
  table)
    timeout 300 lmq bench gemm --m 1,2,3,4,8,16,32,48,64 --json >"$OUT/table/bench.json" 2>"$OUT/table/bench.log"
    grep -E "M=" "$OUT/table/bench.log" | tail -40
    timeout 120 lmq bench gemm --m 4,16 --dtype bf16 --json >"$OUT/table/bench-bf16.json" 2>"$OUT/table/bench-bf16.log"
    grep -E "M=" "$OUT/table/bench-bf16.log" | tail -10
    ;;
  ncu)
    timeout 200 ncu --clock-control none -k regex:"direct_kernel|gemm_kernel" --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section LaunchStats --section MemoryWorkloadAnalysis python3 benchmarks/ncu_direct.py 2>&1 \
      | tee "$OUT/ncu/ncu-qkv-m16.txt" | grep -E "direct_kernel|gemm_kernel|Duration|DRAM Throughput|Achieved Occ|Theoretical Occ|Issued Warp|Eligible Warps|Active Warps|Warp Cycles Per Issued|Registers|Shared Memory Config"
    ;;
  bigm)  # rows per tile 32 and 64 at M = 32 .. 64, against the decode kernel (gate_up: the decode kernel's)
    timeout 300 python3 benchmarks/direct_gemm.py sweep --m 32,48,64 --shapes qkv_proj,o_proj,down_proj \
      --configs "64,2,4;64,2,8;128,2,2;128,2,3;128,2,4" 2>&1 | grep -E "SUM|BEST|Error" | tee "$OUT/bigm/sweep.log"
    ;;
  ab)
    decode_ab direct "1 0" "${BATCHES:-4 16}"
    ;;
  esac
done
