"""`ChatSession` and `lmq chat` on the small real model (SmolLM2-135M-Instruct, RTN g64): the second
turn's prompt comes from the prefix cache, the CLI's one-shot and interactive modes, a conversation
too long for the context, Ctrl-C in the middle of an answer. The model is loaded once; the CLI tests
reuse it by patching `LLM` so each invocation builds only a new cache around the loaded weights."""

from contextlib import closing

import pytest
from typer.testing import CliRunner

import lmq.engine.llm as llm_mod
from lmq.cli import app
from lmq.engine.chat import ChatSession
from lmq.engine.sampling import SamplingParams
from lmq.errors import InputError

LLM = llm_mod.LLM  # the real class: the `cli` fixture patches the module's name

BLOCK = 16
GREEDY = SamplingParams(max_new_tokens=8)  # temperature 0: greedy
QUESTION = "What is the capital of France?"
LONG = "tell me about this word " * 40  # ~200 tokens: more than a 64-token context
ENGINE_ARGS = ["--device", "cpu", "--max-model-len", "512", "--cache-max-memory", "64MiB",
               "--block-size", str(BLOCK), "--temperature", "0", "--max-new-tokens", "4"]


def make_llm(model, **kw):
    kw = {"block_size": BLOCK, "max_model_len": 512, **kw}
    kw.setdefault("cache_max_memory", "64MiB")  # several engines share the device in one test session
    return LLM(model, **kw)


@pytest.fixture(scope="module")
def weights(smollm2_rtn):
    return make_llm(smollm2_rtn).model


@pytest.fixture
def cli(monkeypatch, weights, smollm2_rtn):
    """Run `lmq chat CHECKPOINT ...` on the loaded weights; returns the click Result."""
    monkeypatch.setattr(llm_mod, "LLM", lambda path, **kw: LLM(weights, **kw))

    def run(*args, input=None):
        res = CliRunner().invoke(app, ["chat", str(smollm2_rtn), *ENGINE_ARGS, *args], input=input)
        res.log = " ".join(res.stderr.split())  # stderr unwrapped (rich wraps at 80 columns)
        return res

    return run


@pytest.fixture(scope="module")
def two_turns(weights):
    """A fresh cache, two greedy turns: (session, answers, stats of each turn)."""
    s = ChatSession(make_llm(weights), params=GREEDY)
    answers, stats = [], []
    for q in (QUESTION, "And of Italy?"):
        answers.append("".join(s.ask(q)))
        stats.append(s.last_stats)
    return s, answers, stats


def test_second_turn_reuses_the_first_turns_kv(two_turns):
    s, answers, (first, second) = two_turns
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in s.messages[1::2]] == answers and "Paris" in answers[0]
    assert first.generated_tokens == second.generated_tokens == 8 and first.finish_reason == "length"
    assert first.ttft_s > 0 and first.output_tok_s > 0
    history = first.prompt_tokens + first.generated_tokens
    # the whole first request is reused, its partly filled last block included, except its last
    # generated token, whose K/V was never computed (SmolLM2's template re-tokenizes the answer as-is)
    assert second.cached_tokens == history - 1 < second.prompt_tokens
    assert first.cached_tokens < first.prompt_tokens


def test_reset_keeps_the_system_message(weights):
    s = ChatSession(make_llm(weights), system="You are terse.", params=GREEDY)
    s.messages.append({"role": "user", "content": "x"})
    s.reset()
    assert s.messages == [{"role": "system", "content": "You are terse."}]


def test_too_long_conversation_is_refused_and_history_kept(two_turns):
    s, _, _ = two_turns
    before = list(s.messages)
    s.llm.max_model_len, saved = 64, s.llm.max_model_len
    try:
        with pytest.raises(InputError, match="/reset"):
            s.ask(LONG)
    finally:
        s.llm.max_model_len = saved
    assert s.messages == before


def test_interrupt_from_the_consumer_keeps_the_partial_answer(weights):
    llm = make_llm(weights)
    s = ChatSession(llm, params=SamplingParams(max_new_tokens=4))
    shown = []
    with pytest.raises(KeyboardInterrupt), closing(s.ask(QUESTION)) as pieces:
        for piece in pieces:
            shown.append(piece)
            if len(shown) == 2:
                raise KeyboardInterrupt
    assert s.messages == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "".join(shown)}]
    assert s.last_stats.finish_reason == "abort" and not llm.has_unfinished() and not llm.seqs
    answer = "".join(s.ask("Thanks."))  # the session goes on, on the interrupted turn's KV
    assert answer and len(s.messages) == 4 and s.last_stats.cached_tokens > 0


def test_interrupt_inside_the_engine_leaves_the_session_usable(weights, monkeypatch):
    llm = make_llm(weights)
    s = ChatSession(llm, params=SamplingParams(max_new_tokens=3))
    real_step, calls = llm.step, []

    def step():
        calls.append(1)
        if len(calls) == 1:  # Ctrl-C before the first token: the turn is dropped
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm, "step", step)
    with pytest.raises(KeyboardInterrupt):
        list(s.ask(QUESTION))
    assert s.messages == [] and not llm.seqs and s.last_stats.finish_reason == "abort"
    assert "".join(s.ask(QUESTION)) and len(s.messages) == 2 and s.last_stats.finish_reason == "length"


def test_no_chat_template_is_refused(weights):
    llm = make_llm(weights)
    llm.tokenizer.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        ChatSession(llm)


NO_SYSTEM_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                      "{% endif %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")


def test_system_message_refused_by_the_template_is_one_error_up_front(weights):
    """Before, the session started and then refused every message with the template's own words."""
    llm = make_llm(weights)
    llm.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    with pytest.raises(InputError, match="takes no system message; drop --system"):
        ChatSession(llm, system="Be brief.", params=GREEDY)
    assert "".join(ChatSession(llm, params=GREEDY).ask(QUESTION))  # without --system it chats


def test_cli_prompt_prints_only_the_answer(cli, two_turns):
    res = cli("--prompt", QUESTION)
    assert res.exit_code == 0, (res.output, res.exception)
    assert res.stdout.endswith("\n") and res.stdout.count("\n") == 1
    assert res.stdout[:-1] and two_turns[1][0].startswith(res.stdout[:-1])  # greedy: the first 4 of 8 tokens


def test_cli_interactive_commands(cli):
    res = cli(input="hi\n/stats\n/reset\n/exit\nnever answered\n")
    assert res.exit_code == 0, (res.output, res.exception)
    assert len(res.stdout.splitlines()) == 1 and res.stdout.strip()
    assert "TTFT" in res.log and "cached)" in res.log and "conversation cleared" in res.log


def test_cli_too_long_message_then_the_session_goes_on(cli):
    res = cli("--max-model-len", "64", input=f"{LONG}\nhi\n")  # EOF ends it
    assert res.exit_code == 0, (res.output, res.exception)
    assert "shorter message" in res.log and "error:" not in res.log
    assert len(res.stdout.splitlines()) == 1 and res.stdout.strip()


def test_cli_too_long_prompt_is_one_error_line(cli):
    res = cli("--max-model-len", "64", "--prompt", LONG)
    assert res.exit_code == 1 and res.stdout == ""
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and "shorter message" in errors[0]


def test_cli_empty_prompt_or_tiny_context_is_one_error_line(cli):
    for args, match in ((("--prompt", "  "), "--prompt is empty"),
                        (("--max-model-len", "0", "--prompt", "hi"), "--max-model-len must be 2 tokens or more"),
                        (("--max-model-len", "-5", "--prompt", "hi"), "got -5"),
                        (("--gpu-memory-utilization", "5", "--prompt", "hi"),
                         "--gpu-memory-utilization must be in (0, 1], got 5")):
        res = cli(*args)
        assert res.exit_code == 1 and res.stdout == "" and match in res.log, (args, res.log)


def test_cli_ctrl_c_stops_an_answer_not_the_chat(cli, monkeypatch):
    real_step, calls = LLM.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(LLM, "step", step)
    res = cli(input="hi\n/stats\nhi\n")
    assert res.exit_code == 0, (res.output, res.exception)
    assert "answer stopped" in res.log and "(abort)" in res.log
    assert len(res.stdout.splitlines()) == 2


def test_cli_sigterm_ends_the_chat_not_just_the_answer(cli, monkeypatch):
    """SIGTERM (`docker stop`, `timeout`) mid-answer ends the process with 143; only Ctrl-C keeps the chat going."""
    import os
    import signal

    real_step, calls = LLM.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this frame
        return real_step(self)

    monkeypatch.setattr(LLM, "step", step)
    res = cli(input="hi\nhi\n")
    assert res.exit_code == 143, (res.output, res.exception)
    assert "terminated" in res.log and "answer stopped" not in res.log


def test_cli_input_that_is_not_utf8_is_refused_and_the_chat_goes_on(cli):
    """Bytes that are not UTF-8 (a terminal or file in another encoding) are named, and the lines after them are
    still read and answered; as --prompt or --system (lone surrogates from argv) they are one error line."""
    res = cli(input=b"\xff\xfe hello\nhi\n")
    assert res.exit_code == 0, (res.output, res.exception)
    assert "the message is not UTF-8 text" in res.log and "'\\udcff\\udcfe' at character 0" in res.log, res.log
    assert len(res.stdout.splitlines()) == 1 and res.stdout.strip()  # "hi" was answered
    for args in (("--prompt", "\udcff hello"), ("--system", "\udcff", "--prompt", "hi")):
        res = cli(*args)
        assert res.exit_code == 1 and res.stdout == "" and "is not UTF-8 text" in res.log, (args, res.log)
