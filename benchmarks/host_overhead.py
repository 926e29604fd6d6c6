"""Host cost per call of each W4A16 path (the engine's eager prefill pays it on every linear).

For each path: the time the Python call takes to return (launch overhead, no sync), and the
time per call of a loop of calls ended by one sync (whichever of host or GPU is slower), at the
Llama-3-8B gate_up, down and o_proj shapes; "prefill/triton" and "decode/triton" are those kernels launched through
Triton every time (`lmq.kernels.launch.FAST_LAUNCH` off; the prefill kernel's per-shape plan stays kept). Usage: python3 benchmarks/host_overhead.py [M ...]
"""

import sys
import time

import torch
from lmq.kernels import launch
from lmq.kernels.w4a16_gemm import CONFIGS
from sweep_gemm import random_packed

from lmq.engine.qlinear import run_path


def main(ms):
    table = CONFIGS["sm90"]
    for name, N, K in (("gate_up", 28672, 4096), ("down", 4096, 14336), ("o", 4096, 4096)):
        _, p, _ = random_packed(N, K)
        descs = {}  # as the engine's weights keep them (QLinear.descs)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            paths = ("prefill", "prefill/triton", "dequant") + (("decode", "decode/triton") if M <= 256 else ())
            for path in paths:
                # "/triton": the same kernel launched through Triton's own path every time (no direct launch)
                launch.FAST_LAUNCH = not path.endswith("/triton")
                kernel_path = path.split("/")[0]

                def call(path=kernel_path, x=x, p=p, descs=descs):
                    return run_path(path, x, p["qweight"], p["scales"], p["zeros"], 128, table, descs)
                try:
                    for _ in range(3):
                        call()
                    torch.cuda.synchronize()
                    n = 50
                    host = 0.0
                    t0 = time.perf_counter()
                    for _ in range(n):
                        a = time.perf_counter()
                        call()
                        host += time.perf_counter() - a
                    torch.cuda.synchronize()
                    wall = (time.perf_counter() - t0) / n
                finally:
                    launch.FAST_LAUNCH = True
                print(f"{name} M={M} {path}: host {host / n * 1e6:.1f} us/call, loop {wall * 1e6:.1f} us/call", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [256, 1024])
