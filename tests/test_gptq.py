"""GPTQ checkpoints (AutoGPTQ / GPTQModel): the layout, its zero conventions, act-order refusal, and
`lmq pack` / `lmq eval` / `lmq inspect` on a GPTQ checkpoint giving what the equivalent AWQ one gives."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lmq.cli import app
from lmq.errors import CheckpointError, ShapeError, UnsupportedError
from lmq.format import awq_gemm
from lmq.format.gptq import pack_gptq, unpack_gptq
from lmq.format.source import QuantConfig, WeightSource
from lmq.quant.rtn import QuantizedWeight

runner = CliRunner()


def lmq(*args):
    return runner.invoke(app, [str(a) for a in args])


def random_q(N, K, G, zero_min=0):
    return QuantizedWeight(
        codes=torch.randint(0, 16, (N, K), dtype=torch.uint8),
        scales=(torch.rand(N, K // G) + 0.01).to(torch.float16),
        zeros=torch.randint(zero_min, 16, (N, K // G), dtype=torch.uint8),
        bits=4, group_size=G,
    )


def same(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    return (torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
            and a.group_size == b.group_size)


def reference_dequant(t, checkpoint_format):
    """The published GPTQ dequantization, written from the layout description (shifts over words):
    `w[k, n] = s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])`, returned as `[N, K]`."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)  # nibble i at bits 4i
    qw = (t["qweight"].to(torch.int64) & 0xFFFFFFFF)[:, None, :] >> shifts[None, :, None]  # [K/8, 8, N]
    q = (qw & 0xF).reshape(-1, t["qweight"].shape[1])  # [K, N]: row 8r + i from word row r, nibble i
    qz = (t["qzeros"].to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> shifts[None, None, :]  # [K/G, N/8, 8]
    z = (qz & 0xF).reshape(t["qzeros"].shape[0], -1) + (1 if checkpoint_format == "gptq" else 0)  # [K/G, N]
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (q - z[g]).float()).t()  # [N, K]


# ---------------------------------------------------------------------------------------------
# the layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("N,K,G", [(40, 256, 32), (576, 128, 64), (8, 1536, 128), (16, 64, 64)])
def test_round_trip_exact(N, K, G, fmt):
    q = random_q(N, K, G, zero_min=1 if fmt == "gptq" else 0)
    t = pack_gptq(q, fmt)
    assert t["qweight"].shape == (K // 8, N) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (K // G, N // 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (K // G, N) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (K,) and t["g_idx"].dtype == torch.int32
    u = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, G, fmt)
    assert same(u, q)
    assert torch.equal(pack_gptq(u, fmt)["qweight"], t["qweight"])  # deterministic
    assert torch.equal(reference_dequant(t, fmt), q.dequantize())
    # Without a g_idx tensor the trivial k // G is meant.
    assert same(unpack_gptq(t["qweight"], t["qzeros"], t["scales"], None, 4, G, fmt), q)


def test_bit_positions():
    """A single non-zero code / zero lands where the published layout puts it."""
    N, K, G = 16, 64, 32
    for n, k in [(0, 0), (3, 13), (15, 63), (9, 40)]:
        codes = torch.zeros(N, K, dtype=torch.uint8)
        codes[n, k] = 9
        q = QuantizedWeight(codes, torch.ones(N, K // G).half(), torch.full((N, K // G), 1, dtype=torch.uint8), 4, G)
        qw = pack_gptq(q, "gptq_v2")["qweight"]
        assert (int(qw[k // 8, n]) & 0xFFFFFFFF) == 9 << (4 * (k % 8))
        assert int(qw.count_nonzero()) == 1
    for n, g in [(0, 0), (7, 1), (13, 1)]:
        zeros = torch.full((N, K // G), 1, dtype=torch.uint8)
        zeros[n, g] = 6
        q = QuantizedWeight(torch.zeros(N, K, dtype=torch.uint8), torch.ones(N, K // G).half(), zeros, 4, G)
        v1, v2 = pack_gptq(q, "gptq")["qzeros"], pack_gptq(q, "gptq_v2")["qzeros"]
        assert int(v1[g, n // 8]) == 5 << (4 * (n % 8))  # v1: zero - 1, every other nibble 1 - 1 = 0
        assert (int(v2[g, n // 8]) & 0xFFFFFFFF) == 0x11111111 + (5 << (4 * (n % 8)))


def test_v1_and_v2_zero_conventions():
    q = random_q(32, 128, 64, zero_min=1)
    v1, v2 = pack_gptq(q, "gptq"), pack_gptq(q, "gptq_v2")
    assert torch.equal(v1["qweight"], v2["qweight"]) and torch.equal(v1["scales"], v2["scales"])
    # Every stored nibble is one larger in v2: word + 0x11111111, no carry since zeros <= 15.
    words1, words2 = v1["qzeros"].to(torch.int64), v2["qzeros"].to(torch.int64) & 0xFFFFFFFF
    assert torch.equal((words1 + 0x11111111) & 0xFFFFFFFF, words2)
    # Reading v1 tensors as v2 gives zeros one too small: the format is not guessed from the data.
    as_v2 = unpack_gptq(v1["qweight"], v1["qzeros"], v1["scales"], v1["g_idx"], 4, 64, "gptq_v2")
    assert torch.equal(as_v2.zeros.int(), q.zeros.int() - 1)
    # Zero point 0 exists only in v2; a v1 nibble of 15 (zero 16) is refused, not wrapped.
    q0 = random_q(8, 64, 32, zero_min=1)
    q0.zeros[2, 1] = 0
    with pytest.raises(ShapeError, match="gptq_v2"):
        pack_gptq(q0, "gptq")
    t = pack_gptq(q0, "gptq_v2")
    assert same(unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 32, "gptq_v2"), q0)
    q0.zeros[3, 0] = 15
    t = pack_gptq(q0, "gptq_v2")  # read as v1, the nibble 15 means zero point 16
    with pytest.raises(CheckpointError, match="layers.0.q: .*zero point 16.*'gptq_v2'"):
        unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 32, "gptq", name="layers.0.q")


def test_group_size_minus_one_is_one_group_per_row():
    q = random_q(16, 128, 128)
    t = pack_gptq(q, "gptq_v2")
    t["g_idx"] = torch.zeros(128, dtype=torch.int32)
    assert same(unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, -1, "gptq_v2"), q)


def test_act_order():
    q = random_q(16, 128, 32, zero_min=1)
    t = pack_gptq(q, "gptq")
    # desc_act=True with the trivial g_idx reads like any other checkpoint.
    assert same(unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 32, "gptq", desc_act=True), q)
    g_idx = t["g_idx"][torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(UnsupportedError, match=r"model.layers.3.mlp.up_proj: g_idx is not k // 32.*act-order.*"
                                               r"desc_act=False.*lmq quantize"):
        unpack_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, 4, 32, "gptq", name="model.layers.3.mlp.up_proj",
                    desc_act=True)


def test_bad_inputs():
    t = pack_gptq(random_q(16, 128, 32, zero_min=1))
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    with pytest.raises(UnsupportedError, match="3-bit GPTQ"):
        unpack_gptq(*args, 3, 32, "gptq")
    with pytest.raises(UnsupportedError, match="'marlin'"):
        unpack_gptq(*args, 4, 32, "marlin")
    with pytest.raises(CheckpointError, match="disagree with group size 64"):
        unpack_gptq(*args, 4, 64, "gptq")
    with pytest.raises(CheckpointError, match="group size 48 does not divide"):
        unpack_gptq(*args, 4, 48, "gptq")
    with pytest.raises(CheckpointError, match="int32"):
        unpack_gptq(t["qweight"].to(torch.int64), *args[1:], 4, 32, "gptq")
    with pytest.raises(CheckpointError, match=r"g_idx must be integer \[K=128\]"):
        unpack_gptq(*args[:3], t["g_idx"][:64], 4, 32, "gptq")
    with pytest.raises(CheckpointError, match="disagree"):  # N not a multiple of 8: qzeros cannot match
        unpack_gptq(t["qweight"][:, :12], t["qzeros"], t["scales"][:, :12], t["g_idx"], 4, 32, "gptq")
    with pytest.raises(UnsupportedError, match="3-bit"):
        pack_gptq(QuantizedWeight(*(random_q(8, 64, 32).__dict__[k] for k in ("codes", "scales", "zeros")), 3, 32))
    with pytest.raises(ShapeError, match="divisible by 8"):
        pack_gptq(random_q(12, 64, 32, zero_min=1))


def test_quant_config_reads_gptq_configs(tmp_path):
    base = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    qc = QuantConfig.from_hf(base, tmp_path)
    assert (qc.method, qc.version, qc.zero_point, qc.desc_act, qc.group_size) == ("gptq", "gptq", False, True, 128)
    assert QuantConfig.from_hf({**base, "format": "gptq_v2", "sym": False}, tmp_path).version == "gptq_v2"
    assert QuantConfig.from_hf({**base, "checkpoint_format": "GPTQ_V2"}, tmp_path).zero_point is False
    assert QuantConfig.from_hf({**base, "checkpoint_format": "gptq"}, tmp_path).to_hf()["checkpoint_format"] == "gptq"
    with pytest.raises(CheckpointError, match="two GPTQ formats"):
        QuantConfig.from_hf({**base, "format": "gptq_v2", "checkpoint_format": "gptq"}, tmp_path)
    with pytest.raises(UnsupportedError, match="'marlin' is not readable"):
        QuantConfig.from_hf({**base, "checkpoint_format": "marlin"}, tmp_path)
    with pytest.raises(UnsupportedError, match="8-bit GPTQ"):
        QuantConfig.from_hf({**base, "bits": 8}, tmp_path)
    with pytest.raises(UnsupportedError, match="dynamic"):
        QuantConfig.from_hf({**base, "dynamic": {"-:.*down_proj": {}}}, tmp_path)
    with pytest.raises(UnsupportedError, match="pack_dtype"):
        QuantConfig.from_hf({**base, "pack_dtype": "int64"}, tmp_path)


# ---------------------------------------------------------------------------------------------
# end to end: lmq's RTN checkpoint re-written as GPTQ
# ---------------------------------------------------------------------------------------------
def gptq_from_awq(awq_dir, out, fmt="gptq", sym=False, desc_act=False, scramble=None):
    """Re-write lmq's portable (AWQ gemm) checkpoint as a GPTQModel checkpoint: GPTQ tensors, config.json's
    quantization_config and quantize_config.json as GPTQModel writes them, no lmq manifest. `scramble`
    names a linear whose g_idx is permuted (as act-order leaves it)."""
    out.mkdir()
    cfg = json.loads((awq_dir / "config.json").read_text())
    G = cfg["quantization_config"]["group_size"]
    sd = load_file(str(awq_dir / "model.safetensors"))
    tensors = {}
    for name, t in sd.items():
        if not name.endswith(".qweight"):
            if not name.endswith((".qzeros", ".scales")):
                tensors[name] = t
            continue
        p = name[: -len(".qweight")]
        q = awq_gemm.unpack(sd[p + ".qweight"], sd[p + ".qzeros"], sd[p + ".scales"], G, p)
        t = pack_gptq(q, fmt)
        if p == scramble:
            trivial = t["g_idx"]
            t["g_idx"] = trivial[torch.randperm(trivial.numel(), generator=torch.Generator().manual_seed(1))]
            assert not torch.equal(t["g_idx"], trivial), "scramble a linear with more than one group"
        tensors.update({f"{p}.{k}": v for k, v in t.items()})
    save_file(tensors, str(out / "model.safetensors"))
    qc = {"bits": 4, "group_size": G, "desc_act": desc_act, "sym": sym, "lm_head": False, "quant_method": "gptq",
          "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32", "true_sequential": True,
          "damp_percent": 0.05,
          "meta": {"quantizer": ["gptqmodel:2.2.0"], "uri": "https://github.com/modelcloud/gptqmodel"}}
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "quantize_config.json").write_text(json.dumps(qc))
    for f in awq_dir.iterdir():
        if f.name not in ("config.json", "manifest.json", "model.safetensors"):
            shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def awq_ckpt(tmp_path_factory, smollm2):
    from conftest import make_tiny_model

    tmp = tmp_path_factory.mktemp("gptq")
    model = make_tiny_model(tmp / "tiny", smollm2)
    out = tmp / "awq"
    r = lmq("quantize", model, "-o", out, "--method", "rtn", "--group-size", "64")
    assert r.exit_code == 0, r.output
    return out


def ppl(path, wiki_file):
    r = lmq("eval", "ppl", path, "--data", wiki_file, "--seqlen", "64", "--max-windows", "3", "--device", "cpu",
            "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["ppl"]


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_checkpoint_packs_and_evaluates_like_the_awq_one(tmp_path, awq_ckpt, wiki_file, fmt):
    sd = load_file(str(awq_ckpt / "model.safetensors"))
    if fmt == "gptq":  # v1 cannot hold zero point 0; RTN on these random weights never makes one
        assert all(int(awq_gemm._unpack_rows(v).min()) > 0 for k, v in sd.items() if k.endswith(".qzeros"))
    g_dir = gptq_from_awq(awq_ckpt, tmp_path / "g", fmt)

    src = WeightSource(g_dir)
    assert src.quant.method == "gptq" and src.quant.version == fmt
    ref = WeightSource(awq_ckpt)
    for i in range(ref.cfg.num_layers):
        for k, v in ref.layer(i, torch.float32).items():
            assert torch.equal(src.layer(i, torch.float32)[k], v), k

    r = lmq("inspect", g_dir, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["kind"] == fmt and info["quantized_linears"] == 14
    assert info["quantization"]["quant_method"] == "gptq"

    for d in ("g", "a"):
        r = lmq("pack", g_dir if d == "g" else awq_ckpt, "--arch", "sm80", "-o", tmp_path / f"{d}-sm80")
        assert r.exit_code == 0, r.output
    from_g, from_a = load_file(str(tmp_path / "g-sm80" / "model.safetensors")), load_file(
        str(tmp_path / "a-sm80" / "model.safetensors"))
    assert sorted(from_g) == sorted(from_a) and not any(k.endswith(".g_idx") for k in from_g)
    for k in from_a:
        assert torch.equal(from_g[k], from_a[k]), k
    m = json.loads((tmp_path / "g-sm80" / "manifest.json").read_text())
    assert m["source"]["kind"] == fmt and m["source"]["quantization_config"]["quant_method"] == "gptq"
    assert m["zero_point"] is True and m["group_size"] == 64
    packed_qc = json.loads((tmp_path / "g-sm80" / "config.json").read_text())["quantization_config"]
    assert packed_qc == {**json.loads((tmp_path / "a-sm80" / "config.json").read_text())["quantization_config"]}
    assert not (tmp_path / "g-sm80" / "quantize_config.json").exists()  # GPTQ loaders would misread the folder

    want = ppl(awq_ckpt, wiki_file)
    assert ppl(g_dir, wiki_file) == want
    assert ppl(tmp_path / "g-sm80", wiki_file) == want


def test_symmetric_gptq(tmp_path, tiny_model):
    """sym=True: every zero is 8 (stored 7 in v1), read as lmq's symmetric form."""
    a = tmp_path / "a"
    assert lmq("quantize", tiny_model, "-o", a, "--method", "rtn", "--group-size", "32", "--symmetric").exit_code == 0
    g = gptq_from_awq(a, tmp_path / "g", "gptq", sym=True)
    qw = load_file(str(g / "model.safetensors"))["model.layers.0.mlp.up_proj.qzeros"]
    assert bool(((qw.to(torch.int64) & 0xFFFFFFFF) == 0x77777777).all())
    src = WeightSource(g)
    assert src.quant.zero_point is False
    assert torch.equal(src.layer(1, torch.float32)["mlp.down_proj.weight"],
                       WeightSource(a).layer(1, torch.float32)["mlp.down_proj.weight"])


@pytest.mark.parametrize("cmd", ["pack", "eval", "inspect-then-pack"])
def test_act_order_refused_at_the_cli(tmp_path, awq_ckpt, wiki_file, cmd):
    g = gptq_from_awq(awq_ckpt, tmp_path / "g", "gptq", desc_act=True, scramble="model.layers.1.mlp.down_proj")
    if cmd == "inspect-then-pack":  # inspect reads headers only: it describes the folder, then pack refuses it
        r = lmq("inspect", g, "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "gptq"
    if cmd == "eval":
        r = lmq("eval", "ppl", g, "--data", wiki_file, "--seqlen", "64", "--max-windows", "1", "--device", "cpu")
    else:
        r = lmq("pack", g, "--arch", "sm80", "-o", tmp_path / "p")
    assert r.exit_code == 1, r.output
    assert r.stderr.count("error:") == 1, r.stderr
    err = " ".join(r.stderr.split())
    for frag in ("model.layers.1.mlp.down_proj", "act-order", "desc_act=True", "desc_act=False", "lmq quantize"):
        assert frag in err, (frag, err)
    assert "Traceback" not in r.output
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))


def test_act_order_flag_with_trivial_g_idx_packs(tmp_path, awq_ckpt):
    g = gptq_from_awq(awq_ckpt, tmp_path / "g", "gptq_v2", desc_act=True)
    r = lmq("pack", g, "--arch", "sm90", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
