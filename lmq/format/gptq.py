"""The GPTQ tensor layout (AutoGPTQ / GPTQModel, `quant_method="gptq"`): reading 4-bit GPTQ linears.

For a linear with weight `[N, K]` (out x in), group size `G` (`-1` in the config means one group
per row, G = K) and 4 bits:

    qweight  int32   [K // 8, N]        packed along K: nibble i (bits 4i .. 4i+3) of qweight[r, n]
                                        holds the code of input channel k = 8 * r + i, output n
    qzeros   int32   [K // G, N // 8]   packed along N: nibble i of qzeros[g, c] holds the stored
                                        zero point of group g, output column n = 8 * c + i
    scales   float16 [K // G, N]
    g_idx    int32   [K]                the group of each input channel

Nibbles are in plain order (no interleave, unlike AWQ's (0, 2, 4, 6, 1, 3, 5, 7)); words are
int32 in two's complement. Dequantized weight, z the zero point:

    w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]

`checkpoint_format` says how z is stored:
    "gptq"     (v1, AutoGPTQ and GPTQModel's default export): the stored nibble is z - 1, so
               z = nibble + 1 (a symmetric checkpoint stores 7 for z = 8). z = 0 cannot be stored.
    "gptq_v2"  (GPTQModel's internal form): the nibble is z.
`sym` changes no tensor: a symmetric checkpoint simply holds z = 8 everywhere.

Act-order (`desc_act=True`) quantizes input channels in a permuted order, so g_idx is no longer
`k // G`: a group's channels are scattered over K. lmq's kernels read contiguous groups, so such a
g_idx is refused; act-order checkpoints whose g_idx is still `k // G` read like any other.

`pack_gptq` and `unpack_gptq` convert exactly between this and lmq's layout-free form
(`lmq.quant.rtn`): codes/zeros `[N, K]`/`[N, K // G]` uint8 and scales `[N, K // G]` fp16, the
same form `lmq.format.awq_gemm.unpack` returns.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmq.errors import CheckpointError, ShapeError, UnsupportedError
from lmq.quant.rtn import QuantizedWeight

BITS = 4
PACK = 32 // BITS  # 4-bit values per int32 word
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# Stored zero = zero - ZERO_OFFSET[checkpoint_format].
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
ACT_ORDER_FIX = ("re-quantize it without act-order (desc_act=False), or quantize the float model with "
                 "`lmq quantize`")


def trivial_g_idx(K: int, group_size: int) -> torch.Tensor:
    """The g_idx of a checkpoint without act-order: input channel k is in group k // G."""
    return torch.arange(K, dtype=torch.int32) // group_size  # [K]


def _check_bits_format(bits: int, checkpoint_format: str, name: str) -> None:
    if bits != BITS:
        raise UnsupportedError(f"{name}: {bits}-bit GPTQ is not readable; lmq reads 4-bit GPTQ checkpoints")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UnsupportedError(
            f"{name}: GPTQ checkpoint_format {checkpoint_format!r} is not readable; lmq reads "
            f"{' and '.join(map(repr, CHECKPOINT_FORMATS))} (re-save it in the gptq format with GPTQModel)"
        )


def _pack_words(v: torch.Tensor) -> torch.Tensor:
    """`v [..., 8]` ints 0..15 -> int32 `[...]`, element i in nibble i."""
    v = v.to(torch.int64)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i in range(PACK):
        words |= v[..., i] << (BITS * i)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement, as stored
    return words.to(torch.int32)


def _unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 `[...]` -> uint8 `[..., 8]`, nibble i -> element i."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(w >> (BITS * i)) & 0xF for i in range(PACK)], dim=-1).to(torch.uint8)


def pack_gptq(q: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Layout-free 4-bit weight -> `{"qweight", "qzeros", "scales", "g_idx"}` in the GPTQ layout."""
    _check_bits_format(q.bits, checkpoint_format, "pack_gptq")
    N, K = q.codes.shape
    G = q.group_size
    if K % PACK != 0 or N % PACK != 0:
        raise ShapeError(f"the GPTQ layout needs in and out features divisible by {PACK}, got N={N}, K={K}")
    stored = q.zeros.to(torch.int16).cpu() - ZERO_OFFSET[checkpoint_format]  # [N, K/G]
    if int(stored.min()) < 0:
        raise ShapeError(
            "a zero point of 0 cannot be stored in the GPTQ v1 format (it stores zero - 1); write "
            "checkpoint_format='gptq_v2'"
        )
    codes = q.codes.cpu().t().reshape(K // PACK, PACK, N)  # [K/8, 8, N]
    return {
        "qweight": _pack_words(codes.permute(0, 2, 1)),  # [K/8, N]
        "qzeros": _pack_words(stored.t().reshape(K // G, N // PACK, PACK)),  # [K/G, N/8]
        "scales": q.scales.t().contiguous().to(torch.float16).cpu(),  # [K/G, N]
        "g_idx": trivial_g_idx(K, G),  # [K]
    }


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
                bits: int, group_size: int, checkpoint_format: str = "gptq", name: str = "linear",
                desc_act: bool = False) -> QuantizedWeight:
    """GPTQ tensors -> layout-free quantized weight; checks dtypes, shapes and g_idx.

    `g_idx=None` (a checkpoint without the tensor) means the trivial `k // G`. A g_idx that is not
    trivial (act-order) raises `UnsupportedError` naming the layer and the fix.
    """
    _check_bits_format(bits, checkpoint_format, name)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(
            f"{name}: qweight/qzeros must be int32 (GPTQ layout, pack_dtype int32), got {qweight.dtype}/{qzeros.dtype}"
        )
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or not scales.is_floating_point():
        raise CheckpointError(
            f"{name}: GPTQ tensors must be 2-D with floating scales, got qweight {tuple(qweight.shape)}, "
            f"qzeros {tuple(qzeros.shape)}, scales {scales.dtype} {tuple(scales.shape)}"
        )
    K8, N = qweight.shape
    K = K8 * PACK
    G = K if group_size == -1 else group_size
    if G <= 0 or K % G != 0:
        raise CheckpointError(f"{name}: group size {group_size} does not divide K={K}")
    if N % PACK != 0 or tuple(qzeros.shape) != (K // G, N // PACK) or tuple(scales.shape) != (K // G, N):
        raise CheckpointError(
            f"{name}: tensor shapes disagree with group size {group_size}: qweight {tuple(qweight.shape)} "
            f"([K/8, N]), qzeros {tuple(qzeros.shape)} (expected {(K // G, N // PACK)}), scales "
            f"{tuple(scales.shape)} (expected {(K // G, N)})"
        )
    if g_idx is not None:
        if tuple(g_idx.shape) != (K,) or g_idx.is_floating_point():
            raise CheckpointError(f"{name}: g_idx must be integer [K={K}], got {g_idx.dtype} {tuple(g_idx.shape)}")
        if not torch.equal(g_idx.cpu().to(torch.int32), trivial_g_idx(K, G)):
            raise UnsupportedError(
                f"{name}: g_idx is not k // {G}: the checkpoint was quantized with act-order (desc_act="
                f"{desc_act} in its quantization_config), so its groups are scattered over the input channels, "
                f"which lmq's kernels cannot read; {ACT_ORDER_FIX}"
            )
    codes = _unpack_words(qweight.cpu())  # [K/8, N, 8]
    codes = codes.permute(0, 2, 1).reshape(K, N)  # [K, N]
    stored = _unpack_words(qzeros.cpu()).reshape(K // G, N)  # [K/G, N]
    if checkpoint_format == "gptq" and bool((stored == 0xF).any()):
        raise CheckpointError(
            f"{name}: a GPTQ v1 zero nibble is 15, i.e. zero point 16, outside 4 bits: the checkpoint is "
            "corrupt, or it stores zero points as they are; if so, set checkpoint_format to 'gptq_v2' in "
            "config.json's quantization_config"
        )
    zeros = stored + ZERO_OFFSET[checkpoint_format]  # [K/G, N]
    return QuantizedWeight(
        codes=codes.t().contiguous(),  # [N, K]
        scales=scales.cpu().t().contiguous().to(torch.float16),  # [N, K/G]
        zeros=zeros.t().contiguous(),  # [N, K/G]
        bits=BITS,
        group_size=G,
    )
