"""The model runner: owns the device, the KV cache tensors and the CUDA graphs; runs one `Step`.

A step's spans become one packed batch: `input_ids [T]`, positions, the slot of every new token,
block tables and lengths (`AttentionBatch`). Steps with a span longer than one token run eagerly
through the varlen prefill attention (decode tokens ride along as one-token spans). Steps where
every span is one token (pure decode) run as a CUDA graph captured for the smallest batch-size
bucket that holds them: the inputs are copied into the graph's static buffers in one host-to-device
copy, padded rows write to slot -1 (skipped) and attend over one token of block 0, and decode
attention is planned for `max_model_len` so the graph's launch grid never changes.
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


class ModelRunner:
    def __init__(self, model: EngineModel, spec: KVCacheSpec, num_blocks: int, max_num_seqs: int,
                 max_model_len: int, cuda_graphs: bool = True):
        self.model = model
        self.device = model.device
        self.cache = KVCache(spec, num_blocks, self.device)
        self.block_size = spec.block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // spec.block_size)  # block-table width
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]  # ascending
        if cuda_graphs and self.device.type == "cuda" and model.backend == "triton":
            self._capture()

    # -- eager steps ------------------------------------------------------------------------------
    def run(self, step: Step, manager: BlockManager, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[S, V]` fp32 of the step's sampling spans, in span order. `ids` [B] on the device
        replace the input tokens of a decode step (a lookahead step: the host does not have them)."""
        if step.is_decode and self.graphs and len(step.spans) <= self.buckets[-1]:
            return self._replay(step, manager, ids)
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
        for bs in reversed(self.buckets):  # largest first: the smaller graphs reuse its pool
            ids, batch = self._static_batch(bs)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model.forward(ids, self.cache, batch)  # warm-up: compiles and autotunes kernels
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # captured on the warm-up's stream: per-stream state made at first use (the GEMV's split-K
            # workspace) is made and zeroed by the warm-up, not allocated inside the capture
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.model.forward(ids, self.cache, batch)  # [bs, V]
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        log(f"captured decode CUDA graphs for batch sizes {self.buckets} in {time.perf_counter() - t0:.1f}s")

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
