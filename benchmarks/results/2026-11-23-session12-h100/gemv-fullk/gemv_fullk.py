"""Experiment (NOTES-gemm.md, run 34): an M=1 GEMV that splits K inside the program, not across programs.

The table's GEMV (kernels/w4a16_gemv.py) gives each program 64 columns x ~370 input channels and adds the
splits' fp32 sums through a workspace: red, fence, arrival counter, then the last program reads the sums
back from L2 and writes the output. That chain is a few L2 round trips at the end of every column block.
Here each program owns BLOCK_N columns over the whole K: per iteration it loads KS chunks (KS x 64 input
channels) of its rows at once as one [KS, BLOCK_N, 16] tile, keeps [KS, BLOCK_N, 16] fp32 partial sums, and
reduces them once at the end, inside the program; the output is stored directly (no atomics, no workspace,
no fill). fp16 activations, group sizes that hold whole chunks (64, 128), the four-plane (q - z) / 16 path.

Usage (GPU): python3 benchmarks/gemv_fullk.py [--check-only]
"""

import sys

import torch
import triton
import triton.language as tl
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm_ref
from lmq.kernels.w4a16_gemv import _QUAD_ASM, w4a16_gemv

from lmq.pack import planes64


@triton.jit
def _gemv_fullk_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_xm, stride_om,
                       G: tl.constexpr, BLOCK_N: tl.constexpr, KS: tl.constexpr, CHUNK_K: tl.constexpr,
                       LANES: tl.constexpr, FAST_CVT: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    ks = tl.arange(0, KS)  # [KS]
    lanes = tl.arange(0, LANES)  # [16]
    qw_tile = qw_ptr + ks[:, None, None] * (N * LANES) + offs_n[None, :, None] * LANES + lanes[None, None, :]
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((KS, BLOCK_N, LANES), dtype=tl.float32)  # [KS, BN, 16]
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    n_chunks = K // CHUNK_K
    for c0 in range(0, n_chunks, KS):
        c = c0 + ks  # [KS] chunk ids
        cm = c < n_chunks
        h = tl.load(qw_tile + c0 * N * LANES, mask=cm[:, None, None] & n_mask[None, :, None], other=0,
                    eviction_policy="evict_first")  # [KS, BN, 16] int16
        zs_off = (c * CHUNK_K // G)[:, None] * N + offs_n[None, :]  # [KS, BN]
        zs_mask = cm[:, None] & n_mask[None, :]
        z = tl.load(z_ptr + zs_off, mask=zs_mask, other=0).to(tl.int16)  # [KS, BN]
        s = tl.load(s_ptr + zs_off, mask=zs_mask, other=0.0).to(tl.float32)  # [KS, BN]
        if FAST_CVT:
            z64 = tl.broadcast_to(((z | 0x5400).to(tl.float16, bitcast=True))[:, :, None], h.shape)  # 64 + z/16
            z4 = tl.broadcast_to((((z << 4) | 0x4400).to(tl.float16, bitcast=True))[:, :, None], h.shape)
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                _QUAD_ASM, "=r,=r,=r,=r,r,r,r", [h, z64, z4],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
        else:
            zq = tl.broadcast_to(((z | 0x6400).to(tl.float16, bitcast=True))[:, :, None], h.shape)
            w0 = ((((h >> 0) & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zq) * 0.0625
            w1 = ((((h >> 4) & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zq) * 0.0625
            w2 = ((((h >> 8) & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zq) * 0.0625
            w3 = ((((h >> 12) & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zq) * 0.0625
        xk = x_row + c[:, None] * CHUNK_K + lanes[None, :]  # [KS, 16]
        a0 = tl.load(xk, mask=cm[:, None], other=0.0)
        a1 = tl.load(xk + LANES, mask=cm[:, None], other=0.0)
        a2 = tl.load(xk + 2 * LANES, mask=cm[:, None], other=0.0)
        a3 = tl.load(xk + 3 * LANES, mask=cm[:, None], other=0.0)
        pp = w0 * a0[:, None, :] + w1 * a1[:, None, :] + w2 * a2[:, None, :] + w3 * a3[:, None, :]
        acc += pp.to(tl.float32) * s[:, :, None]
    out = tl.sum(tl.sum(acc, axis=2), axis=0) * 16.0  # [BN]
    tl.store(out_ptr + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


def gemv_fullk(x, qweight, scales, zeros, group_size, cfg):
    N = qweight.shape[1]
    K = qweight.shape[0] * planes64.CHUNK_K
    assert x.dtype == torch.float16 and group_size % planes64.CHUNK_K == 0
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pdl = cfg.get("PDL", True) and x.device.type == "cuda"
    _gemv_fullk_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), M)](
        x2, qweight, scales, zeros, out, N, K, x2.stride(0), out.stride(0),
        G=group_size, BLOCK_N=cfg["BLOCK_N"], KS=cfg["KS"], CHUNK_K=planes64.CHUNK_K, LANES=planes64.LANES,
        FAST_CVT=x.device.type == "cuda", PDL=pdl, TRIGGER=cfg.get("TRIGGER", False) and pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl)
    return out.reshape(*x.shape[:-1], N)


CANDIDATES = [dict(BLOCK_N=bn, KS=ks, num_warps=w, num_stages=st)
              for bn, ks, w, st in ((16, 16, 4, 1), (16, 16, 4, 2), (16, 16, 4, 3), (16, 8, 4, 3), (16, 32, 4, 2),
                                    (16, 32, 8, 2), (8, 16, 2, 3), (8, 32, 4, 2), (32, 8, 4, 3), (32, 16, 4, 2),
                                    (32, 16, 8, 2), (64, 8, 4, 2), (64, 8, 8, 3), (64, 16, 8, 2))]


def main(check_only: bool):
    sys.path.insert(0, "benchmarks")
    from sweep_gemm import random_packed

    from lmq.bench import GEMM_SHAPES, copies_for, graph_time_us
    torch.manual_seed(0)
    G = 128
    # correctness first, odd shapes included (N not a multiple of the block, K not of KS chunks)
    for N, K in ((576, 1536), (1000, 1152), (6144, 4096)):
        q, p, _ = random_packed(N, K)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G).float()
        for cfg in CANDIDATES[:6] + [{**CANDIDATES[2], "TRIGGER": True}]:
            out = gemv_fullk(x, p["qweight"], p["scales"], p["zeros"], G, cfg).float()
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"check N={N} K={K} {cfg}: rel err {err:.1e}{'' if err < 2e-3 else '  WRONG'}", flush=True)
    if check_only:
        return
    table_cfg = CONFIGS["sm90"]["gemv"]
    runs = [("table GEMV", w4a16_gemv, table_cfg)]
    runs += [(f"fullk {c['BLOCK_N']}x{c['KS']} w{c['num_warps']} s{c['num_stages']}", gemv_fullk, c) for c in CANDIDATES]
    runs += [(f"fullk {c['BLOCK_N']}x{c['KS']} w{c['num_warps']} s{c['num_stages']} trig", gemv_fullk,
              {**c, "TRIGGER": True}) for c in CANDIDATES[1:4]]
    table = {}
    for name, N, K in GEMM_SHAPES["llama3-8b"]:
        q, p, nbytes = random_packed(N, K)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], G).float()
        w16 = (torch.randn(N, K, device="cuda", dtype=torch.float16))
        packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
        ws = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2) - 1)]
        cublas = graph_time_us([lambda ww=ww: torch.matmul(x, ww.t()) for ww in ws], calls=max(20, len(ws)), reps=9)
        print(f"{name} N={N} K={K} int4 {nbytes / 1e6:.1f} MB; cuBLAS fp16 {cublas:.1f} us", flush=True)
        for label, kern, cfg in runs:
            out = kern(x, p["qweight"], p["scales"], p["zeros"], G, cfg).float()
            err = ((out - ref).norm() / ref.norm()).item()
            t = graph_time_us([lambda pp=pp: kern(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg) for pp in packs],
                              calls=max(20, len(packs)), reps=9)
            table.setdefault(label, []).append(t)
            print(f"  {label:34s} {t:7.2f} us {nbytes / t / 1e6:5.2f} TB/s {cublas / t:5.2f}x cuBLAS "
                  f"rel_err {err:.1e}{'' if err < 2e-3 else '  WRONG'}", flush=True)
        del packs, ws, w16
        torch.cuda.empty_cache()
    print("sums (us): qkv / o / gate_up / down -> total", flush=True)
    for label, ts in sorted(table.items(), key=lambda kv: sum(kv[1])):
        print(f"  {label:34s} " + " / ".join(f"{t:.2f}" for t in ts) + f" -> {sum(ts):.1f}", flush=True)


if __name__ == "__main__":
    main("--check-only" in sys.argv)
