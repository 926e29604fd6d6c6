"""Launch the W4A16 decode GEMM (kernels/w4a16_gemm.py, sm90's decode config) on qkv_proj (Llama-3-8B,
N=6144 K=4096, g128) at one M, and the M=1 GEMV beside it, for Nsight Compute: where the decode
kernel's time over the bytes goes at small shapes (occupancy, stall reasons, DRAM throughput).

    ncu --clock-control none -k regex:"w4a16_(gemm|gemv)_kernel" --section SpeedOfLight \
        --section WarpStateStats --section Occupancy --section LaunchStats python3 benchmarks/ncu_decode.py [M]
"""

import sys

import torch
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm
from lmq.kernels.w4a16_gemv import w4a16_gemv
from sweep_gemm import G, random_packed

M = int(sys.argv[1]) if len(sys.argv) > 1 else 16
N, K = 6144, 4096
torch.manual_seed(0)
_, p, _ = random_packed(N, K)
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
for _ in range(2):
    w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, CONFIGS["sm90"]["decode"])
    w4a16_gemv(x[:1], p["qweight"], p["scales"], p["zeros"], G, CONFIGS["sm90"]["gemv"])
torch.cuda.synchronize()
print("done", flush=True)
