"""`lmq bench` end to end on a synthetic small model (random weights at SmolLM2's shape): the
report's structure and metric relations, `lmq bench --synthetic` routing, the transformers
baseline, and bad options. Speed itself is measured on the GPU (docs/benchmarks.md), not here."""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from lmq.bench_e2e import read_requests, render_e2e, run_bench
from lmq.cli import app
from lmq.errors import InputError

SMALL = {"batches": "1,2", "input_lens": "8", "output_lens": "3", "num_requests": 4, "turns": 2, "answer_len": 3,
             "max_model_len": 256, "cache_max_memory": "16MiB", "group_size": 64, "device": "cpu"}


def test_report_has_vllm_metrics_and_a_baseline():
    report, text = run_bench(None, "smollm2-135m", baseline="hf", **SMALL)
    lat = report["latency"]
    assert [(r["batch"], r["input_len"], r["output_len"]) for r in lat] == [(1, 8, 3), (2, 8, 3)]
    for r in lat:
        assert r["output_tokens"] == r["batch"] * 3 and r["requests"] == r["batch"]
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
        assert r["tpot_ms"]["mean"] > 0 and r["itl_ms"]["p99"] >= r["itl_ms"]["p50"] > 0
        assert r["hf"]["output_tok_s"] > 0 and r["speedup_output_tok_s"] > 0
    tp = report["throughput"]
    assert tp["requests"] == 4 and tp["output_tokens"] > 0 and tp["req_s"] > 0
    # measured runs start cold: no prompt finds its K/V left by a warm-up or an earlier row in the prefix cache
    assert [r["cached_tokens"] for r in lat] == [0, 0] and tp["cached_tokens"] == 0
    assert tp["total_tok_s"] > tp["output_tok_s"] and tp["hf"]["req_s"] > 0
    turns = report["multiturn"]
    assert [t["turn"] for t in turns] == [1, 2] and turns[1]["prompt_tokens"] == 32 + 3 + 32
    assert "| batch |" in text and "| turn |" in text and report["hf"]["weights"] == "random"


def test_latency_rows_start_with_a_cold_prefix_cache():
    """Each latency row's requests repeat the earlier rows' (the same seed: request 0 of batch 2 is batch 1's) and its
    own warm-up's lengths: the measured run must still compute every prompt token."""
    report, _ = run_bench(None, "smollm2-135m", modes="latency", **{**SMALL, "input_lens": "130,200"})
    assert [(r["batch"], r["input_len"], r["cached_tokens"]) for r in report["latency"]] == \
        [(1, 130, 0), (1, 200, 0), (2, 130, 0), (2, 200, 0)]


def test_cli_routes_bench_to_e2e_and_prints_json():
    res = CliRunner().invoke(app, ["bench", "--synthetic", "smollm2-135m", "--group-size", "64", "--device", "cpu",
                                   "--mode", "latency", "--batch", "1", "--input-len", "4", "--output-len", "2",
                                   "--max-model-len", "128", "--cache-max-memory", "8MiB", "--max-num-batched-tokens",
                                   "16", "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads(res.stdout)
    assert report["latency"][0]["output_tokens"] == 2 and "throughput" not in report
    assert report["max_num_batched_tokens"] == 16 and 1 <= report["max_num_seqs"] <= 16  # at most a row per token
    assert render_e2e(report).startswith("model: synthetic smollm2-135m")


@pytest.mark.parametrize("kw, match", [
    ({"synthetic": "llama9"}, "not a known shape"),
    ({"synthetic": None}, "a checkpoint folder or --synthetic"),
    ({"modes": "speed"}, "--mode"),
    ({"batches": "0"}, "--batch"),
    ({"baseline": "vllm"}, "--baseline"),
    ({"max_num_batched_tokens": 0}, "--max-num-batched-tokens must be >= 1, got 0"),
    ({"num_requests": 0}, "--num-requests must be >= 1, got 0"),
    ({"turns": 0}, "--turns must be >= 1, got 0"),
    ({"answer_len": 0}, "--answer-len must be >= 1, got 0"),
    ({"group_size": 128}, "use --group-size 64 or 32"),
])
def test_bad_options_are_refused(kw, match):
    args = {"checkpoint": None, "synthetic": "smollm2-135m", **SMALL, **kw}
    with pytest.raises(InputError, match=match):
        run_bench(**args)


def test_cli_bad_option_is_one_error_line():
    res = CliRunner().invoke(app, ["bench", "--synthetic", "nope", "--device", "cpu"])
    assert res.exit_code == 1 and "error:" in res.output and "not a known shape" in res.output


def test_throughput_reads_a_jsonl_request_file(tmp_path):
    data = tmp_path / "requests.jsonl"
    data.write_text('{"prompt": [5, 6, 7, 8], "max_tokens": 2}\n\n{"prompt": [9, 10], "max_tokens": 3}\n')
    report, _ = run_bench(None, "smollm2-135m", modes="throughput", dataset=str(data), concurrency=1,
                          **{k: v for k, v in SMALL.items() if k not in ("turns", "answer_len", "num_requests")})
    tp = report["throughput"]
    assert tp["requests"] == 2 and tp["output_tokens"] == 5 and tp["input_tokens"] == 6 and tp["concurrency"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: expected"):
        run_bench(None, "smollm2-135m", modes="throughput", dataset=str(bad), **SMALL)
    with pytest.raises(InputError, match="is not a file"):
        run_bench(None, "smollm2-135m", modes="throughput", dataset=str(tmp_path / "missing.jsonl"), **SMALL)
    bad.write_text('{"prompt": [5, 6], "max_tokens": 2}\n{"prompt": [5, 6], "max_tokens": -4}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: .*max_tokens must be 1 or more, got -4"):
        read_requests(str(bad), SimpleNamespace(encode=lambda p: p))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_requests(str(binary), None)


def test_synthetic_models_take_a_group_size_their_shape_allows():
    """Without --group-size a synthetic model takes the largest of 128, 64, 32 that splits its layers: SmolLM2's
    576-wide layers run at 64 (the default 128 could not), Llama-3-8B's at 128."""
    from lmq.models.configs import synthetic_group_size

    assert synthetic_group_size("smollm2-135m") == 64 and synthetic_group_size("llama3-8b") == 128
    assert synthetic_group_size("smollm2-135m", 32) == 32
    report, _ = run_bench(None, "smollm2-135m", modes="latency", **{**SMALL, "batches": "1", "group_size": None})
    assert report["model"] == "synthetic smollm2-135m (random weights, g64)"


def test_hf_baseline_loads_a_real_checkpoint(smollm2_rtn):
    """`--baseline hf` on a checkpoint (not --synthetic): the dequantized model must be complete on
    the device (a model built on the meta device kept its rotary buffers there and failed to move)."""
    import torch

    from lmq.bench_e2e import HFBaseline
    from lmq.engine.model import EngineModel

    hf = HFBaseline.for_model(EngineModel(smollm2_rtn, torch.device("cpu")), None)
    assert not any(t.is_meta for t in [*hf.model.parameters(), *hf.model.buffers()])
    r = hf.latency(1, 8, 2, 0)
    assert r["output_tok_s"] > 0 and hf.notes["weights"] == "dequantized checkpoint"
