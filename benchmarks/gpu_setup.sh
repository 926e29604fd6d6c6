# Sourced by the benchmarks' device scripts: strict mode, $OUT, lmq installed from this tree, and the GPU and
# software versions in $OUT/gpu.txt; `begin_stage NAME` makes $OUT/NAME and stamps the time there.
set -uo pipefail
OUT=${OUT:-out}
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-250}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

begin_stage() {
  mkdir -p "$OUT/$1"
  date -u | tee "$OUT/$1/date.txt"
}
