"""The engine's decoder against lmq's reference decoder for every architecture in the table, on
tiny random checkpoints quantized with RTN (qkv bias fused into the QKV linear, Qwen3's q/k norm,
GQA, Llama-3 rope scaling, untied heads): logits of a prefill step and of the decode step after it.
The reference decoder itself is checked against transformers in test_arch_parity.py."""

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmq.cli import app
from lmq.engine.llm import LLM
from lmq.engine.sampling import SamplingParams
from lmq.evaluate import load_model

COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,  # noqa: C408
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-6)


def build(kind):
    import transformers as tf

    if kind == "llama3":
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            **COMMON, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, tie_word_embeddings=True))
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True))


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2", "qwen3"])
def test_engine_logits_match_the_reference_decoder(tmp_path, smollm2, kind):
    torch.manual_seed(0)
    model = build(kind).float().eval()
    with torch.no_grad():  # unit-scale weights so logits spread out; non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    src, ckpt = tmp_path / "fp", tmp_path / "q"
    model.save_pretrained(str(src), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(smollm2) / f, src / f)
    res = CliRunner().invoke(app, ["quantize", str(src), "-o", str(ckpt), "--method", "rtn", "--group-size", "64"])
    assert res.exit_code == 0, res.output
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = load_model(str(ckpt), "cpu")
    llm = LLM(ckpt, device="cpu", block_size=16, max_model_len=128, cache_max_memory="4MiB")
    llm.add_request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
    for _ in range(2):  # the prefill step, then one decode step
        step = llm.scheduler.schedule()
        ours = llm.runner.run(step, llm.manager)[0]  # [V]
        seq = step.spans[0].seq
        want = ref.logits(torch.tensor([seq.token_ids]))[0, -1]  # [V]
        # the engine's KV cache is fp16, the reference keeps K/V in fp32
        err = (ours - want).abs().max().item() / want.abs().max().item()
        assert err < 5e-3, (step.is_decode, err)  # measured ~5e-4
        llm.scheduler.advance(step.spans[0])
        seq.token_ids.append(int(want.argmax()))
