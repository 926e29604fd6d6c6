"""Launching a kernel again without Triton's per-call launch path.

Triton's `kernel[grid](...)` binds and specializes every argument, computes a cache key and looks the compiled
kernel up on every call: tens of microseconds of Python on a slow host, which every eager engine step pays on
every linear (docs/benchmarks.md, GEMM and ENGINE, session 11). `DirectLaunch` keeps the compiled kernel that
Triton returned for each kind of launch, under a key that names everything Triton specializes the kernel on:
the device, the constexpr values and launch options, Triton's debug and instrumentation switches, the dtypes,
which integer arguments are 1 or multiples of 16 (and their width), which pointers are 16-byte aligned. Later
launches of that kind call the compiled kernel directly.
`launcher[grid](*args, **kwargs)` takes a launch as `kernel[grid](...)` does and makes that key from the
arguments (an argument of a type it does not know sends the launch through Triton); `launcher(grid, key, args)`
takes a key the caller made, for arguments `_spec` cannot key (the Hopper prefill GEMM's TMA descriptors): it must
name the same, less the device and switches, added here.
The compiled kernel's calling convention is Triton's own and changes between releases: the direct call is made
only under the Triton releases it was written against (`KNOWN_TRITON`). Elsewhere, and with
`LMQ_FAST_LAUNCH=0`, every launch goes through Triton. What the direct call skips besides: Triton's check that
the globals a kernel read have not changed since it compiled, and its pre-run hooks.
"""

from __future__ import annotations

import os

import torch
import triton
from triton import knobs
from triton.runtime import driver

FAST_LAUNCH = os.environ.get("LMQ_FAST_LAUNCH", "1") != "0"
# Triton releases whose CompiledKernel.run takes (gridX, gridY, gridZ, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *every parameter's value)
KNOWN_TRITON = ("3.6.",)
_CONVENTION = triton.__version__.startswith(KNOWN_TRITON)


def current_stream(device: int) -> int:
    """The current stream's handle on `device`, read as Triton's own launch reads it."""
    return driver.active.get_current_stream(device)


def stream_buffer(pool: dict, device: torch.device, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of at least `n` elements for this (device, stream), zeroed when made, from `pool` (one dict per
    use: split-K workspaces and arrival counters that the kernels using them leave as they found them). Buffers only
    grow, to the next power of two (so a run whose sizes creep up, M = 1..191 in decode and prefill steps, makes a
    few of them, not one per size); a grown one keeps the old tensor alive, since a captured CUDA graph may still
    point at it."""
    stream = current_stream(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 0
    held = pool.setdefault((device.type, device.index, stream), [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(1 << max(n - 1, 0).bit_length(), dtype=dtype, device=device))
    return held[-1]


class PlanCache:
    """A launcher's plans (config merged, tiles, split count, ...) kept per shape and config object, so an eager step
    that calls each linear with its table's dict works them out once, not on every call. The entry holds the config
    dict, so its id is not reused while the entry lives; a config changed in place after a call keeps its old plan
    (pass a new dict to change it). Cleared when it passes `limit` entries (a caller making a fresh dict per call)."""

    def __init__(self, limit: int = 65536):
        self._plans: dict[tuple, tuple] = {}
        self._limit = limit

    def get(self, key: tuple, config: dict | None, make):
        """The plan of (`key`, `config`), made by `make()` the first time (an error it raises is not kept)."""
        full = (*key, id(config))
        hit = self._plans.get(full)
        if hit is not None and hit[1] is config:
            return hit[0]
        plan = make()
        if len(self._plans) > self._limit:
            self._plans.clear()
        self._plans[full] = (plan, config)
        return plan


class DirectLaunch:
    """A kernel's launches, direct after the first of each kind (module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = list(kernel.arg_names)  # every parameter, in order: what a compiled kernel takes
        self.params = set(self.names)
        # which parameters are constexprs; None where the kernel has no such record (the interpreter's): every
        # launch then goes through Triton
        params = getattr(kernel, "params", None)
        self.const = [p.is_constexpr for p in params] if params is not None else None
        self.compiled: dict[tuple, object] = {}

    def __getitem__(self, grid: tuple):
        """`launcher[grid](*args, **kwargs)`, as `kernel[grid](...)`."""
        def launch(*args, **kwargs):
            if not (FAST_LAUNCH and _CONVENTION) or self.const is None:
                return self.kernel[grid](*args, **kwargs)
            try:
                values = list(args) + [kwargs[name] for name in self.names[len(args):]]
                key = (tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.params)),
                       *(v if c else _spec(v) for v, c in zip(values, self.const)))
                hash(key)
            except (KeyError, TypeError):  # a parameter left to its default, or an argument _spec does not know
                return self.kernel[grid](*args, **kwargs)
            self._launch(grid, key, lambda: values, lambda: self.kernel[grid](*args, **kwargs))
        return launch

    def __call__(self, grid: tuple, key: tuple, args: dict, **options) -> None:
        """Launch on `args` (every parameter by name) with Triton's launch `options` (num_warps, ...), under the
        caller's `key` (module docstring)."""
        if not (FAST_LAUNCH and _CONVENTION) or self.const is None:
            self.kernel[grid](**args, **options)
            return
        self._launch(grid, key, lambda: [args[name] for name in self.names],
                     lambda: self.kernel[grid](**args, **options))

    def _launch(self, grid: tuple, key: tuple, values, through_triton) -> None:
        device = torch.cuda.current_device()  # Triton compiles and loads a kernel per current device
        key = (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode, key)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = through_triton()
            if hasattr(compiled, "packed_metadata"):
                self.compiled[key] = compiled
            return
        values = values()
        stream = current_stream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        meta = compiled.launch_metadata(grid, stream, *values) if enter is not None else None
        g1, g2 = (grid[1] if len(grid) > 1 else 1), (grid[2] if len(grid) > 2 else 1)
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, meta, enter, leave, *values)


def _spec(v):
    """What Triton specializes a non-constexpr argument on (TypeError for an argument of another type)."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    if isinstance(v, bool):
        return bool, v
    if isinstance(v, int):
        return v == 1, v % 16 == 0, -(2**31) <= v < 2**31, v < 2**63
    if isinstance(v, float):
        return float
    if v is None:
        return None
    if isinstance(v, tuple):
        return tuple(_spec(x) for x in v)
    raise TypeError(f"no direct-launch key for a {type(v).__name__}")

