"""Session 11 experiment: the direct-load mma_v2 small-M kernel against the decode kernel and the GEMV (GPU)."""
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/exp")
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm, w4a16_gemm_ref
from lmq.kernels.w4a16_gemv import w4a16_gemv
from sweep_gemm import G, random_packed
from w4a16_decode_mma import w4a16_decode_mma

from lmq.bench import GEMM_SHAPES, copies_for, graph_time_us

torch.manual_seed(0)
# correctness: odd shapes, g64/g128, M 1..16
for N, K, g in ((576, 1536, 64), (1000, 4096, 128), (6144, 4096, 128), (4096, 14336, 128)):
    q, p, _ = random_packed(N, K) if g == 128 else (None, None, None)
    if p is None:
        from lmq.pack import planes64
        from lmq.quant.rtn import QuantizedWeight
        qq = QuantizedWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8), (torch.rand(N, K // g) * 0.01 + 0.001).half(),
                             torch.randint(0, 16, (N, K // g), dtype=torch.uint8), 4, g)
        p = {k: v.cuda() for k, v in planes64.pack(qq).items()}
    for M in (1, 3, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = w4a16_gemm_ref(x, p["qweight"], p["scales"], p["zeros"], g).float()
        for cfg in ({"BLOCK_N": 64, "num_warps": 1}, {"BLOCK_N": 256, "num_warps": 4, "SCALED": True}):
            out = w4a16_decode_mma(x, p["qweight"], p["scales"], p["zeros"], g, cfg).float()
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 2e-3, (N, K, g, M, cfg, err)
print("correct", flush=True)
configs = [{"BLOCK_N": bn, "num_warps": nw, "WAVES": w, "SCALED": sc} for bn, nw, sc in
           ((64, 1, False), (64, 1, True), (128, 2, True), (256, 4, True), (128, 4, True)) for w in (4, 8)]
dec = CONFIGS["sm90"]["decode"]
gemv_cfg = CONFIGS["sm90"]["gemv"]
for name, N, K in GEMM_SHAPES["llama3-8b"]:
    _, p, nbytes = random_packed(N, K)
    packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
    for M in (1, 4, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        calls = max(20, len(packs))
        res = [("decode", graph_time_us([lambda pp=pp, x=x: w4a16_gemm(x, pp["qweight"], pp["scales"], pp["zeros"], G, dec)
                                          for pp in packs], calls=calls, reps=9))]
        if M == 1:
            res.append(("gemv", graph_time_us([lambda pp=pp, x=x: w4a16_gemv(x, pp["qweight"], pp["scales"], pp["zeros"], G, gemv_cfg)
                                               for pp in packs], calls=calls, reps=9)))
        for cfg in configs:
            t = graph_time_us([lambda pp=pp, x=x, cfg=cfg: w4a16_decode_mma(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg)
                               for pp in packs], calls=calls, reps=9)
            res.append((f"mma bn{cfg['BLOCK_N']} w{cfg['num_warps']} waves{cfg['WAVES']}{' scaled' if cfg['SCALED'] else ''}", t))
        best = min(r for r in res if r[0].startswith("mma"))[1] if False else min((r for r in res if r[0].startswith("mma")), key=lambda r: r[1])
        print(f"{name} M={M}: " + ", ".join(f"{k} {t:.1f}" for k, t in res) + f" | BEST {best[0]} {best[1]:.1f}", flush=True)
