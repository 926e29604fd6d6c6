#!/usr/bin/env bash
# The engine on a lent GPU (docs/benchmarks.md, "ENGINE"): the engine tests on the real small model
# (Triton backend, CUDA graphs), then `lmq bench` end to end on synthetic Llama-3-8B weights.
#
# The real model travels as its GGUF in two parts (the device tool carries 64 MiB per call), as in
# benchmarks/quality_gpu.sh: call 1 carries .devcarry/p1 (first part, the gguf wheel), call 2
# carries .devcarry/e2 (second part) and runs. Make .devcarry/e2 here with
#   split -b 50M ~/.cache/lmq/gguf/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/ggufpart-
#   mkdir -p .devcarry/e2 && mv /tmp/ggufpart-ab .devcarry/e2/
# STAGES picks what runs (default "tests bench"); TESTS the test files; BENCH_ARGS adds options to the bench.
set -euo pipefail
W=/tmp/lmqdev
mkdir -p "$W"
for p in .devcarry/p1 .devcarry/e2; do [ -d "$p" ] && cp -r "$p"/. "$W"/; done
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
: "${STAGES:=tests bench}"
for stage in $STAGES; do
  case $stage in
  tests)
    if [ ! -f "$W/ggufpart-aa" ] || [ ! -f "$W/ggufpart-ab" ]; then
      echo "have: $(ls "$W")"; echo "waiting for the other part"; exit 0
    fi
    export LMQ_CACHE=$W/cache
    mkdir -p "$LMQ_CACHE/gguf"
    G=$LMQ_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$G" ] || cat "$W"/ggufpart-aa "$W"/ggufpart-ab > "$G"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/gguf-*.whl
    # TESTS overrides which test files run (default: the engine, fused-op and sampling tests)
    PYTHONPATH=/tmp/site timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
      ${TESTS:-tests/test_engine.py tests/test_fused_ops.py tests/test_sampling.py} 2>&1 | tee "$OUT/tests.log" \
      || echo "tests failed or timed out"
    ;;
  bench)
    lmq bench --synthetic llama3-8b --batch 1,16,64 --input-len 128,1024 --output-len 128 --num-requests 256 \
      --turns 8 --baseline hf --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB ${BENCH_ARGS:-} --json > "$OUT/bench.json"
    python3 -c "import json,sys; from lmq.bench_e2e import render_e2e; print(render_e2e(json.load(open(sys.argv[1]))))" \
      "$OUT/bench.json" | tee "$OUT/bench.md"
    ;;
  esac
done
