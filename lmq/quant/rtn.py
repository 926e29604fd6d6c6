"""Group-wise round-to-nearest (RTN) quantization: the numeric definition every lmq stage shares.

A linear's weight `w` is `[N, K]` (out_features x in_features, as `nn.Linear` stores it). Groups are
`G` consecutive input channels of one output row, so there are `K // G` groups per row.

    asymmetric (zero_point=True):  s = (max - min) / (2^b - 1);   z = clamp(round(-min / s), 0, 2^b - 1)
    symmetric  (zero_point=False): s = absmax / (2^(b-1) - 1);    z = 2^(b-1)           (stored anyway)
    codes = clamp(round(w / s) + z, 0, 2^b - 1)
    w_hat = (codes - z) * s

Shapes (the unpacked, layout-free form that `lmq.format` and `lmq.pack` convert to and from):
    codes  uint8   [N, K]       values 0 .. 2^b - 1
    scales float16 [N, K // G]  the scale is rounded to fp16 *before* the codes are computed, and
                                nudged up if rounding made it smaller, so |w - w_hat| <= s / 2 holds
                                for the stored scale
    zeros  uint8   [N, K // G]  integer zero points

Symmetric checkpoints store z = 2^(b-1) explicitly so every reader handles one formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmq.errors import ShapeError

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizedWeight:
    """The layout-free quantized form of one `[N, K]` weight."""

    codes: torch.Tensor  # [N, K] uint8
    scales: torch.Tensor  # [N, K // G] float16
    zeros: torch.Tensor  # [N, K // G] uint8
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)


def check_group_size(K: int, group_size: int, name: str = "weight") -> None:
    """Raise a clear error when `group_size` does not split `K` input channels into whole groups."""
    if group_size <= 0 or K % group_size != 0:
        divisors = [g for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True) if K % g == 0]
        fix = (
            f"use --group-size {' or '.join(map(str, divisors))}"
            if divisors
            else "this layer cannot be quantized with lmq's group sizes (32, 64, 128)"
        )
        raise ShapeError(
            f"group size {group_size} does not divide the input size K={K} of {name} "
            f"(K % {group_size} = {K % group_size if group_size > 0 else 'n/a'}); {fix}"
        )


def _fp16_scale(scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Round fp32 scales to fp16, never below the fp32 value (keeps the s/2 error bound exact)."""
    if scale.numel() and scale.max().item() > 65504.0:
        raise ShapeError(f"{name} has a group whose scale {scale.max().item():.3g} exceeds fp16's range (weights "
                         "near 1e6); the AWQ format stores fp16 scales, so this weight cannot be quantized to it")
    s16 = scale.clamp(min=1e-8, max=65504.0).to(torch.float16)
    low = s16.float() < scale
    s16 = torch.where(low, torch.nextafter(s16, torch.full_like(s16, 65504.0)), s16)
    return s16


def quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True,
             name: str = "weight") -> QuantizedWeight:
    """Quantize `w [N, K]` group-wise; the math is done in fp32 whatever `w`'s dtype."""
    if bits not in SUPPORTED_BITS:
        raise ShapeError(f"--bits {bits} is not supported: lmq quantizes to "
                         f"{' or '.join(map(str, SUPPORTED_BITS))} bits; pass --bits 4 or leave it out")
    if w.dim() != 2:
        raise ShapeError(f"{name} must be 2-D [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    check_group_size(K, group_size, name)
    qmax = 2**bits - 1
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # [N, K/G, G]
    if zero_point:
        wmax = wg.amax(dim=-1).clamp(min=0)  # [N, K/G]; include 0 so z stays in range
        wmin = wg.amin(dim=-1).clamp(max=0)
        scales = _fp16_scale((wmax - wmin) / qmax, name)  # [N, K/G] fp16
        s = scales.float()
        zeros = torch.round(-wmin / s).clamp(0, qmax)
    else:
        absmax = wg.abs().amax(dim=-1)
        scales = _fp16_scale(absmax / (2 ** (bits - 1) - 1), name)
        s = scales.float()
        zeros = torch.full_like(s, 2 ** (bits - 1))
    codes = torch.clamp(torch.round(wg / s[..., None]) + zeros[..., None], 0, qmax)  # [N, K/G, G]
    return QuantizedWeight(
        codes=codes.reshape(N, K).to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`w_hat [N, K] = (codes - zeros) * scales`, groups of `group_size` along K."""
    N, K = codes.shape
    cg = codes.float().reshape(N, K // group_size, group_size)  # [N, K/G, G]
    w = (cg - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(N, K).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128,
                  zero_point: bool = True) -> torch.Tensor:
    """`dequantize(quantize(w))` in `w`'s dtype: what the AWQ searches measure their loss on."""
    q = quantize(w, bits, group_size, zero_point)
    return q.dequantize(w.dtype)
