"""The decode-attention split kernels letting the merge launch after their K/V loop
(`attention_decode.TRIGGER_SPLIT`) against not, `lmq bench attention`'s timing, modes interleaved.

    python benchmarks/attention_trigger.py [--contexts 4096,16384] [--batches 1,8] [--kv fp16,int8,int4] [--reps 2]
"""
import sys

from lmq.kernels import attention_decode as dec

from lmq.bench_attention import bench_attention


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


contexts = [int(v) for v in arg("--contexts", "4096,16384").split(",")]
batches = [int(v) for v in arg("--batches", "1,8").split(",")]
kvs = arg("--kv", "fp16,int8,int4").split(",")
res = {}
for rep in range(int(arg("--reps", "2"))):
    for trigger in (False, True):
        dec.TRIGGER_SPLIT = trigger
        for r in bench_attention(kvs, contexts, batches)["rows"]:
            res.setdefault((r["kv_dtype"], r["context"], r["batch"]), {}).setdefault(trigger, []).append(
                (r["lmq_us"], r["floor_us"]))
dec.TRIGGER_SPLIT = True
for (kd, L, B), by in res.items():
    floor = by[True][0][1]
    off, on = ([t for t, _ in by[m]] for m in (False, True))
    print(f"{kd:5s} L={L:6d} B={B:3d}  off " + "/".join(f"{t:.2f}" for t in off) + "  late trigger "
          + "/".join(f"{t:.2f}" for t in on) + f"  floor {floor:.2f}  % floor {100 * floor / min(off):.0f} -> "
          f"{100 * floor / min(on):.0f}", flush=True)
