#!/usr/bin/env bash
# One device call: decode GPU tests (every split kernel, each sequence spread over all splits), then a decode
# step of a synthetic model (MODEL, default qwen2.5-7b) whose graphs plan attention for a MAXLEN context
# (default 32768) while the live one is 1k (profile_decode.py), with BALANCED on and off, twice each, for the
# KV dtypes in KVS (default int4 int8), B=1 and B=8; SKIP_TESTS=1 skips the tests.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
[ -n "${SKIP_TESTS:-}" ] || timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py -k "decode or balanced" 2>&1 | tail -2 | tee $OUT/decode-tests.log
for kv in ${KVS:-int4 int8}; do for bs in 1 8; do for bal in 1 0 1 0; do
  echo "model=${MODEL:-qwen2.5-7b} max_model_len=${MAXLEN:-32768} kv=$kv batch=$bs BALANCED=$bal"
  timeout 60 python3 -c "
import runpy, sys
import lmq.kernels.attention_decode as dec
dec.BALANCED = bool($bal)
sys.argv = ['profile_decode.py', '--kv-dtype', '$kv', '--batch', '$bs', '--context', '1024', '--max-model-len', '${MAXLEN:-32768}',
            '--model', '${MODEL:-qwen2.5-7b}']
runpy.run_path('benchmarks/profile_decode.py', run_name='__main__')
" 2>&1 | grep -E "decode step|graph replay|Error"
done; done; done | tee -a $OUT/balanced.log
