"""The model runner: owns the device, the KV cache tensors and the CUDA graphs; runs one `Step`.

A step's spans become one packed batch: `input_ids [T]`, positions, the slot of every new token,
block tables and lengths (`AttentionBatch`). Steps with a span longer than one token run eagerly
through the varlen prefill attention (decode tokens ride along as one-token spans). Steps where
every span is one token (pure decode) run as a CUDA graph captured for the smallest batch-size
bucket that holds them: the inputs are copied into the graph's static buffers in one host-to-device
copy, padded rows write to slot -1 (skipped) and attend over one token of block 0, and decode
attention is planned for `max_model_len` so the graph's launch grid never changes.

With `prefill_graphs` (on by default where decode graphs are captured; `LLM(prefill_graphs=False)`
or LMQ_PREFILL_GRAPHS=0 turns them off; LMQ_PREFILL_GRAPHS=single keeps the one-sequence graphs only),
a step with a span of more than one token and `T <= 2048` tokens in all also replays a graph, captured
per token-count bucket: the buckets stop at the step's token budget and the context, whichever is smaller
(itself a bucket where it falls between two). Two graphs
per bucket: one for a single sequence (a chat turn, a request arriving at an idle engine), one for up to
`max_num_seqs` sequences (several prompts at once, or prompt chunks with decode rows riding along: the
steps of continuous batching while requests arrive). The step's rows are padded to the bucket with rows
that write nothing (slot -1), sit at position 0 for RoPE and belong to the last sequence after its real
rows, so no real row attends them; sequences past the step's have no rows; only the sampling rows' logits
are computed. The single-sequence graph keeps its own attention tiling (query tiles shrink for a short
chunk over a long prefix), which a launch sized for many sequences would not. An eager prefill is
host-bound on a slow host (about 430 kernel launches for Llama-3-8B: 22-37 ms of host time around 8-15
ms of kernels for 512 tokens, and 37 ms around 24 ms for 1,024, on the lent H100's host;
benchmarks/profile_prefill.py). The graphs share one memory pool, so their activations cost what the
largest bucket's do.
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
from lmq.kernels.attention_prefill import graph_block_m, max_tiles, tile_map

GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PREFILL_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048)  # new-token counts of the prefill graphs


class ModelRunner:
    def __init__(self, model: EngineModel, spec: KVCacheSpec, num_blocks: int, max_num_seqs: int,
                 max_model_len: int, cuda_graphs: bool = True, prefill_graphs: bool | str = False,
                 max_prefill_tokens: int | None = None):
        self.model = model
        self.device = model.device
        self.cache = KVCache(spec, num_blocks, self.device)
        self.block_size = spec.block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // spec.block_size)  # block-table width
        self.max_num_seqs = max_num_seqs
        # sequences of the prefill graphs of each bucket: one, and max_num_seqs where that is more ("single": one-
        # sequence graphs only, an A/B)
        many = max_num_seqs > 1 and prefill_graphs != "single"
        self.prefill_seqs = [1, max_num_seqs] if many else [1]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # (token bucket, sequences: 1 or max_num_seqs) -> (graph, logits of the sampling rows [sequences, V])
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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

    # -- CUDA graphs for prefill and mixed steps -------------------------------------------------------
    def _prefill_batch(self, tb: int, ns: int) -> tuple[torch.Tensor, AttentionBatch, torch.Tensor]:
        """(ids, batch, sampling rows) of the static inputs, viewed for `tb` rows and `ns` sequences. Several
        sequences attend through a tile map (`prefill_attention`): one program per real query tile and head,
        not ns x the tiles of tb rows (most of which would find no rows)."""
        tiles = None
        if ns > 1:
            tiles = self._p_tiles[:2 * max_tiles(tb, ns, self._p_block_m)].view(-1, 2)
        batch = AttentionBatch(
            slot_mapping=self._p_slots[:tb], block_tables=self._p_table[:ns], seq_lens=self._p_lens[:ns],
            cu_seqlens_q=self._p_cu[:ns + 1], positions=self._p_pos[:tb], max_q_len=tb,
            max_seq_len=self.max_model_len, is_prefill=True, tiles=tiles, block_m=self._p_block_m,
        )
        return self._p_ids[:tb], batch, self._p_rows[:ns]

    def _prefill_buffers(self) -> None:
        """The prefill graphs' static inputs: one pinned host buffer and its device copy."""
        tm, S = self.prefill_buckets[-1], self.max_num_seqs
        # a block-table row, with room for the padded rows past the last sequence's last real token
        self._p_width = self.max_blocks + -(-tm // self.block_size)
        self._p_block_m = graph_block_m(self.device, self.model.cfg.head_dim)
        n_tiles = max_tiles(tm, S, self._p_block_m)
        # one int32 buffer: [ids | positions | slots (tm each) | lens (S) | cu (S + 1) | tables (S x width) |
        # sampling rows (S) | tile map (2 x n_tiles)]
        self._p_host = torch.zeros(3 * tm + 3 * S + 1 + S * self._p_width + 2 * n_tiles, dtype=torch.int32,
                                   pin_memory=self.device.type == "cuda")
        self._p_np = self._p_host.numpy()
        self._p_copied = torch.cuda.Event() if self.device.type == "cuda" else None
        d = self._p_dev = torch.zeros_like(self._p_host, device=self.device)
        self._p_ids, self._p_pos, self._p_slots = d[:tm], d[tm:2 * tm], d[2 * tm:3 * tm]
        o = 3 * tm
        self._p_lens, self._p_cu = d[o:o + S], d[o + S:o + 2 * S + 1]
        o += 2 * S + 1
        self._p_table = d[o:o + S * self._p_width].view(S, self._p_width)
        o += S * self._p_width
        self._p_rows, self._p_tiles = d[o:o + S], d[o + S:]  # [S], [2 x n_tiles]

    def _capture_prefill(self, pool, stream: torch.cuda.Stream) -> None:
        if not self.prefill_buckets:
            return
        self._prefill_buffers()
        for tb in reversed(self.prefill_buckets):
            for ns in self.prefill_seqs:
                # warm-up: one sequence of tb padded rows that write nothing and attend block 0, the others empty
                self._fill_prefill(tb, ns, [([], 0, [], [0], False)])
                self._p_dev.copy_(self._p_host)
                ids, batch, rows = self._prefill_batch(tb, ns)
                self.prefill_graphs[tb, ns] = self._capture_one(
                    lambda i=ids, b=batch, r=rows: self.model.forward(i, self.cache, b, r.long()), pool, stream)

    def _fill_prefill(self, tb: int, ns: int, spans: list[tuple[list[int], int, list[int], list[int], bool]]) -> int:
        """The static inputs of a `tb`-row step of `ns` sequences from its spans (token ids, first position, slots,
        block table, samples): real rows first, in span order, then the padding, which the last span's sequence
        takes after its real rows (its length grows by as many). Returns the number of sampling rows."""
        tm, S, W = self.prefill_buckets[-1], self.max_num_seqs, self._p_width
        h = self._p_np
        h[:] = 0
        h[2 * tm:3 * tm] = -1  # slots: padded rows write nothing (positions stay 0)
        o = 3 * tm
        lens, cu, tables = h[o:o + S], h[o + S:o + 2 * S + 1], h[o + 2 * S + 1:o + 2 * S + 1 + S * W]
        rows, tiles = h[o + 2 * S + 1 + S * W:o + 3 * S + 1 + S * W], h[o + 3 * S + 1 + S * W:]
        lens[:] = 1  # sequences past the step's: no rows (their cu stays at tb), one token each
        t, n_rows, pad = 0, 0, tb - sum(len(s[0]) for s in spans)
        for i, (ids, start, slots, table, samples) in enumerate(spans):
            n = len(ids)
            h[t:t + n] = ids
            h[tm + t:tm + t + n] = np.arange(start, start + n)
            h[2 * tm + t:2 * tm + t + n] = slots
            t += n
            last = i == len(spans) - 1
            lens[i] = start + n + (pad if last else 0)
            cu[i + 1] = tb if last else t
            tables[i * W:i * W + len(table)] = table
            if samples:
                rows[n_rows] = t - 1
                n_rows += 1
        cu[len(spans) + 1:ns + 1] = tb
        if ns > 1:
            q_lens = [len(s[0]) for s in spans]
            q_lens[-1] += pad
            n = max_tiles(tb, ns, self._p_block_m)
            tiles[:2 * n] = tile_map(q_lens, self._p_block_m, n)
        return n_rows

    def _prefill_graph_fits(self, step: Step, ids: torch.Tensor | None) -> bool:
        if not self.prefill_graphs or ids is not None or step.is_decode or \
                len(step.spans) > self.prefill_seqs[-1]:
            return False
        return 1 < step.num_tokens <= self.prefill_buckets[-1]

    def _stage_prefill(self, step: Step, manager: BlockManager) -> tuple[tuple[int, int], int]:
        """Copy the step's spans, padded, into the static inputs; returns its graph's key and its sampling rows."""
        tb = next(b for b in self.prefill_buckets if b >= step.num_tokens)
        ns = 1 if len(step.spans) == 1 else self.max_num_seqs
        if self._p_copied is not None:
            self._p_copied.synchronize()  # the previous replay's inputs have left the host buffer
        n_rows = self._fill_prefill(tb, ns, [
            (sp.seq.token_ids[sp.start:sp.end], sp.start, manager.slots(sp.seq.seq_id, sp.start, sp.end),
             manager.block_table(sp.seq.seq_id), sp.sample) for sp in step.spans])
        self._p_dev.copy_(self._p_host, non_blocking=True)
        if self._p_copied is not None:
            self._p_copied.record()
        return (tb, ns), n_rows

    def _replay_prefill(self, step: Step, manager: BlockManager) -> torch.Tensor:
        key, n_rows = self._stage_prefill(step, manager)
        graph, out = self.prefill_graphs[key]
        graph.replay()
        return out[:n_rows]

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
