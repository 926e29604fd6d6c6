"""Continuous batching: which tokens of which sequences the next step computes (no tensors).

Every step is planned within a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`), in this order:

1. decode: every running sequence whose prompt is done gets its one next token (oldest first).
   When the KV pool has no block for it, the newest running sequence is preempted: its blocks are
   freed and it goes back to the front of the queue, to be recomputed later (vLLM's "recompute"
   preemption; the prefix cache often gives much of it back).
2. prefill chunks of running sequences whose prompt is not done yet (chunked prefill).
3. new sequences from the queue while budget, the cap and free blocks allow. `BlockManager.allocate`
   gives the whole prompt its blocks and reports how many leading tokens the prefix cache already
   holds; those are skipped, except blocks another sequence has reserved but not yet written.

Prefill chunks and decode tokens share one step (the attention kernels take variable-length spans
over a paged prefix), so long prompts never stall the running batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lmq.engine.kv_cache import BlockManager
from lmq.engine.sequence import Sequence, Status


@dataclass
class Span:
    """Tokens start..end-1 of `seq` are computed this step; `sample` when end is its last token."""

    seq: Sequence
    start: int
    end: int

    @property
    def sample(self) -> bool:
        # (> for a lookahead step: its input token is sampled on the device, not yet appended)
        return self.end >= self.seq.num_tokens


@dataclass
class Step:
    spans: list[Span]
    copies: list[tuple[int, int]]  # copy-on-write block copies to run before the step

    @property
    def is_decode(self) -> bool:
        """Every span is one token: the decode attention kernel (and a CUDA graph) can run it."""
        return all(s.end - s.start == 1 for s in self.spans)

    @property
    def num_tokens(self) -> int:
        return sum(s.end - s.start for s in self.spans)


class Scheduler:
    def __init__(self, manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.manager = manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._preempted = False  # set by `preempt` during a step's planning

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning ---------------------------------------------------------------------------------
    def schedule(self) -> Step | None:
        budget = self.max_num_batched_tokens
        self._preempted = False
        spans: list[Span] = []
        copies: list[tuple[int, int]] = []
        # 1. decode
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.num_uncomputed != 1 or budget == 0:
                continue
            # a new token needs a slot; the last token of a chunked prefill already has one
            if self.manager.seqs[seq.seq_id].num_tokens < seq.num_tokens:
                if not self._make_room(seq):
                    continue  # seq itself was preempted
                _, cow = self.manager.append_slot(seq.seq_id)
                copies += cow
            spans.append(Span(seq, seq.num_computed, seq.num_tokens))
            budget -= 1
        # 2. prefill chunks of running sequences
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed > 1:  # (decode took only sequences with exactly one left)
                n = min(seq.num_uncomputed, budget)
                spans.append(Span(seq, seq.num_computed, seq.num_computed + n))
                budget -= n
        # 3. admit new sequences (not right after a preemption: the freed blocks are for decode)
        while not self._preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.manager.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            cached = self.manager.allocate(seq.seq_id, seq.token_ids)
            seq.num_computed = self._written_prefix(seq, cached)
            seq.metrics.num_cached_tokens = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            spans.append(Span(seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        if not spans:
            return None
        return Step(spans, copies)

    def _make_room(self, seq: Sequence) -> bool:
        """Preempt the newest running sequences until `seq` can take one more token; False when
        `seq` itself had to go."""
        while not self.manager.can_append(seq.seq_id):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _written_prefix(self, seq: Sequence, cached: int) -> int:
        """Cached tokens that are really in the cache: a reused block that a running sequence's
        chunked prefill has reserved but not yet written is recomputed (same tokens, same slots).
        That includes a block whose last token is computed in this very step: if the step never
        runs (an error, Ctrl-C) and its requests are aborted, this one has not counted it written."""
        bs = self.manager.block_size
        unwritten = set()
        for other in self.running:
            if other.num_uncomputed > 0:
                unwritten.update(self.manager.block_table(other.seq_id)[other.num_computed // bs:])
        table = self.manager.block_table(seq.seq_id)
        for i in range(cached // bs):
            if table[i] in unwritten:
                return i * bs
        return cached

    # -- after the step ---------------------------------------------------------------------------
    def advance(self, span: Span) -> None:
        """The span's K/V are now in the cache; key any block it completed for prefix reuse."""
        seq = span.seq
        seq.num_computed = span.end
        if span.end > seq.num_prompt_tokens:  # prompt blocks were keyed at allocate
            self.manager.seal_block(seq.seq_id, seq.token_ids, span.end)

    def preempt(self, seq: Sequence) -> None:
        self.manager.free(seq.seq_id, seq.num_computed)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self._preempted = True
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a finished or aborted sequence; its blocks stay in the prefix cache (its partly
        filled last block too, for a next chat turn that continues its tokens)."""
        if seq in self.running:
            self.manager.free(seq.seq_id, seq.num_computed, seq.token_ids)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
