"""lmq.kernels.launch.DirectLaunch on a stand-in kernel (no GPU): which launches go through Triton, which call
the compiled kernel directly, and what a different kind of launch is."""

import pytest
import torch
from lmq.kernels import launch


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _Compiled:
    packed_metadata, function = "meta", "fn"

    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        if self.fail:
            raise TypeError("takes 9 positional arguments")
        self.log.append(("direct", args[:3], args[9:]))


class _Kernel:
    """Parameters x_ptr, n, scale, BLOCK (constexpr); `kernel[grid](...)` logs a launch through Triton."""

    def __init__(self, fail=False):
        self.log, self.fail = [], fail
        self.arg_names = ["x_ptr", "n", "scale", "BLOCK"]
        self.params = [_Param("x_ptr", False), _Param("n", False), _Param("scale", False), _Param("BLOCK", True)]

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return _Compiled(self.log, self.fail)
        return run


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch):
    monkeypatch.setattr(launch, "_raw_stream", lambda index: 7)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)


def test_direct_after_the_first_launch_of_a_kind():
    k = _Kernel()
    d = launch.DirectLaunch(k)
    x = torch.zeros(64)
    d[(4,)](x, 32, 0.5, BLOCK=16, num_warps=4)
    d[(4,)](x, 48, 0.25, BLOCK=16, num_warps=4)  # n still a multiple of 16, another float: the same kind
    d[(2, 3)](x[4:], 48, 0.25, BLOCK=16, num_warps=4)  # x 16 bytes in: still aligned
    assert [e[0] for e in k.log] == ["triton", "direct", "direct"]
    assert k.log[1][1:] == ((4, 1, 1), (x, 48, 0.25, 16)) and k.log[2][1] == (2, 3, 1)
    for args, kwargs in (((x, 33, 0.5), {"BLOCK": 16, "num_warps": 4}),  # n not a multiple of 16
                         ((x, 1, 0.5), {"BLOCK": 16, "num_warps": 4}),  # n == 1
                         ((x[1:], 32, 0.5), {"BLOCK": 16, "num_warps": 4}),  # x 4 bytes off 16
                         ((x.half(), 32, 0.5), {"BLOCK": 16, "num_warps": 4}),  # another dtype
                         ((x, 32, 0.5), {"BLOCK": 32, "num_warps": 4}),  # another constexpr
                         ((x, 32, 0.5), {"BLOCK": 16, "num_warps": 8})):  # another launch option
        n = len(k.log)
        d[(4,)](*args, **kwargs)
        assert k.log[n][0] == "triton", (args, kwargs)
    assert len(d.compiled) == 7


def test_caller_keys_and_fallbacks(monkeypatch):
    k = _Kernel()
    d = launch.DirectLaunch(k)
    x = torch.zeros(64)
    args = {"x_ptr": x, "n": 32, "scale": 0.5, "BLOCK": 16}
    d((4,), ("kind",), args, num_warps=4)
    d((4,), ("kind",), args, num_warps=4)
    assert [e[0] for e in k.log] == ["triton", "direct"]
    d[(4,)](x, 32, 0.5)  # BLOCK left to a default: always through Triton
    d[(4,)](x, 32, 0.5)
    assert [e[0] for e in k.log[2:]] == ["triton", "triton"]
    monkeypatch.setattr(launch, "FAST_LAUNCH", False)  # LMQ_FAST_LAUNCH=0
    d((4,), ("kind",), args, num_warps=4)
    assert k.log[-1][0] == "triton"


def test_a_triton_with_another_calling_convention_falls_back_for_good():
    k = _Kernel(fail=True)
    d = launch.DirectLaunch(k)
    x = torch.zeros(64)
    for _ in range(3):
        d[(4,)](x, 32, 0.5, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton", "triton", "triton"]  # the failed direct call fell back
    assert "positional" in d.broken


def test_the_interpreter_always_launches_through_triton():
    k = _Kernel()
    k.params = None  # the interpreter's kernels keep no parameter record
    d = launch.DirectLaunch(k)
    for _ in range(2):
        d[(1,)](torch.zeros(4), 32, 0.5, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton", "triton"]
