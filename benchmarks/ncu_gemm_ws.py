"""Launch the warp-specialized prefill GEMM (kernels/w4a16_gemm_ws.py) on a Llama-3-8B weight (default gate_up,
N=28672 K=4096, g128; qkv is N=6144) at one M a few times, for Nsight Compute: tensor-pipe use against
shared-memory and L2 throughput and the warps' stall reasons show what bounds it.

    ncu --clock-control none -k regex:ws_kernel --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/ncu_gemm_ws.py [M [N]]
"""

import sys

import torch
from lmq.kernels.w4a16_gemm_ws import w4a16_gemm_ws
from sweep_gemm import G, random_packed

M = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
N, K = (int(sys.argv[2]) if len(sys.argv) > 2 else 28672), 4096
torch.manual_seed(0)
_, p, _ = random_packed(N, K)
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
for _ in range(2):
    w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], G)
torch.cuda.synchronize()
print("done", flush=True)
