"""W4A16 GEMM for small M (<= 16 rows), written in Gluon: `out[M, N] = x[M, K] @ w_hat[N, K]^T`.

Same layout (`planes64`), function and reference twin (`w4a16_gemm.w4a16_gemm_ref`) as `w4a16_gemm`;
fp16 activations, group sizes 64 and 128 (a 64-wide K chunk lies inside one group).

Why a second kernel for the decode regime: the Triton kernel issues wgmma with the dequantized weights
as its register operand and waits for each chunk's wgmma before it converts the next (NW-gemm runs 15,
22-23), and at M <= 16 its programs are short, so most of the kernel is ramp-up and drain. Here the
rows of x are the 16 rows of `mma_v2` (m16n8k16, no padding to 64), and:

- **Weights straight into operand registers.** Chunk c of the packed weight holds, per output column,
  16 int16 lanes whose nibble i of lane j is k = 64c + 16i + j: plane i of the chunk is exactly the
  B operand of one k16 step (rows j, pairs of lanes per thread). One 32-bit shared-memory read per
  column and pair of lanes serves all four steps; `(r >> 4i) & 0x000F000F | 0x6400..` minus the zero
  (`w4a16_gemm._pair_asm`) gives q - z exactly, 1.5 instructions per weight.
- **A cp.async ring.** Each stage holds one chunk, the weights [16, BN] and x [16, 64]; STAGES - 1
  chunks are in flight while one is computed. The chunk's scales and zeros are read one chunk ahead
  into registers.
- Each chunk's product starts from zero and is scaled and added in fp32 (one rounding per chunk).
- Split-K over programs so the grid covers the GPU; the splits add fp16 partial sums into the zeroed
  output with atomics, as the Triton decode kernel does.

The interpreter cannot run Gluon: tested on the GPU against the reference, compiled offline in CI.
"""

from __future__ import annotations

import warnings

import torch
from lmq.kernels import cdiv, cuda_capability
from lmq.kernels.w4a16_gemm import _num_sms, _pair_asm, check_inputs
from triton.compiler.errors import CompilationError
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.runtime.errors import PTXASError

from lmq.errors import UnsupportedError
from lmq.pack import planes64

_ASM01 = gl.constexpr(_pair_asm(0, False))
_ASM23 = gl.constexpr(_pair_asm(2, False))
MAX_M = 16
GROUPS = (64, 128)
DEFAULT_CONFIG = {"BLOCK_N": 128, "STAGES": 4, "WAVES": 2, "num_warps": 4}
_BUILD_ERRORS = (CompilationError, PTXASError)
_broken: list[str] = []


class KernelUnavailable(UnsupportedError):
    """This Triton cannot build the kernel: the caller takes the Triton decode kernel instead."""


@gluon.jit
def _copy_chunk(x_ptr, qw_ptr, x_buf, w_buf, c, c_hi, n0, M, N, w_off, w_mask, x_off, x_rows):
    """Start copying chunk c (64 input channels) into one ring stage, one commit group; zeros past c_hi."""
    live = c < c_hi
    async_copy.async_copy_global_to_shared(w_buf, qw_ptr + (c * N + n0) * 16 + w_off, mask=w_mask & live)
    async_copy.async_copy_global_to_shared(x_buf, x_ptr + c * 64 + x_off, mask=(x_rows < M) & live)
    async_copy.commit_group()


@gluon.jit
def _scale_zero(s_ptr, z_ptr, c, c_hi, n0, N, cols, G: gl.constexpr):
    """Chunk c's scales (fp32) and zeros as fp16 1024 + z, [BN] each, in the layout of `cols`."""
    g = c * 64 // G
    m = (n0 + cols < N) & (c < c_hi)
    s = gl.load(s_ptr + g * N + n0 + cols, mask=m, other=0.0).to(gl.float32)
    z = gl.load(z_ptr + g * N + n0 + cols, mask=m, other=0)
    return s, (z.to(gl.int16) | 0x6400).to(gl.float16, bitcast=True)


@gluon.jit
def _w4a16_decode_mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_om, chunks,
                             per_split, G: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                             SPLIT: gl.constexpr, PDL: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    wcp: gl.constexpr = gl.BlockedLayout([8, 1], [2, 16], [1, NW], [0, 1])  # [16 lanes, BN]: 16 bytes a thread
    xcp: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [1, NW], [1, 0])  # [16 rows, 64]

    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)
    n0 = gl.program_id(0) * BN
    c_lo = gl.program_id(1) * per_split
    c_hi = gl.minimum(chunks, c_lo + per_split)

    w_ring = gl.allocate_shared_memory(gl.int16, [STAGES, 16, BN],
                                       gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0, 1]))
    x_ring = gl.allocate_shared_memory(gl.float16, [STAGES, 16, 64],
                                       gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    wj = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, wcp)), 1)
    wn = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, wcp)), 0)
    w_off = wn * 16 + wj  # [16, BN]: lane j of column n0 + n in the chunk
    w_mask = (n0 + wn < N) & (wj >= 0)
    xr = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, xcp)), 1)
    xk = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, xcp)), 0)
    x_off = xr * stride_xm + xk
    x_rows = xr + xk * 0
    zcols = gl.arange(0, BN, layout=gl.SliceLayout(0, b_l))  # zeros: beside the weights they act on
    scols = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))  # scales: on the accumulator's columns

    for i in gl.static_range(STAGES - 1):
        _copy_chunk(x_ptr, qw_ptr, x_ring.index(i), w_ring.index(i), c_lo + i, c_hi, n0, M, N, w_off, w_mask,
                    x_off, x_rows)
    # a chunk's scales and zeros are read one iteration ahead (registers): a load used at once would wait
    s, _ = _scale_zero(s_ptr, z_ptr, c_lo, c_hi, n0, N, scols, G)
    _, zq = _scale_zero(s_ptr, z_ptr, c_lo, c_hi, n0, N, zcols, G)
    acc = gl.zeros([16, BN], gl.float32, mma)
    it = 0
    for c in range(c_lo, c_hi):
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()
        nxt = (it + STAGES - 1) % STAGES
        _copy_chunk(x_ptr, qw_ptr, x_ring.index(nxt), w_ring.index(nxt), c + STAGES - 1, c_hi, n0, M, N, w_off,
                    w_mask, x_off, x_rows)
        s_n, _ = _scale_zero(s_ptr, z_ptr, c + 1, c_hi, n0, N, scols, G)
        _, zq_n = _scale_zero(s_ptr, z_ptr, c + 1, c_hi, n0, N, zcols, G)
        st = it % STAGES
        it += 1
        w = w_ring.index(st).load(b_l)  # [16, BN] int16, pairs of lanes per thread
        zb = gl.broadcast(gl.expand_dims(zq, 0), w)[0]
        p0, p1 = gl.inline_asm_elementwise(_ASM01, "=r,=r,r,r", [w, zb], dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=2)
        p2, p3 = gl.inline_asm_elementwise(_ASM23, "=r,=r,r,r", [w, zb], dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=2)
        xs = x_ring.index(st)
        part = mma_v2(xs.slice(0, 16, dim=1).load(a_l), p0, gl.zeros([16, BN], gl.float32, mma))
        part = mma_v2(xs.slice(16, 16, dim=1).load(a_l), p1, part)
        part = mma_v2(xs.slice(32, 16, dim=1).load(a_l), p2, part)
        part = mma_v2(xs.slice(48, 16, dim=1).load(a_l), p3, part)
        acc += part * gl.expand_dims(s, 0)
        s, zq = s_n, zq_n
    async_copy.wait_group(0)

    orow = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, mma)), 1)
    ocol = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, mma)), 0)
    ptrs = out_ptr + orow * stride_om + n0 + ocol
    mask = (orow < M) & (n0 + ocol < N)
    if SPLIT:
        gl.atomic_add(ptrs, acc.to(gl.float16), mask=mask, sem="relaxed")
    else:
        gl.store(ptrs, acc.to(gl.float16), mask=mask)


def supported(x: torch.Tensor, M: int, group_size: int) -> bool:
    """fp16 activations on a CUDA GPU of compute capability >= 8.0, M <= 16 rows, group size 64 or 128."""
    return (not _broken and x.is_cuda and x.dtype == torch.float16 and torch.version.hip is None
            and cuda_capability(x.device) >= (8, 0) and 1 <= M <= MAX_M and group_size in GROUPS)


def w4a16_decode_mma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, config: dict | None = None, pdl: bool = False) -> torch.Tensor:
    """`x [..., K]` fp16 (at most 16 rows) times the packed `[N, K]` weight -> `[..., N]` fp16."""
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_decode_mma")
    M = x2.shape[0]
    if not supported(x2, M, group_size):
        raise UnsupportedError(f"w4a16_decode_mma: needs fp16 x with 1..{MAX_M} rows, group size 64 or 128 and a "
                               f"CUDA GPU of compute capability >= 8.0; got {x.dtype}, {M} rows, g{group_size}")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    bn = cfg["BLOCK_N"]
    chunks = K // planes64.CHUNK_K
    tiles = cdiv(N, bn)
    splits = max(1, min(chunks, cdiv(cfg["WAVES"] * _num_sms(x.device), tiles)))
    per_split = cdiv(chunks, splits)
    splits = cdiv(chunks, per_split)
    out = (torch.zeros if splits > 1 else torch.empty)((M, N), dtype=x.dtype, device=x.device)
    try:
        _w4a16_decode_mma_kernel[(tiles, splits)](
            x2, qweight, scales, zeros, out, M, N, x2.stride(0), out.stride(0), chunks, per_split,
            G=group_size, BN=bn, STAGES=cfg["STAGES"], SPLIT=splits > 1, PDL=pdl,
            num_warps=cfg["num_warps"], launch_pdl=pdl)
    except _BUILD_ERRORS as e:
        _broken.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        warnings.warn(f"lmq: the small-M W4A16 kernel (w4a16_decode_mma) does not build with this Triton "
                      f"({_broken[0]}); small M takes the Triton decode kernel")
        raise KernelUnavailable(_broken[0]) from e
    return out.reshape(*lead, N)
