import sys

import torch

sys.path.insert(0, "benchmarks")
from lmq.kernels import w4a16_gemm_ws as ws
from sweep_gemm import G, random_packed

from lmq.bench import GEMM_SHAPES, copies_for, graph_time_us

CFGS = [{}, {"BLOCK_N": 64, "BLOCK_M_SMALL": 0}, {"BLOCK_N": 64, "BLOCK_M_SMALL": 0, "SPLIT_K": 2},
        {"BLOCK_N": 64, "BLOCK_M_SMALL": 0, "STAGES": 3}, {"BLOCK_N": 64}, {"BLOCK_N": 64, "SPLIT_K": 1}]
ms = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else [256]
torch.manual_seed(0)
for name, N, K in GEMM_SHAPES["llama3-8b"]:
    _, p, nbytes = random_packed(N, K)
    packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(copies_for(nbytes) - 1)]
    w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(max(1, copies_for(N * K * 2)))]
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = ws.w4a16_gemm_ws_ref(x, p["qweight"], p["scales"], p["zeros"], G).float()
        calls = max(20, len(packs))
        cub = [graph_time_us([lambda w=w, x=x: x @ w.t() for w in w16], calls=calls, reps=9) for _ in range(2)]
        line = f"{name} M={M} cuBLAS {cub[0]:.1f}/{cub[1]:.1f}"
        for cfg in CFGS:
            out = ws.w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], G, cfg).float()
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 2e-3, (cfg, err)
            ts = [graph_time_us([lambda pp=pp, x=x, cfg=cfg: ws.w4a16_gemm_ws(x, pp["qweight"], pp["scales"], pp["zeros"], G, cfg)
                                 for pp in packs], calls=calls, reps=9) for _ in range(2)]
            plan = ws.plan(M, N, K, {**ws.DEFAULT_CONFIG, **cfg}, torch.cuda.get_device_properties(0).multi_processor_count)
            line += f"\n   {cfg} plan {plan}: {ts[0]:.1f}/{ts[1]:.1f}"
        print(line, flush=True)
