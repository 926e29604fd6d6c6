"""The AutoAWQ "gemm" tensor layout: how portable checkpoints store 4-bit linears.

This is the layout transformers, vLLM and AutoAWQ read for `quant_method="awq", version="gemm"`.
For a linear with weight `[N, K]` (out x in) and group size `G`:

    qweight  int32   [K, N // 8]       row k holds the codes of input channel k for all N outputs
    qzeros   int32   [K // G, N // 8]  zero points, packed like qweight
    scales   float16 [K // G, N]

Eight 4-bit values share one int32. Nibble i (bits 4i .. 4i+3) of word j holds output column
`8 * j + AWQ_ORDER[i]` with AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7): the interleave AutoAWQ's CUDA
kernel dequantizes with. Dequantized weight: `w[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]`.

`pack` and `unpack` convert exactly between this and lmq's layout-free form (`lmq.quant.rtn`):
codes/zeros `[N, K]`/`[N, K // G]` uint8 and scales `[N, K // G]` fp16.
"""

from __future__ import annotations

import torch

from lmq.errors import CheckpointError, ShapeError
from lmq.quant.rtn import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Inverse: column offset c within a word sits in nibble AWQ_REVERSE[c].
AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))


def _pack_rows(v: torch.Tensor) -> torch.Tensor:
    """`v [R, C]` ints 0..15 -> int32 `[R, C // 8]` in AWQ nibble order."""
    R, C = v.shape
    v = v.to(torch.int64).reshape(R, C // 8, 8)  # [R, C/8, 8]
    words = torch.zeros(R, C // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        words |= v[:, :, col] << (4 * i)
    # Reinterpret as signed int32 (two's complement), as AutoAWQ stores it.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 `[R, C // 8]` -> uint8 `[R, C]`."""
    R, W = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(R, W, 8, dtype=torch.uint8)  # [R, C/8, 8]
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = ((w >> (4 * i)) & 0xF).to(torch.uint8)
    return out.reshape(R, W * 8)


def pack(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Layout-free quantized weight -> `{"qweight", "qzeros", "scales"}` in AutoAWQ GEMM layout."""
    if q.bits != 4:
        raise ShapeError(f"the AWQ gemm layout stores 4-bit weights, got bits={q.bits}")
    N, K = q.codes.shape
    if N % 8 != 0:
        raise ShapeError(f"the AWQ gemm layout needs out_features divisible by 8, got N={N}")
    return {
        "qweight": _pack_rows(q.codes.t().contiguous().cpu()),  # [K, N/8]
        "qzeros": _pack_rows(q.zeros.t().contiguous().cpu()),  # [K/G, N/8]
        "scales": q.scales.t().contiguous().to(torch.float16).cpu(),  # [K/G, N]
    }


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
           name: str = "linear") -> QuantizedWeight:
    """AutoAWQ GEMM tensors -> layout-free quantized weight; checks that the shapes agree."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(
            f"{name}: qweight/qzeros must be int32 (AWQ gemm layout), got {qweight.dtype}/{qzeros.dtype}"
        )
    K, N8 = qweight.shape
    N = N8 * 8
    if K % group_size != 0:
        raise CheckpointError(f"{name}: group size {group_size} does not divide K={K}")
    if tuple(qzeros.shape) != (K // group_size, N8) or tuple(scales.shape) != (K // group_size, N):
        raise CheckpointError(
            f"{name}: tensor shapes disagree with group size {group_size}: qweight {tuple(qweight.shape)}, "
            f"qzeros {tuple(qzeros.shape)} (expected {(K // group_size, N8)}), scales {tuple(scales.shape)} "
            f"(expected {(K // group_size, N)})"
        )
    return QuantizedWeight(
        codes=_unpack_rows(qweight).t().contiguous(),  # [N, K]
        scales=scales.t().contiguous().to(torch.float16),  # [N, K/G]
        zeros=_unpack_rows(qzeros).t().contiguous(),  # [N, K/G]
        bits=4,
        group_size=group_size,
    )
