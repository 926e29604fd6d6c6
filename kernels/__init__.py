"""Triton kernels, imported as `lmq.kernels` (see pyproject.toml's package-dir).

One file per op: docstring (math, shapes, the packed layout read), the `@triton.jit` kernel, the
launcher (validate, allocate, launch), and the plain-PyTorch `_ref` twin.
"""
