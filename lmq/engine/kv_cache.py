"""Paged KV cache: block bookkeeping (plain Python, no tensors) and the per-layer pools (tensors).

vLLM's PagedAttention idea (https://arxiv.org/abs/2309.06180), split the way nano-vllm splits it:

- `BlockAllocator`: fixed pool of `num_blocks` block ids, a free list and a reference count per
  block (a block shared by sequences with a common prefix has refcount > 1).
- `BlockManager`: per-sequence block tables over one allocator. Full blocks are keyed by a hash of
  their tokens chained with the previous block's, so a new sequence whose prompt starts with a
  cached prefix reuses those blocks (prefill then runs only on the rest: chunked prefill over a
  prefix in the cache). A finished sequence's last, partly filled block is kept too, keyed by its
  parent's hash: a later prompt that continues the same tokens (the next turn of a chat, which
  re-sends the conversation) takes it over and reuses its leading tokens, so only what differs is
  prefilled. `fork` shares a whole table; writing into a shared block first copies it
  (copy-on-write), returned as (src, dst) pairs for the tensor owner to execute.
- `KVCache`: owns the tensors, one `PagedKV` pool per layer (layout in kernels/kv_quant.py), sized
  from a memory budget; writes new K/V through the fused quantize+scatter kernel.

Slots: token position p of a sequence lives at slot `table[p // block_size] * block_size +
p % block_size`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import torch

from lmq.errors import InputError, LmqError
from lmq.kernels.attention_decode import decode_attention, decode_attention_ref
from lmq.kernels.attention_prefill import prefill_attention, prefill_attention_ref
from lmq.kernels.kv_quant import KV_DTYPES, PagedKV, write_kv, write_kv_ref

# Prefill steps attend each sequence's new chunk from its k / v rows, rewritten by the write path as the cache holds
# them (`write_kv(..., write_back=True)`), and only its cached prefix through the cache: the same keys (up to one
# rounding of the dequantized values to the model's dtype), but an int8 / int4 cache's chunk runs the float tile loop
# (offline SASS, sm_90, 64 x 64 tile a warp: 398 instructions against 937 int8 and 883 int4). False: every key read
# through the cache (for A/B timing).
FRESH_PREFILL = True
# ... for steps without a cached prefix, or of at least this many rows: over a prefix it takes two launches (the
# prefix, then the chunk merged with it), which lose to one launch through the cache on a short chunk. H100, same run
# (docs/benchmarks.md, ATTENTION, session 18), us, one launch / two: 64 rows over 4,032 cached tokens int8 92.8 / 98.2,
# fp16 69.9 / 74.9; 512 over 3,584 int8 293.2 / 297.3; 2,048 over 2,048 int8 563.1 / 452.0, int4 513.2 / 423.4.
# A CUDA-graph step is planned at capture for any step of its bucket (has_prefix True, max_q_len the bucket): it
# decides by the bucket, a many-sequence graph by its total rows.
FRESH_MIN_ROWS = 512
DEFAULT_BLOCK_SIZE = 128  # tokens per block: a decode tile (128 tokens on GPU) reads one block


class OutOfBlocks(LmqError):
    """The KV cache has no free block left; the scheduler should have checked `can_allocate`."""


class BlockAllocator:
    """Block ids 0..num_blocks-1 with reference counts and a FIFO free list."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise InputError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"all {self.num_blocks} KV cache blocks are in use; raise --cache-max-memory "
                              f"or lower the batch size")
        block = self._free.popleft()
        self.refcount[block] = 1
        return block

    def revive(self, block: int) -> None:
        """Take a free block that still holds wanted contents (a cached prefix) off the free list."""
        if self.refcount[block] != 0:
            raise ValueError(f"block {block} is in use; share it with incref")
        self._free.remove(block)
        self.refcount[block] = 1

    def incref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is free; only a block in use can be shared")
        self.refcount[block] += 1

    def decref(self, block: int) -> bool:
        """Drop one reference; returns True when the block went back to the free list."""
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is already free")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)
            return True
        return False


@dataclass
class SeqBlocks:
    """One sequence's block table and how many of its tokens have slots."""

    table: list[int]
    num_tokens: int = 0
    last_hash: int | None = None  # chained hash of its last full block
    num_hashed: int = 0  # leading full blocks whose chained hash is known (last_hash: the last of them)


class BlockManager:
    """Per-sequence block tables, prefix sharing by chained block hashes, copy-on-write."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True):
        if block_size < 1 or block_size & (block_size - 1):
            raise InputError(f"block_size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_caching = prefix_caching
        self.seqs: dict[int, SeqBlocks] = {}
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        self._block_tokens: dict[int, tuple[int, ...]] = {}
        # partly filled blocks of freed sequences: parent's chained hash (None: first block) -> block,
        # and block -> (parent hash, its written tokens)
        self._partial: dict[int | None, int] = {}
        self._block_partial: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        # blocks `allocate` keyed by tokens that no freed holder has reported written yet: when
        # the last holder lets go of one still unwritten, its key is dropped (see `_release`)
        self._unwritten: set[int] = set()

    # -- queries
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of `num_tokens` fits even with no prefix reuse."""
        return self.blocks_needed(num_tokens) <= self.allocator.num_free

    def can_append(self, seq_id: int) -> bool:
        """Whether `append_slot` can run without a free block being short (a new block, or a
        copy-on-write of a shared last block, each need one)."""
        seq = self.seqs[seq_id]
        pos = seq.num_tokens
        if pos == len(seq.table) * self.block_size or self.allocator.refcount[seq.table[pos // self.block_size]] > 1:
            return self.allocator.num_free >= 1
        return True

    def has_room(self, seq_id: int) -> bool:
        """Whether `append_slot` would need no new block and no copy (the token lands in the
        sequence's own, unshared last block)."""
        seq = self.seqs[seq_id]
        pos = seq.num_tokens
        return pos < len(seq.table) * self.block_size and self.allocator.refcount[seq.table[pos // self.block_size]] == 1

    def block_table(self, seq_id: int) -> list[int]:
        return self.seqs[seq_id].table

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Slots of token positions start..end-1 of a sequence (they must have blocks)."""
        seq = self.seqs[seq_id]
        if end > len(seq.table) * self.block_size:
            raise ValueError(f"positions up to {end} exceed the {len(seq.table)} blocks of sequence {seq_id}")
        bs = self.block_size
        return [seq.table[p // bs] * bs + p % bs for p in range(start, end)]

    # -- lifecycle
    def allocate(self, seq_id: int, token_ids: list[int]) -> int:
        """Give a new sequence blocks for its whole prompt; returns how many leading tokens are
        already in the cache (whole shared blocks, then the leading tokens of a freed sequence's
        partly filled block that this prompt continues), which prefill can skip. At least one token is
        always left to compute, so the step produces logits. Full blocks are keyed by their tokens
        now, before prefill writes them: a scheduler running a prompt in chunks must not start a
        sequence that reuses a block before the chunk that writes it has run."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already has blocks")
        n = len(token_ids)
        if n == 0:
            raise ValueError("a sequence needs at least one token")
        bs = self.block_size
        table: list[int] = []
        cached = 0
        h = None
        reusing = self.prefix_caching
        try:
            for i in range(self.blocks_needed(n)):
                chunk = token_ids[i * bs:(i + 1) * bs]
                full = len(chunk) == bs
                parent = h
                if full:
                    h = hash((h, tuple(chunk)))
                # the block holding the last prompt token is recomputed: its logits are needed
                last = (i + 1) * bs >= n
                block = self._lookup(h, chunk) if (reusing and full and not last) else None
                if block is not None:
                    if self.allocator.refcount[block] == 0:
                        self.allocator.revive(block)  # freed, but its contents are still there
                    else:
                        self.allocator.incref(block)
                    cached += bs
                else:
                    partial = self._take_partial(parent, chunk[:n - i * bs - 1]) if reusing else None
                    reusing = False
                    if partial is not None:  # a freed sequence's last block continues this prompt
                        block, reused = partial
                        cached += reused
                    else:
                        block = self._fresh_block()
                    if full and self.prefix_caching:
                        self._register(block, h, chunk)
                        self._unwritten.add(block)
                table.append(block)
        except OutOfBlocks:
            for b in table:
                self._release(b)
            raise
        # h: the chained hash of the last full block, the parent of the next block to be sealed
        self.seqs[seq_id] = SeqBlocks(table, n, h, n // bs)
        return cached

    def append_slot(self, seq_id: int) -> tuple[int, list[tuple[int, int]]]:
        """Room for one more token: returns its slot and the (src, dst) block copies to run first
        (copy-on-write when the block it lands in is shared)."""
        seq = self.seqs[seq_id]
        bs = self.block_size
        pos = seq.num_tokens
        copies: list[tuple[int, int]] = []
        if pos == len(seq.table) * bs:
            seq.table.append(self._fresh_block())
        else:
            block = seq.table[pos // bs]
            if self.allocator.refcount[block] > 1:
                new = self._fresh_block()
                self.allocator.decref(block)
                seq.table[pos // bs] = new
                copies.append((block, new))
        seq.num_tokens = pos + 1
        return seq.table[pos // bs] * bs + pos % bs, copies

    def seal_block(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """After decode wrote the K/V of the first `num_computed` tokens, key the block that this
        filled (if any) by its tokens, so later prompts can reuse it. (`num_computed`, not the slots
        reserved: an overlapped step may already hold the slot of the next token.)"""
        seq = self.seqs[seq_id]
        bs = self.block_size
        if not self.prefix_caching or num_computed % bs or num_computed == 0:
            return
        i = num_computed // bs - 1
        if i != seq.num_hashed:  # keyed already (a re-admitted sequence's prompt, by `allocate`)
            return
        chunk = token_ids[i * bs:(i + 1) * bs]
        h = hash((seq.last_hash if i else None, tuple(chunk)))
        seq.last_hash = h
        seq.num_hashed = i + 1
        if h not in self._hash_to_block:
            self._register(seq.table[i], h, chunk)

    def fork(self, parent: int, child: int) -> None:
        """The child shares every block of the parent (parallel sampling); writes copy first."""
        if child in self.seqs:
            raise ValueError(f"sequence {child} already has blocks")
        p = self.seqs[parent]
        for b in p.table:
            self.allocator.incref(b)
        self.seqs[child] = SeqBlocks(list(p.table), p.num_tokens, p.last_hash, p.num_hashed)

    def free(self, seq_id: int, num_computed: int | None = None, token_ids: list[int] | None = None) -> None:
        """Release a sequence's blocks. `num_computed`: how many of its tokens were actually
        written. Blocks `allocate` keyed by tokens that nobody has written (a preempted or aborted
        chunked prefill) are forgotten when their last holder lets go, instead of being offered to
        later prompts; blocks it found in the cache keep their tokens and stay offered, even past
        `num_computed` (a prefill recomputing from a shared block another prefill had yet to
        write). With `token_ids` (its tokens), the partly written block at `num_computed` is kept
        for a later prompt that continues those tokens (`allocate` takes it over)."""
        seq = self.seqs.pop(seq_id)
        bs = self.block_size
        written = len(seq.table) * bs if num_computed is None else num_computed
        first_unwritten = written // bs
        # last block first: the free list hands out its oldest entries first, so a freed sequence loses its tail
        # before its head (a prefix without its first blocks can never be reused, the chain breaks there)
        for i in reversed(range(len(seq.table))):
            b = seq.table[i]
            if i < first_unwritten:
                self._unwritten.discard(b)  # its tokens are in the cache now
            last_holder = self.allocator.refcount[b] == 1
            self._release(b)
            if (last_holder and i == first_unwritten and written % bs and token_ids is not None
                    and self.prefix_caching and b not in self._block_hash):
                # the parent's chained hash: known when this is the block after the last one keyed (a
                # finished request's last block), else hashed again from the tokens (an aborted prefill)
                parent = seq.last_hash if i == seq.num_hashed else _chain_hash(token_ids, i, bs)
                self._keep_partial(b, parent, token_ids[i * bs:written])

    def forget_cached(self) -> int:
        """Drop the cached prefixes that free blocks still hold (blocks in use keep theirs), so that later prompts
        find none of them; returns how many blocks were forgotten. A benchmark calls it after its warm-up, whose
        prompts' K/V would otherwise serve the measured run."""
        # (a block keyed by unwritten tokens is forgotten when its last holder lets go: none of them is free)
        free = [b for b in {*self._block_hash, *self._block_partial} if self.allocator.refcount[b] == 0]
        for b in free:
            self._forget(b)
        return len(free)

    # -- internals
    def _fresh_block(self) -> int:
        """A block from the free list; whatever prefix it held is forgotten (it gets overwritten)."""
        block = self.allocator.allocate()
        self._forget(block)
        return block

    def _forget(self, block: int) -> None:
        self._unwritten.discard(block)
        old = self._block_hash.pop(block, None)
        self._block_tokens.pop(block, None)
        if old is not None and self._hash_to_block.get(old) == block:
            del self._hash_to_block[old]
        partial = self._block_partial.pop(block, None)
        if partial is not None and self._partial.get(partial[0]) == block:
            del self._partial[partial[0]]

    def _keep_partial(self, block: int, parent: int | None, tokens: list[int]) -> None:
        """Offer a freed sequence's partly written block to prompts that continue its parent."""
        old = self._partial.get(parent)
        if old is not None and old != block:
            self._block_partial.pop(old, None)
        self._partial[parent] = block
        self._block_partial[block] = (parent, tuple(tokens))

    def _take_partial(self, parent: int | None, want: list[int]) -> tuple[int, int] | None:
        """The free partial block under `parent` and how many of its leading tokens equal `want`'s
        (at least one), taken off the free list for the caller to write on; None if there is none."""
        block = self._partial.get(parent)
        if block is None or self.allocator.refcount[block] != 0:
            return None
        tokens = self._block_partial[block][1]
        same = 0
        for a, b in zip(tokens, want):
            if a != b:
                break
            same += 1
        if same == 0:
            return None
        self.allocator.revive(block)
        self._forget(block)  # its tokens past `same` get overwritten: it is this sequence's block now
        return block, same

    def _lookup(self, h: int, chunk: list[int]) -> int | None:
        block = self._hash_to_block.get(h)
        if block is None or self._block_tokens.get(block) != tuple(chunk):  # hash collision guard
            return None
        return block

    def _register(self, block: int, h: int, chunk: list[int]) -> None:
        self._block_hash[block] = h
        self._hash_to_block[h] = block
        self._block_tokens[block] = tuple(chunk)

    def _release(self, block: int) -> None:
        # a freed block keeps its hash and contents: prefix lookups revive it until it is reused;
        # one keyed by tokens that were never written is forgotten when its last holder lets go
        if self.allocator.refcount[block] == 1 and block in self._unwritten:
            self._forget(block)
        self.allocator.decref(block)


def _chain_hash(token_ids: list[int], num_blocks: int, block_size: int) -> int | None:
    """The chained hash `BlockManager` keys the first `num_blocks` full blocks of `token_ids` by
    (None for none: the parent of a sequence's first block)."""
    h = None
    for i in range(num_blocks):
        h = hash((h, tuple(token_ids[i * block_size:(i + 1) * block_size])))
    return h


# ---------------------------------------------------------------------------------------------
# Attention metadata for one step (passed to every layer; no global context)
# ---------------------------------------------------------------------------------------------


@dataclass
class AttentionBatch:
    """What the attention kernels need for one step, built once and shared by all layers.

    Prefill: sequence b contributes rows cu_seqlens_q[b]..cu_seqlens_q[b+1] of the packed
    q [T, H, D]; decode: one row per sequence (cu_seqlens_q = 0, 1, .., B).
    """

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32: cache tokens after this step's writes
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    positions: torch.Tensor  # [T] int64: each new token's position (RoPE)
    max_q_len: int
    max_seq_len: int
    is_prefill: bool
    # prefill: the (sequence, query tile of block_m rows) of each attention program (`prefill_attention`'s tile
    # map), for a launch planned once for many sequences (a CUDA graph's); None: one grid row per sequence
    tiles: torch.Tensor | None = None
    block_m: int | None = None
    # prefill: whether any sequence may have a cached prefix (False when the host knows none has: prefill attention
    # then leaves out its launch over the prefixes); True for a launch planned once for any step (a CUDA graph's)
    has_prefix: bool = True


def build_batch(manager: BlockManager, spans: list[tuple[int, int, int]], is_prefill: bool,
                device: torch.device | str = "cuda") -> AttentionBatch:
    """Metadata for a step that computes tokens start..end-1 of each (seq_id, start, end); their
    slots exist already (`allocate` gave the whole prompt blocks, `append_slot` one more token).
    Chunked prefill runs a prompt as several spans; tokens before `start` must be in the cache."""
    slots: list[int] = []
    positions: list[int] = []
    lens: list[int] = []
    cu = [0]
    for sid, start, end in spans:
        if not 0 <= start < end <= manager.seqs[sid].num_tokens:
            raise ValueError(f"sequence {sid}: span {start}..{end} outside its {manager.seqs[sid].num_tokens} tokens")
        slots += manager.slots(sid, start, end)
        positions += list(range(start, end))
        lens.append(end)
        cu.append(cu[-1] + end - start)
    tables = [manager.block_table(sid) for sid, _, _ in spans]
    width = max(len(t) for t in tables)
    return AttentionBatch(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        max_q_len=max(e - s for _, s, e in spans), max_seq_len=max(lens), is_prefill=is_prefill,
        has_prefix=any(start > 0 for _, start, _ in spans),
    )


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str  # fp16 | bf16 | int8 | int4 (resolve "auto" with `resolve_kv_dtype`)
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def bytes_per_block(self) -> int:
        """One block of K and V in every layer."""
        return self.num_layers * PagedKV.bytes_per_block(self.block_size, self.num_kv_heads, self.head_dim,
                                                         self.kv_dtype)


def resolve_kv_dtype(kv_dtype: str, model_dtype: torch.dtype) -> str:
    """`auto` -> the model's own dtype (fp16 or bf16); anything else is checked and returned."""
    if kv_dtype == "auto":
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model_dtype, "fp16")
    if kv_dtype not in KV_DTYPES:
        raise InputError(f"--kv-dtype {kv_dtype!r}: expected auto, {', '.join(KV_DTYPES)}")
    return kv_dtype


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory(spec: str | int) -> int:
    """`8GiB`, `8G`, `500MB`, `1.5e9` or an int -> bytes."""
    if isinstance(spec, int):
        return spec
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", spec)
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"--cache-max-memory {spec!r}: expected a size like 8GiB, 500MB or 2e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def cache_budget_bytes(max_memory: str | int | None = None, free_fraction: float = 0.9,
                       device: torch.device | str = "cuda") -> int:
    """Bytes the cache may take: `max_memory` if given, else a fraction of the free GPU memory
    (measured after the weights are loaded)."""
    if max_memory is not None:
        return parse_memory(max_memory)
    if not 0 < free_fraction <= 1:
        raise InputError(f"the cache's share of free memory must be in (0, 1], got {free_fraction}")
    device = torch.device(device)
    if device.type != "cuda":
        raise InputError("on CPU give the cache size explicitly (--cache-max-memory)")
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * free_fraction)


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int) -> int:
    n = budget_bytes // spec.bytes_per_block
    if n < 1:
        raise InputError(f"a KV cache budget of {budget_bytes} bytes holds no block of {spec.bytes_per_block} "
                         f"bytes ({spec.num_layers} layers x {spec.block_size} tokens, {spec.kv_dtype}); "
                         f"raise --cache-max-memory")
    return int(n)


class KVCache:
    """One `PagedKV` pool per layer, all with the same block ids."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str = "cuda"):
        self.spec = spec
        self.num_blocks = num_blocks
        self.layers = [PagedKV.allocate(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                        spec.kv_dtype, device) for _ in range(spec.num_layers)]

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, device: torch.device | str = "cuda") -> KVCache:
        return cls(spec, num_blocks_for_budget(spec, budget_bytes), device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.layers
                   for t in (p.k, p.v, p.k_scales, p.v_scales) if t is not None)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
              write_back: bool = False) -> None:
        """New K/V [T, H_kv, D] (after RoPE) of one layer -> quantize and scatter to their slots (`write_back`: and
        leave k and v as the cache holds them, `write_kv`)."""
        write_kv(k, v, self.layers[layer], slot_mapping, write_back)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  batch: AttentionBatch, sm_scale: float | None = None, reference: bool = False) -> torch.Tensor:
        """One layer's attention for a step: write the new K/V [T, H_kv, D], then attend with
        q [T, H, D] over the cache (prefill: causal over prefix + new; decode: one row per
        sequence). Returns [T, H, D]. `reference`: the kernels' plain-PyTorch twins instead (the
        engine's "torch" backend)."""
        if not batch.is_prefill and batch.max_q_len != 1:
            raise ValueError(f"a decode step computes one token per sequence, got up to {batch.max_q_len}")
        cache = self.layers[layer]
        if reference:
            write_kv_ref(k, v, cache, batch.slot_mapping)
            if batch.is_prefill:
                return prefill_attention_ref(q, cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens,
                                             sm_scale=sm_scale)
            return decode_attention_ref(q, cache, batch.block_tables, batch.seq_lens, sm_scale=sm_scale)
        if batch.is_prefill:
            # the chunk's own keys and values are attended from k and v, rewritten as the cache holds them
            fresh = FRESH_PREFILL and k.dtype == q.dtype and (not batch.has_prefix or batch.max_q_len >= FRESH_MIN_ROWS)
            self.write(layer, k, v, batch.slot_mapping, write_back=fresh)
            return prefill_attention(q, cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens,
                                     max_q_len=batch.max_q_len, sm_scale=sm_scale, tiles=batch.tiles,
                                     block_m=batch.block_m, k_new=k if fresh else None, v_new=v if fresh else None,
                                     has_prefix=batch.has_prefix)
        self.write(layer, k, v, batch.slot_mapping)
        return decode_attention(q, cache, batch.block_tables, batch.seq_lens, sm_scale=sm_scale,
                                max_seq_len=batch.max_seq_len)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Run the copy-on-write copies `BlockManager.append_slot` asked for, in every layer."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.layers[0].k.device)
        dst = torch.tensor([d for _, d in pairs], device=self.layers[0].k.device)
        for p in self.layers:
            for t in (p.k, p.v, p.k_scales, p.v_scales):
                if t is not None:
                    t[dst] = t[src]
