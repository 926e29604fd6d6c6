"""Checkpoint formats end to end on toy models: shards, dtypes, calibration file kinds, hub ids offline."""

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_model
from lmq.cli import app
from lmq.format.source import WeightSource
from lmq.format.writer import CheckpointWriter
from lmq.quant.calib import calibration_tokens

runner = CliRunner()


def test_sharded_checkpoint_round_trip(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 64) for i in range(5)}
    out = tmp_path / "ck"
    with CheckpointWriter(out, shard_bytes=20_000) as w:
        for k, v in tensors.items():
            w.add(k, v)
        w.write_json("config.json", {"model_type": "llama"})
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    from safetensors import safe_open

    for k, v in tensors.items():
        with safe_open(str(out / index["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), v)


def test_bf16_model_keeps_bf16_and_reads_across_shards(tmp_path, smollm2):
    m = make_tiny_model(tmp_path / "m", smollm2, tie=False)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    names = sorted(sd)
    save_file({k: sd[k].bfloat16() for k in names[::2]}, str(m / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k].bfloat16() for k in names[1::2]}, str(m / "model-00002-of-00002.safetensors"))
    cfg = json.loads((m / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (m / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(m), "-o", str(out), "--method", "rtn", "--group-size", "32"])
    assert res.exit_code == 0, res.output
    src = WeightSource(out)
    assert src.get("model.norm.weight").dtype == torch.bfloat16
    assert src.get("lm_head.weight").dtype == torch.bfloat16  # untied head kept in float
    assert src.get("model.layers.1.mlp.down_proj.scales").dtype == torch.float16
    out16 = tmp_path / "q16"
    res = runner.invoke(app, ["quantize", str(m), "-o", str(out16), "--method", "rtn", "--group-size", "32",
                              "--dtype", "float16"])
    assert res.exit_code == 0, res.output
    assert WeightSource(out16).get("model.norm.weight").dtype == torch.float16


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "folder"])
def test_calibration_from_table_files_and_folders(tmp_path, smollm2, calib_file, kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    from lmq.quant.calib import load_documents

    docs = load_documents(calib_file)[:40]
    assert len(docs) == 40
    if kind == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": docs}), str(path))
    else:
        path = tmp_path / "calib"
        path.mkdir()
        (path / "a.txt").write_text("\n\n".join(docs[:20]))
        (path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[20:]))
    ids = calibration_tokens(str(path), tok, 4, 32, seed=0)
    assert ids.shape == (4, 32) and ids.dtype == torch.int64
    assert torch.equal(ids, calibration_tokens(str(path), tok, 4, 32, seed=0))  # deterministic


def test_hub_id_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(app, ["quantize", "some-org/some-model", "-o", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "could not be fetched from the Hugging Face hub" in " ".join(res.stderr.split())


@pytest.fixture
def hub(monkeypatch):
    """The hub and `datasets` faked (no test goes online): `hub.up` says whether the probe gets an answer,
    `hub.loads` records the data sets asked of `datasets.load_dataset`, which raises as datasets does offline."""
    import types

    import datasets
    import huggingface_hub.utils

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    state = types.SimpleNamespace(up=False, status=200, cached=False, probes=0, loads=[])

    class Session:
        def head(self, url, timeout=None):
            state.probes += 1
            assert timeout is not None and timeout <= 5
            if not state.up:
                raise OSError("[Errno -2] Name or service not known")
            return types.SimpleNamespace(status_code=state.status)

    def load_dataset(name, config=None, split=None):
        state.loads.append(name)
        offline = datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
        if (state.up and state.status < 400 and not offline) or (offline and state.cached):
            return {"text": ["a calibration document", "", "another one"]}
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session())
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return state


def test_default_calibration_set_fails_fast_when_the_hub_is_unreachable(tmp_path, tiny_model, hub):
    """No --calib-data (pileval) and no network: one short probe, not datasets' ~30 s of retries, then an error
    that says how to calibrate on a local file."""
    t0 = time.time()
    res = runner.invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "out"), "--group-size", "64"])
    assert res.exit_code == 1, (res.output, res.exception)
    err = " ".join(res.stderr.split())
    assert "'pileval'" in err and "--calib-data path/to/calib.txt" in err and "no copy is in the datasets cache" in err
    assert hub.probes == 1 and hub.loads == ["mit-han-lab/pile-val-backup"] and time.time() - t0 < 10  # cache only
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("status", [None, 407, 502])
def test_unreachable_hub_still_reads_a_cached_copy(hub, status):
    """No answer from the hub (or a proxy's 407, a gateway's 5xx): a copy in the datasets cache is read at once,
    with the hub switched off for that call only."""
    import datasets

    from lmq.quant.calib import load_documents

    hub.cached = True
    if status is not None:
        hub.up, hub.status = True, status
    before = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    assert load_documents("pileval") == ["a calibration document", "another one"]
    assert hub.probes == 1 and hub.loads == ["mit-han-lab/pile-val-backup"]
    assert (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE) == before


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_calibration_set_offline_reads_the_cache_only(hub, monkeypatch, var):
    """With an offline variable set the hub is not asked; a data set missing from the cache names the variable."""
    from lmq.errors import InputError
    from lmq.quant.calib import load_documents

    monkeypatch.setenv(var, "1")
    with pytest.raises(InputError, match=f"{var} is set and no copy is in the datasets cache.*--calib-data"):
        load_documents("pileval")
    assert hub.probes == 0 and hub.loads == ["mit-han-lab/pile-val-backup"]


def test_hub_calibration_set_online_is_downloaded(hub):
    from lmq.quant.calib import load_documents

    hub.up = True
    assert load_documents("pileval") == ["a calibration document", "another one"]
    assert hub.probes == 1 and hub.loads == ["mit-han-lab/pile-val-backup"]


def test_text_file_documents_by_paragraph_or_line(tmp_path):
    from lmq.quant.calib import load_documents

    (tmp_path / "p.txt").write_text("first para\nstill first\n\nsecond\n\n\nthird\n")
    assert load_documents(str(tmp_path / "p.txt")) == ["first para\nstill first", "second", "third"]
    (tmp_path / "l.txt").write_text("doc one\ndoc two\ndoc four\n")
    assert load_documents(str(tmp_path / "l.txt")) == ["doc one", "doc two", "doc four"]


def test_empty_table_file_is_a_clear_error(tmp_path):
    from lmq.errors import InputError
    from lmq.quant.calib import load_documents

    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(InputError, match="empty or malformed"):
        load_documents(str(tmp_path / "e.jsonl"))


def test_sharded_source_follows_its_index(tmp_path, smollm2):
    from safetensors.torch import load_file, save_file

    from lmq.errors import CheckpointError

    m = make_tiny_model(tmp_path / "m", smollm2)
    sd = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ns in shards.items():
        save_file({k: sd[k] for k in ns}, str(m / f))
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ns in shards.items() for k in ns}}))
    # A stray consolidated file (as Mistral repos ship) with conflicting contents is not read.
    save_file({names[0]: torch.full_like(sd[names[0]], 7.0)}, str(m / "consolidated.safetensors"))
    src = WeightSource(m)
    assert torch.equal(src.get(names[0]), sd[names[0]])
    assert (m / "consolidated.safetensors") not in src.weight_files
    # an index that places a tensor in the wrong shard is named when the folder is opened, not as a "corrupt"
    # file once a long quantization reaches that tensor
    index = json.loads((m / "model.safetensors.index.json").read_text())
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict(index["weight_map"], **{names[0]: "model-00002-of-00002.safetensors"})}))
    with pytest.raises(CheckpointError, match=f"places {names[0]} in model-00002-of-00002.safetensors, which does "
                       "not hold it; the index does not match its shards"):
        WeightSource(m)
    (m / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002"):
        WeightSource(m)


def test_awq_is_deterministic_for_a_seed(tmp_path, tiny_model, calib_file):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = runner.invoke(app, ["quantize", str(tiny_model), "-o", str(out), "--group-size", "32",
                                  "--calib-data", calib_file, "--calib-samples", "4", "--calib-seqlen", "32",
                                  "--seed", "3", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
