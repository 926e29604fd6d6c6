"""`lmq bench attention`: option parsing and the errors a user sees (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lmq.bench_attention import parse_list, render_attention_table
from lmq.cli import app
from lmq.errors import InputError


def test_parse_list():
    assert parse_list("1k,4k,16K", "--context") == [1024, 4096, 16384]
    assert parse_list("1, 8,64", "--batch") == [1, 8, 64]
    assert parse_list("fp16,int4", "--kv-dtype", "str") == ["fp16", "int4"]
    for bad in ("1q", "0", "", "-4"):
        with pytest.raises(InputError):
            parse_list(bad, "--context")


def test_cli_reports_bad_options():
    r = CliRunner().invoke(app, ["bench", "attention", "--context", "4x"])
    assert r.exit_code == 1 and "--context" in r.output


@pytest.mark.parametrize("args,match", [(["--kv-heads", "0"], "must be 1 or more"),
                                        (["--heads", "7", "--kv-heads", "2"], "not a multiple of --kv-heads 2"),
                                        (["--head-dim", "33"], "--head-dim 33"),
                                        (["--kv-dtype", "bf16"], "--kv-dtype 'bf16'")])
def test_cli_bad_shape_options_are_named_with_or_without_a_gpu(args, match):
    """Before, the no-GPU message hid them, and --kv-heads 0 was a ZeroDivisionError on a GPU."""
    r = CliRunner().invoke(app, ["bench", "attention", "--context", "1k", "--batch", "1", *args])
    assert r.exit_code == 1 and "error:" in r.output and match in " ".join(r.output.split()), r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_gpu():
    r = CliRunner().invoke(app, ["bench", "attention", "--context", "1k", "--batch", "1"])
    assert r.exit_code == 1 and "needs a CUDA GPU" in r.output


def test_table_renders_measured_and_skipped_rows():
    row = {"kv_dtype": "int8", "context": 4096, "batch": 8, "lmq_us": 43.5, "floor_us": 28.5, "sdpa_us": 51.9,
           "lmq_fp16_us": 60.8, "rel_err_vs_sdpa": 3e-4, "splits": 5, "note": "", "floor_frac": 28.5 / 43.5,
           "speedup_vs_sdpa": 51.9 / 43.5, "speedup_vs_fp16_kv": 60.8 / 43.5}
    skipped = dict(row, kv_dtype="fp16", lmq_us=None, note="skipped: cache exceeds GPU memory")
    gluon = dict(row, kv_dtype="int4", lmq_us=27.1, kernel="gluon")  # the int4 rows name the kernel that ran
    report = {"gpu": "test", "heads": 32, "kv_heads": 8, "head_dim": 128, "block_size": 128,
              "copy_bandwidth_GB_s": 2432.0, "rows": [row, skipped, gluon]}
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_attention_table(report))
    text = console.export_text()
    assert "43.5" in text and "66" in text and "skipped" in text
    assert "gluon" in text and "triton" in text  # a report from before the column reads as the Triton kernel
