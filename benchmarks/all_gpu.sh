#!/usr/bin/env bash
# The three benchmarks of the issues on a lent GPU, in at most two device calls (each call stays under 10 minutes):
#   STAGES=gemm       the GEMM GPU tests, then `lmq bench gemm` at every M of issue 3
#   STAGES=attn-e2e   `lmq bench attention` (issue 4's shapes), then `lmq bench` end to end on synthetic Llama-3-8B
#   STAGES=det        the engine's deterministic mode: its GPU test, then `lmq bench --mode latency` plain and
#                     `--deterministic` (what the mode costs; one call, under 10 minutes)
#   STAGES=ordered    the decode kernel's ordered split-K (the deterministic mode's): its GPU tests, then
#                     `sweep_gemm.py decode-ordered` (atomics / ordered / at most two splits); run with det after it
#   STAGES=attn       `lmq bench attention` alone (issue 4's shapes)
#   STAGES=budget     throughput of synthetic Llama-3-8B at three step token budgets (--max-num-batched-tokens 512,
#                     2048, 8192): what the budget trades between TTFT and inter-token latency
#   STAGES=mixed      prefill graphs of many sequences: the engine's graph-vs-eager GPU tests, then `lmq bench` latency
#                     (batch 4 and 16, 128-token prompts) and throughput (--max-num-batched-tokens 512) with them and
#                     with single-sequence prefill graphs only (LMQ_PREFILL_GRAPHS=single, as before), interleaved
#   STAGES=e2e        the engine's GPU tests, then `lmq bench` end to end on synthetic Llama-3-8B (ENGINE's command)
#   STAGES=splits     (session 15) the GEMV and GEMM launchers' GPU tests (one or two rows per GEMV program, the GEMM's
#                     kept plans, ordered split-K), the engine's two-row and deterministic GPU tests, then
#                     `sweep_gemm.py decode-ordered-splits` (ordered at M = 32-191: split caps, fewer waves)
#   STAGES=ab         (session 16) where a batch-1 decode step's time goes (profile_decode.py), then the prefill graphs
#                     three ways (many-sequence + single-sequence graphs, single-sequence only, none: LMQ_PREFILL_GRAPHS
#                     1 / single / 0), interleaved, REPS times (default 2): batch-4 x 1,024-token TTFT and the
#                     throughput of ENGINE's command (64 requests around 128 tokens in, 64 out), with each process's
#                     graph capture time
#   STAGES=headmem    (session 16) the int8 LM head's GPU tests and the engine's, then the KV cache sized from
#                     --gpu-memory-utilization (no --cache-max-memory) with --lm-head auto and int8
#   STAGES=head       (session 16) the int8 LM head: its GPU tests, the kernel against cuBLAS on the fp16 head (with a
#                     config sweep at the M values of SWEEP, default 1,16), then `lmq bench --mode latency` with
#                     --lm-head auto and int8, interleaved REPS times (default 2; synthetic Llama-3-8B, batch 1-64),
#                     then Qwen2.5-7B at batch 1; the sweep times fp16 and bf16 activations (session 17)
#   STAGES=prefill    (session 17) prefill attention with and without the unmasked key tiles (UNMASKED_TILES): its GPU
#                     tests and the engine's prefill ones, `attention_sweep.py --prefill-configs`, then batch-1 TTFT of
#                     1,024- and 4,096-token prompts (synthetic Llama-3-8B, int8 KV) with the switch on and off, twice
#   STAGES=fresh      (session 18) prefill attention reading the chunk's own K/V from the float k / v the write path
#                     rewrote (kv_cache.FRESH_PREFILL): `attention_sweep.py --prefill-fresh`, then batch-1 TTFT of 1,024-
#                     and 4,096-token prompts (synthetic Llama-3-8B, int8 and int4 KV) with the switch on and off, REPS
#                     times (default 1)
#   STAGES=freshtests the GPU tests of the write path, prefill attention and the engine's prefill and mixed steps
#   STAGES=cold       (session 18, after `lmq bench` started its measured runs with a cold prefix cache) ENGINE's
#                     end-to-end command, then the FRESH_PREFILL A/B of stage fresh for int8 KV
# Logs and tables land in $OUT/<stage>/. Used for the H200 tables of docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-out}
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-250}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } | tee "$OUT/gpu.txt"
# issue 4's attention table, into $1/attention.{json,log,txt}
attention_table() {
  timeout 300 lmq bench attention --json --kv-dtype fp16,int8,int4 --batch 1,8,64 --context 4k,16k,32k \
    >"$1/attention.json" 2>"$1/attention.log"
  python3 -c "
import json
from lmq.bench_attention import render_attention_table
from rich.console import Console
Console(width=200).print(render_attention_table(json.load(open('$1/attention.json'))))" 2>&1 | tee "$1/attention.txt"
}
# ENGINE's end-to-end command on synthetic Llama-3-8B, into $1/e2e.{json,log,md}
e2e_bench() {
  timeout 300 lmq bench --synthetic llama3-8b --batch 1,16 --input-len 128,1024 --output-len 64 --num-requests 64 \
    --turns 4 --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB --json >"$1/e2e.json" 2>"$1/e2e.log"
  render_e2e "$1/e2e"
}
# batch-1 TTFT of 1,024- and 4,096-token prompts (synthetic Llama-3-8B) with the module switch $2 (e.g.
# lmq.engine.kv_cache.FRESH_PREFILL) True and False, for the KV dtypes $3, REPS times (default 1), into
# $1/e2e-<kv>-<switch>-<rep>.log
switch_ab() {
  for rep in $(seq "${REPS:-1}"); do
    for kd in $3; do
      for f in True False; do
        timeout 100 python3 -c "
import importlib, sys
setattr(importlib.import_module('${2%.*}'), '${2##*.}', $f)
from lmq.cli import app
sys.argv = ['lmq', 'bench', '--synthetic', 'llama3-8b', '--mode', 'latency', '--batch', '1', '--input-len',
            '1024,4096', '--output-len', '8', '--kv-dtype', '$kd', '--max-model-len', '8192', '--cache-max-memory', '16GiB']
app()" >"$1/e2e-$kd-$f-$rep.log" 2>&1
        echo "rep $rep $kd ${2##*.}=$f: $(grep -E '^latency' "$1/e2e-$kd-$f-$rep.log" | tr '\n' ' ')"
      done
    done
  done
}
# the tables of an `lmq bench --json` report $1.json, printed and kept as $1.md
render_e2e() {
  python3 -c "import json,sys; from lmq.bench_e2e import render_e2e; print(render_e2e(json.load(open(sys.argv[1]))))" \
    "$1.json" 2>&1 | tee "$1.md"
}
: "${STAGES:=gemm}"
for stage in $STAGES; do
  mkdir -p "$OUT/$stage"
  case $stage in
  gemm)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py 2>&1 | tail -3 | tee "$OUT/gemm/tests.log"
    timeout 330 lmq bench gemm --json --m 1,4,16,64,256,1024,4096 >"$OUT/gemm/bench.json" 2>"$OUT/gemm/bench.log"
    python3 -c "
import json
from lmq.bench import render_gemm_table
from rich.console import Console
Console(width=200).print(render_gemm_table(json.load(open('$OUT/gemm/bench.json'))))" 2>&1 | tee "$OUT/gemm/table.txt"
    ;;
  attn-e2e)
    attention_table "$OUT/attn-e2e"
    e2e_bench "$OUT/attn-e2e"
    ;;
  ordered)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k "ordered or deterministic" 2>&1 \
      | tail -3 | tee "$OUT/ordered/tests.log"
    timeout 200 python3 benchmarks/sweep_gemm.py decode-ordered 2>&1 | tee "$OUT/ordered/sweep.log" \
      | grep -E "^(cuBLAS|decode-ordered|BEST)" | sed -E "s/\{'BLOCK_M'.*'DOT_K': 64/{table/"
    ;;
  attn)
    attention_table "$OUT/attn"
    ;;
  budget)
    for t in 512 2048 8192; do
      timeout 180 lmq bench --synthetic llama3-8b --mode throughput --num-requests 128 --input-len 1024 \
        --output-len 128 --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB --max-num-batched-tokens "$t" \
        --json >"$OUT/budget/tokens-$t.json" 2>"$OUT/budget/tokens-$t.log"
      render_e2e "$OUT/budget/tokens-$t" | tail -3
    done
    ;;
  e2e)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tail -3 | tee "$OUT/e2e/tests.log"
    e2e_bench "$OUT/e2e"
    ;;
  mixed)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k "mixed or prefill_graph" 2>&1 \
      | tail -3 | tee "$OUT/mixed/tests.log"
    for g in 1 single; do
      echo "== LMQ_PREFILL_GRAPHS=$g" | tee -a "$OUT/mixed/bench.log"
      LMQ_PREFILL_GRAPHS=$g timeout 150 lmq bench --synthetic llama3-8b --mode latency,throughput --batch 4,16 \
        --input-len 128 --output-len 32 --num-requests 128 --kv-dtype int8 --max-model-len 4096 \
        --cache-max-memory 16GiB --max-num-batched-tokens 512 >>"$OUT/mixed/bench.log" 2>&1
      grep -E "^latency|^\| 128|captured|Error" "$OUT/mixed/bench.log" | tail -4
    done
    ;;
  splits)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py \
      -k "gemv or ordered or plan or qlinear or two_row or crossovers or gemm_configs or deterministic" 2>&1 \
      | tail -3 | tee "$OUT/splits/tests.log"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k "gemv_rows or deterministic" 2>&1 \
      | tail -3 | tee -a "$OUT/splits/tests.log"
    timeout 200 python3 benchmarks/sweep_gemm.py decode-ordered-splits 2>&1 | tee "$OUT/splits/sweep.log" \
      | grep -E "^(cuBLAS|decode-ordered|BEST)" | sed -E "s/\{'BLOCK_M'.*'DOT_K': 64/{table/"
    ;;
  ab)
    timeout 120 python3 benchmarks/profile_decode.py --batch 1 --context 1024 2>&1 | tee "$OUT/ab/profile.log" | tail -30
    for rep in $(seq "${REPS:-2}"); do
      for g in 1 single 0; do
        L="$OUT/ab/latency-$g-$rep.log" T="$OUT/ab/throughput-$g-$rep.log"
        LMQ_PREFILL_GRAPHS=$g timeout 120 lmq bench --synthetic llama3-8b --mode latency --batch 4 --input-len 1024 \
          --output-len 16 --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB >"$L" 2>&1
        LMQ_PREFILL_GRAPHS=$g timeout 120 lmq bench --synthetic llama3-8b --mode throughput --input-len 128 \
          --output-len 64 --num-requests 64 --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB >"$T" 2>&1
        echo "rep $rep graphs=$g: capture $(grep -oE 'in [0-9.]+s' "$L" | tail -1) / $(grep -oE 'in [0-9.]+s' "$T" | tail -1)," \
          "TTFT 4x1024 $(grep -E '^\| 4 ' "$L" | cut -d'|' -f5) ms, req/s $(grep -E '^\| 64 ' "$T" | cut -d'|' -f4)" \
          | tee -a "$OUT/ab/summary.txt"
      done
    done
    ;;
  headmem)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_lm_head.py tests/test_engine_gpu.py \
      -k "not real_model and not eval" 2>&1 | tail -3 | tee "$OUT/headmem/tests.log"
    for h in auto int8; do
      timeout 120 lmq bench --synthetic llama3-8b --mode latency --batch 1 --input-len 128 --output-len 32 \
        --kv-dtype int8 --max-model-len 4096 --lm-head "$h" >"$OUT/headmem/e2e-$h.log" 2>&1
      echo "== --lm-head $h"; grep -E "KV cache|^\| 1 \|" "$OUT/headmem/e2e-$h.log" | cut -c1-150
    done
    ;;
  head)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_lm_head.py -k "not real_model and not eval" 2>&1 \
      | tail -3 | tee "$OUT/head/tests.log"
    timeout 240 python3 benchmarks/lm_head_sweep.py --sweep "${SWEEP:-1,16}" --dtype float16,bfloat16 2>&1 | tee "$OUT/head/sweep.log" \
      | grep -vE "^  (worst|\()"
    for rep in $(seq "${REPS:-2}"); do
      for h in auto int8; do
        timeout 120 lmq bench --synthetic llama3-8b --mode latency --batch 1,4,16,64 --input-len 128 --output-len 64 \
          --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB --lm-head "$h" >"$OUT/head/e2e-$h-$rep.log" 2>&1
        echo "== rep $rep --lm-head $h"; grep -E "^\| (1|4|16|64) \|" "$OUT/head/e2e-$h-$rep.log" | cut -d'|' -f2-10
      done
    done
    for h in auto int8; do  # a second head shape: Qwen2.5-7B's 152064 x 3584
      timeout 120 lmq bench --synthetic qwen2.5-7b --mode latency --batch 1 --input-len 128 --output-len 64 \
        --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB --lm-head "$h" >"$OUT/head/qwen-$h.log" 2>&1
      echo "== qwen2.5-7b --lm-head $h"; grep -E "^\| 1 \|" "$OUT/head/qwen-$h.log" | cut -d'|' -f2-10
    done
    ;;
  prefill)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_engine_gpu.py \
      -k "prefill or mixed or triton_backend" 2>&1 | tail -2 | tee "$OUT/prefill/tests.log"
    timeout 240 python3 benchmarks/attention_sweep.py --prefill-configs 2>&1 | grep -v Warn | tee "$OUT/prefill/sweep.log"
    REPS=${REPS:-2} switch_ab "$OUT/prefill" lmq.kernels.attention_prefill.UNMASKED_TILES int8
    ;;
  freshtests)
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_engine_gpu.py \
      tests/test_kv_cache.py -k "prefill or write_kv or mixed or triton_backend or engine_step" 2>&1 | tail -3 \
      | tee "$OUT/freshtests/tests.log"
    ;;
  fresh)
    timeout 240 python3 benchmarks/attention_sweep.py --prefill-fresh 2>&1 | grep -v Warn | tee "$OUT/fresh/sweep.log"
    switch_ab "$OUT/fresh" lmq.engine.kv_cache.FRESH_PREFILL "int8 int4"
    ;;
  cold)
    e2e_bench "$OUT/cold"
    switch_ab "$OUT/cold" lmq.engine.kv_cache.FRESH_PREFILL int8
    ;;
  det)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k deterministic >"$OUT/det/tests.log" 2>&1
    tail -3 "$OUT/det/tests.log"
    for flag in "" --deterministic; do
      echo "== lmq bench $flag" | tee -a "$OUT/det/bench.log"
      timeout 200 lmq bench --synthetic llama3-8b --mode latency --batch 1,4,16,64 --input-len 128,1024 \
        --output-len 64 --kv-dtype int8 --max-model-len 4096 --cache-max-memory 16GiB $flag >>"$OUT/det/bench.log" 2>&1
      grep -E "^latency|Error" "$OUT/det/bench.log" | tail -8
    done
    ;;
  esac
done
