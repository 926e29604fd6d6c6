"""Dequantize a `planes64` 4-bit weight to a dense `[N, K]` fp16/bf16 matrix (for dequantize + cuBLAS).

    w_hat[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n]

Reads layout `planes64` (lmq/pack/planes64.py): qweight int16 [K/64, N, 16], nibble i of lane j in
chunk c = code of k = 64c + 16i + j; scales fp16 / zeros uint8 [K/G, N]. Writes `[N, K]` row-major in
the activation dtype, which `torch.matmul(x, w.t())` hands to cuBLAS. Above the crossover M of the
arch's table the dense product is faster than dequantizing inside the tiles, and the extra pass
(read N*K/2 bytes, write 2*N*K) is a few percent of the product's time.

`w4a16_dequant_ref` is the plain-PyTorch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv
from lmq.kernels.launch import DirectLaunch

from lmq.errors import ShapeError
from lmq.pack import planes64


@triton.jit
def _w4a16_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr,
                          CHUNK_K: tl.constexpr, LANES: tl.constexpr, PLANES: tl.constexpr):
    chunk = tl.program_id(0)  # one 64-wide K chunk
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    lanes = tl.arange(0, LANES)  # [16]
    h = tl.load(qw_ptr + (chunk * N + offs_n[:, None]) * LANES + lanes[None, :], mask=n_mask[:, None],
                other=0)  # [BN, 16] int16
    for i in tl.static_range(PLANES):
        k0 = chunk * CHUNK_K + LANES * i  # first input channel of plane i
        g = k0 // G
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)  # [BN]
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
        q = ((h >> (4 * i)) & 0xF).to(tl.float32)  # [BN, 16]
        w = (q - z[:, None]) * s[:, None]  # [BN, 16]
        tl.store(w_ptr + offs_n[:, None] * K + (k0 + lanes)[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=n_mask[:, None])


_W4A16_DEQUANT = DirectLaunch(_w4a16_dequant_kernel)  # lmq.kernels.launch


def w4a16_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Packed `planes64` weight -> dense `[N, K]` in `dtype` (float16 or bfloat16)."""
    N, K = planes64.check_tensors(qweight, scales, zeros, group_size, "w4a16_dequant weight")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ShapeError(f"w4a16_dequant: dtype must be float16 or bfloat16, got {dtype}")
    w = torch.empty((N, K), dtype=dtype, device=qweight.device)  # [N, K]
    BLOCK_N = 32 if qweight.device.type == "cpu" else 128
    grid = (K // planes64.CHUNK_K, cdiv(N, BLOCK_N))
    _W4A16_DEQUANT[grid](qweight, scales, zeros, w, N, K, G=group_size, BLOCK_N=BLOCK_N,
                                CHUNK_K=planes64.CHUNK_K, LANES=planes64.LANES, PLANES=planes64.PLANES, num_warps=4)
    return w


def w4a16_dequant_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Plain-PyTorch twin: unpack the layout and dequantize in fp32."""
    q = planes64.unpack(qweight, scales, zeros, group_size)
    return q.dequantize(torch.float32).to(dtype).to(qweight.device)
