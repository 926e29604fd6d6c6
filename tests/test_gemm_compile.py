"""Every kernel variant compiles to machine code for the archs lmq packs for (no GPU needed: Triton's
own ptxas), so PTX or layout errors surface in CI, not first on a user's GPU.

The compiles run in a child process without TRITON_INTERPRET (conftest sets it for this one).
"""

import os
import subprocess
import sys

import pytest


def compile_all(arch: str, dt: str) -> None:
    import triton
    from lmq.kernels.w4a16_gemm import CONFIGS, _w4a16_gemm_kernel
    from lmq.kernels.w4a16_gemv import _w4a16_gemv_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmq.pack import planes64

    cc = int(arch[2:])
    geometry = {"CHUNK_K": planes64.CHUNK_K, "LANES": planes64.LANES}
    ptrs = {"x_ptr": f"*{dt}", "qw_ptr": "*i16", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": f"*{dt}"}

    def build(kernel, scalars, consts, num_warps, num_stages, extra_ptrs=None, pdl=False):
        all_ptrs = {**ptrs, **(extra_ptrs or {})}
        sig = {**all_ptrs, **{s: "i32" for s in scalars}, **{k: "constexpr" for k in consts}}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(all_ptrs))}
        k = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", cc, 64 if cc >= 90 else 32),
                           options={"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": pdl})
        assert k.asm["cubin"]
        return k

    mnk = ["M", "N", "K", "stride_xm", "stride_om"]
    # the decode config at 16 and 64 rows (on sm90 launched with PDL, triggering after its K loop, as a split-K launch
    # is there), with the deterministic mode's ordered split-K at 16; the prefill config
    for regime, bm, ordered in (("decode", 16, False), ("decode", 64, False), ("decode", 16, True),
                                ("prefill", 0, False)):
        cfg = CONFIGS[arch][regime]
        pdl = cc >= 90 and not ordered
        build(_w4a16_gemm_kernel, mnk,
              {"G": 128, "BLOCK_M": bm or cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
               "SPLIT_K": 2, "GROUP_M": cfg["GROUP_M"], "IS_BF16": dt == "bf16", "PLANES": planes64.PLANES,
               "SWAP_AB": cfg.get("SWAP_AB", False), "DOT_K": cfg.get("DOT_K", 16), "FAST_CVT": True,
               "ORDERED": ordered, "PDL": pdl, "TRIGGER": 2 if pdl else 0, **geometry},
              cfg["num_warps"], cfg["num_stages"], {"ws_ptr": "*fp32", "cnt_ptr": "*i32"}, pdl)
    if cc >= 90:  # `pdl.zero_filled`'s fill kernel
        from lmq.kernels.pdl import _ZERO_BLOCK, _zeros_kernel

        k = triton.compile(ASTSource(_zeros_kernel, {"out_ptr": f"*{dt}", "n": "i32", "BLOCK": "constexpr",
                                                     "PDL": "constexpr"},
                                     constexprs={"BLOCK": _ZERO_BLOCK, "PDL": True}),
                           target=GPUTarget("cuda", cc, 64), options={"num_warps": 4, "launch_pdl": True})
        assert k.asm["cubin"]
    g = CONFIGS[arch]["gemv"]
    # the table's GEMV without and with RoPE (BLOCK_N / 2 columns per half-head), and RoPE's whole-head fallback;
    # 2 activation rows per program (fp16 four-plane path), with and without RoPE
    tbn, tw = g["BLOCK_N"], g["num_warps"]
    for sum_planes, red, pdl, rope, bn, warps, rows in (
            (1, "atomic", False, False, tbn, tw, 1),
            (g["SUM_PLANES"], g["REDUCE"], cc >= 90, False, tbn, tw, 1),
            (4, "fixed", cc >= 90, True, tbn, tw, 1),
            (4, "fixed", cc >= 90, True, 128, 8, 1),
            (4, "fixed", cc >= 90, False, tbn, tw, 2),
            (4, "fixed", cc >= 90, True, tbn, tw, 2)):
        if rows > 1 and dt == "bf16":
            continue  # several rows per program: the fp16 four-plane path only
        build(_w4a16_gemv_kernel, ["M", "N", "K", "stride_xm", "stride_om", "stride_cp", "rope_cols"],
                  {"G": 128, "BLOCK_N": bn, "BLOCK_K": g["BLOCK_K"], "SPLIT_K": 2, "ROWS": rows,
                   "IS_BF16": dt == "bf16", "PLANES": planes64.PLANES, "FAST_CVT": True, "SUM_PLANES": sum_planes,
                   "REDUCE_FX": red == "fixed", "PDL": pdl, "ROPE": rope,
                   "ROPE_D": 128, **geometry},
                  warps, 1,
                  {"ws_ptr": "*i64" if red == "fixed" else "*fp32", "pos_ptr": "*i32",
                   "cos_ptr": "*fp32", "sin_ptr": "*fp32"}, pdl)


def compile_int8_head(arch: str, dt: str) -> None:
    """The int8 LM head kernel at the configs its launcher picks on `arch`, within the arch's shared memory per
    block; fp16 with the inline-assembly conversion too, whose loop must hold no I2F (the point of it)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from lmq.kernels.w8a16_gemm import DOT_CONFIG, DOT_CONFIG_WIDE, SMALL_SMEM
    from sass_attention import loop_summary
    from sass_head import compile_head

    cc = int(arch[2:])
    smem = {75: 64, 80: 163, 86: 99, 89: 99, 90: 227}[cc] * 1024
    configs = ((DOT_CONFIG, 16), (DOT_CONFIG_WIDE, 64)) if cc in (80, 90) else ((SMALL_SMEM["dot"], 16),
                                                                                 (SMALL_SMEM["wide"], 64))
    configs = (*configs, (configs[1][0], 32))  # M = 17..32 runs the wide config on 32-row tiles
    for config, block_m in configs:
        for asm in (False, True) if dt == "fp16" else (False,):
            k = compile_head(dt, config, block_m, asm, cc)
            assert k.asm["cubin"] and k.metadata.shared <= smem, (config, k.metadata.shared)
            if asm:
                _, body, ops = loop_summary(k)
                assert body and not ops["I2F"], f"the int8 head's loop converts with I2F on {arch}: {ops}"


def compile_attention(arch: str) -> None:
    """The decode-attention split kernel for every KV mode and head-dim bucket, launched with PDL (sm90)
    and without (the inline-assembly conversions and PDL never run under the interpreter), and the Gluon
    int4 split kernel (which the interpreter cannot run at all)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from lmq.kernels.attention_decode import INT4_THREE_REGS
    from lmq.kernels.attention_decode_mma import ring_bytes
    from sass_attention import compile_mma, compile_split, cuobjdump, loop_body

    cc = int(arch[2:])
    for kv_mode in (0, 1, 2):
        for d in (64, 128, 256):
            for pdl in {False, cc >= 90}:
                assert compile_split(kv_mode, d=d, cc=cc, pdl=pdl).asm["cubin"]
    # the Gluon int4 kernel: head dims it takes (64..128, multiples of 8), 64- and 128-token tiles, GQA groups
    # of 1..16, one split (the output written directly) and 64-bit offsets; no spills; at head dim 128 on
    # sm_90 at most 128 registers (four programs per SM, `residency_pad`'s MAX_PER_SM), and shared memory as
    # `ring_bytes` counts it
    for d, page, group, direct, off64 in ((64, 128, 3, False, False), (72, 128, 4, False, False),
                                          (80, 64, 4, False, False), (96, 256, 7, False, False),
                                          (112, 64, 8, False, False), (128, 128, 4, False, False),
                                          (128, 64, 16, False, False), (128, 128, 1, True, True)):
        k = compile_mma(d=d, page=page, group=group, cc=cc, direct=direct, off64=off64)
        assert k.metadata.shared == ring_bytes(d, min(128, page), group), (d, page, k.metadata.shared)
        sass = cuobjdump(k, "-sass")
        assert " STL" not in sass and " LDL" not in sass, f"the Gluon int4 kernel spills at head dim {d}"
        if cc >= 90 and (d, page, group) == (128, 128, 4):
            regs = int(cuobjdump(k, "-res-usage").split("REG:")[1].split()[0])
            assert regs <= 128, f"the Gluon int4 kernel takes {regs} registers: fewer than four programs per SM"
    k = compile_mma(cc=cc, pad=65536)  # the residency pad is held (two programs per SM at head dim 128)
    assert k.metadata.shared == ring_bytes(128, 128, 4) + 65536
    if cc >= 90:
        # int4 three programs per SM (head dims 65..128): the register cap holds and the per-tile loop does
        # not spill (at head dim 80 one value lives in local memory across the loop: a store on each of the
        # two paths into it, one load after)
        for d in (80, 128):
            k = compile_split(2, d=d, cc=cc, maxnreg=INT4_THREE_REGS)
            sass = cuobjdump(k, "-sass")
            body = loop_body(sass)
            assert body and not any(" STL" in ln or " LDL" in ln for ln in body), \
                f"the capped int4 kernel spills in its loop at head dim {d}"
            assert sass.count(" STL") + sass.count(" LDL") <= 4, f"the capped int4 kernel spills at head dim {d}"
            res = cuobjdump(k, "-res-usage")
            assert int(res.split("REG:")[1].split()[0]) <= INT4_THREE_REGS, res


def compile_ws() -> None:
    """The warp-specialized Hopper prefill kernel (Gluon) at the table's configs. Its SASS must not spill and
    must keep the register-operand wgmma pipelined: one wait per chunk's four HGMMA (ptxas serializes them, a
    wait after each, where it cannot prove the operand registers safe: NOTES-gemm.md, runs 15 and 27)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import torch
    import triton
    from lmq.kernels.w4a16_gemm_ws import DEFAULT_CONFIG, _w4a16_gemm_ws_kernel
    from sass_attention import cuobjdump
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    cfg = DEFAULT_CONFIG
    BN, N, K = cfg["BLOCK_N"], 4096, 4096
    flat = {8: gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=1),
            16: gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=1)}
    weights = {
        "q_desc": TensorDescriptor.from_tensor(torch.zeros(K // 64 * N, 16, dtype=torch.int16), [BN, 16],
                                               gl.NVMMASharedLayout.get_default_for([BN, 16], gl.int16)),
        "s_desc": TensorDescriptor.from_tensor(torch.zeros(K // 32 * N, dtype=torch.float16), [BN], flat[16]),
        "z_desc": TensorDescriptor.from_tensor(torch.zeros(K // 32 * N, dtype=torch.uint8), [BN], flat[8]),
    }
    # the table's tile (fp16 and bf16 activations), with G = 32 (two scale rows per chunk) and split-K, and
    # the 128-row tile
    for G, BM, split, dt in ((128, cfg["BLOCK_M"], 1, "fp16"), (128, cfg["BLOCK_M"], 1, "bf16"),
                             (32, cfg["BLOCK_M"], 3, "fp16"), (128, cfg["BLOCK_M_SMALL"], 2, "bf16")):
        tdt, gdt = (torch.bfloat16, gl.bfloat16) if dt == "bf16" else (torch.float16, gl.float16)
        x_desc = TensorDescriptor.from_tensor(torch.zeros(512, K, dtype=tdt), [BM, 64],
                                              gl.NVMMASharedLayout.get_default_for([BM, 64], gdt))
        descs = {"x_desc": x_desc, **weights}
        consts = {"G": G, "BLOCK_M": BM, "BLOCK_N": BN, "STAGES": cfg["STAGES"], "GROUP_M": cfg["GROUP_M"],
                  "SPLIT_K": split, "LOADER_REGS": cfg["LOADER_REGS"], "MMA_REGS": cfg["MMA_REGS"], "PDL": True,
                  "num_warps": 4}
        sig = {**{k: mangle_type(v) for k, v in descs.items()}, "out_ptr": f"*{dt}", "M": "i32", "N": "i32",
               "K": "i32", "stride_om": "i32", **{k: "constexpr" for k in consts}}
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("out_ptr", "N", "K", "stride_om")}
        k = triton.compile(GluonASTSource(_w4a16_gemm_ws_kernel, sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 64), options={"num_warps": consts["num_warps"]})
        assert k.asm["cubin"] and k.metadata.shared <= 227 * 1024, k.metadata.shared
        sass = cuobjdump(k, "-sass")
        hgmma, waits = sass.count(" HGMMA."), sass.count("WARPGROUP.DEPBAR")
        assert " STL" not in sass and " LDL" not in sass, f"the prefill kernel spills ({dt}, BM={BM})"
        assert hgmma >= 8 and waits * 4 <= hgmma, f"wgmma serialized: {waits} waits for {hgmma} HGMMA ({dt}, BM={BM})"


def compile_direct() -> None:
    """The small-M Hopper kernel (Gluon) at the table's config and the others the GPU tests run, fp16 and bf16, every
    group size: no spills, and its register-operand wgmma pipelined (one wait per chunk's four HGMMA)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import triton
    from lmq.kernels.w4a16_gemm_direct import (
        DEFAULT_CONFIG,
        _w4a16_direct_kernel,
        trigger_at,
    )
    from sass_attention import cuobjdump
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    tbn, tstep = DEFAULT_CONFIG["BLOCK_N"], DEFAULT_CONFIG["STEP"]  # the table's
    for dt, G, bm, bn, step, nch in (("fp16", 128, 16, tbn, tstep, 6), ("bf16", 128, 16, tbn, tstep, 14),
                                     ("fp16", 128, DEFAULT_CONFIG["BLOCK_M_MAX"], tbn, tstep, 8),
                                     ("fp16", 32, 16, 64, 1, 9), ("bf16", 64, 32, 64, 4, 8)):
        consts = {"G": G, "BLOCK_M": bm, "BLOCK_N": bn, "NCH": nch, "STEP": step, "SPLIT": True, "PDL": True, "TRIGGER": trigger_at(bm),
                  "num_warps": bn // 16}
        sig = {"x_ptr": f"*{dt}", "qw_ptr": "*i16", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": f"*{dt}", "M": "i32",
               "N": "i32", "stride_xm": "i32", "stride_om": "i32", "chunks": "i32", **{k: "constexpr" for k in consts}}
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "out_ptr",
                                                                         "N", "stride_xm", "stride_om")}
        k = triton.compile(GluonASTSource(_w4a16_direct_kernel, sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 64), options={"num_warps": consts["num_warps"]})
        sass = cuobjdump(k, "-sass")
        hgmma, waits = sass.count(" HGMMA."), sass.count("WARPGROUP.DEPBAR")
        assert " STL" not in sass and " LDL" not in sass, f"the direct kernel spills ({dt}, G={G}, BN={bn})"
        assert hgmma >= 4 and waits * 4 <= hgmma, f"wgmma serialized: {waits} waits for {hgmma} HGMMA ({dt}, G={G})"


def _compile_in_child(*args: str) -> None:
    """This file's compile job `args` in a child process without TRITON_INTERPRET; its stderr on failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_direct_kernel_compiles():
    _compile_in_child("direct")


@pytest.mark.slow
@pytest.mark.parametrize("arch,dt", [("sm75", "fp16"), ("sm80", "fp16"), ("sm80", "bf16"), ("sm90", "fp16"),
                                     ("sm90", "bf16")])
def test_kernels_compile(arch, dt):
    _compile_in_child(arch, dt)


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_attention_kernels_compile(arch):
    _compile_in_child("attention", arch)


@pytest.mark.slow
def test_ws_kernel_compiles():
    _compile_in_child("ws")


if __name__ == "__main__":
    if sys.argv[1] == "ws":
        compile_ws()
    elif sys.argv[1] == "direct":
        compile_direct()
    elif sys.argv[1] == "attention":
        compile_attention(sys.argv[2])
    else:
        compile_all(sys.argv[1], sys.argv[2])
        compile_int8_head(sys.argv[1], sys.argv[2])
