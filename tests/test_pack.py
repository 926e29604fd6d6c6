"""Layout round trips and `lmq pack` on a tiny portable checkpoint written here."""

import json

import pytest
import torch
from lmq.kernels.w4a16_gemm import CONFIGS, w4a16_gemm
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lmq.cli import app
from lmq.errors import CheckpointError, InputError, ShapeError, UnsupportedError
from lmq.format import awq_gemm
from lmq.pack import api, planes64
from lmq.quant.rtn import QuantizedWeight, quantize


def random_q(N, K, G):
    return QuantizedWeight(
        codes=torch.randint(0, 16, (N, K), dtype=torch.uint8),
        scales=(torch.rand(N, K // G) + 0.01).to(torch.float16),
        zeros=torch.randint(0, 16, (N, K // G), dtype=torch.uint8),
        bits=4, group_size=G,
    )


@pytest.mark.parametrize("N,K,G", [(40, 256, 32), (576, 128, 64), (8, 1536, 128), (3, 64, 32)])
def test_planes64_round_trip_exact(N, K, G):
    q = random_q(N, K, G)
    p = planes64.pack(q)
    assert p["qweight"].shape == (K // 64, N, 16) and p["qweight"].dtype == torch.int16
    u = planes64.unpack(p["qweight"], p["scales"], p["zeros"], G)
    assert torch.equal(u.codes, q.codes) and torch.equal(u.scales, q.scales) and torch.equal(u.zeros, q.zeros)
    assert torch.equal(planes64.pack(u)["qweight"], p["qweight"])  # deterministic


def test_planes64_bit_order_is_k_index():
    """A single non-zero code lands in the nibble and lane `k_index` names."""
    N, K = 5, 192
    for chunk, plane, lane in [(0, 0, 0), (1, 3, 15), (2, 1, 7)]:
        codes = torch.zeros(N, K, dtype=torch.uint8)
        k = planes64.k_index(chunk, plane, lane)
        codes[3, k] = 9
        q = QuantizedWeight(codes, torch.ones(N, K // 64, dtype=torch.float16),
                            torch.zeros(N, K // 64, dtype=torch.uint8), 4, 64)
        h = planes64.pack(q)["qweight"].to(torch.int32) & 0xFFFF  # [K/64, N, 16]
        assert int(h[chunk, 3, lane]) == 9 << (4 * plane)
        assert int(h.count_nonzero()) == 1


def test_planes64_rejects_bad_shapes():
    with pytest.raises(ShapeError, match="divisible by 64"):
        planes64.pack(random_q(8, 96, 32))
    with pytest.raises(ShapeError, match="group size 16"):
        planes64.pack(random_q(8, 128, 16))
    p = planes64.pack(random_q(8, 128, 64))
    with pytest.raises(ShapeError, match="scales must be"):
        planes64.unpack(p["qweight"], p["scales"][:1], p["zeros"], 64)


def test_every_arch_layout_gives_the_reference_gemm(device):
    """AWQ gemm tensors -> each arch's layout -> kernel == the dequantized AWQ weight's product."""
    N, K, G = 40, 128, 64
    q = quantize(torch.randn(N, K), 4, G)
    awq = awq_gemm.pack(q)
    x = torch.randn(3, K).half()
    want = (x.float() @ q.dequantize().t())
    for arch in api.LAYOUTS:
        p = api.pack_linear(awq["qweight"], awq["qzeros"], awq["scales"], G, arch)
        p = {k: v.to(device) for k, v in p.items()}
        out = w4a16_gemm(x.to(device), p["qweight"], p["scales"], p["zeros"], G).float().cpu()
        assert ((out - want).norm() / want.norm()) < 2e-3, arch


# ---------------------------------------------------------------------------------------------
# lmq pack on a tiny portable checkpoint
# ---------------------------------------------------------------------------------------------
LINEARS = {"model.layers.0.self_attn.q_proj": (64, 128), "model.layers.0.mlp.down_proj": (48, 192)}


def write_portable(folder, G=64, sharded=False):
    """A tiny quantized checkpoint in the portable format (AWQ gemm tensors + fp16 rest)."""
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": torch.randn(32, 128).half(),
               "model.norm.weight": torch.randn(128).half()}
    qs = {}
    for prefix, (N, K) in LINEARS.items():
        q = quantize(torch.randn(N, K), 4, G)
        qs[prefix] = q
        for k, v in awq_gemm.pack(q).items():
            tensors[f"{prefix}.{k}"] = v
    if sharded:
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for fname, ns in halves.items():
            save_file({n: tensors[n] for n in ns}, str(folder / fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, ns in halves.items() for n in ns}}))
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama",
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
                                "version": "gemm"}}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "kind": "quantized", "method": "rtn"}))
    return tensors, qs


@pytest.mark.parametrize("sharded", [False, True])
def test_pack_checkpoint(tmp_path, sharded):
    src, out = tmp_path / "q", tmp_path / "packed"
    tensors, qs = write_portable(src, sharded=sharded)
    info = api.pack_checkpoint(src, out, "sm90")
    assert info["linears"] == 2 and not list(tmp_path.glob(".packed.tmp-*"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "packed" and m["arch"] == "sm90" and m["layout"] == {"name": "planes64", "version": 1}
    assert m["min_compute_capability"] == "9.0" and m["kernel_config"] == json.loads(json.dumps(CONFIGS["sm90"]))
    assert m["source"]["path"] == str(src) and m["source"]["kind"] == "quantized"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["version"] == "lmq-planes64"
    assert (out / "tokenizer.json").exists()
    packed = load_file(str(out / "model.safetensors"))
    assert torch.equal(packed["model.norm.weight"], tensors["model.norm.weight"])
    for prefix, q in qs.items():
        u = planes64.unpack(packed[f"{prefix}.qweight"], packed[f"{prefix}.scales"], packed[f"{prefix}.zeros"], 64)
        assert torch.equal(u.codes, q.codes) and torch.equal(u.scales, q.scales) and torch.equal(u.zeros, q.zeros)
    assert api.check_packed_for(out, "sm90")["arch"] == "sm90"
    with pytest.raises(CheckpointError, match=f"lmq pack {src} --arch sm80 -o {out}-sm80"):
        api.check_packed_for(out, "sm80")


def test_pack_is_deterministic_and_refuses_overwrite(tmp_path):
    src = tmp_path / "q"
    write_portable(src)
    api.pack_checkpoint(src, tmp_path / "a", "sm80")
    api.pack_checkpoint(src, tmp_path / "b", "sm80")
    for f in ("model.safetensors", "manifest.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    with pytest.raises(InputError, match="--force"):
        api.pack_checkpoint(src, tmp_path / "a", "sm80")
    api.pack_checkpoint(src, tmp_path / "a", "sm86", force=True)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["arch"] == "sm86"
    # an output that is the source, or a folder holding it, is refused even with --force: replacing it would
    # delete the source and whatever sits beside it
    (tmp_path / "keep.txt").write_text("keep")
    for out in (src, tmp_path):
        with pytest.raises(InputError, match="would overwrite the source"):
            api.pack_checkpoint(src, out, "sm80", force=True)
    assert (tmp_path / "keep.txt").read_text() == "keep" and (src / "manifest.json").exists()


def test_pack_refuses_bad_inputs(tmp_path):
    src = tmp_path / "q"
    write_portable(src)
    with pytest.raises(InputError, match="sm70"):
        api.pack_checkpoint(src, tmp_path / "o", "sm70")
    api.pack_checkpoint(src, tmp_path / "p", "sm90")
    with pytest.raises(UnsupportedError, match="already packed"):
        api.pack_checkpoint(tmp_path / "p", tmp_path / "o", "sm90")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="lmq quantize"):
        api.pack_checkpoint(tmp_path / "plain", tmp_path / "o", "sm90")


def test_pack_cli(tmp_path):
    src = tmp_path / "q"
    write_portable(src)
    r = CliRunner().invoke(app, ["pack", str(src), "--arch", "sm89", "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["arch"] == "sm89"
    r = CliRunner().invoke(app, ["pack", str(src), "--arch", "sm89", "-o", str(tmp_path / "p")])
    assert r.exit_code == 1 and "--force" in r.output
    # lmq inspect's table says what it was packed for, in a few rows (not the source's whole manifest)
    from types import SimpleNamespace

    from lmq import render
    from lmq.console import out as console

    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    info = SimpleNamespace(path=tmp_path / "p", kind="packed", model_type="llama", num_layers=1, hidden_size=64,
                           params=1e6, weight_bytes=1e6, quantized_linears=7, bits_per_weight=4.25, quantization=None,
                           manifest=manifest, layers=None, problem=None)
    with console.capture() as cap:
        render.inspect_table(info)
    text = " ".join(cap.get().split())
    assert "sm89 (compute capability >= 8.9)" in text and "planes64 v" in text and "calibration" not in text


def test_load_linears_packed_or_portable(tmp_path):
    """The runtime's loader gets the same arch-layout tensors from a packed and from a portable folder."""
    src = tmp_path / "q"
    write_portable(src)
    api.pack_checkpoint(src, tmp_path / "p", "sm86")
    G1, from_packed = api.load_linears(tmp_path / "p", "sm86")
    G2, from_portable = api.load_linears(src, "sm86")
    assert G1 == G2 == 64 and sorted(from_packed) == sorted(LINEARS)
    for prefix in LINEARS:
        for k in ("qweight", "scales", "zeros"):
            assert torch.equal(from_packed[prefix][k], from_portable[prefix][k])
    with pytest.raises(CheckpointError, match="lmq pack .* --arch sm90"):
        api.load_linears(tmp_path / "p", "sm90")


def test_quantize_then_pack_then_kernel(tmp_path, tiny_model, device):
    """`lmq quantize` (RTN) -> `lmq pack` -> the GEMM kernel on every packed linear == the portable weight."""
    from safetensors import safe_open

    from lmq.format.source import TOKENIZER_FILES

    q_dir, p_dir = tmp_path / "q", tmp_path / "p"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(q_dir), "--method", "rtn", "--group-size", "64"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["pack", str(q_dir), "--arch", "sm80", "-o", str(p_dir)])
    assert r.exit_code == 0, r.output
    assert any((p_dir / f).exists() for f in TOKENIZER_FILES)
    G, linears = api.load_linears(p_dir, "sm80")
    assert G == 64 and len(linears) > 0
    with safe_open(str(q_dir / "model.safetensors"), "pt") as f:
        for name, t in sorted(linears.items())[:3]:
            q = awq_gemm.unpack(f.get_tensor(name + ".qweight"), f.get_tensor(name + ".qzeros"),
                                f.get_tensor(name + ".scales"), G, name)
            x = torch.randn(2, q.codes.shape[1]).half()
            want = x.float() @ q.dequantize().t()
            qw, s, z = (t[k].to(device) for k in ("qweight", "scales", "zeros"))
            out = w4a16_gemm(x.to(device), qw, s, z, G).float().cpu()
            assert ((out - want).norm() / want.norm()) < 2e-3, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message of --arch auto")
def test_pack_auto_without_gpu_says_so(tmp_path):
    src = tmp_path / "q"
    write_portable(src)
    with pytest.raises(UnsupportedError, match="no CUDA GPU"):
        api.pack_checkpoint(src, tmp_path / "o", "auto")
    assert not (tmp_path / "o").exists()


def test_inspect_of_a_packed_checkpoint_shows_its_sources_layer_errors(smollm2_rtn, tmp_path):
    """The per-layer errors `lmq quantize` recorded travel into the packed manifest (under its source); `lmq inspect`
    of the packed folder shows them as it does for the portable one."""
    from lmq.inspect import inspect_checkpoint

    api.pack_checkpoint(smollm2_rtn, tmp_path / "p", "sm80")
    portable, packed = inspect_checkpoint(str(smollm2_rtn)), inspect_checkpoint(str(tmp_path / "p"))
    assert portable.layers and packed.layers == portable.layers and packed.kind == "packed"


def test_inspect_of_an_rtn_checkpoint_says_no_layer_errors_were_recorded(smollm2_rtn):
    """RTN measures no per-layer error (no calibration data): `lmq inspect` says so in one line instead of a table of
    dashes."""
    from lmq.console import out
    from lmq.inspect import inspect_checkpoint
    from lmq.render import inspect_table

    info = inspect_checkpoint(str(smollm2_rtn))
    with out.capture() as cap:
        inspect_table(info)
    text = cap.get()
    assert f"none recorded ({len(info.layers)} layers" in text and "AWQ err" not in text
