"""Known model shapes (the numbers of their Hugging Face `config.json`), for synthetic benchmarks:
`lmq bench --synthetic llama3-8b` builds random 4-bit weights at exactly this shape."""

from __future__ import annotations

from lmq.errors import InputError

SYNTHETIC_CONFIGS: dict[str, dict] = {
    "llama3-8b": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 18944, "vocab_size": 152064,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False, "use_sliding_window": False,
    },
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}


def synthetic_config(name: str) -> dict:
    if name not in SYNTHETIC_CONFIGS:
        raise InputError(f"--synthetic {name!r} is not a known shape; choose one of {', '.join(SYNTHETIC_CONFIGS)}")
    return dict(SYNTHETIC_CONFIGS[name])


def synthetic_group_size(name: str, group_size: int | None = None) -> int:
    """The quantization group size of a synthetic model: `group_size` where it splits every linear's input width
    into whole groups, else an error naming the ones that do; None: the largest of 128, 64, 32 that does (SmolLM2's
    576-wide layers take 64)."""
    from lmq.models.llama import ModelConfig, linear_shapes

    widths = {k for _, k in linear_shapes(ModelConfig.from_hf(synthetic_config(name))).values()}  # each linear's K
    fits = [g for g in (128, 64, 32) if all(k % g == 0 for k in widths)]
    if group_size is None:
        return fits[0]
    if group_size not in fits:
        raise InputError(f"--group-size {group_size} does not split {name}'s layer widths {sorted(widths)} into "
                         f"whole groups; use --group-size {' or '.join(map(str, fits))}")
    return group_size
