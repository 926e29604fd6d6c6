"""RoPE: Llama 3 frequency scaling against transformers, and the in-place kernel against its twin."""

from __future__ import annotations

import pytest
import torch

from lmq.errors import ShapeError, UnsupportedError
from lmq.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_inv_freq_matches_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                                   rope_scaling=scaling, max_position_embeddings=131072)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        want = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    else:
        want, _ = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    got = rope_inv_freq(128, 500000.0, scaling)
    assert got.shape == (64,)
    assert torch.allclose(got, want.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_apply_rope_matches_ref(device, head_dim):
    T, H, H_kv = 7, 4, 2
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, 500000.0, LLAMA3), 40000, device)
    q = torch.randn(T, H, head_dim, device=device).half()
    k = torch.randn(T, H_kv, head_dim, device=device).half()
    pos = torch.tensor([0, 1, 2, 17, 255, 1000, 39999], device=device)
    want_q, want_k = apply_rope_ref(q, pos, cos, sin), apply_rope_ref(k, pos, cos, sin)
    apply_rope(q, k, pos, cos, sin)
    assert torch.allclose(q.float(), want_q.float(), atol=2e-3, rtol=0)
    assert torch.allclose(k.float(), want_k.float(), atol=2e-3, rtol=0)
    assert torch.equal(q[0], want_q[0])  # position 0 is the identity


def test_rope_preserves_dot_products_of_equal_shifts():
    # <R(p) a, R(p + s) b> depends only on s: the property attention relies on
    cos, sin = rope_cos_sin(rope_inv_freq(64, 10000.0), 300, "cpu")
    a, b = torch.randn(1, 1, 64).double(), torch.randn(1, 1, 64).double()
    dots = [(apply_rope_ref(a, torch.tensor([p]), cos.double(), sin.double())
             * apply_rope_ref(b, torch.tensor([p + 5]), cos.double(), sin.double())).sum() for p in (0, 100, 250)]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3), atol=1e-5)


def test_apply_rope_rejects_bad_inputs(device):
    cos, sin = rope_cos_sin(rope_inv_freq(64), 16, device)
    q = torch.randn(2, 2, 64, device=device).half()
    with pytest.raises(ShapeError, match="positions"):
        apply_rope(q, q.clone(), torch.zeros(3, dtype=torch.int32, device=device), cos, sin)
    with pytest.raises(ShapeError, match="cos/sin"):
        apply_rope(q, q.clone(), torch.zeros(2, dtype=torch.int32, device=device), cos.double(), sin.double())
    with pytest.raises(UnsupportedError, match="rope_scaling type 'yarn' is not supported"):
        rope_inv_freq(64, scaling={"rope_type": "yarn"})
