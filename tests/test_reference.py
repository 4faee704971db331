"""The NumPy reference against independent oracles: torch autograd in float64 and the paper's
definitions written out directly."""

import re

import numpy as np
import pytest
import torch

from batchnorm import reference as ref

SHAPES_AXES = [
    ((60, 100), 1),
    ((8, 3, 5), 1),
    ((4, 3, 5, 6), 1),
    ((2, 3, 4, 5, 6), 1),
    ((7, 5, 4), -1),
    ((3, 4, 5), 0),
]


def _torch_bn(
    x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float, axis: int
) -> torch.Tensor:
    """Algorithm 1 written with autograd-tracked elementwise ops (an independent oracle)."""
    dims = tuple(i for i in range(x.dim()) if i != axis % x.dim())
    shape = [1] * x.dim()
    shape[axis] = -1
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * g.view(shape) + b.view(shape)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_forward_and_backward_match_autograd(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=shape)
    c = shape[axis]
    g, b = rng.normal(size=c), rng.normal(size=c)
    dy = rng.normal(size=shape)
    y, xhat, mean, var = ref.batch_norm_forward(x, g, b, 1e-5, axis)
    dx, dg, db = ref.batch_norm_backward(dy, x, g, 1e-5, axis)

    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(g, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    yt = _torch_bn(xt, gt, bt, 1e-5, axis)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_xhat_statistics_and_convolution_joint_normalization() -> None:
    x = np.random.default_rng(1).normal(5.0, 2.0, size=(6, 4, 7, 3))
    _, xhat, mean, var = ref.batch_norm_forward(x, eps=0.0)
    # per channel, jointly over batch and positions
    np.testing.assert_allclose(xhat.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(xhat.var(axis=(0, 2, 3)), 1.0, atol=1e-12)
    np.testing.assert_allclose(mean, x.transpose(1, 0, 2, 3).reshape(4, -1).mean(axis=1))
    np.testing.assert_allclose(var, x.transpose(1, 0, 2, 3).reshape(4, -1).var(axis=1))


def test_population_stats_is_algorithm_2() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.normal(1.0, 2.0, size=(10, 3, 2)) for _ in range(5)]
    mean, var = ref.population_stats(batches)
    m = 10 * 2
    exp_mean = np.mean([b.mean(axis=(0, 2)) for b in batches], axis=0)
    exp_var = m / (m - 1) * np.mean([b.var(axis=(0, 2)) for b in batches], axis=0)
    np.testing.assert_allclose(mean, exp_mean)
    np.testing.assert_allclose(var, exp_var)
    with pytest.raises(ValueError, match="drop_last"):
        ref.population_stats([batches[0], batches[1][:5]])


def test_inference_is_the_affine_map() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 4))
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    g, b = rng.normal(size=4), rng.normal(size=4)
    y = ref.batch_norm_inference(x, mean, var, g, b, eps=1e-3, axis=1)
    y2, _ = ref.normalize(x, mean, var, g, b, eps=1e-3, axis=1)
    np.testing.assert_allclose(y, y2, rtol=1e-12, atol=1e-12)
    # against the formula written out, and torch.nn's functional form in float64
    np.testing.assert_allclose(y, g * (x - mean) / np.sqrt(var + 1e-3) + b, rtol=1e-12)
    t = torch.nn.functional.batch_norm(
        *(torch.from_numpy(v) for v in (x, mean, var, g, b)), training=False, eps=1e-3
    )
    np.testing.assert_allclose(y, t.numpy(), rtol=1e-12, atol=1e-12)
    scale, shift = ref.inference_affine(mean, var, g, b, 1e-3)
    np.testing.assert_allclose(scale, g / np.sqrt(var + 1e-3), rtol=1e-12)
    np.testing.assert_allclose(shift, b - mean * g / np.sqrt(var + 1e-3), rtol=1e-12, atol=1e-12)


def test_running_stats_update_conventions() -> None:
    rm, rv = ref.running_stats_update(
        np.zeros(2), np.ones(2), np.array([1.0, 2.0]), np.array([4.0, 4.0]), 5, 0.1
    )
    np.testing.assert_allclose(rm, [0.1, 0.2])
    np.testing.assert_allclose(rv, [0.9 + 0.1 * 4 * 5 / 4] * 2)
    _, rv_b = ref.running_stats_update(
        np.zeros(2), np.ones(2), np.zeros(2), np.array([4.0, 4.0]), 5, 0.1, unbiased=False
    )
    np.testing.assert_allclose(rv_b, [0.9 + 0.4] * 2)


@pytest.mark.parametrize("axis", [3, -4, 7])
def test_axes_outside_the_input_are_refused(axis: int) -> None:
    x = np.random.default_rng(0).standard_normal((8, 5, 3))
    for call in (
        lambda: ref.batch_norm_forward(x, axis=axis),
        lambda: ref.batch_stats(x, axis),
        lambda: ref.reduce_axes(x.ndim, axis),
        lambda: ref.channel_count(x.shape, axis),
        lambda: ref.batch_norm_inference(x, np.zeros(3), np.ones(3), axis=axis),
    ):
        with pytest.raises(np.exceptions.AxisError, match="out of bounds for array of dimension 3"):
            call()
    assert ref.reduce_axes(3, -3) == (1, 2) and ref.channel_count(x.shape, -1) == 40


def test_running_stats_update_unbiased_needs_two_values() -> None:
    args = (np.zeros(2), np.ones(2), np.ones(2), np.full(2, 4.0))
    for count in (1, 0):
        with pytest.raises(ValueError, match=f"at least 2 values per channel, got count={count}"):
            ref.running_stats_update(*args, count, 0.1)
    # torch refuses one value per channel in training as well
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm1d(2)(torch.randn(1, 2))
    _, rv = ref.running_stats_update(*args, 1, 0.1, unbiased=False)
    np.testing.assert_allclose(rv, [0.9 + 0.4] * 2)


def _exact_backward(x: np.ndarray, dy: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """dx of (M, C) inputs in 50-digit decimal arithmetic from the floats' exact values."""
    from decimal import Decimal, localcontext

    out = np.empty_like(x)
    with localcontext() as ctx:
        ctx.prec = 50
        M, C = x.shape
        for c in range(C):
            xs = [Decimal(float(v)) for v in x[:, c]]
            ds = [Decimal(float(v)) for v in dy[:, c]]
            mu = sum(xs) / M
            inv = 1 / (sum((v - mu) ** 2 for v in xs) / M + Decimal(eps)).sqrt()
            xh = [(v - mu) * inv for v in xs]
            sdy, sdyx = sum(ds), sum(d * h for d, h in zip(ds, xh, strict=True))
            k = Decimal(float(g[c])) * inv / M
            for i in range(M):
                out[i, c] = float(k * (M * ds[i] - sdy - xh[i] * sdyx))
    return out


def test_backward_keeps_its_digits_when_the_mean_is_not_a_float() -> None:
    """Two values near −1000 whose mean needs one bit more than float64 has: x − μ_B is then
    off by half an ulp of 1000 (5.7e-14), and where σ²_B is close to ε the bracket of dx
    cancels to 1 % of its terms — dx was off by 4.7e-11 on a value of 0.24 (the kernels,
    which carry the mean's rounding separately, were right to 5e-15)."""
    rng = np.random.default_rng(0)
    x = -1000.0 + rng.standard_normal((2, 8))
    dy = rng.standard_normal((2, 8))
    g = rng.uniform(0.5, 1.5, 8)
    dx, _, _ = ref.batch_norm_backward(dy, x, g)
    want = _exact_backward(x, dy, g, 1e-5)
    assert np.max(np.abs(dx - want)) <= 1e-14 * np.max(np.abs(want))


def test_forward_takes_xhat_from_the_corrected_centered_values() -> None:
    """x̂ came from x minus the uncorrected mean: a constant channel of 1e30 normalized to
    −2.7e17 (σ²_B was right, 0), and at an offset of 1e12 y was off by 1.5e-4."""
    const = np.full((64, 1), 1e30)
    y, xhat, _, var = ref.batch_norm_forward(const)
    assert var[0] == 0.0 and np.all(y == 0.0) and np.all(xhat == 0.0)
    y, _, _, _ = ref.batch_norm_forward(np.full((100, 1), 1000000.1))
    assert np.all(y == 0.0)
    rng = np.random.default_rng(3)
    x = 1e12 + rng.integers(-8, 9, (16, 2)).astype(np.float64)  # exact in float64
    d = x - x.mean(axis=0, dtype=np.longdouble).astype(np.float64)  # exact here: means of ints/16
    want = d / np.sqrt((d**2).mean(axis=0) + 1e-5)
    y, _, _, _ = ref.batch_norm_forward(x)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-12)


def test_renorm_at_r_max_1_d_max_0_is_batch_norm_far_from_zero_mean() -> None:
    # x̂ was x − round(μ_B): a constant channel of 1e30 gave 4e16, not 0, and an offset of
    # 1e12 with spread 1e-3 lost 8e-2 of y, where batch_norm_forward keeps 4e-16
    rng = np.random.default_rng(0)
    for x in (np.full((64, 1), 1e30), rng.normal(1e12, 1e-3, size=(16, 3))):
        c = x.shape[1]
        want = ref.batch_norm_forward(x)[0]
        got = ref.batch_renorm_forward(x, np.zeros(c), np.ones(c), r_max=1.0, d_max=0.0)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_shapes_that_would_broadcast_are_refused_by_name() -> None:
    # a (1, C) dy summed dγ and dβ over one row; a length-1 γ scaled every channel; a (C, 1)
    # γ made inference_affine's scale (C, C)
    x = np.random.default_rng(1).normal(size=(4, 3))
    for call, says in (
        (lambda: ref.batch_norm_backward(np.ones((1, 3)), x), "dy has shape (1, 3) but x"),
        (lambda: ref.batch_norm_forward(x, np.ones(1)), "gamma has shape (1,)"),
        (lambda: ref.batch_norm_forward(x, np.ones((3, 1))), "gamma has shape (3, 1)"),
        (lambda: ref.inference_affine(np.zeros(3), np.ones(3), np.ones((3, 1))), "gamma"),
        (lambda: ref.normalize(x, np.zeros(2), np.ones(3)), "mean has shape (2,)"),
        (
            lambda: ref.running_stats_update(
                np.zeros(3), np.ones(2), np.zeros(3), np.ones(3), 4, 0.1
            ),
            "running_var",
        ),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            call()


def test_outputs_are_independent_arrays_and_parameters_are_checked() -> None:
    x = np.random.default_rng(2).normal(size=(8, 2))
    y, xhat, _, _ = ref.batch_norm_forward(x)
    assert y is not xhat and not np.shares_memory(y, xhat)
    for call, says in (
        (lambda: ref.batch_renorm_forward(x, np.zeros(2), np.ones(2), r_max=0.5), "r_max"),
        (lambda: ref.batch_renorm_forward(x, np.zeros(2), np.ones(2), d_max=-1.0), "d_max"),
        (lambda: ref.batch_norm_forward(x, eps=-0.5), "eps must be a finite number >= 0"),
        (
            lambda: ref.running_stats_update(
                np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), 4, None
            ),
            "momentum must be",
        ),  # type: ignore[arg-type]
        (
            lambda: ref.running_stats_update(
                np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), 0, 0.1, unbiased=False
            ),
            "count=0",
        ),
    ):
        with pytest.raises(ValueError, match=says):
            call()
    with pytest.raises(TypeError, match="axis must be an integer"):
        ref.batch_norm_forward(x, axis=1.0)  # type: ignore[arg-type]
