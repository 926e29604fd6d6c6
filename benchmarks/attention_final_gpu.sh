#!/usr/bin/env bash
# One device call: the decode GPU tests of every split kernel, then `lmq bench attention` (the docs' table).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
timeout 330 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py -k "decode" 2>&1 | tail -2 | tee $OUT/decode-tests.log
mkdir -p $OUT/bench
timeout 200 lmq bench attention --json --kv-dtype fp16,int8,int4 --batch 1,8,64 --context 4k,16k,32k > $OUT/bench/bench.json 2> $OUT/bench/bench.log
tail -2 $OUT/bench/bench.log
