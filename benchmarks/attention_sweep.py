"""Sweep decode-attention launch configs (BLOCK_N, warps, stages, programs per SM) on a few shapes.

Prints, per KV dtype and shape, the % of the copy-bandwidth floor each config reaches, so the
table in kernels/attention_decode.py (_GPU_CONFIG, PROGRAMS_PER_SM) can be chosen from data.
Usage on the GPU machine: python3 benchmarks/attention_sweep.py
"""

from __future__ import annotations

import torch

import lmq.kernels.attention_decode as dec
from lmq.bench_attention import BLOCK_SIZE, _copies, _random_paged, copy_bandwidth_bytes_s, graph_time_us
from lmq.kernels.kv_quant import kv_bytes_per_token_head

CONFIGS = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2)]
SHAPES = [(1, 16384), (8, 4096), (64, 4096)]  # (batch, context)
H, HKV, D = 32, 8, 128


def main() -> None:
    bw = copy_bandwidth_bytes_s()
    print(f"{torch.cuda.get_device_name(0)} copy bandwidth {bw / 1e9:.0f} GB/s")
    torch.manual_seed(0)
    for kd in ("fp16", "int8", "int4"):
        for B, L in SHAPES:
            kv_bytes = 2 * B * L * HKV * kv_bytes_per_token_head(kd, D)
            floor = kv_bytes / bw * 1e6
            n = _copies(kv_bytes)
            nb = -(-L // BLOCK_SIZE)
            cache = _random_paged(kd, n * B * nb, HKV, D)
            tables = torch.randperm(n * B * nb, device="cuda").to(torch.int32).view(n, B, nb)
            lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
            out = torch.empty_like(q)
            cells = []
            for pps in (2, 4):
                dec.PROGRAMS_PER_SM = pps
                for cfg in CONFIGS:
                    dec._GPU_CONFIG[128] = cfg
                    us = graph_time_us([lambda t=t: dec.decode_attention(q, cache, t, lens, max_seq_len=L, out=out)
                                        for t in tables], calls=max(n, 10))
                    cells.append(f"{cfg[0]}/{cfg[1]}/{cfg[2]}/p{pps}:{us:.1f}us={100 * floor / us:.0f}%")
            print(f"{kd} B={B} L={L} floor {floor:.1f}us | " + " ".join(cells), flush=True)
            del cache, tables
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
