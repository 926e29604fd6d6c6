#!/usr/bin/env bash
# Throughput A/B of the sm90 table's decode -> prefill-kernel crossover (decode_max_m), alternated in separate
# processes: `lmq bench` on synthetic Llama-3-8B, 256 requests at once (mixed prefill and decode steps) plus a
# B=1 row and one multi-turn turn. Usage (GPU): bash benchmarks/crossover_ab.sh [M ...]   (default 191 255 191 255)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
for m in "${@:-191 255 191 255}"; do
  for v in $m; do
    echo "== decode_max_m=$v"
    python3 -c "
import sys
from lmq.kernels.w4a16_gemm import CONFIGS
CONFIGS['sm90']['decode_max_m'] = int(sys.argv[1])
from lmq.cli import main
sys.argv = ['lmq'] + sys.argv[2:]
main()" "$v" bench --synthetic llama3-8b --batch 1 --input-len 128 --output-len 128 --num-requests 256 --turns 1 \
      --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB --json > "$OUT/ab-$v.json" 2> "$OUT/ab-$v.log"
    python3 -c "import json,sys; from lmq.bench_e2e import render_e2e; print(render_e2e(json.load(open(sys.argv[1]))))" \
      "$OUT/ab-$v.json" | grep -E "^\| (1|256) " | tee -a "$OUT/ab.log"
  done
done
