"""Launch the small-M Hopper kernel (w4a16_gemm_direct, the sm90 table's config) and the decode kernel on qkv
(Llama-3-8B, N=6144 K=4096, g128) at M=16, for Nsight Compute (NOTES-gemm.md run 47):

    ncu --clock-control none -k regex:"direct|gemm_kernel" --section SpeedOfLight --section WarpStateStats ...
        python3 benchmarks/ncu_direct.py [N K M]
"""

import sys

import torch
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm
from lmq.kernels.w4a16_gemm_direct import w4a16_gemm_direct

from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight

N, K, M = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (6144, 4096, 16)
G = 128
torch.manual_seed(0)
q = QuantizedWeight(codes=torch.randint(0, 16, (N, K), dtype=torch.uint8),
                    scales=(torch.rand(N, K // G) * 0.01 + 0.001).half(),
                    zeros=torch.randint(1, 15, (N, K // G), dtype=torch.uint8), group_size=G, bits=4)
p = {k: v.cuda() for k, v in planes64.pack(q).items()}
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
for _ in range(3):
    w4a16_gemm_direct(x, p["qweight"], p["scales"], p["zeros"], G, CONFIGS["sm90"]["direct"])
    w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, CONFIGS["sm90"]["decode"])
torch.cuda.synchronize()
print("done", flush=True)
