"""The torch functional core against the reference, torch.nn.functional, gradcheck/gradgradcheck
and hypothesis properties. Runs on whichever backend BATCHNORM_BACKEND selects (auto by default);
the torch-vs-kernel comparison is made explicit with the ``backend`` parameter."""

import subprocess
import sys
import warnings
from collections.abc import Callable

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

import batchnorm
from batchnorm import functional as F
from batchnorm import reference as ref
from batchnorm.functional import (
    BatchNormInputError,
    NonFiniteStatisticsError,
    NonFiniteStatisticsWarning,
)

BACKENDS = ["torch", "auto"]

CASES = [
    ((60, 100), 1),
    ((2, 3), 1),
    ((5, 1), 1),
    ((4, 3, 7), 1),
    ((3, 5, 4, 6), 1),
    ((2, 4, 3, 5, 2), 1),
    ((6, 5, 4), -1),
    ((6, 5, 4), 0),
    ((3, 4, 5, 2), 2),
    ((2, 3, 4, 5), -1),
]


def _rand(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_train_forward_backward_match_reference(
    backend: str, shape: tuple[int, ...], axis: int, affine: bool
) -> None:
    c = shape[axis]
    x = _rand(shape).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine else None
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y = F.batch_norm(
        x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-5, axis=axis, backend=backend
    )
    dy = _rand(shape, seed=1)
    y.backward(dy)

    g_np = None if w is None else w.detach().numpy()
    b_np = None if b is None else b.detach().numpy()
    y_ref, _, mean, var = ref.batch_norm_forward(x.detach().numpy(), g_np, b_np, 1e-5, axis)
    dx_ref, dg_ref, db_ref = ref.batch_norm_backward(
        dy.numpy(), x.detach().numpy(), g_np, 1e-5, axis
    )
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-8, atol=1e-10)
    if affine:
        assert w is not None and b is not None
        np.testing.assert_allclose(w.grad.numpy(), dg_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(b.grad.numpy(), db_ref, rtol=1e-9, atol=1e-10)
    m = ref.channel_count(shape, axis)
    rm_ref, rv_ref = ref.running_stats_update(np.zeros(c), np.ones(c), mean, var, m, 0.3)
    np.testing.assert_allclose(rm.numpy(), rm_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), rv_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis", CASES)
def test_eval_matches_reference_affine_map(backend: str, shape: tuple[int, ...], axis: int) -> None:
    c = shape[axis]
    x = _rand(shape)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3, axis=axis, backend=backend)
    y_ref = ref.batch_norm_inference(
        x.numpy(), rm.numpy(), rv.numpy(), w.numpy(), b.numpy(), 1e-3, axis
    )
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (3, 2, 4, 4), (2, 2, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_native(backend: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    c = shape[1]
    x = _rand(shape, dtype=dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w = torch.rand(c, dtype=dtype, requires_grad=True)
    w2 = w.detach().clone().requires_grad_()
    b = torch.randn(c, dtype=dtype, requires_grad=True)
    b2 = b.detach().clone().requires_grad_()
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)
    y2 = torch.nn.functional.batch_norm(x2, rm2, rv2, w2, b2, True, 0.1, 1e-5)
    dy = _rand(shape, seed=3, dtype=dtype)
    y.backward(dy)
    y2.backward(dy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(w.grad, w2.grad, **tol)
    torch.testing.assert_close(b.grad, b2.grad, **tol)
    torch.testing.assert_close(rm, rm2, **tol)
    torch.testing.assert_close(rv, rv2, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((3, 4, 2), -1), ((2, 3, 2, 3), 1)]
)
def test_gradcheck_and_gradgradcheck(backend: str, shape: tuple[int, ...], axis: int) -> None:
    c = shape[axis]
    x = _rand(shape).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, w, b, training=True, axis=axis, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))

    def no_affine(x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, training=True, axis=axis, backend=backend)

    assert torch.autograd.gradcheck(no_affine, (x,))
    assert torch.autograd.gradgradcheck(no_affine, (x,))


def test_eval_mode_gradcheck() -> None:
    x = _rand((4, 3, 2)).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, rm, rv, w, b, training=False)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def _graph_names(fn: object, depth: int) -> set[str]:
    """The class names of the autograd nodes within ``depth`` steps of ``fn``."""
    if fn is None or depth == 0:
        return set()
    names = {type(fn).__name__}
    for nxt, _ in getattr(fn, "next_functions", ()):
        names |= _graph_names(nxt, depth - 1)
    return names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,axis,channels_last",
    [((5, 3), 1, False), ((3, 2, 4), 1, False), ((3, 4, 2), -1, False), ((2, 3, 2, 3), 1, True)],
)
def test_eval_mode_is_differentiable_in_every_argument(
    backend: str, shape: tuple[int, ...], axis: int, channels_last: bool
) -> None:
    """Algorithm 2 with gradients (BN frozen in eval mode while the rest trains): first and
    second derivatives in x, γ, β and the running statistics themselves."""
    c = shape[axis]
    x = _rand(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    rm = torch.randn(c, dtype=torch.float64).requires_grad_()
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(x: Tensor, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.batch_norm_eval(x, rm, rv, w, b, 1e-3, axis=axis, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, rm, rv, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, rm, rv, w, b))
    # the kernels' Function with the kernel backend, torch operations with the torch one
    names = _graph_names(fn(x, rm, rv, w, b).grad_fn, depth=3)
    assert ("BatchNormEvalFunctionBackward" in names) == (backend == "auto"), names

    def no_affine(x: Tensor) -> Tensor:
        return F.batch_norm_eval(x, rm.detach(), rv.detach(), axis=axis, backend=backend)

    assert torch.autograd.gradcheck(no_affine, (x,))
    assert torch.autograd.gradgradcheck(no_affine, (x,))


def test_eval_mode_gradients_for_some_of_the_arguments() -> None:
    """Only the arguments that require gradients get them (the running mean alone, the
    running variance alone, β without γ), each exact."""
    x = _rand((4, 3, 5)).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, m: F.batch_norm_eval(x, m, rv, w, None), (x, rm.requires_grad_())
    )
    rm.requires_grad_(False)
    assert torch.autograd.gradcheck(
        lambda v: F.batch_norm_eval(x.detach(), rm, v, None, b), (rv.requires_grad_(),)
    )
    rv.requires_grad_(False)
    assert torch.autograd.gradcheck(
        lambda b: F.batch_norm_eval(x.detach(), rm, rv, None, b), (b.requires_grad_(),)
    )


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_eval_mode_gradients_match_torch_nn_and_the_output_matches_no_grad(layout: str) -> None:
    """float32 through the modules: the gradients of BN in eval mode are torch.nn's; the
    output is the same with gradients as without (one kernel pass either way); a ReLU in place
    after it is legal."""
    import batchnorm

    torch.manual_seed(0)
    shape = (6, 40) if layout == "rows" else (4, 8, 5, 7)
    x0 = torch.randn(*shape) * 3 + 2
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    ours = (batchnorm.BatchNorm1d if layout == "rows" else batchnorm.BatchNorm2d)(c)
    theirs = (torch.nn.BatchNorm1d if layout == "rows" else torch.nn.BatchNorm2d)(c)
    with torch.no_grad():
        ours.running_mean.uniform_(1, 3)
        ours.running_var.uniform_(0.5, 4)
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    dy = torch.randn_like(x0)
    grads = []
    for m in (ours, theirs):
        x = x0.clone().requires_grad_()
        y = torch.relu_(m(x))
        y.backward(dy)
        grads.append((y.detach(), x.grad, m.weight.grad, m.bias.grad))
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = ours(x0)
    assert torch.equal(ours(x0.clone().requires_grad_()).detach(), plain)
    assert int(ours.num_batches_tracked) == 0  # eval mode: nothing learned


def test_eval_mode_backward_follows_a_saved_tensor_hook_that_changes_the_layout() -> None:
    """A hook that packs the saved input contiguously hands channels_last x back in NCHW:
    dy is brought to x's layout before the kernels read both."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    w = torch.rand(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    dy = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    got = []
    for backend in ("auto", "torch"):
        for t in (x, w, b):
            t.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t):
            y = F.batch_norm_eval(x, rm, rv, w, b, backend=backend)
        y.backward(dy)
        got.append((x.grad, w.grad, b.grad))
    for a, e in zip(*got, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_float32_statistics(dtype: torch.dtype) -> None:
    x32 = _rand((16, 4, 3, 3), dtype=torch.float32) * 10 + 100
    x = x32.to(dtype).requires_grad_()
    rm, rv = torch.zeros(4), torch.ones(4)
    y = F.batch_norm(x, rm, rv, torch.ones(4), torch.zeros(4), training=True)
    assert y.dtype == dtype
    # the float32 computation on the same (rounded) values is the oracle
    xr = x.detach().float()
    y_ref, _, mean, var = ref.batch_norm_forward(xr.numpy(), eps=1e-5)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    np.testing.assert_allclose(y.detach().float().numpy(), y_ref, atol=tol)
    np.testing.assert_allclose(rm.numpy(), 0.1 * mean, rtol=1e-5)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert torch.isfinite(x.grad.float()).all()
    assert rm.dtype == torch.float32


def _half_case(layout: str, dtype: torch.dtype) -> tuple[Tensor, type[torch.nn.Module]]:
    import batchnorm

    shape = {"2d": (48, 6), "ncl": (8, 6, 10)}.get(layout, (8, 6, 5, 4))
    x = _rand(shape, seed=3, dtype=torch.float32).mul(3.0).add(5.0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    cls = batchnorm.BatchNorm2d if x.dim() == 4 else batchnorm.BatchNorm1d
    return x.to(dtype), cls


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d", "ncl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_take_torchs_operator_and_match_torch_nn(
    dtype: torch.dtype, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU float16/bfloat16 inputs go to torch's fused operator (``aten``), whose reads and
    writes of half values are one pass: outputs, gradients in x, γ, β and the running
    statistics are torch.nn's, in training, inference, and inference with gradients."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)  # the default choice (``auto``)
    x0, cls = _half_case(layout, dtype)
    assert F.get_backend(x0).name == "aten"
    assert F.get_backend(x0.float()).name != "aten"  # float32/float64: the kernels (or torch)
    got = []
    for bn in (cls(6), getattr(torch.nn, cls.__name__)(6)):
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
            bn.bias.copy_(torch.linspace(-0.5, 0.5, 6))
        dy = _rand(tuple(x0.shape), seed=4, dtype=torch.float32).to(dtype)
        out = []
        for mode in ("train", "eval"):
            bn.train(mode == "train")
            bn.zero_grad()
            x = x0.clone().requires_grad_(True)
            y = bn(x)
            y.backward(dy)
            assert y.dtype == dtype and x.grad is not None and x.grad.dtype == dtype
            out += [y.detach(), x.grad, bn.weight.grad, bn.bias.grad]
            out += [bn.running_mean.clone(), bn.running_var.clone()]
        got.append(out)
    # every layout reaches the operator as it is (channels_last too: its own loop, as in
    # torch.nn); the running statistics are blended apart from it (an ulp off in places)
    for ours, theirs in zip(*got, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_backend_holds_to_the_contract_of_the_float32_computation(
    dtype: torch.dtype,
) -> None:
    """Every method of the ``aten`` backend against the plain-torch backend, which computes
    half inputs in float32: results agree to the half dtype's rounding of the outputs."""
    aten, plain = F._instance("aten"), F._instance("torch")
    tol = {"rtol": 1e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    for shape in ((8, 6, 10), (48, 6)):
        x = _rand(shape, seed=6, dtype=torch.float32).mul(2.0).add(3.0).to(dtype)
        dy = _rand(shape, seed=7, dtype=torch.float32).to(dtype)
        w, b = torch.linspace(0.5, 1.5, 6), torch.linspace(-1.0, 1.0, 6)
        a = aten.forward_train(x, w, b, 1e-3)
        p = plain.forward_train(x, w, b, 1e-3)
        assert [t.dtype for t in a] == [t.dtype for t in p] == [dtype] + [torch.float32] * 3
        for u, v in zip(a, p, strict=True):
            torch.testing.assert_close(u.float(), v.float(), **tol)
        _, mean, var, invstd = p
        torch.testing.assert_close(a[2], var, rtol=1e-5, atol=1e-6)  # var recovered from invstd
        needs = (True, True, True)
        for u, v in zip(
            aten.backward(dy, x, mean, invstd, w, needs),
            plain.backward(dy, x, mean, invstd, w, needs),
            strict=True,
        ):
            assert u is not None and v is not None
            torch.testing.assert_close(u.float(), v.float(), **tol)
        torch.testing.assert_close(
            aten.forward_eval(x, mean, var, w, b, 1e-3).float(),
            plain.forward_eval(x, mean, var, w, b, 1e-3).float(),
            **tol,
        )
        for need_dx in (True, False):
            ea = aten.backward_eval(dy, x, mean, var, w, 1e-3, need_dx)
            ep = plain.backward_eval(dy, x, mean, var, w, 1e-3, need_dx)
            assert (ea[0] is None) == (ep[0] is None) == (not need_dx)
            for u, v in zip(ea, ep, strict=True):
                if u is not None and v is not None:
                    torch.testing.assert_close(u.float(), v.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_a_nan_leave_the_running_statistics_alone(dtype: torch.dtype) -> None:
    """torch's operator would blend a NaN into its running buffers; the ``aten`` backend never
    hands them over, and the batch is refused as on every other path."""
    x = _rand((16, 3, 4), dtype=torch.float32).to(dtype)
    x[2, 1, 3] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(NonFiniteStatisticsError):
        F.batch_norm(x, rm, rv, training=True, nonfinite="raise")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(ValueError, match="backend 'aten' does not support torch.float32"):
        F.batch_norm(x.float(), None, None, training=True, backend="aten")


def _f32(bn: torch.nn.Module) -> tuple[Tensor, ...]:
    """A module's running statistics, γ and β in float32."""
    return tuple(t.detach().float() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_store_the_variance_itself_not_one_recovered_from_invstd(
    dtype: torch.dtype, native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1/invstd² − ε cancels for a variance far below ε (relative error 0.24 at a spread of
    1e-6) and is infinite for ε = 0 and a constant channel (the batch was refused, with a
    warning about non-finite statistics): the running variance and the returned statistics
    are the operator's own variance, on the compiled node and without it."""
    import batchnorm

    monkeypatch.setenv("BATCHNORM_NATIVE", native)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4, generator=g) * 1e-3).to(dtype)  # variance ~1e-6 ≪ ε = 1e-5 ... 1e-3
    for eps in (1e-5, 1e-3):
        bn = batchnorm.BatchNorm1d(4, momentum=1.0, eps=eps)
        bn(x)
        exact = x.double().var(0, unbiased=True)
        torch.testing.assert_close(bn.running_var.double(), exact, rtol=1e-5, atol=0)
        _, _, var, _ = F.batch_norm_train(x, None, None, eps)
        torch.testing.assert_close(
            var.double(), x.double().var(0, unbiased=False), rtol=1e-5, atol=0
        )
    constant = torch.randn(8, 3, 5, generator=g).to(dtype)
    constant[:, 1] = 2.0
    bn = batchnorm.BatchNorm1d(3, eps=0.0)  # (warns at construction)
    with warnings.catch_warnings():
        warnings.simplefilter("error", batchnorm.NonFiniteStatisticsWarning)
        bn(constant)
    assert int(bn.num_batches_tracked) == 1 and float(bn.running_var[1]) == pytest.approx(0.9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_running_buffers_are_blended_once(dtype: torch.dtype) -> None:
    """A module converted to half precision keeps half running buffers: the batch statistics
    are blended in float32 and rounded once into them — the float64 blend of the reference's
    statistics rounded to the buffers' dtype. A blend in half precision rounds twice and lands
    an ulp off in places (so does torch.nn's bfloat16 module, which rounds the batch mean to
    bfloat16 first; its float16 module rounds once, as ours)."""
    import batchnorm

    x = (_rand((64, 32), seed=8, dtype=torch.float32) * 3 + 7).to(dtype)
    # torch's operator named (what ``auto`` picks): the comparisons of inference below are its
    ours = batchnorm.BatchNorm1d(32, dtype=dtype, backend="aten")
    theirs = torch.nn.BatchNorm1d(32, dtype=dtype)
    for bn in (ours, theirs):
        with torch.no_grad():
            bn.running_mean.copy_(torch.linspace(-2.0, 2.0, 32))
            bn.running_var.copy_(torch.linspace(0.5, 3.0, 32))
    _, mean, var = ref.batch_norm_forward(x.double().numpy(), eps=1e-5)[1:]
    m_ref = torch.from_numpy(mean)
    v_ref = torch.from_numpy(var * 64 / 63)  # the unbiased batch variance
    expect = ours.running_mean.clone(), ours.running_var.clone()
    twice = expect
    for _ in range(3):
        ours(x)
        theirs(x)
        expect = (
            (expect[0].double() + 0.1 * (m_ref - expect[0].double())).to(dtype),
            (0.9 * expect[1].double() + 0.1 * v_ref).to(dtype),
        )
        twice = (
            twice[0].lerp(m_ref.to(dtype), 0.1),
            twice[1].mul(0.9).add(v_ref.to(dtype), alpha=0.1),
        )
        assert ours.running_mean.dtype == ours.running_var.dtype == dtype
        assert torch.equal(ours.running_mean, expect[0])
        assert torch.equal(ours.running_var, expect[1])
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
        if dtype == torch.float16:
            assert torch.equal(ours.running_mean, theirs.running_mean)
            assert torch.equal(ours.running_var, theirs.running_var)
    # the test can tell: the blend in half precision ends elsewhere
    assert not (torch.equal(twice[0], expect[0]) and torch.equal(twice[1], expect[1]))
    ours.eval()
    theirs.eval()
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # inference takes the module's half vectors as they are
        assert torch.equal(ours(x), theirs(x))
        ours.weight.copy_(torch.linspace(0.5, 1.5, 32))
        assert torch.equal(ours(x), F.batch_norm_eval(x, *_f32(ours), backend="aten"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_running_buffers_blend_alike_on_every_path(dtype: torch.dtype) -> None:
    """The NumPy update (contiguous CPU buffers), the torch-ops one (any other buffer, here
    strided views) and the traced one round the float32 blend once, to the same values."""
    mean, var = torch.linspace(-3.0, 5.0, 16) + 0.01, torch.linspace(0.1, 9.0, 16) + 0.001
    start_m, start_v = (
        torch.linspace(1.0, 2.0, 16).to(dtype),
        torch.linspace(2.0, 4.0, 16).to(dtype),
    )
    got = []
    for how in ("numpy", "torch", "traced"):
        rm, rv = start_m.clone(), start_v.clone()
        if how == "torch":
            rm = torch.zeros(32, dtype=dtype)[::2].copy_(start_m)
            rv = torch.zeros(32, dtype=dtype)[::2].copy_(start_v)
        running = F.RunningStats(rm, rv, 0.3, 0.3 * 10 / 9, None)
        if how == "traced":
            assert F._blend_traced(running, mean, var)
        else:
            assert F.blend_running(running, mean, var)
        got.append((rm.clone(), rv.clone()))
    expect_m = (start_m.double() + 0.3 * (mean.double() - start_m.double())).to(dtype)
    expect_v = (0.7 * start_v.double() + 0.3 * 10 / 9 * var.double()).to(dtype)
    for rm, rv in got:
        assert torch.equal(rm, expect_m) and torch.equal(rv, expect_v)


def test_half_running_buffers_refuse_a_variance_beyond_their_range() -> None:
    """A float16 running variance cannot hold 1e6: the batch is refused, not stored as inf."""
    rm, rv = torch.zeros(1, dtype=torch.float16), torch.ones(1, dtype=torch.float16)
    x = torch.tensor([[0.0], [2000.0]], dtype=torch.float16)
    with pytest.warns(NonFiniteStatisticsWarning, match="beyond the range"):
        F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert torch.equal(rm, torch.zeros(1, dtype=torch.float16)) and float(rv) == 1.0
    big = torch.tensor([[0.0], [3e4]], dtype=torch.bfloat16)  # bfloat16 holds it
    rb, vb = torch.zeros(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16)
    F.batch_norm(big, rb, vb, training=True, momentum=1.0)
    half = float(big[1, 0]) / 2  # 3e4 rounds to 29952 in bfloat16
    assert float(rb) == pytest.approx(half, rel=1e-2)
    assert float(vb) == pytest.approx(2 * half**2, rel=1e-2)

    # values float32 holds but the half dtype does not (rounded to inf) are refused
    def buffer(dtype: torch.dtype, n: int = 2) -> torch.Tensor:  # finite buffer values
        return torch.ones(n, dtype=dtype)

    assert F._rounded(np.array([3.38e38], np.float32), buffer(torch.bfloat16, 1)) is not None
    assert F._rounded(np.array([1.0, 3.4e38], np.float32), buffer(torch.bfloat16)) is None
    assert F._rounded(np.array([65504.0], np.float32), buffer(torch.float16, 1)) is not None
    assert F._rounded(np.array([65520.0, 1.0], np.float32), buffer(torch.float16)) is None
    # a buffer value that is not finite already may stay so
    nan_first = torch.tensor([float("nan"), 1.0], dtype=torch.float16)
    assert F._rounded(np.array([np.nan, 1.0], np.float32), nan_first) is not None
    pair = np.array([1.0 + 2.0**-8, -(1.0 + 3 * 2.0**-8)], np.float32)
    r = F._rounded(pair, buffer(torch.bfloat16))
    assert r is not None and r.tolist() == [1.0, -(1.0 + 2.0**-6)]  # to nearest, ties to even


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("shape", [(256, 3), (16, 3, 8, 8)])
def test_variance_is_stable_for_large_means(
    backend: str, offset: float, shape: tuple[int, ...]
) -> None:
    x = (_rand(shape, seed=5) * 0.5 + offset).float()
    y = F.batch_norm(x, None, None, training=True, backend=backend)
    dims = tuple(i for i in range(len(shape)) if i != 1)
    var = y.double().var(dim=dims, unbiased=False)
    # float32 stores offset+noise with a resolution of offset·2⁻²³; x̂ keeps unit variance
    torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-3)
    # the naive E[x²] − E[x]² in float32 fails on the same input: the test can tell
    xt = x.transpose(0, 1).reshape(shape[1], -1)
    naive = (xt * xt).mean(1) - xt.mean(1) ** 2
    if offset >= 1e5:
        assert not torch.allclose(
            naive,
            x.double().transpose(0, 1).reshape(shape[1], -1).var(1, unbiased=False).float(),
            rtol=0.1,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_channel_gives_exact_zero(backend: str) -> None:
    x = torch.randn(32, 3, 4)
    x[:, 1] = 123.25
    y = F.batch_norm(x, None, None, training=True, backend=backend)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_near_float32_range(backend: str) -> None:
    x = (_rand((64, 3), seed=7) * 1e30).float()
    rm, rv = torch.zeros(3), torch.ones(3)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        y = F.batch_norm(x, rm, rv, training=True, backend=backend)
    torch.testing.assert_close(
        y.double().var(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0
    )
    # a variance of 1e60 does not fit a float32 buffer: nothing non-finite is stored
    assert torch.isfinite(rm).all() and torch.isfinite(rv).all()


# -- hypothesis properties ---------------------------------------------------------------------

_arrays = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=5),
    elements=st.floats(-100, 100, allow_nan=False, width=64),
)


def _ramp(x: np.ndarray) -> np.ndarray:
    """A distinct value at every position: added to hypothesis' arrays (whose elements are
    often one repeated fill value) it gives every channel a spread."""
    return np.arange(x.size, dtype=np.float64).reshape(x.shape)


@settings(max_examples=40, deadline=None)
@given(x=_arrays, spread=st.booleans())
def test_property_xhat_has_zero_mean_unit_variance(x: np.ndarray, spread: bool) -> None:
    if spread:  # half the examples with every channel spread, half as drawn (constant ones too)
        x = x + _ramp(x)
    t = torch.from_numpy(x)
    y = F.batch_norm(t, None, None, training=True, eps=1e-12)
    dims = tuple(i for i in range(x.ndim) if i != 1)
    spread = t.var(dim=dims, unbiased=False)
    np.testing.assert_allclose(y.mean(dim=dims).numpy(), 0.0, atol=1e-6)
    var = y.var(dim=dims, unbiased=False).numpy()
    # non-degenerate channels have unit variance; (near-)constant ones are 0
    ok = spread.numpy() > 1e-6
    np.testing.assert_allclose(var[ok], 1.0, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(x=_arrays, a=st.floats(0.01, 100))
def test_property_scale_invariance(x: np.ndarray, a: float) -> None:
    """BN(a·x) = BN(x) for a > 0 (the paper, Sec. 3.3): exactly, up to ε."""
    t = torch.from_numpy(x + _ramp(x))
    dims = tuple(i for i in range(x.ndim) if i != 1)
    # ε dominates a nearly constant channel, where invariance holds only up to ε (the ramp
    # leaves such a channel only if the drawn values cancel it)
    assume(not bool((t.var(dim=dims, unbiased=False) < 1e-3).any()))
    y1 = F.batch_norm(t, None, None, training=True, eps=1e-14)
    y2 = F.batch_norm(a * t, None, None, training=True, eps=1e-14)
    np.testing.assert_allclose(y1.numpy(), y2.numpy(), atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(x=_arrays, data=st.data())
def test_property_eval_is_affine_map_of_running_stats(x: np.ndarray, data: st.DataObject) -> None:
    c = x.shape[1]
    rm = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=c, max_size=c)))
    rv = np.array(data.draw(st.lists(st.floats(0.1, 5), min_size=c, max_size=c)))
    y = F.batch_norm(
        torch.from_numpy(x), torch.from_numpy(rm), torch.from_numpy(rv), training=False
    )
    scale, shift = ref.inference_affine(rm, rv, eps=1e-5)
    shape = [1] * x.ndim
    shape[1] = -1
    np.testing.assert_allclose(
        y.numpy(), x * scale.reshape(shape) + shift.reshape(shape), rtol=1e-12, atol=1e-12
    )


# -- non-finite policy and errors --------------------------------------------------------------


def test_nonfinite_batch_never_reaches_running_stats() -> None:
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(NonFiniteStatisticsWarning, match="left unchanged"):
        F.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    x[2, 1] = float("inf")
    with pytest.raises(NonFiniteStatisticsError):
        F.batch_norm(x, rm, rv, training=True, nonfinite="raise")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no-graph", "graph"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shape,axis", [((60, 100), 1), ((3, 5, 4, 6), 1), ((2, 3, 4, 5), -1)])
def test_batch_norm_step_is_train_then_update(
    backend: str, grad: bool, unbiased: bool, shape: tuple[int, ...], axis: int
) -> None:
    c = shape[axis]
    x = _rand(shape, dtype=torch.float32).requires_grad_(grad)
    w = (torch.rand(c) + 0.5).requires_grad_(grad)
    b = torch.randn(c).requires_grad_(grad)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm2, rv2, nbt = rm.clone(), rv.clone(), torch.tensor(4)
    y_want, mean, var, count = F.batch_norm_train(x, w, b, 1e-3, axis=axis, backend=backend)
    F.update_running_stats(rm, rv, mean, var, count, 0.2, unbiased=unbiased)
    y, updated = F.batch_norm_step(
        x, rm2, rv2, w, b, 0.2, 1e-3, axis=axis, unbiased_running_var=unbiased,
        backend=backend, num_batches_tracked=nbt,
    )  # fmt: skip
    assert updated and int(nbt) == 5
    assert y.requires_grad == grad and y.stride() == x.stride()
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(rm2, rm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv2, rv, rtol=1e-6, atol=1e-6)
    if grad:  # the same graph as batch_norm_train's
        dy = _rand(shape, seed=2, dtype=torch.float32)
        got = torch.autograd.grad(y, (x, w, b), dy)
        want = torch.autograd.grad(y_want, (x, w, b), dy)
        for g_got, g_want in zip(got, want):
            torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_step_buffers_the_kernels_cannot_view(backend: str) -> None:
    # float64 buffers for a float32 input, a non-contiguous running_var: still updated exactly
    x = _rand((30, 4), dtype=torch.float32)
    rm = torch.zeros(4, dtype=torch.float64)
    rv = torch.ones(8)[::2]
    y, updated = F.batch_norm_step(x, rm, rv, momentum=0.5, backend=backend)
    assert updated
    torch.testing.assert_close(rm, 0.5 * x.double().mean(0))
    torch.testing.assert_close(rv, 0.5 + 0.5 * x.var(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no-graph", "graph"])
def test_batch_norm_step_nonfinite_changes_nothing(backend: str, grad: bool) -> None:
    x = torch.randn(8, 3)
    x[2, 1] = float("inf")
    x.requires_grad_(grad)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(7)
    with pytest.warns(NonFiniteStatisticsWarning, match="left unchanged") as rec:
        _, updated = F.batch_norm_step(x, rm, rv, backend=backend, num_batches_tracked=nbt)
    assert rec[0].filename == __file__  # the warning points at the caller
    assert not updated and int(nbt) == 7
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(NonFiniteStatisticsError, match="BN"):
        F.batch_norm_step(x, rm, rv, backend=backend, nonfinite="raise", layer="BN")
    assert torch.equal(rm, torch.zeros(3)) and int(nbt) == 7


def _layout(t: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "strided":  # neither layout: a transposed copy viewed back
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dy_layout", ["contiguous", "channels_last", "expanded"])
def test_gradients_for_any_pair_of_memory_layouts(
    backend: str, x_layout: str, dy_layout: str
) -> None:
    base = _rand((3, 4, 5, 6), dtype=torch.float32)
    dy_base = _rand((3, 4, 5, 6), seed=5, dtype=torch.float32)
    dy = dy_base[:1].expand(3, -1, -1, -1) if dy_layout == "expanded" else dy_base
    dy = dy if dy_layout == "expanded" else _layout(dy, dy_layout)
    grads = []
    for f in ("ours", "torch.nn"):
        x = _layout(base.clone(), x_layout).requires_grad_()
        w = (torch.rand(4, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
        b = torch.zeros(4).requires_grad_()
        if f == "ours":
            y, *_ = F.batch_norm_train(x, w, b, 1e-5, backend=backend)
            assert y.stride() == x.stride() or x_layout == "strided"
        else:
            y = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        grads.append(torch.autograd.grad(y, (x, w, b), dy))
    for g_ours, g_torch in zip(*grads):
        torch.testing.assert_close(g_ours, g_torch, rtol=1e-4, atol=1e-4)


def _gapped(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, x)``: an input with gaps or overlaps in memory and the leaf it views."""
    if kind == "channel slice of channels_last":
        leaf = _rand((3, 8, 5, 6), seed=2, dtype=torch.float32)
        leaf = leaf.contiguous(memory_format=torch.channels_last).requires_grad_()
        return leaf, leaf[:, :4]
    if kind == "every other column":
        leaf = _rand((3, 4, 5, 12), seed=2, dtype=torch.float32).requires_grad_()
        return leaf, leaf[..., ::2]
    leaf = _rand((1, 4, 5, 6), seed=2, dtype=torch.float32).requires_grad_()  # "expanded"
    return leaf, leaf.expand(3, -1, -1, -1)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "kind", ["channel slice of channels_last", "every other column", "expanded"]
)
@pytest.mark.parametrize("dy_layout", ["contiguous", "channels_last"])
def test_gradients_of_inputs_with_gaps_in_memory(
    backend: str, training: bool, kind: str, dy_layout: str
) -> None:
    """Inputs that are neither dense nor a permutation of dense memory, in both modes through
    the modules: first derivatives (the kernels' one-pass backward) and a gradient penalty
    (second derivatives) equal torch.nn's. A ``channels_last`` channel slice in eval mode
    came back with every gradient wrong (dy read in another order than x)."""
    import batchnorm

    results = []
    for who in ("ours", "torch.nn"):
        torch.manual_seed(0)
        m: torch.nn.Module = (
            batchnorm.BatchNorm2d(4, backend=backend) if who == "ours" else torch.nn.BatchNorm2d(4)
        )
        with torch.no_grad():
            m.running_mean.uniform_(0, 2)  # type: ignore[operator]
            m.running_var.uniform_(0.5, 3)  # type: ignore[operator]
            m.weight.uniform_(0.5, 2)
        m.train(training)
        leaf, x = _gapped(kind)
        y = m(x)
        dy = _layout(_rand(tuple(y.shape), seed=7, dtype=torch.float32), dy_layout)
        first = torch.autograd.grad(y, (leaf, m.weight, m.bias), dy)
        y = m(x)
        (g,) = torch.autograd.grad((y * y).sum(), (x,), create_graph=True)
        second = torch.autograd.grad(g.square().sum(), (leaf, m.weight))
        results.append((y.detach(), *first, *second, m.running_mean.clone()))
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_second_derivatives_through_channels_last() -> None:
    x = _rand((2, 3, 2, 3)).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.batch_norm_train(x, w, b, 1e-3)[0]

    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_error_messages() -> None:
    with pytest.raises(BatchNormInputError, match=r"did you mean axis=-1\?"):
        F.batch_norm(
            torch.randn(4, 5, 3), torch.zeros(3), torch.ones(3), training=True, layer="BN(3)"
        )
    with pytest.raises(
        BatchNormInputError,
        match=r"BN\(3\): expected more than 1 value per channel.*drop_last=True",
    ):
        F.batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True, layer="BN(3)")
    with pytest.raises(
        BatchNormInputError, match=r"floating-point input, got dtype torch.int64.*x.float\(\)"
    ):
        F.batch_norm(
            torch.ones(4, 3, dtype=torch.long), torch.zeros(3), torch.ones(3), training=True
        )
    with pytest.raises(ValueError, match="unknown batch-norm backend"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, backend="nope")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_input_is_refused_by_name(dtype: torch.dtype) -> None:
    """Floating point but without arithmetic in torch: refused as an integer input is, where
    torch's words named neither the layer nor a remedy ("std_cpu" not implemented)."""
    x = torch.randn(8, 3).to(dtype)
    rm, rv = torch.zeros(3), torch.ones(3)
    calls = {
        "batch_norm": lambda: F.batch_norm(x, rm, rv, training=True),
        "batch_norm_eval": lambda: F.batch_norm_eval(x, rm, rv),
        "batch_norm_train": lambda: F.batch_norm_train(x),
        "batch_norm_step": lambda: F.batch_norm_step(x, rm, rv),
        r"BatchNorm1d\(3\)": lambda: batchnorm.BatchNorm1d(3)(x),
        r"FrozenBatchNorm1d\(3\)": lambda: batchnorm.FrozenBatchNorm1d(3)(x),
    }
    for name, call in calls.items():
        with pytest.raises(
            BatchNormInputError, match=rf"^{name}: expected a floating-point input, got dtype "
        ):
            call()
    bn = batchnorm.BatchNorm1d(3).eval()
    with pytest.raises(BatchNormInputError, match=r"float16, bfloat16, float32 and float64.*float"):
        bn(x)


def test_a_backend_that_does_not_exist_or_fit_names_the_layer() -> None:
    # a mistyped backend= is refused where it is written, not at the first forward
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(8\): unknown batch-norm backend 'nmuba'"):
        batchnorm.BatchNorm2d(8, backend="nmuba")
    layer = batchnorm.BatchNorm2d(8, backend="aten")
    for training in (True, False):
        with pytest.raises(
            ValueError, match=r"^BatchNorm2d\(8\): batch-norm backend 'aten' does not support"
        ):
            layer.train(training)(torch.randn(2, 8, 3, 3))
    layer.backend = "zzz"  # set afterwards: named at the call
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(8\): unknown batch-norm backend 'zzz'"):
        layer(torch.randn(2, 8, 3, 3))
    assert batchnorm.BatchNorm2d(8, backend="auto").backend == "auto"


def test_functional_errors_name_the_argument_at_fault() -> None:
    """Each per-channel tensor is checked against the input's channels and named when wrong;
    running buffers come in pairs; a 1-D input has no batch axis."""
    x = torch.randn(4, 5)
    rm, rv = torch.zeros(5), torch.ones(5)
    for kwargs, what in (
        (dict(running_mean=torch.zeros(3), running_var=torch.ones(3)), "running_mean"),
        (dict(running_mean=rm, running_var=torch.ones(5, 1)), "running_var"),
        (dict(running_mean=None, running_var=None, weight=torch.ones(3)), "weight"),
        (dict(running_mean=None, running_var=None, bias=torch.ones(6)), "bias"),
    ):
        with pytest.raises(BatchNormInputError, match=rf"^batch_norm: {what} has shape .*\(5,\)"):
            F.batch_norm(x, training=True, **kwargs)
    with pytest.raises(BatchNormInputError, match="running_mean was given without running_var"):
        F.batch_norm(x, rm.clone(), None, training=True)
    with pytest.raises(BatchNormInputError, match="running_var was given without running_mean"):
        F.batch_norm(x, None, rv.clone(), training=False)
    with pytest.raises(BatchNormInputError, match="running_mean must be floating point"):
        F.batch_norm(x, torch.zeros(5, dtype=torch.long), rv, training=True)
    with pytest.raises(BatchNormInputError, match=r"at least 2D\), got 1D input of shape \(5,\)"):
        F.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(BatchNormInputError, match="axis=3 is out of range"):
        F.batch_norm(x, None, None, training=True, axis=3)
    rm0 = rm.clone()
    F.batch_norm(x * 2 + 3, rm0, rv.clone(), training=True)  # well-formed: runs and updates
    assert not torch.equal(rm0, rm)


def test_update_running_stats_refuses_one_value_per_channel_as_the_reference_does() -> None:
    from batchnorm import reference as ref

    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="count=1"):
        ref.running_stats_update(rm.numpy(), rv.numpy(), np.zeros(3), np.ones(3), 1, 0.1)
    for count in (1, 0):
        with pytest.raises(F.BatchNormInputError, match=f"needs m ≥ 2 .*count={count}"):
            F.update_running_stats(rm, rv, torch.zeros(3), torch.ones(3), count, momentum=0.1)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert F.update_running_stats(rm, rv, torch.ones(3), torch.ones(3), 1, 0.5, unbiased=False)
    torch.testing.assert_close(rm, torch.full((3,), 0.5))


@pytest.mark.parametrize("backend", ["auto", "numba", "torch"])
def test_the_lower_level_functions_refuse_per_channel_tensors_of_another_length(
    backend: str,
) -> None:
    """batch_norm_train / _step / _eval and update_running_stats take no per-channel tensor
    but of C values: the kernels would read and write past a shorter one's end."""
    x = torch.randn(8, 3, 4)
    short, good = torch.ones(2), torch.ones(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    kw = dict(backend=backend, layer="bn1")
    with pytest.raises(BatchNormInputError, match=r"^bn1: weight has shape \(2,\).*3 values"):
        F.batch_norm_train(x, short, good, **kw)
    with pytest.raises(BatchNormInputError, match=r"^bn1: bias has shape \(2,\)"):
        F.batch_norm_train(x, good, short, mask=torch.ones(8, 4, dtype=torch.bool), **kw)
    for at in range(4):
        tensors = [rm.clone(), rv.clone(), good, good]
        tensors[at] = short
        with pytest.raises(BatchNormInputError, match=r"^bn1: .* has shape \(2,\)"):
            F.batch_norm_step(x, tensors[0], tensors[1], tensors[2], tensors[3], **kw)
        with pytest.raises(BatchNormInputError, match=r"^bn1: .* has shape \(2,\)"):
            F.batch_norm_eval(x, *tensors, **kw)
    _, mean, var, count = F.batch_norm_train(x, backend=backend)
    with pytest.raises(BatchNormInputError, match=r"^bn1: running_var has shape \(2,\)"):
        F.update_running_stats(rm, short.clone(), mean, var, count, 0.1, layer="bn1")
    assert torch.equal(rm, torch.zeros(3))  # nothing blended before the refusal


def test_canonical_layout_views_without_copy() -> None:
    x = torch.randn(2, 3, 4, 5)
    v, restore = F.canonical_layout(x, 1)
    assert v.shape == (2, 3, 20) and v.data_ptr() == x.data_ptr()
    cl = x.to(memory_format=torch.channels_last)
    v, restore = F.canonical_layout(cl, 1)
    assert v.shape == (40, 3) and v.data_ptr() == cl.data_ptr()
    assert restore(v).is_contiguous(memory_format=torch.channels_last)
    nc = x.transpose(2, 3)  # neither layout: copied once, values preserved
    v, restore = F.canonical_layout(nc, 1)
    assert torch.equal(restore(v), nc)


def test_running_update_refuses_values_beyond_the_buffers_dtype() -> None:
    """A finite batch variance whose running value would not fit the buffers' dtype (float16
    buffers, or a float32 update that overflows) leaves them unchanged, on every path."""
    import batchnorm
    from batchnorm import kernels as K

    for backend in ("numba", "torch"):
        bn = batchnorm.BatchNorm1d(4, backend=backend).half()
        with pytest.warns(NonFiniteStatisticsWarning, match="beyond the range"):
            bn((torch.randn(64, 4) * 1000).half())  # variance ~1e6 > float16's 65504
        assert torch.equal(bn.running_var, torch.ones(4, dtype=torch.half))
        assert int(bn.num_batches_tracked) == 0
    # float32: finite inputs, an update (1 − m)·rv + α·var beyond float32's range
    big = torch.full((3,), 3e38)
    strided = (torch.zeros(6)[::2], torch.full((6,), 3e38)[::2])  # the torch branch
    for rm, rv in ((torch.zeros(3), big.clone()), strided):
        with pytest.warns(NonFiniteStatisticsWarning):
            assert not F.update_running_stats(rm, rv, torch.zeros(3), big, 2, 0.5)
        assert torch.equal(rv, big) and torch.equal(rm, torch.zeros(3))
    rm, rv, nbt = np.zeros(3, np.float32), np.full(3, 3e38, np.float32), np.zeros(1, np.int64)
    assert not K.running_update(rm, rv, np.zeros(3), np.full(3, 3e38), 0.5, 1.0, nbt)
    assert (rv == np.float32(3e38)).all() and (rm == 0).all() and nbt[0] == 0
    assert K.running_update(rm, rv, np.ones(3), np.full(3, 3e38), 0.5, 0.5, nbt)  # fits
    assert nbt[0] == 1 and np.isfinite(rv).all()


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 7)])
def test_eval_backward_of_both_backends_agree(shape: tuple[int, ...]) -> None:
    """Backend.backward_eval: the kernels' one pass against torch operations (the oracle),
    dx and both per-channel sums."""
    x, dy = _rand(shape) * 3 + 1, _rand(shape)
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    w = torch.rand(4, dtype=torch.float64) + 0.5
    ours = F.get_backend(x, "numba").backward_eval(dy, x, mean, var, w, 1e-3, True)
    oracle = F.get_backend(x, "torch").backward_eval(dy, x, mean, var, w, 1e-3, True)
    for a, e in zip(ours, oracle, strict=True):
        assert a is not None and e is not None
        torch.testing.assert_close(a.to(e.dtype), e, rtol=1e-10, atol=1e-10)
    assert F.get_backend(x, "numba").backward_eval(dy, x, mean, var, w, 1e-3, False)[0] is None


def _orders(rank: int) -> st.SearchStrategy[list[int]]:
    """Orders of dims in memory, outermost first: any, or the channels innermost."""
    channels_last = [0, *range(2, rank), 1]
    return st.one_of(st.just(channels_last), st.permutations(range(rank)))


def _dense_in(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``t``'s values in dense memory laid out in ``order`` (outermost dim first)."""
    return t.permute(*order).contiguous().permute(*[order.index(i) for i in range(t.dim())])


@st.composite
def _strided_inputs(
    draw: st.DrawFn,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], str]:
    """``(leaf, view, kind)``: a float64 input ``view(leaf)`` with arbitrary strides —
    dense in a permuted order, every other index along an axis, a slice of the channels, or
    expanded along an axis of size 1 — and ranks 2 to 5 (the size-1 dims' strides included,
    which a permuted layout leaves other than ``contiguous(memory_format=...)`` would)."""
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(2, 5)), draw(st.integers(1, 4))]
    shape += [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    kind = draw(st.sampled_from(["permuted", "every other", "channel slice", "expanded"]))
    base = list(shape)
    d = draw(st.integers(0, rank - 1))
    if kind == "every other":
        base[d] *= 2
    elif kind == "channel slice":
        base[1] += 2
    elif kind == "expanded":
        d = draw(st.sampled_from([0, *range(2, rank)]))
        base[d] = 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    leaf = torch.randn(base, generator=g, dtype=torch.float64) * 3 + 1
    if kind in ("permuted", "channel slice"):  # a dense layout in a random order of dims
        leaf = _dense_in(leaf, draw(_orders(rank)))
    leaf.requires_grad_()

    def view(t: torch.Tensor) -> torch.Tensor:
        if kind == "every other":
            return t[(slice(None),) * d + (slice(None, None, 2),)]
        if kind == "channel slice":
            return t[:, : shape[1]]
        if kind == "expanded":
            return t.expand(shape)
        return t

    return leaf, view, kind


@settings(max_examples=150, deadline=None)
@given(
    inp=_strided_inputs(),
    dy_order=st.data(),
    backend=st.sampled_from(["torch", "numba"]),
    training=st.booleans(),
    track=st.booleans(),
)
def test_any_strides_give_what_a_contiguous_copy_gives(
    inp: tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], str],
    dy_order: st.DataObject,
    backend: str,
    training: bool,
    track: bool,
) -> None:
    """Output, first and second derivatives (a gradient penalty) and running statistics of
    any strided input, with the upstream gradient in any dense layout, equal torch.nn's on a
    contiguous copy (the oracle is the copy: torch.nn itself got the gradients of some of
    these layouts wrong, see the README)."""
    import batchnorm

    leaf, view, kind = inp
    x = view(leaf)
    c = x.shape[1]
    if (training or not track) and bool(
        (x.detach().var(dim=[0, *range(2, x.dim())], unbiased=False) < 1e-6).any()
    ):
        return  # a constant channel: x̂ is rounding noise
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}
    ncls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
    ours = cls.get(x.dim(), batchnorm.BatchNorm3d)(
        c, backend=backend, track_running_stats=track, dtype=torch.float64
    )
    theirs = ncls.get(x.dim(), torch.nn.BatchNorm3d)(
        c, track_running_stats=track, dtype=torch.float64
    )
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
        if track:
            ours.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
            ours.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
    theirs.load_state_dict(ours.state_dict())
    ours.train(training)
    theirs.train(training)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dy = _dense_in(dy, dy_order.draw(_orders(x.dim())))
    xc = x.detach().contiguous().requires_grad_()

    def on_leaf(dxe: torch.Tensor, d_leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's dx against the leaf's: summed where the leaf was expanded, else
        the leaf's read through the same view."""
        if kind == "expanded":
            dims = [d for d in range(x.dim()) if leaf.shape[d] == 1 and x.shape[d] > 1]
            return (dxe.sum(dim=dims, keepdim=True) if dims else dxe), d_leaf
        return dxe, view(d_leaf)

    y = ours(x)
    d_leaf, dw, db = torch.autograd.grad(y, (leaf, ours.weight, ours.bias), dy)
    dyc = dy.contiguous()  # (torch.nn errs for some pairs of layouts: README)
    ye = theirs(xc)
    dxe, dwe, dbe = torch.autograd.grad(ye, (xc, theirs.weight, theirs.bias), dyc)
    # a gradient penalty: second derivatives through the backward
    (g,) = torch.autograd.grad((ours(x) * dy).sum(), (x,), create_graph=True)
    # (allow_unused: in eval mode g does not depend on x)
    dd_leaf, ddw = torch.autograd.grad(
        g.square().sum(), (leaf, ours.weight), allow_unused=True, materialize_grads=True
    )
    (ge,) = torch.autograd.grad((theirs(xc) * dyc).sum(), (xc,), create_graph=True)
    ddxe, ddwe = torch.autograd.grad(
        ge.square().sum(), (xc, theirs.weight), allow_unused=True, materialize_grads=True
    )
    for a, e in (
        (y, ye),
        on_leaf(dxe, d_leaf)[::-1],
        (dw, dwe),
        (db, dbe),
        on_leaf(ddxe, dd_leaf)[::-1],
        (ddw, ddwe),
    ):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    if track:
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_an_odd_size_one_stride_get_the_contiguous_gradients(
    dtype: torch.dtype, native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half inputs go to torch's operator, whose backward errs on the strides above (off by
    O(1) in bfloat16): such an input is given to it as its canonical view, on the compiled
    node's path and without it, in training and eval mode."""
    import batchnorm

    monkeypatch.setenv("BATCHNORM_NATIVE", native)
    t = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    dy = torch.arange(12, dtype=dtype).reshape(2, 2, 3, 1)
    for training in (True, False):
        results = []
        for make in (
            lambda a: a.transpose(1, 2).unsqueeze(-1),
            lambda a: a.transpose(1, 2).unsqueeze(-1).contiguous(),
        ):
            a = t.to(dtype).requires_grad_()
            m = batchnorm.BatchNorm2d(2).to(dtype).train(training)
            y = m(make(a))
            y.backward(dy)
            results.append((y, a.grad, m.weight.grad, m.running_var))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_channels_innermost_with_a_size_one_dim_gets_the_contiguous_gradients() -> None:
    """``(N, H, C)`` transposed to ``(N, C, H)`` and unsqueezed to ``(N, C, H, 1)``: strides
    ``(H·C, 1, C, 1)``, channels innermost with a size-1 dim whose stride is 1. Gradients equal
    those of the contiguous copy (torch.nn 2.13's BatchNorm2d differs there: README)."""
    import batchnorm

    t = torch.randn(2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dy = torch.arange(12, dtype=torch.float64).reshape(2, 2, 3, 1)
    grads = []
    for make in (
        lambda a: a.transpose(1, 2).unsqueeze(-1),
        lambda a: a.transpose(1, 2).unsqueeze(-1).contiguous(),
    ):
        for backend in ("torch", "numba"):
            a = t.clone().requires_grad_()
            x = make(a)
            m = batchnorm.BatchNorm2d(2, backend=backend, dtype=torch.float64)
            m(x).backward(dy)
            grads.append((a.grad, m.weight.grad))
    assert grads[0][0] is not None
    for g in grads[1:]:
        for a, e in zip(g, grads[0], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_the_step_train_and_eval_functions_check_their_input_as_batch_norm_does() -> None:
    # an axis that does not exist wrapped around to another one (and the step wrote the
    # running buffers from it); integer and 0-d inputs gave truncated values or bare errors
    x = torch.randn(4, 3, 5, 6)
    rm, rv = torch.zeros(6), torch.ones(6)
    calls = {
        "batch_norm_train": lambda: F.batch_norm_train(x, axis=-5),
        "batch_norm_step": lambda: F.batch_norm_step(x, rm, rv, axis=-5),
        "batch_norm_eval": lambda: F.batch_norm_eval(x, torch.zeros(3), torch.ones(3), axis=5),
    }
    for name, call in calls.items():
        with pytest.raises(BatchNormInputError, match=rf"^{name}: axis=-?5 is out of range"):
            call()
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))
    ints = torch.tensor([[1, -2, 3], [0, 4, -1]])
    with pytest.raises(BatchNormInputError, match="^batch_norm_eval: expected a floating-point"):
        F.batch_norm_eval(ints, torch.full((3,), 0.3), torch.full((3,), 4.0))
    with pytest.raises(BatchNormInputError, match="^batch_norm_train: expected a floating-point"):
        F.batch_norm_train(ints)
    for scalar_call in (
        lambda: F.batch_norm_train(torch.tensor(1.0)),
        lambda: F.batch_norm_eval(torch.tensor(1.0), torch.zeros(1), torch.ones(1)),
        lambda: F.batch_norm_eval(torch.randn(3), torch.zeros(3), torch.ones(3)),
    ):
        with pytest.raises(BatchNormInputError, match="at least 2D"):
            scalar_call()
    with pytest.raises(ValueError, match="nonfinite must be 'warn' or 'raise'.*'rasie'"):
        F.batch_norm_step(torch.randn(4, 6), rm, rv, nonfinite="rasie")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite must be 'warn' or 'raise'"):
        F.update_running_stats(rm, rv, torch.zeros(6), torch.ones(6), 4, 0.1, nonfinite="x")  # type: ignore[arg-type]
    # torch's function normalizes an empty training batch to an empty output; so does ours
    y = F.batch_norm(torch.randn(0, 6, 4), rm, rv, None, None, True)
    assert y.shape == (0, 6, 4) and torch.equal(rm, torch.zeros(6))
    # the TorchScript path names a batch with no variance instead of dividing by zero
    with pytest.raises(BatchNormInputError, match="needs m ≥ 2 values per channel"):
        F.batch_norm_scriptable(
            torch.randn(1, 3), None, None, torch.zeros(3), torch.ones(3), None,
            True, True, 0.1, 1e-5, 1, True, "warn", "BN(3)",
        )  # fmt: skip


@pytest.mark.parametrize("momentum", [None, float("nan"), float("inf"), "0.1", True])
def test_a_momentum_that_is_not_a_finite_number_is_refused_by_name(momentum: object) -> None:
    """It used to give a bare TypeError (None) or a warning blaming the input (NaN), from the
    functions and from a layer whose attribute was set after construction, also scripted."""
    x = torch.randn(8, 3)
    calls = {
        "batch_norm": lambda: F.batch_norm(
            x, torch.zeros(3), torch.ones(3), training=True, momentum=momentum
        ),
        "batch_norm_step": lambda: F.batch_norm_step(
            x, torch.zeros(3), torch.ones(3), momentum=momentum
        ),
        "update_running_stats": lambda: F.update_running_stats(
            torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3), 8, momentum
        ),
    }
    for name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(BatchNormInputError, match=rf"^{name}: momentum must be a finite"):
                call()
    if isinstance(momentum, float):
        bn = batchnorm.BatchNorm1d(3)
        bn.momentum = momentum
        with pytest.raises(BatchNormInputError, match=r"^BatchNorm1d\(3\): momentum must be"):
            bn(x)
        with pytest.raises(torch.jit.Error, match=r"BatchNorm1d\(3\): momentum must be"):
            torch.jit.script(bn)(x)
        assert torch.equal(bn.running_mean, torch.zeros(3))


_EMPTY_EVAL_BACKWARD = """
import torch, batchnorm
from batchnorm import functional as F
torch.set_num_threads(1)
calls = {
    "batch_norm": lambda x, w, b: F.batch_norm(x, torch.zeros(3), torch.ones(3), w, b),
    "batch_norm_eval": lambda x, w, b: F.batch_norm_eval(x, torch.zeros(3), torch.ones(3), w, b),
    "torch.nn": lambda x, w, b: torch.nn.functional.batch_norm(
        x, torch.zeros(3), torch.ones(3), w, b
    ),
}
frozen = batchnorm.FrozenBatchNorm2d(3)
calls["FrozenBatchNorm2d"] = lambda x, w, b: frozen(x)
for shape, dtype in (((0, 3, 4, 4), torch.bfloat16), ((0, 3, 4, 4), torch.float16),
                     ((4, 3, 0, 4), torch.float32), ((4, 3, 0, 4), torch.float64)):
    for name, call in calls.items():
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        call(x, w, b).sum().backward()
        assert x.grad is not None and x.grad.shape == shape and not x.grad.any(), name
        if name != "FrozenBatchNorm2d":
            assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
print("ok")
"""


def test_an_empty_batch_in_eval_mode_has_empty_gradients() -> None:
    """As torch.nn.functional.batch_norm gives: the half-precision operator's backward on an
    empty batch killed the process (SIGFPE), the kernels' backward divided by zero."""
    r = subprocess.run(
        [sys.executable, "-c", _EMPTY_EVAL_BACKWARD], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and r.stdout.split()[-1:] == ["ok"], (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), [0.1], [0.1, 0.5, 0.9]],
    ids=["nan", "inf", "one-element", "per-channel"],
)
def test_a_tensor_momentum_that_is_not_one_finite_number_is_refused_by_name(
    value: object, backend: str
) -> None:
    """A 0-d tensor momentum is a number, as torch.nn takes it: a non-finite one was blended
    into nothing and reported as a non-finite batch, from the functions and from a layer whose
    attribute was set after construction. Any other tensor is refused (torch refuses it too):
    one of one element was taken, a per-channel one gave a bare TypeError."""
    x = torch.randn(8, 3)
    momentum = torch.tensor(value)
    rm, rv = torch.zeros(3), torch.ones(3)
    bn = batchnorm.BatchNorm1d(3, backend=backend)
    bn.momentum = momentum  # type: ignore[assignment]
    calls = {
        "batch_norm": lambda: F.batch_norm(
            x,
            rm,
            rv,
            training=True,
            momentum=momentum,
            backend=backend,  # type: ignore[arg-type]
        ),
        "batch_norm_step": lambda: F.batch_norm_step(x, rm, rv, momentum=momentum, backend=backend),  # type: ignore[arg-type]
        "update_running_stats": lambda: F.update_running_stats(
            rm,
            rv,
            torch.zeros(3),
            torch.ones(3),
            8,
            momentum,  # type: ignore[arg-type]
        ),
        r"BatchNorm1d\(3\)": lambda: bn(x),
    }
    for name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(BatchNormInputError, match=rf"^{name}: momentum must be a finite"):
                call()
    if momentum.dim():
        with pytest.raises(BatchNormInputError, match=r"a tensor must be 0-d, one number for"):
            F.batch_norm(x, rm, rv, training=True, momentum=momentum)  # type: ignore[arg-type]
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0  # type: ignore[arg-type]


def test_update_running_stats_names_itself() -> None:
    with pytest.raises(BatchNormInputError, match=r"^update_running_stats: .*m ≥ 2"):
        F.update_running_stats(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3), 1, 0.1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("buffers", [True, False])
def test_batch_norm_checks_its_nonfinite_policy_by_its_own_name(
    training: bool, buffers: bool
) -> None:
    rm, rv = (torch.zeros(3), torch.ones(3)) if buffers else (None, None)
    with pytest.raises(ValueError, match=r"^batch_norm: nonfinite must be 'warn' or 'raise'"):
        F.batch_norm(torch.randn(8, 3), rm, rv, training=training, nonfinite="ignore")  # type: ignore[arg-type]


def test_numpy_scalar_momenta_are_numbers() -> None:
    """np.float32(0.1) is a momentum, as for torch.nn (a finiteness check once refused it)."""
    x = torch.randn(8, 3)
    for m in (np.float32(0.1), np.float16(0.5), np.int64(1), 0, 1, torch.tensor(0.1)):
        ours, ref = batchnorm.BatchNorm1d(3, momentum=m), torch.nn.BatchNorm1d(3, momentum=float(m))
        ours(x)
        ref(x)
        torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("how", ["torch-backend", "create-graph"])
def test_eval_mode_weight_gradient_keeps_its_digits_far_from_zero_mean(how: str) -> None:
    # the plain-torch inference map x·scale + shift, differentiated by autograd, gave
    # dγ = Σdy·x/σ − μ·Σdy/σ: 14 % off at |μ|/σ = 1e5 in float32, where torch.nn is exact
    torch.manual_seed(0)
    x = torch.randn(64, 4) + 1e5
    dy = torch.randn(64, 4)
    rm, rv = x.double().mean(0).float(), x.double().var(0).float()  # the same values for both
    grads = {}
    for cls, dt in ((torch.nn.BatchNorm1d, torch.float64), (batchnorm.BatchNorm1d, torch.float32)):
        kwargs = (
            {"backend": "torch"} if cls is batchnorm.BatchNorm1d and how == "torch-backend" else {}
        )
        layer = cls(4, **kwargs).to(dt).eval()
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
        y = layer(x.to(dt).requires_grad_(how == "create-graph"))
        (g,) = torch.autograd.grad(y, [layer.weight], dy.to(dt), create_graph=how == "create-graph")
        grads[dt] = g.double()
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64], rtol=1e-5, atol=1e-5)


def test_torch_backend_variance_is_two_pass_accurate_far_from_zero_mean() -> None:
    # torch.var_mean's one-pass Welford: relative error 4e-9 in float64 at an offset of 1e8
    # (torch.nn: 7e-16); the oracle of the kernels is held to the reference instead
    torch.manual_seed(0)
    for offset in (1e8, 1e12):
        x = torch.randn(13, 1, dtype=torch.float64) + offset
        mean, var, _ = F._stats(x, 0.0)
        ref_mean, ref_var = ref.batch_norm_forward(x.numpy(), None, None, 0.0)[2:4]
        np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-12)
        np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-15)
