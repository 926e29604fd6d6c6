#!/usr/bin/env bash
# One device call: the Gluon int4 kernel on 64-token tiles (block size 64), uncapped and capped at 168
# registers (three programs per SM), at B = 1, 8; then Nsight Compute on the split kernels
# (benchmarks/ncu_attention.py: B=8 4k and B=64 16k Gluon, B=1 16k Triton).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
timeout 150 python3 benchmarks/attention_sweep.py --mma-splits --batches 1,8 --contexts 4096,16384 --page 64 --maxnreg 168 2>&1 | tee $OUT/mma-page64.log | grep -o "int4 B=.*best [^|]*| triton plan [0-9.]*"
cd benchmarks && timeout 240 ncu --clock-control none -k regex:"decode_split_kernel" --launch-skip 1 --launch-count 5 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
  python3 ncu_attention.py > $OUT/ncu-attention.txt 2>&1; tail -5 $OUT/ncu-attention.txt
