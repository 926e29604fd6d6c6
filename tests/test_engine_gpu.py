"""On a GPU: the engine's Triton backend (fused kernels, paged attention, decode CUDA graphs)
against its torch backend (the PyTorch twins on the same device) on the same synthetic weights,
in fp16 and bf16, through a prefill step and graph-replayed decode steps."""

import pytest
import torch

from lmq.engine.llm import LLM
from lmq.engine.model import EngineModel
from lmq.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n_seqs", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_backend_matches_torch_backend(dtype, n_seqs, monkeypatch):
    """Two sequences decode through the GEMV (M=2); five through the split-K GEMMs (on Hopper in fp16 the direct
    kernel, its zero fill and the GEMM launched early inside the decode graph: lmq.kernels.pdl)."""
    from lmq.kernels import w4a16_gemm_direct as direct_module

    calls = []
    real = direct_module.w4a16_gemm_direct
    monkeypatch.setattr(direct_module, "w4a16_gemm_direct", lambda *a, **k: calls.append(1) or real(*a, **k))
    dev = torch.device("cuda")
    engines = [LLM(EngineModel.synthetic("smollm2-135m", dev, group_size=64, backend=b, dtype=dtype),
                   block_size=16, max_model_len=256, cache_max_memory="64MiB", max_num_seqs=8)
               for b in ("triton", "torch")]
    assert engines[0].runner.graphs and not engines[1].runner.graphs
    prompts = [list(range(100, 137)), list(range(500, 503)), list(range(700, 720)), list(range(900, 950)),
               list(range(40, 41))][:n_seqs]  # 37, 3, 20, 50 and 1 tokens
    for llm in engines:
        for p in prompts:
            llm.add_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True))
    for _ in range(3):  # prefill, then two decode steps (graph replay on the triton engine)
        steps = [llm.scheduler.schedule() for llm in engines]
        logits = [llm.runner.run(st, llm.manager).float() for llm, st in zip(engines, steps)]  # [n_seqs, V]
        cos = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
        assert cos.min().item() > (0.999 if dtype == torch.float16 else 0.99), (steps[0].is_decode, cos)
        for llm, st in zip(engines, steps):
            for sp in st.spans:
                llm.scheduler.advance(sp)
            for sp, tok in zip(st.spans, logits[1].argmax(-1).tolist()):  # the same tokens in both
                sp.seq.token_ids.append(tok)
    hopper_fp16 = torch.cuda.get_device_capability()[0] == 9 and dtype == torch.float16
    # the direct kernel ran (Hopper, fp16): the table sends it M = 3..64 of these small weights (the prefill's rows,
    # the decode graphs of 3 or more sequences); never bf16
    assert bool(calls) == hopper_fp16


@pytest.mark.parametrize("n_new", [2, 37, 64, 100])
def test_prefill_graph_matches_eager_prefill(n_new):
    """A single-sequence prefill replays the CUDA graph of its token-count bucket (padded rows write
    nothing and are never attended): its logits match the eager prefill's, after a cached prefix too,
    and the cache holds the same K/V (the next decode step agrees)."""
    dev = torch.device("cuda")
    model = EngineModel.synthetic("smollm2-135m", dev, group_size=64)
    engines = [LLM(model, block_size=16, max_model_len=512, cache_max_memory="64MiB", max_num_seqs=2,
                   cuda_graphs=g, prefill_graphs=g) for g in (True, False)]
    assert engines[0].runner.prefill_graphs and not engines[1].runner.prefill_graphs
    prefix = list(range(1000, 1048))  # 3 whole blocks: cached by the first request
    for llm in engines:
        llm.generate([prefix + [7, 8]], SamplingParams(max_new_tokens=1, ignore_eos=True))
        llm.add_request(prefix + list(range(2000, 2000 + n_new)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    used, starts = [], []
    for _ in range(2):  # the prefill (graph on engine 0), then one decode step
        steps = [llm.scheduler.schedule() for llm in engines]
        used.append(engines[0].runner._prefill_graph_fits(steps[0], None))
        starts.append(steps[0].spans[0].start)
        logits = [llm.runner.run(st, llm.manager).float() for llm, st in zip(engines, steps)]  # [1, V]
        cos = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
        assert cos.min().item() > 0.999, (steps[0].is_decode, cos)
        for llm, st in zip(engines, steps):
            for sp in st.spans:
                llm.scheduler.advance(sp)
                sp.seq.token_ids.append(int(logits[1][0].argmax()))
    assert used == [True, False]
    assert starts == [48, 48 + n_new]  # the prefix came from the cache


def test_mixed_step_graphs_match_eager_steps():
    """Steps of several sequences (new prompts, a prompt chunk, decode rows riding along) replay the prefill graph
    of max_num_seqs sequences for their token bucket: logits as the eager steps', the same K/V written (the later
    decode steps agree), on fp16 and int8 caches."""
    dev = torch.device("cuda")
    model = EngineModel.synthetic("smollm2-135m", dev, group_size=64)
    for kv in ("fp16", "int8"):
        engines = [LLM(model, block_size=16, max_model_len=512, cache_max_memory="64MiB", max_num_seqs=4,
                       max_num_batched_tokens=128, kv_dtype=kv, cuda_graphs=g, prefill_graphs=g) for g in (True, False)]
        prompts = [list(range(100, 137)), list(range(500, 503)), list(range(900, 1100)), list(range(40, 50))]
        kinds = []
        for step_no in range(8):
            if step_no in (0, 2):  # arrivals: two prompts now, two more while the first decode
                for llm in engines:
                    for p in prompts[step_no:step_no + 2]:
                        llm.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True))
            steps = [llm.scheduler.schedule() for llm in engines]
            kinds.append((len(steps[0].spans), steps[0].is_decode, engines[0].runner._prefill_graph_fits(steps[0], None)))
            logits = [llm.runner.run(st, llm.manager).float() for llm, st in zip(engines, steps)]
            assert logits[0].shape == logits[1].shape
            if logits[0].shape[0]:
                cos = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
                assert cos.min().item() > 0.999, (kv, step_no, kinds[-1], cos)
            for llm, st in zip(engines, steps):
                toks = iter(logits[1].argmax(-1).tolist())
                for sp in st.spans:
                    llm.scheduler.advance(sp)
                    if sp.sample:
                        sp.seq.token_ids.append(next(toks))
        assert any(n > 1 and not dec and fits for n, dec, fits in kinds), kinds  # a mixed step ran as a graph
        assert any(dec for _, dec, _ in kinds), kinds


def test_gemv_rows_decode_matches_torch_backend(monkeypatch):
    """Decode steps of three sequences on the GEMV with two rows per program (`ROWS`, each dequantized weight tile
    serving both; RoPE fused into the qkv GEMV per row) give the torch backend's logits: eagerly (M = 3: two
    programs of rows, the second row of the second masked) and graph-replayed (the batch-4 bucket, a padding row)."""
    from lmq.kernels.w4a16_gemm import CONFIGS

    from lmq.engine.qlinear import local_arch

    dev = torch.device("cuda")
    table = CONFIGS[local_arch(dev)]
    monkeypatch.setitem(table, "gemv_max_m", 4)
    monkeypatch.setitem(table, "gemv", {**table["gemv"], "ROWS": 2})
    for graphs in (True, False):
        engines = [LLM(EngineModel.synthetic("smollm2-135m", dev, group_size=64, backend=b),
                       block_size=16, max_model_len=256, cache_max_memory="64MiB", max_num_seqs=4,
                       cuda_graphs=graphs and b == "triton")
                   for b in ("triton", "torch")]
        assert bool(engines[0].runner.graphs) == graphs and not engines[1].runner.graphs
        prompts = [list(range(100, 137)), list(range(500, 503)), list(range(900, 910))]  # 37, 3 and 10 tokens
        for llm in engines:
            for p in prompts:
                llm.add_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True))
        for i in range(3):  # prefill, then two decode steps of three rows
            steps = [llm.scheduler.schedule() for llm in engines]
            assert steps[0].is_decode == (i > 0) and len(steps[0].spans) == 3
            logits = [llm.runner.run(st, llm.manager).float() for llm, st in zip(engines, steps)]  # [3, V]
            cos = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
            assert cos.min().item() > 0.999, (graphs, steps[0].is_decode, cos)
            for llm, st in zip(engines, steps):
                for sp in st.spans:
                    llm.scheduler.advance(sp)
                for sp, tok in zip(st.spans, logits[1].argmax(-1).tolist()):
                    sp.seq.token_ids.append(tok)


def test_deterministic_engine_repeats_its_tokens_with_int4_kv():
    """With deterministic=True, every split-K sum is order-independent: the same prompts, batched, give the same
    logits bit for bit on a second engine (int4 KV, where a flipped rounding of a K/V code shows up in the tokens).
    The 253-token prefill step runs the Hopper prefill GEMM on sm90, the decode steps of 3 sequences the decode
    kernel with its splits added in split order, the last steps of one sequence the GEMV."""
    dev = torch.device("cuda")
    model = EngineModel.synthetic("smollm2-135m", dev, group_size=64, deterministic=True)
    assert model.layers[0].qkv.table["decode"]["REDUCE"] == "ordered"
    prompts = [list(range(100, 340)), list(range(500, 503)), list(range(900, 910))]  # 240 + 3 + 10 tokens
    runs = []
    for _ in range(2):
        llm = LLM(model, block_size=16, max_model_len=256, cache_max_memory="64MiB", max_num_seqs=4,
                  kv_dtype="int4", deterministic=True)
        for p in prompts:
            llm.add_request(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
        logits, rows = [], []
        for i in range(6):  # prefill, two decode steps of three sequences, three of one
            st = llm.scheduler.schedule()
            lg = llm.runner.run(st, llm.manager)
            logits.append(lg.clone())
            rows.append(len(st.spans))
            for sp, tok in zip(st.spans, lg.argmax(-1).tolist()):
                llm.scheduler.advance(sp)
                sp.seq.token_ids.append(tok)
            if i == 2:  # the two short prompts end: the long one decodes alone (M = 1, the GEMV)
                for sp in sorted(st.spans, key=lambda sp: len(sp.seq.token_ids))[:2]:
                    llm.scheduler.finish(sp.seq, "length")
        assert rows == [3, 3, 3, 1, 1, 1], rows
        runs.append(logits)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
