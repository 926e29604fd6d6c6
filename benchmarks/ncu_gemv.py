"""Launch the M=1 GEMV on gate_up (Llama-3-8B, N=28672 K=4096, g128) a few times per config, for
Nsight Compute: issue-slot use against DRAM throughput shows which of the two bounds the kernel.

    ncu --clock-control none -k regex:gemv --metrics ... python3 benchmarks/ncu_gemv.py [N K]
"""

import sys

import torch
from lmq.kernels.w4a16_gemm import CONFIGS
from lmq.kernels.w4a16_gemv import w4a16_gemv

from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight

N, K = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (28672, 4096)
G = 128
torch.manual_seed(0)
codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
q = QuantizedWeight(codes=codes, scales=(torch.rand(N, K // G) * 0.01 + 0.001).half(),
                    zeros=torch.randint(1, 15, (N, K // G), dtype=torch.uint8), group_size=G, bits=4)
p = {k: v.cuda() for k, v in planes64.pack(q).items()}
x = torch.randn(1, K, device="cuda", dtype=torch.float16)
for opts in ({"SUM_PLANES": 1, "REDUCE": "atomic"}, {"SUM_PLANES": 4, "REDUCE": "fixed"}):
    cfg = {**CONFIGS["sm90"]["gemv"], **opts}
    for _ in range(3):
        w4a16_gemv(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
    torch.cuda.synchronize()
    print(opts, flush=True)
