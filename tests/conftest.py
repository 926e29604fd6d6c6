"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter on CPU tensors; the variable must be set before
any kernel module is imported, so it is set here, first.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else CPU under the Triton interpreter."""
    return "cuda" if _HAS_CUDA else "cpu"


SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def smollm2():
    """The real small model (SmolLM2-135M-Instruct) as a Hugging Face folder, converted once and cached."""
    from lmq.models.smollm2 import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def calib_file():
    path = os.path.join(SHARED_DATA, "calib", "c4.txt")
    if not os.path.exists(path):
        pytest.skip("../shared/data is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def wiki_file():
    path = os.path.join(SHARED_DATA, "wikitext-2-raw", "wiki.test.raw")
    if not os.path.exists(path):
        pytest.skip("../shared/data is not beside this checkout")
    return path


def make_tiny_model(folder, smollm2_dir, model_type="llama", poison=None, tie=True):
    """A random Llama-family model at toy size with SmolLM2's real tokenizer; `poison` names a tensor
    to fill with NaN."""
    import json
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    C, L, H, Hkv, D, inter, V = 64, 2, 4, 2, 16, 128, 49152
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": model_type, "hidden_size": C,
           "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": D,
           "intermediate_size": inter, "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": tie, "max_position_embeddings": 512, "torch_dtype": "float16",
           "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(V, C, generator=g) * 0.02,
         "model.norm.weight": torch.ones(C)}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes = {"self_attn.q_proj": (H * D, C), "self_attn.k_proj": (Hkv * D, C), "self_attn.v_proj": (Hkv * D, C),
                  "self_attn.o_proj": (C, H * D), "mlp.gate_proj": (inter, C), "mlp.up_proj": (inter, C),
                  "mlp.down_proj": (C, inter)}
        for n, s in shapes.items():
            t[f"{p}.{n}.weight"] = torch.randn(*s, generator=g) * 0.05
        t[f"{p}.input_layernorm.weight"] = torch.ones(C) + 0.1 * torch.randn(C, generator=g)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(C)
    if not tie:
        t["lm_head.weight"] = torch.randn(V, C, generator=g) * 0.02
    if poison:
        t[poison][0, 0] = float("nan")
    save_file({k: v.half().contiguous() for k, v in t.items()}, str(folder / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(smollm2_dir) / f).exists():
            shutil.copyfile(Path(smollm2_dir) / f, folder / f)
    return folder


@pytest.fixture
def tiny_model(tmp_path, smollm2):
    return make_tiny_model(tmp_path / "tiny", smollm2)


@pytest.fixture(scope="session")
def smollm2_rtn(smollm2, tmp_path_factory):
    """SmolLM2 quantized with RTN (g64, no calibration: fast), written by `lmq quantize`."""
    from typer.testing import CliRunner

    from lmq.cli import app

    out = tmp_path_factory.mktemp("engine") / "smollm2-rtn-g64"
    res = CliRunner().invoke(app, ["quantize", str(smollm2), "-o", str(out), "--method", "rtn",
                                   "--group-size", "64", "--device", "cpu"])
    assert res.exit_code == 0, (res.output, res.exception)
    return out
