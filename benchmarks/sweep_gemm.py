"""Sweep W4A16 kernel configurations on the local GPU (for the per-arch table in kernels/w4a16_gemm.py).

Times each config on the Llama-3-8B linear shapes (g128) with lmq.bench's CUDA-graph timer and
prints, per (regime, M), each config's time per shape and its total; the fastest total wins.
Usage: python3 benchmarks/sweep_gemm.py [gemv|decode|decode-small|decode-waves|decode-big|decode-splits|decode-ordered|decode-ordered-splits|decode-1stage|gemv-inflight|gemv-rows|prefill|ws|ws-small|ws-split ...]
       python3 benchmarks/sweep_gemm.py gemv-compare [NAME=PATH ...]
The second form checks the M=1 GEMV against the reference on the GPU and times the current kernel's
candidate configs, any other versions of kernels/w4a16_gemv.py given as files (e.g. the previous one
from git), the decode kernel and cuBLAS fp16, on each shape: us, TB/s of int4 bytes, x cuBLAS.
"""

import importlib.util
import sys

import torch
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm, w4a16_gemm_ref
from lmq.kernels.w4a16_gemm_ws import w4a16_gemm_ws
from lmq.kernels.w4a16_gemv import w4a16_gemv

from lmq.bench import GEMM_SHAPES, copies_for, graph_time_us
from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight

G = 128
_DECODE_TABLE = CONFIGS["sm90"]["decode"]
_GEMV_TABLE = CONFIGS["sm90"]["gemv"]
SWEEP = {
    "gemv": {
        "ms": [1],
        "configs": [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=0, num_warps=w, num_stages=1)
                    for bn, bk, w in ((32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 128, 4),
                                      (128, 256, 8), (64, 512, 4), (16, 256, 2))],
    },
    "decode": {
        "ms": [16, 32, 64, 96, 128, 160],
        "configs": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=0, GROUP_M=1, num_warps=w, num_stages=st,
                         SWAP_AB=True, DOT_K=64, WAVES=waves, MAX_SPLIT=32)
                    for bm, bn, w, st, waves in ((16, 64, 4, 3, 4), (32, 64, 4, 3, 4), (64, 64, 4, 3, 4),
                                                 (64, 128, 4, 3, 4), (64, 128, 8, 3, 4), (64, 64, 4, 2, 8))],
    },
    "prefill": {
        "ms": [256, 1024, 4096],
        "configs": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st,
                         SWAP_AB=True, DOT_K=dk)
                    for bm, bn, w, st, dk in ((128, 128, 8, 3, 16), (128, 128, 8, 3, 64), (64, 128, 4, 3, 64),
                                              (128, 128, 8, 4, 64))],
    },
    # the decode kernel's split count at medium M: splits until the grid covers WAVES waves of SMs
    "decode-waves": {
        "ms": [64, 96, 128, 192, 256],
        "configs": [{**_DECODE_TABLE, "WAVES": w, "WAVES_FROM_M": ()} for w in (4, 3, 2, 1)],
    },
    # the decode kernel at medium M with bigger tiles: rows per tile up to 128 or 256 (each dequantized
    # weight tile then serves more rows), 128 weight rows on 8 warps; the table's config first
    "decode-big": {
        "ms": [128, 192, 256, 384, 512],
        "configs": [_DECODE_TABLE] + [
            {**_DECODE_TABLE, "BLOCK_M_MAX": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "WAVES": waves,
             "WAVES_FROM_M": ()}
            for bm, bn, w, st, waves in ((128, 64, 4, 3, 2), (128, 64, 4, 3, 3), (128, 64, 8, 3, 2),
                                         (128, 128, 8, 3, 2), (64, 128, 8, 3, 2), (256, 64, 8, 3, 2),
                                         (128, 64, 4, 4, 2))],
    },
    # the decode kernel's table config at small M, and with 4 stages / 8 warps on 128 weight rows (run the
    # regime once more with DISABLE_MMA_V3=1 and its own TRITON_CACHE_DIR to time Triton's mma.sync
    # lowering of the same kernel instead of wgmma)
    "decode-small": {
        "ms": [1, 4, 16, 32, 64],
        "configs": [_DECODE_TABLE, {**_DECODE_TABLE, "num_stages": 4},
                    {**_DECODE_TABLE, "BLOCK_N": 128, "num_warps": 8}],
    },
    # the decode kernel's split count set outright (0: the table's waves rule), per shape: whether a count that
    # divides K's 32 tiles evenly beats the rule's (6 splits at M=16 for qkv run 6 tiles in the longest split)
    "decode-splits": {
        "ms": [16, 64],
        "configs": [{**_DECODE_TABLE, "SPLIT_K": s} for s in (0, 4, 8, 16, 32)],
    },
    # two activation rows per GEMV program (ROWS: each dequantized weight tile serves both) against one row per
    # program and against the decode kernel (KERNEL "decode": the table's decode config) at M = 2..4 (four rows per
    # program, measured in runs 40 and 44, lost everywhere and were removed from the kernel)
    "gemv-rows": {
        "ms": [2, 3, 4],
        "configs": [{**_DECODE_TABLE, "KERNEL": "decode"}, {**_GEMV_TABLE, "ROWS": 1}] + [{**_GEMV_TABLE, **v} for v in (
            {"ROWS": 2}, {"ROWS": 2, "WAVES": 6})],
    },
    # the M=1 GEMV with more bytes in flight per SM (for a card with more bandwidth than the H100 the table was
    # measured on): 256-wide K tiles, more programs; the kernel-wide num_stages 2, 3 (which leave the GEMV's loop
    # unpipelined; a real cp.async ring measured slower and was removed: NOTES-gemm.md run 41); the table first
    "gemv-inflight": {
        "ms": [1],
        "configs": [_GEMV_TABLE] + [{**_GEMV_TABLE, **v} for v in (
            {"num_stages": 2}, {"num_stages": 3}, {"BLOCK_K": 256}, {"WAVES": 16, "MAX_SPLIT": 32},
            {"BLOCK_K": 256, "WAVES": 16, "MAX_SPLIT": 32}, {"BLOCK_N": 32, "WAVES": 16, "MAX_SPLIT": 32},
            {"num_warps": 8, "BLOCK_N": 128}, {"num_stages": 2, "WAVES": 16, "MAX_SPLIT": 32})],
    },
    # the deterministic mode's decode kernel: the table's fp16 atomics, the splits added in split order by the last
    # split (REDUCE "ordered", the mode's choice now), and the mode's earlier form (at most two splits, atomics)
    "decode-ordered": {
        "ms": [2, 4, 16, 64, 128],
        "configs": [_DECODE_TABLE, {**_DECODE_TABLE, "REDUCE": "ordered"}, {**_DECODE_TABLE, "MAX_SPLIT": 2}],
    },
    # the ordered split-K from M = 32 with fewer splits: its fp32 slices are written and read back, traffic that
    # grows with M x splits (at M=64 on qkv as many bytes as the weights at the table's 5 splits)
    "decode-ordered-splits": {
        "ms": [32, 64, 128, 191],
        "configs": [_DECODE_TABLE] + [{**_DECODE_TABLE, "REDUCE": "ordered", **v} for v in (
            {}, {"MAX_SPLIT": 4}, {"MAX_SPLIT": 3}, {"MAX_SPLIT": 2}, {"WAVES_FROM_M": ((32, 2), (129, 1))},
            {"WAVES_FROM_M": ((64, 2), (129, 1))})],
    },
    # the decode kernel without a cp.async ring (num_stages 1): weights straight to registers as the GEMV loads
    # them, latency hidden by more resident programs (more waves), x staged per chunk for wgmma; the table first
    "decode-1stage": {
        "ms": [4, 16, 64],
        "configs": [_DECODE_TABLE] + [{**_DECODE_TABLE, "num_stages": 1, "BLOCK_K": bk, "WAVES": w, "MAX_SPLIT": 32,
                                       "WAVES_FROM_M": ()}
                                      for bk, w in ((128, 4), (128, 8), (128, 12), (256, 8), (128, 16))],
    },
    # the warp-specialized Hopper kernel at decode-sized M: x rows as wgmma's N = 16 / 64 side, K split until
    # the work items fill the SMs (fp16 atomics), deeper rings
    "ws-small": {
        "ms": [1, 16, 64],
        "configs": [{"BLOCK_M": bm, "MAX_SPLIT": 16, "MIN_SPLIT_CHUNKS": mc, "STAGES": st}
                    for bm, mc, st in ((16, 4, 6), (16, 4, 10), (16, 8, 8), (64, 4, 6), (64, 4, 8))],
    },
    # the warp-specialized Hopper kernel at M = 256 / 512 with K split into more than two (qkv: 96 tiles of
    # 128 x 128 for 132 SMs; more than two fp16 atomic adds per output are not bit-reproducible)
    "ws-split": {
        "ms": [256, 512],
        "configs": [{}, {"MAX_SPLIT": 4}, {"MAX_SPLIT": 8, "MIN_SPLIT_CHUNKS": 4},
                    {"BLOCK_M_SMALL": 0, "MAX_SPLIT": 8, "MIN_SPLIT_CHUNKS": 4}],
    },
    # the warp-specialized Hopper kernel (kernels/w4a16_gemm_ws.py), fp16: the table's config (persistent;
    # 128-row tiles and split-K when 256-row tiles leave SMs idle), without either, 3 and 5 stages
    "ws": {
        "ms": [128, 192, 256, 512, 1024, 2048, 4096],
        "configs": [{}, {"BLOCK_M_SMALL": 0, "SPLIT_K": 1, "SPLIT_WAVES": 0}, {"STAGES": 3}, {"STAGES": 5}],
    },
}


def _kernel_for(regime, cfg):
    """The kernel a sweep config times: its KERNEL key ("decode": the tensor-core kernel), else the regime's."""
    if cfg.get("KERNEL") == "decode" or not regime.startswith(("gemv", "ws")):
        return w4a16_gemm
    return w4a16_gemv if regime.startswith("gemv") else w4a16_gemm_ws


def random_packed(N, K):
    """Random g128 codes/scales/zeros [N, K], their planes64 tensors on the GPU and those tensors' bytes."""
    q = QuantizedWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8),
                        (torch.rand(N, K // G) * 0.01 + 0.001).half(),
                        torch.randint(0, 16, (N, K // G), dtype=torch.uint8), 4, G)
    p = {k: v.cuda() for k, v in planes64.pack(q).items()}
    return q, p, sum(t.numel() * t.element_size() for t in p.values())


def gemm_cases(ms, shapes=None):
    """Per Llama-3-8B shape (those named in `shapes`, or all) and M in `ms`: (name, M, x fp16 [M, K], the packed
    weight, its copies past L2, calls per graph, cuBLAS fp16 us on x), timed as `lmq bench gemm` times."""
    torch.manual_seed(0)
    for name, N, K in GEMM_SHAPES["llama3-8b"]:
        if shapes is not None and name not in shapes:
            continue
        _, p, nbytes = random_packed(N, K)
        packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
        w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(max(1, copies_for(N * K * 2)))]
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            calls = max(20, len(packs))
            yield name, M, x, p, packs, calls, graph_time_us([lambda w=w, x=x: x @ w.t() for w in w16], calls=calls,
                                                             reps=9)


def main(regimes):
    torch.manual_seed(0)
    weights = []
    for name, N, K in GEMM_SHAPES["llama3-8b"]:
        _, p, nbytes = random_packed(N, K)
        weights.append((name, K, [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]))
    for regime in regimes:
        for M in SWEEP[regime]["ms"]:
            if regime in ("prefill", "ws", "ws-small", "ws-split", "decode-waves", "decode-big", "decode-small",
                          "decode-splits", "decode-ordered", "decode-ordered-splits", "decode-1stage", "gemv-inflight", "gemv-rows"):  # the peer, and a GPU check of every config
                per = []
                for name, K, packs in weights:
                    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                    w16 = torch.randn(packs[0]["scales"].shape[1], K, device="cuda", dtype=torch.float16)
                    per.append(graph_time_us([lambda x=x, w16=w16: x @ w16.t()], calls=20, reps=9))
                print(f"cuBLAS fp16 M={M} -> " + " ".join(f"{t:.1f}" for t in per) + f" sum {sum(per):.1f} us")
                pp, K = weights[1][2][0], weights[1][1]
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                ref = w4a16_gemm_ref(x, pp["qweight"], pp["scales"], pp["zeros"], G).float()
                for cfg in SWEEP[regime]["configs"]:
                    out = _kernel_for(regime, cfg)(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    print(f"check M={M} {cfg}: rel err {err:.2e}")
                    if not err < 2e-3:
                        raise SystemExit(f"config {cfg} is wrong at M={M} (rel err {err:.2e}); not timing it")
            results = []
            for cfg in SWEEP[regime]["configs"]:
                per = []
                for name, K, packs in weights:
                    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                    kernel = _kernel_for(regime, cfg)
                    fns = [lambda pp=pp, kernel=kernel, x=x, cfg=cfg: kernel(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg)
                           for pp in packs]
                    per.append(graph_time_us(fns, calls=max(20, len(fns)), reps=9))
                results.append((sum(per), per, cfg))
                print(f"{regime} M={M} {cfg} -> " + " ".join(f"{t:.1f}" for t in per) + f" sum {sum(per):.1f} us",
                      flush=True)
            best = min(results, key=lambda r: r[0])
            print(f"BEST {regime} M={M}: {best[2]} sum {best[0]:.1f} us per-shape "
                  + " ".join(f"{t:.1f}" for t in best[1]), flush=True)


# (BLOCK_N, BLOCK_K, num_warps, WAVES) of the tile-at-once GEMV (kernels/w4a16_gemv.py)
GEMV_CANDIDATES = [(64, 128, 4, 8), (64, 128, 4, 16, 32), (64, 128, 4, 12, 32), (32, 128, 4, 8), (32, 128, 2, 16, 32),
                   (32, 128, 2, 8), (128, 128, 8, 16, 32), (64, 256, 4, 16, 32)]  # (BN, BK, warps, WAVES[, MAX_SPLIT])
# (SUM_PLANES, REDUCE) of the current GEMV, each tried with every candidate
GEMV_OPTIONS = [(4, "fixed")]


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gemv_compare(variants):
    """M=1: correctness on the GPU, then us / TB/s / x cuBLAS per shape for every kernel and config."""
    torch.manual_seed(0)
    kernels = [("cur", w4a16_gemv)] + [(n, _load_module(f"gemv_{n}", p).w4a16_gemv) for n, p in variants]
    runs = [(f"{kn} {bn}x{bk} w{w} waves{wv} max{(*ms, 16)[0]}" + (f" sum{sp} {red[:4]}" if kn == "cur" else ""), kf,
             dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=0, WAVES=wv, num_warps=w, num_stages=1, MAX_SPLIT=(*ms, 16)[0],
                  **(dict(SUM_PLANES=sp, REDUCE=red) if kn == "cur" else {})))
            for kn, kf in kernels
            for bn, bk, w, wv, *ms in {"cur": GEMV_CANDIDATES, "v1": []}.get(kn, GEMV_CANDIDATES[:3])
            for sp, red in (GEMV_OPTIONS if kn == "cur" else [(1, "atomic")])]
    runs.append(("cur table", w4a16_gemv, CONFIGS["sm90"]["gemv"]))
    runs.append(("v1 table (64x256 w4)", dict(kernels).get("v1"), CONFIGS["sm90"]["gemv"]))
    runs.append(("decode kernel (table)", w4a16_gemm, CONFIGS["sm90"]["decode"]))
    runs = [r for r in runs if r[1] is not None]
    table = {}
    for name, N, K in GEMM_SHAPES["llama3-8b"]:
        q, p, nbytes = random_packed(N, K)
        # reference on the GPU from the layout-free codes: fp32 dequantize, fp32 matmul
        w = ((q.codes.cuda().float() - q.zeros.cuda().float().repeat_interleave(G, 1))
             * q.scales.cuda().float().repeat_interleave(G, 1))  # [N, K]
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        ref = x.float() @ w.t()  # [1, N]
        w16 = w.half()
        del w
        packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
        ws = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2) - 1)]
        cublas = graph_time_us([lambda ww=ww: torch.matmul(x, ww.t()) for ww in ws], calls=max(20, len(ws)), reps=9)
        print(f"{name} N={N} K={K} int4 bytes {nbytes / 1e6:.1f} MB; cuBLAS fp16 {cublas:.1f} us "
              f"({w16.numel() * 2 / cublas / 1e6:.2f} TB/s)", flush=True)
        for label, kern, cfg in runs:
            out = kern(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            t = graph_time_us([lambda pp=pp: kern(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg) for pp in packs],
                              calls=max(20, len(packs)), reps=9)
            table.setdefault(label, []).append(t)
            print(f"  {label:34s} {t:7.1f} us {nbytes / t / 1e6:5.2f} TB/s {cublas / t:5.2f}x cuBLAS "
                  f"rel_err {err:.1e}{'  WRONG' if not err < 2e-3 else ''}", flush=True)
        del packs, ws, w16
        torch.cuda.empty_cache()
    print("sums over the four shapes (us): qkv / o / gate_up / down -> total", flush=True)
    for label, ts in sorted(table.items(), key=lambda kv: sum(kv[1])):
        print(f"  {label:34s} " + " / ".join(f"{t:.1f}" for t in ts) + f" -> {sum(ts):.1f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["gemv-compare"]:
        gemv_compare([a.split("=", 1) for a in sys.argv[2:]])
    else:
        main(sys.argv[1:] or ["decode", "prefill"])
