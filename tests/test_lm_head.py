"""The int8 LM head: row quantization, the W8A16 kernel against its PyTorch twin, and the engine's --lm-head option."""

from __future__ import annotations  # noqa: I001 (ruff files lmq.kernels under third-party)

import pytest
import torch

from lmq.errors import ShapeError
from lmq.kernels.w8a16_gemm import w8a16_matmul, w8a16_matmul_ref
from lmq.quant.rows import dequantize_rows, quantize_rows


def test_quantize_rows_bounds_the_error_by_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g) * torch.logspace(-3, 1, 300)[:, None]  # rows of very different ranges
    w[7] = 0.0  # an all-zero row
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (300,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert s[7] == 1.0 and not q[7].any()
    err = (dequantize_rows(q, s) - w).abs()
    assert (err <= s[:, None] * (0.5 + 1e-4)).all()  # half a step, and fp32's rounding of w / s


def test_rows_are_processed_in_chunks_with_the_same_result(monkeypatch):
    from lmq.quant import rows

    w = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    whole = rows.quantize_rows(w), rows.dequantize_rows(*rows.quantize_rows(w), torch.float16)
    monkeypatch.setattr(rows, "CHUNK_ROWS", 7)  # 300 rows in 43 chunks, the last one short
    q, s = rows.quantize_rows(w)
    assert torch.equal(q, whole[0][0]) and torch.equal(s, whole[0][1])
    assert torch.equal(rows.dequantize_rows(q, s, torch.float16), whole[1])
    assert torch.equal(rows.fake_quantize_rows(w), whole[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 1024, 64), (1, 1500, 576), (3, 1100, 96), (17, 1024, 200), (70, 1031, 64)])
def test_w8a16_matches_ref(device, M, N, K, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter computes bf16 dots on raw bits (TRITON-CPU.md); this runs on the GPU")
    g = torch.Generator().manual_seed(M * 7 + K)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    q, s = quantize_rows(w)
    x = torch.randn(M, K, generator=g).to(dtype)
    q, s, x = q.to(device), s.to(device), x.to(device)
    out = w8a16_matmul(x, q, s)
    ref = w8a16_matmul_ref(x, q, s)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("M", [1, 20])  # the 16-row dot config and the wide one
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a16_converts_every_code_exactly(device, dtype, M):
    """All 256 int8 codes (-128 too, which quantize_rows never makes) through the kernel's conversion (on a GPU with
    fp16 activations: the inline assembly): one-hot activation rows pick single codes, so the products are exact
    and so must the output be."""
    from lmq.kernels.kv_quant import use_asm

    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter computes bf16 dots on raw bits (TRITON-CPU.md); this runs on the GPU")
    N, K = 1024, 256
    q = ((torch.arange(N)[:, None] + torch.arange(K)[None, :]) % 256 - 128).to(torch.int8)  # each column: all codes
    s = torch.full((N,), 0.5)
    x = torch.eye(K)[::13][:M].to(dtype).to(device)  # one 1 a row
    assert use_asm(x) == (device != "cpu")  # the assembly runs wherever a GPU does
    out = w8a16_matmul(x, q.to(device), s.to(device)).cpu()
    assert torch.equal(out, q[:, ::13][:, :M].t().float() * 0.5)


def test_w8a16_refuses_bad_inputs():
    q, s = quantize_rows(torch.randn(1024, 64))
    x = torch.randn(1, 64, dtype=torch.float16)
    with pytest.raises(ShapeError, match="does not match"):
        w8a16_matmul(torch.randn(1, 32, dtype=torch.float16), q, s)
    with pytest.raises(ShapeError, match="float16 or bfloat16"):
        w8a16_matmul(x.float(), q, s)
    with pytest.raises(ShapeError, match="N >= 1024"):
        w8a16_matmul(x, q[:100], s[:100])
    with pytest.raises(ShapeError, match="int8"):
        w8a16_matmul(x, q.to(torch.int16), s)


# ----- the engine's --lm-head int8 -----

def test_engine_int8_head_on_the_real_model(smollm2_rtn):
    """SmolLM2 (tied embeddings) with its head in int8 rows: the embedding is untouched, the head is the int8 rows
    dequantized (torch backend), and greedy decoding of a real prompt gives the same tokens as the fp head."""
    from lmq.engine.llm import LLM
    from lmq.engine.model import EngineModel
    from lmq.engine.sampling import SamplingParams

    cpu = torch.device("cpu")
    plain, int8 = EngineModel(smollm2_rtn, cpu), EngineModel(smollm2_rtn, cpu, lm_head="int8")
    assert torch.equal(plain.embed, int8.embed) and plain.lm_head is plain.embed  # tied
    q, s = quantize_rows(plain.lm_head)
    assert torch.equal(int8.lm_head, dequantize_rows(q, s, plain.dtype)) and not torch.equal(int8.lm_head, plain.embed)
    assert int8.head_q is None  # the torch backend computes with the dequantized rows
    outs = []
    for m in (plain, int8):
        llm = LLM(m, max_model_len=128)
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   add_generation_prompt=True, tokenize=False)
        outs.append(llm.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0].token_ids)
    assert outs[0] == outs[1], outs


def test_lm_head_option_is_checked_before_loading(tmp_path):
    from lmq.engine.llm import LLM
    from lmq.engine.model import EngineModel
    from lmq.errors import InputError

    with pytest.raises(InputError, match="--lm-head 'int4'"):
        EngineModel(tmp_path / "missing", torch.device("cpu"), lm_head="int4")  # refused before the folder is read
    m = EngineModel.synthetic("smollm2-135m", torch.device("cpu"), group_size=64)
    with pytest.raises(InputError, match="needs a model loaded that way"):
        LLM(m, lm_head="int8")
    m8 = EngineModel.synthetic("smollm2-135m", torch.device("cpu"), group_size=64, lm_head="int8")
    assert m8.lm_head_mode == "int8" and LLM(m8, lm_head="int8", max_model_len=64).model is m8  # the same choice


@pytest.mark.gpu
@pytest.mark.parametrize("n_seqs", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_head_triton_matches_torch_backend(dtype, n_seqs):
    """The W8A16 kernel in the engine (prefill, then decode steps replayed from CUDA graphs, with one sequence and with
    two) against the torch backend's dequantized int8 rows, on the same weights."""
    from lmq.engine.llm import LLM
    from lmq.engine.model import EngineModel
    from lmq.engine.sampling import SamplingParams

    dev = torch.device("cuda")
    engines = [LLM(EngineModel.synthetic("smollm2-135m", dev, group_size=64, backend=b, dtype=dtype, lm_head="int8"),
                   block_size=16, max_model_len=256, cache_max_memory="64MiB", max_num_seqs=4)
               for b in ("triton", "torch")]
    assert engines[0].model.head_q is not None and engines[0].model.lm_head is None  # the fp head is not kept
    prompts = [list(range(100, 137)), list(range(500, 503))][:n_seqs]
    for llm in engines:
        for p in prompts:
            llm.add_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True))
    for _ in range(3):  # prefill, then two decode steps
        steps = [llm.scheduler.schedule() for llm in engines]
        assert len(steps[0].spans) == n_seqs
        logits = [llm.runner.run(st, llm.manager).float() for llm, st in zip(engines, steps)]
        cos = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
        assert cos.min().item() > (0.999 if dtype == torch.float16 else 0.99), (steps[0].is_decode, cos)
        for llm, st in zip(engines, steps):
            for sp in st.spans:
                llm.scheduler.advance(sp)
            for sp, tok in zip(st.spans, logits[1].argmax(-1).tolist()):
                sp.seq.token_ids.append(tok)


def test_eval_scores_the_int8_head(smollm2_rtn, wiki_file):
    """`lmq eval ppl/kld --lm-head int8` on the real model: a small, nonzero cost against the checkpoint's own head,
    and the option refused with its choices."""
    import json

    from typer.testing import CliRunner

    from lmq.cli import app

    def run(*args):
        res = CliRunner().invoke(app, [str(a) for a in args])
        return res.exit_code, (res.stdout if res.exit_code == 0 else res.stderr)

    common = ["--data", wiki_file, "--seqlen", "128", "--max-windows", "2", "--device", "cpu", "--json"]
    code, out = run("eval", "ppl", smollm2_rtn, *common)
    assert code == 0, out
    base = json.loads(out)
    code, out = run("eval", "ppl", smollm2_rtn, *common, "--lm-head", "int8")
    assert code == 0, out
    int8 = json.loads(out)
    assert int8["lm_head"] == "int8" and base["lm_head"] == "auto"
    assert int8["ppl"] != base["ppl"] and abs(int8["ppl"] / base["ppl"] - 1) < 0.01
    code, out = run("eval", "kld", smollm2_rtn, "--reference", smollm2_rtn, *common, "--lm-head", "int8")
    assert code == 0, out
    kld = json.loads(out)
    assert 0 < kld["kld"] < 0.01 and kld["top1_agree"] > 0.9
    code, out = run("eval", "ppl", smollm2_rtn, *common, "--lm-head", "int4")
    assert code == 1 and "expected auto" in " ".join(out.split()) and "int8" in out

