"""Sampling (greedy, temperature, top-k, top-p, repetition penalty, seeds) and the streaming
detokenizer on SmolLM2's real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from lmq.engine.sampling import (
    SamplingParams,
    TextStream,
    apply_repetition_penalty,
    make_generator,
    sample,
)
from lmq.errors import InputError, ShapeError

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln — naïve café, smörgåsbord, Ærøskøbing.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Emoji: 🎉🚀👩‍👩‍👧‍👦 🇯🇵 and a thumbs up 👍🏽 — done ✅",
    "Привет, мир! Ελληνικά κείμενα. עברית. العربية. हिन्दी।",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # ≥ ≤ ∑ ∫\n",
]


@pytest.fixture(scope="module")
def tok(smollm2):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2))


def stream_all(tok, ids, **kw):
    s = TextStream(tok, **kw)
    pieces = [s.push(i) for i in ids]
    pieces.append(s.finish())
    return s, pieces


# ----- TextStream -----

@pytest.mark.parametrize("text", TEXTS)
def test_stream_concatenates_to_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    s, pieces = stream_all(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert s.text == text and not s.stopped
    assert all("\ufffd" not in p for p in pieces)  # partial characters are held back
    # in CJK and emoji text, characters really are split across tokens
    if text in (TEXTS[2], TEXTS[3]):
        assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_stream_skips_special_tokens(tok):
    ids = [tok.convert_tokens_to_ids("<|im_start|>")] + tok.encode("Bonjour 🎉", add_special_tokens=False) \
        + [tok.eos_token_id]
    _, pieces = stream_all(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "Bonjour 🎉"
    _, pieces = stream_all(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)


def test_stream_random_ids_match_full_decode(tok):
    # random ids include byte tokens that never form a valid character: the flush still matches
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, len(tok), (40,), generator=g).tolist()
        _, pieces = stream_all(tok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_stream_window_stays_small(tok):
    ids = tok.encode(" ".join(TEXTS) * 5, add_special_tokens=False)
    s = TextStream(tok)
    longest = 0
    for i in ids:
        s.push(i)
        longest = max(longest, len(s._ids))
    s.finish()
    assert longest <= 8 and s.text == tok.decode(ids)


def test_stop_string_split_across_tokens(tok):
    text = "The answer is 42. ###END### and more text that must not appear"
    stop = "###END###"
    ids = tok.encode(text, add_special_tokens=False)
    assert not any(stop in tok.decode([i]) for i in ids)  # no single token holds the stop string
    s, pieces = stream_all(tok, ids, stop=(stop,))
    assert s.stopped
    assert "".join(pieces) == s.text == "The answer is 42. "
    assert s.push(ids[0]) == "" and s.finish() == ""


def test_stop_string_inside_multibyte_characters(tok):
    text = "日本語のテキスト。世界は広い。終わり"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    s, pieces = stream_all(tok, ids, stop=("世界",))
    assert s.stopped and "".join(pieces) == "日本語のテキスト。"


def test_stop_earliest_of_several_and_held_prefixes_released(tok):
    text = "alpha beta <|stop gamma STOP delta"
    ids = tok.encode(text, add_special_tokens=False)
    s, pieces = stream_all(tok, ids, stop=("STOP", "<|stop|>", "delta"))
    assert s.stopped and "".join(pieces) == "alpha beta <|stop gamma "
    # "<|stop" was held back (it could begin "<|stop|>") and released once it could not
    assert s.text == "alpha beta <|stop gamma "
    # a partial stop string at the very end is flushed by finish()
    s, pieces = stream_all(tok, tok.encode("the end is <|st", add_special_tokens=False), stop=("<|stop|>",))
    assert not s.stopped and pieces[-1].endswith("<|st") and "".join(pieces) == "the end is <|st"


def test_stream_rejects_bad_stop(tok):
    with pytest.raises(InputError, match="'abc'"):
        TextStream(tok, stop="abc")
    with pytest.raises(InputError, match="non-empty"):
        TextStream(tok, stop=("",))


# ----- sample -----

def rand_logits(B, V, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def run(logits, params, histories=None, generators=None):
    B = logits.shape[0]
    return sample(logits, params, histories or [[] for _ in range(B)], generators or [None] * B)


def test_greedy_is_argmax_and_uses_no_randomness():
    logits = rand_logits(9, 1000)
    before = logits.clone()
    state = torch.get_rng_state()
    out = run(logits, [SamplingParams()] * 9)
    assert out.dtype == torch.long and out.shape == (9,)
    assert torch.equal(out, logits.argmax(-1))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(logits, before)


def test_top_k_one_is_greedy():
    logits = rand_logits(6, 500)
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(6)]
    gens = [make_generator(p, "cpu") for p in params]
    assert torch.equal(run(logits, params, generators=gens), logits.argmax(-1))


def test_seeded_rows_reproducible_whatever_the_batch():
    V = 300
    target = rand_logits(1, V, seed=1)[0]
    mine = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234)

    def tokens(position, others):
        gens = [make_generator(p, "cpu") for p in others]
        gen = make_generator(mine, "cpu")
        got = []
        for step in range(12):
            logits = rand_logits(len(others) + 1, V, seed=100 + step)  # neighbours change every step
            logits[position] = target
            params = others[:position] + [mine] + others[position:]
            generators = gens[:position] + [gen] + gens[position:]
            got.append(run(logits, params, generators=generators)[position].item())
        return got

    alone = tokens(0, [])
    others = [SamplingParams(temperature=0.7, seed=5), SamplingParams(), SamplingParams(temperature=2.0, top_k=3),
              SamplingParams(temperature=1.0, top_p=0.5)]
    assert tokens(2, others) == alone
    assert tokens(4, others) == alone
    assert len(set(alone)) > 1  # it really sampled
    other_seed = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=4321)
    gen = make_generator(other_seed, "cpu")
    assert [run(target[None], [other_seed], generators=[gen]).item() for _ in range(12)] != alone


def frequencies(logits_row, params, n=4000, seed=0):
    logits = logits_row[None].expand(n, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = run(logits, [params] * n)
    return torch.bincount(out, minlength=logits.shape[1]).float() / n


def test_temperature_one_samples_the_softmax():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0))
    assert (freq - probs).abs().max() < 0.03
    # a low temperature sharpens towards the argmax
    assert frequencies(probs.log(), SamplingParams(temperature=0.25))[0] > 0.6


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])  # sorted: 1 (.5), 3 (.3), 4 (.1), ...
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=0.75))
    assert set(freq.nonzero().flatten().tolist()) == {1, 3}  # mass before token 4 is 0.8 >= 0.75
    assert abs(freq[1] - 0.5 / 0.8) < 0.03
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=0.85))
    assert set(freq.nonzero().flatten().tolist()) == {1, 3, 4}
    # a tiny top_p still keeps the most likely token
    assert frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=1e-6))[1] == 1.0


def test_top_k_then_top_p_on_the_renormalized_top_k():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0, top_k=2))
    assert set(freq.nonzero().flatten().tolist()) == {1, 3} and abs(freq[1] - 0.625) < 0.03
    # within the top 2 (renormalized .625 / .375), top_p=0.6 keeps only the first
    assert frequencies(probs.log(), SamplingParams(temperature=1.0, top_k=2, top_p=0.6))[1] == 1.0


def test_repetition_penalty_direction():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0, -1.1]])
    p = SamplingParams(repetition_penalty=1.5)
    got = apply_repetition_penalty(logits, [p], [[1, 3, 1, 1]])
    assert torch.allclose(got, torch.tensor([[0.0, 2.0 / 1.5, 1.9, -1.5, -1.1]]))  # once, however often seen
    assert torch.equal(logits, torch.tensor([[0.0, 2.0, 1.9, -1.0, -1.1]]))  # input untouched
    assert run(logits, [p], [[1]]).item() == 2
    assert run(logits, [SamplingParams()], [[1]]).item() == 1
    # negative logits get more negative: token 3 loses to token 4
    neg = torch.tensor([[-5.0, -5.0, -5.0, -1.0, -1.1]])
    assert run(neg, [p], [[3]]).item() == 4
    # rows without a penalty are untouched
    two = torch.cat([logits, logits])
    assert run(two, [p, SamplingParams()], [[1], [1]]).tolist() == [2, 1]


def test_sample_checks_batch_lengths():
    with pytest.raises(ShapeError, match="B = 2"):
        sample(rand_logits(2, 10), [SamplingParams()], [[]], [None])
    with pytest.raises(ShapeError, match=r"\(10,\)"):
        sample(torch.zeros(10), [SamplingParams()], [[]], [None])


# ----- SamplingParams -----

def test_make_generator():
    assert make_generator(SamplingParams(), "cpu") is None
    a, b = make_generator(SamplingParams(seed=7), "cpu"), make_generator(SamplingParams(seed=7), "cpu")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


@pytest.mark.parametrize("kw,match", [
    ({"temperature": -0.5}, "temperature.*-0.5"),
    ({"temperature": float("nan")}, "temperature.*nan"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, "top_p.*1.5"),
    ({"top_k": -1}, "top_k.*-1"),
    ({"top_k": 2.5}, "top_k.*2.5"),
    ({"max_new_tokens": 0}, "max_new_tokens.*0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty.*0.0"),
    ({"seed": -3}, "seed.*-3"),
    ({"stop": "###"}, "stop.*'###'.*stop=\\('...',\\)"),
    ({"stop": ("ok", "")}, "stop.*non-empty"),
])
def test_invalid_params_raise(kw, match):
    with pytest.raises(InputError, match=match):
        SamplingParams(**kw).validate()


def test_valid_params_pass():
    p = SamplingParams(max_new_tokens=1, temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=0,
                       stop=["\n\n"], ignore_eos=True).validate()
    assert p.stop == ("\n\n",) and not p.greedy and SamplingParams().greedy
