#!/usr/bin/env bash
# Decode steps of synthetic Llama-3-8B with an int4 KV cache, before and after a change to the attention kernels,
# interleaved in one device call. The "old" tree is `git archive REV lmq kernels pyproject.toml
# benchmarks/profile_decode.py -o .devcarry/old/old.tar`, carried to the device; each run first installs its tree
# (editable: an editable install's import finder wins over PYTHONPATH, so the trees cannot sit side by side).
# Usage: [SPECS="8:4000:4096 ..."] bash benchmarks/attention_engine_ab.sh   (logs in $OUT/engine-ab/)
set -uo pipefail
OUT=${OUT:-out}
NEW=$(pwd)
mkdir -p "$OUT/engine-ab"
rm -rf /tmp/old && mkdir -p /tmp/old && tar -xf .devcarry/old/old.tar -C /tmp/old
use() {  # install the tree, then say which attention module imports
  python3 -m pip install -q --no-deps --no-build-isolation -e "$1" >/dev/null 2>&1
  python3 -c "import lmq.kernels.attention_decode_mma as m; print(m.__file__, 'residency_pad' in dir(m))"
}
for spec in ${SPECS:-8:4000:4096 1:16000:16384 8:16000:16384}; do  # batch:context:max-model-len
  set -- ${spec//:/ }
  for rep in 1 2; do
    for tag in old new; do
      echo "== $tag B=$1 context $2 max-model-len $3 rep $rep" | tee -a "$OUT/engine-ab/ab.log"
      dir=$NEW; [ "$tag" = old ] && dir=/tmp/old
      use "$dir" | tee -a "$OUT/engine-ab/ab.log"
      (cd "$dir"; timeout 150 python3 benchmarks/profile_decode.py --batch $1 --context $2 \
        --kv-dtype int4 --max-model-len $3) 2>&1 | grep -E "decode step|graph replay" | tee -a "$OUT/engine-ab/ab.log"
    done
  done
done
use "$NEW" >/dev/null
