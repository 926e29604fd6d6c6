"""Offline (no GPU): how many instructions per token the score half of an int4 decode-attention tile
costs when the codes are loaded straight into the tensor-core operand layout (Gluon, `mma_v2`), for
the next attention kernel. Compiles a probe kernel for sm_90 with Triton's own ptxas and counts the
SASS of its loop (both score dots of a 64-token tile and the row max; no softmax, no values). The
production kernel's whole loop is counted by benchmarks/sass_attention.py.

Usage: python benchmarks/probe_gluon_attention.py [K_WIDTH]   (2, 4 or 8; run without TRITON_INTERPRET)
"""
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_attention as sa
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

KW = int(sys.argv[1]) if len(sys.argv) > 1 else 2

@gluon.jit
def qk_probe(q_ptr, k_ptr, out_ptr, n_tiles, BLOCK_N: gl.constexpr, HALF: gl.constexpr, KW: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=KW)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=KW)
    offs_m = gl.arange(0, 16, layout=gl.SliceLayout(1, a_l))
    offs_k = gl.arange(0, HALF, layout=gl.SliceLayout(0, a_l))
    q_lo = gl.load(q_ptr + offs_m[:, None] * (2 * HALF) + offs_k[None, :])
    q_hi = gl.load(q_ptr + offs_m[:, None] * (2 * HALF) + HALF + offs_k[None, :])
    offs_d = gl.arange(0, HALF, layout=gl.SliceLayout(1, b_l))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, b_l))
    m = gl.full([16], -1e30, gl.float32, gl.SliceLayout(1, mma))
    for t in range(n_tiles):
        # codes of BLOCK_N tokens x HALF bytes (token-major rows), straight into the B operand layout
        c = gl.load(k_ptr + (t * BLOCK_N + offs_n[None, :]) * HALF + offs_d[:, None])  # [HALF, BLOCK_N] uint8
        c16 = c.to(gl.uint16)
        k_lo = ((c16 & 0xF) | 0x6400).to(gl.float16, bitcast=True)
        k_hi = ((c16 & 0xF0) | 0x6400).to(gl.float16, bitcast=True)
        acc = gl.zeros([16, BLOCK_N], gl.float32, mma)
        acc = mma_v2(q_lo, k_lo, acc)
        acc = mma_v2(q_hi, k_hi, acc)
        m = gl.maximum(m, gl.max(acc, 1))
    gl.store(out_ptr + gl.arange(0, 16, layout=gl.SliceLayout(1, mma)), m)

from triton.experimental.gluon._runtime import GluonASTSource

sig = {"q_ptr": "*fp16", "k_ptr": "*u8", "out_ptr": "*fp32", "n_tiles": "i32", "BLOCK_N": "constexpr", "HALF": "constexpr", "KW": "constexpr"}
consts = {"BLOCK_N": 64, "HALF": 64, "KW": KW}
attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
k = triton.compile(GluonASTSource(qk_probe, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 64),
                   options={"num_warps": 4})
body = sa.loop_body(sa.cuobjdump(k, "-sass"))
ops = collections.Counter(sa.opcode(l) for l in body)
print(f"k_width={KW}: loop {len(body)} instr/warp per 64-token tile -> {len(body) * 4 / 64:.2f} warp-instr/token (QK only): "
      + " ".join(f"{o}:{c}" for o, c in ops.most_common(14)))
if "--dump" in sys.argv:
    print("\n".join(re.sub(r"/\* 0x.*", "", l) for l in body if "LDG" in l)[:3000])
