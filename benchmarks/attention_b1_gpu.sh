#!/usr/bin/env bash
# One device call: where launch-bound decode-attention calls spend their time (kernel GPU times), then the
# Triton split kernel's tile / warps / ring depth where it runs.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
timeout 120 python3 benchmarks/attention_sweep.py --profile 2>&1 | tee $OUT/profile.log
timeout 300 python3 benchmarks/attention_sweep.py --triton-stages 2>&1 | tee $OUT/triton-stages.log
