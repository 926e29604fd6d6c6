"""A multi-turn chat on top of `LLM.stream`: the conversation, its chat template, per-turn stats.

Each turn renders the WHOLE conversation with the tokenizer's chat template and sends it as a new
request. The KV of the earlier turns is not kept by this class: the engine's prefix cache keys
every full KV block by its tokens, and keeps the previous request's partly filled last block, so the
re-rendered history (system + earlier questions and answers) finds its K/V still in the cache and
only what differs is prefilled: the template's end-of-turn tokens after the previous answer, the new
message, and whatever a re-tokenization of the answer text changed. What is reused shows in
`last_stats.cached_tokens`.

Interrupting an answer (Ctrl-C, or closing the iterator early): the text produced so far is KEPT
as the assistant message, so the history matches what the user saw and the next turn reuses its
KV. An interruption before any text was produced drops the turn (the question is not kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lmq.engine.sampling import SamplingParams
from lmq.errors import InputError


@dataclass
class TurnStats:
    """Numbers of the last answer (vLLM's names where they exist)."""

    ttft_s: float | None  # request arrival -> first generated token
    output_tok_s: float | None  # decode speed: tokens after the first / time since the first
    prompt_tokens: int  # the rendered conversation
    cached_tokens: int  # of those, how many the prefix cache already held (not prefilled)
    generated_tokens: int
    finish_reason: str | None  # "stop", "length", or "abort" (interrupted)


def check_text(text: str, what: str) -> str:
    """`text` if it is text the tokenizer can take. Bytes that were not UTF-8 (a terminal or piped file in another
    encoding, read with errors="surrogateescape") arrive as lone surrogates, which the tokenizer refuses with a
    TypeError; they are refused here, naming them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not UTF-8 text ({text[e.start:e.end]!r} at character {e.start} was not "
                         "decodable); set the terminal, or the file piped in, to UTF-8") from None
    return text


class ChatSession:
    """A conversation with one model: `ask(text)` streams the answer and extends `messages`."""

    def __init__(self, llm, system: str | None = None, params: SamplingParams | None = None):
        self.llm = llm
        self.system = system if system is None else check_text(system, "the system message")
        self.params = (params or SamplingParams()).validate()
        if not getattr(llm.tokenizer, "chat_template", None):
            raise InputError(f"checkpoint {llm.path} has no chat template (no chat_template in its "
                             "tokenizer_config.json or chat_template.jinja): lmq chat needs an instruction-"
                             "tuned (chat) model; use a chat/-Instruct checkpoint, or copy the template "
                             "from the model it came from")
        self.messages: list[dict[str, str]] = []
        self.last_stats: TurnStats | None = None
        self.reset()
        if self.system:  # a template that refuses a system message would refuse every turn: say so up front
            hello = {"role": "user", "content": "Hello"}
            try:
                self.render([*self.messages, hello])
            except InputError as e:
                self.render([hello])  # (a template that refuses even this raises its own error here)
                raise InputError(f"{e}: its template takes no system message; drop --system and put the "
                                 "instructions in your first message") from None

    def reset(self) -> None:
        """Forget the conversation; the system message (if any) stays."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    @property
    def num_turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation with the assistant's turn opened (the template's BOS and
        special tokens are in the text, so the tokenizer adds none)."""
        from jinja2 import TemplateError

        tok = self.llm.tokenizer
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # e.g. a template that refuses a system message
            raise InputError(f"the chat template of {self.llm.path} rejected the conversation ({e})") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text` piece by piece; the question and answer join `messages` when
        the answer ends (or is interrupted, see the module docstring). The prompt is rendered and
        checked before this returns, so a conversation too long for the context raises InputError
        here and leaves the history unchanged. Stop early by closing the iterator
        (`contextlib.closing`) or by a KeyboardInterrupt while it runs."""
        question = {"role": "user", "content": check_text(text, "the message")}
        ids = self.render([*self.messages, question])
        try:
            self.llm.check_prompt(ids)
        except InputError as e:
            if self.num_turns:
                raise InputError(f"the conversation with this message is {len(ids)} tokens, but the context "
                                 f"holds {self.llm.max_model_len}; type /reset to start a new conversation "
                                 "(or send a shorter message)") from e
            raise InputError(f"this message is {len(ids)} tokens with the chat template, but the context "
                             f"holds {self.llm.max_model_len} (prompt + answer); send a shorter message, or "
                             "raise --max-model-len / --cache-max-memory") from e
        return self._answer(question, ids)

    def _answer(self, question: dict[str, str], ids: list[int]) -> Iterator[str]:
        pieces: list[str] = []
        last = None
        stream = self.llm.stream(ids, self.params)
        try:
            for out in stream:
                last = out
                if out.delta:
                    pieces.append(out.delta)
                    yield out.delta
        finally:  # also on KeyboardInterrupt / GeneratorExit: keep what was said, free the request
            stream.close()
            answer = "".join(pieces)
            if last is not None and (answer or last.finished):
                self.messages += [question, {"role": "assistant", "content": answer}]
            self.last_stats = self._stats(ids, last)

    @staticmethod
    def _stats(ids: list[int], out) -> TurnStats:
        if out is None:
            return TurnStats(None, None, len(ids), 0, 0, "abort")
        m = out.metrics
        tpot = m.tpot_s
        return TurnStats(m.ttft_s, 1 / tpot if tpot else None, len(ids), m.num_cached_tokens,
                         len(out.token_ids), out.finish_reason if out.finished else "abort")
