"""Launching a kernel again without Triton's per-call launch path.

Triton's `kernel[grid](...)` binds and specializes every argument, computes a cache key and looks the compiled
kernel up on every call: tens of microseconds of Python on a slow host, which every eager engine step pays on
every linear (docs/benchmarks.md, GEMM and ENGINE, session 11). `DirectLaunch` keeps the compiled kernel that
Triton returned for each kind of launch, under a key that names everything Triton specializes the kernel on:
the constexpr values and launch options, the dtypes, which integer arguments are 1 or multiples of 16 (and fit
32 bits), which pointers are 16-byte aligned. Later launches of that kind call the compiled kernel directly.
`launcher[grid](*args, **kwargs)` takes a launch as `kernel[grid](...)` does and makes that key from the
arguments; `launcher(grid, key, args)` takes a key the caller made more cheaply (it must name the same). With `LMQ_FAST_LAUNCH=0`, or under a Triton whose compiled kernels take other arguments (found at
the first direct call, which then falls back, and never tried again), every launch goes through Triton.
"""

from __future__ import annotations

import os

import torch
from triton import knobs

FAST_LAUNCH = os.environ.get("LMQ_FAST_LAUNCH", "1") != "0"

try:  # the current stream's handle, read as Triton reads it (torch.cuda.current_stream() costs ~20 us more)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # a torch built without CUDA
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


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
        self.broken: str | None = None  # why a direct call failed (then Triton launches every time)

    def __getitem__(self, grid: tuple):
        """`launcher[grid](*args, **kwargs)`, as `kernel[grid](...)`."""
        def launch(*args, **kwargs):
            if not FAST_LAUNCH or self.broken is not None or self.const is None:
                return self.kernel[grid](*args, **kwargs)
            try:
                values = list(args) + [kwargs[name] for name in self.names[len(args):]]
                key = (tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.params)),
                       *(v if c else _spec(v) for v, c in zip(values, self.const)))
                hash(key)
            except (KeyError, TypeError):  # a parameter left to its default, or a value that cannot be a key
                return self.kernel[grid](*args, **kwargs)
            self._launch(grid, key, values, lambda: self.kernel[grid](*args, **kwargs))
        return launch

    def __call__(self, grid: tuple, key: tuple, args: dict, **options) -> None:
        """Launch on `args` (every parameter by name) with Triton's launch `options` (num_warps, ...), under the
        caller's `key` (module docstring)."""
        if not FAST_LAUNCH or self.broken is not None:
            self.kernel[grid](**args, **options)
            return
        self._launch(grid, key, None if key not in self.compiled else [args[name] for name in self.names],
                     lambda: self.kernel[grid](**args, **options))

    def _launch(self, grid: tuple, key: tuple, values: list | None, through_triton) -> None:
        compiled = self.compiled.get(key)
        if compiled is not None:
            stream = _raw_stream(torch.cuda.current_device())
            enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
            meta = compiled.launch_metadata(grid, stream, *values) if enter is not None else None
            g1, g2 = (grid[1] if len(grid) > 1 else 1), (grid[2] if len(grid) > 2 else 1)
            try:
                compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, meta, enter, leave,
                             *values)
                return
            except (TypeError, AttributeError, ValueError) as e:  # another Triton's calling convention
                self.broken = f"{type(e).__name__}: {e}"
        compiled = through_triton()
        if FAST_LAUNCH and self.broken is None and hasattr(compiled, "packed_metadata"):
            self.compiled[key] = compiled


def _spec(v):
    """What Triton specializes a non-constexpr argument on."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    if isinstance(v, bool):
        return bool, v
    if isinstance(v, int):
        return v == 1, v % 16 == 0, -(2**31) <= v < 2**31
    if isinstance(v, float):
        return float
    if isinstance(v, tuple):
        return tuple(_spec(x) for x in v)
    return type(v), v


def int_spec(v: int) -> tuple[bool, bool]:
    """What Triton specializes an integer argument (of 32 bits) on: equal to 1, a multiple of 16."""
    return v == 1, v % 16 == 0
