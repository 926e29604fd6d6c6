"""lmq's reference decoder against transformers' own modeling code, for every architecture in the
table, on tiny random models (real configs' features: qkv bias, q/k norm, GQA, Llama-3 rope scaling,
untied heads)."""

import pytest
import torch

from lmq.evaluate import load_model

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-6)


def build(kind):
    import transformers as tf

    if kind == "llama3":
        cfg = tf.LlamaConfig(**COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 32},
                             rope_theta=500000.0, tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg)
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, tie_word_embeddings=True))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2", "qwen3"])
def test_reference_decoder_matches_transformers(tmp_path, kind):
    torch.manual_seed(0)
    model = build(kind).float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    ids = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    ours = load_model(str(tmp_path), "cpu").logits(ids)
    assert (ours - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
