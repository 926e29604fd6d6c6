"""End to end on the small real model (SmolLM2-135M-Instruct): the reference decoder against
transformers, AWQ against RTN on real layers, and quantize -> checkpoint -> eval through the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lmq.cli import app
from lmq.format.source import WeightSource
from lmq.models.llama import layer_forward, rope_cos_sin
from lmq.quant import awq
from lmq.quant.calib import calibration_tokens

runner = CliRunner()


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


def test_reference_decoder_matches_transformers(smollm2, hf_model):
    from lmq.evaluate import load_model

    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = load_model(str(smollm2), "cpu").logits(ids)
    with torch.no_grad():
        ref = hf_model(ids).logits
    assert (ours - ref).abs().max().item() < 2e-3 * ref.abs().max().item()


def test_greedy_continuation_golden(smollm2, hf_model, tokenizer):
    """A greedy continuation through lmq's reference decoder equals transformers' generate."""
    from lmq.evaluate import load_model

    model = load_model(str(smollm2), "cpu")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        ref = hf_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    seq = ids
    for _ in range(8):
        nxt = model.logits(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert seq[0, ids.shape[1]:].tolist() == ref.tolist()
    assert "Paris" in tokenizer.decode(ref)


def test_awq_lowers_layer_output_error_vs_rtn(smollm2, tokenizer, calib_file):
    """On real SmolLM2 layers, AWQ's weights give a smaller layer-output error than RTN's, measured
    on held-out calibration samples."""
    src = WeightSource(smollm2)
    cfg = src.cfg
    ids = calibration_tokens(calib_file, tokenizer, 6, 64, seed=0)
    x = src.embed(torch.float32)[ids]  # [6, 64, C]
    cos, sin = rope_cos_sin(cfg, torch.arange(64), torch.float32)
    qs = awq.QuantSettings(group_size=64, n_grid=10)
    for i in range(3):
        lw = src.layer(i, torch.float32)
        calib, held = x[:4], x[4:]
        cap = awq.capture(lw, calib, cos, sin, cfg, qs.batch_size)
        ref_held = layer_forward(lw, held, cos, sin, cfg)
        rtn = awq.layer_error(lw, held, ref_held, cos, sin, cfg, qs)
        new_lw, _, ratios, _ = awq.awq_layer(lw, cap, calib[:2], cap.output[:2], cos, sin, cfg, qs)
        ours = awq.layer_error(new_lw, held, ref_held, cos, sin, cfg, qs)
        assert ours < 0.9 * rtn, (i, ours, rtn, ratios)
        x = torch.cat([cap.output, ref_held])


def test_scale_folding_preserves_the_float_layer(smollm2, tokenizer, calib_file):
    src = WeightSource(smollm2)
    cfg = src.cfg
    ids = calibration_tokens(calib_file, tokenizer, 2, 32, seed=1)
    x = src.embed(torch.float32)[ids]
    cos, sin = rope_cos_sin(cfg, torch.arange(32), torch.float32)
    lw = src.layer(0, torch.float32)
    cap = awq.capture(lw, x, cos, sin, cfg, 16)
    folded = dict(lw)
    qs = awq.QuantSettings(group_size=64, n_grid=5)
    for g in cfg.arch.scale_groups:
        if awq.group_applies(g, lw):
            s, *_ = awq.search_scale(g, lw, cap.inputs[g.linears[0]], cos, sin, cfg, qs)
            awq.apply_scale(g, folded, s, cap, cfg.head_dim)
    out = layer_forward(folded, x, cos, sin, cfg)
    assert (out - cap.output).abs().max().item() < 1e-3 * cap.output.abs().max().item()
    # The captured inputs follow the folding: they equal a fresh capture of the folded layer.
    fresh = awq.capture(folded, x, cos, sin, cfg, 16)
    for name, t in cap.inputs.items():
        assert torch.allclose(t, fresh.inputs[name], rtol=1e-3, atol=1e-4 * t.abs().max().item()), name
    assert cap.inputs["self_attn.q_proj"] is cap.inputs["self_attn.v_proj"]
    # SmolLM2 has GQA (9 query heads, 3 KV heads): v_proj -> o_proj is still a scaling group.
    assert cfg.num_kv_heads < cfg.num_heads
    assert awq.group_applies(cfg.arch.scale_groups[1], lw)
    assert not torch.equal(folded["self_attn.o_proj.weight"], lw["self_attn.o_proj.weight"])


def independent_dequant(qweight, qzeros, scales, G):
    """AutoAWQ gemm -> float weight [N, K], written from the format description, not lmq's code."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    K = qweight.shape[0]
    def unpack(t):
        t = t.to(torch.int64) & 0xFFFFFFFF
        cols = torch.stack([(t >> (4 * order.index(c))) & 0xF for c in range(8)], dim=-1)
        return cols.reshape(t.shape[0], -1)
    codes, zeros = unpack(qweight), unpack(qzeros)  # [K, N], [K/G, N]
    idx = torch.arange(K) // G
    return ((codes - zeros[idx]) * scales.float()[idx]).t()


@pytest.fixture(scope="module")
def awq_checkpoint(smollm2, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "smollm2-awq-g64"
    res = runner.invoke(app, ["quantize", str(smollm2), "-o", str(out), "--group-size", "64",
                              "--calib-data", calib_file, "--calib-samples", "2", "--calib-seqlen", "64",
                              "--refine-steps", "3", "--device", "cpu", "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    return out, json.loads(res.stdout)


def test_quantize_writes_a_portable_checkpoint(awq_checkpoint, smollm2):
    out, report = awq_checkpoint
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq"
    assert cfg["quantization_config"]["version"] == "gemm" and cfg["quantization_config"]["group_size"] == 64
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "manifest.json", "model.safetensors"):
        assert (out / f).exists(), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "quantized" and m["format_version"] == 1
    assert m["source"]["hash"].startswith("sha256:") and m["calibration"]["samples"] == 2
    assert len(m["layers"]) == 30 and all(lay["awq_err"] <= lay["rtn_err"] * 1.0001 for lay in m["layers"])
    # rounding refinement only keeps codes that lower the error it is measured by
    assert all(lay["awq_err"] <= lay["scaled_err"] for lay in m["layers"]) and m["settings"]["refine_steps"] == 3
    assert len(report["layers"]) == 30 and report["bytes_out"] < report["bytes_in"] / 2
    src = WeightSource(out)
    assert src.get("model.layers.0.self_attn.q_proj.qweight").shape == (576, 576 // 8)
    assert not src.has("lm_head.weight")  # tied embeddings stay tied


def test_checkpoint_logits_reproduced_by_dequantized_reference(awq_checkpoint, smollm2):
    """transformers' own AWQ loader needs the gptqmodel package (not installable on a CPU-only CI
    machine: it raises ImportError), so an independent dequantization of the checkpoint is loaded
    into transformers' Llama and compared with lmq's reader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmq.evaluate import load_model

    out, _ = awq_checkpoint
    src = WeightSource(out)
    config = AutoConfig.from_pretrained(str(smollm2))
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    sd = {}
    for name in src.names:
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            sd[f"{p}.weight"] = independent_dequant(src.get(f"{p}.qweight"), src.get(f"{p}.qzeros"),
                                                    src.get(f"{p}.scales"), 64)
        elif not name.endswith((".qzeros", ".scales")):
            sd[name] = src.get(name).float()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    hf.tie_weights()
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = load_model(str(out), "cpu").logits(ids)
    assert (ours - ref).abs().max().item() < 2e-3 * ref.abs().max().item()


def test_inspect_and_eval_read_the_checkpoint(awq_checkpoint, smollm2, wiki_file):
    out, _ = awq_checkpoint
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["kind"] == "quantized" and info["quantized_linears"] == 210
    assert 4.0 < info["bits_per_weight"] < 4.7
    ppl = {}
    for m in (smollm2, out):
        res = runner.invoke(app, ["eval", "ppl", str(m), "--data", wiki_file, "--seqlen", "128",
                                  "--max-windows", "2", "--device", "cpu", "--json"])
        assert res.exit_code == 0, res.output
        ppl[m] = json.loads(res.stdout)
        assert ppl[m]["tokens"] == 2 * 127
    assert 5 < ppl[smollm2]["ppl"] < ppl[out]["ppl"] < 3 * ppl[smollm2]["ppl"]
    res = runner.invoke(app, ["eval", "kld", str(out), "--reference", str(smollm2), "--data", wiki_file,
                              "--seqlen", "128", "--max-windows", "1", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    k = json.loads(res.stdout)
    assert 0 < k["kld"] < 2 and 0.3 < k["top1_agree"] < 1


def test_autoawq_checkpoint_without_manifest_is_readable(awq_checkpoint, tmp_path):
    """AutoAWQ writes no manifest and spells the version 'GEMM'; readers take it the same way."""
    import shutil

    out, _ = awq_checkpoint
    other = tmp_path / "autoawq"
    shutil.copytree(out, other)
    (other / "manifest.json").unlink()
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "zero_point": True, "group_size": 64, "bits": 4,
                                  "version": "GEMM"}
    (other / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["inspect", str(other), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kind"] == "autoawq"
    a = WeightSource(other).layer(3, torch.float32)
    b = WeightSource(out).layer(3, torch.float32)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_awq_loader_matches_when_available(awq_checkpoint):
    """Where transformers' AWQ path can run (gptqmodel installed), it reproduces lmq's logits."""
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    from lmq.evaluate import load_model

    out, _ = awq_checkpoint
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map=dev).eval()
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids.to(dev)).logits.float().cpu()
    ours = load_model(str(out), "cpu").logits(ids)
    assert (ours - ref).abs().max().item() < 3e-2 * ref.abs().max().item()


def test_packed_checkpoint_reads_the_same_numbers(awq_checkpoint, tmp_path):
    """`lmq pack` output is read back (inspect, eval) through its layout's exact unpack."""
    out, _ = awq_checkpoint
    packed = tmp_path / "packed"
    res = runner.invoke(app, ["pack", str(out), "--arch", "sm80", "-o", str(packed)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(packed), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kind"] == "packed"
    a, b = WeightSource(packed), WeightSource(out)
    for i in (0, 29):
        la, lb = a.layer(i, torch.float32), b.layer(i, torch.float32)
        assert all(torch.equal(la[k], lb[k]) for k in lb)
