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


_PROPS: dict[int, tuple[int, tuple[int, int]]] = {}


def _cuda_props(device) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability) of a CUDA device, looked up once (the property query costs
    microseconds, and the launchers ask on every call)."""
    import torch

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        p = torch.cuda.get_device_properties(idx)
        _PROPS[idx] = (p.multi_processor_count, (p.major, p.minor))
    return _PROPS[idx]


def cuda_sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _cuda_props(device)[0]


def cuda_capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (cached)."""
    return _cuda_props(device)[1]
