"""Offline (no GPU): compile the int8 LM head kernel (kernels/w8a16_gemm.py) for sm_90 with Triton's own ptxas, at
its configs, for fp16 and bf16 activations with and without the inline-assembly conversion (`ASM`), and print
registers, shared memory and the main loop body (one K tile) by opcode: what the comment above `_ASM_S8_F16` quotes.
Usage: python benchmarks/sass_head.py [--dump fp16|bf16]   (run without TRITON_INTERPRET)
"""

from __future__ import annotations

import triton
from lmq.kernels.w8a16_gemm import DOT_CONFIG, DOT_CONFIG_WIDE, _w8a16_kernel
from sass_attention import report
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_head(dtype: str, config: tuple, block_m: int, asm: bool, cc: int = 90):
    """The kernel as a launch at Llama-3-8B's head compiles it: pointers, N, K and the row strides 16-divisible."""
    BN, BK, warps, stages = config
    consts = {"BLOCK_M": block_m, "BLOCK_N": BN, "BLOCK_K": BK, "ASM": asm}
    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_om": "i32", **{k: "constexpr" for k in consts}}
    names = list(sig)
    aligned = ["x_ptr", "q_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_qn", "stride_om"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(_w8a16_kernel, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", cc, 64 if cc >= 90 else 32),
                          options={"num_warps": warps, "num_stages": stages})


def main() -> None:
    for dtype in ("fp16", "bf16"):
        for config, block_m in ((DOT_CONFIG, 16), (DOT_CONFIG_WIDE, 64)):
            for asm in (False, True) if dtype == "fp16" else (False,):
                codes = config[0] * config[1] // (32 * config[2])  # a thread's per K tile
                report(f"{dtype} {config} BLOCK_M={block_m} ASM={asm}", compile_head(dtype, config, block_m, asm),
                       codes, f"code ({codes} a thread a K tile)", dtype, top=12)


if __name__ == "__main__":
    main()
