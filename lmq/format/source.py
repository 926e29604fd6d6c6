"""Read any checkpoint folder lmq accepts: a Hugging Face model, an lmq portable or packed checkpoint,
an AutoAWQ (gemm) checkpoint, or a GPTQ one (AutoGPTQ / GPTQModel, formats gptq and gptq_v2). Only
safetensors are read; pickled `.bin` weights are refused.

`WeightSource` is lazy: tensors are read from the safetensors shards when asked for, so the
quantizer can hold one decoder layer in memory at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from lmq.errors import CheckpointError, InputError, LmqError, UnsupportedError
from lmq.format import awq_gemm, gptq
from lmq.format.manifest import read_manifest
from lmq.models.llama import ModelConfig, layer_weight_names, linear_shapes
from lmq.quant.rtn import QuantizedWeight

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def resolve_model_path(model: str) -> Path:
    """A local folder as given, or a hub id downloaded (safetensors and JSON only) when online."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{model} is a file; give the model's folder (the one holding config.json)")
        return path
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise InputError(f"model path {model} does not exist; give a local model folder or a hub id like org/name")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all the user's to fix
        raise InputError(
            f"{model} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path, or the network "
            "and `huggingface-cli login` for gated models"
        ) from e


@dataclass(frozen=True)
class QuantConfig:
    """config.json's `quantization_config`, for the two portable formats lmq reads.

    - AWQ gemm (lmq's and AutoAWQ's): `method="awq"`, `version="gemm"` (or a packed layout's
      `"lmq-<layout>"`), tensors in `lmq.format.awq_gemm`'s layout.
    - GPTQ (AutoGPTQ / GPTQModel): `method="gptq"`, `version` = the checkpoint format, "gptq" (v1,
      stored zero = zero - 1) or "gptq_v2"; `zero_point = not sym`; tensors in `lmq.format.gptq`'s
      layout. `desc_act` is recorded for messages: the tensors' g_idx decides what is readable.
    """

    bits: int
    group_size: int
    zero_point: bool
    version: str = "gemm"
    method: str = "awq"
    desc_act: bool = False

    @classmethod
    def from_hf(cls, qc: dict, where: Path, packed_version: str | None = None) -> QuantConfig:
        method = str(qc.get("quant_method", "")).lower()
        if method == "gptq":
            return cls._from_gptq(qc, where)
        if method != "awq":
            raise UnsupportedError(
                f"{where}: quant_method {method!r} is not readable; lmq reads AWQ (gemm) and GPTQ checkpoints"
            )
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" and version != packed_version:
            raise UnsupportedError(f"{where}: AWQ version {version!r} is not readable; lmq reads version 'gemm'")
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if bits != 4:
            raise UnsupportedError(f"{where}: {bits}-bit AWQ is not readable; lmq reads 4-bit")
        return cls(bits, int(qc.get("group_size", qc.get("q_group_size", 128))),
                   bool(qc.get("zero_point", True)), version)

    @classmethod
    def _from_gptq(cls, qc: dict, where: Path) -> QuantConfig:
        # GPTQModel writes `format` (newer) and/or `checkpoint_format`; AutoGPTQ the latter or nothing (v1).
        named = {str(qc[k]).lower() for k in ("checkpoint_format", "format") if qc.get(k)}
        if len(named) > 1:
            raise CheckpointError(f"{where}: quantization_config names two GPTQ formats {sorted(named)}; keep one")
        fmt = named.pop() if named else "gptq"
        if fmt not in gptq.CHECKPOINT_FORMATS:
            raise UnsupportedError(
                f"{where}: GPTQ checkpoint_format {fmt!r} is not readable; lmq reads 'gptq' and 'gptq_v2' (re-save "
                "the model in the gptq format with GPTQModel)"
            )
        bits = int(qc.get("bits", 4))
        if bits != 4:
            raise UnsupportedError(f"{where}: {bits}-bit GPTQ is not readable; lmq reads 4-bit")
        if str(qc.get("pack_dtype", "int32")).lower().removeprefix("torch.") != "int32":
            raise UnsupportedError(
                f"{where}: GPTQ pack_dtype {qc.get('pack_dtype')!r} is not readable; lmq reads int32"
            )
        if qc.get("dynamic"):
            raise UnsupportedError(
                f"{where}: the GPTQ config sets per-module overrides (`dynamic`), which lmq does not read; "
                "re-quantize with one bits/group_size for every module"
            )
        return cls(bits, int(qc.get("group_size", 128)), not bool(qc.get("sym", True)), fmt, "gptq",
                   bool(qc.get("desc_act", False)))

    def to_hf(self) -> dict:
        if self.method == "gptq":
            return {
                "quant_method": "gptq",
                "bits": self.bits,
                "group_size": self.group_size,
                "sym": not self.zero_point,
                "desc_act": self.desc_act,
                "checkpoint_format": self.version,
            }
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": self.version,
            "modules_to_not_convert": None,
        }

    def unpack(self, get: Callable[[str], torch.Tensor], has: Callable[[str], bool], prefix: str) -> QuantizedWeight:
        """The quantized linear `prefix` of a portable checkpoint, read through `get`/`has` (tensor by full name)."""
        if self.method == "gptq":
            g_idx = get(f"{prefix}.g_idx") if has(f"{prefix}.g_idx") else None
            return gptq.unpack_gptq(get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales"), g_idx,
                                    self.bits, self.group_size, self.version, name=prefix, desc_act=self.desc_act)
        return awq_gemm.unpack(get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales"),
                               self.group_size, name=prefix)


TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them holds the vocabulary


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer's vocabulary file (the other TOKENIZER_FILES only configure one)."""
    return any((Path(folder) / f).exists() for f in TOKENIZER_MODEL_FILES)


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer (transformers' AutoTokenizer), never with remote code: a tokenizer that needs
    its own code (`auto_map`), or a folder without tokenizer files, is a CheckpointError saying so."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise CheckpointError(f"the tokenizer in {folder} needs its own code (auto_map in tokenizer_config.json), "
                                  "which lmq never runs; use a model whose tokenizer transformers supports") from e
        if not has_tokenizer(folder):
            raise CheckpointError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_MODEL_FILES)}); copy "
                                  "the tokenizer files from the model it was made from") from e
        raise
    except OSError as e:
        raise CheckpointError(f"cannot load a tokenizer from {folder} ({e}); copy the tokenizer files from the model "
                              "it was made from") from e


def read_config_json(folder: Path, missing: LmqError) -> dict:
    """`folder`/config.json, parsed; raises `missing` where there is none (each reader says what folder it wanted)
    and a CheckpointError naming the file where it is not JSON."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.exists():
        raise missing
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download or re-create the model") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object of settings "
                              "({\"model_type\": ...}); re-download or re-create the model")
    return config


class WeightSource:
    """Lazy tensor access to one checkpoint folder.

    The model config (`cfg`) is parsed when first used, so a folder whose config.json has only a
    `quantization_config` can still be read tensor by tensor (`lmq pack`); an unsupported or
    incomplete model config raises there.
    """

    def __init__(self, path: Path, config: dict | None = None):
        """`config`: the folder's config.json, where the caller has already read it."""
        self.path = Path(path)
        self.config: dict = config if config is not None else read_config_json(
            self.path, InputError(f"{self.path} is not a model folder: it has no config.json"))
        self.manifest = read_manifest(self.path)
        # A packed checkpoint (`lmq pack`) stores its linears in one arch's layout; its module
        # unpacks them exactly, so every reader here sees the same numbers as the portable one.
        self.packed = None
        packed_version = None
        if self.manifest and self.manifest.get("kind") == "packed":
            from lmq.pack.api import LAYOUTS

            arch = self.manifest.get("arch")
            if arch not in LAYOUTS:
                raise CheckpointError(f"{self.path} is packed for unknown arch {arch!r}; re-pack it with `lmq pack`")
            self.packed = LAYOUTS[arch][0]
            packed_version = f"lmq-{self.packed.NAME}"
        qc = self.config.get("quantization_config")
        self.quant = QuantConfig.from_hf(qc, self.path, packed_version) if qc else None
        self._files = self._index()
        self._handles: dict[Path, object] = {}

    @property
    def kind(self) -> str:
        """"float", lmq's "quantized" or "packed" (from the manifest), "autoawq", or a GPTQ checkpoint's format
        ("gptq", "gptq_v2")."""
        if self.manifest:
            return self.manifest["kind"]
        if self.quant is None:
            return "float"
        return "autoawq" if self.quant.method == "awq" else self.quant.version

    @cached_property
    def cfg(self) -> ModelConfig:
        """The model's config, parsed from config.json on first use."""
        return ModelConfig.from_hf(self.config)

    # -- files -----------------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        """Tensor name -> file. A sharded checkpoint's index json is authoritative, and so is a
        single model.safetensors: stray `*.safetensors` beside them (e.g. Mistral's
        consolidated.safetensors) are not read. Without either, every `*.safetensors` is read
        (AutoGPTQ names its single file after the settings: gptq_model-4bit-128g.safetensors)."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError("weight_map is not an object of tensor name -> file name")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download the model") from e
            missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
            if missing:
                raise CheckpointError(f"{self.path} is missing shard(s) {', '.join(missing)} named by its index; "
                                      "the download is incomplete")
            held = {f: set(self._open(self.path / f).keys()) for f in set(weight_map.values())}  # headers only
            wrong = sorted(name for name, f in weight_map.items() if name not in held[f])
            if wrong:
                more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
                raise CheckpointError(f"{index} places {wrong[0]}{more} in {weight_map[wrong[0]]}, which does not "
                                      "hold it; the index does not match its shards: re-download the model")
            return {name: self.path / f for name, f in weight_map.items()}
        single = self.path / "model.safetensors"
        files = [single] if single.exists() else sorted(self.path.glob("*.safetensors"))
        if not files:
            if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
                raise UnsupportedError(
                    f"{self.path} holds only pickled weights (.bin/.pt), which lmq never loads; convert the model "
                    "to safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))"
                )
            raise CheckpointError(f"{self.path} has no *.safetensors weight files")
        names: dict[str, Path] = {}
        for f in files:
            for name in self._open(f).keys():
                names[name] = f
        return names

    def _open(self, f: Path):
        from safetensors import safe_open

        h = getattr(self, "_handles", {}).get(f)
        if h is None:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:
                raise CheckpointError(
                    f"{f} is not a readable safetensors file ({e}); it is truncated or corrupt: re-download or "
                    "re-create it"
                ) from e
            if hasattr(self, "_handles"):
                self._handles[f] = h
        return h

    @property
    def weight_files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def has(self, name: str) -> bool:
        return name in self._files

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def info(self, name: str) -> tuple[list[int], str]:
        """A tensor's shape and safetensors dtype string ("F16", "I32", ...), read from the header only."""
        sl = self._open(self._files[name]).get_slice(name)
        return sl.get_shape(), sl.get_dtype()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor by its full name; floating tensors are checked for NaN/inf."""
        if name not in self._files:
            raise CheckpointError(f"{self.path} is missing tensor {name}; the checkpoint is incomplete")
        try:
            t = self._open(self._files[name]).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"could not read {name} from {self._files[name]} ({e}); the file is corrupt") from e
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).sum().item()
                raise CheckpointError(
                    f"tensor {name} holds {bad} NaN/inf values; the checkpoint is broken: re-download it or fix "
                    "the training run that produced it"
                )
            if dtype is not None:
                t = t.to(dtype)
        return t

    # -- model-level access ----------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"{self.cfg.arch.layer_prefix}.{i}"

    def is_quantized(self, prefix: str) -> bool:
        return self.has(f"{prefix}.qweight")

    def quantized_linear(self, prefix: str) -> QuantizedWeight:
        if self.quant is None:
            raise CheckpointError(f"{self.path} has {prefix}.qweight but no quantization_config in config.json")
        if self.packed is not None:
            return self.packed.unpack(self.get(f"{prefix}.qweight"), self.get(f"{prefix}.scales"),
                                      self.get(f"{prefix}.zeros"), self.quant.group_size, name=prefix)
        return self.quant.unpack(self.get, self.has, prefix)

    def check_shapes(self) -> None:
        """Every linear, the embedding and an untied lm_head have the shapes config.json implies, read from the
        headers only: a float linear's `weight [N, K]`, a quantized one's `scales [K/G, N]` (the same in every
        layout lmq reads). An edited or mismatched config.json is named here, not met as a reshape error later."""
        cfg = self.cfg
        C, V = cfg.hidden_size, cfg.vocab_size
        # the tensors other than the linears (norms, biases, embedding, an untied head), so one that is missing is
        # named now, not after a quantization of every layer before it
        linear_weights = {f"{lin}.weight" for lin in cfg.arch.linears}
        needed = [cfg.arch.embed, cfg.arch.final_norm, *([] if cfg.tie_word_embeddings else [cfg.arch.lm_head])]
        needed += [f"{self.layer_prefix(i)}.{n}" for i in range(cfg.num_layers) for n in layer_weight_names(cfg)
                   if n not in linear_weights]
        missing = [name for name in needed if not self.has(name)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path} is missing tensor {missing[0]}{more}; the checkpoint is incomplete: "
                                  "re-download or re-create it")
        for name in (cfg.arch.embed, cfg.arch.lm_head):
            if self.has(name) and tuple(self.info(name)[0]) != (V, C):
                raise CheckpointError(f"{name} is {list(self.info(name)[0])} but config.json (vocab_size {V}, "
                                      f"hidden_size {C}) implies {[V, C]}; the config in {self.path} does not match "
                                      "its weights")
        shapes = linear_shapes(cfg)
        for i in range(cfg.num_layers):
            for lin, (N, K) in shapes.items():
                name = f"{self.layer_prefix(i)}.{lin}"
                if self.is_quantized(name):
                    if self.quant is None:
                        raise CheckpointError(f"{self.path} has {name}.qweight but no quantization_config in "
                                              "config.json")
                    G = K if self.quant.group_size == -1 else self.quant.group_size  # -1: GPTQ's one group per row
                    tensor, want = f"{name}.scales", [-(-K // G), N]
                    layout = f" ([K/G, N] of a linear [N, K] = {[N, K]} in groups of G = {G})"
                elif self.has(f"{name}.weight"):
                    tensor, want, layout = f"{name}.weight", [N, K], ""
                else:
                    raise UnsupportedError(f"{self.path} has no {name}.weight or {name}.qweight; is it a different "
                                           "layout?")
                shape = list(self.info(tensor)[0])
                if shape != want or (layout and K % G):
                    raise CheckpointError(
                        f"{tensor} is {shape} but config.json implies {want}{layout} from hidden_size {C}, "
                        f"intermediate_size {cfg.intermediate_size}, num_attention_heads {cfg.num_heads}, "
                        f"num_key_value_heads {cfg.num_kv_heads}, head_dim {cfg.head_dim}; the config in {self.path} "
                        "does not match its weights")

    def dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A tensor by full name; `X.weight` of a quantized linear is dequantized."""
        if not self.has(name) and name.endswith(".weight") and self.is_quantized(name[: -len(".weight")]):
            return self.quantized_linear(name[: -len(".weight")]).dequantize(dtype)
        return self.get(name, dtype)

    def layer(self, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The dense weights of decoder layer `i`, keyed by names relative to the layer."""
        prefix = self.layer_prefix(i)
        return {n: self.dense(f"{prefix}.{n}", dtype) for n in layer_weight_names(self.cfg)}

    def embed(self, dtype: torch.dtype) -> torch.Tensor:
        return self.get(self.cfg.arch.embed, dtype)

    def final_norm(self, dtype: torch.dtype) -> torch.Tensor:
        return self.get(self.cfg.arch.final_norm, dtype)

    def lm_head(self, dtype: torch.dtype) -> torch.Tensor:
        arch = self.cfg.arch
        if self.has(arch.lm_head):
            return self.dense(arch.lm_head, dtype)
        if self.cfg.tie_word_embeddings:
            return self.embed(dtype)
        raise CheckpointError(f"{self.path} has no {arch.lm_head} and does not tie it to the embeddings")

    def source_dtype(self) -> torch.dtype:
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float16"
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(str(name), torch.float16)

    def weight_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.weight_files)
