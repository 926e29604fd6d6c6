"""Calibration text -> token blocks `[n_samples, seqlen]` for AWQ.

Sources (`--calib-data`):
- a local `.txt` file, read directly: documents are paragraphs separated by blank lines, or lines
  when the file has no blank line (one document per line, as C4 dumps are);
- a local `.jsonl` / `.json` / `.parquet` / `.csv` file with a `text` column, read through `datasets`;
- a folder: every such file in it;
- a hub data set when online: `pileval`, `wikitext2`, `c4`, or any `org/name` with a `text` column.
  With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, only a cached copy is read; with neither set, the
  hub is asked once (a few seconds at most) before `datasets`, which retries for about 30 s.

Documents are shuffled with the seed, tokenized without special tokens, joined with the EOS token
and cut into `n_samples` blocks of `seqlen` tokens (AutoAWQ's scheme). `datasets` is imported only
here, and only for the formats that need it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from lmq.errors import InputError

TEXT_EXTS = (".txt", ".raw")
TABLE_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_SETS = {
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train"),
    "c4": ("allenai/c4", "en", "validation"),
}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 3.0
LOCAL_HINT = ("pass a local text file instead, e.g. --calib-data path/to/calib.txt (a .txt, .jsonl, .parquet or "
              ".csv file, or a folder of them)")


def _offline_var() -> str | None:
    """The offline variable set to true (huggingface_hub's and datasets' reading), if any."""
    return next((v for v in OFFLINE_VARS if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")),
                None)


def _hub_unreachable() -> str | None:
    """Why one request to the hub got no usable answer within HUB_PROBE_TIMEOUT_S (None: it answered). A proxy's
    own refusal (407) or a gateway error (5xx) counts as no answer: the download would only retry it."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        r = get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001  (DNS, refused, timeout, proxy: the download would only retry)
        detail = str(e).splitlines()[0] if str(e) else ""
        return f"{constants.ENDPOINT} is unreachable ({type(e).__name__}: {detail})"
    status = getattr(r, "status_code", 200)
    if status == 407 or status >= 500:
        return f"{constants.ENDPOINT} answered HTTP {status} (a proxy or gateway in the way)"
    return None


def _load_cached(datasets, name: str, config: str | None, split: str):
    """`datasets.load_dataset` with the hub switched off for this call (what HF_DATASETS_OFFLINE=1 does)."""
    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        return datasets.load_dataset(name, config, split=split)
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _read_text_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"calibration file {path} is not UTF-8 text ({e}); give a .txt, .jsonl or .parquet file") from e
    sep = "\n\n" if "\n\n" in text else "\n"
    return [d.strip() for d in text.split(sep) if d.strip()]


def _read_table(path: Path) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(TABLE_EXTS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as e:  # empty or malformed files surface as assorted errors from datasets
        raise InputError(f"calibration file {path} could not be read as {TABLE_EXTS[path.suffix.lower()]} "
                         f"({type(e).__name__}: {e}); is it empty or malformed?") from e
    if "text" not in ds.column_names:
        raise InputError(f"calibration file {path} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def load_documents(spec: str) -> list[str]:
    """All calibration documents named by `spec` (file, folder or hub data set)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() in TABLE_EXTS:
            return _read_table(path)
        return _read_text_file(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in TEXT_EXTS or f.suffix.lower() in TABLE_EXTS)
        if not files:
            raise InputError(f"calibration folder {path} holds no .txt/.jsonl/.json/.parquet/.csv files")
        docs: list[str] = []
        for f in files:
            docs += _read_table(f) if f.suffix.lower() in TABLE_EXTS else _read_text_file(f)
        return docs
    if spec in HUB_SETS or ("/" in spec and not spec.startswith((".", "/", "~"))):
        name, config, split = HUB_SETS.get(spec, (spec, None, "train"))
        offline = _offline_var()
        why = _hub_unreachable() if offline is None else None
        try:
            import datasets

            if why is None:
                ds = datasets.load_dataset(name, config, split=split)
            else:  # no hub: a copy already in the datasets cache still serves, without datasets' retries
                ds = _load_cached(datasets, name, config, split)
        except Exception as e:
            if why is not None:
                raise InputError(f"calibration data set {spec!r} ({'the default; ' if spec == 'pileval' else ''}"
                                 f"downloaded from the Hugging Face hub) cannot be fetched: {why}, and no copy is in "
                                 f"the datasets cache; {LOCAL_HINT}") from e
            where = f": {offline} is set and no copy is in the datasets cache" if offline else " from the hub"
            raise InputError(
                f"calibration data set {spec!r} could not be loaded{where} ({type(e).__name__}); {LOCAL_HINT}"
            ) from e
        return [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    raise InputError(f"calibration data {spec!r} is neither a file, a folder nor a known data set "
                     f"({', '.join(HUB_SETS)}); pass a local .txt/.jsonl/.parquet file")


def calibration_tokens(spec: str, tokenizer, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`[n_samples, seqlen]` int64 token blocks from the documents of `spec`."""
    if n_samples < 1 or seqlen < 8:
        raise InputError(f"need --calib-samples >= 1 and --calib-seqlen >= 8, got {n_samples} and {seqlen}")
    docs = load_documents(spec)
    random.Random(seed).shuffle(docs)
    need = n_samples * seqlen
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InputError(
            f"calibration data {spec} has {len(ids)} tokens, fewer than --calib-samples x --calib-seqlen = "
            f"{n_samples} x {seqlen} = {need}; give more text or lower those numbers"
        )
    return torch.tensor(ids[:need], dtype=torch.int64).reshape(n_samples, seqlen)
