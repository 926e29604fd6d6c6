"""Split-K GEMMs with the zero fill launched as a PDL kernel and the GEMM launched early (lmq.kernels.pdl),
against the fill node and plain launches: the direct kernel (sm90, fp16) and the decode kernel, Llama-3-8B shapes,
g128, CUDA-graph timed like `lmq bench gemm`, modes interleaved, cuBLAS fp16 beside.

    python benchmarks/gemm_pdl.py [check] [sweep] [prefill] [--m 3,16,32,64] [--reps 2] [--shapes qkv_proj,o_proj]

Modes: off (torch.zeros, plain launches), notrig (the PDL fill kernel and the GEMM launched early, the GEMM not
triggering its dependents), start / late (the same, the GEMM triggering at its start / after its K loop), auto
(the code's defaults: the decode kernel late, the direct kernel at the start for 16-row tiles, late otherwise).
`prefill`: the Hopper prefill kernel (w4a16_gemm_ws) with its PDL launch and fill off / on (--m defaults to
192,256,512,1024,4096 there).
"""
import sys

import torch

sys.path.insert(0, "benchmarks")
from lmq.kernels import pdl
from lmq.kernels import w4a16_gemm as dec
from lmq.kernels import w4a16_gemm_direct as direct
from lmq.kernels import w4a16_gemm_ws as ws
from sweep_gemm import G, gemm_cases, random_packed

from lmq.bench import graph_time_us

MODES = {"off": (False, False, 0), "notrig": (True, True, 0), "start": (True, True, 1), "late": (True, True, 2),
         "auto": (True, True, None)}


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def set_mode(mode):
    pdl.ZERO_KERNEL, gemm_pdl, trigger = MODES[mode]
    dec.PDL = direct.PDL = gemm_pdl
    direct.TRIGGER = trigger
    dec.TRIGGER = 2 if trigger is None else trigger


def check():
    """Every mode against the reference, in a graph replayed twice (a stale fill or a race would show)."""
    torch.manual_seed(0)
    worst = 0.0
    for N, K in ((6144, 4096), (1000, 4096), (4096, 14336)):
        _, p, _ = random_packed(N, K)
        for M in (3, 16, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref = dec.w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G).float()
            for mode in MODES:
                set_mode(mode)
                fns = {"decode": lambda x=x, p=p: dec.w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G,
                                                                  dec.CONFIGS["sm90"]["decode"])}
                if direct.supported(x, M):
                    fns["direct"] = lambda x=x, p=p: direct.w4a16_gemm_direct(x, p["qweight"], p["scales"], p["zeros"],
                                                                              G)
                for path, fn in fns.items():
                    fn()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    side = torch.cuda.Stream()
                    with torch.cuda.graph(graph, stream=side):
                        outs = [fn() for _ in range(4)]
                    for _ in range(2):
                        for o in outs:
                            o.fill_(float("nan"))
                        graph.replay()
                        torch.cuda.synchronize()
                        for o in outs:
                            err = ((o.float() - ref).norm() / ref.norm()).item()
                            worst = max(worst, err)
                            assert err < 2e-3, (N, K, M, mode, path, err)
    set_mode("auto")
    print(f"correct in every mode (worst relative error {worst:.2e})", flush=True)


def cases(default_ms):
    """`sweep_gemm.gemm_cases` over --m (default `default_ms`) and --shapes."""
    want = arg("--shapes", None)
    return gemm_cases([int(m) for m in arg("--m", default_ms).split(",")], want.split(",") if want else None)


def sweep():
    for name, M, x, _, packs, calls, cublas in cases("3,16,32,64"):
        paths = {"decode": lambda pp, x=x: dec.w4a16_gemm(x, pp["qweight"], pp["scales"], pp["zeros"], G,
                                                          dec.CONFIGS["sm90"]["decode"])}
        if direct.supported(x, M):
            paths["direct"] = lambda pp, x=x: direct.w4a16_gemm_direct(x, pp["qweight"], pp["scales"], pp["zeros"],
                                                                       G)
        for path, fn in paths.items():
            res = {mode: [] for mode in MODES}
            for _ in range(int(arg("--reps", "2"))):
                for mode in MODES:
                    set_mode(mode)
                    res[mode].append(graph_time_us([lambda pp=pp, fn=fn: fn(pp) for pp in packs], calls=calls,
                                                   reps=9))
            set_mode("auto")
            cells = "  ".join(f"{mode} " + "/".join(f"{t:.2f}" for t in ts) for mode, ts in res.items())
            best = min(min(ts) for ts in res.values())
            print(f"{name:13s} M={M:3d} {path:6s} {cells}  cuBLAS {cublas:.2f}  best x cuBLAS {cublas / best:.2f}",
                  flush=True)


def prefill():
    for name, M, x, p, packs, calls, cublas in cases("192,256,512,1024,4096"):
        ref = ws.w4a16_gemm_ws_ref(x, p["qweight"], p["scales"], p["zeros"], G).float()
        res = {False: [], True: []}
        for _ in range(int(arg("--reps", "2"))):
            for on in (False, True):
                pdl.ZERO_KERNEL = ws.PDL = on
                out = ws.w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], G).float()
                assert ((out - ref).norm() / ref.norm()).item() < 2e-3, (name, M, on)
                res[on].append(graph_time_us([lambda pp=pp, x=x: ws.w4a16_gemm_ws(x, pp["qweight"], pp["scales"],
                                                                                   pp["zeros"], G)
                                              for pp in packs], calls=calls, reps=9))
        pdl.ZERO_KERNEL = ws.PDL = True
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        plan = ws.plan(M, p["scales"].shape[1], x.shape[1], ws.DEFAULT_CONFIG, sms)
        print(f"{name:13s} M={M:5d} plan {plan}  off " + "/".join(f"{t:.1f}" for t in res[False]) + "  on "
              + "/".join(f"{t:.1f}" for t in res[True]) + f"  cuBLAS {cublas:.1f}  x cuBLAS "
              f"{cublas / min(res[False]):.2f} -> {cublas / min(res[True]):.2f}", flush=True)


if __name__ == "__main__":
    if "check" in sys.argv:
        check()
    if "sweep" in sys.argv:
        sweep()
    if "prefill" in sys.argv:
        prefill()
