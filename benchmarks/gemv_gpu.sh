#!/usr/bin/env bash
# The M=1 GEMV on a lent GPU (benchmarks/NOTES-gemm.md): the GPU kernel tests, then every GEMV option
# against the table config, the decode kernel and cuBLAS (sweep_gemm.py gemv-compare), then an
# Nsight Compute read of issue-slot use against DRAM throughput on gate_up for two configs.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_gemm.py 2>&1 | tail -5 | tee "$OUT/tests.log"
timeout 300 python3 benchmarks/sweep_gemm.py gemv-compare 2>&1 | tee "$OUT/gemv-compare.log"
if [ "${NCU:-1}" = 1 ]; then
  timeout 200 ncu --clock-control none -k regex:gemv --metrics \
gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_executed.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio,smsp__average_warp_latency_issue_stalled_wait.ratio,launch__registers_per_thread \
    python3 benchmarks/ncu_gemv.py 2>&1 | tail -80 | tee "$OUT/ncu.log"
fi
