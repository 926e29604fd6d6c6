"""The small-M Gluon kernel (kernels/w4a16_gemm_direct.py) on the GPU: correctness against the reference on odd
shapes, then its configs against the decode kernel (the sm90 table), the GEMV at M=1 and cuBLAS fp16, Llama-3-8B
shapes, g128, CUDA-graph timed (NOTES-gemm.md, run 47).

    python benchmarks/direct_gemm.py [check] [sweep] [--m 1,4,16]
"""
import sys

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, "benchmarks")
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm
from lmq.kernels.w4a16_gemm_direct import w4a16_gemm_direct
from lmq.kernels.w4a16_gemm_ws import w4a16_gemm_ws_ref
from lmq.kernels.w4a16_gemv import w4a16_gemv
from sweep_gemm import G, gemm_cases

from lmq.bench import graph_time_us
from lmq.errors import UnsupportedError
from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight


def packed(N, K, g):
    q = QuantizedWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8), (torch.rand(N, K // g) * 0.01 + 0.001).half(),
                        torch.randint(0, 16, (N, K // g), dtype=torch.uint8), 4, g)
    return {k: v.cuda() for k, v in planes64.pack(q).items()}


def check():
    torch.manual_seed(0)
    worst = 0.0
    for N, K, g in ((576, 1536, 64), (1000, 4096, 128), (576, 576, 32), (24, 1024, 32)):
        p = packed(N, K, g)
        for dt in (torch.float16, torch.bfloat16):
            for M in (1, 3, 16):
                x = torch.randn(M, K, device="cuda", dtype=dt)
                ref = w4a16_gemm_ws_ref(x, p["qweight"], p["scales"], p["zeros"], g).float()
                cfgs = ({}, {"BLOCK_N": 64}, {"STEP": 1}, {"STEP": 4}, {"MAX_SPLIT": 1}) if dt == torch.float16 else ({},)
                for cfg in cfgs:
                    out = w4a16_gemm_direct(x, p["qweight"], p["scales"], p["zeros"], g, cfg).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    worst = max(worst, err)
                    assert err < (2e-2 if dt == torch.bfloat16 else 2e-3), (N, K, g, M, dt, cfg, err)
    print(f"correct (worst relative error {worst:.2e})", flush=True)


def sweep(ms):
    shapes = sys.argv[sys.argv.index("--shapes") + 1].split(",") if "--shapes" in sys.argv else None
    # WAVES_FROM_M (): each config's own waves at every M (the table's would override them from M = 17)
    configs = [{"BLOCK_N": bn, "STEP": st, "WAVES": w, "WAVES_FROM_M": ()} for bn in (64, 128) for st in (1, 2, 4)
               for w in (2, 4, 8)]
    if "--configs" in sys.argv:  # a narrower set: "bn,step,waves;..."
        configs = [{**dict(zip(("BLOCK_N", "STEP", "WAVES"), map(int, c.split(",")))), "WAVES_FROM_M": ()}
                   for c in sys.argv[sys.argv.index("--configs") + 1].split(";")]
    dec = CONFIGS["sm90"]["decode"]
    gemv_cfg = CONFIGS["sm90"]["gemv"]
    sums = {}
    for name, M, x, _, packs, calls, cublas in gemm_cases(ms, shapes):
        res = [("cublas", cublas),
               ("decode", graph_time_us([lambda pp=pp, x=x: w4a16_gemm(x, pp["qweight"], pp["scales"], pp["zeros"],
                                                                      G, dec) for pp in packs],
                                        calls=calls, reps=9))]
        if M == 1:
            res.append(("gemv", graph_time_us([lambda pp=pp, x=x: w4a16_gemv(x, pp["qweight"], pp["scales"],
                                                                              pp["zeros"], G, gemv_cfg)
                                               for pp in packs], calls=calls, reps=9)))
        for cfg in configs:
            cfg = {**cfg, "BLOCK_M": min(64, max(16, 1 << (M - 1).bit_length()))}  # rows: M's power of two
            try:
                t = graph_time_us([lambda pp=pp, x=x, cfg=cfg: w4a16_gemm_direct(x, pp["qweight"], pp["scales"],
                                                                                 pp["zeros"], G, cfg)
                                   for pp in packs], calls=calls, reps=9)
            except (OutOfResources, UnsupportedError) as e:  # over the shared memory, or not built
                print(f"  {name} M={M} {cfg}: {type(e).__name__}", flush=True)
                continue
            res.append((f"bn{cfg['BLOCK_N']}/s{cfg['STEP']}/w{cfg['WAVES']}", t))
        for k, t in res:
            sums[(M, k)] = sums.get((M, k), 0.0) + t
        if not any(r[0].startswith("bn") for r in res):
            print(f"{name} M={M}: no config ran", flush=True)
            continue
        best = min((r for r in res if r[0].startswith("bn")), key=lambda r: r[1])
        print(f"{name} M={M}: " + ", ".join(f"{k} {t:.1f}" for k, t in res)
              + f" | BEST {best[0]} {best[1]:.1f} (cuBLAS x{res[0][1] / best[1]:.2f}, decode x{res[0][1] / res[1][1]:.2f})",
              flush=True)
    for M in ms:
        row = {k: t for (m, k), t in sums.items() if m == M}
        if not any(k.startswith("bn") for k in row):
            continue
        best = min((k for k in row if k.startswith("bn")), key=row.get)
        print(f"SUM M={M}: cublas {row['cublas']:.1f}, decode {row['decode']:.1f}, best direct {best} {row[best]:.1f}; "
              + ", ".join(f"{k} {t:.1f}" for k, t in row.items() if k.startswith("bn")), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    ms = (1, 4, 16)
    if "--m" in args:
        ms = tuple(int(v) for v in args[args.index("--m") + 1].split(","))
    if "check" in args:
        check()
    if "sweep" in args:
        sweep(ms)
