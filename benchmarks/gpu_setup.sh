# Sourced by the benchmarks' device scripts: strict mode, $OUT, lmq installed from this tree, and the GPU and
# software versions in $OUT/gpu.txt; `begin_stage NAME` makes $OUT/NAME and stamps the time there; `decode_ab FLAG
# "VALUES" "BATCHES"` times decode steps of synthetic Llama-3-8B (profile_decode.py --FLAG VALUE) at each batch,
# the values interleaved, two reps, into $OUT/ab/decode-ab.log.
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

decode_ab() {
  mkdir -p "$OUT/ab"
  for rep in 1 2; do
    for b in $3; do
      for v in $2; do
        echo "== rep $rep batch $b $1 $v" | tee -a "$OUT/ab/decode-ab.log"
        timeout 100 python3 benchmarks/profile_decode.py --batch "$b" --"$1" "$v" 2>&1 \
          | grep -E "decode step|graph replay|GPU kernel time" | tee -a "$OUT/ab/decode-ab.log"
      done
    done
  done
}
