"""`lmq bench gemm`: option parsing on any machine, one small real run on the GPU."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lmq.bench import GEMM_SHAPES, bench_gemm, parse_gemm_shapes
from lmq.cli import app
from lmq.errors import InputError


def test_parse_named_and_explicit_shapes():
    shapes, ms = parse_gemm_shapes("llama3-8b")
    assert shapes == GEMM_SHAPES["llama3-8b"] and ms is None
    assert ("gate_up_proj", 28672, 4096) in shapes
    shapes, ms = parse_gemm_shapes("1,4096,4096; 16,576,1536")
    assert shapes == [("4096x4096", 4096, 4096), ("576x1536", 576, 1536)] and ms == [1, 16]


@pytest.mark.parametrize("bad", ["llama-9", "1,2", "0,64,64", "a,b,c"])
def test_parse_rejects_bad_shapes(bad):
    with pytest.raises(InputError, match="--shapes"):
        parse_gemm_shapes(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_gpu_says_so():
    r = CliRunner().invoke(app, ["bench", "gemm", "--m", "1"])
    assert r.exit_code == 1 and "needs a CUDA GPU" in r.output


def test_cli_rejects_bad_m():
    r = CliRunner().invoke(app, ["bench", "gemm", "--m", "1,x"])
    assert r.exit_code == 1 and "--m" in r.output


@pytest.mark.parametrize("args,match", [(["--group-size", "7"], "group size 7 is not supported"),
                                        (["--shapes", "1,4096,100"], "got K=100")])
def test_cli_names_a_bad_group_size_or_shape_with_or_without_a_gpu(args, match):
    """Before, a machine without a GPU answered only that it has none."""
    r = CliRunner().invoke(app, ["bench", "gemm", "--m", "1", *args])
    assert r.exit_code == 1 and "error:" in r.output and match in " ".join(r.output.split()), r.output


def test_cli_rejects_bad_dtype():
    r = CliRunner().invoke(app, ["bench", "gemm", "--m", "1", "--dtype", "fp8"])
    assert r.exit_code == 1 and "--dtype 'fp8': expected fp16 or bf16" in r.output


def test_table_renders_reports_of_either_dtype():
    """bf16 reports name their dtype; reports from before `--dtype` (cublas_fp16_us, no dtype) still render."""
    from rich.console import Console

    from lmq.bench import render_gemm_table

    row = {"shape": "t", "M": 1, "N": 576, "K": 1536, "lmq_us": 2.0, "lmq_path": "gemv", "torch_int4_us": None,
           "floor_us": 1.0, "paths_us": {"gemv": 2.0}, "speedup_vs_cublas": 2.0, "torch_int4_speedup_vs_cublas": None}
    base = {"gpu": "GPU", "arch": "sm90", "group_size": 64, "copy_bandwidth_GB_s": 2000.0}
    for report, dt in (({**base, "rows": [{**row, "cublas_fp16_us": 4.0}]}, "fp16"),
                       ({**base, "dtype": "bf16", "rows": [{**row, "cublas_us": 4.0}]}, "bf16")):
        console = Console(width=250, record=True)
        console.print(render_gemm_table(report))
        text = console.export_text()
        assert f"speedups vs cuBLAS {dt}" in text and "4.0" in text


@pytest.mark.gpu
def test_bench_gemm_small_run():
    report = bench_gemm([("t", 576, 1536)], [1, 17], group_size=64)
    assert report["copy_bandwidth_GB_s"] > 100
    assert [r["M"] for r in report["rows"]] == [1, 17]
    for r in report["rows"]:
        assert r["lmq_us"] > 0 and r["cublas_us"] > 0 and r["floor_us"] > 0
        assert r["lmq_rel_err"] < 2e-3
    json.dumps(report)  # --json must serialize
    bf = bench_gemm([("t", 576, 1536)], [300], group_size=64, dtype="bf16")
    assert bf["dtype"] == "bf16" and bf["rows"][0]["lmq_rel_err"] < 1.2e-2
