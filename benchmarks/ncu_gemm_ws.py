"""Launch the warp-specialized prefill GEMM (kernels/w4a16_gemm_ws.py) on gate_up (Llama-3-8B,
N=28672 K=4096, g128) at one M a few times, for Nsight Compute: tensor-pipe use against shared-memory
throughput and the warps' stall reasons show what bounds it.

    ncu --clock-control none -k regex:ws_kernel --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/ncu_gemm_ws.py [M]
"""

import sys

import torch
from lmq.kernels.w4a16_gemm_ws import w4a16_gemm_ws

from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight

M = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
N, K, G = 28672, 4096, 128
torch.manual_seed(0)
q = QuantizedWeight(codes=torch.randint(0, 16, (N, K), dtype=torch.uint8),
                    scales=(torch.rand(N, K // G) * 0.01 + 0.001).half(),
                    zeros=torch.randint(1, 15, (N, K // G), dtype=torch.uint8), group_size=G, bits=4)
p = {k: v.cuda() for k, v in planes64.pack(q).items()}
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
for _ in range(2):
    w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], G)
torch.cuda.synchronize()
print("done", flush=True)
