"""`lmq bench attention`: paged decode attention per layer against its floor and torch SDPA.

For each (context L, batch B, kv_dtype): one decode step of one layer, B sequences of L tokens,
H query heads over H_kv KV heads of dim D, in a paged cache with shuffled blocks.

    floor_us  = (K/V bytes read + q + out) / copy bandwidth (measured here, read + write counted)
    sdpa_us   = torch.nn.functional.scaled_dot_product_attention on a contiguous fp16 cache
                [B, H_kv, L, D] with enable_gqa (what a dense engine would run)

Timing: each op is captured in a CUDA graph over enough copies of its cache (>= 2x the L2 size)
that nothing is served from L2, replayed, median over replays of the time per call. Every timed
configuration is also checked: lmq's output for sequence 0 against SDPA on its dequantized rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lmq.bench import copies_for, copy_bandwidth_bytes_s, graph_time_us
from lmq.errors import InputError, UnsupportedError

BLOCK_SIZE = 128  # tokens per cache block (the engine default)
MEMORY_FRACTION = 0.8  # of free GPU memory one configuration's buffers may take


def parse_list(spec: str, option: str, kind: str = "int") -> list:
    """`1k,4k,16k` / `1,8,64` / `fp16,int8` -> values (k = 1024 for sizes)."""
    vals = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        if kind == "str":
            vals.append(part)
            continue
        mult = 1024 if part[-1] in "kK" else 1
        try:
            v = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise InputError(f"{option} {spec!r}: expected comma-separated sizes like 1k,4k,16k or 1,8,64") from None
        if v <= 0:
            raise InputError(f"{option} {spec!r}: sizes must be positive")
        vals.append(v)
    if not vals:
        raise InputError(f"{option} is empty")
    return vals


@dataclass
class AttnRow:
    kv_dtype: str
    context: int
    batch: int
    lmq_us: float | None
    floor_us: float
    sdpa_us: float | None
    lmq_fp16_us: float | None  # the fp16-KV lmq time of the same (context, batch)
    rel_err_vs_sdpa: float | None
    splits: int
    kernel: str = "triton"  # the split kernel the plan picked: "triton" or "gluon" (int4, attention_decode_mma)
    note: str = ""

    @property
    def floor_frac(self) -> float | None:
        return None if self.lmq_us is None else self.floor_us / self.lmq_us

    def as_dict(self) -> dict:
        d = asdict(self)
        d["floor_frac"] = self.floor_frac
        d["speedup_vs_sdpa"] = None if self.lmq_us is None or self.sdpa_us is None else self.sdpa_us / self.lmq_us
        d["speedup_vs_fp16_kv"] = (None if self.lmq_us is None or self.lmq_fp16_us is None
                                   else self.lmq_fp16_us / self.lmq_us)
        return d


def _random_paged(kv_dtype: str, n_blocks: int, n_kv: int, D: int):
    """A pool of random contents: codes, positive scales, zeros around -scale*QMAX/2."""
    from lmq.kernels.kv_quant import QMAX, PagedKV

    cache = PagedKV.allocate(n_blocks, BLOCK_SIZE, n_kv, D, kv_dtype, "cuda")
    if cache.k_scales is None:
        cache.k.normal_()
        cache.v.normal_()
        return cache
    for c, s in ((cache.k, cache.k_scales), (cache.v, cache.v_scales)):
        c.random_(0, 256)  # uint8: every byte random (int4: both nibbles)
        scale = torch.rand(s.shape[:-1], device="cuda") * 0.02 + 0.01  # [nb, H_kv, B_s]
        s[..., 0] = scale.half()
        s[..., 1] = (-scale * QMAX[kv_dtype] / 2).half()
    return cache


def bench_attention(kv_dtypes: list[str], contexts: list[int], batches: list[int], num_heads: int = 32,
                    num_kv_heads: int = 8, head_dim: int = 128, on_row=None) -> dict:
    """Time lmq decode attention per (context, batch, kv_dtype) and SDPA fp16 per (context, batch)."""
    from lmq.kernels.kv_quant import KV_DTYPES, gather_kv_ref, kv_bytes_per_token_head

    # the options first, so a typo is named on any machine (and --kv-heads 0 is not a ZeroDivisionError)
    for kd in kv_dtypes:
        if kd not in KV_DTYPES or kd == "bf16":
            raise InputError(f"--kv-dtype {kd!r}: expected fp16, int8 or int4 (bf16 caches run with bf16 models)")
    if num_heads < 1 or num_kv_heads < 1:
        raise InputError(f"--heads {num_heads} and --kv-heads {num_kv_heads}: both must be 1 or more, e.g. "
                         "--heads 32 --kv-heads 8")
    if num_heads % num_kv_heads:
        raise InputError(f"--heads {num_heads} is not a multiple of --kv-heads {num_kv_heads}")
    if head_dim % 2 or not 32 <= head_dim <= 256:
        raise InputError(f"--head-dim {head_dim}: expected an even size in 32..256")
    if not torch.cuda.is_available():
        raise UnsupportedError("lmq bench attention needs a CUDA GPU; none is visible")
    from lmq.kernels.attention_decode import _config, _sm_count, decode_attention, plan_decode
    bw = copy_bandwidth_bytes_s()
    H, Hkv, D = num_heads, num_kv_heads, head_dim
    sm = _sm_count(torch.device("cuda"))
    rows: list[AttnRow] = []
    torch.manual_seed(0)
    for L in contexts:
        for B in batches:
            free = torch.cuda.mem_get_info()[0] * MEMORY_FRACTION
            q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)  # [B, H, D]
            io_bytes = 2 * q.numel() * 2
            # -- torch SDPA on a contiguous fp16 cache
            sdpa_bytes = 2 * B * Hkv * L * D * 2
            sdpa_us = None
            if sdpa_bytes <= free:
                n = copies_for(sdpa_bytes) if sdpa_bytes * copies_for(sdpa_bytes) <= free else 1
                kvs = [(torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16),
                        torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16)) for _ in range(n)]
                q4 = q[:, :, None]  # [B, H, 1, D]
                sdpa_us = graph_time_us(
                    [lambda k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                     for k, v in kvs], calls=max(n, 10))
                del kvs
                torch.cuda.empty_cache()
            fp16_us = None
            for kd in kv_dtypes:
                kv_bytes = 2 * B * L * Hkv * kv_bytes_per_token_head(kd, D)
                floor_us = (kv_bytes + io_bytes) / bw * 1e6
                block_n = _config(q.device, D)[0]
                split_len, gluon, _ = plan_decode(q, kd, Hkv, L, block_n, sm)
                splits = -(-L // split_len)
                row = AttnRow(kd, L, B, None, floor_us, sdpa_us, None, None, splits, "gluon" if gluon else "triton")
                if kv_bytes > free:
                    row.note = "skipped: cache exceeds GPU memory"
                    rows.append(row)
                    continue
                n = copies_for(kv_bytes) if kv_bytes * copies_for(kv_bytes) <= free else 1
                blocks_per_seq = -(-L // BLOCK_SIZE)
                n_blocks = n * B * blocks_per_seq
                cache = _random_paged(kd, n_blocks, Hkv, D)
                perm = torch.randperm(n_blocks, device="cuda").to(torch.int32)
                tables = perm.view(n, B, blocks_per_seq)  # [copies, B, blocks]: shuffled, disjoint
                lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
                out = torch.empty_like(q)
                row.lmq_us = graph_time_us(
                    [lambda t=t, c=cache: decode_attention(q, c, t, lens, max_seq_len=L, out=out) for t in tables],
                    calls=max(n, 10))
                # what was timed is right: sequence 0 against SDPA on its dequantized rows
                got = decode_attention(q, cache, tables[0], lens, max_seq_len=L)[0].float()  # [H, D]
                k, v = gather_kv_ref(cache, tables[0, 0], L)  # [L, H_kv, D] fp32
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q[0, :, None].float()[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                    enable_gqa=True)[0, :, 0]  # [H, D]
                row.rel_err_vs_sdpa = ((got - ref).norm() / ref.norm()).item()
                del cache, perm, tables, k, v
                torch.cuda.empty_cache()
                if kd == "fp16":
                    fp16_us = row.lmq_us
                row.lmq_fp16_us = fp16_us
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "heads": H, "kv_heads": Hkv, "head_dim": D, "block_size": BLOCK_SIZE,
        "copy_bandwidth_GB_s": bw / 1e9,
        "rows": [r.as_dict() for r in rows],
    }


def render_attention_table(report: dict):
    """A rich Table of a bench_attention report (times per layer in us)."""
    from rich.table import Table

    t = Table(title=f"Decode attention per layer, {report['gpu']}, H={report['heads']} H_kv={report['kv_heads']} "
                    f"D={report['head_dim']}, block {report['block_size']}, copy bandwidth "
                    f"{report['copy_bandwidth_GB_s']:.0f} GB/s")
    for col in ("kv", "context", "batch", "lmq us", "floor us", "% floor", "SDPA fp16 us", "x SDPA",
                "x fp16 KV", "splits", "kernel", "rel err"):
        t.add_column(col, justify="left" if col == "kv" else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in report["rows"]:
        if r["lmq_us"] is None:
            t.add_row(r["kv_dtype"], str(r["context"]), str(r["batch"]), r["note"], f(r["floor_us"], ".1f"),
                      "", f(r["sdpa_us"], ".1f"), "", "", "", "", "")
            continue
        t.add_row(r["kv_dtype"], str(r["context"]), str(r["batch"]), f(r["lmq_us"], ".1f"), f(r["floor_us"], ".1f"),
                  f(100 * r["floor_frac"], ".0f"), f(r["sdpa_us"], ".1f"), f(r["speedup_vs_sdpa"], ".2f"),
                  f(r["speedup_vs_fp16_kv"], ".2f"), str(r["splits"]), r.get("kernel", "triton"),
                  f(r["rel_err_vs_sdpa"], ".1e"))
    return t
