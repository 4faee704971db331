"""The compiled autograd node (batchnorm.native) against the Python autograd Function path
(BATCHNORM_NATIVE=0) and against backend='torch': outputs, gradients, running statistics,
inference, and what it must refuse or fall back from."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import batchnorm
from batchnorm import functional as F
from batchnorm import kernels as K
from batchnorm import native

NODE = "CppNode"  # torch's name for a C++ autograd Function's node


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    if not native.enabled():
        pytest.skip("BATCHNORM_NATIVE=0: the node is turned off in this run")
    if native.load() is None:
        pytest.skip("the native node could not be built here (see the warning)")


def _step(
    x: torch.Tensor, layout: str | None, axis: int, affine: tuple[bool, bool], dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """One training step and one inference call through the functional API; every result."""
    C = x.shape[axis]
    gen = torch.Generator().manual_seed(1)
    w = torch.linspace(0.5, 1.5, C, dtype=dtype).requires_grad_(True) if affine[0] else None
    b = torch.linspace(-1, 1, C, dtype=dtype).requires_grad_(True) if affine[1] else None
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    nbt = torch.tensor(0)
    xg = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
    y, updated = F.batch_norm_step(xg, rm, rv, w, b, 0.3, axis=axis, num_batches_tracked=nbt)
    dy = torch.randn(y.shape, generator=gen, dtype=dtype)
    y.backward(dy)
    ye = F.batch_norm_eval(x, rm, rv, w, b, axis=axis)
    grads = [t.grad for t in (xg, w, b) if t is not None]
    assert updated
    return (
        y.detach(),
        *grads,
        rm,
        rv,
        nbt,
        ye,
        torch.tensor(y.stride()),
        torch.tensor(ye.stride()),
    )


CASES = [
    ((60, 100), None, 1),
    ((7, 3), None, 1),
    ((5, 4, 9), None, 1),
    ((3, 4, 5, 6), None, 1),
    ((3, 4, 5, 6), "cl", 1),
    ((2, 3, 2, 4, 5), "cl3d", 1),
    ((4, 7, 5), None, -1),
    ((2, 3, 600), None, 1),  # long rows: a channel at a time
    # above SERIAL_BELOW: threads, on each work split the kernels use
    ((4096, 24), None, 1),  # (M, C) row blocks
    ((8, 32, 16, 16), "cl", 1),  # (M, C) from channels_last
    ((2, 8, 4, 1024), None, 1),  # (N, C, L) a channel per task
    ((64, 16, 7, 7), None, 1),  # (N, C, L) pieces of whole short rows
    ((3, 5, 4096), None, 1),  # (N, C, L) long rows cut between threads
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("shape,layout,axis", CASES)
def test_node_matches_the_function_path_and_torch(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    layout: str | None,
    axis: int,
    affine: tuple[bool, bool],
    dtype: torch.dtype,
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3 + 2
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "cl3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    node = _step(x, layout, axis, affine, dtype)
    monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    function = _step(x, layout, axis, affine, dtype)
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    oracle = _step(x, layout, axis, affine, dtype)
    # float32: dγ sums up to 10^5 products (torch backend: one pairwise sum, ours: blocks)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    assert len(node) == len(function) == len(oracle)
    for a, f, t in zip(node, function, oracle):
        torch.testing.assert_close(a, f, rtol=0, atol=0)  # the same loops: the same bits
        torch.testing.assert_close(a, t, **tol)


@contextlib.contextmanager
def _native(on: bool) -> Iterator[None]:
    """BATCHNORM_NATIVE unset (node on) or "0" (off) inside, as it was after (for hypothesis
    tests, which cannot take the function-scoped monkeypatch fixture)."""
    before = os.environ.pop("BATCHNORM_NATIVE", None)
    if not on:
        os.environ["BATCHNORM_NATIVE"] = "0"
    try:
        yield
    finally:
        os.environ.pop("BATCHNORM_NATIVE", None)
        if before is not None:
            os.environ["BATCHNORM_NATIVE"] = before


def _grad_fn_name(x: torch.Tensor, **kw: object) -> str:
    y, _, _, _ = F.batch_norm_train(x.requires_grad_(True), **kw)  # type: ignore[arg-type]
    assert y.grad_fn is not None
    return y.grad_fn.name()


def test_node_takes_dense_float_inputs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    assert NODE in _grad_fn_name(torch.randn(60, 100))
    assert NODE in _grad_fn_name(torch.randn(8, 4, 5, 5).to(memory_format=torch.channels_last))
    assert NODE in _grad_fn_name(torch.randn(8, 4, 5, 5, dtype=torch.float64))
    assert NODE in _grad_fn_name(torch.randn(K.SERIAL_BELOW // 8 + 1, 8))  # threads
    # half inputs, inputs that must be copied to a canonical layout, weights of another
    # dtype: the autograd Function
    assert NODE not in _grad_fn_name(torch.randn(6, 4).half(), backend="numba")
    strided = torch.randn(6, 8, 5)[:, ::2]  # channels neither contiguous nor innermost
    assert NODE not in _grad_fn_name(strided)
    assert NODE not in _grad_fn_name(torch.randn(6, 4), weight=torch.ones(4, dtype=torch.float64))
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    assert NODE not in _grad_fn_name(torch.randn(60, 100))
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    assert NODE not in _grad_fn_name(torch.randn(60, 100))


def test_node_refuses_a_saved_input_changed_in_place() -> None:
    x = torch.randn(6, 4, requires_grad=True)
    h = x * 1.0
    y, _, _, _ = F.batch_norm_train(h)
    assert y.grad_fn is not None and NODE in y.grad_fn.name()
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_node_gradient_for_odd_upstream_layouts() -> None:
    """dy broadcast from a sum, or in another memory layout than x: copied once to x's."""
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    xt = x.clone().requires_grad_(True)
    xn = x.clone().requires_grad_(True)
    w = torch.rand(3, requires_grad=True)
    dy = torch.randn(4, 3, 5, 5)  # contiguous, x channels_last
    for loss in (lambda y: y.sum(), lambda y: (y * dy).sum(), lambda y: (y**2).sum()):
        yn = batchnorm.functional.batch_norm(xn, None, None, w, training=True)
        yt = torch.nn.functional.batch_norm(xt, None, None, w, training=True)
        assert yn.grad_fn is not None and NODE in yn.grad_fn.name()
        gn = torch.autograd.grad(loss(yn), (xn, w))
        gt = torch.autograd.grad(loss(yt), (xt, w))
        for a, t in zip(gn, gt):
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4)


def test_node_gradients_only_where_asked() -> None:
    x = torch.randn(10, 4)
    w = torch.rand(4, requires_grad=True)
    b = torch.randn(4)  # frozen bias, input without grad
    y = F.batch_norm(x, None, None, w, b, training=True)
    assert y.grad_fn is not None and NODE in y.grad_fn.name()
    y.sum().backward(retain_graph=True)
    assert w.grad is not None and b.grad is None and x.grad is None
    (gw,) = torch.autograd.grad((y * y).sum(), (w,))
    yt = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
    (gt,) = torch.autograd.grad((yt * yt).sum(), (w,))
    torch.testing.assert_close(gw, gt)


def test_failed_build_falls_back_to_the_function_path_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.utils import cpp_extension

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise OSError("g++: not found")

    monkeypatch.setitem(native._state, "tried", False)
    monkeypatch.setitem(native._state, "ext", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    x = torch.randn(60, 100)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(OSError: g\+\+: not found\)"):
        y1, *_ = F.batch_norm_train(x.clone().requires_grad_(True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        y2, *_ = F.batch_norm_train(x.clone().requires_grad_(True))
    assert y1.grad_fn is not None and "BatchNormFunction" in y1.grad_fn.name()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(y1, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_node_stays_out_of_jit_traces() -> None:
    """torch.jit.trace records torch operations only: a call it cannot see must not be made
    while tracing (the trace would replay a constant)."""
    seen = []

    def f(x: torch.Tensor) -> torch.Tensor:
        be = F.get_backend(x, "numba")
        seen.append(be.train_node(x, 1, None, None, 1e-5, None))
        seen.append(be.eval_node(x, 1, torch.zeros(4), torch.ones(4), None, None, 1e-5))
        return x * 2

    torch.jit.trace(f, torch.randn(6, 4), check_trace=False)  # one run, while tracing
    assert seen == [None, None]
    m = batchnorm.BatchNorm1d(4).eval()
    m.running_mean.fill_(3.0)
    traced = torch.jit.trace(m, torch.randn(6, 4), check_trace=False)
    x2 = torch.randn(6, 4) * 5 + 3
    torch.testing.assert_close(traced(x2), m(x2))


def _step_on_both_paths(
    x: torch.Tensor,
    dy: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    buffers: torch.dtype,
    evaluate: bool = False,
    **kw: object,
) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """A training step (momentum 0.2) and its backward with the node on, then off: per path
    the output's grad_fn name and (y, dx, dγ, dβ, running mean, running var, y's strides),
    with ``evaluate`` also an inference from the updated buffers."""
    out = []
    for native_on in (True, False):
        with _native(native_on):
            c = w0.shape[0]
            w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
            rm, rv = torch.zeros(c, dtype=buffers), torch.ones(c, dtype=buffers)
            xg = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
            y, updated = F.batch_norm_step(xg, rm, rv, w, b, 0.2, **kw)  # type: ignore[arg-type]
            assert updated and y.grad_fn is not None
            name = y.grad_fn.name()
            y.backward(dy)
            got = [y.detach(), xg.grad, w.grad, b.grad, rm, rv, torch.tensor(y.stride())]
            if evaluate:
                got.append(F.batch_norm_eval(x, rm, rv, w0, b0))
            out.append((name, tuple(t for t in got if t is not None)))
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    c=st.integers(1, 24),
    l=st.sampled_from([0, 1, 2, 7, 49, 511, 512, 700, 1500]),
    channels_last=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_node_equals_the_function_path_on_random_shapes(
    n: int, c: int, l: int, channels_last: bool, double: bool, seed: int
) -> None:
    """Any shape, either layout, one thread or more: the node and the Function path give the
    same bits (output, gradients, running statistics)."""
    shape = (n, c) if l == 0 else (n, c, l)  # up to 1.4M values: threads above SERIAL_BELOW
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 4 - 1
    if channels_last and x.dim() == 3:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost: (M, C)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    w0 = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    b0 = torch.randn(c, generator=gen, dtype=dtype)
    (on_name, on), (off_name, off) = _step_on_both_paths(x, dy, w0, b0, dtype, backend="numba")
    assert NODE in on_name and NODE not in off_name
    for a, f in zip(on, off, strict=True):
        torch.testing.assert_close(a, f, rtol=0, atol=0)


def test_node_under_inference_mode_and_anomaly_detection() -> None:
    ours, theirs = batchnorm.BatchNorm1d(5), torch.nn.BatchNorm1d(5)
    with torch.inference_mode():
        x = torch.randn(8, 5) * 3 + 1
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        ours.eval()
        theirs.eval()
        torch.testing.assert_close(ours(x), theirs(x))
    ours.train()
    xg = torch.randn(8, 5, requires_grad=True)
    with torch.autograd.detect_anomaly():
        y = ours(xg)
        assert y.grad_fn is not None and NODE in y.grad_fn.name()
        y.pow(2).sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())


def _strides(t: torch.Tensor) -> list[int]:
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    axis_pick=st.integers(0, 9),
    order_seed=st.integers(0, 2**16),
)
def test_node_takes_exactly_the_layouts_viewed_without_a_copy(
    shape: list[int], axis_pick: int, order_seed: int
) -> None:
    """The node derives (N, C, L) from the input as it comes: it must take the input exactly
    when canonical_layout views it without a copy, and then give the Function path's bits."""
    nd = len(shape)
    axis = axis_pick % nd - (nd if axis_pick % 2 else 0)  # either sign
    gen = torch.Generator().manual_seed(order_seed)
    order = torch.randperm(nd, generator=gen).tolist()  # a random memory order of the axes
    base = torch.randn([shape[i] for i in order], generator=gen, dtype=torch.float64)
    x = base.permute([order.index(i) for i in range(nd)])  # shape `shape`, strides permuted
    assume(x.numel() // x.shape[axis] >= 2)  # training needs two values per channel
    xc, _ = F.canonical_layout(x, axis)
    viewed = xc.data_ptr() == x.data_ptr()
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    results = []
    for native_on in (True, False):
        with _native(native_on):
            xg = x.detach().requires_grad_(True)
            y, *_ = F.batch_norm_train(xg, axis=axis, backend="numba")
            assert y.grad_fn is not None
            assert (NODE in y.grad_fn.name()) == (native_on and viewed), (shape, axis, order)
            y.backward(dy)
            c = x.shape[axis]
            ye = F.batch_norm_eval(
                x, torch.full((c,), 0.5, dtype=x.dtype), torch.ones(c, dtype=x.dtype), axis=axis
            )
            if viewed:  # the input's memory order (the strides of size-1 axes mean nothing)
                assert _strides(y) == _strides(x) and _strides(ye) == _strides(x)
            results.append((y.detach(), xg.grad, ye))
    for a, f in zip(*results):
        torch.testing.assert_close(a, f, rtol=0, atol=0)


def test_large_outputs_are_reused_only_once_dropped() -> None:
    """The node's outputs of REUSE_ABOVE bytes or more come from its cache, but never while a
    tensor or a view holds them; a reused output can be resized like any torch output."""
    from batchnorm import backend_numba as B

    ext = native.load()
    x = torch.randn(64, 8, 1024)  # 2 MiB
    assert x.numel() * 4 >= B.REUSE_ABOVE
    rm, rv = torch.zeros(8), torch.ones(8)

    def infer(t: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm_eval(t, rm, rv)
        assert y is not None
        return y

    y1 = infer(x)
    assert y1.data_ptr() % K.LINE_BYTES == 0  # whole lines for the streaming stores
    kept = y1.clone()
    y2 = infer(x * 2)
    assert y2.data_ptr() != y1.data_ptr()
    view, ptr2 = y2[:, :1], y2.data_ptr()
    del y2
    y3 = infer(x - 3)
    assert y3.data_ptr() not in (ptr2, y1.data_ptr())  # a view still holds y2's memory
    del view
    y4 = infer(x)
    assert y4.data_ptr() == ptr2  # dropped: reused
    torch.testing.assert_close(y4, x / (1 + 1e-5) ** 0.5)
    torch.testing.assert_close(y1, kept)  # live outputs were never written over
    held = ext.cached_outputs()
    infer(torch.randn(4, 8, 16))
    assert ext.cached_outputs() == held  # small outputs come from torch's allocator
    y4.resize_(2 * x.numel())  # a reused output is resizable (it moves to torch's memory)
    y4[-1] = 1.0
    del y4
    # memory that moved is no longer the cache's: the next large output forgets its entry (an
    # output of a size nothing else has adds one entry, so the count stays). Not the address:
    # the moved memory is free again, and malloc may well hand it to the new output.
    odd = torch.randn(64, 8, 1031)
    y5 = infer(odd)
    assert ext.cached_outputs() == held
    torch.testing.assert_close(y5, odd / (1 + 1e-5) ** 0.5)


def test_the_most_recently_used_free_output_is_reused_first() -> None:
    """Of several free cached outputs of the size asked for, the one handed out last: the
    likeliest still in the processor's caches (what malloc's reuse of the chunk just freed
    gives torch's outputs). The cache then stays at the buffers it has."""
    ext = native.load()
    x = torch.randn(64, 8, 1024)  # 2 MiB
    rm, rv = torch.zeros(8), torch.ones(8)
    first = F.batch_norm_eval(x, rm, rv)
    second = F.batch_norm_eval(x, rm, rv)  # the first is held: another buffer
    ptrs = (first.data_ptr(), second.data_ptr())
    assert ptrs[0] != ptrs[1]
    del first, second
    held = ext.cached_outputs()
    for _ in range(3):
        assert F.batch_norm_eval(x, rm, rv).data_ptr() == ptrs[1]
    assert ext.cached_outputs() == held


def test_backward_recorded_before_a_fork_runs_in_the_child() -> None:
    """OpenMP's pool does not survive fork(): a threaded node's backward run in a forked
    child must not start the parent's threads (it runs on one thread, same gradients)."""
    import multiprocessing as mp
    import sys

    if sys.platform != "linux":
        pytest.skip("fork start method")
    x = (torch.randn(4096, 24, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    assert x.numel() >= K.SERIAL_BELOW  # threaded
    y, *_ = F.batch_norm_train(x)
    assert y.grad_fn is not None and NODE in y.grad_fn.name()
    dy = torch.randn(x.shape, dtype=torch.float64)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        (gx,) = torch.autograd.grad(y, x, dy)
        child.send(gx.numpy())

    p = ctx.Process(target=run)
    p.start()
    got = parent.recv() if parent.poll(60) else None
    p.join(30)
    assert p.exitcode == 0 and got is not None
    (expected,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-12, atol=1e-12)


def test_node_from_several_python_threads_at_once() -> None:
    """The threaded loops run without the GIL and the output cache is shared: calls from
    several Python threads at once give what the same calls give one after another."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(64, 8, 1024, generator=gen) * (i + 1) + i for i in range(8)]  # 2 MiB

    def work(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xg = x.clone().requires_grad_(True)
        y, mean, var, _ = F.batch_norm_train(xg)
        y.backward(torch.cos(x))
        ye = F.batch_norm_eval(x, mean, var)
        assert xg.grad is not None
        return y.detach().clone(), xg.grad.clone(), ye.clone()

    alone = [work(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(work, xs * 3))
    for i, got in enumerate(together):
        for a, b in zip(got, alone[i % len(xs)]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


_LAZY = r"""
import sys
import torch
from batchnorm import functional as F
from batchnorm.kernels import _entries

from batchnorm import kernels

kernels.NOTICE_AFTER = float(sys.argv[1])
# a float32 convolutional layer: (N, C, L) training entries, then inference
x = torch.randn(8, 4, 6, 6, requires_grad=True)
rm, rv = torch.zeros(4), torch.ones(4)
y, _ = F.batch_norm_step(x, rm, rv, None, None, 0.1)
assert "CppNode" in y.grad_fn.name()
print("forward", _entries.built(), flush=True)
y.backward(torch.cos(y.detach()))
print("backward", _entries.built(), flush=True)
F.batch_norm_eval(x.detach(), rm, rv)
print("eval", _entries.built(), flush=True)
# a forward on (N, C, L) whose saved input comes back channels_last: the backward needs the
# rows x channels entry, resolved on the autograd engine's side (without the GIL held)
x2 = torch.randn(8, 4, 6, 6, dtype=torch.float64, requires_grad=True)
with torch.autograd.graph.saved_tensors_hooks(
    lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t,
    lambda t: t,
):
    y2, *_ = F.batch_norm_train(x2)
y2.backward(torch.sin(y2.detach()))
x3 = x2.detach().clone().requires_grad_(True)
F.batch_norm_train(x3, backend="torch")[0].backward(torch.sin(y2.detach()))
torch.testing.assert_close(x2.grad, x3.grad, rtol=1e-10, atol=1e-10)
print("hooks", _entries.built(), flush=True)
"""


def _lazy_run(notice_after: float) -> tuple[list[str], str]:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("BATCHNORM_BACKEND",)}
    r = subprocess.run(
        [sys.executable, "-c", _LAZY, str(notice_after)],
        capture_output=True, text=True, timeout=1500, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines(), r.stderr


def test_a_process_compiles_only_the_entries_its_inputs_need() -> None:
    """Each loop takes seconds to compile and all twelve entries minutes: the node asks for an
    entry (dtype × layout × pass) the first time a call needs it, also from a backward that
    the autograd engine runs, where the saved input came back in the other layout."""
    lines, _ = _lazy_run(60.0)
    f32_ncl = [(0, 1, 0)]
    assert lines[0] == f"forward {f32_ncl}"
    assert lines[1] == f"backward {[(0, 1, 0), (0, 1, 1)]}"
    assert lines[2] == f"eval {[(0, 1, 0), (0, 1, 1), (0, 1, 2)]}"
    # float64: the (N, C, L) forward, and the rows × channels backward for channels_last
    assert lines[3] == f"hooks {[(0, 1, 0), (0, 1, 1), (0, 1, 2), (1, 0, 1), (1, 1, 0)]}"


def test_an_entry_slow_to_load_is_announced_once() -> None:
    """Compiling an entry takes tens of seconds: past NOTICE_AFTER a line on stderr says what
    is being compiled (here with NOTICE_AFTER = 0, so that loading from the disk cache,
    which takes a moment too, is announced)."""
    _, err = _lazy_run(0.0)
    notices = [line for line in err.splitlines() if "compiling the" in line]
    assert (
        notices.count(
            "batchnorm: compiling the training kernels for float32 (N, C, L) inputs (once per "
            "machine, tens of seconds; cached on disk next to the package)"
        )
        == 1
    ), err
    assert sum("backward kernels for float64 rows × channels" in n for n in notices) == 1
    assert len(notices) == 5, notices


def test_an_entry_that_cannot_be_compiled_is_an_error_in_forward_and_backward() -> None:
    """Entries are resolved when first needed, also inside a backward run by the autograd
    engine: a resolver that fails there raises in the caller, naming why, and the node works
    again once a working resolver is back."""
    from batchnorm import backend_numba
    from batchnorm.kernels import _entries

    ext = native.load()
    assert ext is not None

    def broken(dtype: int, layout: int, pass_: int) -> int:
        raise RuntimeError(f"no compiler for entry {(dtype, layout, pass_)}")

    def install(resolve: Callable[[int, int, int], int]) -> None:
        ext.set_kernels(
            resolve,
            F.graph_backward,
            F.graph_backward_eval,
            backend_numba.REUSE_ABOVE,
            backend_numba._OUT.max_bytes,
        )

    x = torch.randn(16, 3, 5, requires_grad=True)
    try:
        install(broken)
        with pytest.raises(RuntimeError, match=r"no compiler for entry \(0, 1, 0\)"):
            F.batch_norm_train(x)
        install(_entries.address)
        y, *_ = F.batch_norm_train(x)
        install(broken)  # forgets the resolved entries: the backward must ask again
        with pytest.raises(RuntimeError, match=r"no compiler for entry \(0, 1, 1\)"):
            y.backward(torch.ones_like(y))
    finally:
        install(_entries.address)
    y, *_ = F.batch_norm_train(x)
    y.backward(torch.cos(y.detach()))
    expected = x.detach().clone().requires_grad_(True)
    yt, *_ = F.batch_norm_train(expected, backend="torch")
    yt.backward(torch.cos(yt.detach()))
    torch.testing.assert_close(x.grad, expected.grad)


def test_a_failed_compilation_names_the_entry_and_the_ways_around_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchnorm.kernels import _entries

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("LLVM ran out of memory")

    monkeypatch.setattr(_entries, "_BUILT", {})
    monkeypatch.setattr(_entries, "cfunc", fail)
    with pytest.raises(RuntimeError) as e:
        _entries.address(1, 0, 2)
    assert str(e.value).startswith(
        "batchnorm: the inference kernels for float64 rows × channels inputs could not be "
        "compiled (ValueError: LLVM ran out of memory)"
    )
    assert "BATCHNORM_NATIVE=0" in str(e.value) and "BATCHNORM_BACKEND=torch" in str(e.value)


def test_entries_are_cached_under_a_digest_of_the_loops_they_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Numba's disk cache checks only the cached function's own file: the entries' names carry
    a digest of the loop sources, so an edited loop is compiled anew, never loaded stale."""
    from pathlib import Path

    from batchnorm.kernels import _entries

    before = _entries._stamp()
    assert before == _entries._stamp()
    read = Path.read_bytes

    def edited(self: Path) -> bytes:
        return read(self) + (b"\n# edited" if self.name == "_loops.py" else b"")

    monkeypatch.setattr(Path, "read_bytes", edited)
    assert _entries._stamp() != before


def test_build_cache_name_is_per_checkout_and_source(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """torch's extension cache is keyed by name alone: the name follows the source file's
    place and contents and the compiler's flags, so two checkouts never rebuild each other's
    build, and a build with other flags is not taken for this one."""
    here = native._name()
    assert here == native._name() and here.startswith("batchnorm_native_")
    assert here.isidentifier()  # it is the module's name too
    copy = tmp_path / "native.cpp"
    copy.write_bytes(native._SOURCE.read_bytes())
    monkeypatch.setattr(native, "_SOURCE", copy)
    elsewhere = native._name()
    copy.write_bytes(copy.read_bytes() + b"\n// changed\n")
    changed = native._name()
    monkeypatch.setattr(native, "_CFLAGS", ("-O2",))
    assert len({here, elsewhere, changed, native._name()}) == 4


def test_node_refuses_tensors_without_readable_memory() -> None:
    """The node's own guard (Python routes these calls to torch operations first): a
    FakeTensor input or batched (vmap) weights or buffers make train/evaluate return None
    instead of reading through pointers that do not exist (a FakeTensor used to segfault)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import vmap

    ext = native.load()
    assert ext is not None
    x, w = torch.randn(8, 4, 5, 5), torch.ones(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        fake_w = mode.from_tensor(w)
    assert ext.train(fake, 1, w, None, None, None, None, 1, 1e-5, 0.0, 0.0) is None
    assert ext.train(x, 1, fake_w, None, None, None, None, 1, 1e-5, 0.0, 0.0) is None
    assert ext.evaluate(fake, 1, rm, rv, None, None, 1, 1e-5) is None
    seen: list[object] = []

    def member(wb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        seen.append(ext.evaluate(x, 1, mb, rv, wb, None, 1, 1e-5))
        seen.append(ext.train(x, 1, wb, None, None, None, None, 1, 1e-5, 0.0, 0.0))
        return wb.sum()

    vmap(member)(torch.ones(3, 4), torch.zeros(3, 4))
    assert seen == [None, None]


def test_node_backward_takes_batched_gradients() -> None:
    """A batched dy (is_grads_batched=True) reaches the node's backward: it recomputes with
    torch operations instead of reading dy's (absent) memory; the result is torch.nn's."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    y, _, _, _ = F.batch_norm_train(x, w)
    assert y.grad_fn is not None and NODE in y.grad_fn.name()
    eye = torch.eye(18, dtype=torch.float64).view(18, 6, 3)
    jx, jw = torch.autograd.grad(y, (x, w), eye, is_grads_batched=True)
    y_ref = torch.nn.functional.batch_norm(x, None, None, w, training=True)
    jx_ref, jw_ref = torch.autograd.grad(y_ref, (x, w), eye, is_grads_batched=True)
    torch.testing.assert_close(jx, jx_ref)
    torch.testing.assert_close(jw, jw_ref)


def _switches_take_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
    run: Callable[..., torch.Tensor],
    marker: torch.Tensor,
    calls: list[int],
) -> None:
    """Another backend by argument or environment, or the node turned off: no node call."""
    assert run(backend="torch") is not marker and calls == []
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    assert run() is not marker and calls == []
    monkeypatch.delenv("BATCHNORM_BACKEND")
    monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    assert run() is not marker and calls == []
    monkeypatch.delenv("BATCHNORM_NATIVE")


def test_inference_takes_the_node_directly_only_where_the_general_path_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The short inference path calls the node exactly when the general one would have chosen
    it: not with another backend asked for (argument or environment), not under jit.trace,
    and not when the node is off; when a graph is needed, the node's recorded inference
    (``evaluate_grad``), or, when that declines, the eval Function with the node's pass
    inside."""
    calls: list[int] = []
    marker = torch.full((2, 3), 7.0)
    recorded: list[torch.Tensor | None] = [None]  # what evaluate_grad answers

    class Ext:
        def evaluate(self, *args: object) -> torch.Tensor:
            calls.append(1)
            return marker

        def evaluate_grad(self, *args: object) -> torch.Tensor | None:
            calls.append(2)
            return recorded[0]

    monkeypatch.setattr(native, "_state", {"ext": Ext(), "tried": True})
    x = torch.randn(2, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.ones(3, requires_grad=True)

    def run(**kw: object) -> torch.Tensor:
        calls.clear()
        return F.batch_norm_eval(x, rm, rv, w, None, 1e-5, **kw)  # type: ignore[arg-type]

    with torch.no_grad():
        assert run() is marker and calls == [1]
        assert run(backend="numba") is marker and calls == [1]
        _switches_take_the_general_path(monkeypatch, run, marker, calls)
    marker = marker.clone()  # (the Function below marks its output as its own)
    y = run()  # grad enabled and γ requires grad: the node declines, the eval Function
    assert calls == [2, 1] and y.requires_grad
    assert type(y.grad_fn).__name__ == "BatchNormEvalFunctionBackward"
    recorded[0] = torch.ones(2, 3)
    assert run() is recorded[0] and calls == [2]  # the node takes it
    recorded[0] = None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        calls.clear()
        traced = torch.jit.trace(lambda t: F.batch_norm_eval(t, rm, rv), (x,), check_trace=False)
        assert calls == []  # tracing records torch operations, not a call of the node
        assert traced(x) is not marker


def test_training_step_takes_the_node_directly_only_where_the_general_path_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    marker = torch.full((4, 3), 7.0)

    class Ext:
        def train(self, *args: object) -> tuple[torch.Tensor, torch.Tensor, bool]:
            calls.append(1)
            return marker, torch.zeros(3, 3), True

    monkeypatch.setattr(native, "_state", {"ext": Ext(), "tried": True})
    x = torch.randn(4, 3)

    def run(**kw: object) -> torch.Tensor:
        calls.clear()
        y, _ = F.batch_norm_step(x, torch.zeros(3), torch.ones(3), **kw)  # type: ignore[arg-type]
        return y

    assert run() is marker and calls == [1]
    _switches_take_the_general_path(monkeypatch, run, marker, calls)
    with torch.autograd.forward_ad.dual_level():
        assert run() is not marker and calls == []


def test_compile_command_compiles_the_entries_asked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``batchnorm compile`` asks for each selected entry (dtype × layout × pass), in order,
    and prints one line per entry."""
    from batchnorm import cli
    from batchnorm.kernels import _entries

    asked: list[tuple[int, int, int]] = []
    monkeypatch.setattr(_entries, "address", lambda *key: asked.append(key) or 1)
    code = cli.main(
        ["compile", "--dtype", "float64", "--layout", "rows", "--pass", "train", "eval"]
    )
    assert code == 0
    assert asked == [(1, 0, 0), (1, 0, 2)]
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [
        "training kernels for float64 rows × channels inputs",
        "inference kernels for float64 rows × channels inputs",
    ]
    asked.clear()
    assert cli.main(["compile"]) == 0
    assert len(asked) == 16 and len(set(asked)) == 16  # every entry once (4 passes)


def test_compile_command_makes_the_entries_ready_in_a_fresh_process() -> None:
    """After ``batchnorm compile`` for one entry a process holds it: a first call needing it
    compiles nothing more."""
    import subprocess
    import sys

    code = (
        "from batchnorm import cli\n"
        "from batchnorm.kernels import _entries\n"
        "assert cli.main(['compile', '--dtype', 'float32', '--layout', 'channels', '--pass', "
        "'eval']) == 0\n"
        "print(_entries.built())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("inference kernels for float32 (N, C, L) inputs: ready (")
    assert lines[1] == "[(0, 1, 2)]"


def test_compile_command_without_the_node_compiles_the_function_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the node turned off the command says so and readies the Function path's loops
    (every loop, single- and multi-threaded) instead; exit 0, as nothing failed."""
    from batchnorm import cli

    monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    # count only what the command readies, not what earlier tests in this process loaded
    monkeypatch.setattr(K, "_DISPATCHERS", {})
    code = cli.main(["compile", "--dtype", "float64"])
    captured = capsys.readouterr()
    assert code == 0
    assert "the compiled node is turned off (BATCHNORM_NATIVE=0)" in captured.err
    assert captured.out.strip().startswith("22 loops of the Function path: ready")
    for name, parallel in K._DISPATCHERS:
        assert K._DISPATCHERS[(name, parallel)].overloads, (name, parallel)
    assert len(K._DISPATCHERS) == 22


def _eval_case(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    axis = -1 if layout == "axis-1" else 1
    C = shape[axis]
    rm = torch.linspace(-1, 1, C, dtype=dtype)
    rv = torch.linspace(0.5, 2.0, C, dtype=dtype)
    w = torch.linspace(0.5, 1.5, C, dtype=dtype)
    b = torch.linspace(-0.5, 0.5, C, dtype=dtype)
    return x, rm, rv, w, b, axis


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((60, 100), "contiguous"),
        ((8, 6, 5, 4), "contiguous"),
        ((8, 6, 5, 4), "channels_last"),
        ((4, 3, 40), "contiguous"),  # (N, C, L) loops
        ((5, 3, 7), "contiguous"),  # short rows: rows × channels loops on (N, C·L)
        ((3, 4, 6), "axis-1"),
    ],
)
def test_eval_mode_with_gradients_runs_in_the_node(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype
) -> None:
    """Inference with gradients (BN frozen in eval mode while the rest trains, input gradients
    of an evaluated model) is recorded by the node: one pass forward, one pass back in C++.
    Output and gradients in x, γ, β are those of torch operations on Algorithm 2, for every
    subset of the arguments that require them."""
    x0, rm, rv, w0, b0, axis = _eval_case(shape, layout, dtype)
    dy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for wants in [
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]:
        got = []
        for backend in ("numba", "torch"):
            x, w, b = (t.clone().requires_grad_(r) for t, r in zip((x0, w0, b0), wants))
            y = F.batch_norm_eval(x, rm, rv, w, b, 1e-3, axis=axis, backend=backend)
            if backend == "numba":
                assert y.grad_fn is not None and NODE in y.grad_fn.name(), y.grad_fn
                assert y.stride() == x0.stride()
            y.backward(dy)
            got.append([y.detach()] + [t.grad for t in (x, w, b)])
        for ours, theirs in zip(*got, strict=True):
            if theirs is None:
                assert ours is None
            else:
                assert ours is not None and ours.dtype == theirs.dtype
                torch.testing.assert_close(ours, theirs, **tol)


def test_eval_mode_node_gradcheck_and_graph_of_the_backward() -> None:
    """The node's first derivatives (gradcheck), and second ones: a graph of the backward
    (create_graph=True) is recomputed with torch operations (gradgradcheck). Running
    statistics that require gradients are left to the Python Function, which gives them."""
    for layout, shape in (("contiguous", (4, 3, 5)), ("channels_last", (2, 3, 2, 3))):
        x, rm, rv, w, b, axis = _eval_case(shape, layout, torch.float64)
        args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())

        def fn(
            x: torch.Tensor,
            w: torch.Tensor,
            b: torch.Tensor,
            rm: torch.Tensor = rm,
            rv: torch.Tensor = rv,
            axis: int = axis,
        ) -> torch.Tensor:
            return F.batch_norm_eval(x, rm, rv, w, b, 1e-3, axis=axis)

        assert NODE in fn(*args).grad_fn.name()
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
        y = F.batch_norm_eval(x, rm.requires_grad_(), rv, w, b, 1e-3, axis=axis)
        assert y.grad_fn is not None and "BatchNormEvalFunction" in y.grad_fn.name()
        rm.requires_grad_(False)


def test_eval_mode_node_backward_reads_what_a_saved_tensor_hook_returns() -> None:
    """A saved-tensor hook may hand x back in another layout (or offload and reload it): the
    backward reads x as it comes back (here channels_last, the rows × channels loops, dy
    brought to its layout), and the gradients are the same."""
    x, rm, rv, w, b, _ = _eval_case((4, 3, 5, 2), "contiguous", torch.float64)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for hook in (False, True):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()

        def pack(t: torch.Tensor, hook: bool = hook) -> torch.Tensor:
            if hook and t.dim() == 4:  # x (the vectors are saved too)
                return t.contiguous(memory_format=torch.channels_last)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = F.batch_norm_eval(xs, rm, rv, ws, b, 1e-3)
        assert NODE in y.grad_fn.name()
        y.backward(dy)
        grads.append((xs.grad, ws.grad))
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def _constant_arguments_to_loops(source: str) -> tuple[set[str], list[str]]:
    """Calls in ``_entries``' source that hand a loop (a ``kernel(...)`` dispatcher, or a
    layout helper that passes its arguments on to one) a literal constant."""
    import ast
    import re

    tree = ast.parse(source)
    loops = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for tgt in node.targets
        for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])
        if isinstance(t, ast.Name) and re.fullmatch(r"_(MC|NCL|FUSED)_[A-Z_]+", t.id)
    }
    loops |= {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and re.fullmatch(r"_b?(fwd|bwd|eval)_(mc|ncl)", node.name)
    }
    return loops, [
        f"{node.func.id}(…{ast.unparse(arg)}…) at line {node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in loops
        for arg in node.args
        if isinstance(arg, ast.Constant)
    ]


def test_the_entries_hand_the_loops_no_constants() -> None:
    """A constant argument (``1``, ``True``) makes Numba compile a literal-typed
    specialization of the loop for the entries alone — compile time the array API's build
    already paid — which LLVM also compiled slower for the ``(N, C, L)`` inference entry."""
    from pathlib import Path

    from batchnorm.kernels import _entries

    loops, constants = _constant_arguments_to_loops(Path(_entries.__file__).read_text())
    assert len(loops) == 28  # ten loops, serial and threaded, and the eight layout helpers
    assert constants == []
    # the check sees constants where they are
    _, seen = _constant_arguments_to_loops(
        "_MC_EVAL, _MC_EVAL_P = _pair('mc_forward_eval')\n_MC_EVAL(x, 1, True)\n"
    )
    assert seen == ["_MC_EVAL(…1…) at line 2", "_MC_EVAL(…True…) at line 2"]


def _settings_read(f: Callable[..., object], seen: set[str]) -> set[str]:
    """The module constants of :mod:`batchnorm.kernels` that ``f`` and the kernels functions
    it calls read (upper-case names)."""
    names: set[str] = set()
    for name in f.__code__.co_names:
        value = getattr(K, name, None)
        if name.isupper() and isinstance(value, int):
            names.add(name)
        elif callable(value) and getattr(value, "__module__", None) == K.__name__:
            if name not in seen:
                seen.add(name)
                names |= _settings_read(value, seen)
    return names


def test_the_entries_digest_holds_every_setting_their_helpers_read() -> None:
    """Numba freezes a global's value into what it compiles: a setting the entries' helpers
    read but their digest left out would let an entry compiled with, say,
    ``kernels.SHORT_ROWS = 0`` be loaded from the disk cache by every later process."""
    import numba

    from batchnorm.kernels import _entries

    helpers = [
        v.py_func
        for v in vars(_entries).values()
        if isinstance(v, numba.core.registry.CPUDispatcher) and v.py_func.__module__ == K.__name__
    ]
    assert {h.__name__ for h in helpers} == {
        "_fused",
        "_mc_split",
        "_short",
        "_stream_for",
        "_whole_rows",
        "_widen",
    }
    read: set[str] = set()
    for h in helpers:
        read |= _settings_read(h, set())
    assert read == set(_entries.TUNABLES)


@pytest.mark.parametrize(
    "name",
    [
        "SHORT_N_DIVISOR",
        "SHORT_ROWS",
        "STREAM_ABOVE",
        "LLC_BYTES",
        "TILE_BYTES",
        "WIDE_ROW_BYTES",
        "WIDE_MIN_ROWS",
        "PLAIN_WIDE_ROW_BYTES",
        "EVAL_WIDE_ROW_BYTES",
    ],
)
def test_the_entries_digest_changes_with_a_setting(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchnorm.kernels import _entries

    before = _entries._stamp()
    monkeypatch.setattr(K, name, getattr(K, name) + 1)
    assert _entries._stamp() != before
    monkeypatch.undo()
    assert _entries._stamp() == before


# -- half precision: torch's operator called from the node ----------------------------------

_HALF_LAYOUTS = {
    "2d": ((48, 6), None),
    "ncl": ((8, 6, 10), None),
    "nchw": ((8, 6, 5, 4), None),
    "channels_last": ((8, 6, 5, 4), torch.channels_last),
    "ncdhw": ((4, 6, 3, 4, 5), None),
    "channels_last_3d": ((4, 6, 3, 4, 5), torch.channels_last_3d),
}


def _half_run(
    dtype: torch.dtype, layout: str, buffers: torch.dtype | None, momentum: float | None
) -> list[torch.Tensor]:
    """Three training steps and an inference call of a layer on half input, each with a
    backward; every output, gradient, running buffer and the counter, and their strides."""
    shape, fmt = _HALF_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(5)
    bn = batchnorm.BatchNorm(
        6, momentum=momentum, unbiased_running_var=momentum is not None, dtype=buffers or dtype
    )
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, 6))
    out: list[torch.Tensor] = []
    for step in range(4):
        bn.train(step < 3)
        bn.zero_grad()
        x = (torch.randn(shape, generator=gen) * (step + 1) + 3.0).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_(True)
        y = bn(x)
        y.backward(torch.randn(shape, generator=gen).to(dtype))
        assert y.dtype == dtype and y.grad_fn is not None
        assert y.grad_fn.name() == "NativeBatchNormBackward0"  # torch's operator, no Function
        assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
        out += [y.detach(), x.grad, bn.weight.grad, bn.bias.grad]
        out += [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
        out += [torch.tensor(y.stride()), torch.tensor(x.grad.stride())]
    return out


@pytest.mark.parametrize("layout", list(_HALF_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("buffers", "momentum"),
    [(None, 0.1), (torch.float32, None), (torch.float64, 0.3)],
    ids=["half-buffers", "float32-cumulative", "float64-biased"],
)
def test_half_node_equals_the_python_path(
    dtype: torch.dtype,
    layout: str,
    buffers: torch.dtype | None,
    momentum: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half inputs in the node (torch's operator called from C++, the running update there):
    the same bits as the Python path of BATCHNORM_NATIVE=0 — outputs and their layout,
    gradients, running buffers of half, float32 or float64 (blended in float32 or float64 and
    rounded once) with the unbiased or the biased variance, the counter."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    with _native(False):
        python = _half_run(dtype, layout, buffers, momentum)

    def python_path(*args: object) -> None:
        raise AssertionError("the node declined a half input")

    monkeypatch.setattr(F, "_operator_layout", python_path)
    node = _half_run(dtype, layout, buffers, momentum)
    assert len(node) == len(python) == 36
    for a, p in zip(node, python, strict=True):
        assert a.dtype == p.dtype
        torch.testing.assert_close(a, p, rtol=0, atol=0)


@pytest.mark.parametrize("on", [True, False], ids=["node", "python"])
def test_half_batches_the_running_buffers_cannot_take_are_refused(
    on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN in the batch, or a blend beyond float16's range: buffers and counter unchanged,
    the batch refused as on every other path — in the node and in the Python path."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    with _native(on):
        bn = batchnorm.BatchNorm1d(3, dtype=torch.float16, nonfinite="raise")
        with torch.no_grad():
            bn.running_var.fill_(60000.0)  # 0.9·60000 + 0.1·var > 65504 for var > 115040
        before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
        nan = torch.randn(16, 3).half()
        nan[2, 1] = float("nan")
        wide = (torch.randn(16, 3) * 600.0).half()  # variance about 360000
        tame = torch.randn(16, 3).half()
        for x in (nan, wide):
            with pytest.raises(F.NonFiniteStatisticsError):
                bn(x)
            after = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            for a, b in zip(after, before, strict=True):
                assert torch.equal(a, b)
        bn(tame)  # the same layer takes a batch it can blend
        assert int(bn.num_batches_tracked) == 1
        assert bool((bn.running_var < 60000.0).all())


def test_half_inputs_the_node_declines_take_the_python_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Channels not on dim 1 (the operator's), or a layout it would copy: the node declines,
    the Python path normalizes the canonical view — torch.nn's results on the moved tensor."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    seen: list[int] = []
    layout = F._operator_layout

    def counted(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
        seen.append(axis)
        return layout(x, axis)

    monkeypatch.setattr(F, "_operator_layout", counted)
    x = torch.randn(8, 5, 6).bfloat16()  # (N, L, C): channels last on a 3-D input
    ours = batchnorm.BatchNorm(6, axis=-1, dtype=torch.bfloat16)
    theirs = torch.nn.BatchNorm1d(6, dtype=torch.bfloat16)
    y = ours(x)
    assert seen == [2]  # (the layer's axis, made non-negative)
    y_ref = theirs(x.transpose(1, 2)).transpose(1, 2)
    assert y.stride() == x.stride()  # the input's layout
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-2, atol=1e-2)


def test_half_second_derivatives_are_torchs() -> None:
    """The operator is recorded by autograd itself, so a graph of the backward is its own:
    a gradient penalty (the norm of dL/dx, differentiated again) equals torch.nn's."""
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(16, 4, 3, generator=gen)
    dy = torch.randn(16, 4, 3, generator=gen).bfloat16()
    got = []
    for bn in (batchnorm.BatchNorm1d(4), torch.nn.BatchNorm1d(4)):
        x = x0.bfloat16().requires_grad_(True)
        (g,) = torch.autograd.grad(bn(x), x, dy, create_graph=True)
        (g.float() ** 2).sum().backward()
        assert x.grad is not None and bn.weight.grad is not None
        got.append((x.grad, bn.weight.grad))
    for ours, theirs in zip(*got, strict=True):
        assert bool(ours.abs().sum() > 0)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 9),
    c=st.integers(1, 40),
    spatial=st.sampled_from([(), (1,), (7,), (3, 5), (2, 3, 4)]),
    channels_last=st.booleans(),
    bfloat=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_half_node_equals_the_python_path_on_random_shapes(
    n: int, c: int, spatial: tuple[int, ...], channels_last: bool, bfloat: bool, seed: int
) -> None:
    """Any shape of rank 2–5, channels_last where the rank has one: the node and the Python
    path give the same bits for a half training step, its backward and an inference."""
    shape = (n, c, *spatial)
    dtype = torch.bfloat16 if bfloat else torch.float16
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last and fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen).to(dtype)
    w0, b0 = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    (on_name, on), (off_name, off) = _step_on_both_paths(x, dy, w0, b0, dtype, evaluate=True)
    assert on_name == off_name == "NativeBatchNormBackward0"
    for a, f in zip(on, off, strict=True):
        torch.testing.assert_close(a, f, rtol=0, atol=0)


_OVER_DY_CASES = [
    ((60, 100), torch.contiguous_format),
    ((4, 8, 5, 5), torch.contiguous_format),  # short rows on the (N, C·L) view
    ((4, 8, 5, 5), torch.channels_last),
    ((3, 8, 1031), torch.contiguous_format),  # long rows: a channel per task
    ((16, 64, 32, 32), torch.contiguous_format),  # 4 MiB long rows: dx streamed
    ((16, 64, 32, 32), torch.channels_last),  # 4 MiB rows x channels: kept in a 32 MiB L3
    ((48, 64, 32, 32), torch.channels_last),  # 12 MiB rows x channels: streamed
    ((64, 128, 7, 7), torch.contiguous_format),  # rows of 49, row by row
    ((700, 3, 512), torch.contiguous_format),  # 4.3 MB of long rows, 3 channels: row by row
]


def _dx_streamed(shape: tuple[int, ...], layout: torch.memory_format) -> bool:
    """Whether the kernels stream a backward's dx for x of this shape and layout (the rule of
    the array API on the canonical view, which the entries follow)."""
    C = shape[1]
    rest = math.prod(shape[2:])
    if layout == torch.channels_last or len(shape) == 2:
        canon = np.empty((shape[0] * rest, C), np.float32)
    else:
        canon = np.empty((shape[0], C, rest), np.float32)
    return K._stream(canon, None, tensors=3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "layout"), _OVER_DY_CASES, ids=str)
def test_dx_is_written_over_a_gradient_nothing_else_holds(
    shape: tuple[int, ...], layout: torch.memory_format, train: bool
) -> None:
    """The gradient the engine hands the node for y — here MulBackward's dy = r·(loss's
    gradient), made for this node alone — becomes dx's memory where the kernels stream dx
    (one count more of written_over_dy; none where dx is stored normally), and the gradients
    of x, γ and β are torch.nn's either way. r, which made dy, is left as it was."""
    ext = native.load()
    C = shape[1]
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).contiguous(memory_format=layout)
    r = torch.randn(shape, generator=g).contiguous(memory_format=layout)
    r0 = r.clone()
    grads = []
    counts = []
    theirs = torch.nn.BatchNorm2d(C) if len(shape) == 4 else torch.nn.BatchNorm1d(C)
    for m in (batchnorm.BatchNorm(C, backend="numba"), theirs):
        m.train()
        with torch.no_grad():
            m(x * 0.5 + 1)  # running statistics other than 0 and 1 for eval mode
        m.train(train)
        xg = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
        before = ext.written_over_dy()
        (m(xg) * r).sum().backward()
        counts.append(ext.written_over_dy() - before)
        grads.append((xg.grad, m.weight.grad, m.bias.grad))
    assert counts == [int(_dx_streamed(shape, layout)), 0]
    # (dγ and dβ: sums over up to 49152 values, torch's in float32)
    for a, t, tol in zip(*grads, (1e-4, 1e-3, 1e-3), strict=True):
        torch.testing.assert_close(a, t, rtol=tol, atol=tol)
    assert torch.equal(r, r0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_gradient_someone_else_holds_is_only_read(train: bool) -> None:
    """dy passed by the caller (y.backward(dy)), kept by a hook or read through a view is
    never written over: the node writes dx to memory of its own. y.retain_grad() keeps a copy
    (torch's hook clones), which holds the gradient whatever becomes of dy."""
    ext = native.load()
    shape = (16, 64, 32, 32)  # 4 MiB of long rows: dx streamed
    assert _dx_streamed(shape, torch.contiguous_format)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    r = torch.randn(shape, generator=g)
    m = batchnorm.BatchNorm2d(64, backend="numba").train(train)

    def run(how: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        xg = x.clone().requires_grad_(True)
        y = m(xg)
        kept: list[torch.Tensor] = []
        before = ext.written_over_dy()
        if how == "caller":
            dy = r * 1.0
            y.backward(dy)
            kept.append(dy)
        else:
            if how == "hook":
                y.register_hook(kept.append)
            elif how == "view":
                y.register_hook(lambda t: kept.append(t[:1]))
            else:
                y.retain_grad()
            (y * r).sum().backward()
            if how == "retain":
                assert y.grad is not None
                kept.append(y.grad)
        if how != "retain":
            assert ext.written_over_dy() == before, how
        assert xg.grad is not None
        return xg.grad, y.detach(), kept

    for how in ("caller", "hook", "view", "retain"):
        dx, _, kept = run(how)
        expected = r[:1] if how == "view" else r
        torch.testing.assert_close(kept[0], expected, rtol=0, atol=0)
        assert dx.data_ptr() != kept[0].data_ptr()


def test_a_gradient_in_memory_lent_by_numpy_is_only_read() -> None:
    """A backward upstream that hands over a gradient over a NumPy array it keeps
    (torch.from_numpy: the memory is the array's, not torch's) never has dx written over it,
    though dx of this size is streamed."""
    ext = native.load()
    shape = (16, 64, 1024)  # 4 MiB of long rows: dx streamed
    assert _dx_streamed(shape, torch.contiguous_format)
    arr = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    before_arr = arr.copy()

    class Lend(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, y: torch.Tensor) -> torch.Tensor:
            return y.clone()

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(arr)

    for train in (True, False):
        m = batchnorm.BatchNorm1d(64, backend="numba").train(train)
        xg = torch.randn(shape).requires_grad_(True)
        before = ext.written_over_dy()
        Lend.apply(m(xg)).sum().backward()
        assert ext.written_over_dy() == before
        np.testing.assert_array_equal(arr, before_arr)
        assert xg.grad is not None and xg.grad.data_ptr() != arr.ctypes.data


@pytest.mark.parametrize("native", [True, False], ids=["node", "function"])
@pytest.mark.parametrize("graph", [False, True], ids=["kernels", "create_graph"])
@pytest.mark.parametrize("frozen", [False, True], ids=["eval", "frozen"])
def test_eval_backward_keeps_what_it_needs_and_not_beta(
    native: bool, graph: bool, frozen: bool
) -> None:
    """Inference saved β, which its backward never reads (dβ = Σdy), and a frozen layer's γ
    buffer as is: changing either in place before the backward (an optimizer or EMA step,
    load_state_dict) raised "modified by an inplace operation" (torch.nn does for β). The
    gradients are those of the forward that ran: torch.nn's on the unchanged layer."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    dy = torch.randn(8, 3, 5, dtype=torch.float64)
    ours = (batchnorm.FrozenBatchNorm1d(3) if frozen else batchnorm.BatchNorm1d(3)).double()
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
    oracle = torch.nn.BatchNorm1d(3).double().eval()
    oracle.load_state_dict(ours.state_dict(), strict=False)
    oracle.weight.requires_grad_(not frozen)
    oracle.bias.requires_grad_(not frozen)
    xo = x.clone().requires_grad_(True)
    want = torch.autograd.grad(
        oracle(xo), [xo, *[p for p in oracle.parameters() if p.requires_grad]], dy
    )
    with _native(native):
        xi = x.clone().requires_grad_(True)
        params = [p for p in ours.parameters() if p.requires_grad]
        y = ours.eval()(xi)
        with torch.no_grad():
            ours.bias.add_(0.5)
            if frozen:
                ours.weight.mul_(3)
        got = torch.autograd.grad(y, [xi, *params], dy, create_graph=graph)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)


def test_an_output_beyond_the_whole_budget_is_not_kept_by_the_node() -> None:
    """An output larger than the cache's budget (512 MiB) stayed cached after its users were
    gone: the eviction stops at one entry. Now it is not kept at all."""
    from batchnorm import backend_numba as B

    ext = native.load()
    rm, rv = torch.zeros(1), torch.ones(1)
    over = B._OUT.max_bytes // 4 + (1 << 20)  # float32 values: just over the budget
    x = torch.ones(2, 1, over // 2)
    held = ext.cached_outputs()
    with torch.no_grad():
        y = F.batch_norm_eval(x, rm, rv)
    assert y is not None and y.shape == x.shape and ext.cached_outputs() == held
    assert float(y[0, 0, -1]) == pytest.approx(1 / (1 + 1e-5) ** 0.5)


@pytest.mark.parametrize("on", [True, False], ids=["node", "function"])
def test_output_caches_are_released_and_kept_within_the_budget_set(on: bool) -> None:
    """The caches belong to the process: after the model is gone they still hold its last
    outputs, until release_output_caches() forgets them (returning the bytes held), and
    set_output_cache_budget() bounds them, forgetting what is over at once (0 keeps none)."""
    from batchnorm import backend_numba as B

    ext = native.load()

    def held() -> int:
        return ext.cached_outputs() if on else len(B._OUT)

    budget = batchnorm.output_cache_budget()
    try:
        with _native(on):
            batchnorm.release_output_caches()
            bn = batchnorm.BatchNorm2d(8)
            for n in (64, 80, 96):  # batches of three sizes: outputs of 2, 2.5 and 3 MiB
                x = torch.randn(n, 8, 32, 32, requires_grad=True)
                bn(x).sum().backward()
            del bn, x
            assert held() >= 3
            assert batchnorm.release_output_caches() >= (2 + 2.5 + 3) * (1 << 20)
            assert held() == 0 and batchnorm.release_output_caches() == 0

            bn = batchnorm.BatchNorm2d(8)
            for n in (64, 80, 96):
                bn(torch.randn(n, 8, 32, 32))
            assert held() == 3
            batchnorm.set_output_cache_budget(6 << 20)  # room for the two used last
            assert held() == 2 and batchnorm.output_cache_budget() == 6 << 20
            batchnorm.set_output_cache_budget(0)
            assert held() == 0
            y = bn(torch.randn(64, 8, 32, 32))
            assert held() == 0 and y.shape == (64, 8, 32, 32)
    finally:
        batchnorm.set_output_cache_budget(budget)
    assert batchnorm.output_cache_budget() == budget


@pytest.mark.parametrize("bad", [-1, 1.5, "64", True, (1 << 40) + 1, 1 << 64])
def test_a_bad_output_cache_budget_is_refused_by_name(bad: object) -> None:
    budget = batchnorm.output_cache_budget()
    with pytest.raises(ValueError, match=r"set_output_cache_budget: .*0 keeps no output"):
        batchnorm.set_output_cache_budget(bad)  # type: ignore[arg-type]
    assert batchnorm.output_cache_budget() == budget


def test_the_output_cache_budget_comes_from_the_environment() -> None:
    """$BATCHNORM_OUTPUT_CACHE_MB sets both caches' budget (here 1 MiB: a 2 MiB output is not
    kept); a value that is not a whole number of MiB is refused with the variable's name."""
    import subprocess
    import sys

    code = (
        "import torch, batchnorm\n"
        "from batchnorm import native, backend_numba as B\n"
        "assert batchnorm.output_cache_budget() == 1 << 20\n"
        "bn = batchnorm.BatchNorm2d(8)\n"
        "y = bn(torch.randn(64, 8, 32, 32))\n"
        "assert native.load().cached_outputs() == 0\n"
        "assert B._OUT.max_bytes == 1 << 20\n"
        "print('ok')\n"
    )
    env = {**os.environ, "BATCHNORM_OUTPUT_CACHE_MB": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    # refused by name, also where the node is built: not reported as a failed build that
    # turns the node off for the process (a value too large for the node overflowed there)
    code = (
        "import os, warnings, batchnorm\n"
        "from batchnorm import native\n"
        "warnings.simplefilter('error')\n"
        "for f in (batchnorm.output_cache_budget, native.load):\n"
        "    try:\n"
        "        f()\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
        "os.environ['BATCHNORM_OUTPUT_CACHE_MB'] = '64'\n"
        "print(native.load() is not None)\n"
    )
    for bad in ("lots", "-3", "99999999999999999"):
        env["BATCHNORM_OUTPUT_CACHE_MB"] = bad
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
        )
        lines = r.stdout.strip().splitlines()
        assert r.returncode == 0 and len(lines) == 3, (r.stdout, r.stderr[-2000:])
        assert all(f"$BATCHNORM_OUTPUT_CACHE_MB is '{bad}'" in line for line in lines[:2])
        assert lines[2] == "True"


def test_a_build_lock_left_by_a_killed_build_is_named_not_waited_for(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """torch waits for its build lock without end, and a build killed by SIGKILL or SIGTERM
    leaves it: an old lock gives the warning that names it, and the Python path serves."""
    import subprocess
    import sys
    import time

    code = (
        "import time, warnings, torch, batchnorm\n"
        "from torch.utils import cpp_extension\n"
        "from batchnorm import native\n"
        "from pathlib import Path\n"
        "lock = Path(cpp_extension._get_build_directory(native._name(), False)) / 'lock'\n"
        "lock.touch()\n"
        "old = time.time() - 2 * native.STALE_LOCK_AFTER\n"
        "import os; os.utime(lock, (old, old))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    y = batchnorm.BatchNorm1d(3)(torch.randn(8, 3))\n"
        "print(native.loaded() is None, y.shape == (8, 3))\n"
        "print(' | '.join(str(w.message) for w in caught))\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    first, warned = r.stdout.strip().splitlines()
    assert first == "True True"
    assert "a build lock older than 300 s is left in" in warned and "delete that file" in warned
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("on", [True, False], ids=["node", "function"])
def test_views_whose_values_are_not_their_memory_are_read_as_values(on: bool) -> None:
    """A neg-bit view (values −t over t's memory) as the input or the gradient, and the
    efficient zeros autograd may hand a backward: read as their values, as torch.nn reads
    them (the node read the memory, and a zeros tensor without memory crashed it)."""
    torch.manual_seed(0)
    t = torch.randn(4, 3, 5, dtype=torch.float64)
    with _native(on):
        for training in (True, False):
            ours = batchnorm.BatchNorm1d(3, dtype=torch.float64).train(training)
            theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64).train(training)
            with torch.no_grad():
                ours.running_mean.fill_(0.5), theirs.running_mean.fill_(0.5)
            neg = torch._neg_view(t)
            assert neg.is_neg()
            torch.testing.assert_close(ours(neg), theirs(neg), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
            grads = []
            for layer in (ours, theirs):
                x = t.clone().requires_grad_(True)
                layer(x).backward(torch._neg_view(t))
                grads.append(x.grad)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
            x = t.clone().requires_grad_(True)
            ours.zero_grad()
            ours(x).backward(torch._efficientzerotensor(t.shape, dtype=t.dtype))
            assert x.grad is not None and not bool(x.grad.any())
            assert ours.weight.grad is not None and not bool(ours.weight.grad.any())


@pytest.mark.parametrize("on", [True, False], ids=["node", "function"])
@pytest.mark.parametrize("training", [True, False])
def test_a_sparse_gradient_gives_the_dense_gradients(on: bool, training: bool) -> None:
    """``y.backward(dy.to_sparse())``: the gradients of the dense ``dy`` (torch.nn's operator
    refuses a sparse one in the backend's words; ours failed inside its own reshape)."""
    torch.manual_seed(0)
    dy = torch.randn(4, 3, 5, dtype=torch.float64)
    dy[dy.abs() < 0.5] = 0.0
    with _native(on):
        got = []
        for g in (dy.to_sparse(), dy):
            bn = batchnorm.BatchNorm1d(3, dtype=torch.float64).train(training)
            x = torch.linspace(-2, 3, 60, dtype=torch.float64).reshape(4, 3, 5).requires_grad_()
            bn(x).backward(g)
            got.append((x.grad, bn.weight.grad, bn.bias.grad))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
