import json

import pytest

from lmq.errors import CheckpointError
from lmq.format.manifest import FORMAT_VERSION, read_manifest, write_manifest


def test_round_trip(tmp_path):
    write_manifest(tmp_path, {"kind": "quantized", "quantization": {"bits": 4, "group_size": 64}})
    m = read_manifest(tmp_path)
    assert m["format_version"] == FORMAT_VERSION and m["kind"] == "quantized"
    assert m["quantization"] == {"bits": 4, "group_size": 64} and "lmq_version" in m


def test_missing_manifest_is_none(tmp_path):
    assert read_manifest(tmp_path) is None


def test_newer_format_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "kind": "quantized"}))
    with pytest.raises(CheckpointError, match="newer.*upgrade lmq"):
        read_manifest(tmp_path)


def test_corrupt_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_unknown_kind_is_a_bug(tmp_path):
    with pytest.raises(ValueError):
        write_manifest(tmp_path, {"kind": "other"})
