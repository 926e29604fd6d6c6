"""Every bad input gets one clear `error:` line and exit code 1, and leaves nothing behind."""

import json
import os

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model
from lmq.cli import app

runner = CliRunner()


def lmq(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_error(res, *fragments, code=1):
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    err = res.stderr
    assert "error:" in err, err
    for f in fragments:
        assert f in " ".join(err.split()), (f, err)


def leftovers(folder):
    return [p for p in os.listdir(folder) if ".tmp-" in p or ".old-" in p]


def test_missing_path(tmp_path):
    assert_error(lmq("quantize", tmp_path / "nope", "-o", tmp_path / "out"), "does not exist")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("x")
    assert_error(lmq("quantize", f, "-o", tmp_path / "out"), "is a file")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_error(lmq("quantize", tmp_path / "empty", "-o", tmp_path / "out"), "not a model folder", "config.json")


def test_unsupported_architecture(tmp_path, smollm2):
    m = make_tiny_model(tmp_path / "m", smollm2, model_type="gpt2")
    assert_error(lmq("quantize", m, "-o", tmp_path / "out"), "model_type 'gpt2' is not supported",
                 "llama, mistral, qwen2, qwen3")


def test_group_size_not_dividing_k_names_the_layer(tmp_path, smollm2):
    res = lmq("quantize", smollm2, "-o", tmp_path / "out", "--group-size", "128")
    assert_error(res, "group size 128 does not divide", "K=576", "model.layers.0.self_attn.q_proj",
                 "--group-size 64 or 32")
    assert not (tmp_path / "out").exists()


def test_nan_weights(tmp_path, smollm2):
    m = make_tiny_model(tmp_path / "m", smollm2, poison="model.layers.1.mlp.up_proj.weight")
    res = lmq("quantize", m, "-o", tmp_path / "out", "--method", "rtn", "--group-size", "64")
    assert_error(res, "model.layers.1.mlp.up_proj.weight", "NaN/inf")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_output_exists_needs_force(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_error(lmq("quantize", tiny_model, "-o", out, "--method", "rtn", "--group-size", "64"),
                 "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    res = lmq("quantize", tiny_model, "-o", out, "--method", "rtn", "--group-size", "64", "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert leftovers(tmp_path) == []


def test_output_that_is_a_file_is_refused_even_with_force(tmp_path, tiny_model):
    """Before, it was called an existing "output folder", and --force replaced the file with a checkpoint."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for force in ([], ["--force"]):
        assert_error(lmq("quantize", tiny_model, "-o", f, "--method", "rtn", "--group-size", "64", *force),
                     f"-o {f} is a file, not a folder")
    assert f.read_text() == "mine" and leftovers(tmp_path) == []


@pytest.mark.parametrize("exc,code", [(OSError(28, "No space left on device"), 1), (KeyboardInterrupt(), 130),
                                      ("SIGTERM", 143)])
def test_disk_full_or_ctrl_c_leaves_nothing(tmp_path, tiny_model, monkeypatch, exc, code):
    """A write that fails, Ctrl-C, or SIGTERM (a batch scheduler, `docker stop`) mid-write: no output, no temporary
    folder left beside it."""
    import os
    import signal

    import safetensors.torch

    def fail(*a, **k):
        if exc == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this frame
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    res = lmq("quantize", tiny_model, "-o", tmp_path / "out", "--method", "rtn", "--group-size", "64")
    assert_error(res, code=code)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_corrupt_safetensors(tmp_path, tiny_model):
    data = (tiny_model / "model.safetensors").read_bytes()
    (tiny_model / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--method", "rtn", "--group-size", "64"),
                 "corrupt")


def test_config_or_index_json_of_the_wrong_shape(tmp_path, tiny_model):
    """Valid JSON that is not an object (a list) in config.json or the shard index: one error line, not
    `AttributeError: 'list' object has no attribute 'get'`."""
    cfg = (tiny_model / "config.json").read_text()
    (tiny_model / "config.json").write_text("[1, 2]")
    assert_error(lmq("inspect", tiny_model), "config.json holds a JSON list", "re-download")
    (tiny_model / "config.json").write_text(cfg)
    for index in ('{"weight_map": ["model.safetensors"]}', '{"weight_map": {"a": 1}}', b"\xff\xfe{}"):
        f = tiny_model / "model.safetensors.index.json"
        f.write_bytes(index) if isinstance(index, bytes) else f.write_text(index)
        assert_error(lmq("inspect", tiny_model), "is not a valid safetensors index")


@pytest.mark.parametrize("drop", ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"])
def test_missing_norm_is_named_before_any_layer_is_quantized(tmp_path, tiny_model, drop, monkeypatch):
    """Before, `is missing tensor model.norm.weight` came after every layer had been searched (hours, for a large
    model with AWQ)."""
    from safetensors.torch import load_file, save_file

    import lmq.quant.quantize as quantize_mod

    sd = load_file(str(tiny_model / "model.safetensors"))
    del sd[drop]
    save_file(sd, str(tiny_model / "model.safetensors"))
    monkeypatch.setattr(quantize_mod, "quantize_layer", lambda *a, **k: pytest.fail("a layer was quantized"))
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--group-size", "64"),
                 f"is missing tensor {drop}", "incomplete")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pickled_weights_are_never_loaded(tmp_path, tiny_model):
    os.replace(tiny_model / "model.safetensors", tiny_model / "pytorch_model.bin")
    assert_error(lmq("inspect", tiny_model), "pickled weights", "never loads")


def test_calibration_too_short(tmp_path, tiny_model):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--group-size", "64", "--calib-data", short,
                     "--calib-samples", "4", "--calib-seqlen", "64"), "fewer than", "4 x 64")


def test_negative_refine_steps(tmp_path, tiny_model):
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--group-size", "64", "--refine-steps", "-1"),
                 "--refine-steps must be 0 (off) or more", "-1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_seed_outside_64_bits_is_refused_first(tmp_path, tiny_model, seed):
    """2**70 used to fail with torch's `Overflow when unpacking long long` after calibration; -1 shuffled the
    calibration documents as seed 1 does."""
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--group-size", "64", "--seed", seed),
                 "--seed must be a whole number from 0 to 2**63 - 1", f"got {seed}")
    assert not (tmp_path / "out").exists()


def test_bad_recipe_key(tmp_path, tiny_model):
    r = tmp_path / "r.toml"
    r.write_text("[quantize]\ngroup_sise = 64\n")
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--recipe", r), "unknown keys", "group_sise")
    # values of the wrong type: one error line naming the key, not a traceback or a string written into the config
    for line, match in (('group_size = "abc"', "group_size must be a whole number"),
                        ('zero_point = "no"', "zero_point must be true or false"),
                        ("refine_steps = 1.5", "refine_steps must be a whole number"),
                        ("seed = true", "seed must be a whole number")):
        r.write_text(f"[quantize]\n{line}\n")
        assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--recipe", r), match)
    assert not (tmp_path / "out").exists()


def test_recipe_that_is_not_a_toml_table(tmp_path, tiny_model):
    """A folder, a binary file or a `quantize = 3` recipe: one error line, not a traceback."""
    r = tmp_path / "r.toml"
    r.mkdir()
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--recipe", r), "is a folder, not a file")
    r.rmdir()
    r.write_bytes(b"\x80\xff\xfe group_size = 64\n")
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--recipe", r), "is not UTF-8 text")
    r.write_text("quantize = 3\n")
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--recipe", r),
                 "quantize must be a table of settings", "got 3")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("g", ["0", "-1", "7", "256"])
def test_group_size_outside_the_kernels_is_refused_first(tmp_path, tiny_model, g):
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--method", "rtn", "--group-size", g),
                 "--group-size must be one of 32, 64, 128", f"got {g}")


def test_newer_checkpoint_format_refused(tmp_path, tiny_model):
    out = tmp_path / "q"
    assert lmq("quantize", tiny_model, "-o", out, "--method", "rtn", "--group-size", "64").exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    assert_error(lmq("inspect", out), "format_version 99", "upgrade lmq")


def test_eval_missing_data_file(tmp_path, tiny_model):
    assert_error(lmq("eval", "ppl", tiny_model, "--data", tmp_path / "none.txt"), "is not a file")


def test_recipe_sets_defaults_and_cli_wins(tmp_path, tiny_model):
    r = tmp_path / "r.toml"
    r.write_text('[quantize]\nmethod = "rtn"\ngroup_size = 32\nzero_point = false\n')
    out = tmp_path / "q"
    res = lmq("quantize", tiny_model, "-o", out, "--recipe", r, "--group-size", "64", "--json")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False, "version": "gemm",
                   "modules_to_not_convert": None}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "rtn"
    # round-to-nearest records no calibration or search settings it did not use
    assert manifest["calibration"] is None
    assert not any(k.startswith(("calib_", "refine_")) for k in manifest["settings"]), manifest["settings"]


def test_shipped_recipes_parse():
    from pathlib import Path

    from lmq.cli import QUANT_DEFAULTS, load_recipe

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))
    assert recipes
    for r in recipes:
        assert set(load_recipe(r)) <= set(QUANT_DEFAULTS)


def test_output_parent_folders_are_created_but_not_through_a_file(tmp_path, tiny_model):
    out = tmp_path / "a" / "b" / "q"
    assert lmq("quantize", tiny_model, "-o", out, "--method", "rtn", "--group-size", "64").exit_code == 0
    assert (out / "manifest.json").exists()
    (tmp_path / "f").write_text("x")
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "f" / "q", "--method", "rtn"), "is a file")


def test_eval_window_longer_than_the_context(tmp_path, tiny_model, wiki_file):
    assert_error(lmq("eval", "ppl", tiny_model, "--data", wiki_file, "--seqlen", "4096"),
                 "exceeds the model's context of 512")


def test_output_inside_the_source_is_refused(tmp_path, tiny_model):
    for force in (["--force"], []):  # without --force too: the message must not suggest it
        res = lmq("quantize", tiny_model, "-o", tiny_model, "--method", "rtn", "--group-size", "64", *force)
        assert_error(res, "would overwrite the source")
        assert "--force" not in res.stderr
    assert (tiny_model / "model.safetensors").exists()


def test_biased_llama_config_is_refused(tmp_path, smollm2):
    m = make_tiny_model(tmp_path / "m", smollm2)
    cfg = json.loads((m / "config.json").read_text())
    cfg["mlp_bias"] = True
    (m / "config.json").write_text(json.dumps(cfg))
    assert_error(lmq("inspect", m), "mlp_bias=true", "not support")


def test_force_swap_failure_keeps_the_old_checkpoint(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "out"
    assert lmq("quantize", tiny_model, "-o", out, "--method", "rtn", "--group-size", "64").exit_code == 0
    before = (out / "manifest.json").read_text()
    real_replace = os.replace

    def flaky(src, dst):
        if str(src).startswith(str(tmp_path / ".out.tmp-")) and str(dst) == str(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    res = lmq("quantize", tiny_model, "-o", out, "--method", "rtn", "--group-size", "32", "--force")
    assert_error(res, "previous checkpoint there is unchanged")
    assert (out / "manifest.json").read_text() == before
    assert leftovers(tmp_path) == []


def test_results_piped_keep_every_column():
    """Tables printed to a pipe or a file are not cut to rich's 80-column default (cells read "qk…" there);
    COLUMNS still sets the width."""
    import subprocess
    import sys

    code = ("from lmq.console import out; from rich.table import Table; "
            "t = Table(*[f'column {i}' for i in range(14)]); t.add_row(*[str(1000.5 * i) for i in range(14)]); "
            "out.print(t)")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    wide = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "column 13" in wide and "13006.5" in wide and "…" not in wide
    narrow = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**env, "COLUMNS": "80"}).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 80


def test_eval_bad_numbers_and_binary_text_are_refused(tmp_path, tiny_model, wiki_file):
    for args, match in ((("--batch-size", "0"), "--batch-size must be 1 or more, got 0"),
                        (("--max-windows", "0"), "--max-windows must be 1 or more, got 0"),
                        (("--device", "tpu"), "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
                        (("--device", "meta"), "got 'meta'")):
        assert_error(lmq("eval", "ppl", tiny_model, "--data", wiki_file, "--seqlen", "64", *args), match)
    assert_error(lmq("eval", "kld", tiny_model, "--reference", tiny_model, "--data", wiki_file, "--seqlen", "64",
                     "--batch-size", "-1"), "--batch-size must be 1 or more")
    binary = tmp_path / "binary.raw"
    binary.write_bytes(bytes(range(128, 256)) * 64)
    assert_error(lmq("eval", "ppl", tiny_model, "--data", binary, "--seqlen", "64"), "is not UTF-8 text")


def test_tokenizer_that_needs_remote_code_or_is_missing(tmp_path, tiny_model, wiki_file):
    """A tokenizer with its own code (auto_map) is refused with a reason, never run; a folder without tokenizer
    files says what to copy."""
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model, remote)
    cfg = json.loads((remote / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok.MyTokenizer", None]}
    cfg["tokenizer_class"] = "MyTokenizer"
    (remote / "tokenizer_config.json").write_text(json.dumps(cfg))
    (remote / "tok.py").write_text("open('RAN', 'w').write('remote code ran')\n")
    assert_error(lmq("eval", "ppl", remote, "--data", wiki_file, "--seqlen", "64"), "lmq never runs")
    assert not (tmp_path / "RAN").exists() and not __import__("pathlib").Path("RAN").exists()
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (bare / f).unlink(missing_ok=True)
    assert_error(lmq("eval", "ppl", bare, "--data", wiki_file, "--seqlen", "64"), "has no tokenizer")
    # quantizing it (round to nearest needs no tokenizer) works, and says what the checkpoint will lack
    res = lmq("quantize", bare, "-o", tmp_path / "q", "--method", "rtn", "--group-size", "64")
    assert res.exit_code == 0 and "will not chat or evaluate" in " ".join(res.stderr.split()), res.output


def test_binary_config_json_is_a_clear_error(tmp_path, tiny_model):
    (tiny_model / "config.json").write_bytes(bytes(range(128, 256)))
    assert_error(lmq("inspect", tiny_model), "config.json is not valid JSON")


@pytest.mark.parametrize("key,value,match", [("intermediate_size", 2048, "mlp.gate_proj.weight is"),
                                             ("vocab_size", 50000, "vocab_size 50000")])
def test_config_that_does_not_match_its_weights_is_refused(tmp_path, tiny_model, key, value, match):
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg[key] = value
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    assert_error(lmq("quantize", tiny_model, "-o", tmp_path / "out", "--method", "rtn", "--group-size", "64"),
                 match, "does not match its weights")
    assert not (tmp_path / "out").exists()


def test_inspect_shows_what_the_other_commands_would_refuse(tiny_model):
    """A config.json that does not match the tensors: `lmq inspect` still describes the folder, and warns with the
    reason quantize / eval / chat / pack give (it said nothing)."""
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["intermediate_size"] = 2048
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    res = lmq("inspect", tiny_model)
    assert res.exit_code == 0, (res.output, res.exception)
    err = " ".join(res.stderr.split())
    assert "warning:" in err and "mlp.gate_proj.weight is" in err and "quantize, eval, chat and pack refuse it" in err
    res = lmq("inspect", tiny_model, "--json")
    assert res.exit_code == 0 and "mlp.gate_proj.weight is" in json.loads(res.stdout)["problem"]


def test_eval_kld_warns_about_a_quantized_reference(smollm2, smollm2_rtn, wiki_file):
    """The reference is meant to be the float model: a 4-bit one is measured, with a warning naming the float
    model the manifest records; the float reference gives no warning."""
    args = ("--data", wiki_file, "--seqlen", "32", "--max-windows", "1", "--device", "cpu")
    res = lmq("eval", "kld", smollm2_rtn, "--reference", smollm2_rtn, *args)
    assert res.exit_code == 0, (res.output, res.exception)
    err = " ".join(res.stderr.split())
    assert f"warning: the reference {smollm2_rtn} is a 4-bit checkpoint (quantized)" in err, err
    assert f"pass --reference {smollm2}" in err, err
    res = lmq("eval", "kld", smollm2_rtn, "--reference", smollm2, *args)
    assert res.exit_code == 0 and "warning" not in res.stderr, (res.output, res.exception)


def test_eval_kld_refuses_a_reference_with_another_tokenizer(tmp_path, tiny_model, wiki_file):
    """Same vocabulary size, tokens at other ids (two swapped): the KL divergence would compare unrelated
    distributions, so it is refused, naming a token that differs; the model against itself is measured."""
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(tiny_model, ref)
    tok = json.loads((ref / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    a, b = next(t for t, i in vocab.items() if i == 1000), next(t for t, i in vocab.items() if i == 1001)
    vocab[a], vocab[b] = 1001, 1000
    (ref / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    args = ("--data", wiki_file, "--seqlen", "32", "--max-windows", "1", "--device", "cpu")
    assert_error(lmq("eval", "kld", tiny_model, "--reference", ref, *args), "have different tokenizers",
                 "give the reference the model was quantized from")
    res = lmq("eval", "kld", tiny_model, "--reference", tiny_model, *args)
    assert res.exit_code == 0, (res.output, res.exception)


def test_calib_seqlen_past_the_context_is_warned_before_calibration(tmp_path, tiny_model, calib_file):
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    args = ("--group-size", "64", "--calib-data", calib_file, "--calib-samples", "2", "--refine-steps", "0", "--force")
    res = lmq("quantize", tiny_model, "-o", tmp_path / "out", "--calib-seqlen", "96", *args)
    assert res.exit_code == 0, (res.output, res.exception)
    err = " ".join(res.stderr.split())
    assert "warning: --calib-seqlen 96 exceeds the context (max_position_embeddings) of 64 tokens" in err, err
    assert "--calib-seqlen 64 or less" in err and err.index("warning:") < err.index("calibration:"), err
    res = lmq("quantize", tiny_model, "-o", tmp_path / "out", "--calib-seqlen", "64", *args)
    assert res.exit_code == 0 and "warning" not in res.stderr, (res.output, res.exception)


@pytest.fixture(scope="module")
def smollm2_rtn_sm80(smollm2_rtn, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "smollm2-rtn-sm80"
    res = lmq("pack", smollm2_rtn, "--arch", "sm80", "-o", out)
    assert res.exit_code == 0, (res.output, res.exception)
    return out


@pytest.mark.parametrize("key,value,seen", [
    ("intermediate_size", 2048, "model.layers.0.mlp.gate_proj.scales is [9, 1536] but config.json implies [9, 2048]"),
    ("num_key_value_heads", 9, "model.layers.0.self_attn.k_proj.scales is [9, 192] but config.json implies [9, 576]"),
    ("hidden_size", 1152, "model.embed_tokens.weight is [49152, 576] but config.json"),
])
def test_quantized_config_that_does_not_match_its_tensors_is_refused_at_load(tmp_path, smollm2_rtn, smollm2_rtn_sm80,
                                                                             key, value, seen):
    """An edited config.json in a portable or packed SmolLM2 checkpoint is named at load (eval, chat, pack), with
    the tensor, its shape and the config value, instead of failing later in a reshape."""
    bad = {}
    for kind, folder in (("portable", smollm2_rtn), ("packed", smollm2_rtn_sm80)):
        bad[kind] = tmp_path / kind
        bad[kind].mkdir()
        for f in folder.iterdir():  # the weights linked, config.json edited
            (bad[kind] / f.name).symlink_to(f)
        (bad[kind] / "config.json").unlink()
        (bad[kind] / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                           key: value}))
    expect = (seen, f"{key} {value}", "does not match its weights")
    assert_error(lmq("eval", "ppl", bad["portable"], "--data", __file__, "--seqlen", "16", "--device", "cpu"), *expect)
    assert_error(lmq("chat", bad["packed"], "--device", "cpu", "--prompt", "hi"), *expect)
    assert_error(lmq("chat", bad["portable"], "--device", "cpu", "--prompt", "hi"), *expect)
    assert_error(lmq("pack", bad["portable"], "--arch", "sm80", "-o", tmp_path / "repacked"), *expect)
    assert not (tmp_path / "repacked").exists()


@pytest.mark.parametrize("name", ["model[v2]", "model[/x]"])
def test_error_message_is_printed_as_it_is(tmp_path, name):
    """Brackets in a path are not rich markup: neither dropped from the message nor a MarkupError traceback."""
    assert_error(lmq("inspect", tmp_path / name), f"{tmp_path / name} does not exist")


def test_log_and_warn_print_brackets_as_they_are():
    """Paths and values in log lines, warnings and progress bars are not rich markup: `a[/b]` would be a MarkupError
    and `model[v2]` would lose its `[v2]`."""
    from lmq.console import console, log, progress, warn

    with console.capture() as cap:
        log("loading /tmp/a[/b] and model[v2]")
        warn("the reference model[v2] is a 4-bit checkpoint")
        with progress() as bar:
            bar.add_task("loading a[/b]", total=1, info="[v2]")
    text = cap.get()
    assert "loading /tmp/a[/b] and model[v2]" in text
    assert "warning: the reference model[v2] is a 4-bit checkpoint" in text


def test_eval_bf16_kv_rounds_k_and_v_through_bf16():
    """`--kv-dtype bf16` was accepted and shown as bf16 while nothing was simulated: it now rounds K and V through bf16
    (what the engine's bf16 cache does to an fp16 model's), and fp16 stays the model's own precision."""
    import torch

    from lmq.evaluate import kv_transform_for

    t = torch.tensor([1.0 + 2 ** -10, 3.0], dtype=torch.float16)
    assert kv_transform_for("fp16") is None
    assert torch.equal(kv_transform_for("bf16")(t), t.to(torch.bfloat16).to(torch.float16))
    assert not torch.equal(kv_transform_for("bf16")(t), t)
