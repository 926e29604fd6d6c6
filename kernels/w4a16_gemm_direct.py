"""W4A16 GEMM for small M on Hopper (sm90), written in Gluon: weights straight from global memory into
wgmma's register operand, activations in shared memory once per program.

    out[M, N] = x[M, K] @ w_hat[N, K]^T,   w_hat[n, k] = (q[n, k] - z[g, n]) * s[g, n],  g = k // G

Same layout (`planes64`) and function as `w4a16_gemm`; fp16 or bf16 activations, M <= BLOCK_M_MAX (64): a
program's rows are the next power of two >= M, at least BLOCK_M (16).
Why a third kernel: the Triton decode kernel stages every weight chunk through a cp.async ring in shared
memory and pays CTA barriers per stage. Here a program (a warp group per 64 of its BLOCK_N weight rows, one
K split):

- copies its split's K range of x, [BLOCK_M, NCH * 64] (zero rows past M, zero chunks past the split), into
  shared memory with cp.async, once: one wait and one barrier per program, none in the loop (`plan` keeps that
  tile within MAX_X_BYTES, with more splits than MAX_SPLIT where it must);
- loads each 64-wide K chunk's codes [BLOCK_N, 16] int16 from global memory in wgmma's register-operand
  layout (`DotOperandLayout`, k_width 2: a thread's lane pairs (2q, 2q+1) and (2q+8, 2q+9) are its operand
  pairs for all four planes, which planes64 was laid out for), STEP chunks a time and one step ahead, so a
  step's loads are in flight while the previous step converts and multiplies;
- converts in registers (`_scaled_pair`, the prefill kernel's: (q - z) * s rounded once to the dtype) and
  issues wgmma m64nBMk16 with the weights as the M side and x^T from shared memory as the N side, then
  waits for them before converting the next chunk (the compiler may reuse a running wgmma's operand
  registers);
- adds its fp32 partial tile, rounded to the dtype, into the zeroed output with atomics (split-K; 16-byte
  packed adds), or stores it.

Launched with PDL (`lmq.kernels.pdl`) where `use_pdl`: its programs start while the kernel before them (the zero
fill, itself launched early) runs, request their first step of weights, then wait (`griddepcontrol.wait`) before
they copy x; they let the next kernel launch (`TRIGGER`, `trigger_at`) at their start for 16-row tiles (a grid of
four programs per SM, all resident at once) and after the K loop for larger tiles. So the next call's zero fill is
resident and waiting when this one ends, instead of launching then (the fill node cost about 1 us a call).

Measured on an H100 (NOTES-gemm.md, runs 47 and 48), fp16, us. Against the decode kernel, before PDL: at M = 3..16
qkv 9.5-9.6 against 10.5-10.8 and o_proj 7.5-7.7 against 8.5-8.7; o_proj at M = 32 / 48 / 64 8.2 / 9.1 / 9.4
against 9.1 / 10.4 / 11.1; gate_up 20% slower; in bf16 (4 instructions a weight to convert, fp16's 2) slower on
every shape. With PDL (run 48; plain -> early, trigger at the start) at M=16: qkv 9.4 -> 8.4, o_proj 7.7 -> 6.3,
down 17.8 -> 16.7, gate_up 35.3 -> 33.9; the decode kernel, early and triggering after its K loop, read 17.4 on
down and 27.9-28.3 on gate_up. So the sm90 table's `direct_rows` sends fp16 activations here for M <= 16 and
weights of at most 64M elements (qkv, o_proj, down), and M <= 64 for at most 20M (o_proj) (`lmq.engine.qlinear`).
`w4a16_gemm_ws_ref` (rounding w_hat to x's dtype as this kernel does) is its plain-PyTorch twin. The
interpreter cannot run Gluon: tested on the GPU and compiled offline for sm_90a in CI.
"""

from __future__ import annotations

import torch
from lmq.kernels import cdiv, cuda_capability, next_pow2
from lmq.kernels.gluon_build import (  # noqa: F401 (KernelUnavailable: callers catch it here)
    BuildGuard,
    KernelUnavailable,
    gdc_launch_dependents,
    gdc_wait,
)
from lmq.kernels.launch import DirectLaunch, PlanCache
from lmq.kernels.pdl import use_pdl, zero_filled
from lmq.kernels.w4a16_gemm import _DIRECT_SM90, _num_sms, check_inputs, waves_for
from lmq.kernels.w4a16_gemm_ws import _scaled_pair
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from lmq.errors import UnsupportedError
from lmq.pack import planes64

CHUNK_K = gl.constexpr(planes64.CHUNK_K)
LANES = gl.constexpr(planes64.LANES)
DEFAULT_CONFIG = _DIRECT_SM90  # the sm90 table's entry (kernels/w4a16_gemm.py says why)


@gluon.jit
def _load_step(qw_ptr, s_ptr, z_ptr, c, c_hi, N, w_offs, w_mask, v_offs, v_mask, G: gl.constexpr,
               STEP: gl.constexpr):
    """Codes of chunks c .. c + STEP - 1 ([BN, 16] int16 each, zeros past c_hi), and the scales and zeros
    (rows in the operand's row layout) of each group the step's 32-wide halves of chunks start: at G = 128 one
    per step of 1 or 2 chunks and two per step of 4 (c is a multiple of STEP), one per chunk at 64, two at 32."""
    HPG: gl.constexpr = G // (CHUNK_K // 2)  # halves of a chunk per group
    hs = ()
    for i in gl.static_range(STEP):
        hs = hs + (gl.load(qw_ptr + (c + i) * N * LANES + w_offs, mask=w_mask & ((c + i) < c_hi), other=0,
                           eviction_policy="evict_first"),)
    ss = ()
    zs = ()
    for h in gl.static_range(0, 2 * STEP, HPG):
        live = (c + h // 2) < c_hi
        g = (c * CHUNK_K + h * (CHUNK_K // 2)) // G
        ss = ss + (gl.load(s_ptr + g * N + v_offs, mask=v_mask & live, other=0.0),)
        zs = zs + (gl.load(z_ptr + g * N + v_offs, mask=v_mask & live, other=0),)
    return hs, ss, zs


@gluon.jit
def _w4a16_direct_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_om, chunks,
                         G: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NCH: gl.constexpr,
                         STEP: gl.constexpr, SPLIT: gl.constexpr, PDL: gl.constexpr, TRIGGER: gl.constexpr,
                         num_warps: gl.constexpr):
    IS_BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
    xdt: gl.constexpr = x_ptr.dtype.element_ty
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BLOCK_M, 16])
    al: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=layout, k_width=2)
    vl: gl.constexpr = gl.SliceLayout(1, al)
    n0 = gl.program_id(0) * BLOCK_N
    c_lo = gl.program_id(1) * NCH  # this split's chunks: c_lo .. c_hi - 1
    c_hi = gl.minimum(chunks, c_lo + NCH)

    if TRIGGER == 1:
        gdc_launch_dependents()  # the next kernel (the next call's zero fill) may launch now: lmq.kernels.pdl

    # -- the first step's weights are requested first: nothing before this kernel writes them ------------
    rows = gl.arange(0, BLOCK_N, layout=vl)
    lanes = gl.arange(0, LANES, layout=gl.SliceLayout(0, al))
    w_offs = gl.expand_dims((n0 + rows) * LANES, 1) + gl.expand_dims(lanes, 0)  # [BN, 16] in chunk 0
    w_mask = gl.expand_dims(n0 + rows < N, 1) & gl.expand_dims(lanes >= 0, 0)
    v_offs = n0 + rows
    v_mask = v_offs < N
    hs, ss, zs = _load_step(qw_ptr, s_ptr, z_ptr, c_lo, c_hi, N, w_offs, w_mask, v_offs, v_mask, G, STEP)
    if PDL:
        gdc_wait()  # launched early: x and the zeroed output are written by the kernels before this one

    # -- x [BLOCK_M, NCH * 64] of this split -> shared memory, once (cp.async; zeros past M and c_hi) -------
    xsl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, CHUNK_K], xdt)
    x_smem = gl.allocate_shared_memory(xdt, [NCH, BLOCK_M, CHUNK_K], xsl)
    xl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    xr = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, xl)), 1)
    xk = gl.expand_dims(gl.arange(0, CHUNK_K, layout=gl.SliceLayout(0, xl)), 0)
    x_rows = x_ptr + xr * stride_xm + xk
    for c in gl.static_range(NCH):  # constant offsets: the copies write disjoint slices, so no barrier between
        async_copy.async_copy_global_to_shared(x_smem.index(c), x_rows + (c_lo + c) * CHUNK_K,
                                               mask=(xr < M) & ((c_lo + c) < c_hi) & (xk >= 0))
    async_copy.commit_group()
    async_copy.wait_group(0)
    fence_async_shared()
    gl.thread_barrier()

    HPG: gl.constexpr = G // (CHUNK_K // 2)
    acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=layout)
    for c in range(c_lo, c_lo + NCH, STEP):
        nhs, nss, nzs = _load_step(qw_ptr, s_ptr, z_ptr, c + STEP, c_hi, N, w_offs, w_mask, v_offs, v_mask, G,
                                   STEP)
        for i in gl.static_range(STEP):
            # the step's groups that planes 0, 1 and planes 2, 3 of chunk i belong to
            w0, w1 = _scaled_pair(hs[i], zs[(2 * i) // HPG], ss[(2 * i) // HPG], 0, IS_BF16)
            w2, w3 = _scaled_pair(hs[i], zs[(2 * i + 1) // HPG], ss[(2 * i + 1) // HPG], 2, IS_BF16)
            xt = x_smem.index(c - c_lo + i)  # [BM, 64]
            acc = warpgroup_mma(w0, xt.slice(0, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(w1, xt.slice(16, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(w2, xt.slice(32, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(w3, xt.slice(48, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc, w0, w1, w2, w3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w0, w1, w2, w3))
        hs, ss, zs = nhs, nss, nzs

    if TRIGGER == 2:
        gdc_launch_dependents()
    # -- epilogue: acc^T [BN, BM] -> out[:, n0:] (8 contiguous columns per thread: 16-byte stores / packed atomics)
    ol: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, num_warps], [0, 1])
    res = gl.convert_layout(acc.to(xdt), ol)
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ol))
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ol))
    ptrs = out_ptr + gl.expand_dims(offs_m, 0) * stride_om + gl.expand_dims(offs_n, 1)
    mask = gl.expand_dims(offs_n < N, 1) & gl.expand_dims(offs_m < M, 0)
    if SPLIT:
        gl.atomic_add(ptrs, res, mask=mask, sem="relaxed")
    else:
        gl.store(ptrs, res, mask=mask)


BUILD = BuildGuard("the Hopper small-M GEMM (w4a16_gemm_direct)", "the Triton decode kernel runs instead.")
_LAUNCH = DirectLaunch(_w4a16_direct_kernel)


# launched with PDL where `use_pdl` (lmq.kernels.pdl), letting the next kernel launch at its start (TRIGGER)
PDL = True
TRIGGER = None  # where the next kernel may launch: None picks (`trigger_at`), 0 never, 1 at the start, 2 after the loop
MAX_X_BYTES = 160 << 10  # a program's x tile in shared memory, at most (the H100 has 227 KB a block)


def trigger_at(rows: int) -> int:
    """Where a launch with PDL lets the next kernel launch (TRIGGER; module docstring): at its start for 16-row
    tiles, after its K loop for larger ones."""
    if TRIGGER is not None:
        return TRIGGER
    return 1 if rows <= 16 else 2


def rows_per_tile(M: int, cfg: dict) -> int:
    """The program's x rows (wgmma's N side): the next power of two >= M, between BLOCK_M and BLOCK_M_MAX."""
    return min(cfg.get("BLOCK_M_MAX", cfg["BLOCK_M"]), max(cfg["BLOCK_M"], next_pow2(M)))


def supported(x: torch.Tensor, M: int, config: dict | None = None) -> bool:
    """Hopper, fp16 or bf16 activations, M within one row tile, a Triton that built it (or has not tried)."""
    return _can_run(x, M, {**DEFAULT_CONFIG, **(config or {})})


def _can_run(x: torch.Tensor, M: int, cfg: dict) -> bool:
    """`supported` for a config already merged (the launcher's, kept with its plan)."""
    if BUILD.failed or x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return M <= cfg.get("BLOCK_M_MAX", cfg["BLOCK_M"]) and cuda_capability(x.device)[0] == 9


def check_config(cfg: dict) -> None:
    """The values the kernel is written for; anything else would compile to wrong results or not at all."""
    for key, ok in (("BLOCK_N", (64, 128)), ("STEP", (1, 2, 4)), ("BLOCK_M", (16, 32, 64)),
                    ("BLOCK_M_MAX", (16, 32, 64))):
        if cfg.get(key, ok[0]) not in ok:
            raise ValueError(f"w4a16_gemm_direct: {key} must be one of {ok} (a warp group per 64 weight rows, steps "
                             f"that hold whole groups, x tiles of 16 to 64 rows), got {cfg[key]!r}")
    least = cfg.get("BLOCK_M_MAX", cfg["BLOCK_M"]) * planes64.CHUNK_K * 2 * cfg["STEP"]  # one step of the widest x
    if not least <= cfg.get("MAX_X_BYTES", MAX_X_BYTES) <= 200 << 10:
        raise ValueError(f"w4a16_gemm_direct: MAX_X_BYTES must hold one step of x ({least} bytes) and leave Hopper's "
                         f"227 KB a block room (at most {200 << 10}), got {cfg['MAX_X_BYTES']}")


def plan(M: int, N: int, K: int, cfg: dict, sms: int, elem: int = 2) -> tuple[int, int, int]:
    """(rows per tile, splits, chunks per split): about WAVES programs per SM over the column tiles (`waves_for`:
    WAVES_FROM_M lowers it for larger M, whose x tiles take more shared memory), at most MAX_SPLIT splits, each a
    multiple of STEP chunks; the x tile (rows x chunks x 64 x `elem` bytes) within MAX_X_BYTES wins over MAX_SPLIT:
    then as many more splits as that takes, the chunks spread evenly over them."""
    bm = rows_per_tile(M, cfg)
    chunks = K // planes64.CHUNK_K
    tiles = cdiv(N, cfg["BLOCK_N"])
    step = cfg["STEP"]
    want = max(1, min(cfg["MAX_SPLIT"], cdiv(waves_for(M, cfg) * sms, tiles), cdiv(chunks, step)))
    most = max(step, cfg.get("MAX_X_BYTES", MAX_X_BYTES) // (bm * planes64.CHUNK_K * elem) // step * step)
    per = cdiv(cdiv(chunks, want), step) * step
    if per > most:  # the x tile's cap: enough splits for it, the chunks spread over them (never above `most`)
        per = cdiv(cdiv(chunks, cdiv(chunks, most)), step) * step
    return bm, cdiv(chunks, per), per


_PLANS = PlanCache()


def _plan_for(M: int, N: int, K: int, config: dict | None, sms: int, elem: int) -> tuple[dict, int, int, int]:
    """The config merged and checked, and `plan`, kept per shape and config object (`PlanCache`)."""
    def make():
        cfg = {**DEFAULT_CONFIG, **(config or {})}
        check_config(cfg)
        return (cfg, *plan(M, N, K, cfg, sms, elem))

    return _PLANS.get((M, N, K, sms, elem), config, make)


def w4a16_gemm_direct(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, config: dict | None = None) -> torch.Tensor:
    """`x [..., K]` fp16/bf16 (M <= BLOCK_M_MAX rows) times the packed `[N, K]` weight -> `[..., N]` (Hopper)."""
    N, K, lead, x2 = check_inputs(x, qweight, scales, zeros, group_size, "w4a16_gemm_direct")
    M = x2.shape[0]
    BUILD.check()  # a Triton that could not build it: say so (KernelUnavailable), not what `supported` lists
    cfg, bm, splits, per = _plan_for(M, N, K, config, _num_sms(x.device), x.element_size())
    if not _can_run(x, M, cfg):
        raise UnsupportedError(f"w4a16_gemm_direct needs a Hopper GPU, float16 or bfloat16 activations and at most "
                               f"{cfg.get('BLOCK_M_MAX', cfg['BLOCK_M'])} rows; got {x.device} {x.dtype}, M={M}; "
                               f"use w4a16_gemm")
    if M == 0:
        return x.new_empty(*lead, N)
    if x2.stride(0) % 8 or x2.data_ptr() % 16:  # cp.async copies 16-byte pieces
        x2 = x2.clone(memory_format=torch.contiguous_format)
    out = (zero_filled if splits > 1 else torch.empty)((M, N), dtype=x.dtype, device=x.device)
    pdl = PDL and use_pdl(x.device)
    bn = cfg["BLOCK_N"]
    grid = (cdiv(N, bn), splits)
    # the K loop runs NCH chunks in every split: the last split's chunks past K multiply zeros (x is zero there)
    args = {"x_ptr": x2, "qw_ptr": qweight, "s_ptr": scales, "z_ptr": zeros, "out_ptr": out, "M": M, "N": N,
            "stride_xm": x2.stride(0), "stride_om": out.stride(0), "chunks": K // planes64.CHUNK_K,
            "G": group_size, "BLOCK_M": bm, "BLOCK_N": bn, "NCH": per, "STEP": cfg["STEP"],
            "SPLIT": splits > 1, "PDL": pdl, "TRIGGER": trigger_at(bm) if pdl else 0, "num_warps": bn // 16}
    BUILD.launch(lambda: _LAUNCH[grid](**args, launch_pdl=pdl))
    return out.reshape(*lead, N)
