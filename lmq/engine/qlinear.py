"""The quantized linear: one `planes64` 4-bit weight and the choice of kernel by M.

    y[..., N] = x[..., K] @ w_hat[N, K]^T (+ bias),   M = number of rows of x

By M (the crossovers live in the arch's row of `lmq.kernels.w4a16_gemm.CONFIGS`):
    M <= gemv_max_m            -> W4A16 GEMV (CUDA cores, weights straight to registers, split-K),
                                  for weights of at least gemv_min_numel = N*K elements (from M = 2,
                                  at most gemv_rows_max_numel: several rows per program, `ROWS`)
    (M, N*K) in direct_rows    -> where the table has "direct" (sm90; fp16 activations), M <= max_m and
                                  N*K <= max_numel for one of its (max_m, max_numel) pairs:
                                  `w4a16_gemm_direct` (weights straight into wgmma's register operand;
                                  the decode kernel where it cannot run)
    M <= decode_max_m          -> decode: the W4A16 GEMM kernel with its decode config (split-K);
                                  weights of at least prefill_min_numel elements leave it from
                                  M = prefill_min_m
    M <  dequant_min_m         -> prefill, for weights of at least prefill_min_numel elements: where
                                  the table has "prefill_ws" (sm90), the warp-specialized kernel
                                  `w4a16_gemm_ws` (fp16 or bf16 activations; dequantize + cuBLAS
                                  where it cannot run); elsewhere the W4A16 kernel's prefill config
    otherwise                  -> dequantize to fp16/bf16, then cuBLAS (torch.matmul)
"""

from __future__ import annotations

import torch
from torch import nn

from lmq.errors import UnsupportedError
from lmq.kernels.w4a16_dequant import w4a16_dequant
from lmq.kernels.w4a16_gemm import CONFIGS, INTERPRET_CONFIG, w4a16_gemm
from lmq.kernels.w4a16_gemv import serves_rows, w4a16_gemv
from lmq.pack import planes64

try:
    from lmq.kernels import w4a16_gemm_ws
except ImportError:  # a Triton without Gluon (before 3.5): prefill takes dequantize + cuBLAS
    w4a16_gemm_ws = None
try:
    from lmq.kernels import w4a16_gemm_direct
except (ImportError, AttributeError):  # a Triton whose Gluon lacks what it uses: small M takes the decode kernel
    w4a16_gemm_direct = None

ARCHS = tuple(CONFIGS)


def arch_of_capability(major: int, minor: int) -> str:
    """Compute capability -> the lmq arch whose kernels run best on it ("sm86" for 8.7, ...)."""
    cc = major * 10 + minor
    if cc < 75:
        raise UnsupportedError(
            f"compute capability {major}.{minor} is below lmq's minimum 7.5 (Turing); use a newer GPU"
        )
    if cc >= 100:
        raise UnsupportedError(
            f"compute capability {major}.{minor} has no tuned lmq kernels yet; pack with --arch sm90 "
            f"and expect untuned speed"
        )
    for arch in ("sm90", "sm89", "sm86", "sm80", "sm75"):
        if cc >= int(arch[2:]):
            return arch
    raise AssertionError(cc)  # pragma: no cover


def local_arch(device: torch.device | str | None = None) -> str:
    """The arch of the local GPU; raises when there is none."""
    if not torch.cuda.is_available():
        raise UnsupportedError("no CUDA GPU is visible, so --arch auto has nothing to read; name one, e.g. --arch sm90")
    major, minor = torch.cuda.get_device_capability(device)
    return arch_of_capability(major, minor)


def engine_table(arch: str, deterministic: bool = False, dtype: torch.dtype = torch.float16,
                 group_size: int = 128) -> dict:
    """The arch's dispatch table (`CONFIGS`) bound at load for the model's activation `dtype` and `group_size`: where
    a GEMV program cannot serve several rows there (`w4a16_gemv.serves_rows`: bf16, groups of 32), M >= 2 would read
    the weights once per row, so the GEMV keeps M = 1 only; the direct kernel serves fp16 activations only.
    `deterministic`: its deterministic form, made from the table as it is now (no direct kernel): the W4A16
    GEMM kernel (decode and Triton prefill configs) adds its K splits in split order (`REDUCE` "ordered"; the decode
    config takes the table's "decode_ordered" entries, measured for that reduction, where it has them), the GEMV
    adds its splits as integers (`REDUCE` "fixed"), and the Hopper prefill GEMM keeps at most two partial sums per
    output (two fp16 additions into a zeroed output give the same bits in either order). Attention merges its splits
    in split order. So a step's output does not depend on which program finishes first: the same step repeats its
    bits. (A request's tokens can still depend on what it is batched with: the rows of a step pick the kernel and
    its split count.)"""
    table = CONFIGS[arch]
    if table.get("gemv_max_m", 0) > 1 and not serves_rows(dtype, group_size, table["gemv"]):
        table = {**table, "gemv_max_m": 1}
    if "direct" in table and dtype != torch.float16:
        # bf16's scaled conversion takes 4 instructions a weight (fp16's 2): on an H100 the direct kernel then trails
        # the decode kernel at M = 4 and 16 (qkv 11.5 against 10.7 us, down 21.3 against 18.0; NOTES-gemm.md run 47)
        table = {k: v for k, v in table.items() if k != "direct"}
    if not deterministic:
        return table
    det = {k: v for k, v in table.items() if k != "direct"}  # fp16 atomics in any order: the decode kernel instead
    det = {**det, "decode": {**table["decode"], "REDUCE": "ordered", **table.get("decode_ordered", {})},
           "prefill": {**table["prefill"], "REDUCE": "ordered"}, "gemv": {**table["gemv"], "REDUCE": "fixed"}}
    if "prefill_ws" in table:
        ws = table["prefill_ws"]
        det["prefill_ws"] = {**ws, "MAX_SPLIT": min(ws.get("MAX_SPLIT", 2), 2), "SPLIT_K": min(ws.get("SPLIT_K", 0), 2)}
    return det


def choose_path(M: int, table: dict, weight_numel: int = 0) -> str:
    """"gemv", "direct", "decode", "prefill" or "dequant" for `M` rows of a `weight_numel` = N*K weight."""
    if M <= table.get("gemv_max_m", 0) and weight_numel >= table.get("gemv_min_numel", 0) and (
            M == 1 or weight_numel <= table.get("gemv_rows_max_numel", weight_numel)):
        return "gemv"
    if "direct" in table and M > 0 and any(M <= max_m and weight_numel <= max_numel
                                           for max_m, max_numel in table["direct_rows"]):
        return "direct"
    large = weight_numel >= table.get("prefill_min_numel", 0)  # only these take the prefill kernel
    if M <= table["decode_max_m"] and not (large and M >= table.get("prefill_min_m", M + 1)):
        return "decode"
    if M < table["dequant_min_m"] and large:
        return "prefill"
    return "dequant"


def run_path(path: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int, table: dict, descs: dict | None = None) -> torch.Tensor:
    """One of the dispatcher's paths, whatever M is (the benchmark times each path through this).
    `descs`: a dict the weight's owner keeps for the prefill kernel's TMA descriptors."""
    if path == "gemv":
        return w4a16_gemv(x, qweight, scales, zeros, group_size, None if x.device.type == "cpu" else table["gemv"])
    # a Gluon kernel whose build failed once (warned then) is not asked again: no refusal raised on every call
    if path == "direct":
        if w4a16_gemm_direct is not None and not w4a16_gemm_direct.BUILD.failed:
            try:  # it checks what it can run before any work
                return w4a16_gemm_direct.w4a16_gemm_direct(x, qweight, scales, zeros, group_size, table["direct"])
            except UnsupportedError:
                pass  # not Hopper (the CPU interpreter included), or this Triton cannot build it (warned once)
        path = "decode"
    if path == "prefill" and "prefill_ws" in table:
        if w4a16_gemm_ws is not None and not w4a16_gemm_ws.BUILD.failed:
            try:  # it checks what it can run (`supported`) before any work: one check per call
                return w4a16_gemm_ws.w4a16_gemm_ws(x, qweight, scales, zeros, group_size, table["prefill_ws"], descs)
            except UnsupportedError:
                pass  # N % 16 != 0, not Hopper, or this Triton cannot build it (KernelUnavailable, warned once)
        path = "dequant"  # dequantize + cuBLAS beats the Triton prefill kernel
    if path == "dequant":
        return torch.matmul(x, w4a16_dequant(qweight, scales, zeros, group_size, x.dtype).t())
    cfg = table[path]
    return w4a16_gemm(x, qweight, scales, zeros, group_size, INTERPRET_CONFIG if x.device.type == "cpu" else cfg)


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int, table: dict, bias: torch.Tensor | None = None, descs: dict | None = None) -> torch.Tensor:
    """`x [..., K] -> [..., N]` through the kernel `table` picks for this M (`descs` as in `run_path`)."""
    K = qweight.shape[0] * planes64.CHUNK_K
    M = x.numel() // K if K else 0
    N = qweight.shape[1]
    y = run_path(choose_path(M, table, N * K), x, qweight, scales, zeros, group_size, table, descs)
    if bias is not None:
        y = y + bias
    return y


def qlinear_rope(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, table: dict, rope: tuple, descs: dict | None = None) -> tuple[torch.Tensor, bool]:
    """`qlinear` of a fused qkv weight whose RoPE the GEMV can fuse (the caller checked `can_fuse_rope`
    once, at load): when this M takes the GEMV path, the GEMV rotates q and k in its epilogue (`rope`
    as in `w4a16_gemv`). Returns the output and whether it was rotated; if not, the caller rotates."""
    K = qweight.shape[0] * planes64.CHUNK_K
    M = x.numel() // K if K else 0
    path = choose_path(M, table, qweight.shape[1] * K)
    if path == "gemv":
        return w4a16_gemv(x, qweight, scales, zeros, group_size, table["gemv"], rope=rope), True
    return run_path(path, x, qweight, scales, zeros, group_size, table, descs), False


class QLinear(nn.Module):
    """A `nn.Linear` replacement holding a packed 4-bit weight for one arch."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 arch: str, bias: torch.Tensor | None = None, table: dict | None = None,
                 dtype: torch.dtype = torch.float16):
        """`dtype`: the activations' dtype the arch's table is bound for (`engine_table`), unless `table` is given."""
        super().__init__()
        if arch not in CONFIGS:
            raise UnsupportedError(f"arch {arch!r} is not one of {ARCHS}")
        self.register_buffer("qweight", qweight)  # [K/64, N, 16] int16
        self.register_buffer("scales", scales)  # [K/G, N] fp16
        self.register_buffer("zeros", zeros)  # [K/G, N] uint8
        self.register_buffer("bias", bias)
        self.group_size = group_size
        self.arch = arch
        self.table = table or engine_table(arch, dtype=dtype, group_size=group_size)
        self.in_features = qweight.shape[0] * planes64.CHUNK_K
        self.out_features = qweight.shape[1]
        self.descs: dict = {}  # the prefill kernel's TMA descriptors of these weights (`run_path`)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() replace the buffers: drop the descriptors of the old ones (they hold
        # those tensors alive, and a move to the CPU would never come back to replace them)
        self.descs.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.qweight, self.scales, self.zeros, self.group_size, self.table, self.bias, self.descs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, arch={self.arch}"
