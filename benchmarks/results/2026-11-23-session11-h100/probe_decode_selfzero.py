"""The decode kernel's split-K reduction, three ways, per Llama-3-8B shape and M (CUDA-graph time per call):
- fill: a zero-fill node, then the kernel adding into it with atomics (lmq before session 11);
- self-zero: split 0 zeroes each tile, the other splits add after it (no fill node);
- self-zero + PDL: the same, launched early (programmatic dependent launch), waiting for the previous kernel;
and the M=1 GEMV beside them. Usage: python3 benchmarks/probe_decode_memset.py [M ...]   (GPU)
"""

import sys

import torch
from lmq.kernels import pdl
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm, w4a16_gemm_ref
from lmq.kernels.w4a16_gemv import w4a16_gemv

from lmq.bench import GEMM_SHAPES, copies_for, graph_time_us

sys.path.insert(0, "benchmarks")
from sweep_gemm import G, random_packed


def main(ms):
    torch.manual_seed(0)
    cfg = CONFIGS["sm90"]["decode"]
    variants = (("fill", {**cfg, "SELF_ZERO": False}, False), ("self-zero", cfg, False), ("self-zero+PDL", cfg, True))
    for name, N, K in GEMM_SHAPES["llama3-8b"]:
        _, p, nbytes = random_packed(N, K)
        packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G).float()
            times = []
            for label, c, use in variants:
                pdl._PDL[torch.cuda.current_device()] = use
                out = w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, c).float()
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 2e-3, (label, name, M, err)
                t = graph_time_us([lambda pp=pp, x=x, c=c: w4a16_gemm(x, pp["qweight"], pp["scales"], pp["zeros"], G, c)
                                   for pp in packs], calls=max(20, len(packs)), reps=9)
                times.append(f"{label} {t:.1f}")
            pdl._PDL[torch.cuda.current_device()] = True
            if M == 1:
                t = graph_time_us([lambda pp=pp, x=x: w4a16_gemv(x, pp["qweight"], pp["scales"], pp["zeros"], G)
                                   for pp in packs], calls=max(20, len(packs)), reps=9)
                times.append(f"gemv {t:.1f}")
            print(f"{name} M={M}: " + ", ".join(times) + " us", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 4, 16, 64])
