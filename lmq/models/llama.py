"""The reference Llama-family decoder in plain PyTorch: the function every lmq path must compute.

Used by the AWQ search (block outputs), `lmq eval` (perplexity, KL divergence) and tests. It reads
weights from a dict of dense tensors named as in Hugging Face checkpoints; a quantized checkpoint is
dequantized into that dict by `lmq.format.checkpoint`. No transformers modeling code is involved,
so the same numerics hold on every transformers version.

Shapes: B batch, T tokens, H query heads, Hkv key/value heads, D head dim, C hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lmq.errors import UnsupportedError
from lmq.models.arch import Arch, arch_for


@dataclass
class ModelConfig:
    """The numbers of a Hugging Face `config.json` that the decoder needs."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    tie_word_embeddings: bool
    max_position_embeddings: int
    arch: Arch = field(repr=False)
    sliding_window: Optional[int] = None  # Mistral v0.1: attention sees at most this many tokens

    @property
    def context(self) -> int:
        """The most tokens the model attends over: its max_position_embeddings, capped by a sliding window (lmq's
        kernels attend to the whole context, so a window is a limit, not a mask)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        arch = arch_for(cfg.get("model_type"))
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key) and not (key == "attention_bias" and arch.qkv_bias):
                raise UnsupportedError(f"{cfg.get('model_type')} config sets {key}=true, which lmq does not support "
                                       "yet (its biases would be dropped)")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = dict(rope) if rope and rope.get("rope_type", rope.get("type", "default")) != "default" else None
        return cls(
            model_type=cfg["model_type"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            arch=arch,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies `[D/2]` (fp32), with Llama-3 / linear rope scaling where configured; the
    one definition is `lmq.kernels.rope.rope_inv_freq`, which the runtime uses too (it refuses other
    scaling types with `UnsupportedError`)."""
    from lmq.kernels.rope import rope_inv_freq as inv_freq_for

    return inv_freq_for(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[T, D]` for integer `positions [T]` (Hugging Face's half-rotation convention)."""
    inv_freq = rope_inv_freq(cfg).to(positions.device)  # [D/2]
    ang = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([ang, ang], dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, T, H, D]`; cos/sin `[T, D]`."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, returned in x's dtype (as transformers does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def linear(x: torch.Tensor, lw: dict, name: str) -> torch.Tensor:
    return F.linear(x, lw[f"{name}.weight"], lw.get(f"{name}.bias"))


# A hook that maps K or V `[B, T, Hkv, D]` to what the KV cache would give back (e.g. int8 round trip).
KVTransform = Callable[[torch.Tensor], torch.Tensor]


def attention_heads(lw: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig,
                    kv_transform: Optional[KVTransform] = None) -> torch.Tensor:
    """Causal self-attention before o_proj; `x [B, T, C]` is the normed input. Returns `[B, T, H*D]`."""
    B, T, _ = x.shape
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, lw, "self_attn.q_proj").view(B, T, H, D)
    k = linear(x, lw, "self_attn.k_proj").view(B, T, Hkv, D)
    v = linear(x, lw, "self_attn.v_proj").view(B, T, Hkv, D)
    if cfg.arch.qk_norm:
        q = rms_norm(q, lw["self_attn.q_norm.weight"], cfg.rms_eps)
        k = rms_norm(k, lw["self_attn.k_norm.weight"], cfg.rms_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_transform is not None:
        k, v = kv_transform(k), kv_transform(v)
    return attention_core(q, k, v).reshape(B, T, H * D)


def attention(lw: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig,
              kv_transform: Optional[KVTransform] = None) -> torch.Tensor:
    """Causal self-attention of one layer including o_proj: `[B, T, C]` -> `[B, T, C]`."""
    return linear(attention_heads(lw, x, cos, sin, cfg, kv_transform), lw, "self_attn.o_proj")


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention: q `[B, T, H, D]`, k/v `[B, T, Hkv, D]` -> `[B, T, H, D]`."""
    H, Hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H*, T, D]
    if Hkv != H:
        kt = kt.repeat_interleave(H // Hkv, dim=1)
        vt = vt.repeat_interleave(H // Hkv, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # [B, H, T, D]
    return o.transpose(1, 2)


def mlp(lw: dict, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP; `x [B, T, C]` is the normed input."""
    return linear(F.silu(linear(x, lw, "mlp.gate_proj")) * linear(x, lw, "mlp.up_proj"), lw, "mlp.down_proj")


def layer_forward(lw: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig,
                  kv_transform: Optional[KVTransform] = None) -> torch.Tensor:
    """One decoder layer: `x [B, T, C]` -> `[B, T, C]`."""
    h = x + attention(lw, rms_norm(x, lw["input_layernorm.weight"], cfg.rms_eps), cos, sin, cfg, kv_transform)
    return h + mlp(lw, rms_norm(h, lw["post_attention_layernorm.weight"], cfg.rms_eps))


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each linear of a decoder layer (names relative to the layer), as config.json implies them."""
    C, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"self_attn.q_proj": (q, C), "self_attn.k_proj": (kv, C), "self_attn.v_proj": (kv, C),
              "self_attn.o_proj": (C, q), "mlp.gate_proj": (I, C), "mlp.up_proj": (I, C), "mlp.down_proj": (C, I)}
    return {lin: shapes[lin] for lin in cfg.arch.linears}


def layer_weight_names(cfg: ModelConfig) -> list[str]:
    """The tensor names (relative to the layer prefix) one decoder layer reads."""
    names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    names += [f"{lin}.weight" for lin in cfg.arch.linears]
    if cfg.arch.qkv_bias:
        names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    if cfg.arch.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return names
