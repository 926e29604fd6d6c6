#!/usr/bin/env bash
# One device call: the GEMV's GPU tests, then its weights asked of L2 before the PDL wait (`PRELOAD`,
# kernels/w4a16_gemv.py): sweep_gemm.py gemv-preload (alone and after SiLU*mul), and a batch-1 decode
# step of synthetic Llama-3-8B (profile_decode.py) with PRELOAD 0 / 4 / 8, twice each, interleaved.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gemm.py -k "gemv" 2>&1 | tail -3 | tee $OUT/tests.log
timeout 240 python3 benchmarks/sweep_gemm.py gemv-preload 2>&1 | tee $OUT/gemv-preload.log | tail -24
for pre in 0 4 8 0 4 8; do
  echo "PRELOAD=$pre"
  timeout 100 python3 -c "
import runpy, sys
from lmq.kernels.w4a16_gemm import CONFIGS
CONFIGS['sm90']['gemv']['PRELOAD'] = $pre
sys.argv = ['profile_decode.py', '--kv-dtype', '${KV:-int8}']
runpy.run_path('benchmarks/profile_decode.py', run_name='__main__')
" 2>&1 | grep -E "decode step|graph replay|GPU kernel time"
done | tee $OUT/decode-preload.log
