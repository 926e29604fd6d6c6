"""Offline (no GPU): compile the M = 1, 2 GEMV (kernels/w4a16_gemv.py) for sm_90 with Triton's own ptxas, at the
sm90 table's config and 1 or 2 activation rows per program (`ROWS`), and print registers, shared memory and the main loop body (one K tile: 64 weights per thread at the table's 64 x 128
tile) by opcode. Used to predict before spending device time (benchmarks/NOTES-gemm.md, runs 37-39).
Usage: python benchmarks/sass_gemv.py [--dump ROWS]   (run without TRITON_INTERPRET)
"""

from __future__ import annotations

import sys

import triton
from lmq.kernels.w4a16_gemm import CONFIGS
from lmq.kernels.w4a16_gemv import _w4a16_gemv_kernel
from sass_attention import loop_summary
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmq.pack import planes64

_PTRS = {"x_ptr": "*fp16", "qw_ptr": "*i16", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*fp16",
         "ws_ptr": "*i64", "pos_ptr": "*i32", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
_INTS = ["M", "N", "K", "stride_xm", "stride_om", "stride_cp", "rope_cols"]


def compile_gemv(rows: int, rope: bool = False, split_k: int = 8):
    """The table's GEMV as a launch at Llama-3-8B shapes compiles it: PDL, the "fixed" reduction, pointers and
    N, K, the row strides 16-divisible (M is not)."""
    g = CONFIGS["sm90"]["gemv"]
    consts = {"G": 128, "BLOCK_N": g["BLOCK_N"], "BLOCK_K": g["BLOCK_K"], "SPLIT_K": split_k, "ROWS": rows,
              "IS_BF16": False, "CHUNK_K": planes64.CHUNK_K, "LANES": planes64.LANES, "PLANES": planes64.PLANES,
              "FAST_CVT": True, "SUM_PLANES": g["SUM_PLANES"], "PDL": True, "ROPE": rope,
              "REDUCE_FX": g["REDUCE"] == "fixed", "ROPE_D": 128 if rope else g["BLOCK_N"]}
    sig = {**_PTRS, **{n: "i32" for n in _INTS}, **{k: "constexpr" for k in consts}}
    names = list(sig)
    aligned = list(_PTRS) + ["N", "K", "stride_xm", "stride_om"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(_w4a16_gemv_kernel, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 64),
                          options={"num_warps": g["num_warps"], "num_stages": g["num_stages"], "launch_pdl": True})


def main() -> None:
    for rows in (1, 2):
        k = compile_gemv(rows)
        regs, body, ops = loop_summary(k)
        print(f"ROWS={rows}: regs {regs}, shared {k.metadata.shared} B, loop body {len(body)} instr per K tile per thread "
              f"({len(body) / 64:.2f} per weight, {len(body) / 64 / rows:.2f} per weight and row): "
              + " ".join(f"{o}:{c}" for o, c in ops.most_common(20)))
        if "--dump" in sys.argv and sys.argv[sys.argv.index("--dump") + 1] == str(rows):
            print("\n".join(body))


if __name__ == "__main__":
    main()
