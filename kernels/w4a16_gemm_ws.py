"""W4A16 prefill GEMM for Hopper (sm90): warp-specialized, written in Gluon (Triton's explicit dialect).

    out[M, N] = x[M, K] @ w_hat[N, K]^T,   w_hat[n, k] = (q[n, k] - z[g, n]) * s[g, n],  g = k // G

Same layout (`planes64`) and function as `w4a16_gemm`; fp16 or bf16 activations. Why a second kernel: in the
Triton kernel the warps that dequantize are the warps that issue the matrix instructions, and Triton
3.6 serializes wgmma whose operand sits in registers (ptxas C7515), so the tensor cores idle while
weights are converted (NOTES-gemm.md, runs 2-4 and 15: 0.5-0.6x cuBLAS at M >= 256). Here three
partitions run side by side over one ring of 64-wide K chunks (STAGES deep):

    loader  (1 warp)     TMA: x tile [BM, 64], int4 chunk [128, 16] int16, the chunk's scales and zeros
                         -> stage s, signalled by `a_ready[s]` (transaction bytes)
    mma lo / hi          each a warp group with 64 of the tile's 128 weight rows: reads its codes,
    (4 warps each)       zeros and scales of stage s straight into wgmma's register operand (w_hat per
                         16-wide plane, scales applied: one rounding to the activations' dtype, as a
                         dequantized weight has),
                         multiplies with the x tile in shared memory as wgmma's N side
                         (acc^T [64, BM] += w_hat @ x^T), waits for its wgmma, and frees s (`done[s]`
                         counts both)

The weights never pass through shared memory as fp16 and no warps are set aside to convert: the earlier
form of this kernel (a converting partition writing w_hat into a second ring that the mma warps read)
was bound by shared-memory traffic (NOTES-gemm.md, run 19) and ran 1.21-1.47x slower (run 27). Each mma
partition waits for its own wgmma before it converts the next chunk (the compiler may give the next
chunk the registers the running wgmma still reads); the other partition's wgmma keep the tensor cores
busy meanwhile. Persistent: one program per SM walks work items (an output tile [BM, 128], or with
SPLIT_K > 1 one K range of it, added in the activations' dtype into a zeroed output); during a tile's epilogue the loader
already fills the next tile's stages. `plan` picks BM and SPLIT_K per shape. Tails: TMA zero-fills x
rows past M; weight rows past N (which read the next chunk's rows or zeros) only reach masked output
columns.
Launched with PDL where `use_pdl` (`lmq.kernels.pdl`, `PDL`): the program waits for the kernel before it at its
start, and the loader lets the next kernel launch once it has issued its last copies (NOTES-gemm.md run 50).
`w4a16_gemm_ws_ref` is the plain-PyTorch twin. The interpreter cannot run Gluon: tested on the GPU
(and compiled offline for sm_90a in tests/test_gemm_compile.py).
"""

from __future__ import annotations

import torch
from lmq.kernels import cdiv, cuda_capability
from lmq.kernels.gluon_build import (  # noqa: F401 (KernelUnavailable: callers catch it here)
    BuildGuard,
    KernelUnavailable,
    gdc_launch_dependents,
    gdc_wait,
)
from lmq.kernels.launch import DirectLaunch, PlanCache
from lmq.kernels.pdl import use_pdl, zero_filled
from lmq.kernels.w4a16_gemm import CONFIGS, _num_sms, _pair_asm, check_inputs
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import constexpr_function

from lmq.errors import UnsupportedError
from lmq.pack import planes64

CHUNK_K = gl.constexpr(planes64.CHUNK_K)  # 64 input channels per step
LANES = gl.constexpr(planes64.LANES)  # 16 int16 lanes per chunk row

# TMA copy of a box into shared memory, completing on a barrier: (desc, coord, barrier, dst). Triton 3.9
# renamed the op (async_copy_global_to_shared raises there), same arguments.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
DEFAULT_CONFIG = CONFIGS["sm90"]["prefill_ws"]  # the table's entry (kernels/w4a16_gemm.py says why)


@constexpr_function
def _stage_bytes(x_bytes, q_bytes, sz_bytes, sub):
    """Bytes the TMA copies of one stage deliver (what its barrier expects)."""
    x_bytes, q_bytes, sz_bytes, sub = (int(getattr(v, "value", v)) for v in (x_bytes, q_bytes, sz_bytes, sub))
    return x_bytes + q_bytes + sub * sz_bytes


@gluon.jit
def _scaled_pair(h, z, s, FIRST: gl.constexpr, IS_BF16: gl.constexpr):
    """Planes FIRST, FIRST + 1 of `h [BN, 16]` int16 as w_hat = (q - z) * s, rounded once to fp16 or bf16
    (`z` uint8, `s` fp16, [BN])."""
    if IS_BF16:
        zq = (z.to(gl.int16) | 0x4300).to(gl.bfloat16, bitcast=True)  # MAGIC + z
        zb = gl.broadcast(gl.expand_dims(zq, 1), h)[0]
        sb = gl.broadcast(gl.expand_dims(s.to(gl.float32), 1), h)[0]
        w0, w1 = gl.inline_asm_elementwise(_pair_asm(FIRST, True, True), "=r,=r,r,r,r,r", [h, zb, sb],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=2)
    else:
        zq = (z.to(gl.int16) | 0x6400).to(gl.float16, bitcast=True)
        zb = gl.broadcast(gl.expand_dims(zq, 1), h)[0]
        sb = gl.broadcast(gl.expand_dims(s, 1), h)[0]
        w0, w1 = gl.inline_asm_elementwise(_pair_asm(FIRST, False, True), "=r,=r,r,r,r", [h, zb, sb],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=2)
    return w0, w1


@gluon.jit
def _work(w, M, N, k_steps, BM: gl.constexpr, BN: gl.constexpr, GROUP_M, SPLIT_K):
    """Work item `w` -> (off_m, off_n, first chunk, chunks): output tile w // SPLIT_K in grouped order
    (GROUP_M row blocks share a column block while it is in L2), K split w % SPLIT_K."""
    tile = w // SPLIT_K
    num_m = gl.cdiv(M, BM)
    width = GROUP_M * gl.cdiv(N, BN)
    first_m = (tile // width) * GROUP_M
    rows = gl.minimum(num_m - first_m, GROUP_M)
    per = gl.cdiv(k_steps, SPLIT_K)
    k0 = (w % SPLIT_K) * per
    return (first_m + (tile % width) % rows) * BM, ((tile % width) // rows) * BN, k0, gl.minimum(k_steps - k0, per)


@gluon.jit
def _loader(x_desc, q_desc, s_desc, z_desc, bufs, bars, M, N, k_steps, num_work, G, GROUP_M, SPLIT_K, trigger):
    # a worker partition's scalar arguments arrive as runtime values: sizes come from the buffers' shapes
    x_bufs, q_bufs, s_bufs, z_bufs = bufs
    a_ready, done = bars
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    BM: gl.constexpr = x_bufs.type.shape[1]
    BN: gl.constexpr = q_bufs.type.shape[1]
    SUB: gl.constexpr = s_bufs.type.shape[0] // x_bufs.type.shape[0]  # scale/zero rows per chunk: 2 when G = 32
    nbytes: gl.constexpr = _stage_bytes(x_desc.block_type.nbytes, q_desc.block_type.nbytes,
                                        s_desc.block_type.nbytes + z_desc.block_type.nbytes, SUB)
    c = 0  # ring position: continues from one work item to the next
    for w in range(gl.program_id(0), num_work, gl.num_programs(0)):
        off_m, off_n, k0, nk = _work(w, M, N, k_steps, BM, BN, GROUP_M, SPLIT_K)
        for i in range(k0, k0 + nk):
            st = c % STAGES
            mbarrier.wait(done.index(st), ((c // STAGES) & 1) ^ 1)  # barriers start as "phase 1 complete"
            bar = a_ready.index(st)
            mbarrier.expect(bar, nbytes)
            _tma_load(x_desc, [off_m, i * CHUNK_K], bar, x_bufs.index(st))
            _tma_load(q_desc, [i * N + off_n, 0], bar, q_bufs.index(st))
            for r in gl.static_range(SUB):
                g = (i * CHUNK_K + r * (CHUNK_K // 2)) // G
                _tma_load(s_desc, [g * N + off_n], bar, s_bufs.index(st * SUB + r))
                _tma_load(z_desc, [g * N + off_n], bar, z_bufs.index(st * SUB + r))
            c += 1
    if trigger:  # every load issued: the next kernel may launch (lmq.kernels.pdl)
        gdc_launch_dependents()


@gluon.jit
def _mma(bufs, bars, out_ptr, M, N, k_steps, num_work, stride_om, GROUP_M, SPLIT_K, HALF: gl.constexpr):
    """One of the kernel's two mma partitions (a warp group each, weight rows HALF * 64 ..
    HALF * 64 + 63 of the tile). Per chunk: the codes, zeros and scales of its rows are read from the ring
    straight into wgmma's register operand, w_hat [64, 16] per plane (scales applied: one rounding), and
    multiplied with the x tile in shared memory as the N side: acc^T [64, BM] += w_hat @ x^T.
    It waits for its four wgmma before it converts the next chunk: a register operand is read while the
    wgmma runs and the compiler may give the next chunk the same registers. The other partition's wgmma
    keep the tensor cores busy meanwhile (the two are independent instruction streams)."""
    x_bufs, q_bufs, s_bufs, z_bufs = bufs
    a_ready, done = bars
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    BM: gl.constexpr = x_bufs.type.shape[1]
    BN: gl.constexpr = q_bufs.type.shape[1]  # the tile's weight rows (both partitions)
    ROWS: gl.constexpr = BN // 2
    SUB: gl.constexpr = s_bufs.type.shape[0] // STAGES
    IS_BF16: gl.constexpr = x_bufs.dtype == gl.bfloat16
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    # the codes of a [64, 16] chunk are read in the register operand's own layout: each thread's pairs of
    # lanes (2q, 2q+1) and (2q+8, 2q+9) are its operand pairs for every plane (planes64: lane j of plane i is
    # k = 16 i + j)
    al: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=layout, k_width=2)
    vl: gl.constexpr = gl.SliceLayout(1, al)
    c = 0
    for w in range(gl.program_id(0), num_work, gl.num_programs(0)):
        off_m, off_n, _, nk = _work(w, M, N, k_steps, BM, BN, GROUP_M, SPLIT_K)
        acc = gl.zeros((ROWS, BM), dtype=gl.float32, layout=layout)
        for i in range(nk):
            st = c % STAGES
            mbarrier.wait(a_ready.index(st), (c // STAGES) & 1)
            h = q_bufs.index(st).slice(HALF * ROWS, ROWS).load(al)  # [64, 16] int16
            z0 = z_bufs.index(st * SUB).slice(HALF * ROWS, ROWS).load(vl)
            s0 = s_bufs.index(st * SUB).slice(HALF * ROWS, ROWS).load(vl)
            z1 = z_bufs.index(st * SUB + SUB - 1).slice(HALF * ROWS, ROWS).load(vl)  # planes 2, 3 (G = 32)
            s1 = s_bufs.index(st * SUB + SUB - 1).slice(HALF * ROWS, ROWS).load(vl)
            w0, w1 = _scaled_pair(h, z0, s0, 0, IS_BF16)
            w2, w3 = _scaled_pair(h, z1, s1, 2, IS_BF16)
            xt = x_bufs.index(st)  # [BM, 64]
            acc = warpgroup_mma(w0, xt.slice(0, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(w1, xt.slice(16, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(w2, xt.slice(32, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(w3, xt.slice(48, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc, w0, w1, w2, w3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w0, w1, w2, w3))
            mbarrier.arrive(done.index(st))  # this partition is done with the stage (the barrier counts two)
            c += 1
        # -- epilogue: acc^T [64, BM] -> out[off_m:, off_n + HALF * 64:] in x's dtype, masked -------------
        # through shared memory into a layout where each thread holds 8 contiguous output columns: 16-byte
        # stores (and packed atomics), where the accumulator's own layout gives each thread single columns
        # 8 rows apart (H100: o_proj at M=256, split in two, 70 -> 19 us; NOTES-gemm.md run 27)
        ol: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])
        res = gl.convert_layout(acc.to(x_bufs.dtype), ol)
        offs_n = off_n + HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ol))
        offs_m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, ol))
        ptrs = out_ptr + gl.expand_dims(offs_m, 0) * stride_om + gl.expand_dims(offs_n, 1)  # [64, BM]
        mask = gl.expand_dims(offs_n < N, 1) & gl.expand_dims(offs_m < M, 0)
        if SPLIT_K == 1:
            gl.store(ptrs, res, mask=mask)
        else:
            gl.atomic_add(ptrs, res, mask=mask, sem="relaxed")


@gluon.jit
def _mma_lo(bufs, bars, out_ptr, M, N, k_steps, num_work, stride_om, GROUP_M, SPLIT_K):
    _mma(bufs, bars, out_ptr, M, N, k_steps, num_work, stride_om, GROUP_M, SPLIT_K, 0)


@gluon.jit
def _mma_hi(bufs, bars, out_ptr, M, N, k_steps, num_work, stride_om, GROUP_M, SPLIT_K):
    _mma(bufs, bars, out_ptr, M, N, k_steps, num_work, stride_om, GROUP_M, SPLIT_K, 1)


@gluon.jit
def _w4a16_gemm_ws_kernel(x_desc, q_desc, s_desc, z_desc, out_ptr, M, N, K, stride_om,
                          G: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          GROUP_M: gl.constexpr, SPLIT_K: gl.constexpr, LOADER_REGS: gl.constexpr,
                          MMA_REGS: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
    """BLOCK_N = 128 weight rows per tile, num_warps = 4: a loader warp and two mma partitions of a warp
    group each (`_mma`)."""
    k_steps = K // CHUNK_K
    num_work = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N) * SPLIT_K
    x_bufs = gl.allocate_shared_memory(x_desc.block_type.element_ty, [STAGES, BLOCK_M, CHUNK_K], x_desc.layout)
    q_bufs = gl.allocate_shared_memory(gl.int16, [STAGES, BLOCK_N, LANES], q_desc.layout)
    SUB: gl.constexpr = 2 if G < CHUNK_K else 1
    s_bufs = gl.allocate_shared_memory(gl.float16, [STAGES * SUB, BLOCK_N], s_desc.layout)
    z_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES * SUB, BLOCK_N], z_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(done.index(i), count=2)  # both mma partitions
    bufs = (x_bufs, q_bufs, s_bufs, z_bufs)
    bars = (a_ready, done)
    if PDL:
        # launched early: x (and the zeroed output) are written by the kernels before this one. The default warps
        # wait here; the loader and mma partitions start only when they reach `warp_specialize`, so after it.
        gdc_wait()
    mma_args = (bufs, bars, out_ptr, M, N, k_steps, num_work, stride_om, GROUP_M, SPLIT_K)
    gl.warp_specialize([
        (_mma_lo, mma_args),
        (_mma_hi, mma_args),
        (_loader, (x_desc, q_desc, s_desc, z_desc, bufs, bars, M, N, k_steps, num_work, G, GROUP_M, SPLIT_K, PDL)),
    ], [4, 1], [MMA_REGS, LOADER_REGS])


BUILD = BuildGuard("the Hopper prefill GEMM (w4a16_gemm_ws)",
                   "prefill uses dequantize + cuBLAS instead (slower from 256 rows). Triton 3.6 to 3.9 build it.")


def supported(x: torch.Tensor, N: int) -> bool:
    """Whether this kernel can run these inputs: Hopper, fp16 or bf16 activations, N a multiple of 16 (the scale
    and zero rows of a group start at g * N: TMA needs 16-byte-aligned starts, N * 1 byte for the zeros),
    and a Triton that built it (or has not tried yet)."""
    if BUILD.failed or x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16) or N % 16:
        return False
    return cuda_capability(x.device)[0] == 9


_LAYOUTS: dict[tuple, gl.NVMMASharedLayout] = {}


def _layout(shape: tuple[int, ...], dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a TMA box, made once per shape (each launch needs four)."""
    key = (shape, dtype)
    if key not in _LAYOUTS:
        if len(shape) == 1:
            _LAYOUTS[key] = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=dtype.primitive_bitwidth, rank=1)
        else:
            _LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for(list(shape), dtype)
    return _LAYOUTS[key]


def weight_descriptors(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, block_n: int,
                       held: dict | None = None) -> tuple:
    """The TMA descriptors of a packed weight for `block_n`-row tiles: (codes, scales, zeros).

    Building them costs microseconds of host time per launch. `held` is a dict the weight's owner keeps
    (lmq.engine's QLinear and Linear): the descriptors are made once per tile height and live as long
    as the owner, which holds the weights anyway (a cache keyed here would keep every weight alive).
    Weights that moved (a new storage) replace what `held` had.
    """
    key = (block_n, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr())
    if held is not None and key in held:
        return held[key]
    lanes = planes64.LANES
    descs = (TensorDescriptor.from_tensor(qweight.view(-1, lanes), [block_n, lanes],  # chunk c's rows start at c * N
                                          _layout((block_n, lanes), gl.int16)),
             TensorDescriptor.from_tensor(scales.view(-1), [block_n], _layout((block_n,), gl.float16)),
             TensorDescriptor.from_tensor(zeros.view(-1), [block_n], _layout((block_n,), gl.uint8)))
    if held is not None:
        if any(k[1:] != key[1:] for k in held):
            held.clear()  # descriptors of the weights' old storage
        held[key] = descs
    return descs


def w4a16_gemm_ws(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, config: dict | None = None, descs: dict | None = None) -> torch.Tensor:
    """`x [..., K]` fp16/bf16 times the packed `[N, K]` weight -> `[..., N]` in x's dtype (Hopper only).

    `descs`: where to keep the weight's TMA descriptors between calls (`weight_descriptors`)."""
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_gemm_ws")
    if not supported(x, N):
        raise UnsupportedError(f"w4a16_gemm_ws needs a Hopper GPU, float16 or bfloat16 activations and N % 16 == 0; got "
                               f"{x.device} {x.dtype}, N={N}; use w4a16_gemm")
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    if x2.stride(0) % 8 or x2.data_ptr() % 16:  # TMA: 16-byte-aligned start and row stride
        x2 = x2.clone(memory_format=torch.contiguous_format)
    sms = _num_sms(x.device)
    BM, BN, split, cfg = _plan_for(M, N, K, config, sms)
    out = (zero_filled if split > 1 else torch.empty)((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    pdl = PDL and use_pdl(x.device)
    ck = planes64.CHUNK_K
    xdt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(x2, [BM, ck], _layout((BM, ck), xdt))
    q_desc, s_desc, z_desc = weight_descriptors(qweight, scales, zeros, BN, descs)
    work = cdiv(M, BM) * cdiv(N, BN) * split
    grid = (min(work, sms),)
    args = {"x_desc": x_desc, "q_desc": q_desc, "s_desc": s_desc, "z_desc": z_desc, "out_ptr": out, "M": M, "N": N,
            "K": K, "stride_om": out.stride(0), "G": group_size, "BLOCK_M": BM, "BLOCK_N": BN, "STAGES": cfg["STAGES"],
            "GROUP_M": cfg["GROUP_M"], "SPLIT_K": split, "LOADER_REGS": cfg["LOADER_REGS"], "MMA_REGS": cfg["MMA_REGS"],
            "PDL": pdl, "num_warps": 4}
    # what Triton specializes this launch on: the constexprs, the dtype, and which integers are 1 or multiples of 16
    # (the x, weight and output addresses are 16-byte aligned: TMA needs it and the copy above ensures it)
    key = (x.dtype, N, K, group_size, BM, split, pdl, M == 1, M % 16 == 0, cfg["STAGES"], cfg["GROUP_M"],
           cfg["LOADER_REGS"], cfg["MMA_REGS"])
    BUILD.launch(lambda: _LAUNCH(grid, key, args, launch_pdl=pdl))
    return out.reshape(*lead, N)


# The host side of a launch, made lean (the engine's eager steps pay it on every linear; on the lent H100's host
# it was 148-171 us a call). `_plan_for` keeps each shape's plan; `_LAUNCH` (lmq.kernels.launch) calls the
# compiled kernel directly after the first launch of each kind: 87-112 us a call in all (docs/benchmarks.md).
_PLANS = PlanCache()
# launched with PDL where `use_pdl` (lmq.kernels.pdl): the whole program waits at its start, the loader lets the next
# kernel launch once it has issued its last copies
PDL = True


def _plan_for(M: int, N: int, K: int, config: dict | None, sms: int) -> tuple[int, int, int, dict]:
    """`plan` with the table's config merged in, kept per shape and config object (`PlanCache`)."""
    def make():
        cfg = {**DEFAULT_CONFIG, **(config or {})}
        if cfg["BLOCK_N"] != 128:
            raise ValueError(f"w4a16_gemm_ws: tiles hold 128 weight rows (two warp groups of 64), got "
                             f"BLOCK_N={cfg['BLOCK_N']}")
        return (*plan(M, N, K, cfg, sms), cfg)

    return _PLANS.get((M, N, K, sms), config, make)


_LAUNCH = DirectLaunch(_w4a16_gemm_ws_kernel)


def plan(M: int, N: int, K: int, cfg: dict, sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLIT_K) for this shape. When the 256-row tiles would fill at most half the SMs,
    or M fits the smaller tile as well, the rows per tile drop to BLOCK_M_SMALL; when the tiles still
    number fewer than the SMs, K is split (partial tiles added into a zeroed output) if that fills the last
    wave better by 5% or more, and with more tiles than SMs if it does by SPLIT_WAVES; each split keeps at
    least MIN_SPLIT_CHUNKS 64-wide chunks, at most MAX_SPLIT of them (2 in the table: two fp16 additions
    into a zeroed output give the same bits in either order, three would not). On an H100 (NOTES-gemm.md,
    runs 17 and 27): splitting a weight whose tiles already fill the SMs (gate_up at M=256) or halving tiles
    that nearly fill them (o_proj at M=1024) was slower; splitting qkv at M=1024 (192 tiles) was faster."""
    bm, bn, small = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.get("BLOCK_M_SMALL")
    if small and (2 * cdiv(M, bm) * cdiv(N, bn) <= sms or cdiv(M, small) == cdiv(M, bm)):
        bm = min(bm, small)  # also where the smaller tiles are as many (M <= 128): less of each is padding
    tiles = cdiv(M, bm) * cdiv(N, bn)
    k_steps = K // planes64.CHUNK_K
    if cfg.get("SPLIT_K"):
        split = min(cfg["SPLIT_K"], k_steps)
    else:
        def filled(work: int) -> float:  # busy share of the SMs over the waves `work` items take
            return work / (cdiv(work, sms) * sms)

        # fewer tiles than SMs: split for a 5% better fill; more (SPLIT_WAVES, the register-source form):
        # only for a much better last wave (qkv at M=1024: 192 tiles, 73% -> 97% of the SMs busy in 3 waves)
        gain = 1.05 if tiles < sms else cfg.get("SPLIT_WAVES", 0)
        split = 1
        most = min(cfg.get("MAX_SPLIT", 2), k_steps // cfg.get("MIN_SPLIT_CHUNKS", 8)) if tiles and gain else 1
        for s in range(2, most + 1):
            if filled(tiles * s) > filled(tiles * split) * gain:
                split = s
    return bm, bn, cdiv(k_steps, cdiv(k_steps, split))  # no empty split


def w4a16_gemm_ws_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """Plain-PyTorch twin: w_hat rounded to x's dtype as the kernel rounds it, then an fp32 matmul."""
    q = planes64.unpack(qweight, scales, zeros, group_size)
    w = q.dequantize(torch.float32).to(x.dtype).float().to(x.device)  # [N, K]
    return (x.float() @ w.t()).to(x.dtype)
