#!/usr/bin/env bash
# One device call: the decode GPU tests of the Gluon int4 kernel (two-stage ring), the Gluon kernel's split
# counts at B = 1, 2, 4 with 2 and 3 stages, then `lmq bench attention` (the docs' table).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py -k "decode and (int4 or mma or gluon)" 2>&1 | tail -2 | tee $OUT/gluon-tests.log
timeout 150 python3 benchmarks/attention_sweep.py --mma-splits --batches 1,2,4 --stages 2,3 2>&1 | tee $OUT/mma-stages-small.log | grep -o "int4 B=.*best [^|]*| triton plan [0-9.]*"
mkdir -p $OUT/bench
timeout 200 lmq bench attention --json --kv-dtype fp16,int8,int4 --batch 1,8,64 --context 4k,16k,32k > $OUT/bench/bench.json 2> $OUT/bench/bench.log
tail -3 $OUT/bench/bench.log
