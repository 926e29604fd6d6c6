"""Sweep W4A16 kernel configurations on the local GPU (for the per-arch table in kernels/w4a16_gemm.py).

Times each config on the Llama-3-8B linear shapes (g128) with lmq.bench's CUDA-graph timer and
prints, per (regime, M), each config's time per shape and its total; the fastest total wins.
Usage: python3 benchmarks/sweep_gemm.py [gemv|decode_rp|decode|prefill ...]
"""

import sys

import torch
from lmq.kernels.w4a16_decode import w4a16_decode
from lmq.kernels.w4a16_gemm import w4a16_gemm
from lmq.kernels.w4a16_gemv import w4a16_gemv

from lmq.bench import GEMM_SHAPES, _copies_for, _graph_time_us
from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight

G = 128
SWEEP = {
    "gemv": {
        "ms": [1],
        "configs": [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=0, num_warps=w, num_stages=1)
                    for bn, bk, w in ((32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 128, 4),
                                      (128, 256, 8), (64, 512, 4), (16, 256, 2))],
    },
    "decode_rp": {
        "ms": [1, 16, 64],
        "configs": [dict(BLOCK_M=16, BLOCK_N=bn, SPLIT_K=0, num_warps=w, WAVES=wv)
                    for bn, w, wv in ((32, 4, 4), (64, 4, 4), (64, 4, 8), (128, 4, 4), (128, 8, 4))],
    },
    "decode": {
        "ms": [1, 16, 64],
        "configs": [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=0, GROUP_M=1, num_warps=4, num_stages=st,
                         SWAP_AB=True, DOT_K=dk)
                    for bn, bk, st, dk in ((64, 128, 3, 64),)],
    },
    "prefill": {
        "ms": [256, 1024, 4096],
        "configs": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st,
                         SWAP_AB=True, DOT_K=dk)
                    for bm, bn, w, st, dk in ((128, 128, 8, 3, 16), (128, 128, 8, 3, 64), (64, 128, 4, 3, 64),
                                              (128, 128, 8, 4, 64))],
    },
}


def main(regimes):
    torch.manual_seed(0)
    weights = []
    for name, N, K in GEMM_SHAPES["llama3-8b"]:
        q = QuantizedWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8),
                            (torch.rand(N, K // G) * 0.01 + 0.001).half(),
                            torch.randint(0, 16, (N, K // G), dtype=torch.uint8), 4, G)
        p = {k: v.cuda() for k, v in planes64.pack(q).items()}
        nbytes = sum(t.numel() * t.element_size() for t in p.values())
        weights.append((name, K, [p] + [{k: v.clone() for k, v in p.items()} for _ in range(_copies_for(nbytes) - 1)]))
    for regime in regimes:
        for M in SWEEP[regime]["ms"]:
            results = []
            for cfg in SWEEP[regime]["configs"]:
                per = []
                for name, K, packs in weights:
                    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                    kernel = {"gemv": w4a16_gemv, "decode_rp": w4a16_decode}.get(regime, w4a16_gemm)
                    fns = [lambda pp=pp, kernel=kernel, x=x, cfg=cfg: kernel(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg)
                           for pp in packs]
                    per.append(_graph_time_us(fns, calls=max(20, len(fns)), reps=9))
                results.append((sum(per), per, cfg))
                print(f"{regime} M={M} {cfg} -> " + " ".join(f"{t:.1f}" for t in per) + f" sum {sum(per):.1f} us",
                      flush=True)
            best = min(results, key=lambda r: r[0])
            print(f"BEST {regime} M={M}: {best[2]} sum {best[0]:.1f} us per-shape "
                  + " ".join(f"{t:.1f}" for t in best[1]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["decode", "prefill"])
