"""NumPy float64 ground truth for batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167).

Pure functions, no state, written to be read next to the paper. Every other implementation in
this package (the torch functional core, the fused kernels, the variants) is tested against
these. The channel axis may be any axis; statistics are taken jointly over every other axis, so
for a convolution's ``(N, C, H, W)`` output each channel is normalized over the batch and all
positions (the paper's Sec. 3.2).

Example::

    >>> import numpy as np
    >>> from batchnorm import reference as ref
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(60, 100))
    >>> y, xhat, mean, var = ref.batch_norm_forward(x, np.ones(100), np.zeros(100))
    >>> bool(np.allclose(xhat.mean(axis=0), 0.0) and np.allclose(xhat.var(axis=0), 1.0, atol=1e-4))
    True
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

__all__ = [
    "reduce_axes",
    "channel_count",
    "batch_stats",
    "normalize",
    "batch_norm_forward",
    "batch_norm_backward",
    "population_stats",
    "inference_affine",
    "batch_norm_inference",
    "running_stats_update",
    "batch_renorm_forward",
]


def _f64(a: ArrayLike) -> Array:
    return np.asarray(a, dtype=np.float64)


def _axis(axis: int, ndim: int) -> int:
    """``axis`` as an index in ``range(ndim)`` (negative counts from the end); NumPy's
    ``AxisError`` (a ``ValueError`` and ``IndexError``) when the array has no such axis."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(axis, ndim)
    return axis % ndim


def reduce_axes(ndim: int, axis: int = 1) -> tuple[int, ...]:
    """All axes except the channel axis: the axes the statistics are taken over."""
    axis = _axis(axis, ndim)
    return tuple(i for i in range(ndim) if i != axis)


def _bcast(v: Array, ndim: int, axis: int) -> Array:
    """A per-channel vector shaped to broadcast against an ``ndim`` array along ``axis``."""
    shape = [1] * ndim
    shape[_axis(axis, ndim)] = -1
    return v.reshape(shape)


def _vector(v: ArrayLike, c: int, what: str, fn: str) -> Array:
    """The per-channel ``v`` as a float64 vector of ``c`` values; ``ValueError`` naming ``fn``
    and ``what`` otherwise (a length-1 or 2-D array would broadcast or flatten silently)."""
    a = _f64(v)
    if a.ndim != 1 or a.shape[0] != c:
        raise ValueError(
            f"{fn}: {what} has shape {a.shape}, but there are {c} channels: per-channel values "
            f"need shape ({c},)"
        )
    return a


def _check_eps(eps: float, fn: str) -> None:
    if not (isinstance(eps, int | float | np.floating) and 0 <= eps < np.inf):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")


def channel_count(shape: tuple[int, ...], axis: int = 1) -> int:
    """m: the number of values each channel's statistics are taken over."""
    axis = _axis(axis, len(shape))
    return int(np.prod([s for i, s in enumerate(shape) if i != axis], dtype=np.int64))


def _centered(x: Array, axis: int) -> tuple[Array, Array]:
    """``(μ_B, x − μ_B)`` per channel. The mean is rounded to float64; the mean of ``x − μ_B``
    (that rounding, exactly representable where x − μ_B is exact) is subtracted again, so the
    centered values keep their digits when |μ_B| ≫ the spread (the corrected two-pass
    algorithm of Chan, Golub & LeVeque)."""
    axes = reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    d = x - _bcast(mean, x.ndim, axis)
    return mean, d - d.mean(axis=axes, keepdims=True)


def _moments(x: Array, axis: int) -> tuple[Array, Array, Array]:
    """``(μ_B, x − μ_B, σ²_B)``: two passes, the mean subtracted before squaring (stable where
    E[x²] − E[x]² is not), with :func:`_centered`'s correction."""
    mean, d = _centered(x, axis)
    return mean, d, (d**2).mean(axis=reduce_axes(x.ndim, axis))


def batch_stats(x: ArrayLike, axis: int = 1) -> tuple[Array, Array]:
    """Mini-batch mean μ_B and biased variance σ²_B = (1/m)Σ(x − μ_B)² per channel (Algorithm 1)."""
    mean, _, var = _moments(_f64(x), axis)
    return mean, var


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, Array]:
    """x̂ = (x − μ)/√(σ² + ε) and y = γ x̂ + β; returns ``(y, xhat)``."""
    x = _f64(x)
    c = x.shape[_axis(axis, x.ndim)]
    m = _bcast(_vector(mean, c, "mean", "normalize"), x.ndim, axis)
    return _scaled(x - m, var, gamma, beta, eps, axis, "normalize")


def _scaled(
    d: Array,
    var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    axis: int,
    fn: str,
) -> tuple[Array, Array]:
    """``(y, x̂)`` from the centered values ``d = x − μ``: x̂ = d/√(σ² + ε), y = γ x̂ + β (two
    arrays: y is not x̂ itself when γ and β are None)."""
    _check_eps(eps, fn)
    c = d.shape[_axis(axis, d.ndim)]
    xhat = d / np.sqrt(_bcast(_vector(var, c, "var", fn), d.ndim, axis) + eps)
    y = xhat.copy()
    if gamma is not None:
        y *= _bcast(_vector(gamma, c, "gamma", fn), d.ndim, axis)
    if beta is not None:
        y += _bcast(_vector(beta, c, "beta", fn), d.ndim, axis)
    return y, xhat


def batch_norm_forward(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, Array, Array, Array]:
    """Algorithm 1, the training transform. Returns ``(y, xhat, mean, var)`` with biased ``var``.
    x̂ is taken from the same corrected centered values as σ²_B (see :func:`batch_stats`), so a
    constant channel gives exactly 0 and |μ_B| ≫ spread keeps its digits."""
    mean, d, var = _moments(_f64(x), axis)
    y, xhat = _scaled(d, var, gamma, beta, eps, axis, "batch_norm_forward")
    return y, xhat, mean, var


def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, Array, Array]:
    """Gradients of Algorithm 1: ``(dx, dgamma, dbeta)``.

    The paper's chain rule (Sec. 3) through x̂, σ²_B and μ_B collapses to

        dγ = Σ dy·x̂,   dβ = Σ dy,
        dx = γ/(m·√(σ²_B + ε)) · (m·dy − Σ dy − x̂ · Σ dy·x̂)

    with the sums per channel over the m values of the batch.
    """
    x = _f64(x)
    dy = _f64(dy)
    if dy.shape != x.shape:
        # a broadcastable dy would sum dγ and dβ over its own rows, not the batch's
        raise ValueError(
            f"batch_norm_backward: dy has shape {dy.shape} but x has shape {x.shape}; the "
            "gradient of y has y's (and so x's) shape"
        )
    _check_eps(eps, "batch_norm_backward")
    axes = reduce_axes(x.ndim, axis)
    m = channel_count(x.shape, axis)
    _, d, var = _moments(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = d * _bcast(invstd, x.ndim, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    c = var.shape[0]
    g = np.ones_like(var) if gamma is None else _vector(gamma, c, "gamma", "batch_norm_backward")
    k = _bcast(g * invstd / m, x.ndim, axis)
    dx = k * (m * dy - _bcast(dbeta, x.ndim, axis) - xhat * _bcast(dgamma, x.ndim, axis))
    return dx, dgamma, dbeta


def population_stats(batches: Iterable[ArrayLike], axis: int = 1) -> tuple[Array, Array]:
    """Algorithm 2, step 10: E[x] = E_B[μ_B] and Var[x] = m/(m−1) · E_B[σ²_B].

    The expectations are over mini-batches of equal size m (values per channel), as in the paper.
    """
    means: list[Array] = []
    variances: list[Array] = []
    m: int | None = None
    for b in batches:
        b = _f64(b)
        mb = channel_count(b.shape, axis)
        if m is None:
            m = mb
        elif mb != m:
            raise ValueError(
                f"population_stats: Algorithm 2 averages mini-batches of one size; got m={mb} "
                f"after m={m}. Drop the uneven last batch (drop_last=True)."
            )
        mu, var = batch_stats(b, axis)
        means.append(mu)
        variances.append(var)
    if m is None:
        raise ValueError("population_stats: no mini-batches were given")
    if m < 2:
        raise ValueError("population_stats: need at least 2 values per channel per mini-batch")
    mean = np.mean(means, axis=0)
    var = m / (m - 1) * np.mean(variances, axis=0)
    return mean, var


def inference_affine(
    mean: ArrayLike,
    var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[Array, Array]:
    """Algorithm 2, step 11: BN at inference is y = scale·x + shift with
    scale = γ/√(Var[x] + ε) and shift = β − scale·E[x]."""
    fn = "inference_affine"
    _check_eps(eps, fn)
    mean = _f64(mean)
    if mean.ndim != 1:
        raise ValueError(f"{fn}: mean has shape {mean.shape}; per-channel values need shape (C,)")
    c = mean.shape[0]
    g = np.ones_like(mean) if gamma is None else _vector(gamma, c, "gamma", fn)
    b = np.zeros_like(mean) if beta is None else _vector(beta, c, "beta", fn)
    scale = g / np.sqrt(_vector(var, c, "var", fn) + eps)
    shift = b - scale * mean
    return scale, shift


def batch_norm_inference(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> Array:
    """BN with population statistics: the single affine map of :func:`inference_affine`."""
    x = _f64(x)
    c = x.shape[_axis(axis, x.ndim)]
    scale, shift = inference_affine(
        _vector(mean, c, "mean", "batch_norm_inference"), var, gamma, beta, eps
    )
    return x * _bcast(scale, x.ndim, axis) + _bcast(shift, x.ndim, axis)


def running_stats_update(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var: ArrayLike,
    count: int,
    momentum: float,
    unbiased: bool = True,
) -> tuple[Array, Array]:
    """The exponential moving average of the statistics, in PyTorch's convention:
    ``new = (1 − momentum)·old + momentum·batch`` (momentum weighs the new batch).

    ``batch_var`` is the biased σ²_B; with ``unbiased`` the stored variance is m/(m−1)·σ²_B
    (PyTorch), otherwise σ²_B itself (Keras). The factor needs ``count`` ≥ 2: for one value per
    channel it is undefined, and ``unbiased`` raises ``ValueError`` (``torch.nn.BatchNorm``
    refuses to train on one value per channel).
    """
    fn = "running_stats_update"
    if isinstance(momentum, bool) or not (
        isinstance(momentum, int | float | np.floating) and np.isfinite(momentum)
    ):
        raise ValueError(
            f"{fn}: momentum must be a finite number, the weight of the new batch (PyTorch's "
            f"convention), got {momentum!r}; for the cumulative average pass 1/n for the n-th batch"
        )
    if not unbiased and count < 1:  # (unbiased: the factor's own refusal below)
        raise ValueError(
            f"{fn}: count={count}: an empty batch has no statistics to blend; leave the running "
            "statistics as they are"
        )
    rm0 = _f64(running_mean)
    if rm0.ndim != 1:
        raise ValueError(f"{fn}: running_mean has shape {rm0.shape}; it needs shape (C,)")
    c = rm0.shape[0]
    rv0 = _vector(running_var, c, "running_var", fn)
    v = _vector(batch_var, c, "batch_var", fn)
    if unbiased:
        if count < 2:
            raise ValueError(
                f"running_stats_update: the unbiased variance m/(m-1)·σ²_B needs at least 2 "
                f"values per channel, got count={count} (torch.nn.BatchNorm refuses to train on "
                "one value per channel); pass unbiased=False to store the biased σ²_B"
            )
        v = v * count / (count - 1)
    rm = (1.0 - momentum) * rm0 + momentum * _vector(batch_mean, c, "batch_mean", fn)
    rv = (1.0 - momentum) * rv0 + momentum * v
    return rm, rv


def batch_renorm_forward(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    r_max: float = 3.0,
    d_max: float = 5.0,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, Array, Array]:
    """Batch Renormalization's training transform (Ioffe 2017, arXiv 1702.03275, Algorithm 1).

        σ_B = √(σ²_B + ε),  σ = √(Var + ε)
        r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((μ_B − μ)/σ, −d_max, d_max)
        y = γ·((x − μ_B)/σ_B · r + d) + β

    with the running ``μ = running_mean`` and ``Var = running_var`` of before this batch; r and d
    are constants for the gradient. Returns ``(y, r, d)``. With r_max = 1 and d_max = 0 this is
    :func:`batch_norm_forward`.
    """
    fn = "batch_renorm_forward"
    if not (1.0 <= r_max < np.inf and 0.0 <= d_max < np.inf):
        raise ValueError(f"{fn}: need 1 <= r_max and 0 <= d_max, finite; got {r_max!r}, {d_max!r}")
    x = _f64(x)
    # x̂ from the corrected centered values, as batch_norm_forward's: with r_max = 1 and
    # d_max = 0 the two agree also where |μ_B| ≫ spread (x − round(μ_B) does not)
    mean, centered, var = _moments(x, axis)
    c = var.shape[0]
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(_vector(running_var, c, "running_var", fn) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mean - _vector(running_mean, c, "running_mean", fn)) / sigma, -d_max, d_max)
    _, xhat = _scaled(centered, var, None, None, eps, axis, fn)
    y = xhat * _bcast(r, x.ndim, axis) + _bcast(d, x.ndim, axis)
    if gamma is not None:
        y = y * _bcast(_vector(gamma, c, "gamma", fn), x.ndim, axis)
    if beta is not None:
        y = y + _bcast(_vector(beta, c, "beta", fn), x.ndim, axis)
    return y, r, d
