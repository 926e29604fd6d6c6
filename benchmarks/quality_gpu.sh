#!/usr/bin/env bash
# Quality run on a lent GPU (docs/quality.md): SmolLM2-135M-Instruct, AWQ vs RTN at group sizes 64
# and 32, perplexity on wikitext-2 test, KL divergence to the unquantized model, KV-cache precisions.
#
# The model travels in two parts (the device tool carries 64 MiB per call): call 1 carries
# .devcarry/p1 (first half of the GGUF, the texts, the gguf wheel), call 2 carries .devcarry/p2 and
# runs everything. Parts are kept in $W, outside the repo copy, while the machine stays warm.
# Make the parts here once (.devcarry/ is git-ignored):
#   mkdir -p .devcarry/p1 .devcarry/p2
#   split -b 50M ~/.cache/lmq/gguf/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/ggufpart-   # after python -m lmq.models.smollm2
#   mv /tmp/ggufpart-aa .devcarry/p1/; mv /tmp/ggufpart-ab .devcarry/p2/
#   cp ../shared/data/wikitext-2-raw/wiki.test.raw ../shared/data/calib/c4.txt .devcarry/p1/
#   cp ../shared/data/calib/wiki.txt .devcarry/p2/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .devcarry/p1 gguf==0.19.0
# then: run(command="bash benchmarks/quality_gpu.sh", carry=[".devcarry/p1"]), and the same with p2.
set -euo pipefail
W=/tmp/lmqdev
mkdir -p "$W"
for p in .devcarry/p1 .devcarry/p2; do [ -d "$p" ] && cp -r "$p"/. "$W"/; done
if [ ! -f "$W/ggufpart-aa" ] || [ ! -f "$W/ggufpart-ab" ]; then
  echo "have: $(ls "$W")"; echo "waiting for the other part"; exit 0
fi
export LMQ_CACHE=$W/cache PYTHONUNBUFFERED=1
mkdir -p "$LMQ_CACHE/gguf"
[ -f "$LMQ_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" ] || cat "$W"/ggufpart-aa "$W"/ggufpart-ab > "$LMQ_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/gguf-*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
MODEL=$(python3 -m lmq.models.smollm2 2>/dev/null | tail -1)
DATA=$W/wiki.test.raw
CALIB=$W/c4.txt
R=$OUT
: "${SEQLEN:=1024}"
if [ -n "${PROXY:-}" ]; then
  # Rank AWQ variants instead (benchmarks/quality_proxy.py, fp32 scorer, all 296 windows), e.g.
  # PROXY="--group-size 64 --baselines --variant base: --variant id:scale_identity=1"
  # shellcheck disable=SC2086
  python3 benchmarks/quality_proxy.py --device cuda --model "$MODEL" --calib "$CALIB" --data "$DATA" \
    --samples 128 --windows 296 $PROXY 2> "$R/proxy.err" | tee -a "$R/proxy.jsonl"
  exit 0
fi
# What to run (defaults: everything docs/quality.md shows). Each model is scored as soon as it is
# written, so a run cut short still returns whole rows.
: "${METHODS:=awq}" "${GSIZES:=64 32}" "${KV-int8 int4}" "${WIKICALIB:=1}" "${KLD_RTN:=1}"
ppl() { lmq eval ppl "$@" --data "$DATA" --seqlen "$SEQLEN" --device cuda --batch-size 8 --json >> "$R/eval.jsonl"; }
kld() { lmq eval kld "$@" --reference "$MODEL" --data "$DATA" --seqlen "$SEQLEN" --device cuda --batch-size 4 --json >> "$R/eval.jsonl"; }
: > "$R/eval.jsonl"
ppl "$MODEL"
for g in $GSIZES; do
  lmq quantize "$MODEL" -o "$W/rtn-g$g" --method rtn --group-size "$g" --force --json > "$R/quant-rtn-g$g.json"
  ppl "$W/rtn-g$g"
  [ "$KLD_RTN" = 1 ] && kld "$W/rtn-g$g"
  for meth in $METHODS; do
    lmq quantize "$MODEL" -o "$W/$meth-g$g" --method "$meth" --group-size "$g" --calib-data "$CALIB" \
      --calib-samples 128 --calib-seqlen 512 --device cuda --force --json > "$R/quant-$meth-g$g.json"
    ppl "$W/$meth-g$g"
    kld "$W/$meth-g$g"
  done
done
if [ "$WIKICALIB" = 1 ]; then
  # AWQ calibrated on wikitext-2 *train* text: how much a domain-matched calibration set helps.
  lmq quantize "$MODEL" -o "$W/awq-g64-wikicalib" --method awq --group-size 64 --calib-data "$W/wiki.txt" \
    --calib-samples 128 --calib-seqlen 512 --device cuda --force --json > "$R/quant-awq-g64-wikicalib.json"
  ppl "$W/awq-g64-wikicalib"
fi
for kv in $KV; do
  ppl "$MODEL" --kv-dtype "$kv"
  kld "$MODEL" --kv-dtype "$kv"
done
python3 benchmarks/quality_table.py "$R"
