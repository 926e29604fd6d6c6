"""Triton kernels, imported as `lmq.kernels` (see pyproject.toml's package-dir).

One file per op: docstring (math, shapes, the packed layout read), the `@triton.jit` kernel, the
launcher (validate, allocate, launch), and the plain-PyTorch `_ref` twin.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host ints. (triton.cdiv is a constexpr_function: called from
    Python it goes through the JIT's call path, microseconds per call on every launch.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host ints (see `cdiv`)."""
    return 1 << (n - 1).bit_length()
