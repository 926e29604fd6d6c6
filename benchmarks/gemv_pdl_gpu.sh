#!/usr/bin/env bash
# One device call (NOTES-gemm.md run 8): GEMV/fused-op/engine GPU tests, decode step with LMQ_PDL=0/1
# twice each (profile_decode.py), then the GEMV config sweep (sweep_gemm.py gemv-compare, PDL off).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_gemm.py tests/test_fused_ops.py tests/test_engine_gpu.py -k "gemv or rms or silu or gpu" 2>&1 | tail -3 | tee $OUT/tests.log
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py -k "decode" 2>&1 | tail -2 | tee -a $OUT/tests.log
for pdl in 0 1 0 1; do echo "LMQ_PDL=$pdl"; LMQ_PDL=$pdl timeout 100 python3 benchmarks/profile_decode.py 2>&1 | grep -E "decode step|graph replay|GPU kernel time|gemv"; done | tee $OUT/pdl.log
LMQ_PDL=0 timeout 280 python3 benchmarks/sweep_gemm.py gemv-compare 2>&1 | tee $OUT/gemv-compare.log | tail -16
