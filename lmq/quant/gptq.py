"""Error-compensating rounding (GPTQ; Frantar et al. 2022, arXiv:2210.17323) on lmq's RTN grid.

`--method awq-gptq` runs AWQ's scale search and clipping first, then rounds the scaled weights
column by column instead of all at once: each column's rounding error is pushed onto the columns
not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs,

    H = 2 X^T X / n + damp * I                      X: [n, K] inputs of the linear
    for k in 0..K-1:  q_k = RTN(w_k);  e = (w_k - q_k) / Hinv[k, k];  w_{k+1:} -= e * Hinv[k, k+1:]

(with Hinv the upper Cholesky factor of H^-1, in blocks of 128 columns). Group scales and zeros
are computed when a group's first column is reached, from the weights as updated so far, with
exactly `lmq.quant.rtn.quantize`'s formula, so the output is an ordinary `QuantizedWeight` in the
same checkpoint format.
"""

from __future__ import annotations

import torch

from lmq.quant.rtn import QuantizedWeight, quantize


def hessian(x: torch.Tensor) -> torch.Tensor:
    """`H [K, K] = 2 X^T X / n` in fp32 for inputs `x [..., K]`."""
    X = x.reshape(-1, x.shape[-1]).float()  # [n, K]
    return (2.0 / X.shape[0]) * (X.t() @ X)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, zero_point: bool,
                  name: str = "weight", block: int = 128, damp: float = 0.01) -> QuantizedWeight:
    """Quantize `w [N, K]` with GPTQ's column-sequential rounding against Hessian `H [K, K]`."""
    N, K = w.shape
    W = w.float().clone()  # [N, K]
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # [K, K] upper

    block = max(group_size, (block // group_size) * group_size)  # a group never straddles two blocks
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    scales = torch.empty(N, K // group_size, dtype=torch.float16, device=W.device)
    zeros = torch.empty(N, K // group_size, dtype=torch.uint8, device=W.device)
    qmax = 2**bits - 1
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1 = W[:, b0:b1].clone()  # [N, B]
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            k = b0 + i
            if k % group_size == 0:  # group parameters from the weights as updated so far
                g = quantize(W1[:, i:i + group_size], bits, group_size, zero_point, name)
                s, z = g.scales[:, 0].float(), g.zeros[:, 0].float()  # [N]
                scales[:, k // group_size], zeros[:, k // group_size] = g.scales[:, 0], g.zeros[:, 0]
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s) + z, 0, qmax)
            codes[:, k] = q.to(torch.uint8)
            err = (col - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ Hinv[b0:b1, b1:]
    return QuantizedWeight(codes=codes.cpu(), scales=scales.cpu(), zeros=zeros.cpu(), bits=bits,
                           group_size=group_size)
