"""Token sampling and streaming detokenization (pure PyTorch, no Triton).

Sampling one step for a batch of B rows of logits [B, V] (fp32):

    1. repetition penalty (CTRL, arXiv:1909.05858, as in HF): for each token in the row's history,
       logit > 0 -> logit / penalty, else logit * penalty (each token once, however often seen)
    2. greedy rows (temperature == 0 or top_k == 1): argmax
    3. other rows: logits / temperature -> softmax p; top-k keeps the k most likely tokens; top-p
       keeps the smallest most-likely set whose mass (after top-k, renormalized) reaches top_p,
       i.e. drops token i (sorted by probability) when the mass before it is >= top_p, so at
       least one token survives; then draw from p restricted to the kept set.

The draw is the exponential race: argmax_i p_i / q_i with q_i ~ Exp(1) is distributed as p. A
seeded row draws its V noise values from its own generator, and every step above is row-local,
so the same seed gives the same tokens whatever else is in the batch; unseeded rows share one
draw from the default RNG. Only the batch is looped over in Python, never the vocabulary; an
all-greedy batch is one argmax.

`TextStream` turns generated token ids into printable text piece by piece (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmq.errors import InputError, ShapeError


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop, for one request."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # set: a private generator, reproducible whatever the batch
    stop: tuple[str, ...] = ()  # the text is cut before the first of these
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, list):
            self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> SamplingParams:
        """Raise InputError naming the bad value and the fix; returns self."""

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}; "
                             "use 0 for greedy decoding or a positive value such as 0.7 to sample")
        if not is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}; use 0 to turn top-k off")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}; use 1.0 to turn nucleus sampling off")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}; "
                             "use 1.0 for none, or a value such as 1.1 to discourage repeats")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InputError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InputError(f"stop must be a tuple of non-empty strings, got {self.stop!r}; "
                             "write a single stop string as stop=('...',)")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        return self


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with params.seed, or None (use the default RNG) without one."""
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, params: list[SamplingParams],
                             histories: list[list[int]]) -> torch.Tensor:
    """logits [B, V] with the CTRL/HF penalty applied over each row's history (a new tensor when
    any row is penalized, else `logits` itself). Repeated ids in a history count once."""
    rows, cols, pens = [], [], []
    for i, (p, hist) in enumerate(zip(params, histories)):
        if p.repetition_penalty != 1.0 and len(hist):
            rows += [i] * len(hist)
            cols += list(hist)
            pens.append(torch.full((len(hist),), p.repetition_penalty))
    if not rows:
        return logits
    dev = logits.device
    rows_t = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)  # [N]
    cols_t = torch.tensor(cols, dtype=torch.long).to(dev, non_blocking=True)  # [N]
    pen = torch.cat(pens).to(dev, dtype=logits.dtype, non_blocking=True)  # [N]
    out = logits.clone()
    vals = logits[rows_t, cols_t]  # [N], read from the original: duplicates write the same value
    out[rows_t, cols_t] = torch.where(vals > 0, vals / pen, vals * pen)
    return out


def _kept_probs(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Softmax of logits [S, V] with the tokens outside each row's top-k / nucleus set to 0 (not
    renormalized: the exponential race does not need it)."""
    S, V = logits.shape
    probs = torch.softmax(logits, dim=-1)  # [S, V]
    use_k = any(0 < k < V for k in top_ks)
    use_p = any(p < 1.0 for p in top_ps)
    if not (use_k or use_p):
        return probs
    dev = logits.device
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [S, V]
    rank = torch.arange(V, device=dev)  # [V]
    keep = torch.ones(S, V, dtype=torch.bool, device=dev)  # [S, V] in sorted order
    if use_k:
        k = torch.tensor([k if 0 < k < V else V for k in top_ks], device=dev)  # [S]
        keep &= rank[None, :] < k[:, None]
        sorted_probs = sorted_probs * keep
    if use_p:
        p = torch.tensor(top_ps, dtype=probs.dtype, device=dev)[:, None]  # [S, 1]
        cum = sorted_probs.cumsum(dim=-1)  # [S, V]
        mass_before = cum - sorted_probs
        # top-p acts on the top-k renormalized distribution: compare with p * (kept mass)
        drop = (mass_before >= p * cum[:, -1:]) & (p < 1.0)
        drop[:, 0] = False  # the most likely token always survives
        keep &= ~drop
    keep_vocab = torch.empty_like(keep).scatter_(1, order, keep)  # [S, V] back in vocab order
    return probs * keep_vocab


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row: logits [B, V] (fp32), one params / history / generator per row ->
    LongTensor [B] on logits.device. `histories[i]` are the ids the repetition penalty covers
    (HF: prompt + generated so far). The input logits are not modified."""
    if logits.dim() != 2:
        raise ShapeError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if not len(params) == len(histories) == len(generators) == B:
        raise ShapeError(f"need one params, history and generator per logits row (B = {B}), got "
                         f"{len(params)}, {len(histories)}, {len(generators)}")
    logits = apply_repetition_penalty(logits.float(), params, histories)  # [B, V]
    best = logits.argmax(dim=-1)  # [B]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return best
    dev = logits.device

    # temperature, top-k, top-p on the sampled rows only
    sub = logits if len(rows) == B else logits[torch.tensor(rows, device=dev)]  # [S, V]
    temps = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype, device=dev)  # [S]
    probs = _kept_probs(sub / temps[:, None], [params[i].top_k for i in rows],
                        [params[i].top_p for i in rows])  # [S, V]

    # exponential race: seeded rows draw from their own generator, the rest from the default RNG
    noise = torch.empty_like(probs)  # [S, V]
    unseeded = []
    for j, i in enumerate(rows):
        if generators[i] is None:
            unseeded.append(j)
        else:
            noise[j].exponential_(generator=generators[i])
    if len(unseeded) == len(rows):
        noise.exponential_()
    elif unseeded:
        noise[torch.tensor(unseeded, device=dev)] = torch.empty(len(unseeded), V, device=dev).exponential_()
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    choice = (probs / noise).argmax(dim=-1)  # [S]

    if len(rows) == B:
        return choice
    out = best.clone()
    out[torch.tensor(rows, device=dev)] = choice
    return out


class TextStream:
    """Incremental detokenizer: `push(token_id)` returns the text that became printable.

    Decoding ids one at a time is wrong for byte-level BPE (a character split over tokens decodes
    to "\\ufffd") and for SentencePiece (a token's leading space depends on its neighbour), and
    decoding everything each step is O(n). So (as in TGI / vLLM) only a window is decoded: ids
    [prefix_offset:] against [prefix_offset:read_offset], whose text was already returned; the
    difference is new text once it no longer ends in "\\ufffd", and then both offsets move
    forward. Old ids are dropped, so each push costs O(1) in the length of the text.

    Stop strings: a tail of the new text that could be the start of a stop string is held back;
    when a stop string appears, the text is cut just before it and `.stopped` becomes True (later
    pushes return ""). `finish()` returns whatever is left (an incomplete character decodes as
    "\\ufffd", as a full decode would). `.text` is everything returned so far: without a stop,
    after finish(), it equals tokenizer.decode(all ids, skip_special_tokens=...).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"stop must be a tuple of non-empty strings, got {stop!r}")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self.stopped = False
        self._ids: list[int] = []  # the decode window: ids from prefix_offset on
        self._read = 0  # ids[:_read] are already turned into text
        self._pending = ""  # decoded but held back: may be the start of a stop string
        self._pieces: list[str] = []
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _new_text(self, final: bool) -> str:
        """Text of the window beyond what was returned, advancing the offsets when it is complete."""
        prefix_text = self._decode(self._ids[: self._read])
        new_text = self._decode(self._ids)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self._ids = self._ids[self._read:]  # prefix_offset <- read_offset
        self._read = len(self._ids)  # read_offset <- end
        return new_text[len(prefix_text):]

    def _emit(self, delta: str) -> str:
        text = self._pending + delta
        hold = 0
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self._pending = ""
                return self._out(text[:cut])
            hold = next((k for k in range(min(self._max_hold, len(text)), 0, -1)
                         if any(s.startswith(text[-k:]) for s in self.stop)), 0)
        self._pending = text[len(text) - hold:] if hold else ""
        return self._out(text[: len(text) - hold])

    def _out(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the newly printable text (often "")."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        delta = self._new_text(final=False)
        return self._emit(delta) if delta else ""

    def finish(self) -> str:
        """Flush: the rest of the text, including a held-back partial stop string."""
        if self.stopped:
            return ""
        out = self._emit(self._new_text(final=True)) if len(self._ids) > self._read else ""
        if not self.stopped:
            out += self._out(self._pending)
            self._pending = ""
        return out
