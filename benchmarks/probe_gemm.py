"""Probe one W4A16 launch for a profiler: `ncu -k regex:w4a16 python3 benchmarks/probe_gemm.py M N K [cfg-json]`.

Runs the kernel a few times on random planes64 weights (g128); with a JSON config it overrides the
sm90 decode/prefill entry the dispatcher would pick for M.
"""

import json
import sys

import torch
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm

from lmq.engine.qlinear import choose_path
from lmq.pack import planes64
from lmq.quant.rtn import QuantizedWeight

M, N, K = (int(v) for v in sys.argv[1:4])
G = 128
table = CONFIGS["sm90"]
path = choose_path(M, table, N * K)
cfg = dict(table["prefill" if path in ("dequant", "gemv") else path])
if len(sys.argv) > 4:
    cfg.update(json.loads(sys.argv[4]))
q = QuantizedWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8), (torch.rand(N, K // G) * 0.01).half(),
                    torch.randint(0, 16, (N, K // G), dtype=torch.uint8), 4, G)
p = {k: v.cuda() for k, v in planes64.pack(q).items()}
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
for _ in range(3):
    w4a16_gemm(x, p["qweight"], p["scales"], p["zeros"], G, cfg)
torch.cuda.synchronize()
print("config", cfg)
