"""Symmetric int8 quantization with one scale per row: the LM head's form under `--lm-head int8`.

    q[n, k] = clamp(round(w[n, k] / s[n]), -127, 127)  int8,    s[n] = max_k |w[n, k]| / 127  fp32 (1 for a zero row)
    w_hat[n, k] = q[n, k] * s[n]

`kernels/w8a16_gemm.py` multiplies by (q, s) on the GPU; the torch backend and `lmq eval` use `fake_quantize_rows`.
Rows are processed in chunks: fp32 copies of a whole head (Llama-3: 128256 x 4096) would cost 2 GB each.
"""

from __future__ import annotations

import torch

from lmq.errors import InputError, ShapeError

QMAX = 127
CHUNK_ROWS = 8192
LM_HEADS = ("auto", "int8")


def check_lm_head(lm_head: str) -> None:
    """The --lm-head choices, checked before anything loads."""
    if lm_head not in LM_HEADS:
        raise InputError(f"--lm-head {lm_head!r}: expected auto (the checkpoint's fp16 / bf16 head) or int8 (one scale "
                         "per row, half the bytes)")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [N, K]` -> (q int8 [N, K], s fp32 [N]) on w's device."""
    if w.dim() != 2:
        raise ShapeError(f"the weight to quantize must be 2-D [N, K], got shape {tuple(w.shape)}")
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r0 in range(0, w.shape[0], CHUNK_ROWS):
        wr = w[r0:r0 + CHUNK_ROWS].float()
        amax = wr.abs().amax(dim=1)
        sr = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        q[r0:r0 + CHUNK_ROWS] = torch.clamp(torch.round(wr / sr[:, None]), -QMAX, QMAX).to(torch.int8)
        s[r0:r0 + CHUNK_ROWS] = sr
    return q, s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q [N, K]`, `s [N]` -> `w_hat [N, K]` in `dtype`, computed in fp32 a chunk of rows at a time."""
    w = torch.empty(q.shape, dtype=dtype, device=q.device)
    for r0 in range(0, q.shape[0], CHUNK_ROWS):
        w[r0:r0 + CHUNK_ROWS] = (q[r0:r0 + CHUNK_ROWS].float() * s[r0:r0 + CHUNK_ROWS, None]).to(dtype)
    return w


def fake_quantize_rows(w: torch.Tensor) -> torch.Tensor:
    """`dequantize_rows(quantize_rows(w))` in w's dtype: the int8 head as the torch backend and `lmq eval` use it."""
    return dequantize_rows(*quantize_rows(w), w.dtype)
