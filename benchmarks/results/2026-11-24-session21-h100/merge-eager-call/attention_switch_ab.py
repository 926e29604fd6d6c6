"""A switch of `lmq.kernels.attention_decode` (a module constant such as MERGE_EAGER) off and on, interleaved, with
`lmq bench attention`'s timing: us per call, the floor and the share of it, per KV dtype, context and batch.

    python benchmarks/attention_switch_ab.py MERGE_EAGER [--contexts 4096,16384] [--batches 1,8] [--kv fp16,int8,int4]
        [--reps 2]
"""
import sys

from lmq.kernels import attention_decode as dec

from lmq.bench_attention import bench_attention


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


switch = sys.argv[1]
default = getattr(dec, switch)
contexts = [int(v) for v in arg("--contexts", "4096,16384").split(",")]
batches = [int(v) for v in arg("--batches", "1,8").split(",")]
kvs = arg("--kv", "fp16,int8,int4").split(",")
res = {}
for _ in range(int(arg("--reps", "2"))):
    for on in (False, True):
        setattr(dec, switch, on)
        for r in bench_attention(kvs, contexts, batches)["rows"]:
            res.setdefault((r["kv_dtype"], r["context"], r["batch"]), {}).setdefault(on, []).append(
                (r["lmq_us"], r["floor_us"]))
setattr(dec, switch, default)
for (kd, L, B), by in res.items():
    floor = by[True][0][1]
    off, on = ([t for t, _ in by[m]] for m in (False, True))
    print(f"{kd:5s} L={L:6d} B={B:3d}  {switch} off " + "/".join(f"{t:.2f}" for t in off) + "  on "
          + "/".join(f"{t:.2f}" for t in on) + f"  floor {floor:.2f}  % floor {100 * floor / min(off):.0f} -> "
          f"{100 * floor / min(on):.0f}", flush=True)
