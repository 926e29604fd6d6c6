"""Per-architecture tables: what lmq needs to know about a Hugging Face Llama-family checkpoint.

Everything architecture-specific is data here: tensor names, which linears AWQ quantizes, and which
linears share a smoothing scale with which norm or linear (AWQ's scaling groups). One literal dict,
keyed by `config.json`'s `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmq.errors import UnsupportedError


@dataclass(frozen=True)
class ScaleGroup:
    """AWQ scaling group: `linears` read the output of `prev`; a per-input-channel scale `s` is
    multiplied into the linears' input columns and divided out of `prev`'s output (a norm's weight
    or a linear's output rows), which leaves the float model's function unchanged.

    `inspect` names the block whose output measures the loss of a candidate scale: "attn" (the whole
    attention), "mlp" (the whole MLP), or a single linear.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Arch:
    """A Llama-family architecture as lmq sees it."""

    name: str
    qkv_bias: bool = False  # Qwen2/2.5 carry biases on q/k/v
    qk_norm: bool = False  # Qwen3 RMS-normalizes q and k per head before RoPE

    # Names inside a decoder layer, relative to `model.layers.{i}.`
    linears: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    scale_groups: tuple[ScaleGroup, ...] = (
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn"),
        # Under GQA one scale per v_proj output channel, applied to every o_proj input column that reads it.
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )
    # AWQ's clipping search skips q/k: their error is dominated by the softmax, not the dot product.
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

    layer_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama"),
    "mistral": Arch("mistral"),
    "qwen2": Arch("qwen2", qkv_bias=True),
    "qwen3": Arch("qwen3", qk_norm=True),
}


def arch_for(model_type: str | None) -> Arch:
    """The table entry for a `model_type`, or an error listing the supported ones."""
    if model_type not in ARCHS:
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported; lmq supports {', '.join(sorted(ARCHS))} "
            "(Llama 2/3, Mistral, Qwen2/2.5, Qwen3 checkpoints)"
        )
    return ARCHS[model_type]
