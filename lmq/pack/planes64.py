"""Layout `planes64` v1: 4-bit weights in 64-wide K chunks, one nibble plane per 16 input channels.

What the W4A16 kernels (`lmq.kernels.w4a16_gemm`, `lmq.kernels.w4a16_dequant`) read. For a linear
with weight `[N, K]` (out x in), group size `G` in (32, 64, 128), `K % 64 == 0`:

    qweight  int16   [K // 64, N, 16]   chunk c, output row n, lane j
    scales   float16 [K // G, N]        group-major: one contiguous row of N scales per group
    zeros    uint8   [K // G, N]        integer zero points, laid out like scales

Nibble i (bits 4i .. 4i+3) of `qweight[c, n, j]` holds the code of input channel

    k = 64 * c + 16 * i + j          (see `k_index`; i = plane 0..3, j = lane 0..15)

Why this order:
- Tile order. One K chunk of a block of rows, `qweight[c, n0:n0 + BLOCK_N, :]`, is one contiguous
  run of `BLOCK_N * 32` bytes, so a program streams whole cache lines, 16 bytes per thread.
- Cheap int4 -> fp16/bf16. Plane i is `(h >> 4i) & 0xF`: one shift and one mask with constant
  amounts, no shuffles. OR-ing the code into the mantissa of 1024.0 (0x6400, fp16) or 128.0
  (0x4300, bf16) and bitcasting gives exactly 1024 + q (128 + q); subtracting the zero point
  prepared the same way gives q - z exactly, with no int-to-float instruction.
- Plane i is a *contiguous* run of 16 input channels, so it multiplies a contiguous 16-wide slice
  of the activations: one `tl.dot` with K = 16 per plane, no reordering of activations, and a
  plane never straddles a group (16 divides G), so scales apply once per group after the dot.
- Scales and zeros are group-major `[K // G, N]`: for one group the kernel loads one contiguous
  `[BLOCK_N]` vector of each, next to the weight chunk it streams.

`pack` / `unpack` convert exactly between this and the layout-free form of `lmq.quant.rtn`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmq.errors import ShapeError

if TYPE_CHECKING:  # the runtime (kernels, engine) imports this module without lmq.quant
    from lmq.quant.rtn import QuantizedWeight

NAME = "planes64"
VERSION = 1
CHUNK_K = 64  # input channels per chunk
PLANES = 4  # nibbles per int16 lane
LANES = 16  # int16 lanes per chunk row = input channels per plane
GROUP_SIZES = (32, 64, 128)  # multiples of LANES, so a plane never straddles a group


def k_index(chunk: int, plane: int, lane: int) -> int:
    """The input channel that nibble `plane` of lane `lane` in chunk `chunk` holds (the one bit order)."""
    return CHUNK_K * chunk + LANES * plane + lane


def check_shape(N: int, K: int, group_size: int, name: str = "weight") -> None:
    """Raise when a `[N, K]` weight cannot be stored in this layout."""
    if group_size not in GROUP_SIZES:
        raise ShapeError(
            f"{name}: group size {group_size} is not supported by layout {NAME}; use one of {GROUP_SIZES}"
        )
    if K % CHUNK_K != 0 or K % group_size != 0:
        raise ShapeError(
            f"{name}: layout {NAME} needs in_features K divisible by {CHUNK_K} and by the group size "
            f"{group_size}, got K={K}; this linear cannot run on lmq's 4-bit kernels (keep it in fp16)"
        )
    if N <= 0:
        raise ShapeError(f"{name}: out_features must be positive, got N={N}")


def pack(q: QuantizedWeight, name: str = "weight") -> dict[str, torch.Tensor]:
    """Layout-free 4-bit weight -> `{"qweight", "scales", "zeros"}` in this layout (CPU tensors)."""
    if q.bits != 4:
        raise ShapeError(f"{name}: layout {NAME} stores 4-bit weights, got bits={q.bits}")
    N, K = q.codes.shape
    check_shape(N, K, q.group_size, name)
    codes = q.codes.cpu().to(torch.int32)
    if int(codes.max()) > 15 or int(codes.min()) < 0:
        raise ShapeError(f"{name}: codes must lie in 0..15, got {int(codes.min())}..{int(codes.max())}")
    # [N, K] -> [N, K/64, PLANES, LANES]: axis order (n, chunk, plane, lane) matches k_index.
    c4 = codes.reshape(N, K // CHUNK_K, PLANES, LANES)
    h = torch.zeros(N, K // CHUNK_K, LANES, dtype=torch.int32)  # [N, K/64, 16]
    for i in range(PLANES):
        h |= c4[:, :, i, :] << (4 * i)
    h = torch.where(h >= 2**15, h - 2**16, h).to(torch.int16)  # two's complement int16
    return {
        "qweight": h.permute(1, 0, 2).contiguous(),  # [K/64, N, 16]
        "scales": q.scales.cpu().to(torch.float16).t().contiguous(),  # [K/G, N]
        "zeros": q.zeros.cpu().to(torch.uint8).t().contiguous(),  # [K/G, N]
    }


def unpack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
           name: str = "weight") -> QuantizedWeight:
    """This layout -> layout-free 4-bit weight, exactly; checks dtypes and shapes."""
    from lmq.quant.rtn import QuantizedWeight

    check_tensors(qweight, scales, zeros, group_size, name)
    C, N, _ = qweight.shape
    K = C * CHUNK_K
    h = qweight.cpu().to(torch.int32) & 0xFFFF  # [K/64, N, 16]
    c4 = torch.stack([(h >> (4 * i)) & 0xF for i in range(PLANES)], dim=2)  # [K/64, N, 4, 16]
    codes = c4.permute(1, 0, 2, 3).reshape(N, K)  # [N, K]
    return QuantizedWeight(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales.cpu().t().contiguous(),  # [N, K/G]
        zeros=zeros.cpu().t().contiguous(),  # [N, K/G]
        bits=4,
        group_size=group_size,
    )


def check_tensors(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  name: str = "weight") -> tuple[int, int]:
    """Validate packed tensors; return `(N, K)`."""
    if qweight.dtype != torch.int16 or qweight.dim() != 3 or qweight.shape[2] != LANES:
        raise ShapeError(
            f"{name}: qweight must be int16 [K/{CHUNK_K}, N, {LANES}] (layout {NAME}), "
            f"got {qweight.dtype} {tuple(qweight.shape)}; re-pack the checkpoint with `lmq pack`"
        )
    C, N, _ = qweight.shape
    K = C * CHUNK_K
    check_shape(N, K, group_size, name)
    want = (K // group_size, N)
    if scales.dtype != torch.float16 or tuple(scales.shape) != want:
        raise ShapeError(f"{name}: scales must be float16 {want}, got {scales.dtype} {tuple(scales.shape)}")
    if zeros.dtype != torch.uint8 or tuple(zeros.shape) != want:
        raise ShapeError(f"{name}: zeros must be uint8 {want}, got {zeros.dtype} {tuple(zeros.shape)}")
    return N, K
