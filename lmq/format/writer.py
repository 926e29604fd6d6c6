"""Atomic checkpoint writing: build into a temporary folder beside the target, rename at the end.

An interrupted or failed write (Ctrl-C, disk full, a bug) removes the temporary folder, so no
half-written checkpoint that looks complete is ever left at the target path. Tensors stream into
safetensors shards of bounded size, so a writer never holds a whole model in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from lmq.errors import InputError, LmqError

DEFAULT_SHARD_BYTES = 4 * 1024**3


def check_output_path(out: Path, force: bool, source: Path | None = None) -> None:
    """Refuse to overwrite an existing output unless asked to (checked before any long work), and, with `source`,
    an output that is the source folder or holds it (replacing it would delete the input, --force or not)."""
    if source is not None and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise InputError(f"-o {out} would overwrite the source {source}, which it is or holds; choose another "
                         "output folder")
    if out.exists() and not out.is_dir():  # --force replaces an earlier output folder, not some file
        raise InputError(f"-o {out} is a file, not a folder; choose another -o")
    if out.exists() and not force:
        raise InputError(f"output folder {out} already exists; choose another -o, or pass --force to replace it")
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"cannot write {out}: {parent} is a file, not a folder; choose another -o")


class CheckpointWriter:
    """Context manager: `with CheckpointWriter(out, force) as w: w.add(name, tensor) ...`."""

    def __init__(self, out: Path, force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out = Path(out)
        self.force = force
        self.shard_bytes = shard_bytes
        self.tmp: Optional[Path] = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | str] = []
        self._weight_map: dict[str, str] = {}
        self.bytes_written = 0

    def __enter__(self) -> "CheckpointWriter":
        check_output_path(self.out, self.force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
                return False
            except BaseException as e:  # the final flush or rename failed: clean up the same way
                exc = e
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # safetensors' I/O errors
            kept = "the previous checkpoint there is unchanged" if self.out.exists() else "nothing was left there"
            raise LmqError(f"writing {self.out} failed ({exc}); {kept}: free space (or fix permissions) "
                           "and retry") from exc
        if exc_type is None:
            raise exc
        return False

    # -- tensors ---------------------------------------------------------------------------------
    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        idx = len(self._shards)
        fname = f"shard-{idx:05d}.safetensors"
        save_file(self._pending, str(self.tmp / fname), metadata={"format": "pt"})
        self.bytes_written += os.path.getsize(self.tmp / fname)
        for n in self._pending:
            self._weight_map[n] = fname
        self._shards.append(fname)
        self._pending, self._pending_bytes = {}, 0

    # -- other files -----------------------------------------------------------------------------
    def write_json(self, name: str, data: dict) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2) + "\n")

    def copy_file(self, src: Path) -> None:
        shutil.copyfile(src, self.tmp / src.name)

    def _finish(self) -> None:
        self._flush()
        # Standard Hugging Face names: model.safetensors, or model-0000i-of-0000n + index.
        n = len(self._shards)
        rename = {}
        for i, fname in enumerate(self._shards):
            rename[fname] = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / fname, self.tmp / rename[fname])
        if n > 1:
            self.write_json("model.safetensors.index.json", {
                "metadata": {"total_size": self.bytes_written},
                "weight_map": {k: rename[v] for k, v in sorted(self._weight_map.items())},
            })
        if self.out.exists():  # --force: swap the old folder out only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "x")
            try:
                os.replace(self.tmp, self.out)
            except BaseException:
                os.replace(old / "x", self.out)  # put the previous checkpoint back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
