"""What lmq's Gluon kernels share when the installed Triton cannot build them.

Gluon is Triton's experimental dialect and its API moves between releases. A kernel written in it
(`w4a16_gemm_ws`, `w4a16_gemm_direct`, `attention_decode_mma`) keeps a `BuildGuard`: the first launch that fails to build
records why and warns once, every later call is refused at once with `KernelUnavailable`, and the
caller takes its Triton (or cuBLAS) path instead.
"""

from __future__ import annotations

import warnings

from triton.compiler.errors import CompilationError
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.runtime.errors import PTXASError

from lmq.errors import UnsupportedError

# what a Triton whose Gluon API moved raises at the first launch; a lowering pass that fails (a layout or
# an op this release handles differently) raises a plain RuntimeError from the pass manager instead
BUILD_ERRORS = (CompilationError, PTXASError)
_PASS_FAILURE = "PassManager::run failed"


class KernelUnavailable(UnsupportedError):
    """This Triton cannot build the kernel: the caller takes its other path."""


class BuildGuard:
    """One Gluon kernel's build state. `failed` is why its build failed (None until then)."""

    def __init__(self, name: str, fallback: str):
        self.name, self.fallback = name, fallback  # for the warning: the kernel, and what runs instead
        self.failed: str | None = None

    def check(self) -> None:
        """Refuse at once once a build has failed."""
        if self.failed is not None:
            raise KernelUnavailable(f"{self.name} does not build with this Triton: {self.failed}")

    def launch(self, fn) -> None:
        """Run `fn` (the kernel's launch): a build failure is recorded, warned once and raised as KernelUnavailable;
        any other error is raised as it is."""
        try:
            fn()
        except Exception as e:
            unavailable = self.failure(e, stacklevel=4)
            if unavailable is None:
                raise
            raise unavailable from e

    def failure(self, e: BaseException, stacklevel: int = 3) -> KernelUnavailable | None:
        """For an exception from a launch: if it is a build failure, record it, warn once and return the
        KernelUnavailable to raise; None for anything else (a CUDA error at launch is not a build failure)."""
        if not (isinstance(e, BUILD_ERRORS) or (isinstance(e, RuntimeError) and _PASS_FAILURE in str(e))):
            return None
        text = str(e).strip()
        self.failed = f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"
        warnings.warn(f"lmq: {self.name} does not build with this Triton ({self.failed}); {self.fallback}",
                      RuntimeWarning, stacklevel=stacklevel)
        return KernelUnavailable(f"{self.name} does not build with this Triton: {self.failed}")


# Programmatic dependent launch (lmq.kernels.pdl) from Gluon, which has no wrapper for these instructions.
@gluon.jit
def gdc_wait():
    """Wait until the kernels this one was launched early after have finished and their writes are visible."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gdc_launch_dependents():
    """Let the next kernel, if launched with PDL, launch before this one ends (it waits before its reads)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)
