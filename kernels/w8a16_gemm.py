"""W8A16 matmul for the LM head: `out[M, N] = x[M, K] @ w_hat[N, K]^T` in fp32, int8 weights, one scale per row.

    w_hat[n, k] = q[n, k] * s[n],    q int8 in [-127, 127],    s = max_k |w[n, k]| / 127   (fp32)

Why: at batch 1 the LM head is the largest single read of a decode step (Llama-3-8B: 128256 x 4096 fp16 weights,
1.05 GB, ~15% of the step on an H100); int8 rows halve it and, unlike 4-bit groups, cost next to nothing in
quality (`lmq eval ppl --lm-head int8`; README). `lmq.quant.rows.quantize_rows` makes (q, s) from the checkpoint's
fp16 head at load time: no new checkpoint format.

Shapes: x fp16 / bf16 `[M, K]` (rows contiguous), q int8 `[N, K]` (row-major), s fp32 `[N]`; out fp32 `[M, N]`
(the engine samples from fp32 logits). Program (n, m) computes a [BLOCK_M, BLOCK_N] tile with tl.dot on
[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles, the int8 codes converted to the activations' dtype (exact: |q| <= 127
fits fp16's and bf16's significands; see `_codes_to`); rows past M are masked, so M=1 runs 16-row tiles with 15
empty. That beat a CUDA-core GEMV form at M=1 (H100: 181.2 against 201.5 us, batch-1 TPOT 2.34 against 2.35-2.37 ms;
results/2026-11-23-session16-h100/m1-call/), which was removed. The row scale is applied once to the finished sums.
No split-K: a head has tens of thousands of rows, so N alone fills the GPU (the launcher refuses N < 1024 with a clear
error instead of running a slow shape).

`w8a16_matmul_ref` is the plain-PyTorch twin (fp32 math).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmq.kernels import cdiv, cuda_capability, next_pow2
from lmq.kernels.kv_quant import signed_codes_to_f16, use_asm
from lmq.kernels.launch import DirectLaunch

from lmq.errors import ShapeError
from lmq.quant.rows import dequantize_rows

MIN_N = 1024  # fewer rows than this do not fill a GPU without split-K: not what this kernel is for

# int8 -> fp16 without int->float instructions (`kv_quant.signed_codes_to_f16`: offset binary under 0x64, minus 1152
# in f16x2, exact; five instructions for four codes). Triton converts int8 -> fp16 with one I2F per code, a conversion
# the SM runs at 16 a clock (an eighth of its fp32 rate): offline SASS for sm_90 at DOT_CONFIG
# (benchmarks/sass_head.py), 633 instructions per 128 codes a thread with 128 I2F, against 410 with none. int8 -> bf16
# Triton already does with integer and f16x2 instructions (506, no I2F), so bf16 keeps it.
@triton.jit
def _codes_to(w, dt: tl.constexpr, ASM: tl.constexpr):
    """int8 codes -> `dt` (exact): the assembly for fp16 on a GPU, else Triton's conversion."""
    if ASM:
        return signed_codes_to_f16(w)
    return w.to(dt)


@triton.jit
def _w8a16_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    n_mask = offs_n < N
    m_mask = offs_m < M
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn  # [BN, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k[None, :] < K),
                    other=0.0)  # [BM, BK]
        w = tl.load(q_rows + k[None, :], mask=n_mask[:, None] & (k[None, :] < K), other=0,
                    eviction_policy="evict_first")  # [BN, BK] int8
        acc = tl.dot(a, tl.trans(_codes_to(w, a.dtype, ASM)), acc)  # [BM, BN]
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc * s[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], out,
             mask=m_mask[:, None] & n_mask[None, :])


_W8A16 = DirectLaunch(_w8a16_kernel)  # lmq.kernels.launch

# (BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU; the interpreter runs small tiles. H100, Llama-3-8B's head
# (128256 x 4096; benchmarks/lm_head_sweep.py, 24 configs at each swept M, results/2026-11-23-session16-h100/
# head-call*, m32-call, m1-call), us, against cuBLAS fp16 on the fp16 head (367-391 at every M):
#   M=1 / 2 / 4 / 16 (16-row tiles, (64, 256, 4, 4)) 181.2 / 182.5 / 184.4 / 189.5; at M=16 the best of 24, against
#   219.6 for (64, 128, 4, 3);
#   M=24 / 32 (32-row tiles, the wide config) 211.8 / 212.7; the best of 24 at M=32, (64, 128, 4, 4), read 210.5;
#   M=64 (64-row tiles) (128, 128, 4, 3) 259.6-265.3, the best of 24, against 443.9 for (64, 256, 4, 4).
# H200 (results/2026-11-23-session16-h200/head-call/): M=2 182.4, M=16 174.8, M=64 263.3 against cuBLAS's 240-271.
# With the conversion above (`ASM`; session 17, results/2026-11-23-session17-{h100,h200}/head-call/), fp16, us, table
# config, without -> with it: H100 M=1 180.7 -> 175.5, M=16 190.9 -> 184.1, M=64 263.6 -> 227.4; H200 M=1 173.2 ->
# 125.6, M=16 176.3 -> 135.0, M=64 266.0 -> 242.5. In the same M=1 sweep (one run) DOT_CONFIG read within 0.4% (H100)
# and 2.4% (H200) of the best config.
DOT_CONFIG = (64, 256, 4, 4)  # M <= 16: 4 stages of 24 KB of shared memory
DOT_CONFIG_WIDE = (128, 128, 4, 3)  # M > 16: 3 stages of 32 KB
# GPUs with less shared memory per block (sm86 / sm89: 99 KB, sm75: 64 KB) take fewer stages; not measured.
SMALL_SMEM = {"dot": (64, 256, 4, 2), "wide": (64, 128, 4, 2)}
INTERPRET_CONFIG = (32, 64, 1, 1)


def w8a16_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """`x [M, K]` (fp16 / bf16) @ (q [N, K] int8 * s [N])^T -> fp32 `[M, N]`."""
    if x.dim() != 2 or q.dim() != 2 or s.dim() != 1:
        raise ShapeError(f"expected x [M, K], q [N, K], s [N]; got {tuple(x.shape)}, {tuple(q.shape)}, {tuple(s.shape)}")
    M, K = x.shape
    N = q.shape[0]
    if q.shape[1] != K or s.shape[0] != N:
        raise ShapeError(f"x [M, K] = {tuple(x.shape)} does not match q [N, K] = {tuple(q.shape)} and s [{s.shape[0]}]")
    if q.dtype != torch.int8 or s.dtype != torch.float32:
        raise ShapeError(f"q must be int8 and s float32, got {q.dtype} and {s.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ShapeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if N < MIN_N:
        raise ShapeError(f"the int8 LM head kernel is for vocabulary-sized weights (N >= {MIN_N} rows), got N={N}")
    if x.stride(1) != 1 or q.stride(1) != 1:
        raise ShapeError("x and q must be contiguous along K")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    if config is None:
        config = INTERPRET_CONFIG if not x.is_cuda else _config(x.device, M)
    BN, BK, warps, stages = config
    BM = min(max(next_pow2(M), 16), 64)
    grid = (cdiv(N, BN), cdiv(M, BM))
    _W8A16[grid](x, q, s, out, M, N, K, x.stride(0), q.stride(0), out.stride(0),
                 BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, ASM=use_asm(x) and x.dtype == torch.float16,
                 num_warps=warps, num_stages=stages)
    return out


def _config(device: torch.device, M: int) -> tuple:
    if cuda_capability(device) in ((8, 0), (9, 0)):  # 163 KB / 227 KB of shared memory per block
        return DOT_CONFIG if M <= 16 else DOT_CONFIG_WIDE
    return SMALL_SMEM["dot"] if M <= 16 else SMALL_SMEM["wide"]


def w8a16_matmul_ref(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch twin: fp32 `x @ (q * s)^T`."""
    return x.float() @ dequantize_rows(q, s).t()
