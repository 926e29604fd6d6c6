"""The model runner: owns the device, the KV cache tensors and the CUDA graphs; runs one `Step`.

A step's spans become one packed batch: `input_ids [T]`, positions, the slot of every new token,
block tables and lengths (`AttentionBatch`). Steps with a span longer than one token run eagerly
through the varlen prefill attention (decode tokens ride along as one-token spans). Steps where
every span is one token (pure decode) run as a CUDA graph captured for the smallest batch-size
bucket that holds them: the inputs are copied into the graph's static buffers in one host-to-device
copy, padded rows write to slot -1 (skipped) and attend over one token of block 0, and decode
attention is planned for `max_model_len` so the graph's launch grid never changes.

With `prefill_graphs` (on by default where decode graphs are captured; `LLM(prefill_graphs=False)`
or LMQ_PREFILL_GRAPHS=0 turns them off), a step that prefills one sequence's last `T <= 2048` prompt
tokens alone (a chat turn, a request arriving at an idle engine) also replays a graph, captured per
token-count bucket: the buckets stop at the step's token budget and the context, whichever is smaller
(itself a bucket where it falls between two). The span is padded to the bucket with tokens that write
nothing (slot -1), sit at position 0 for RoPE and, being after every real token, are never attended by
one; only the last real row's logits are computed. An eager prefill is host-bound on a slow host (about
430 kernel launches for Llama-3-8B: 22-37 ms of host time around 8-15 ms of kernels for 512 tokens, and
37 ms around 24 ms for 1,024, on the lent H100's host; benchmarks/profile_prefill.py). The graphs share
one memory pool, so their activations cost what the largest bucket's do.
"""

from __future__ import annotations

import numpy as np
import torch

from lmq.console import log
from lmq.engine.kv_cache import (
    AttentionBatch,
    BlockManager,
    KVCache,
    KVCacheSpec,
    build_batch,
)
from lmq.engine.model import EngineModel
from lmq.engine.scheduler import Step

GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PREFILL_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048)  # new-token counts of the prefill graphs


class ModelRunner:
    def __init__(self, model: EngineModel, spec: KVCacheSpec, num_blocks: int, max_num_seqs: int,
                 max_model_len: int, cuda_graphs: bool = True, prefill_graphs: bool = False,
                 max_prefill_tokens: int | None = None):
        self.model = model
        self.device = model.device
        self.cache = KVCache(spec, num_blocks, self.device)
        self.block_size = spec.block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // spec.block_size)  # block-table width
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # no step prefills more than the token budget or the context: the smaller of them (at most the largest
        # bucket) is the last bucket, so a budget between two buckets still has its graph
        most = min(max_model_len, max_prefill_tokens or max_model_len, PREFILL_BUCKETS[-1])
        self.prefill_buckets = [b for b in PREFILL_BUCKETS if b < most] + [most] if prefill_graphs else []
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]  # ascending
        if cuda_graphs and self.device.type == "cuda" and model.backend == "triton":
            self._capture()

    # -- eager steps ------------------------------------------------------------------------------
    def run(self, step: Step, manager: BlockManager, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[S, V]` fp32 of the step's sampling spans, in span order. `ids` [B] on the device
        replace the input tokens of a decode step (a lookahead step: the host does not have them)."""
        if step.is_decode and self.graphs and len(step.spans) <= self.buckets[-1]:
            return self._replay(step, manager, ids)
        if self._prefill_graph_fits(step, ids):
            return self._replay_prefill(step, manager)
        batch = build_batch(manager, [(sp.seq.seq_id, sp.start, sp.end) for sp in step.spans],
                            is_prefill=not step.is_decode, device=self.device)
        dev_ids, ids = ids, []
        rows: list[int] = []  # the last row of each sampling span
        for sp in step.spans:
            ids += sp.seq.token_ids[sp.start:sp.end] if dev_ids is None else [0]
            if sp.sample:
                rows.append(len(ids) - 1)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device) if dev_ids is None else dev_ids
        sample_rows = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return self.model.forward(input_ids, self.cache, batch, sample_rows)

    # -- CUDA graphs for decode -------------------------------------------------------------------
    def _static_batch(self, bs: int) -> tuple[torch.Tensor, AttentionBatch]:
        """Views of the static buffers for a bucket of `bs` rows."""
        ids = self._ids[:bs]
        batch = AttentionBatch(
            slot_mapping=self._slots[:bs], block_tables=self._tables[:bs], seq_lens=self._lens[:bs],
            cu_seqlens_q=self._cu[: bs + 1], positions=self._pos[:bs], max_q_len=1,
            max_seq_len=self.max_model_len, is_prefill=False,
        )
        return ids, batch

    def _capture(self) -> None:
        import time

        t0 = time.perf_counter()
        G, W = self.buckets[-1], self.max_blocks
        dev = self.device
        # one int32 buffer: [ids | positions | slots | lens | cu (G+1) | tables (G x W)]
        self._host = torch.zeros(5 * G + 1 + G * W, dtype=torch.int32, pin_memory=True)
        self._host_np = self._host.numpy()  # the same memory: cheap element writes from Python
        self._copied = torch.cuda.Event()  # the last host -> device copy of the buffer is done
        self._dev = torch.zeros_like(self._host, device=dev)
        d = self._dev
        self._ids, self._pos, self._slots, self._lens = d[:G], d[G:2 * G], d[2 * G:3 * G], d[3 * G:4 * G]
        self._cu = d[4 * G:5 * G + 1]
        self._tables = d[5 * G + 1:].view(G, W)
        self._reset_static(G)
        self._dev.copy_(self._host)  # padding everywhere: warm-up writes nothing, attends one token
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        self._capture_prefill(pool, stream)  # the largest temporaries first
        for bs in reversed(self.buckets):  # largest first: the smaller graphs reuse its pool
            ids, batch = self._static_batch(bs)
            self.graphs[bs] = self._capture_one(lambda i=ids, b=batch: self.model.forward(i, self.cache, b),
                                                pool, stream)  # [bs, V]
        torch.cuda.synchronize()
        prefill = f" and prefill graphs for {self.prefill_buckets} new tokens" if self.prefill_buckets else ""
        log(f"captured decode CUDA graphs for batch sizes {self.buckets}{prefill} in {time.perf_counter() - t0:.1f}s")

    # -- CUDA graphs for single-sequence prefill ------------------------------------------------------
    def _prefill_batch(self, tb: int) -> tuple[torch.Tensor, AttentionBatch]:
        ids = self._p_ids[:tb]
        batch = AttentionBatch(
            slot_mapping=self._p_slots[:tb], block_tables=self._p_table, seq_lens=self._p_lens,
            cu_seqlens_q=self._p_cu, positions=self._p_pos[:tb], max_q_len=tb, max_seq_len=self.max_model_len,
            is_prefill=True,
        )
        return ids, batch

    def _prefill_buffers(self) -> None:
        """The prefill graphs' static inputs: one pinned host buffer and its device copy."""
        tm = self.prefill_buckets[-1]
        # the sequence's block table, with room for the padded rows past its last real token
        self._p_width = self.max_blocks + -(-tm // self.block_size)
        # one int32 buffer: [ids | positions | slots (tm each) | len | cu (2) | table | sample row]
        self._p_host = torch.zeros(3 * tm + 3 + self._p_width + 1, dtype=torch.int32,
                                   pin_memory=self.device.type == "cuda")
        self._p_np = self._p_host.numpy()
        self._p_copied = torch.cuda.Event() if self.device.type == "cuda" else None
        d = self._p_dev = torch.zeros_like(self._p_host, device=self.device)
        self._p_ids, self._p_pos, self._p_slots = d[:tm], d[tm:2 * tm], d[2 * tm:3 * tm]
        self._p_lens, self._p_cu = d[3 * tm:3 * tm + 1], d[3 * tm + 1:3 * tm + 3]
        self._p_table = d[3 * tm + 3:3 * tm + 3 + self._p_width].view(1, self._p_width)
        self._p_row = d[-1:]

    def _capture_prefill(self, pool, stream: torch.cuda.Stream) -> None:
        if not self.prefill_buckets:
            return
        self._prefill_buffers()
        for tb in reversed(self.prefill_buckets):
            self._fill_prefill(tb, [0], 0, [-1], [0], tb)  # warm-up: writes nothing, attends block 0
            self._p_dev.copy_(self._p_host)
            ids, batch = self._prefill_batch(tb)
            self.prefill_graphs[tb] = self._capture_one(
                lambda i=ids, b=batch: self.model.forward(i, self.cache, b, self._p_row.long()), pool, stream)  # [1, V]

    def _fill_prefill(self, tb: int, ids: list[int], start: int, slots: list[int], table: list[int],
                      seq_len: int) -> None:
        """The static inputs of a `tb`-row prefill: real rows first, then padding."""
        tm = self.prefill_buckets[-1]
        h = self._p_np
        T = len(ids)
        h[:] = 0
        h[:T] = ids
        h[tm:tm + T] = np.arange(start, start + T)  # positions; padded rows sit at 0
        h[2 * tm:3 * tm] = -1  # padded rows write nothing
        h[2 * tm:2 * tm + T] = slots
        h[3 * tm] = seq_len  # prefix + tb rows (the padded ones only attend)
        h[3 * tm + 2] = tb  # cu_seqlens_q = [0, tb]
        h[3 * tm + 3:3 * tm + 3 + len(table)] = table
        h[-1] = T - 1  # the row whose logits are returned

    def _prefill_graph_fits(self, step: Step, ids: torch.Tensor | None) -> bool:
        if not self.prefill_graphs or ids is not None or step.is_decode or len(step.spans) != 1:
            return False
        sp = step.spans[0]
        return sp.sample and 1 < sp.end - sp.start <= self.prefill_buckets[-1]

    def _stage_prefill(self, step: Step, manager: BlockManager) -> int:
        """Copy the single prefill span of `step`, padded, into the static inputs; returns its bucket."""
        sp = step.spans[0]
        T = sp.end - sp.start
        tb = next(b for b in self.prefill_buckets if b >= T)
        sid = sp.seq.seq_id
        if self._p_copied is not None:
            self._p_copied.synchronize()  # the previous replay's inputs have left the host buffer
        self._fill_prefill(tb, sp.seq.token_ids[sp.start:sp.end], sp.start, manager.slots(sid, sp.start, sp.end),
                           manager.block_table(sid), sp.start + tb)
        self._p_dev.copy_(self._p_host, non_blocking=True)
        if self._p_copied is not None:
            self._p_copied.record()
        return tb

    def _replay_prefill(self, step: Step, manager: BlockManager) -> torch.Tensor:
        graph, out = self.prefill_graphs[self._stage_prefill(step, manager)]
        graph.replay()
        return out

    @staticmethod
    def _capture_one(forward, pool, stream: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm `forward` up on `stream` (compiles and autotunes kernels), then capture it there: per-stream
        state made at first use (the GEMV's split-K workspace) is made and zeroed by the warm-up, not
        allocated inside the capture. Returns the graph and its static output."""
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = forward()
        return graph, out

    def _reset_static(self, G: int) -> None:
        h = self._host_np
        h[:] = 0
        h[2 * G:3 * G] = -1  # slots: padded rows write nothing
        h[3 * G:4 * G] = 1  # lens: padded rows attend over one token
        h[4 * G:5 * G + 1] = np.arange(G + 1, dtype=np.int32)

    def _replay(self, step: Step, manager: BlockManager, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the static buffers through a numpy view of the pinned host buffer (a few
        microseconds per step: this host work sits between two graph replays), copy, replay."""
        B = len(step.spans)
        bs = next(b for b in self.buckets if b >= B)
        G, W, P = self.buckets[-1], self.max_blocks, self.block_size
        self._copied.synchronize()  # a step without sampling rows returns before the copy finishes
        self._reset_static(G)
        h = self._host_np
        base = 5 * G + 1
        for r, sp in enumerate(step.spans):
            p = sp.start
            table = manager.block_table(sp.seq.seq_id)
            if ids is None:
                h[r] = sp.seq.token_ids[p]  # input id
            h[G + r] = p  # position
            h[2 * G + r] = table[p // P] * P + p % P  # slot of the new token
            h[3 * G + r] = p + 1  # cache length after the write
            h[base + r * W: base + r * W + len(table)] = table
        self._dev.copy_(self._host, non_blocking=True)
        self._copied.record()
        if ids is not None:
            self._ids[:B].copy_(ids)  # queued after the copy above, so it wins
        graph, out = self.graphs[bs]
        graph.replay()
        rows = [r for r, sp in enumerate(step.spans) if sp.sample]
        return out[:B] if len(rows) == B else out[torch.tensor(rows, device=self.device)]
