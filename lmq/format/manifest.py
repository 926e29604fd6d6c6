"""lmq's `manifest.json`: the settings and provenance of a checkpoint, with an explicit format version.

Settings are read from here (and from config.json's standard `quantization_config`), never from
file or folder names. Readers refuse a newer `format_version` than they know.

Kinds: "quantized" (portable, GPU-independent; `lmq quantize`) and "packed" (one GPU generation;
`lmq pack`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lmq.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("quantized", "packed")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` into `folder` (the caller's temporary folder: writes are atomic there)."""
    from lmq import __version__

    data = {"format_version": FORMAT_VERSION, "lmq_version": __version__, **manifest}
    if data.get("kind") not in KINDS:
        raise ValueError(f"manifest kind must be one of {KINDS}, got {data.get('kind')!r}")
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def quantization_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What `lmq quantize` recorded (its float source, per-layer errors, settings): the manifest itself, or for a
    packed checkpoint the copy of its source's that `lmq pack` keeps under source.settings."""
    if manifest.get("kind") == "packed":
        return (manifest.get("source") or {}).get("settings") or {}
    return manifest


def read_manifest(folder: Path) -> Optional[dict[str, Any]]:
    """The manifest of a checkpoint folder, None when it has none (e.g. an AutoAWQ checkpoint)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt, re-create it") from e
    if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
        raise CheckpointError(f"{path} has no integer format_version; the checkpoint is corrupt, re-create it")
    if data["format_version"] > FORMAT_VERSION:
        from lmq import __version__

        raise CheckpointError(
            f"{path} has format_version {data['format_version']}, newer than this lmq {__version__} reads "
            f"(<= {FORMAT_VERSION}); upgrade lmq (pip install -U lmq)"
        )
    return data
