"""The scheduler and the block bookkeeping it relies on, without a model: token budget, decode
before prefill, chunked prefill, admission, recompute preemption, prefix reuse of blocks that are
written (and not of blocks that are only reserved)."""


from lmq.engine.kv_cache import BlockManager, _chain_hash
from lmq.engine.sampling import SamplingParams
from lmq.engine.scheduler import Scheduler
from lmq.engine.sequence import Sequence, Status

BS = 16


def seq(i, n, first=0):
    return Sequence(i, list(range(first, first + n)), SamplingParams(max_new_tokens=8))


def run(sched, step, new_token=7):
    """What the engine does after the runner: advance every span, append a token to sampling spans."""
    for sp in step.spans:
        sched.advance(sp)
    for sp in step.spans:
        if sp.sample:
            sp.seq.token_ids.append(new_token)


def spans(step):
    return [(sp.seq.seq_id, sp.start, sp.end) for sp in step.spans]


def test_prompts_are_chunked_within_the_token_budget_and_decode_goes_first():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=40)
    a, b = seq(0, 30), seq(1, 50, first=1000)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert spans(step) == [(0, 0, 30), (1, 0, 10)] and not step.is_decode
    assert step.spans[0].sample and not step.spans[1].sample
    run(sched, step)
    step = sched.schedule()  # a decodes (1 token), b continues with the rest of the budget
    assert spans(step) == [(0, 30, 31), (1, 10, 49)]
    run(sched, step)
    step = sched.schedule()
    assert spans(step) == [(0, 31, 32), (1, 49, 50)] and step.is_decode
    run(sched, step)
    assert a.num_computed == 32 and b.num_computed == 50 and b.num_tokens == 51


def test_sequence_cap_and_free_blocks_gate_admission():
    sched = Scheduler(BlockManager(4, BS), max_num_seqs=2, max_num_batched_tokens=1000)
    for i in range(3):
        sched.add(seq(i, 20, first=100 * i))  # 2 blocks each: only two fit, and only two may run
    step = sched.schedule()
    assert [s[0] for s in spans(step)] == [0, 1] and len(sched.waiting) == 1
    run(sched, step)
    sched.finish(sched.running[0], "stop")
    step = sched.schedule()
    assert [s[0] for s in spans(step)] == [1, 2]  # the freed blocks admit the third


def test_a_full_pool_preempts_the_newest_and_it_is_recomputed():
    manager = BlockManager(4, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=1000)
    a, b = seq(0, 32), seq(1, 32, first=500)  # each fills two whole blocks: the pool is full
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    step = sched.schedule()  # a needs a third block: b (newest) is preempted, a decodes
    assert spans(step) == [(0, 32, 33)]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.metrics.num_preemptions == 1
    assert sched.waiting[0] is b
    run(sched, step)
    sched.finish(a, "stop")
    step = sched.schedule()  # b comes back: its prompt + token, partly from the prefix cache
    assert spans(step)[0][0] == 1 and step.spans[0].end == 33 and step.spans[0].sample


def test_a_sequence_preempted_mid_prefill_leaves_no_reusable_garbage():
    manager = BlockManager(8, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=16)
    a = seq(0, 64)
    sched.add(a)
    run(sched, sched.schedule())  # 16 of 64 prompt tokens written
    sched.preempt(a)
    b = seq(1, 64)  # the same prompt
    cached = manager.allocate(b.seq_id, b.token_ids)
    assert cached == 16  # only the written block is offered again


def test_blocks_reserved_by_a_running_prefill_are_not_reused_before_they_are_written():
    manager = BlockManager(16, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=20)
    a = seq(0, 40)
    sched.add(a)
    run(sched, sched.schedule())  # a: 20 of 40 written (block 0 whole, block 1 partly)
    b = seq(1, 40)  # the same prompt: allocate offers blocks 0 and 1 (32 tokens)
    sched.add(b)
    sched.max_num_batched_tokens = 40  # room for b in the next step
    step = sched.schedule()
    assert spans(step) == [(0, 20, 40), (1, 16, 36)]  # b recomputes block 1: a had not written it
    assert b.metrics.num_cached_tokens == 16


def test_decode_sealed_blocks_are_found_by_later_prompts():
    manager = BlockManager(16, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=1000)
    a = seq(0, 10)
    sched.add(a)
    run(sched, sched.schedule())
    while a.num_computed < 40:  # decode past two block boundaries, sealing each full block
        run(sched, sched.schedule(), new_token=a.num_tokens)
    sched.finish(a, "stop")
    b = Sequence(1, a.token_ids[:40] + [999], SamplingParams())
    assert manager.allocate(b.seq_id, b.token_ids) == 40  # two sealed blocks and the third's 8 written tokens


def test_can_append_sees_copy_on_write_and_block_boundaries():
    manager = BlockManager(3, BS)
    manager.allocate(0, list(range(8)))  # one block, half full
    manager.fork(0, 1)  # now shared by 0 and 1
    assert manager.can_append(1)
    _, copies = manager.append_slot(1)  # copy-on-write: 1 gets its own block
    assert len(copies) == 1 and manager.allocator.num_free == 1
    manager.allocate(2, list(range(16)))  # takes the last free block
    assert manager.allocator.num_free == 0
    assert manager.can_append(0)  # 0's block is no longer shared and has room
    for _ in range(8):
        manager.append_slot(0)
    assert not manager.can_append(0)  # the block is full and none is free


def test_a_readmitted_sequence_keeps_its_hash_chain():
    """A preempted sequence whose tokens fill whole blocks is re-admitted: `allocate` already keyed
    its last full block, so sealing it again after the prefill must not chain that block onto
    itself (which offered it to a later prompt at the wrong position)."""
    manager = BlockManager(8, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=1000)
    a = seq(0, 16)
    sched.add(a)
    run(sched, sched.schedule(), new_token=100)
    while a.num_tokens < 32:  # generate tokens 100..115: a's tokens are A + B, two whole blocks
        run(sched, sched.schedule(), new_token=100 + a.num_tokens - 16)
    sched.preempt(a)
    step = sched.schedule()  # re-admitted: block 0 from the cache, block 1 recomputed
    assert spans(step) == [(0, 16, 32)]
    run(sched, step)
    sched.finish(a, "stop")
    A, B = list(range(16)), list(range(100, 116))
    c = A + B + B + [999]  # block 2 has B's tokens, but at positions 32..47
    assert manager.allocate(1, c) == 32


def test_a_prefill_with_one_token_left_at_a_block_boundary_needs_no_new_block():
    """The last prompt token of a chunked prefill already has its slot: computing it must not
    preempt anyone (the sequence itself included) for a block it does not need."""
    manager = BlockManager(4, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=51)
    a, b = seq(0, 20), seq(1, 32, first=500)  # 2 blocks each: the pool is full
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert spans(step) == [(0, 0, 20), (1, 0, 31)]
    run(sched, step)
    step = sched.schedule()
    assert spans(step) == [(0, 20, 21), (1, 31, 32)]
    assert b.metrics.num_preemptions == 0


def test_the_engine_runs_no_more_sequences_than_its_token_budget():
    """Each running sequence needs one decode token per step, so the sequence cap follows the budget."""
    import torch

    from lmq.engine.llm import LLM
    from lmq.engine.model import EngineModel

    model = EngineModel.synthetic("smollm2-135m", torch.device("cpu"), group_size=64)
    llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=4, max_model_len=128, cache_max_memory="32MiB",
              block_size=16)
    assert llm.max_num_seqs == 4 and llm.scheduler.max_num_seqs == 4
    outs = llm.generate([[5, 6, 7]] * 6, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [3] * 6


def test_deterministic_needs_a_model_loaded_that_way():
    """LLM(deterministic=True) over an EngineModel loaded without it is refused, with the fix; loaded with it, the
    model's flag is kept (its tables are bound to its layers at load)."""
    import pytest
    import torch

    from lmq.engine.llm import LLM
    from lmq.engine.model import EngineModel
    from lmq.errors import InputError

    plain = EngineModel.synthetic("smollm2-135m", torch.device("cpu"), group_size=64)
    with pytest.raises(InputError, match="deterministic=True"):
        LLM(plain, max_model_len=64, cache_max_memory="16MiB", block_size=16, deterministic=True)
    det = EngineModel.synthetic("smollm2-135m", torch.device("cpu"), group_size=64, deterministic=True)
    assert det.deterministic and not plain.deterministic
    LLM(det, max_model_len=64, cache_max_memory="16MiB", block_size=16, deterministic=True)


def test_an_aborted_prefill_keeps_the_cached_blocks_it_revived():
    """A prompt that revives cached blocks past a block another prefill has yet to write is
    recomputed from that block; aborted before its step runs, the revived blocks (whose K/V it
    never touched) stay in the prefix cache."""
    manager = BlockManager(16, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=1000)
    a = seq(0, 49)
    sched.add(a)
    run(sched, sched.schedule())
    sched.finish(a, "stop")  # blocks 0..2 keyed and free
    c = seq(1, 32)  # a's first two blocks; its last block is recomputed into a new one
    sched.add(c)
    sched.max_num_batched_tokens = 8
    run(sched, sched.schedule())  # c: 16 cached, 8 more written, block 1 half done
    b = seq(2, 49)  # a's prompt again: block 0 shared, block 1 is c's, block 2 revived
    sched.add(b)
    sched.max_num_batched_tokens = 100
    step = sched.schedule()
    assert spans(step) == [(1, 24, 32), (2, 16, 49)]
    sched.finish(b, "abort")  # before the step ran
    assert manager.allocate(3, a.prompt_ids) == 48  # block 2 still offered


def test_a_block_whose_last_token_is_pending_is_recomputed_by_a_prompt_that_reuses_it():
    """A prefill with one prompt token left has keyed its last block already; a prompt that
    reuses that block in the same step recomputes it, so that if the step never runs (an error,
    Ctrl-C) and both requests are aborted, no half-written block stays in the prefix cache."""
    manager = BlockManager(16, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=31)
    a = seq(0, 32)
    sched.add(a)
    run(sched, sched.schedule())  # 31 of 32 written: block 1's last token is pending
    b = seq(1, 40)  # a's 32 tokens and 8 more
    sched.add(b)
    sched.max_num_batched_tokens = 100
    step = sched.schedule()
    assert spans(step) == [(0, 31, 32), (1, 16, 40)]
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert manager.allocate(2, list(range(40))) == 16  # block 1 was never completed


def test_skipped_and_cached_tokens_are_really_in_the_cache_through_aborts():
    """A seeded random walk of requests sharing prefixes: steps that run, steps that never run
    (their requests aborted), aborts and finishes in between. A shadow of what each slot holds
    checks that every token a sequence skips is in its slot, and that every block the prefix
    cache offers from the free list holds the tokens it is keyed by."""
    import random

    bs = 4
    for seed in range(600):
        rng = random.Random(seed)
        manager = BlockManager(rng.randint(4, 8), bs)
        sched = Scheduler(manager, max_num_seqs=rng.randint(1, 4), max_num_batched_tokens=rng.randint(2, 8))
        slot = {}  # (block, offset) -> (position, tokens up to it) whose K/V it holds
        bases = [[rng.randint(0, 2) for _ in range(30)] for _ in range(2)]
        live, next_id = [], 0
        for _ in range(150):
            r = rng.random()
            if r < 0.3 and len(live) < 6:
                toks = rng.choice(bases)[:rng.randint(1, 16)]
                live.append(Sequence(next_id, toks, SamplingParams(max_new_tokens=6)))
                sched.add(live[-1])
                next_id += 1
            elif r < 0.4 and live:
                s = live.pop(rng.randrange(len(live)))
                sched.finish(s, "abort")
            elif (step := sched.schedule()) is not None:
                pending = {}
                for src, dst in step.copies:
                    slot.update({(dst, o): slot.get((src, o)) for o in range(bs)})
                for sp in step.spans:
                    t = manager.block_table(sp.seq.seq_id)
                    for p in range(sp.start, sp.end):
                        pending[(t[p // bs], p % bs)] = (p, tuple(sp.seq.token_ids[:p + 1]))
                for s in sched.running:  # what it skips is in the cache, or is written in this step
                    t = manager.block_table(s.seq_id)
                    for p in range(s.num_computed):
                        want, at = (p, tuple(s.token_ids[:p + 1])), (t[p // bs], p % bs)
                        assert want in (slot.get(at), pending.get(at)), (seed, s.seq_id, p)
                if rng.random() < 0.25:  # the step never runs: its requests are aborted
                    for sp in step.spans:
                        if sp.seq in live:
                            live.remove(sp.seq)
                            sched.finish(sp.seq, "abort")
                else:
                    slot.update(pending)
                    run(sched, step, new_token=rng.randint(0, 2))
                    for s in [sp.seq for sp in step.spans if sp.sample and len(sp.seq.output_ids) >= 6]:
                        live.remove(s)
                        sched.finish(s, "length")
            for h, b in manager._hash_to_block.items():  # a free keyed block holds what it is keyed by
                if manager.allocator.refcount[b] == 0:
                    held = [slot.get((b, o)) for o in range(bs)]
                    assert None not in held, seed
                    prefix = held[-1][1]  # its slots: one prefix's last bs positions, the chain h keys
                    assert [x[1] for x in held] == [prefix[:len(prefix) - bs + o + 1] for o in range(bs)], seed
                    assert len(prefix) % bs == 0 and _chain_hash(prefix, len(prefix) // bs, bs) == h, seed
