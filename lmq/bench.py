"""Kernel benchmarks: lmq's kernels against their peers, measured in the same run.

Timing: each measured op is captured in a CUDA graph (launch gaps out of the numbers), over enough
copies of its weights that they cannot stay in L2 between calls (2x the L2 size at least), and
replayed; the result is the median over replays of the time per call.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

from lmq.errors import InputError, UnsupportedError

# ---------------------------------------------------------------------------------------------
# gemm
# ---------------------------------------------------------------------------------------------
# (name, N, K) of each quantized linear, with q/k/v and gate/up fused as the runtime runs them.
GEMM_SHAPES = {
    "llama3-8b": [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
                  ("down_proj", 4096, 14336)],
    "qwen2.5-7b": [("qkv_proj", 4608, 3584), ("o_proj", 3584, 3584), ("gate_up_proj", 37888, 3584),
                   ("down_proj", 3584, 18944)],
}
DEFAULT_MS = (1, 4, 16, 64, 256, 1024, 4096)


def parse_gemm_shapes(spec: str) -> tuple[list[tuple[str, int, int]], list[int] | None]:
    """`llama3-8b`, `qwen2.5-7b`, or `M,N,K[;M,N,K...]` -> ([(name, N, K)], Ms or None)."""
    if spec in GEMM_SHAPES:
        return GEMM_SHAPES[spec], None
    shapes, ms = [], []
    for part in spec.replace(" ", "").split(";"):
        try:
            M, N, K = (int(v) for v in part.split(","))
        except ValueError:
            raise InputError(
                f"--shapes {spec!r}: expected one of {', '.join(GEMM_SHAPES)} or M,N,K triples separated by ';' "
                f"(e.g. 1,4096,4096;16,4096,4096)"
            ) from None
        if min(M, N, K) <= 0:
            raise InputError(f"--shapes {part!r}: M, N and K must be positive")
        shapes.append((f"{N}x{K}", N, K))
        ms.append(M)
    return shapes, ms


@dataclass
class GemmRow:
    shape: str
    M: int
    N: int
    K: int
    lmq_us: float
    lmq_path: str
    cublas_us: float
    torch_int4_us: float | None
    floor_us: float
    paths_us: dict = field(default_factory=dict)  # every lmq path, for the crossovers
    lmq_rel_err: float = math.nan
    torch_int4_rel_err: float | None = None

    @property
    def speedup(self) -> float:
        return self.cublas_us / self.lmq_us

    @property
    def int4_speedup(self) -> float | None:
        return None if self.torch_int4_us is None else self.cublas_us / self.torch_int4_us

    def as_dict(self) -> dict:
        d = asdict(self)
        d["speedup_vs_cublas"] = self.speedup
        d["torch_int4_speedup_vs_cublas"] = self.int4_speedup
        return d


def graph_time_us(fns: list, calls: int, reps: int = 15) -> float:
    """Median time per call (us) of `calls` calls cycling through `fns`, replayed from one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:  # warm-up: compile, allocate, pick cuBLAS algorithms
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # captured on the warm-up stream: per-stream state made there (the GEMV's split-K workspace) is
    # then really allocated and zeroed, not made inside this capture
    with torch.cuda.graph(graph, stream=side):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    del graph
    return statistics.median(times)


def copy_bandwidth_bytes_s(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    a.uniform_()
    b = torch.empty_like(a)
    t_us = graph_time_us([lambda a=a, b=b: b.copy_(a)], calls=5, reps=10)
    del a, b
    return 2 * nbytes / (t_us * 1e-6)


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, math.ceil(2 * l2 / max(nbytes, 1))))


def _torch_int4_ops():
    """(convert, mm) for torch's tinygemm int4 kernel, or None when this torch lacks them."""
    try:
        return torch.ops.aten._convert_weight_to_int4pack, torch.ops.aten._weight_int4pack_mm
    except (AttributeError, RuntimeError):
        return None


def _torch_int4_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, G: int):
    """Our codes/scales/zeros in tinygemm's form: w = (q - 8) * s + zt, so zt = (8 - z) * s.

    `_convert_weight_to_int4pack` takes uint8 [N, K/2] (even k in the high nibble) since torch 2.5;
    scales_and_zeros is bf16 [K/G, N, 2].
    """
    convert, _ = _torch_int4_ops()
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()  # [N, K/2]
    w_int4 = convert(packed, 8)
    s = scales.float().t()  # [K/G, N]
    zt = (8.0 - zeros.float().t()) * s  # [K/G, N]
    sz = torch.stack([s, zt], dim=-1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
    return w_int4, sz


def bench_gemm(shapes: list[tuple[str, int, int]], ms: list[int], group_size: int = 128,
               per_shape_ms: list[int] | None = None, on_row=None, dtype: str = "fp16") -> dict:
    """Time lmq's W4A16 paths, cuBLAS and torch's int4 kernel per (shape, M) with `dtype` ("fp16" or "bf16")
    activations (cuBLAS multiplies the dequantized weight in that dtype); returns a report dict."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise InputError(f"--dtype {dtype!r}: expected fp16 or bf16")
    dt = dtypes[dtype]
    from lmq.pack import planes64

    for name, N, K in shapes:  # --group-size and --shapes first, so a bad one is named on any machine
        planes64.check_shape(N, K, group_size, name)
    if not torch.cuda.is_available():
        raise UnsupportedError("lmq bench gemm needs a CUDA GPU; none is visible")
    from lmq.engine.qlinear import (
        choose_path,
        engine_table,
        local_arch,
        qlinear,
        run_path,
        w4a16_gemm_direct,
    )
    from lmq.quant.rtn import QuantizedWeight

    arch = local_arch()
    table = engine_table(arch, dtype=dt, group_size=group_size)
    bw = copy_bandwidth_bytes_s()
    int4_ops = _torch_int4_ops()
    rows: list[GemmRow] = []
    int4_errors: list[str] = []
    torch.manual_seed(0)
    for si, (name, N, K) in enumerate(shapes):
        G = group_size
        q = QuantizedWeight(
            codes=torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda"),
            scales=(torch.rand(N, K // G, device="cuda") * 0.01 + 0.001).half(),
            zeros=torch.randint(0, 16, (N, K // G), dtype=torch.uint8, device="cuda"),
            bits=4, group_size=G,
        )
        p = {k: v.cuda() for k, v in planes64.pack(q).items()}
        int4_bytes = sum(t.numel() * t.element_size() for t in p.values())
        n_q = copies_for(int4_bytes)
        packs = [p] + [{k: v.clone() for k, v in p.items()} for _ in range(n_q - 1)]
        w16 = q.dequantize(dt)  # [N, K]
        n_f = copies_for(w16.numel() * 2)
        w16s = [w16] + [w16.clone() for _ in range(n_f - 1)]
        t4, int4_error = None, None if int4_ops is not None else "this torch has no _weight_int4pack_mm"
        if int4_ops is not None:
            try:
                w4, sz = _torch_int4_weight(q.codes.int(), q.scales, q.zeros, G)
                t4 = [(w4, sz)] + [(w4.clone(), sz.clone()) for _ in range(n_q - 1)]
            except RuntimeError as e:  # this torch's kernel refuses the shape: report n/a and why
                int4_error = f"{name}: {str(e).splitlines()[0]}"
        if int4_error:
            int4_errors.append(int4_error)
        del q
        for M in (per_shape_ms[si:si + 1] if per_shape_ms else ms):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            paths = {}
            for path in ("gemv", "direct", "decode", "prefill", "dequant"):
                if (path == "gemv" and M > 4) or (path == "decode" and M > 256) or (path == "direct" and not (
                        "direct" in table and w4a16_gemm_direct is not None
                        and w4a16_gemm_direct.supported(x, M, table["direct"]))):
                    continue  # never the choice at this M (the direct kernel: timed wherever it can run)
                if path == "direct":  # the kernel itself: run_path would time the decode kernel where it falls back
                    fns = [lambda pp=pp, x=x, G=G: w4a16_gemm_direct.w4a16_gemm_direct(
                        x, pp["qweight"], pp["scales"], pp["zeros"], G, table["direct"]) for pp in packs]
                    try:
                        paths[path] = graph_time_us(fns, calls=max(len(fns), 20))
                    except w4a16_gemm_direct.KernelUnavailable:  # does not build with this Triton (warned once)
                        pass
                    continue
                fns = [lambda pp=pp, path=path, x=x, G=G: run_path(path, x, pp["qweight"], pp["scales"],
                                                                   pp["zeros"], G, table) for pp in packs]
                paths[path] = graph_time_us(fns, calls=max(len(fns), 20))
            chosen = choose_path(M, table, N * K)
            if chosen == "direct" and "direct" not in paths:  # it could not run: the dispatcher takes the decode kernel
                chosen = "decode"
            cublas = graph_time_us([lambda w=w, x=x: torch.matmul(x, w.t()) for w in w16s], calls=max(n_f, 20))
            # correctness of what was timed, on this very input
            ref = x.float() @ w16.float().t()  # [M, N]; w16 = w_hat rounded to x's dtype
            got = qlinear(x, p["qweight"], p["scales"], p["zeros"], G, table).float()
            lmq_err = ((got - ref).norm() / ref.norm()).item()
            t4_us, t4_err = None, None
            if t4 is not None:
                _, mm = int4_ops
                xb = x.to(torch.bfloat16)
                t4_us = graph_time_us([lambda a=a, b=b, xb=xb, mm=mm, G=G: mm(xb, a, G, b) for a, b in t4],
                                      calls=max(n_q, 20))
                got4 = mm(xb, t4[0][0], G, t4[0][1]).float()
                t4_err = ((got4 - ref).norm() / ref.norm()).item()
            row = GemmRow(
                shape=name, M=M, N=N, K=K, lmq_us=paths[chosen], lmq_path=chosen, cublas_us=cublas,
                torch_int4_us=t4_us, floor_us=int4_bytes / bw * 1e6, paths_us=paths, lmq_rel_err=lmq_err,
                torch_int4_rel_err=t4_err,
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del packs, w16s, t4
        torch.cuda.empty_cache()
    return {
        "gpu": torch.cuda.get_device_name(0),
        "arch": arch,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "group_size": group_size,
        "dtype": dtype,
        "copy_bandwidth_GB_s": bw / 1e9,
        "torch_int4_errors": int4_errors,
        "rows": [r.as_dict() for r in rows],
    }


def render_gemm_table(report: dict):
    """A rich Table of a bench_gemm report (times in us; speedups vs cuBLAS in the activations' dtype = 1.0)."""
    from rich.table import Table

    dt = report.get("dtype", "fp16")  # reports before bf16 was measured were fp16
    t = Table(title=f"W4A16 GEMM, {report['gpu']} ({report['arch']}), g{report['group_size']}, {dt} activations, "
                    f"copy bandwidth {report['copy_bandwidth_GB_s']:.0f} GB/s; speedups vs cuBLAS {dt}")
    for col in ("shape", "M", "N", "K", "lmq us", "path", f"cuBLAS {dt} us", "torch int4 us", "lmq x",
                "int4 x", "floor us", "floor x", "gemv/direct/decode/prefill/dequant us"):
        t.add_column(col, justify="left" if col in ("shape", "path") else "right")
    for r in report["rows"]:
        t4 = r["torch_int4_us"]
        p = r["paths_us"]
        cublas = r["cublas_us"] if "cublas_us" in r else r["cublas_fp16_us"]
        t.add_row(
            r["shape"], str(r["M"]), str(r["N"]), str(r["K"]), f"{r['lmq_us']:.1f}", r["lmq_path"],
            f"{cublas:.1f}", "n/a" if t4 is None else f"{t4:.1f}", f"{r['speedup_vs_cublas']:.2f}",
            "n/a" if t4 is None else f"{r['torch_int4_speedup_vs_cublas']:.2f}", f"{r['floor_us']:.1f}",
            f"{cublas / r['floor_us']:.2f}",
            "/".join(f"{p[k]:.1f}" if k in p else "-" for k in ("gemv", "direct", "decode", "prefill", "dequant")),
        )
    return t
