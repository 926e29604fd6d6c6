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
    if not torch.cuda.is_available():  # the stand-in kernels take any stream and device
        monkeypatch.setattr(launch, "current_stream", lambda device: 7)
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


def test_a_triton_release_of_another_calling_convention_always_launches_through_triton(monkeypatch):
    monkeypatch.setattr(launch, "_CONVENTION", False)  # not one of KNOWN_TRITON
    k = _Kernel()
    d = launch.DirectLaunch(k)
    x = torch.zeros(64)
    for _ in range(3):
        d[(4,)](x, 32, 0.5, BLOCK=16)
    d((4,), ("kind",), {"x_ptr": x, "n": 32, "scale": 0.5, "BLOCK": 16})
    assert [e[0] for e in k.log] == ["triton"] * 4 and not d.compiled


def test_the_device_and_tritons_switches_are_part_of_the_kind(monkeypatch):
    k = _Kernel()
    d = launch.DirectLaunch(k)
    x = torch.zeros(64)
    d[(4,)](x, 32, 0.5, BLOCK=16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # another GPU: another compiled kernel
    d[(4,)](x, 32, 0.5, BLOCK=16)
    monkeypatch.setattr(launch.knobs.runtime, "debug", not launch.knobs.runtime.debug)  # TRITON_DEBUG flipped
    d[(4,)](x, 32, 0.5, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton"] * 3


def test_arguments_without_a_key_launch_through_triton():
    k = _Kernel()
    d = launch.DirectLaunch(k)
    for _ in range(2):
        d[(4,)](torch.zeros(64), 32, object(), BLOCK=16)  # an argument type _spec does not know
    assert [e[0] for e in k.log] == ["triton", "triton"]


def test_keys_are_no_coarser_than_tritons_specialization():
    """Two arguments with one `_spec` get one specialization from Triton (native_specialize_impl, as Triton's
    binder calls it), over integers around every boundary, bools, floats, None, tensors and tuples."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    base = torch.zeros(64)
    values = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**63 - 16,
              2**63 - 1, 2**63, 2**64 - 16, -(2**31), -(2**31) - 16, True, False, 0.5, 1.0, None,
              base, base[4:], base[1:], base[2:], base.half(), base.half()[8:], base.half()[1:], base.int(),
              (1, 16), (2, 16), (1, 17), (16, 16)]
    seen: dict = {}
    for v in values:
        seen.setdefault(launch._spec(v), set()).add(repr(native_specialize_impl(BaseBackend, v, False, True, True)))
    assert all(len(kinds) == 1 for kinds in seen.values()), seen


def test_the_interpreter_always_launches_through_triton():
    k = _Kernel()
    k.params = None  # the interpreter's kernels keep no parameter record
    d = launch.DirectLaunch(k)
    for _ in range(2):
        d[(1,)](torch.zeros(4), 32, 0.5, BLOCK=16)
        d((1,), ("kind",), {"x_ptr": torch.zeros(4), "n": 32, "scale": 0.5, "BLOCK": 16})
    assert [e[0] for e in k.log] == ["triton"] * 4


@pytest.mark.gpu
def test_direct_launches_give_tritons_bits_gpu(monkeypatch):
    """RMSNorm (with and without a residual), SiLU*mul and RoPE, launched directly and through Triton, on shapes
    and views whose kinds differ (rows, widths, a view 2 bytes off 16): the same bits, and the direct call taken."""
    from lmq.kernels import rmsnorm, rope, silu_mul

    torch.manual_seed(0)
    cases = []
    for T, D in ((1, 576), (17, 4096), (64, 4096)):
        x = torch.randn(T * D + 1, device="cuda", dtype=torch.float16)
        for xv in (x[:-1].view(T, D), x[1:].view(T, D)):
            w, r = torch.randn(D, device="cuda", dtype=torch.float16), torch.randn(T, D, device="cuda").half()
            cases.append(lambda xv=xv, w=w: rmsnorm.rms_norm(xv, w, 1e-5))
            cases.append(lambda xv=xv, w=w, r=r: rmsnorm.rms_norm(xv, w, 1e-5, r.clone()))
        gu = torch.randn(T, 2 * D, device="cuda", dtype=torch.float16)
        cases.append(lambda gu=gu: silu_mul.silu_mul(gu))
        q, k = torch.randn(T, 32, 128, device="cuda").half(), torch.randn(T, 8, 128, device="cuda").half()
        pos = torch.arange(T, device="cuda", dtype=torch.int32) * 3
        cos, sin = torch.randn(4096, 64, device="cuda"), torch.randn(4096, 64, device="cuda")
        cases.append(lambda q=q, k=k, pos=pos, cos=cos, sin=sin: rope.apply_rope(q.clone(), k.clone(), pos, cos, sin))
    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    want = [case() for case in cases]
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    for _ in range(2):
        for case, w in zip(cases, want):
            got = case()
            for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, w))):
                assert torch.equal(a, b)
    assert rmsnorm._RMSNORM.compiled and silu_mul._SILU_MUL.compiled and rope._ROPE.compiled


def test_plan_cache_keeps_a_plan_per_key_and_config_object():
    """`PlanCache`: the same key and config object give the kept plan without `make`; another dict (even equal)
    its own; an error from `make` is not kept; past its limit it starts over."""
    from lmq.kernels.launch import PlanCache

    cache, made = PlanCache(limit=2), []

    def make(v):
        made.append(v)
        return v

    cfg = {"BLOCK_N": 64}
    assert cache.get((1, 2), cfg, lambda: make("a")) == "a"
    assert cache.get((1, 2), cfg, lambda: make("b")) == "a" and made == ["a"]
    assert cache.get((1, 2), dict(cfg), lambda: make("c")) == "c"  # another object
    assert cache.get((1, 3), cfg, lambda: make("d")) == "d"
    with pytest.raises(ValueError):
        cache.get((9,), cfg, lambda: (_ for _ in ()).throw(ValueError("bad config")))
    assert cache.get((9,), cfg, lambda: make("e")) == "e"  # the error was not kept; the limit cleared the rest
    assert cache.get((1, 2), cfg, lambda: make("f")) == "f" and made == ["a", "c", "d", "e", "f"]
