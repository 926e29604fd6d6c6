"""Sweep decode-attention launch configs on a few shapes, and time prefill once per KV dtype.

Decode: per KV dtype and (batch, context), the % of the copy-bandwidth floor each
(block size, BLOCK_N, warps, stages, programs per SM) reaches, so the table in
kernels/attention_decode.py (_GPU_CONFIG, the split plan) is chosen from data.
Prefill: one 4096-token causal sequence, lmq against torch SDPA (flash) on a contiguous fp16 cache.
--compare: only time the default config against a few variants (`compare`).
--splits [--big | --b1 | --three]: tokens per split against programs per SM (`splits_and_occupancy`).
--balanced: each sequence over all splits or in the plan's pieces, at equal lengths (`balanced_ab`).
--profile: each kernel's GPU time at the launch-bound shapes (`profile_kernels`).
--triton-stages: the Triton split kernel's tile, warps and ring depth where it runs (`triton_stages`).
--mma: int4, the Gluon split kernel against the Triton one, and at other split counts (`mma_compare`).
--prefill-configs: prefill, the kernel's tile configs per KV dtype, against SDPA (`prefill_configs`).
--prefill-fresh: prefill with the chunk's own K/V read from the float k/v the write path rewrote, against every key
  read from the cache, per KV dtype, a whole prompt and chat turns over a cached prefix (`prefill_fresh`).
--mma-splits [--pads 0,65536] [--batches 1,8] [--contexts 4096] [--maxnreg 168] [--stages 2,3,4] [--page 64]: int4,
  the Gluon split kernel at 1..64 splits per batch and context, also under register caps, other ring depths or another
  block size (`mma_splits`).
Usage on the GPU machine: python3 benchmarks/attention_sweep.py [one of the modes above]
"""

from __future__ import annotations

import sys

import lmq.kernels.attention_decode as dec
import torch
from lmq.kernels.attention_prefill import prefill_attention
from lmq.kernels.kv_quant import kv_bytes_per_token_head

import lmq.bench_attention as ba

CONFIGS = [(16, 4, 3), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3)]
PAGES = (16, 64, 128)
SHAPES = [(1, 16384), (8, 4096), (64, 4096)]  # (batch, context)
H, HKV, D = 32, 8, 128


def sweep_decode(bw: float) -> None:
    torch.manual_seed(0)
    default_cfg, default_pps = dec._GPU_CONFIG[128], dec.PROGRAMS_PER_SM
    for kd in ("fp16", "int8", "int4"):
        for B, L in SHAPES:
            kv_bytes = 2 * B * L * HKV * kv_bytes_per_token_head(kd, D)
            floor = kv_bytes / bw * 1e6
            n = ba.copies_for(kv_bytes)
            q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
            out = torch.empty_like(q)
            lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            cells = []
            for page in PAGES:
                ba.BLOCK_SIZE = page
                nb = -(-L // page)
                cache = ba._random_paged(kd, n * B * nb, HKV, D)
                tables = torch.randperm(n * B * nb, device="cuda").to(torch.int32).view(n, B, nb)
                for cfg in CONFIGS:
                    if cfg[0] > page:
                        continue
                    dec._GPU_CONFIG[128] = cfg
                    for pps in (default_pps, 2):  # the split plan's upper target, and the old plan's
                        dec.PROGRAMS_PER_SM = pps
                        us = ba.graph_time_us(
                            [lambda t=t: dec.decode_attention(q, cache, t, lens, max_seq_len=L, out=out)
                             for t in tables], calls=max(n, 10))
                        cells.append((floor / us, f"pg{page}/{cfg[0]}/{cfg[1]}/{cfg[2]}/p{pps}:{us:.1f}us={100 * floor / us:.0f}%"))
                    dec._GPU_CONFIG[128], dec.PROGRAMS_PER_SM = default_cfg, default_pps
                del cache, tables
                torch.cuda.empty_cache()
            cells.sort(reverse=True)
            print(f"{kd} B={B} L={L} floor {floor:.1f}us best: " + " ".join(c for _, c in cells[:6])
                  + " | worst: " + cells[-1][1], flush=True)


def time_prefill() -> None:
    L, page = 4096, 64
    q = torch.randn(L, H, D, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    lens = torch.tensor([L], dtype=torch.int32, device="cuda")
    flops = 4 * H * D * L * L / 2  # causal
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    qs = q.transpose(0, 1)[None]  # [1, H, L, D]
    sd = ba.graph_time_us([lambda: torch.nn.functional.scaled_dot_product_attention(
        qs, k, v, is_causal=True, enable_gqa=True)], calls=5)
    print(f"prefill L={L}: SDPA fp16 {sd:.0f}us {flops / sd / 1e6:.0f} TFLOP/s", flush=True)
    ba.BLOCK_SIZE = page
    for kd in ("fp16", "int8", "int4"):
        cache = ba._random_paged(kd, L // page, HKV, D)
        table = torch.arange(L // page, device="cuda", dtype=torch.int32)[None]
        us = ba.graph_time_us([lambda: prefill_attention(q, cache, table, cu, lens, max_q_len=L)], calls=5)
        print(f"prefill L={L} {kd}: lmq {us:.0f}us {flops / us / 1e6:.0f} TFLOP/s", flush=True)


def prefill_fresh() -> None:
    """Prefill attention with the chunk's own keys and values taken from the float k / v (`k_new` / `v_new`, as
    `write_kv(..., write_back=True)` leaves them; 32 / 8 heads, D = 128, 128-token blocks) against every key read
    through the cache, per KV dtype and (chunk, cached prefix): one whole prompt, and a chat turn over a prefix.
    Also the write path's time with and without the write-back, and the relative error of both against the fp32
    reference. Same call, CUDA-graph replays."""
    from lmq.kernels.attention_prefill import prefill_attention_ref
    from lmq.kernels.kv_quant import PagedKV, write_kv

    torch.manual_seed(0)
    page = 128
    for n, prefix in ((1024, 0), (2048, 0), (4096, 0), (2048, 2048), (512, 3584), (64, 4032)):
        L = n + prefix
        q = torch.randn(n, H, D, device="cuda", dtype=torch.float16)
        qkv = torch.randn(n, H + 2 * HKV, D, device="cuda", dtype=torch.float16)  # k, v as views into one row
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        lens = torch.tensor([L], dtype=torch.int32, device="cuda")
        table = torch.randperm(L // page, device="cuda").to(torch.int32)[None]
        slots = (table[0].long()[:, None] * page + torch.arange(page, device="cuda")).flatten()[prefix:L]
        flops = 4 * H * D * n * (prefix + (n + 1) / 2)
        for kd in ("fp16", "int8", "int4"):
            cache = PagedKV.allocate(L // page, page, HKV, D, kd, "cuda")
            pre_kv = torch.randn(max(prefix, 1), 2, HKV, D, device="cuda", dtype=torch.float16)
            pslots = (table[0].long()[:, None] * page + torch.arange(page, device="cuda")).flatten()[:prefix]
            write_kv(pre_kv[:prefix, 0], pre_kv[:prefix, 1], cache, pslots)
            k, v = qkv[:, H:H + HKV].clone(), qkv[:, H + HKV:].clone()
            kk, vv = qkv[:, H:H + HKV], qkv[:, H + HKV:]
            args = (kk, vv, cache, slots)
            w0 = ba.graph_time_us([lambda args=args: write_kv(*args)], calls=5)
            w1 = ba.graph_time_us([lambda args=args, back=kd != "fp16": write_kv(*args, write_back=back)], calls=5)
            kk.copy_(k)
            vv.copy_(v)
            write_kv(kk, vv, cache, slots, write_back=True)  # kk, vv now hold what the cache holds
            ref = prefill_attention_ref(q, cache, table, cu, lens).float()
            cells = []
            # True: two launches; "no prefix": the first alone (with a prefix, only its time means anything)
            for fresh in (False, True, "no prefix"):
                kw = {"k_new": kk, "v_new": vv, "has_prefix": fresh is True} if fresh else {}
                out = prefill_attention(q, cache, table, cu, lens, max_q_len=n, **kw).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = ba.graph_time_us([lambda args=(q, cache, table, cu, lens), n=n, kw=kw: prefill_attention(
                    *args, max_q_len=n, **kw)], calls=5)
                cells.append(f"{('fresh' if fresh is True else fresh) if fresh else 'cache'} {us:.1f}us {flops / us / 1e6:.0f}TF err {err:.1e}")
            print(f"prefill n={n} prefix={prefix} {kd}: " + ", ".join(cells)
                  + f"; write {w0:.1f}us, with write-back {w1:.1f}us", flush=True)
            del cache


def prefill_configs() -> None:
    """Prefill attention of one L-token causal sequence (L = 1024, 4096), per KV dtype: the kernel's
    (BLOCK_M, BLOCK_N, warps, stages) configs at head dim 128, and the table's config with every key tile masked
    (`UNMASKED_TILES` off, first and last); TFLOP/s against SDPA (flash, fp16, contiguous) and the relative error
    against the fp32 reference, same call. (Session 17 also timed the query tiles launched
    longest first, a `REVERSE` switch since removed: benchmarks/results/2026-11-23-session17-h100/prefill-call/.)"""
    import lmq.kernels.attention_prefill as pre
    from lmq.kernels.attention_prefill import prefill_attention_ref

    torch.manual_seed(0)
    configs = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)]
    default, block_size = pre._GPU_CONFIG[128], ba.BLOCK_SIZE
    for L in (1024, 4096):
        page = 64
        q = torch.randn(L, H, D, device="cuda", dtype=torch.float16)
        cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
        lens = torch.tensor([L], dtype=torch.int32, device="cuda")
        flops = 4 * H * D * L * L / 2
        k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        qs = q.transpose(0, 1)[None]
        sd = ba.graph_time_us([lambda qs=qs, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
            qs, k, v, is_causal=True, enable_gqa=True)], calls=5)
        print(f"prefill L={L}: SDPA fp16 {sd:.0f}us {flops / sd / 1e6:.0f} TFLOP/s", flush=True)
        ba.BLOCK_SIZE = page
        for kd in ("fp16", "int8", "int4"):
            cache = ba._random_paged(kd, L // page, HKV, D)
            table = torch.randperm(L // page, device="cuda").to(torch.int32)[None]
            ref = prefill_attention_ref(q, cache, table, cu, lens).float()
            cells = []
            for cfg, unmasked in [(default, False), *((c, True) for c in configs), (default, False)]:
                pre._GPU_CONFIG[128], pre.UNMASKED_TILES = cfg, unmasked
                out = prefill_attention(q, cache, table, cu, lens, max_q_len=L).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = ba.graph_time_us([lambda args=(q, cache, table, cu, lens), L=L: prefill_attention(
                    *args, max_q_len=L)], calls=5)
                cells.append(f"{cfg}{'' if unmasked else ' all masked'} {us:.0f}us {flops / us / 1e6:.0f}TF "
                             f"err {err:.1e}")
            pre._GPU_CONFIG[128], pre.UNMASKED_TILES = default, True
            print(f"prefill L={L} {kd}: " + ", ".join(cells), flush=True)
            del cache
    ba.BLOCK_SIZE = block_size


def _workload(kd: str, B: int, L: int):
    """B sequences of L tokens in a random paged cache (shuffled blocks of ba.BLOCK_SIZE), enough copies to
    outrun the L2 cache: (KV bytes of one copy, cache, block tables [copies, B, blocks], lengths, queries)."""
    kv_bytes = 2 * B * L * HKV * kv_bytes_per_token_head(kd, D)
    n = ba.copies_for(kv_bytes)
    nb = -(-L // ba.BLOCK_SIZE)
    cache = ba._random_paged(kd, n * B * nb, HKV, D)
    tables = torch.randperm(n * B * nb, device="cuda").to(torch.int32).view(n, B, nb)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    return kv_bytes, cache, tables, lens, q


def _time(q, cache, tables, lens, L: int, split_len: int | None = None) -> float:
    """us per decode-attention call, one call per table copy, CUDA-graph timed."""
    return ba.graph_time_us([lambda t=t: dec.decode_attention(q, cache, t, lens, max_seq_len=L, split_len=split_len)
                             for t in tables], calls=max(len(tables), 10))


def compare(bw: float) -> None:
    """The Triton split kernel's default config against variants, same caches and queries: int4 forced to two
    or to three split programs per SM (`int4_three_per_sm`: three cap the kernel at 168 registers), the values'
    scales applied the other way (`kv_quant.scale_probs`), and both. (The Gluon int4 kernel is off here.)"""
    torch.manual_seed(0)
    dec.MMA_KERNEL = False
    saved = {"int4_three_per_sm": dec.int4_three_per_sm, "int4_plan": dec.int4_plan, "scale_probs": dec.scale_probs}

    def per_sm(three):  # the plan's splits, forced to two or three per SM
        return {"int4_three_per_sm": lambda programs, sms: three,
                "int4_plan": lambda rows, splits, sms, tiles: (splits, three)}

    def flipped():
        return {"scale_probs": lambda cache: not saved["scale_probs"](cache)}

    def variants(kd):
        yield "default", {}
        yield "values the other way", flipped()
        if kd == "int4":
            for three in (False, True):
                name = "three per SM" if three else "two per SM"
                yield name, per_sm(three)
                yield f"{name}, values the other way", {**per_sm(three), **flipped()}

    for kd in ("int8", "int4"):
        for B, L in ((1, 4096), (1, 16384), (8, 4096), (8, 16384), (64, 4096), (64, 16384)):
            kv_bytes, cache, tables, lens, q = _workload(kd, B, L)
            cells = []
            for name, setting in [*variants(kd), ("default again", {})]:
                for k, v in setting.items():
                    setattr(dec, k, v)
                us = _time(q, cache, tables, lens, L)
                out = dec.decode_attention(q, cache, tables[0], lens, max_seq_len=L)[:1].float()
                ref = dec.decode_attention_ref(q[:1], cache, tables[0][:1], lens[:1]).float()
                err = ((out - ref).norm() / ref.norm()).item()  # sequence 0, as lmq bench attention
                split_len, _, _ = dec.plan_decode(q, kd, HKV, L, dec._GPU_CONFIG[128][0], dec._sm_count(q.device))
                splits = -(-L // split_len)
                for k, v in saved.items():
                    setattr(dec, k, v)
                cells.append(f"{name} {us:.1f}us={100 * kv_bytes / bw / us * 1e6:.0f}% ({splits}) err {err:.1e}")
            print(f"{kd} B={B} L={L}: " + ", ".join(cells), flush=True)
            del cache, tables
            torch.cuda.empty_cache()


def splits_and_occupancy(bw: float) -> None:
    """The Triton split kernel, tokens per split against programs per SM: int4 with the two-or-three rule
    forced either way; `--b1`: one sequence, int8 and fp16, at two per SM (their only setting); `--three`: int8
    and fp16 at B=1 and 8 at two and at three per SM (the int4 register cap, INT4_THREE_REGS, on their kernels:
    offline, no spill in the loop). (The Gluon int4 kernel is off here; `--mma-splits` sweeps it.)"""
    torch.manual_seed(0)
    dec.MMA_KERNEL = False
    rule, eligible = dec.int4_three_per_sm, dec.int4_three_eligible
    shapes = (("int4", 8, 4096, (384, 512, 768, 1024)), ("int4", 8, 16384, (768, 1024, 1536, 2048)),
              ("int4", 64, 4096, (2048, 4096)), ("int4", 1, 16384, (256, 512, 1024)))
    if "--big" in sys.argv:  # B=64: one to four splits
        shapes = (("int4", 64, 16384, (16384, 8192, 5504, 4096)), ("int4", 64, 4096, (4096, 2048, 1408, 1024)),
                  ("int4", 64, 32768, (32768, 16384, 11008)))
    if "--b1" in sys.argv:  # B=1: 8 H_kv programs per split; 32 splits is the plan's choice at 4k-32k
        shapes = tuple((kd, 1, L, tuple(L // s for s in (16, 24, 32, 40, 48, 64)))
                       for kd in ("int8", "fp16") for L in (4096, 16384))
    if "--three" in sys.argv:
        dec.int4_three_eligible = lambda kv_dtype, head_dim, device: True
        shapes = tuple((kd, B, L, tuple(L // s for s in splits)) for kd in ("int8", "fp16")
                       for B, L, splits in ((1, 4096, (32, 48)), (1, 16384, (32, 48, 64)), (1, 32768, (32, 48, 64)),
                                            (8, 4096, (8, 12, 16)), (8, 16384, (16, 24))))
    for kd, B, L, split_lens in shapes:
        kv_bytes, cache, tables, lens, q = _workload(kd, B, L)
        cells = []
        for split_len in split_lens:
            split_len = -(-split_len // 128) * 128
            for three in ((False, True) if kd == "int4" or "--three" in sys.argv else (False,)):
                dec.int4_three_per_sm = lambda programs, sms, three=three: three
                us = _time(q, cache, tables, lens, L, split_len)
                dec.int4_three_per_sm = rule
                cells.append(f"{-(-L // split_len)} splits {'3' if three else '2'}/SM {us:.1f}us"
                             f"={100 * kv_bytes / bw / us * 1e6:.0f}%")
        print(f"{kd} B={B} L={L}: " + ", ".join(cells), flush=True)
        del cache, tables
        torch.cuda.empty_cache()
    dec.int4_three_eligible = eligible


def mma_compare(bw: float) -> None:
    """int4: the Gluon split kernel (attention_decode_mma) against the Triton one, same caches and queries,
    each at the plan's splits, and the Gluon kernel at other split counts; us, % of the floor, rel err."""
    torch.manual_seed(0)
    shapes = ((1, 4096), (1, 16384), (1, 32768), (8, 4096), (8, 16384), (8, 32768), (64, 4096), (64, 16384),
              (64, 32768))
    for B, L in shapes:
        kv_bytes, cache, tables, lens, q = _workload("int4", B, L)
        ref = dec.decode_attention_ref(q[:1], cache, tables[0][:1], lens[:1]).float()
        planned, _ = dec.plan_launch(B, HKV, L, 128, dec._sm_count(q.device),
                                     dec.int4_three_eligible("int4", D, q.device))  # what "triton" runs
        variants = [("triton", False, None), ("gluon", True, dec.mma_split_len(B, HKV, L, 128, dec._sm_count(q.device))
                                                       or planned)]
        variants += [(f"gluon {-(-L // sl)} splits", True, sl)
                     for sl in sorted({max(128, planned * 2), max(128, planned // 2), max(128, planned // 4)})
                     if sl != planned and -(-L // sl) <= dec.MAX_SPLITS]
        cells = []
        for name, on, split_len in variants:
            dec.MMA_KERNEL = on
            us = _time(q, cache, tables, lens, L, split_len)
            out = dec.decode_attention(q, cache, tables[0], lens, max_seq_len=L, split_len=split_len)[:1].float()
            dec.MMA_KERNEL = True
            err = ((out - ref).norm() / ref.norm()).item()
            cells.append(f"{name} {us:.1f}us={100 * kv_bytes / bw / us * 1e6:.0f}% err {err:.1e}")
        print(f"int4 B={B} L={L} (plan {-(-L // planned)} splits): " + ", ".join(cells), flush=True)
        del cache, tables
        torch.cuda.empty_cache()


def mma_splits(bw: float) -> None:
    """The Gluon int4 split kernel: time per split count (also with `--pads`: shared memory held beyond its rings, so
    fewer programs stay resident per SM), against the Triton kernel at its plan."""
    torch.manual_seed(0)
    batches = (1, 2, 4, 8, 16, 32, 64)
    if "--batches" in sys.argv:
        batches = tuple(int(b) for b in sys.argv[sys.argv.index("--batches") + 1].split(","))
    if "--page" in sys.argv:  # the cache's block size, which caps the tile (64: 16 tokens per warp)
        ba.BLOCK_SIZE = int(sys.argv[sys.argv.index("--page") + 1])
    contexts = (4096, 16384, 32768)
    if "--contexts" in sys.argv:
        contexts = tuple(int(c) for c in sys.argv[sys.argv.index("--contexts") + 1].split(","))
    for B in batches:
        for L in contexts:
            kv_bytes, cache, tables, lens, q = _workload("int4", B, L)
            cells = []
            caps = [None] + [int(c) for c in sys.argv[sys.argv.index("--maxnreg") + 1].split(",")] \
                if "--maxnreg" in sys.argv else [None]
            stages = [int(c) for c in sys.argv[sys.argv.index("--stages") + 1].split(",")] \
                if "--stages" in sys.argv else [dec._mma.STAGES]
            default_stages = dec._mma.STAGES
            pads = [int(c) for c in sys.argv[sys.argv.index("--pads") + 1].split(",")] \
                if "--pads" in sys.argv else [dec._mma.PAD_BYTES]
            default_pad = dec._mma.PAD_BYTES
            for on, splits, cap, stg, pad in [(False, None, None, default_stages, default_pad)] + [
                    (True, s, c, g, pd) for s in (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64) for c in caps
                    for g in stages for pd in pads if L // s >= 128 and B * HKV * s <= 8 * 132]:
                dec.MMA_KERNEL, dec._mma.MAXNREG, dec._mma.STAGES, dec._mma.PAD_BYTES = on, cap, stg, pad
                tile = min(128, ba.BLOCK_SIZE)
                split_len = None if splits is None else (-(-L // splits) + tile - 1) // tile * tile
                us = _time(q, cache, tables, lens, L, split_len)
                dec.MMA_KERNEL, dec._mma.MAXNREG, dec._mma.STAGES = True, None, default_stages
                dec._mma.PAD_BYTES = default_pad
                actual = -(-L // split_len) if split_len else None  # whole tiles: 24 asked at 4k run 16
                name = (f"gluon {actual}" + (f" cap {cap}" if cap else "")
                        + (f" stages {stg}" if len(stages) > 1 else "")
                        + (f" pad {pad // 1024}k" if len(pads) > 1 else "") if on else "triton plan")
                cells.append((us, f"{name} {us:.1f}"))
            if len(cells) < 2:
                print(f"int4 B={B} L={L}: no Gluon split count fits", flush=True)
            else:
                best = min(c for c in cells[1:])
                print(f"int4 B={B} L={L}: best {best[1]} ({100 * kv_bytes / bw / best[0] * 1e6:.0f}%) | "
                      + ", ".join(c[1] for c in cells), flush=True)
            del cache, tables
            torch.cuda.empty_cache()


def triton_stages(bw: float) -> None:
    """The Triton split kernel's (BLOCK_N, warps, stages) at D=128 where it runs (fp16, int8; int4 with the
    Gluon kernel off), at the plan's splits, the table's config first and again last (A/B noise)."""
    torch.manual_seed(0)
    default = dec._GPU_CONFIG[128]
    configs = [default, (128, 4, 2), (128, 4, 1), (128, 8, 2), (64, 4, 2), default]
    dec.MMA_KERNEL = False
    for kd in ("fp16", "int8", "int4"):
        for B, L in ((1, 4096), (1, 16384), (1, 32768), (8, 4096), (8, 16384), (64, 4096)):
            kv_bytes, cache, tables, lens, q = _workload(kd, B, L)
            cells = []
            for cfg in configs:
                dec._GPU_CONFIG[128] = cfg
                us = _time(q, cache, tables, lens, L)
                cells.append(f"{cfg} {us:.1f}us={100 * kv_bytes / bw / us * 1e6:.0f}%")
            dec._GPU_CONFIG[128] = default
            print(f"{kd} B={B} L={L}: " + ", ".join(cells), flush=True)
            del cache, tables
            torch.cuda.empty_cache()
    dec.MMA_KERNEL = True


def profile_kernels(bw: float) -> None:
    """Where a decode-attention call's time goes: each kernel's GPU time (torch.profiler) over 20 calls, at
    the launch-bound shapes (B=1 4k/16k, B=8 4k), per KV dtype, and the call's KV bytes over `bw`."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    for kd in ("fp16", "int8", "int4"):
        for B, L in ((1, 4096), (1, 16384), (8, 4096)):
            kv_bytes, cache, tables, lens, q = _workload(kd, B, L)
            _time(q, cache, tables, lens, L)  # compiled and warm
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(20):
                    dec.decode_attention(q, cache, tables[i % len(tables)], lens, max_seq_len=L)
                torch.cuda.synchronize()
            per = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per.setdefault(e.name[:40], []).append(e.device_time_total)
            print(f"{kd} B={B} L={L} (floor {kv_bytes / bw * 1e6:.1f}us): "
                  + ", ".join(f"{n} {sum(t) / len(t):.1f}us x{len(t)}" for n, t in per.items()), flush=True)
            del cache, tables
            torch.cuda.empty_cache()


def balanced_ab(bw: float) -> None:
    """Each sequence spread over all splits (`attention_decode.BALANCED`) or cut into the plan's pieces, at
    equal-length shapes where both give the same split lengths: what the per-program split-length
    computation costs the kernels. Interleaved, three times each."""
    torch.manual_seed(0)
    for kd in ("int4", "int8", "fp16"):
        for B, L in ((1, 4096), (1, 16384), (8, 16384), (64, 4096)):
            _, cache, tables, lens, q = _workload(kd, B, L)
            cells = []
            for on in (True, False) * 3:
                dec.BALANCED = on
                cells.append(f"{'on' if on else 'off'} {_time(q, cache, tables, lens, L):.1f}")
            dec.BALANCED = True
            print(f"{kd} B={B} L={L}: " + ", ".join(cells), flush=True)
            del cache, tables
            torch.cuda.empty_cache()


def main() -> None:
    bw = ba.copy_bandwidth_bytes_s()
    print(f"{torch.cuda.get_device_name(0)} copy bandwidth {bw / 1e9:.0f} GB/s")
    if "--prefill-fresh" in sys.argv:
        prefill_fresh()
        return
    if "--prefill-configs" in sys.argv:
        prefill_configs()
        return
    modes = {"--balanced": balanced_ab, "--profile": profile_kernels, "--triton-stages": triton_stages,
             "--compare": compare, "--mma-splits": mma_splits, "--mma": mma_compare, "--splits": splits_and_occupancy}
    for flag, mode in modes.items():  # in this order: "--mma-splits" before "--mma"
        if flag in sys.argv:
            mode(bw)
            return
    time_prefill()
    sweep_decode(bw)


if __name__ == "__main__":
    main()
