"""Paged KV cache layout, online K/V quantization, and the fused write path (quantize + scatter).

Quantization (TurboMind's scheme, no calibration): asymmetric, per token and per KV head. For one
token t and head h, over the head dimension d in [0, D):

    zero  = fp16(min_d x[t, h, d])
    scale = fp16((max_d x - min_d x) / QMAX)            QMAX = 255 (int8) or 15 (int4)
    code  = clamp(floor((x - zero) * (1 / scale) + 0.5), 0, QMAX)     (1/scale = 0 when scale = 0)
    x_hat = code * scale + zero

All arithmetic is fp32 on the fp16-rounded scale and zero, so `fake_quantize_kv` (plain PyTorch),
`write_kv_ref` and the Triton `write_kv` produce identical codes.

Layout of one layer's pool (`PagedKV`), `B_s` = block size (tokens per block, a power of two >= 16;
an attention tile of BLOCK_N <= B_s tokens never straddles two blocks):

    k               [num_blocks, H_kv, B_s, W]      token-major rows
    v               [num_blocks, H_kv, W, B_s]      transposed within the block
    k_scales, v_scales  [num_blocks, H_kv, B_s, 2]  fp16 (scale, zero), int8 / int4 only

    W = D (fp16 / bf16 values, or int8 uint8 codes 0..255) or D / 2 (int4: two codes per byte)

Head-major blocks keep what one head reads contiguous. K rows are token-major and V is stored
transposed ([d, token]) so that, in both dots of attention (q . K^T and P @ V), the reduction axis
is the contiguous one in memory: the tensor-core operand is then read from shared memory in wide
words for 8- and 4-bit codes too (a d-major V would be gathered byte by byte). int4 byte j holds
code d = j in its low nibble and d = j + D/2 in its high nibble ("split halves"): the kernels work
on the two halves of the head dimension as two tiles, unpack with one mask or one shift, and need
no interleave. Codes become fp16 without an int->float instruction: the 16-bit pattern
`0x6400 | c` is exactly 1024 + c (KERNELS.md). The (scale, zero) pair of a token is read as one
32-bit word.

A token's slot is `block_id * B_s + offset`; `slot_mapping[t] < 0` skips token t (padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from lmq.kernels import next_pow2
from lmq.kernels.launch import DirectLaunch

from lmq.errors import ShapeError

KV_DTYPES = ("fp16", "bf16", "int8", "int4")
# kv_dtype -> kernel mode: 0 = float cache, 1 = int8 codes, 2 = int4 codes (two per byte)
KV_MODE = {"fp16": 0, "bf16": 0, "int8": 1, "int4": 2}
QMAX = {"int8": 255, "int4": 15}
_TORCH_FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def kv_bytes_per_token_head(kv_dtype: str, head_dim: int) -> int:
    """Bytes one token of one KV head takes in the cache, for K alone (codes + scale and zero)."""
    if kv_dtype in ("fp16", "bf16"):
        return 2 * head_dim
    if kv_dtype == "int8":
        return head_dim + 4
    if kv_dtype == "int4":
        return head_dim // 2 + 4
    raise ShapeError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")


@dataclass
class PagedKV:
    """One layer's paged K/V pool (layout in the module docstring)."""

    k: torch.Tensor  # [num_blocks, H_kv, B_s, D or D/2]
    v: torch.Tensor  # [num_blocks, H_kv, B_s, D or D/2]
    k_scales: torch.Tensor | None  # [num_blocks, H_kv, B_s, 2] fp16, int8/int4 only
    v_scales: torch.Tensor | None  # [num_blocks, H_kv, B_s, 2] fp16, int8/int4 only
    kv_dtype: str
    head_dim: int

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def allocate(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, kv_dtype: str,
                 device: torch.device | str = "cuda") -> PagedKV:
        if kv_dtype not in KV_DTYPES:
            raise ShapeError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ShapeError(f"block_size must be a power of two >= 16, got {block_size}")
        if head_dim % 2:
            raise ShapeError(f"head_dim must be even, got {head_dim}")
        width = head_dim // 2 if kv_dtype == "int4" else head_dim
        kshape = (num_blocks, num_kv_heads, block_size, width)  # [nb, H_kv, B_s, W]
        vshape = (num_blocks, num_kv_heads, width, block_size)  # [nb, H_kv, W, B_s]
        # Zeros, not torch.empty: a padded prefill row (the runner's prefill graphs) and the masked tail
        # of a key tile read slots nothing has written yet; their weight is 0, and 0 * NaN from stale
        # bytes (an fp16 scale made of old int8 codes) would poison the real rows' sums.
        if kv_dtype in _TORCH_FLOAT:
            dt = _TORCH_FLOAT[kv_dtype]
            return PagedKV(torch.zeros(kshape, dtype=dt, device=device),
                           torch.zeros(vshape, dtype=dt, device=device), None, None, kv_dtype, head_dim)
        sshape = (num_blocks, num_kv_heads, block_size, 2)  # [nb, H_kv, B_s, (scale, zero)]
        return PagedKV(
            torch.zeros(kshape, dtype=torch.uint8, device=device),
            torch.zeros(vshape, dtype=torch.uint8, device=device),
            torch.zeros(sshape, dtype=torch.float16, device=device),
            torch.zeros(sshape, dtype=torch.float16, device=device),
            kv_dtype, head_dim,
        )

    @staticmethod
    def bytes_per_block(block_size: int, num_kv_heads: int, head_dim: int, kv_dtype: str) -> int:
        """Bytes of one block of K and V together."""
        return 2 * block_size * num_kv_heads * kv_bytes_per_token_head(kv_dtype, head_dim)

    def validate(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ShapeError(f"kv_dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        width = self.head_dim // 2 if self.kv_dtype == "int4" else self.head_dim
        want = (self.num_blocks, self.num_kv_heads, self.block_size, width)
        want_v = (self.num_blocks, self.num_kv_heads, width, self.block_size)
        for name, t, w in (("k", self.k, want), ("v", self.v, want_v)):
            if tuple(t.shape) != w or not t.is_contiguous():
                raise ShapeError(f"cache {name} must be contiguous {w}, got {tuple(t.shape)}")
        if self.kv_dtype in _TORCH_FLOAT:
            if self.k.dtype != _TORCH_FLOAT[self.kv_dtype] or self.v.dtype != self.k.dtype:
                raise ShapeError(f"{self.kv_dtype} cache has dtype {self.k.dtype}")
        else:
            if self.k.dtype != torch.uint8 or self.v.dtype != torch.uint8:
                raise ShapeError(f"{self.kv_dtype} cache codes must be uint8, got {self.k.dtype}")
            for name, t in (("k_scales", self.k_scales), ("v_scales", self.v_scales)):
                if t is None or tuple(t.shape) != want[:3] + (2,) or t.dtype != torch.float16 \
                        or not t.is_contiguous():
                    raise ShapeError(f"{self.kv_dtype} cache needs contiguous fp16 {name} "
                                     f"{want[:3] + (2,)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ShapeError(f"block_size must be a power of two >= 16, got {self.block_size}")

    def scale_words(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) pairs as int32 words [nb, H_kv, B_s, 1] for the read kernels.

        A float cache has none; its codes tensors stand in (never read: the mode is constexpr).
        """
        if self.k_scales is None:
            return self.k, self.v
        return self.k_scales.view(torch.int32), self.v_scales.view(torch.int32)


# ---------------------------------------------------------------------------------------------
# Device helpers shared by the attention kernels (read path)
# ---------------------------------------------------------------------------------------------


# The GPU converts codes with a few PTX instructions per 32-bit word (prmt / lop3 / f16x2 math,
# the magic-number trick below); the interpreter cannot run inline assembly, so CPU runs take the
# plain-Triton branch (same values, exactly), and the GPU tests check the assembly branch.
DEQUANT_ASM = True

# int8: bytes b0..b3 -> fp16 pairs (1024 + b0, 1024 + b1), (1024 + b2, 1024 + b3) by placing 0x64
# above each byte (prmt). The attention kernels keep the 1024 offset (see `attend_tile`); the exact
# variant subtracts it with one f16x2 subtraction per pair. Signed bytes (two's complement, the int8 LM
# head's codes) go to offset binary first (xor 0x80: q + 128), and 1152 comes off.
def _bytes_to_f16_asm(signed: bool, exact: bool) -> str:
    """PTX for four bytes of $2 -> fp16 pairs $0 (bytes 0, 1) and $1 (bytes 2, 3), low byte in the low half."""
    src = "u" if signed else "$2"
    lines = [".reg .b32 u, m;", "xor.b32 u, $2, 0x80808080;" if signed else "",
             f"prmt.b32 $0, {src}, 0x64646464, 0x4140;", f"prmt.b32 $1, {src}, 0x64646464, 0x4342;"]
    if exact:
        lines += [f"mov.b32 m, {'0x64806480' if signed else '0x64006400'};", "sub.f16x2 $0, $0, m;",
                  "sub.f16x2 $1, $1, m;"]
    return "{\n" + "\n".join(ln for ln in lines if ln) + "\n}"


_ASM_INT8_RAW = tl.constexpr(_bytes_to_f16_asm(signed=False, exact=False))
_ASM_INT8 = tl.constexpr(_bytes_to_f16_asm(signed=False, exact=True))
_ASM_S8 = tl.constexpr(_bytes_to_f16_asm(signed=True, exact=True))

# int4: bytes b0..b3 -> low nibbles ($0, $1) and high nibbles ($2, $3) as fp16 pairs. Spread the
# bytes to one per 16-bit lane (prmt), then (x & 0x000F000F) | 0x6400.. = 1024 + lo and
# (x & 0x00F000F0) | 0x6400.. = 1024 + 16 hi (lop3): that is the raw form; the exact one then
# subtracts / scales back in f16x2.
_ASM_INT4_RAW = tl.constexpr("""{
.reg .b32 x, y;
prmt.b32 x, $4, 0, 0x4140;
prmt.b32 y, $4, 0, 0x4342;
lop3.b32 $0, x, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, y, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, x, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $3, y, 0x00F000F0, 0x64006400, 0xEA;
}""")
_ASM_INT4 = tl.constexpr("""{
.reg .b32 x, y, m, s, z;
mov.b32 m, 0x64006400;
mov.b32 s, 0x2C002C00;
mov.b32 z, 0xD400D400;
prmt.b32 x, $4, 0, 0x4140;
prmt.b32 y, $4, 0, 0x4342;
lop3.b32 $0, x, 0x000F000F, m, 0xEA;
lop3.b32 $1, y, 0x000F000F, m, 0xEA;
lop3.b32 $2, x, 0x00F000F0, m, 0xEA;
lop3.b32 $3, y, 0x00F000F0, m, 0xEA;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
fma.rn.f16x2 $2, $2, s, z;
fma.rn.f16x2 $3, $3, s, z;
}""")


@triton.jit
def codes_to_f16(c, ASM: tl.constexpr, RAW: tl.constexpr):
    """uint8 codes (0..255) -> fp16 without int->float: 0x6400 | c is 1024 + c (RAW), minus 1024 exact."""
    if ASM:
        if RAW:
            return tl.inline_asm_elementwise(_ASM_INT8_RAW, "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(_ASM_INT8, "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
    x = (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    if RAW:
        return x
    return x - 1024.0


@triton.jit
def signed_codes_to_f16(w):
    """int8 codes (-128..127) -> fp16, exactly, without int->float instructions (GPU only: inline assembly).
    Triton's own int8 -> fp16 takes one I2F per code, which the SM runs at 16 a clock (the int8 LM head's kernel)."""
    return tl.inline_asm_elementwise(_ASM_S8, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def unpack_int4_f16(b, ASM: tl.constexpr, RAW: tl.constexpr):
    """Packed int4 bytes -> (low-nibble, high-nibble) codes as fp16, same shape each: exact codes, or
    RAW (1024 + lo, 1024 + 16 hi), the bit patterns before any arithmetic."""
    if ASM:
        if RAW:
            lo, hi = tl.inline_asm_elementwise(_ASM_INT4_RAW, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_ASM_INT4, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
    else:
        b16 = b.to(tl.uint16)
        lo = ((b16 & 0xF) | 0x6400).to(tl.float16, bitcast=True)
        if RAW:
            hi = ((b16 & 0xF0) | 0x6400).to(tl.float16, bitcast=True)
        else:
            lo = lo - 1024.0
            hi = ((b16 >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return lo, hi


@triton.jit
def load_k_halves(ptr, krow, offs_dh, mask_n, HALF: tl.constexpr, KV_MODE: tl.constexpr, ASM: tl.constexpr,
                  RAW: tl.constexpr):
    """K tile of BLOCK_N token rows as its two head-dim halves, [BLOCK_N, BLOCK_DH] each.

    Float cache: the values. int8/int4: the codes as fp16 (exact, or RAW as in `unpack_int4_f16`;
    scale/zero not applied). `krow` [BLOCK_N] is each row's element offset; masked rows and padded
    columns read code 0.
    """
    mask = mask_n[:, None] & (offs_dh[None, :] < HALF)
    ptrs = ptr + krow[:, None] + offs_dh[None, :]
    if KV_MODE == 2:
        lo, hi = unpack_int4_f16(tl.load(ptrs, mask=mask, other=0), ASM, RAW)
    else:
        lo = tl.load(ptrs, mask=mask, other=0)
        hi = tl.load(ptrs + HALF, mask=mask, other=0)
        if KV_MODE == 1:
            lo = codes_to_f16(lo, ASM, RAW)
            hi = codes_to_f16(hi, ASM, RAW)
    return lo, hi


@triton.jit
def load_vt_halves(ptr, vcol, offs_dh, mask_n, HALF: tl.constexpr, PAGE: tl.constexpr, RUN: tl.constexpr,
                   KV_MODE: tl.constexpr, ASM: tl.constexpr, RAW: tl.constexpr):
    """V^T tile (blocks store V transposed) as two halves [BLOCK_DH, BLOCK_N]; `vcol` [BLOCK_N] is
    each token's element offset at d = 0. Codes as in `load_k_halves`.

    A tile is RUN = BLOCK_N consecutive slots of one block starting at a multiple of RUN, which
    the hints tell the compiler, and the load is not masked along the tokens, so it is wide.
    That is safe: a masked token's block id reads as block 0, so the address is inside the pool;
    its garbage is zeroed (float cache) or multiplied by a zero weight (quantized cache: the
    token's probability times its scale).
    """
    mask = (offs_dh[:, None] < HALF) & (mask_n[None, :] | True)
    off = vcol[None, :] + offs_dh[:, None] * PAGE
    off = tl.max_contiguous(tl.multiple_of(off, [1, RUN]), [1, RUN])
    if KV_MODE == 2:
        lo, hi = unpack_int4_f16(tl.load(ptr + off, mask=mask, other=0), ASM, RAW)
    else:
        lo = tl.load(ptr + off, mask=mask, other=0)
        hi = tl.load(ptr + off + HALF * PAGE, mask=mask, other=0)
        if KV_MODE == 1:
            lo = codes_to_f16(lo, ASM, RAW)
            hi = codes_to_f16(hi, ASM, RAW)
        else:
            lo = tl.where(mask_n[None, :], lo, 0.0)
            hi = tl.where(mask_n[None, :], hi, 0.0)
    return lo, hi


@triton.jit
def split_scale_zero(w):
    """int32 words [N] holding fp16 (scale, zero) pairs -> (scale, zero) fp16 [N] each."""
    scale = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    zero = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return scale, zero


@triton.jit
def load_tile_meta(bt_row, n0, end, hkv, ks_ptr, vs_ptr, stride_cb, stride_ch, stride_ct,
                   stride_vb, stride_vh, stride_sb, stride_sh,
                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, KV_MODE: tl.constexpr, OFF64: tl.constexpr,
                   FULL: tl.constexpr = False):
    """Tokens n0 .. n0 + BLOCK_N (one tile, inside one block: BLOCK_N divides PAGE and n0) ->
    (mask_n, krow, vcol, k_sz, v_sz): validity, K row and V^T column element offsets, and the
    (scale, zero) words. One block id per tile, so the offsets are affine in the token index.
    Offsets are int32 unless the pool has 2^31 elements or more (OFF64): half the address math.
    FULL: the caller knows the whole tile is before `end` (mask_n all true, a constant the loads drop).
    """
    offs = tl.arange(0, BLOCK_N)
    if FULL:
        mask_n = tl.full([BLOCK_N], 1, tl.int1)
        page = tl.load(bt_row + n0 // PAGE)
    else:
        mask_n = n0 + offs < end
        page = tl.load(bt_row + n0 // PAGE, mask=n0 < end, other=0)
    if OFF64:
        page = page.to(tl.int64)
    slot = n0 % PAGE + offs  # [BLOCK_N]
    krow = page * stride_cb + hkv * stride_ch + slot * stride_ct
    vcol = page * stride_vb + hkv * stride_vh + slot
    if KV_MODE != 0:
        srow = page * stride_sb + hkv * stride_sh + slot
        k_sz = tl.load(ks_ptr + srow, mask=mask_n, other=0)
        v_sz = tl.load(vs_ptr + srow, mask=mask_n, other=0)
    else:
        k_sz = slot
        v_sz = slot
    return mask_n, krow, vcol, k_sz, v_sz


# ---------------------------------------------------------------------------------------------
# Write path: quantize + scatter, one program per token, all KV heads
# ---------------------------------------------------------------------------------------------


@triton.jit
def _quantize_rows(x_lo, x_hi, mask, QMAX: tl.constexpr):
    """Per-row asymmetric quantization of the two halves [BLOCK_H, BLOCK_DH] (fp32 in)."""
    big = 3.0e38
    mn = tl.minimum(tl.min(tl.where(mask, x_lo, big), axis=1), tl.min(tl.where(mask, x_hi, big), axis=1))
    mx = tl.maximum(tl.max(tl.where(mask, x_lo, -big), axis=1),
                    tl.max(tl.where(mask, x_hi, -big), axis=1))
    valid = mx >= mn  # padded rows (heads past H_kv) saw no element
    mn = tl.where(valid, mn, 0.0)
    mx = tl.where(valid, mx, 0.0)
    # round scale and zero to their fp16 storage first: the codes are computed against them;
    # div_rn: correctly rounded like PyTorch (plain `/` is approximate on the GPU)
    rng = mx - mn
    scale = tl.math.div_rn(rng, tl.full(rng.shape, QMAX, tl.float32)).to(tl.float16).to(tl.float32)
    zero = mn.to(tl.float16).to(tl.float32)  # [BLOCK_H]
    safe = tl.where(scale > 0, scale, 1.0)
    inv = tl.where(scale > 0, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)
    q_lo = tl.floor((x_lo - zero[:, None]) * inv[:, None] + 0.5)
    q_hi = tl.floor((x_hi - zero[:, None]) * inv[:, None] + 0.5)
    q_lo = tl.minimum(tl.maximum(q_lo, 0.0), QMAX).to(tl.uint8)
    q_hi = tl.minimum(tl.maximum(q_hi, 0.0), QMAX).to(tl.uint8)
    return q_lo, q_hi, scale, zero


@triton.jit
def _store_one(x_ptr, c_ptr, s_ptr, t, slot_page, slot_off, stride_xt, stride_xh,
               stride_cb, stride_ch, stride_ct, stride_cd, stride_sb, stride_sh, stride_st,
               offs_h, offs_dh, H_KV, HALF: tl.constexpr, KV_MODE: tl.constexpr, QMAX: tl.constexpr,
               BACK: tl.constexpr):
    """Quantize one token's [H_kv, D] and store it; element (h, d) of the slot lands at
    page * stride_cb + h * stride_ch + off * stride_ct + d * stride_cd (K: token-major, V: transposed).
    BACK (int8/int4): the input row is then overwritten with what the cache holds, dequantized (c s + z in fp32,
    rounded to the input's dtype), for prefill attention to read the chunk's own keys and values from it."""
    mask = (offs_h[:, None] < H_KV) & (offs_dh[None, :] < HALF)
    x_ptrs = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_dh[None, :]
    x_lo = tl.load(x_ptrs, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_DH]
    x_hi = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
    c_lo = c_ptr + slot_page * stride_cb + offs_h[:, None] * stride_ch + slot_off * stride_ct \
        + offs_dh[None, :] * stride_cd
    if KV_MODE == 0:
        tl.store(c_lo, x_lo.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(c_lo + HALF * stride_cd, x_hi.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        q_lo, q_hi, scale, zero = _quantize_rows(x_lo.to(tl.float32), x_hi.to(tl.float32), mask, QMAX)
        if KV_MODE == 1:
            tl.store(c_lo, q_lo, mask=mask)
            tl.store(c_lo + HALF * stride_cd, q_hi, mask=mask)
        else:
            tl.store(c_lo, q_lo | (q_hi << 4), mask=mask)
        s_row = s_ptr + slot_page * stride_sb + offs_h * stride_sh + slot_off * stride_st
        hmask = offs_h < H_KV
        tl.store(s_row, scale.to(tl.float16), mask=hmask)
        tl.store(s_row + 1, zero.to(tl.float16), mask=hmask)
        if BACK:
            out_ty = x_ptr.dtype.element_ty
            tl.store(x_ptrs, (q_lo.to(tl.float32) * scale[:, None] + zero[:, None]).to(out_ty), mask=mask)
            tl.store(x_ptrs + HALF, (q_hi.to(tl.float32) * scale[:, None] + zero[:, None]).to(out_ty), mask=mask)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
    stride_xt, stride_xh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_sb, stride_sh, stride_st,
    H_KV, BLOCK_SIZE: tl.constexpr, WIDTH: tl.constexpr,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DH: tl.constexpr,
    KV_MODE: tl.constexpr, QMAX: tl.constexpr, BACK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        page = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_dh = tl.arange(0, BLOCK_DH)
        # K and V in one program: the fused write path. K rows [B_s, W]; V transposed [W, B_s].
        _store_one(k_ptr, kc_ptr, ks_ptr, t, page, off, stride_xt, stride_xh, stride_cb, stride_ch,
                   WIDTH, 1, stride_sb, stride_sh, stride_st, offs_h, offs_dh, H_KV, HALF, KV_MODE, QMAX, BACK)
        _store_one(v_ptr, vc_ptr, vs_ptr, t, page, off, stride_vt, stride_vh, stride_cb, stride_ch,
                   1, BLOCK_SIZE, stride_sb, stride_sh, stride_st, offs_h, offs_dh, H_KV, HALF, KV_MODE, QMAX, BACK)


_WRITE_KV = DirectLaunch(_write_kv_kernel)  # lmq.kernels.launch


def _check_new_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedKV, slot_mapping: torch.Tensor) -> None:
    cache.validate()
    if k.dim() != 3 or k.shape != v.shape:
        raise ShapeError(f"k and v must both be [T, H_kv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    T, H, D = k.shape
    if H != cache.num_kv_heads or D != cache.head_dim:
        raise ShapeError(f"new K/V have {H} heads x {D} dims, the cache {cache.num_kv_heads} x "
                         f"{cache.head_dim}")
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32) or v.dtype != k.dtype:
        raise ShapeError(f"k/v must be fp16, bf16 or fp32 (same for both), got {k.dtype}, {v.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ShapeError("k and v must be contiguous along the head dimension")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"slot_mapping must be int32/int64 [{T}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    for name, t in (("v", v), ("k cache", cache.k), ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ShapeError(f"{name} is on {t.device}, k on {k.device}")


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedKV, slot_mapping: torch.Tensor,
             write_back: bool = False) -> None:
    """Quantize new K/V [T, H_kv, D] (after RoPE) and scatter them into `cache` at `slot_mapping`.

    write_back: an int8 / int4 cache's new rows are also written back into k and v as the cache now holds them
    (`fake_quantize_kv` of each row: codes times scale plus zero in fp32, rounded to k's dtype), so that prefill
    attention can take the chunk's own keys and values from k and v in their float form (`prefill_attention`'s
    `k_new` / `v_new`) and still attend what later steps read from the cache (up to that one rounding to k's
    dtype: at most 2^-11 relative in fp16, 2^-8 in bf16). Rows with slot -1 are left as they were. A float cache
    holds k and v as given (in the cache's dtype): nothing is written back."""
    _check_new_kv(k, v, cache, slot_mapping)
    T, H, D = k.shape
    if T == 0:
        return
    ks, vs = (cache.k, cache.v) if cache.k_scales is None else (cache.k_scales, cache.v_scales)
    mode = KV_MODE[cache.kv_dtype]
    half = D // 2
    _WRITE_KV[(T,)](
        k, v, cache.k, cache.v, ks, vs, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.k.stride(0), cache.k.stride(1),
        ks.stride(0), ks.stride(1), ks.stride(2),
        H, BLOCK_SIZE=cache.block_size, WIDTH=cache.k.shape[3],
        HALF=half, BLOCK_H=next_pow2(H), BLOCK_DH=next_pow2(half),
        KV_MODE=mode, QMAX=QMAX.get(cache.kv_dtype, 1), BACK=write_back and mode != 0, num_warps=4,
    )


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch twins: the numeric definition
# ---------------------------------------------------------------------------------------------


def quantize_kv_ref(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes uint8 [..., D] in 0..QMAX, scale fp16 [...], zero fp16 [...])."""
    qmax = QMAX[kv_dtype]
    xf = x.float()
    mn = xf.amin(dim=-1)
    mx = xf.amax(dim=-1)
    scale16 = ((mx - mn) / qmax).half()
    zero16 = mn.half()
    scale = scale16.float()
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.floor((xf - zero16.float()[..., None]) * inv[..., None] + 0.5).clamp_(0, qmax)
    return codes.to(torch.uint8), scale16, zero16


def dequantize_kv_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes [..., D] with fp16 scale/zero [...] -> fp32 [..., D]."""
    return codes.float() * scale.float()[..., None] + zero.float()[..., None]


def fake_quantize_kv(x: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """K or V [..., T, H, D] through the cache's quantize->dequantize; same shape and dtype as x.

    fp16/bf16 round to that dtype (what a float cache stores); int8/int4 apply the per-token,
    per-head asymmetric scheme above with the exact arithmetic of the write kernel.
    """
    if kv_dtype in _TORCH_FLOAT:
        return x.to(_TORCH_FLOAT[kv_dtype]).to(x.dtype)
    if kv_dtype not in QMAX:
        raise ShapeError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    codes, scale, zero = quantize_kv_ref(x, kv_dtype)
    return dequantize_kv_ref(codes, scale, zero).to(x.dtype)


def pack_int4_ref(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., D] (0..15) -> bytes [..., D/2]: low nibble d = j, high nibble d = j + D/2."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_ref`: bytes [..., D/2] -> codes [..., D]."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, cache: PagedKV, slot_mapping: torch.Tensor,
                 write_back: bool = False) -> None:
    """Plain-PyTorch twin of `write_kv` (same layout, same codes, the same write-back)."""
    _check_new_kv(k, v, cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    page, off = slots // cache.block_size, slots % cache.block_size
    for x, c, s, is_v in ((k[keep], cache.k, cache.k_scales, False), (v[keep], cache.v, cache.v_scales, True)):
        if cache.kv_dtype in _TORCH_FLOAT:
            codes = x.to(c.dtype)  # [n, H_kv, D]
        else:
            codes, scale, zero = quantize_kv_ref(x, cache.kv_dtype)  # [n, H_kv, D], [n, H_kv]
            if write_back:
                (v if is_v else k)[keep] = dequantize_kv_ref(codes, scale, zero).to(k.dtype)
            if cache.kv_dtype == "int4":
                codes = pack_int4_ref(codes)  # [n, H_kv, D/2]
            s[page, :, off] = torch.stack([scale, zero], dim=-1)
        if is_v:
            c[page, :, :, off] = codes  # V block is [H_kv, W, B_s]
        else:
            c[page, :, off] = codes


def gather_kv_ref(cache: PagedKV, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's dequantized K and V, fp32 [length, H_kv, D], read through its block table."""
    n_blocks = -(-length // cache.block_size)
    pages = block_table[:n_blocks].long()
    out = []
    for c, s in ((cache.k, cache.k_scales), (cache.v.transpose(2, 3), cache.v_scales)):
        rows = c[pages].transpose(1, 2).reshape(n_blocks * cache.block_size, cache.num_kv_heads, -1)
        if cache.kv_dtype in _TORCH_FLOAT:
            x = rows.float()
        else:
            sz = s[pages].transpose(1, 2).reshape(n_blocks * cache.block_size, cache.num_kv_heads, 2)
            codes = unpack_int4_ref(rows) if cache.kv_dtype == "int4" else rows
            x = dequantize_kv_ref(codes, sz[..., 0], sz[..., 1])
        out.append(x[:length])
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# The tile step both attention kernels share: dequantize in registers, scores, online softmax
# ---------------------------------------------------------------------------------------------


@triton.jit
def prepare_query(q_lo, q_hi, KV_MODE: tl.constexpr, RAW: tl.constexpr):
    """Query halves [BLOCK_M, BLOCK_DH] -> (q_lo, q_hi, qsum, qoff) for `attend_tile`.

    qsum [BLOCK_M] fp32 = sum_d q (the term of the keys' zeros). With RAW codes (int4 high nibbles
    read 1024 + 16 c) q_hi enters the score dot divided by 16 (exact, a power of two), and qoff
    [BLOCK_M] fp32 is what the codes' offsets add to the dot: 1024 * the sum of the operand rows.
    """
    qsum = tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1)
    if RAW:
        if KV_MODE == 2:
            q_hi = (q_hi.to(tl.float32) * 0.0625).to(q_lo.dtype)
        qoff = 1024.0 * (tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1))
    else:
        qoff = qsum * 0.0
    return q_lo, q_hi, qsum, qoff


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def softmax_step(qk, m_i, valid, qk_scale, MASKED: tl.constexpr):
    """Scores [BLOCK_M, BLOCK_N] fp32 (masked by `valid` unless MASKED is False) -> (new running max, the old
    state's rescale factor, the tile's probabilities), log2 domain."""
    if MASKED:
        qk = tl.where(valid, qk * qk_scale, float("-inf"))
    else:
        qk = qk * qk_scale
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    return m_new, tl.math.exp2(m_i - m_new), tl.math.exp2(qk - m_new[:, None])


@triton.jit
def attend_tile(q_lo, q_hi, qsum, qoff, m_i, l_i, acc_lo, acc_hi, kc_ptr, vc_ptr, krow, vcol, k_sz, v_sz,
                offs_dh, mask_n, valid, qk_scale,
                HALF: tl.constexpr, PAGE: tl.constexpr, RUN: tl.constexpr, KV_MODE: tl.constexpr,
                ASM: tl.constexpr, RAW: tl.constexpr, SCALE_P: tl.constexpr, MASKED: tl.constexpr = True):
    """One BLOCK_N tile of keys/values for BLOCK_M query rows, flash-attention style (log2 domain).

    q_lo/q_hi, qsum, qoff from `prepare_query`; m_i, l_i [BLOCK_M] fp32 running max / sum;
    acc_lo/acc_hi [BLOCK_M, BLOCK_DH] fp32; krow/vcol/k_sz/v_sz from `load_tile_meta`; valid
    [BLOCK_M, BLOCK_N] (MASKED False: every score of the tile is valid, `valid` is not read). Quantized keys
    are never dequantized element by element: the codes only
    become fp16 (RAW: the bit patterns 1024 + c, no arithmetic at all) and the per-token scale s
    and zero z act on the small score tile, q . (c s + z) = s (q . c) + z sum(q), with
    q . c = the dot - qoff (RAW). Values, two ways (`scale_probs` picks, measured per KV dtype):
      SCALE_P   sum_t p_t (c_t s_t + z_t) = (p s) @ c + sum_t p_t z_t: the scales move onto the
                probabilities, and (p s) @ c made of RAW codes carries 1024 sum_t (p s)_t (int4 high
                nibbles: 16 x the codes), taken off per row;
      otherwise c s + z per element of the V tile (exact codes), then p @ V.
    """
    # -- scores
    k_lo, k_hi = load_k_halves(kc_ptr, krow, offs_dh, mask_n, HALF, KV_MODE, ASM, RAW)  # [BLOCK_N, BLOCK_DH]
    qk = tl.dot(q_lo, tl.trans(k_lo.to(q_lo.dtype)))
    qk += tl.dot(q_hi, tl.trans(k_hi.to(q_lo.dtype)))  # [BLOCK_M, BLOCK_N] fp32
    if KV_MODE != 0:
        k_s, k_z = split_scale_zero(k_sz)
        if RAW:
            qk = qk - qoff[:, None]
        qk = qk * k_s.to(tl.float32)[None, :] + qsum[:, None] * k_z.to(tl.float32)[None, :]
    m_new, alpha, p = softmax_step(qk, m_i, valid, qk_scale, MASKED)
    # -- values: V^T halves [BLOCK_DH, BLOCK_N]
    v_lo, v_hi = load_vt_halves(vc_ptr, vcol, offs_dh, mask_n, HALF, PAGE, RUN, KV_MODE, ASM, RAW and SCALE_P)
    if KV_MODE != 0 and SCALE_P:
        v_s, v_z = split_scale_zero(v_sz)
        ps = (p * v_s.to(tl.float32)[None, :]).to(q_lo.dtype)  # the scales move onto the probabilities
        # the row sums of p, p z and p s in one reduction (one exchange between warps, not three)
        p_sum, pz, ps_sum = tl.reduce((p, p * v_z.to(tl.float32)[None, :], ps.to(tl.float32)), 1, _add3)
        l_i = l_i * alpha + p_sum
        add_lo = pz
        add_hi = pz
        if RAW:
            add_lo = pz - 1024.0 * ps_sum
            add_hi = pz - (64.0 if KV_MODE == 2 else 1024.0) * ps_sum
        pv_lo = tl.dot(ps, tl.trans(v_lo.to(q_lo.dtype)))
        pv_hi = tl.dot(ps, tl.trans(v_hi.to(q_lo.dtype)))
        if RAW and KV_MODE == 2:
            pv_hi = pv_hi * 0.0625
        acc_lo = acc_lo * alpha[:, None] + pv_lo + add_lo[:, None]
        acc_hi = acc_hi * alpha[:, None] + pv_hi + add_hi[:, None]
    else:
        if KV_MODE != 0:  # per element, on exact codes
            v_s, v_z = split_scale_zero(v_sz)
            v_lo = v_lo * v_s[None, :] + v_z[None, :]
            v_hi = v_hi * v_s[None, :] + v_z[None, :]
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q_lo.dtype)
        acc_lo = acc_lo * alpha[:, None] + tl.dot(p, tl.trans(v_lo.to(q_lo.dtype)))
        acc_hi = acc_hi * alpha[:, None] + tl.dot(p, tl.trans(v_hi.to(q_lo.dtype)))
    return m_new, l_i, acc_lo, acc_hi


def raw_codes(q: torch.Tensor, cache: PagedKV) -> bool:
    """Whether the attention kernels keep quantized codes in their raw fp16 form (1024 + c): only
    with fp16 queries (1024 + c is not a bf16 number) over an int8 / int4 cache."""
    return q.dtype == torch.float16 and KV_MODE[cache.kv_dtype] != 0


# Values: scales on the probabilities (True) or per V element (False), by KV dtype. H100, decode,
# same run (docs/benchmarks.md): int8 B=64 L=16k 768 vs 796 us; int4 617 vs 583 us. For int4 the
# probability path is also less exact: relative error 6.2-6.7e-3 at 16k against 3.7-3.9e-4 per element
# (its raw low nibbles 1024 + c carry a large offset through the dot; int8's: 2.6-4.4e-4 either way).
_SCALE_PROBS = {"int8": True, "int4": False}


def scale_probs(cache: PagedKV) -> bool:
    """The SCALE_P choice of `attend_tile` for this cache (float caches: unused)."""
    return _SCALE_PROBS.get(cache.kv_dtype, False)


def use_asm(x: torch.Tensor) -> bool:
    """Whether the kernels take the inline-assembly conversions (on a CUDA device, when enabled)."""
    return DEQUANT_ASM and x.is_cuda and torch.version.hip is None


def needs_off64(cache: PagedKV) -> bool:
    """Whether element offsets into the pool can reach 2^31 (then the kernels compute in int64)."""
    return max(cache.k.numel(), cache.v.numel()) >= 2**31


def check_query_for_cache(q: torch.Tensor, cache: PagedKV, num_heads_dim: int = 1) -> int:
    """Validate q against the cache; returns the GQA group size (query heads per KV head)."""
    cache.validate()
    H, D = q.shape[num_heads_dim], q.shape[-1]
    if D != cache.head_dim:
        raise ShapeError(f"q head_dim {D} != cache head_dim {cache.head_dim}")
    if D % 2 or not 32 <= D <= 256:
        raise ShapeError(f"head_dim {D} is not supported: even, 32..256 (64, 80, 96, 128, 256 tested)")
    if H % cache.num_kv_heads:
        raise ShapeError(f"{H} query heads are not a multiple of {cache.num_kv_heads} KV heads")
    if cache.kv_dtype in _TORCH_FLOAT:
        if q.dtype != cache.k.dtype:
            raise ShapeError(f"q is {q.dtype} but the {cache.kv_dtype} cache holds {cache.k.dtype}")
    elif q.dtype not in (torch.float16, torch.bfloat16):
        raise ShapeError(f"q must be fp16 or bf16 over an {cache.kv_dtype} cache, got {q.dtype}")
    if q.stride(-1) != 1:
        raise ShapeError("q must be contiguous along the head dimension")
    if q.device != cache.k.device:
        raise ShapeError(f"q is on {q.device}, the cache on {cache.k.device}")
    return H // cache.num_kv_heads
