"""A request's state as the engine sees it: pure data, no tensors (nano-vllm's `Sequence`).

Token bookkeeping of one sequence (prompt + generated so far = `token_ids`):

    0 ........ num_computed ........ len(token_ids)
    [ K/V in the cache ][ still to compute ]

A step computes a span `start..end` of the "still to compute" part (chunked prefill computes a
prompt in several spans; decode computes the one last token). When a span reaches the last token,
its logits give the next token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from lmq.engine.sampling import SamplingParams, TextStream


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Metrics:
    """Times (time.perf_counter seconds) of one request; vLLM's metric names are derived from them."""

    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token
    finished: float | None = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    num_preemptions: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: gaps between consecutive generated tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT)."""
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort"
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt (and `LLM.step` per updated request)."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens
    text: str
    finished: bool
    finish_reason: str | None
    metrics: Metrics
    delta: str = ""  # text new since the previous update (streaming)
