import os, sys, collections, re
sys.path.insert(0, "benchmarks")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lmq.kernels.w4a16_gemm import CONFIGS, _w4a16_gemm_kernel
from lmq.pack import planes64
from sass_attention import cuobjdump, loop_body, opcode
bm = int(sys.argv[1]); dot_k = int(sys.argv[2]) if len(sys.argv) > 2 else 64
cfg = CONFIGS["sm90"]["decode"]
ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i16", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*fp16"}
scal = ["M", "N", "K", "stride_xm", "stride_om"]
consts = {"G": 128, "BLOCK_M": bm, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "SPLIT_K": 4, "GROUP_M": 1,
          "IS_BF16": False, "PLANES": planes64.PLANES, "SWAP_AB": True, "DOT_K": dot_k, "FAST_CVT": True,
          "CHUNK_K": planes64.CHUNK_K, "LANES": planes64.LANES}
sig = {**ptrs, **{s: "i32" for s in scal}, **{k: "constexpr" for k in consts}}
attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
attrs.update({(len(ptrs) + i,): [["tt.divisibility", 16]] for i in (1, 2, 3, 4)})
k = triton.compile(ASTSource(_w4a16_gemm_kernel, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 64),
                   options={"num_warps": 4, "num_stages": 3})
sass = cuobjdump(k, "-sass")
body = loop_body(sass)
ops = collections.Counter(opcode(l) for l in body)
print(os.environ.get("DISABLE_MMA_V3"), "regs", re.search(r"REG:(\d+)", cuobjdump(k, "-res-usage")).group(1), "shared", k.metadata.shared,
      "loop", len(body), " ".join(f"{o}:{c}" for o, c in ops.most_common(16)))
if "--dump" in sys.argv: print("\n".join(body))
