#!/usr/bin/env bash
# One device call: the decode kernel at small M with Triton's wgmma lowering and with its mma.sync lowering
# (DISABLE_MMA_V3=1, own cache dir), GPU decode tests under the latter; then the Gluon int4 attention
# kernel's ring depth (attention_sweep.py --mma-splits --stages 2,3,4).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
timeout 150 python3 benchmarks/sweep_gemm.py decode-small 2>&1 | tee $OUT/decode-small-wgmma.log | grep -E "BEST|check.*err [^0]" 
DISABLE_MMA_V3=1 TRITON_CACHE_DIR=/tmp/tc-mmav2 timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gemm.py -k "gemm_gpu_configs and sm90" 2>&1 | tail -2 | tee $OUT/decode-mmav2-tests.log
DISABLE_MMA_V3=1 TRITON_CACHE_DIR=/tmp/tc-mmav2 timeout 150 python3 benchmarks/sweep_gemm.py decode-small 2>&1 | tee $OUT/decode-small-mmav2.log | grep -E "BEST"
timeout 200 python3 benchmarks/attention_sweep.py --mma-splits --batches 8,64 --stages 2,3,4 2>&1 | tee $OUT/mma-stages.log | tail -30
