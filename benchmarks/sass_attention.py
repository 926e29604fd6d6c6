"""Offline (no GPU): compile the decode-attention split kernels for sm_90 with Triton's own ptxas and
count what one K/V tile costs in machine instructions, per KV dtype, at the production config; then the prefill
kernel's key-tile loops with and without the unmasked first loop (`attention_prefill.UNMASKED_TILES`).

Prints registers, shared memory, and the instructions of the main loop body (the block that ends in
the loop's backward branch), by opcode, and per token and KV head (the loop runs 4 warps). The Triton
split kernel for every KV dtype, then the Gluon int4 kernel (kernels/attention_decode_mma.py).
Used to predict before spending device time.
Usage: python benchmarks/sass_attention.py [--dump MODE]   (run without TRITON_INTERPRET)
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import lmq.kernels.attention_decode as dec
import triton
from lmq.kernels.attention_decode import _GPU_CONFIG, _decode_split_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_PTRS = {"q_ptr": "*fp16", "kc_ptr": "*u8", "vc_ptr": "*u8", "ks_ptr": "*i32", "vs_ptr": "*i32",
         "bt_ptr": "*i32", "lens_ptr": "*i32", "o_ptr": "*fp16", "po_ptr": "*fp32", "plse_ptr": "*fp32"}
_STRIDES = ["stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_cb", "stride_ch", "stride_ct", "stride_vb",
            "stride_vh", "stride_sb", "stride_sh", "stride_btb", "stride_pb", "stride_ph", "stride_ps", "stride_lb",
            "stride_lh"]


def _signature(code: str, strides: list[str], consts: dict) -> tuple[dict, dict]:
    """(signature, divisibility attributes) of a split kernel's launch, with K/V codes of type `code`.
    What a launch specializes on: pointers and the strides that are multiples of 16 in practice (head dims,
    block sizes, codes per row; not the block table's or the split count's)."""
    ptrs = {**_PTRS, "kc_ptr": code, "vc_ptr": code}
    sig = {**ptrs, "qk_scale": "fp32", "split_len": "i32", **{s: "i32" for s in strides},
           **{k: "constexpr" for k in consts}}
    names = list(sig)
    aligned = [n for n in names if n in ptrs or (n.startswith("stride_") and n not in ("stride_btb", "stride_lh"))
               or n == "split_len"]
    return sig, {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def compile_split(kv_mode: int, d: int = 128, group: int = 4, page: int = 128, cc: int = 90, raw: bool = True,
                  scale_p: bool | None = None, pdl: bool | None = None, maxnreg: int | None = None):
    """The split kernel as a launch compiles it (with PDL on sm90 by default; `maxnreg`: a register cap)."""
    pdl = cc >= 90 if pdl is None else pdl
    block_n, warps, stages = _GPU_CONFIG[64 if d <= 64 else 128 if d <= 128 else 256]
    half = d // 2
    consts = {"GROUP": group, "BLOCK_G": max(16, triton.next_power_of_2(group)), "HALF": half,
              "BLOCK_DH": max(16, triton.next_power_of_2(half)), "BLOCK_N": min(block_n, page), "PAGE": page,
              "KV_MODE": kv_mode, "DIRECT": False, "OFF64": False, "ASM": True,
              "RAW": raw and kv_mode != 0, "SCALE_P": kv_mode == 1 if scale_p is None else scale_p,
              "PDL": pdl, "BALANCED": dec.BALANCED}
    sig, attrs = _signature("*u8" if kv_mode else "*fp16", _STRIDES, consts)
    return triton.compile(ASTSource(_decode_split_kernel, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", cc, 64 if cc >= 90 else 32),
                          options={"num_warps": warps, "num_stages": stages, "launch_pdl": pdl,
                                   **({"maxnreg": maxnreg} if maxnreg else {})})


def compile_mma(d: int = 128, group: int = 4, page: int = 128, cc: int = 90, pdl: bool | None = None,
                direct: bool = False, off64: bool = False, pad: int = 0):
    """The Gluon int4 split kernel (attention_decode_mma) as a launch compiles it."""
    from lmq.kernels import attention_decode_mma as mma
    from triton.experimental.gluon._runtime import GluonASTSource

    pdl = cc >= 90 if pdl is None else pdl
    half = d // 2
    consts = {"GROUP": group, "HN": mma.head_columns(group), "HALF": half,
              "BLOCK_DH": max(16, triton.next_power_of_2(half)), "PAGE": page,
              "TPW": min(128, page) // mma.NUM_WARPS, "STAGES": mma.STAGES, "PV_KW": mma.PV_KW,
              "DIRECT": direct, "OFF64": off64, "PDL": pdl, "BALANCED": dec.BALANCED, "PAD": pad}
    sig, attrs = _signature("*u8", [s for s in _STRIDES if s != "stride_ct"], consts)  # K rows: D / 2 bytes apart
    return triton.compile(GluonASTSource(mma._decode_split_kernel, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", cc, 64 if cc >= 90 else 32),
                          options={"num_warps": mma.NUM_WARPS, "launch_pdl": pdl})


def compile_prefill(kv_mode: int, unmasked: bool = True, cc: int = 90, mode: int = 0):
    """The prefill kernel (attention_prefill) at head dim 128, GQA 4, 64-token blocks, the table's config
    (`mode` 1: the chunk's own K/V from float tensors, `k_new` / `v_new`; 2: the cached prefix, continuing)."""
    from lmq.kernels import attention_prefill as pre

    block_m, block_n, warps, stages = pre._GPU_CONFIG[128]
    consts = {"GROUP": 4, "HALF": 64, "BLOCK_DH": 64, "BLOCK_M": block_m, "BLOCK_N": block_n, "PAGE": 64,
              "KV_MODE": kv_mode, "OFF64": False, "ASM": True, "RAW": kv_mode != 0, "SCALE_P": kv_mode == 1,
              "TILED": False, "UNMASKED": unmasked, "MODE": mode,
              "MERGE": mode == 1}
    code = "*u8" if kv_mode else "*fp16"
    ptrs = {"q_ptr": "*fp16", "kc_ptr": code, "vc_ptr": code, "ks_ptr": "*i32", "vs_ptr": "*i32", "bt_ptr": "*i32",
            "cu_q_ptr": "*i32", "lens_ptr": "*i32", "o_ptr": "*fp16", "tiles_ptr": "*i32", "kn_ptr": "*fp16",
            "vn_ptr": "*fp16", "lse_ptr": "*fp32"}
    strides = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_ch", "stride_ct", "stride_vb",
               "stride_vh", "stride_sb", "stride_sh", "stride_btb", "stride_knt", "stride_knh", "stride_vnt",
               "stride_vnh", "stride_lt"]
    sig = {**ptrs, "qk_scale": "fp32", **{n: "i32" for n in strides}, **{k: "constexpr" for k in consts}}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in [*ptrs, *strides] if n != "stride_btb"}
    return triton.compile(ASTSource(pre._prefill_kernel, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", cc, 64 if cc >= 90 else 32),
                          options={"num_warps": warps, "num_stages": stages})


def loops(text: str) -> list[list[str]]:
    """Every loop body of a SASS listing (from the target of each backward branch to the branch), in order."""
    lines = [ln for ln in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    out = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+.*?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i]:
            out.append([x for a, x in zip(addr, lines) if int(m.group(1), 16) <= a <= addr[i]])
    return out


def cuobjdump(kernel, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, f.name],
                              capture_output=True, text=True, check=True).stdout


def loop_body(text: str) -> list[str]:
    """Instructions between the target of the last backward branch and that branch."""
    lines = [ln for ln in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    best = None
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+.*?0x([0-9a-f]+)", ln)
        if m:
            t = int(m.group(1), 16)
            if t < addr[i] and (best is None or addr[i] - t > best[1] - best[0]):
                best = (t, addr[i])
    if best is None:
        return []
    return [ln for a, ln in zip(addr, lines) if best[0] <= a <= best[1]]


def opcode(ln: str) -> str:
    ins = re.sub(r"^\s+/\*[0-9a-f]+\*/\s+", "", ln)
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0].split(".")[0] if ins.split() else "?"


def dump_if_asked(name: str, body: list[str]) -> None:
    """Print a loop body when the command line says `--dump NAME`."""
    if "--dump" in sys.argv and sys.argv[sys.argv.index("--dump") + 1] == name:
        print("\n".join(body))


def report(label: str, k, per: float, unit: str, dump_key: str, top: int = 18) -> None:
    """One line for a compiled kernel's main loop: registers, shared memory, instructions (also per `unit`, the
    loop holding `per` of them), its commonest opcodes; the body itself with `--dump dump_key`."""
    regs, body, ops = loop_summary(k)
    print(f"{label}: regs {regs}, shared {k.metadata.shared} B, loop {len(body)} instructions ({len(body) / per:.2f} "
          f"per {unit}): " + " ".join(f"{o}:{c}" for o, c in ops.most_common(top)))
    dump_if_asked(dump_key, body)


def loop_summary(k) -> tuple[str, list[str], collections.Counter]:
    """(registers, main loop body, its opcodes counted) of a compiled kernel."""
    body = loop_body(cuobjdump(k, "-sass"))
    return (re.search(r"REG:(\d+)", cuobjdump(k, "-res-usage")).group(1), body,
            collections.Counter(opcode(ln) for ln in body))


def main() -> None:
    variants = [(f"{name}" + ("" if scale_p is None else f" scale_p={scale_p}"), compile_split(mode, scale_p=scale_p),
                 _GPU_CONFIG[128][0] // 4)
                for mode, name, scale_p in ((0, "fp16", None), (1, "int8", True), (1, "int8", False),
                                            (2, "int4", True), (2, "int4", False))]
    variants.append(("int4 gluon", compile_mma(), 128 // 4))  # each warp runs its own 32 tokens per step
    for kv_mode, name in ((0, "fp16"), (1, "int8"), (2, "int4")):  # prefill: its two key-tile loops
        for unmasked, mode in ((False, 0), (True, 0), (True, 1), (True, 2)):
            sizes = sorted(len(b) for b in loops(cuobjdump(compile_prefill(kv_mode, unmasked, mode=mode), "-sass")))
            print(f"prefill {name} UNMASKED={unmasked} MODE={mode}: the longest loops {sizes[-2:]} instructions per "
                  "64 x 64 tile a warp")
    for name, k, tokens_per_warp in variants:  # the loop: one tile per warp
        report(name, k, tokens_per_warp, "token and KV head", name)


if __name__ == "__main__":
    main()
