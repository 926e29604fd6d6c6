import sys
import torch
sys.path.insert(0, "benchmarks")
from lmq.kernels import w4a16_gemm_ws as ws
from sweep_gemm import random_packed
N, K, M = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = {"BLOCK_N": 64, "BLOCK_M_SMALL": 0, **({"STAGES": int(sys.argv[4])} if len(sys.argv) > 4 else {})}
_, p, _ = random_packed(N, K)
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
print(ws.plan(M, N, K, {**ws.DEFAULT_CONFIG, **cfg}, 132), flush=True)
out = ws.w4a16_gemm_ws(x, p["qweight"], p["scales"], p["zeros"], 128, cfg)
torch.cuda.synchronize()
ref = ws.w4a16_gemm_ws_ref(x, p["qweight"], p["scales"], p["zeros"], 128).float()
print("rel err", ((out.float() - ref).norm() / ref.norm()).item(), flush=True)
