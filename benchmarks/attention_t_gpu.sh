#!/usr/bin/env bash
# The transposed Gluon int4 decode-attention kernel (attention_decode_mma: tokens on the MMA rows, the group's
# query heads on its columns) on a lent GPU, by stage:
#   STAGES=check   the Gluon kernel's decode GPU tests (forced at short splits, long contexts, stale scales, the
#                  build-failure fallback)
#   STAGES=sweep   attention_sweep.py --mma-splits: the Gluon kernel at 1..64 splits (ring depths $DEPTHS; pads
#                  $PADS forced, else `residency_pad`'s)
#                  against the Triton kernel at its plan (B = $BATCHES; $CONTEXTS)
#   STAGES=bench   lmq bench attention (the docs' table)
# Logs land in $OUT/<stage>/.
source "$(dirname "$0")/gpu_setup.sh"
for stage in ${STAGES:-check sweep}; do
  begin_stage "$stage"
  case $stage in
  check)
    timeout ${CHECK_S:-300} python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py \
      -k "${CHECK_K:-mma_kernel or long_context or stale_scales or cannot_build}" 2>&1 | tail -15 \
      | tee "$OUT/check/tests.log"
    echo "exit status ${PIPESTATUS[0]} (124: cut by its timeout)" | tee -a "$OUT/check/tests.log"
    ;;
  sweep)
    timeout ${SWEEP_S:-300} python3 benchmarks/attention_sweep.py --mma-splits ${PADS:+--pads $PADS} --stages ${DEPTHS:-2} \
      --batches ${BATCHES:-1,4,8,64} --contexts ${CONTEXTS:-4096,16384,32768} 2>&1 | tee "$OUT/sweep/sweep.log"
    ;;
  bench)
    timeout ${BENCH_S:-240} lmq bench attention --json --kv-dtype ${KVS:-fp16,int8,int4} --batch 1,8,64 \
      --context 4k,16k,32k > "$OUT/bench/bench.json" 2> "$OUT/bench/bench.log"
    tail -45 "$OUT/bench/bench.log"
    ;;
  esac
done
