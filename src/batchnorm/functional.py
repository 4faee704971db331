"""The torch functional core: the one home of batch normalization's math in this package.

Everything else (the modules in :mod:`batchnorm.nn`, the variants, the Keras layer, synchronized
BN) calls these functions. The math is split the way Flax and tinygrad split it:

* :func:`batch_norm_train` — statistics of the batch and the normalization with them, through
  an explicit :class:`torch.autograd.Function` (exact compact backward, double backward supported);
* :func:`batch_norm_eval` — the same normalization fed population statistics: an affine map;
* :func:`update_running_stats` — the moving averages, in PyTorch's momentum convention
  (``new = (1 − momentum)·old + momentum·batch``: momentum weighs the new batch);
* :func:`batch_norm` — the three composed behind ``torch.nn.functional.batch_norm``'s signature.

Inputs are first brought to one of two canonical layouts (see :func:`canonical_layout`):
``(N, C, L)`` contiguous (channels-first: BatchNorm1d/2d/3d in NCHW) or ``(M, C)`` contiguous
(rows × channels: 2-D inputs, ``channels_last`` and ``axis=-1``). A backend computes on those
layouts; the plain-torch backend here works for every device and dtype, and the fused Numba
kernels plug in underneath for CPU float32/float64 (``backend="numba"``).

Backend choice: the ``backend`` argument, else the ``BATCHNORM_BACKEND`` environment variable
(``auto``, ``torch`` or ``numba``), else ``auto`` (kernels where they apply).

Non-finite policy: a batch whose statistics are not finite never reaches the running statistics.
With ``nonfinite="warn"`` (default) the update is skipped and a :class:`NonFiniteStatisticsWarning`
is issued; with ``"raise"`` a :class:`NonFiniteStatisticsError` is raised before anything changes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, NoReturn, Protocol, TypeVar

import numpy as np
import torch
import torch.autograd.forward_ad as _fw_ad
from torch import Tensor

from batchnorm import _env, kernels, native

__all__ = [
    "batch_norm",
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_step",
    "update_running_stats",
    "blend_running",
    "RunningStats",
    "canonical_layout",
    "torch_nn_layout",
    "check_channels",
    "check_vectors",
    "device_error",
    "transform_error",
    "check_mask",
    "valid_count",
    "BatchNormInputError",
    "NonFiniteStatisticsError",
    "NonFiniteStatisticsWarning",
    "Backend",
    "TorchBackend",
    "get_backend",
    "register_backend",
    "batch_norm_scriptable",
    "check_scripted_input",
]

NonFinitePolicy = Literal["warn", "raise"]


class BatchNormInputError(ValueError, RuntimeError):
    """Raised for an input a batch-normalization layer cannot normalize; the message names the
    layer, the shape and a remedy. Also a ``RuntimeError``, which ``torch.nn``'s layers raise
    for such input, so handlers written for them catch it."""


class NonFiniteStatisticsError(FloatingPointError):
    """Raised (with ``nonfinite="raise"``) when a batch's statistics are NaN or infinite."""


class NonFiniteStatisticsWarning(RuntimeWarning):
    """Issued when a batch's statistics are NaN or infinite and its running update is skipped."""


# --------------------------------------------------------------------------------------------
# layouts


def _prod(dims: tuple[int, ...] | torch.Size) -> int:
    return int(math.prod(dims))


def _same(y: Tensor) -> Tensor:
    return y


def canonical_layout(x: Tensor, axis: int = 1) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``x`` as ``(N, C, L)`` or ``(M, C)`` contiguous; return the view and a function that
    brings a tensor of the canonical shape back to ``x``'s shape (and its memory layout, for the
    two layouts viewed without a copy).

    Any channel axis of a contiguous tensor is a ``(prod(before), C, prod(after))`` view; a tensor
    whose channel axis is innermost in memory (``channels_last``, ``axis=-1``) is an ``(M, C)``
    view. Anything else is copied once with ``.contiguous()`` — never read through wrong strides —
    and comes back contiguous.
    """
    nd = x.dim()
    ax = axis % nd
    contiguous = x.is_contiguous()
    shape = x.shape
    if contiguous and ax == 1:  # the common case, in as few torch calls as possible
        if nd == 2 or (nd == 3 and shape[2] != 1):
            return x, _same  # canonical already: (M, C) or (N, C, L)
        if nd > 3:
            flat = x.flatten(2)
            if flat.shape[2] != 1:
                return flat, lambda y: y.reshape(shape)  # (N, C, L)
    c = shape[ax]
    if not contiguous:
        last = x.movedim(ax, -1)  # channels innermost?
        if last.is_contiguous():
            moved_shape = last.shape
            return last.reshape(-1, c), lambda y: y.reshape(moved_shape).movedim(-1, ax)
        x = x.contiguous()
    # the leading sizes as -1: a recorded graph (jit.trace, torch.export with a dynamic batch)
    # would otherwise hold the traced batch's product as a constant
    l = _prod(shape[ax + 1 :])
    if l == 1:
        return x.reshape(-1, c), lambda y: y.reshape(shape)  # (M, C)
    return x.reshape(-1, c, l), lambda y: y.reshape(shape)  # (N, C, L)


def _dims(t: Tensor) -> tuple[int, ...]:
    """The reduction dims of a canonical tensor: every dim but the channels."""
    return (0, 2) if t.dim() == 3 else (0,)


_Backward = TypeVar("_Backward", bound=Callable[..., Any])


def first_order(why: str, remedy: str) -> Callable[[_Backward], _Backward]:
    """For an autograd Function's backward that has no derivative of its own (``why`` says
    why): run it without a graph and, when a graph of it is asked for (``create_graph=True``:
    second derivatives, gradient penalties, Hessian-vector products), raise an error naming
    the layer (``ctx.layer``) and the ``remedy``. ``torch.autograd.function.once_differentiable``
    answers that case with a detached gradient, which ``allow_unused=True`` (as in
    ``gradgradcheck`` and many penalty recipes) turns into a silent ``None``."""

    def wrap(backward: _Backward) -> _Backward:
        @functools.wraps(backward)
        def checked(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled() and any(ctx.needs_input_grad):
                raise BatchNormInputError(
                    f"{ctx.layer}: no second derivative: {why}. The backward was asked for a "
                    "graph (create_graph=True: second derivatives, a gradient penalty, a "
                    f"Hessian-vector product); {remedy}, or call backward without create_graph"
                )
            with torch.no_grad():
                return backward(ctx, *grads)

        return checked  # type: ignore[return-value]

    return wrap


def _b(v: Tensor, t: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against canonical ``t``."""
    return v.view(1, -1, 1) if t.dim() == 3 else v.view(1, -1)


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32 (statistics in float32, as torch does)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------------
# backends


class RunningStats(NamedTuple):
    """Running buffers a training step blends its batch statistics into, in place:
    ``mean += momentum·(μ_B − mean)``, ``var = (1 − momentum)·var + alpha·σ²_B`` (σ²_B biased;
    ``alpha = momentum·m/(m − 1)`` stores the unbiased variance, PyTorch's choice), and
    ``num_batches_tracked += 1`` if given — all only when the batch statistics are finite."""

    mean: Tensor
    var: Tensor
    momentum: float
    alpha: float
    num_batches_tracked: Tensor | None = None
    #: while torch.compile or torch.export traces a ``nonfinite="raise"`` layer: the message
    #: of the error the graph raises for a non-finite batch (a trace cannot raise from Python)
    graph_error: str | None = None


class Backend(Protocol):
    """What a compute backend provides, on canonical layouts (``(N, C, L)`` or ``(M, C)``,
    contiguous). Statistics are returned in the compute dtype (float32 for half inputs)."""

    name: str

    def supports(self, x: Tensor) -> bool: ...

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(y, mean, var, invstd)`` with the biased batch variance ``var``."""
        ...

    def forward_train_update(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: RunningStats,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        """:meth:`forward_train`, then the batch statistics blended into ``running`` (see
        :func:`blend_running`); the last value says whether they were (False: not finite)."""
        ...

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Return ``(dx, dweight, dbias)``; an entry may be None where ``needs`` says so."""
        ...

    def forward_eval(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        """Return ``x·scale + shift`` per channel (BN at inference, Algorithm 2) with
        ``scale = γ/√(var + ε)`` and ``shift = β − scale·mean``."""
        ...

    def backward_eval(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        eps: float,
        need_dx: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """The backward of :meth:`forward_eval`: ``(dx, Σdy·(x − mean), Σdy)`` with
        ``dx = dy·γ/√(var + ε)`` (None unless ``need_dx``) and the sums per channel, in the
        compute dtype or float64."""
        ...

    def train_node(
        self,
        x: Tensor,
        axis: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: RunningStats | None,
    ) -> tuple[Tensor, Tensor, bool] | None:
        """The whole training normalization of ``x`` (channels on ``axis``, any layout) as one
        compiled autograd node — graph, backward and running update included:
        ``(y, stats, updated)`` with ``stats`` rows mean, biased variance, invstd. None when
        the backend has no such node for this call (:class:`BatchNormFunction` then records
        the graph) — what a backend derived from this class without its own answers."""
        return None

    def eval_node(
        self,
        x: Tensor,
        axis: int,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor | None:
        """:meth:`forward_eval` on ``x`` (channels on ``axis``, any layout) in one compiled
        call, output in ``x``'s shape and layout; None when the backend has none for this
        call (the default, as :meth:`train_node`)."""
        return None


def _normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = γ·(x − μ)·invstd + β on a canonical tensor (one home of the normalization)."""
    y = (x - _b(mean, x)) * _b(invstd, x)
    if weight is not None:
        y = y * _b(weight, x)
    if bias is not None:
        y = y + _b(bias, x)
    return y


def _stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Batch mean, biased variance and 1/√(var + ε) of a canonical tensor (differentiable).

    Two passes, as ``batchnorm.reference`` and torch.nn's CPU kernel: the mean, then the
    centred values, with the corrected two-pass algorithm (the first mean's rounding, the mean
    of the centred values, subtracted again). ``torch.var_mean``'s one-pass Welford lost digits
    where |mean| ≫ spread (float64 at an offset of 1e8: a relative error of 4e-9 against
    torch.nn's 7e-16), never ``E[x²] − E[x]²``'s way either."""
    dims = _dims(x)
    first = x.mean(dims, keepdim=True)
    centred = x - first
    r = centred.mean(dims)  # the first mean's rounding error
    var = ((centred * centred).mean(dims) - r * r).clamp_min(0)
    mean = first.reshape(-1) + r
    return mean, var, torch.rsqrt(var + eps)


def _backward_math(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """dx = γ·invstd/m · (m·dy − Σdy − x̂·Σ(dy·x̂)), dγ = Σ dy·x̂, dβ = Σ dy (compute dtype)."""
    dims = _dims(x)
    m = x.numel() // x.shape[1]
    xhat = (x - _b(mean, x)) * _b(invstd, x)
    dbias = dy.sum(dims)
    dweight = (dy * xhat).sum(dims)
    return dx_from_sums(dy, xhat, invstd, weight, m, dbias, dweight), dweight, dbias


def dx_from_sums(
    dy: Tensor,
    xhat: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    m: int | float,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
) -> Tensor:
    """dx = γ·invstd/m · (m·dy − Σdy − x̂·Σ(dy·x̂)) on a canonical tensor, given the two
    per-channel sums; ``m`` and the sums may span several processes (synchronized BN)."""
    k = invstd / m if weight is None else weight * invstd / m
    return _b(k, dy) * (m * dy - _b(sum_dy, dy) - xhat * _b(sum_dy_xhat, dy))


class TorchBackend(Backend):
    """Plain torch operations: every device and dtype; also the oracle for the kernels (no
    compiled node: :meth:`Backend.train_node` and :meth:`Backend.eval_node` answer None)."""

    name = "torch"

    def supports(self, x: Tensor) -> bool:
        return True

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cd = _compute_dtype(x.dtype)
        xc = x.to(cd)
        mean, var, invstd = _stats(xc, eps)
        w = None if weight is None else weight.to(cd)
        b = None if bias is None else bias.to(cd)
        # (values cannot be read on meta and fake tensors: no check, shapes propagate)
        if cd == torch.float32 and _concrete(var) and not bool(torch.isfinite(var).all()):
            # the spread overflowed float32 (|x| near float32's range): redo in float64; the
            # returned variance may still be inf in float32 (the running update then skips it)
            x64 = x.to(torch.float64)
            m64, v64, i64 = _stats(x64, eps)
            y64 = _normalize(x64, m64, i64, _to(w, x64.dtype), _to(b, x64.dtype))
            return y64.to(x.dtype), m64.float(), v64.float(), i64.float()
        return _normalize(xc, mean, invstd, w, b).to(x.dtype), mean, var, invstd

    def forward_train_update(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: RunningStats,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        y, mean, var, invstd = self.forward_train(x, weight, bias, eps)
        return y, mean, var, invstd, blend_running(running, mean, var)

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        cd = mean.dtype
        w = None if weight is None else weight.to(cd)
        dx, dw, db = _backward_math(dy.to(cd), x.to(cd), mean, invstd, w)
        return dx.to(x.dtype), dw, db

    def forward_eval(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        cd = _compute_dtype(x.dtype)
        # centred first, as torch.nn computes it (the same values with and without a graph):
        # differentiated by autograd, x·scale + shift gives dγ = Σdy·x/σ − μ·Σdy/σ, which
        # cancels where |μ| ≫ σ (14 % off at |μ|/σ = 1e5 in float32); Σdy·(x − μ)/σ does not
        scale, _ = _inference_affine(mean, var, weight, None, eps, cd)
        y = (x.to(cd) - _b(mean.to(cd).reshape(-1), x)) * _b(scale, x)
        if bias is not None:
            y = y + _b(bias.to(cd).reshape(-1), x)
        return y.to(x.dtype)

    def backward_eval(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        eps: float,
        need_dx: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        cd = _compute_dtype(x.dtype)
        dyc = dy.to(cd)
        dims = (0, 2) if x.dim() == 3 else (0,)
        sdyx = (dyc * (x.to(cd) - _b(mean.to(cd), x))).sum(dims)
        dx = None
        if need_dx:
            scale, _ = _inference_affine(mean, var, weight, None, eps, cd)
            dx = (dyc * _b(scale, x)).to(x.dtype)
        return dx, sdyx, dyc.sum(dims)


_ATEN = torch.ops.aten


def _vec(v: Tensor | None, fill: float, like: Tensor) -> Tensor:
    """A per-channel vector in the compute dtype of ``like`` (float32 for half inputs;
    ``fill`` when absent) on its device."""
    cd = _compute_dtype(like.dtype)
    if v is None:
        return torch.full((like.shape[1],), fill, dtype=cd, device=like.device)
    return v.to(cd)


class AtenBackend(TorchBackend):
    """torch's own fused batch-norm operators (``aten::native_batch_norm`` and its backward)
    for half-precision inputs, which the kernels do not read: torch's CPU operator reads and
    writes float16/bfloat16 directly and keeps statistics in float32, one pass where plain torch
    operations make several (2.5–4× torch.nn's time, and the kernels need a float32 copy each
    way). The per-channel vectors are given in float32, so statistics and parameter gradients are
    float32 whatever the parameters' dtype; the running statistics are blended here
    (:func:`blend_running`: a non-finite batch is refused), never by the operator. A layer
    call runs the operator once, as autograd records it (:meth:`train_node`,
    :meth:`eval_node`), from the compiled node where it is built — the Python path around it
    cost more than the operator at small sizes and with the caches cold after a large pass."""

    name = "aten"

    def supports(self, x: Tensor) -> bool:
        # half inputs only: in float32 the operator's statistics are not stable at large
        # offsets (variance off by 14 % at |mean|/std = 1e6, where the kernels and plain torch
        # keep their digits) nor near float32's range; half values carry fewer digits than
        # that loses
        return x.dtype in _HALF_DTYPES

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w, b = _vec(weight, 1.0, x), _vec(bias, 0.0, x)
        # the operator's own running update with momentum 1 into scratch buffers: its unbiased
        # variance, computed directly (1/invstd² − ε cancels when var ≪ ε, and is infinite for
        # ε = 0 and a constant channel)
        scratch = torch.zeros(2, w.numel(), dtype=w.dtype, device=w.device)
        y, mean, invstd = _ATEN.native_batch_norm(x, w, b, scratch[0], scratch[1], True, 1.0, eps)
        n = x.numel() // max(w.numel(), 1)
        return y, mean, scratch[1] * ((n - 1) / n if n > 1 else 0.0), invstd

    def train_node(
        self,
        x: Tensor,
        axis: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: RunningStats | None,
    ) -> tuple[Tensor, Tensor, bool]:
        """The operator called on ``x`` as it is and recorded by autograd itself (its backward
        is torch's C++ ``native_batch_norm_backward``, second derivatives included): no Python
        autograd Function, whose per-call cost is most of a small half-precision step. The
        compiled node (:mod:`batchnorm.native`) makes the same call, running update included,
        from C++; this is the path of the inputs it declines and of ``BATCHNORM_NATIVE=0``."""
        ext = _half_node()
        if ext is not None:
            rm, rv, momentum, alpha, nbt, _ = running or (None, None, 0.0, 0.0, None, None)
            node = ext.train(x, axis, weight, bias, rm, rv, nbt, 1, eps, momentum, alpha)
            if node is not None:
                return node  # type: ignore[no-any-return]
        xn, restore = _operator_layout(x, axis)
        y, mean, var, invstd = self.forward_train(xn, weight, bias, eps)
        updated = running is not None and blend_running(running, mean, var)
        return restore(y), torch.stack((mean, var, invstd)), updated

    def eval_node(
        self,
        x: Tensor,
        axis: int,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        ext = _half_node()  # the same call from C++ (see train_node)
        if ext is not None:
            y = ext.evaluate(x, axis, mean, var, weight, bias, 1, eps)
            if y is not None:
                return y  # type: ignore[no-any-return]
        xn, restore = _operator_layout(x, axis)
        return restore(self.forward_eval(xn, mean, var, weight, bias, eps))

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        w = _vec(weight, 1.0, x)
        dx, dw, db = _ATEN.native_batch_norm_backward(
            dy.to(x.dtype), x, w, None, None, mean, invstd, True, 0.0, list(needs)
        )
        return dx, dw, db

    def forward_eval(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        if all(t is None or t.dtype == x.dtype for t in (weight, bias)) and (
            mean.dtype == var.dtype == x.dtype
        ):
            # a module converted to the half dtype: its vectors as they are (the operator
            # computes in float32 from them; four conversions cost more than the call)
            w, b, m, v = weight, bias, mean, var
        else:
            w, b = _vec(weight, 1.0, x), _vec(bias, 0.0, x)
            m, v = _vec(mean, 0.0, x), _vec(var, 1.0, x)
        if _graph_needed(x, w, b):
            # the operator saves the statistics for its backward, which would read the buffers
            # as a later training step of the layer left them: a copy as they are now
            m, v = m.clone(), v.clone()
        return _ATEN.native_batch_norm(x, w, b, m, v, False, 0.0, eps)[0]  # type: ignore[no-any-return]

    def backward_eval(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        eps: float,
        need_dx: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        m, v, w = _vec(mean, 0.0, x), _vec(var, 1.0, x), _vec(weight, 1.0, x)
        dx, gw, gb = _ATEN.native_batch_norm_backward(
            dy.to(x.dtype), x, w, m, v, None, None, False, eps, [need_dx, True, True]
        )
        # the operator's dγ is Σdy·(x − μ)/√(var + ε): the contract's sum is that times √(var + ε)
        return (dx if need_dx else None), gw * torch.sqrt(v + eps), gb


def _half_node() -> Any | None:
    """The compiled node for half inputs (built on first use), None where it is turned off or
    cannot be built; it is built with the kernels' entries, so only where they import."""
    return native.load() if _kernels_available() else None


def torch_nn_layout(x: Tensor) -> Tensor:
    """``x`` laid out as torch.nn's BatchNormNd lays out its output (the input's suggested
    memory format): as it is when contiguous, or ``channels_last`` (4-D) / ``channels_last_3d``
    (5-D); a copy in that format for a view of such a tensor; else a contiguous copy — a 3-D
    ``t.transpose(1, 2)`` included, so that ``y.view(N, -1)`` works as with torch.nn. The
    drop-in modules take their input so (in eager mode and under TorchScript)."""
    if x.is_contiguous():
        return x
    nd = x.dim()
    if nd == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if nd == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    # torch's suggested memory format: a view of a channels-last tensor (a slice of its
    # channels, a strided step) comes out channels-last
    if nd == 4 and _channels_last_strides(list(x.shape), list(x.stride()), [1, 3, 2, 0]):
        return x.contiguous(memory_format=torch.channels_last)
    if nd == 5 and _channels_last_strides(list(x.shape), list(x.stride()), [1, 4, 3, 2, 0]):
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


def _channels_last_strides(sizes: list[int], strides: list[int], order: list[int]) -> bool:
    """Whether ``strides`` order the dimensions as ``order`` lists them, innermost first (c10's
    ``is_channels_last_strides_2d/3d``, which ``suggest_memory_format`` asks; TorchScript
    compiles it)."""
    if strides[1] == 0:
        return False
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            # (N, 1, 1, 1)-like: the batch axis no further out than the channels'
            return False
        smallest = strides[d]
        if sizes[d] > 1:
            smallest *= sizes[d]
    return True


def _operator_layout(x: Tensor, axis: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as torch's operator reads it without a copy (channels on dim 1, contiguous or
    ``channels_last``/``channels_last_3d``: its output then has ``x``'s layout), else the
    canonical view (:func:`canonical_layout`), with the function that brings the output back."""
    nd = x.dim()
    if axis % nd == 1 and (
        x.is_contiguous()
        or (nd == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (nd == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    ):
        if 1 not in x.shape or x.stride() in (_made_strides(x, False), _made_strides(x, True)):
            return x, _same
    return canonical_layout(x, axis)


def _made_strides(x: Tensor, channels_last: bool) -> tuple[int, ...]:
    """The strides ``x.contiguous(memory_format=...)`` gives a tensor of ``x``'s shape (C
    innermost with ``channels_last``), size-1 dims included. ``is_contiguous`` ignores a size-1
    dim's stride, and torch 2.13's CPU batch-norm backward does not: given
    ``t.transpose(1, 2).unsqueeze(-1)`` (strides ``(H·C, 1, C, 1)``) and a contiguous upstream
    gradient it returns wrong input and weight gradients; such inputs take the canonical view."""
    shape = x.shape
    nd = len(shape)
    order = [1, *range(nd - 1, 1, -1), 0] if channels_last and nd > 2 else range(nd - 1, -1, -1)
    strides = [0] * nd
    step = 1
    for d in order:
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


_TORCH = TorchBackend()
_ATEN_BACKEND = AtenBackend()
_BACKENDS: dict[str, Callable[[], Backend]] = {
    "torch": lambda: _TORCH,
    "aten": lambda: _ATEN_BACKEND,
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
#: the input dtypes batch norm computes: float8 types are floating point without arithmetic
_INPUT_DTYPES = (*_HALF_DTYPES, torch.float32, torch.float64)
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make a backend selectable by name; ``factory`` is called once, on first use."""
    _BACKENDS[name] = factory
    _INSTANCES.pop(name, None)


def _backend_names() -> list[str]:
    """Every name ``backend=`` and ``$BATCHNORM_BACKEND`` take."""
    return sorted({*_BACKENDS, "numba", "auto"})


def backend_env_problem() -> str | None:
    """Why ``$BATCHNORM_BACKEND`` names no backend (None if it is unset, empty or valid): the
    commands check it before any work, so a typo is one line, not a traceback mid-run."""
    value = _env.get("BATCHNORM_BACKEND")
    valid = _backend_names()
    if value in (None, "") or value in valid:
        return None
    return (
        f"$BATCHNORM_BACKEND is {value!r}, which names no batch-norm backend; set it to one of "
        f"{', '.join(valid)}, or unset it (auto)"
    )


def _instance(name: str) -> Backend:
    if name not in _INSTANCES:
        if name not in _BACKENDS and name == "numba":
            # the kernel adapter registers itself on import; importing numba is deferred until
            # a kernel is first needed, so `import batchnorm` stays fast
            import batchnorm.backend_numba  # noqa: F401
        if name not in _BACKENDS:
            raise ValueError(
                f"unknown batch-norm backend {name!r}; choose one of {_backend_names()}"
            )
        _INSTANCES[name] = _BACKENDS[name]()
    return _INSTANCES[name]


def _kernels_available() -> bool:
    try:
        _instance("numba")
    except ImportError:
        return False
    return True


_KERNEL_DTYPES = (torch.float32, torch.float64)
_has_storage: Callable[[Tensor], bool] = torch._C._has_storage
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_PYTHON_KEY = torch._C.DispatchKey.Python


def _has_memory(t: Tensor | None) -> bool:
    """Whether ``t`` is absent or holds its values in memory of its own that NumPy and the
    kernels may read: not a wrapper of ``torch.func`` transforms or batched gradients (no
    storage), not a FakeTensor or another subclass Python dispatches (storage without data)."""
    if t is None:
        return True
    if not _has_storage(t):  # torch.func's wrappers, legacy vmap's batched tensors
        return False
    # exact types first: the dispatch-key test costs ~0.5 µs, paid only by subclasses
    return type(t) in _PLAIN_TYPES or not torch._C._dispatch_keys(t).has(_PYTHON_KEY)


def _overridden(t: Tensor) -> bool:
    """Whether ``t`` is a tensor subclass whose ``__torch_function__`` runs for torch
    operations (fastai's ``TensorBase``, say): torch.nn's output keeps such a class, which
    only torch operations give (the kernels and the compiled node return plain tensors).
    ``Parameter`` turns it off."""
    return type(t) not in _PLAIN_TYPES and _has_torch_function_unary(t)


_has_torch_function_unary: Callable[[Any], bool] = torch._C._has_torch_function_unary


def _concrete(t: Tensor) -> bool:
    """Whether ``t``'s values can be read in Python (``bool``, ``.item()``): not on the meta
    device, not fake, not wrapped by a transform, not inside ``torch.compile``. Checks of values are skipped otherwise, so
    that shapes propagate as they do through torch.nn."""
    # under torch.compile values are symbolic too: the graph keeps tensor operations only
    return not torch.compiler.is_compiling() and not t.is_meta and _has_memory(t)


def _named_backend(choice: str, from_env: bool, layer: str | None, x: Tensor) -> Backend:
    """The backend named ``choice``, refused with the layer's name (and, when the name came
    from ``$BATCHNORM_BACKEND`` — a stray or mistyped environment, not the code — the
    variable) if it names none or does not take ``x``."""
    where = f"{layer}: " if layer else ""
    try:
        chosen = _instance(choice)
    except ValueError as e:
        if from_env:
            raise ValueError(f"{where}$BATCHNORM_BACKEND={choice!r}: {e}") from None
        raise ValueError(f"{where}{e}") from None
    if not chosen.supports(x):
        remedy = (
            "set BATCHNORM_BACKEND=torch (or auto), or unset it ($BATCHNORM_BACKEND chose it)"
            if from_env
            else "use backend='torch' (or 'auto')"
        )
        raise ValueError(
            f"{where}batch-norm backend {choice!r} does not support {x.dtype} tensors on "
            f"{x.device}; " + remedy
        )
    return chosen


def get_backend(
    x: Tensor,
    backend: str | None = None,
    *,
    also: tuple[Tensor | None, ...] = (),
    layer: str | None = None,
) -> Backend:
    """The backend for tensor ``x``: ``backend`` if given, else ``$BATCHNORM_BACKEND``, else
    ``auto`` — the Numba kernels for CPU float32/float64 tensors, torch's fused operator
    (:class:`AtenBackend`) for CPU float16/bfloat16 tensors, plain torch otherwise.

    Plain torch, whatever was asked for, inside ``torch.jit.trace`` and forward-mode AD
    (:func:`_torch_ops_only`), under a Python dispatch
    mode (``FakeTensorMode``, ...), and when ``x`` or one of the call's other tensors ``also``
    (weight, bias, running buffers) has no memory of its own (the wrappers of ``torch.func``
    transforms, FakeTensors): the kernels would read through pointers that do not exist.
    ``layer`` names the calling layer in the errors of a backend that does not exist or does
    not take ``x``."""
    choice = backend or _env.get("BATCHNORM_BACKEND") or "auto"
    # a named backend that does not exist or take x is refused before any path is taken,
    # under torch.compile and transforms too (the kernels, when named, give way to torch there)
    named = choice not in ("auto", "numba")
    chosen = _named_backend(choice, not backend, layer, x) if named else None
    if _torch_ops_only():
        # torch.jit.trace records torch operations only (a kernel call would be recorded as
        # constants); forward-mode AD differentiates torch operations only
        return _TORCH
    if (
        not _has_memory(x)
        or torch._C._len_torch_dispatch_stack() > 0
        or not all(_has_memory(t) for t in also)
        or _overridden(x)
    ):
        # inside torch.func transforms (vmap, grad, ...), FakeTensorMode and the like: torch
        # operations, which the transforms and modes know; a tensor subclass's
        # __torch_function__ sees them and keeps its class for the output, as in torch.nn
        return _TORCH
    if choice == "auto":
        if x.is_cpu and x.dtype in _KERNEL_DTYPES:
            if _kernels_available():
                numba_backend = _instance("numba")
                if numba_backend.supports(x):
                    return numba_backend
        elif x.is_cpu and x.dtype in _HALF_DTYPES:
            return _ATEN_BACKEND
        return _TORCH
    return chosen if chosen is not None else _named_backend(choice, not backend, layer, x)


# --------------------------------------------------------------------------------------------
# checks


def _name(layer: str | None) -> str:
    return layer or "batch_norm"


def check_channels(
    x: Tensor, num_features: int, axis: int, layer: str | None = None, fixed: type | None = None
) -> None:
    """Raise :class:`BatchNormInputError` unless ``x`` is a floating tensor with
    ``num_features`` channels along ``axis``. ``fixed``: the layer's class, whose channels are
    fixed at axis 1 (the remedy then names the class that takes any axis)."""
    name = _name(layer)
    if x.dtype not in _INPUT_DTYPES:
        remedy = (
            # eager-mode quantization (torch.ao.quantization.prepare/convert) swaps torch.nn's
            # classes only: this layer stayed a float layer between quantized ones
            "A quantized model reaches a float layer here: torch.ao.quantization's convert "
            "swaps torch.nn's BatchNorm classes only, so convert the model to them first "
            "(batchnorm.convert_model(model, to='torch')), then prepare and convert it, or "
            "dequantize before this layer."
            if x.is_quantized
            else "Convert it first, e.g. x.float()."
        )
        raise BatchNormInputError(
            f"{name}: expected a floating-point input, got dtype {x.dtype} with shape "
            f"{tuple(x.shape)}; batch norm computes float16, bfloat16, float32 and float64. "
            + remedy
        )
    if x.dim() < 2:
        raise BatchNormInputError(
            f"{name}: expected an input with a batch dimension and a channel dimension (at least "
            f"2D), got {x.dim()}D input of shape {tuple(x.shape)}. Add a batch dimension, e.g. "
            "x.unsqueeze(0)."
        )
    nd = x.dim()
    if not -nd <= axis < nd:
        raise BatchNormInputError(
            f"{name}: axis={axis} is out of range for {nd}D input of shape {tuple(x.shape)}."
        )
    c = x.shape[axis]
    if c != num_features:
        any_axis = None if fixed is None else any_axis_class(fixed) or "BatchNorm"
        hint = _axis_hint(x, num_features, axis, any_axis) or (
            f" Build the layer with {c} channels, or give the previous layer {num_features} "
            "output channels (out_channels / out_features)."
        )
        raise BatchNormInputError(
            f"{name}: expected {num_features} channels along axis {axis} of input with shape "
            f"{tuple(x.shape)}, got {c}.{hint}"
        )


def any_axis_class(cls: type) -> str | None:
    """For a class of channels fixed at axis 1 (a ``…1d/2d/3d`` of ``batchnorm``, or a subclass
    of one): the name of its ``batchnorm`` class that takes any axis (``GhostBatchNorm2d`` →
    ``GhostBatchNorm``)."""
    for klass in cls.__mro__:
        name = klass.__name__
        if klass.__module__.startswith("batchnorm.") and re.fullmatch(r"\w+[123]d", name):
            return name[:-2]
    return None


def device_error(
    failure: BaseException,
    input: Tensor,
    tensors: Mapping[str, Tensor | None],
    layer: str | None = None,
) -> BatchNormInputError | None:
    """The error to raise instead of ``failure`` (what a layer's call raised) when ``input`` and
    the layer's ``tensors`` (weight, bias, running buffers, by name) are on different devices,
    or the layer is still on the meta device (shapes without values) given real input; ``None``
    when ``failure`` is to be raised as it is (one of this package's own errors, or devices
    that agree). Asked only after a call failed, so a correct call pays nothing for it."""
    held = {name: t for name, t in tensors.items() if t is not None}
    if isinstance(failure, BatchNormInputError) or all(
        t.device == input.device for t in held.values()
    ):
        return None
    shape = tuple(input.shape)
    meta = [name for name, t in held.items() if t.is_meta]
    if meta and not input.is_meta:
        return BatchNormInputError(
            f"{_name(layer)}: {', '.join(meta)} on the meta device (shapes without values), "
            f"the input of shape {shape} on {input.device}. Materialize the layer first: "
            f"model.to_empty(device={str(input.device)!r}), then load_state_dict(...) or "
            "reset_parameters()."
        )
    by_device: dict[str, list[str]] = {}
    for name, t in held.items():
        if t.device != input.device:
            by_device.setdefault(str(t.device), []).append(name)
    where = "; ".join(f"{', '.join(names)} on {device}" for device, names in by_device.items())
    return BatchNormInputError(
        f"{_name(layer)}: the input of shape {shape} is on {input.device}, the layer's {where}. "
        "Move the model to the input's device (model.to(x.device)) or the input to the "
        "model's."
    )


def transform_error(
    failure: BaseException,
    input: Tensor,
    running: Sequence[Tensor | None],
    layer: str | None = None,
) -> BatchNormInputError | None:
    """The error to raise instead of ``failure`` when a layer or function that updates its
    running statistics ``running`` in place failed inside a ``torch.func`` transform because of
    that update: under ``vmap`` with unbatched buffers (one statistic per vmapped example, one
    buffer to hold them), under ``grad``/``jacrev``/``vjp``/… with buffers captured from outside
    the transformed function (which torch.func does not let it change). torch's own words blame
    an in-place operation (under ``vmap`` suggesting a bug report). ``None`` otherwise."""
    if isinstance(failure, BatchNormInputError) or _functorch_level() is None:
        return None
    held = [t for t in running if t is not None]
    if not held:
        return None
    batched = torch._C._functorch.is_batchedtensor
    ways_out = (
        "Call it in eval mode (training=False), without running statistics "
        "(track_running_stats=False, or running_mean=running_var=None in the functional form; "
        "torch.func.replace_all_batch_norm_modules_ does that for the BatchNorm1d/2d/3d "
        "classes only, not for BatchNorm, InPlaceABN or SyncBatchNorm)"
    )
    if batched(input) and not any(batched(t) for t in held):
        return BatchNormInputError(
            f"{_name(layer)}: under torch.func.vmap each vmapped example has its own batch "
            "statistics, but running_mean and running_var are single tensors to update in "
            f"place; the running statistics were left unchanged. {ways_out}, or vmap over "
            "stacked buffers too (torch.func.stack_module_state)."
        )
    if "mutate a captured Tensor" in str(failure):
        return BatchNormInputError(
            f"{_name(layer)}: inside a torch.func transform (grad, jacrev, vjp, …) the running "
            "statistics, captured from outside the transformed function, cannot be updated in "
            "place (torch.nn's layers fail the same way); the running statistics were left "
            f"unchanged. {ways_out}, or update them outside the transform."
        )
    return None


@contextlib.contextmanager
def _transform_errors(
    input: Tensor, running: Sequence[Tensor | None], layer: str | None
) -> Iterator[None]:
    """Raise :func:`transform_error`'s named error for a failure it recognizes."""
    try:
        yield
    except RuntimeError as e:
        error = transform_error(e, input, running, layer)
        if error is None:
            raise
        raise error from e


def _axis_hint(x: Tensor, num_features: int, axis: int, any_axis: str | None = None) -> str:
    """`` Axis j has size C: did you mean axis=j?`` for another axis of ``x`` of that size (not
    the batch axis 0); for a layer whose channels are fixed at axis 1 (BatchNorm1d/2d/3d and
    their variants), how to move them there, or ``any_axis``, the class that takes any axis."""
    nd = x.dim()
    candidates = [i for i in range(1, nd) if x.shape[i] == num_features and i != axis % nd]
    if not candidates:
        return ""
    j = candidates[-1]
    j_str = str(j - nd) if j == nd - 1 else str(j)
    if any_axis is not None:
        return (
            f" Axis {j_str} has size {num_features}: this layer takes channels at axis 1, as "
            f"torch.nn does; move them there (x.movedim({j_str}, 1)) or use "
            f"batchnorm.{any_axis}({num_features}, axis={j_str})."
        )
    return f" Axis {j_str} has size {num_features}: did you mean axis={j_str}?"


def _factor_count(count: Any) -> Any:
    """The count as the operand of the unbiased factor m/(m − 1): a traced count (an int64
    tensor, and int64·float gives float32) in float64; a symbolic one (torch.export's dynamic
    batch, whose graph assumes sizes of 2 or more) as a float64 tensor, so that a batch of one
    gives an infinite factor, which the running update refuses as non-finite, not a bare
    ZeroDivisionError from the graph's Python arithmetic; a Python int as it is."""
    if isinstance(count, Tensor):
        return count.to(torch.float64)
    if isinstance(count, torch.SymInt):
        return torch.ones((), dtype=torch.float64) * count
    return count


def _check_count(x: Tensor, axis: int, layer: str | None) -> int:
    count = x.numel() // max(x.shape[axis], 1)
    if count < 2:
        raise BatchNormInputError(
            f"{_name(layer)}: expected more than 1 value per channel when training, got input "
            f"of shape {tuple(x.shape)} (channels along axis {axis}): batch statistics need at "
            "least 2 values per channel. Use a batch of 2 or more (DataLoader(drop_last=True) "
            "avoids a last batch of 1), GroupNorm for tiny batches, or call .eval() to use the "
            "running statistics."
        )
    return count


def check_mask(input: Tensor, mask: Tensor, axis: int = 1, layer: str | None = None) -> Tensor:
    """Validate a padding mask and return it with a size-1 channel axis, broadcastable to
    ``input``. ``mask`` is boolean, True at valid positions, shaped like ``input`` without the
    channel axis (e.g. ``(N, L)`` for ``(N, C, L)``), or with a size-1 channel axis."""
    ax = axis % input.dim()
    expected = tuple(s for i, s in enumerate(input.shape) if i != ax)
    if not isinstance(mask, Tensor):
        kind = type(mask).__name__
        dtype = getattr(mask, "dtype", None)
        got = f"{type(mask).__module__}.{kind}" if kind == "ndarray" else kind
        got += f" of dtype {dtype}" if dtype is not None else ""
        raise BatchNormInputError(
            f"{_name(layer)}: expected the mask as a boolean torch.Tensor of shape {expected} "
            f"(True at valid positions), got a {got}. Convert it, e.g. "
            "torch.as_tensor(mask, dtype=torch.bool, device=input.device)."
        )
    if mask.dtype != torch.bool:
        raise BatchNormInputError(
            f"{_name(layer)}: expected a boolean mask (True at valid positions), got dtype "
            f"{mask.dtype} with shape {tuple(mask.shape)}. Convert it, e.g. mask.bool()."
        )
    m = mask.unsqueeze(ax) if mask.dim() == input.dim() - 1 else mask
    ok = m.dim() == input.dim() and m.shape[ax] == 1
    ok = ok and all(a in (1, b) for i, (a, b) in enumerate(zip(m.shape, input.shape)) if i != ax)
    if not ok:
        raise BatchNormInputError(
            f"{_name(layer)}: expected a mask of shape {expected} (the input's shape without the "
            f"channel axis {ax}) for input of shape {tuple(input.shape)}, got "
            f"{tuple(mask.shape)}. Build it from the sequence lengths, e.g. "
            "torch.arange(L)[None, :] < lengths[:, None]."
        )
    if m.device != input.device:
        if m.is_meta and not input.is_meta:
            raise BatchNormInputError(
                f"{_name(layer)}: the mask of shape {tuple(mask.shape)} is on the meta device "
                f"(no values), the input of shape {tuple(input.shape)} on {input.device}. Build "
                "the mask on the input's device, e.g. "
                "torch.arange(L, device=x.device)[None, :] < lengths[:, None]."
            )
        m = m.to(input.device)
    return m


def valid_count(input: Tensor, axis: int = 1, mask: Tensor | None = None) -> int:
    """m: how many values each channel's batch statistics are taken over (valid ones only when a
    mask is given; ``mask`` as returned by :func:`check_mask`)."""
    ax = axis % input.dim()
    if mask is None:
        return input.numel() // max(input.shape[ax], 1)
    shape = list(input.shape)
    shape[ax] = 1
    if not torch.compiler.is_compiling() and not _concrete(mask):
        # meta and fake tensors (shape propagation): no values to count, every position taken
        return _prod(tuple(shape))
    return int(mask.expand(shape).sum())


def _masked_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    ax: int,
    mask: Tensor,
    count: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 with statistics over the valid positions only; every position is normalized
    with them (as Keras does). Plain torch ops, so autograd gives the exact backward — through
    the statistics — and padded positions never reach the statistics. A NaN or inf in the
    padding is passed through to the output as it is and takes no part in the arithmetic, so
    it cannot reach the valid positions' gradients either (``0·NaN`` in a product's backward
    would make them all NaN)."""
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    dims = tuple(i for i in range(x.dim()) if i != ax)
    shape = [1] * x.dim()
    shape[ax] = -1
    bad = ~mask & ~torch.isfinite(xc)  # non-finite padding
    xs = torch.where(bad, 0, xc)
    # torch.where, not a product: the padding must not reach the statistics. x̂ in float64,
    # as the unmasked paths accumulate their statistics: in float32 a mean of 1e6 is off by
    # its last digit (outputs off by 0.1) and a spread of 1e20 overflows the variance
    x64 = xs.to(torch.float64)
    mean = torch.where(mask, x64, 0).sum(dims) / count  # (C,)
    diff = x64 - mean.view(shape)  # (x − μ in float32 would be off by μ's rounding)
    var = torch.where(mask, diff, 0).square().sum(dims) / count  # biased σ²_B
    y = (diff * torch.rsqrt(var + eps).view(shape)).to(cd)
    if weight is not None:
        y = y * weight.to(cd).view(shape)
    if bias is not None:
        y = y + bias.to(cd).view(shape)
    y = torch.where(bad, xc, y).to(x.dtype)
    out = torch.empty_like(x)  # x's layout (that of its dense copy, for a strided view)
    if y.stride() != out.stride():
        # elementwise results take their layout from every operand, the mask's too (a
        # transposed mask made a contiguous input's output non-contiguous): x's, as promised
        y = out.copy_(y)
    return y, mean.detach().to(cd), var.detach().to(cd)


# --------------------------------------------------------------------------------------------
# the autograd Function


class BatchNormFunction(torch.autograd.Function):
    """Algorithm 1 with the compact backward; differentiable twice.

    Takes the input in its own shape and memory layout and brings it to the canonical layout
    inside (no view node before it in the graph, no second copy of an oddly strided input);
    returns the output in that canonical shape together with the ``restore`` that gives it the
    input's shape, applied by the caller (so that the output may be modified in place). First-order backward runs on the backend ``be``, which
    the caller resolved (fused kernels on CPU). When a graph of the backward is requested
    (``create_graph=True``), the backward is recomputed with torch operations from ``x`` —
    statistics included — so that second derivatives are exact.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        be: Backend,
        running: RunningStats | None,
        axis: int,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], bool, Callable[[Tensor], Tensor]]:
        xc, restore = canonical_layout(x, axis)
        if running is None:
            y, mean, var, invstd = be.forward_train(xc, weight, bias, eps)
            updated = False
        else:
            y, mean, var, invstd, updated = be.forward_train_update(xc, weight, bias, eps, running)
        ctx.save_for_backward(x, weight, mean, invstd)  # type: ignore[arg-type]
        ctx.eps = eps  # type: ignore[attr-defined]
        ctx.axis = axis  # type: ignore[attr-defined]
        ctx.param_dtype = (  # type: ignore[attr-defined]
            weight.dtype if weight is not None else (bias.dtype if bias is not None else x.dtype)
        )
        ctx.backend = be  # type: ignore[attr-defined]
        ctx.restore = restore  # type: ignore[attr-defined]
        # x's strides now: a saved-tensor hook (torch.autograd.graph.saved_tensors_hooks) may
        # give x back in another layout, which dy's canonical view then no longer matches
        ctx.x_stride = x.stride()  # type: ignore[attr-defined]
        # the statistics leave inside a tuple: autograd passes non-tensor outputs through
        # untouched (no graph edges, no zero gradients made up for them in backward)
        ctx.set_materialize_grads(False)
        # y leaves in the canonical shape, with ``restore`` for the caller: a view made here
        # would be a view created inside a custom Function, which autograd forbids to modify
        # in place (conv-BN-ReLU(inplace=True)); made outside, it is an ordinary view
        return y, (mean, var), updated, restore

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor, *_unused: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        axis = ctx.axis  # type: ignore[attr-defined]
        if dy is None:  # y did not reach the loss
            return (None,) * 7
        dx: Tensor | None
        dw: Tensor | None
        db: Tensor | None
        # dy comes in the canonical shape of y (see forward)
        if torch.is_grad_enabled() or not _has_memory(dy):
            # a graph of the backward, or a dy the kernels cannot read (batched gradients:
            # is_grads_batched=True, jacobian(vectorize=True)): torch operations
            dy_x = ctx.restore(dy)  # type: ignore[attr-defined]
            dx, dw, db = graph_backward(dy_x, x, weight, ctx.eps, axis)  # type: ignore[attr-defined]
        else:
            if x.stride() == ctx.x_stride:  # type: ignore[attr-defined]
                xc, restore = canonical_layout(x, axis)
            else:
                # x came back from a saved-tensor hook in another layout (pack with
                # .contiguous(), say): dy is brought to x's shape and layout first
                dy, xc, restore = _canonical_pair(ctx.restore(dy), x, axis)  # type: ignore[attr-defined]
            backend: Backend = ctx.backend  # type: ignore[attr-defined]
            dxc, dw, db = backend.backward(dy, xc, mean, invstd, weight, needs)
            dx = None if dxc is None else restore(dxc)
        pd = ctx.param_dtype  # type: ignore[attr-defined]
        dw_out = None if not needs[1] or dw is None else (dw if dw.dtype == pd else dw.to(pd))
        db_out = None if not needs[2] or db is None else (db if db.dtype == pd else db.to(pd))
        dx_out = dx if needs[0] else None
        return dx_out, dw_out, db_out, None, None, None, None


class BatchNormEvalFunction(torch.autograd.Function):
    """Algorithm 2 with gradients: ``y = γ·(x − μ)/√(σ² + ε) + β`` with the population
    ``μ``, ``σ²`` — differentiable in the input, γ, β and the running statistics themselves.

    The forward is the backend's single pass (the same as without gradients). The first-order
    backward is one pass on the backend (:meth:`Backend.backward_eval`): ``dx = dy·γ/√(σ² + ε)``
    and the per-channel sums ``Σdy`` and ``Σdy·(x − μ)``, from which ``dγ``, ``dβ``, ``dμ`` and
    ``dσ²`` follow per channel. A graph of the backward (``create_graph=True``), or a ``dy``
    without memory of its own, recomputes the output with torch operations and differentiates
    that.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        be: Backend,
        axis: int,
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        y = be.eval_node(x, axis, mean, var, weight, bias, eps)
        if y is None:
            xc, restore = canonical_layout(x, axis)
            y = be.forward_eval(xc, mean, var, weight, bias, eps)
        else:
            restore = _same
        # the statistics as this forward used them (a training step of the layer before the
        # backward updates its buffers in place); ones that require gradients stay themselves
        mean_used = mean if mean.requires_grad else mean.clone()
        var_used = var if var.requires_grad else var.clone()
        # so is a γ that takes no gradient (a frozen layer's buffer, which an update may change
        # in place); β is not needed (dβ = Σdy), only its dtype, so changing it in place
        # before the backward is no error, as in torch.nn
        w_used = weight if weight is None or weight.requires_grad else weight.clone()
        ctx.save_for_backward(x, mean_used, var_used, w_used)  # type: ignore[arg-type]
        ctx.bias_dtype = None if bias is None else bias.dtype  # type: ignore[attr-defined]
        ctx.eps = eps  # type: ignore[attr-defined]
        ctx.axis = axis  # type: ignore[attr-defined]
        ctx.backend = be  # type: ignore[attr-defined]
        ctx.restore = restore  # type: ignore[attr-defined]
        ctx.set_materialize_grads(False)
        # y leaves in the canonical shape with its ``restore``, as BatchNormFunction's does:
        # the caller's view of it may be modified in place (BN then ReLU(inplace=True))
        return y, restore

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor | None, *_unused: Any
    ) -> tuple[Tensor | None, ...]:
        x, mean, var, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        bias_dtype = ctx.bias_dtype  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad[:5]  # type: ignore[attr-defined]
        # β's value does not enter its gradient: zeros stand in for it
        bias = None
        if bias_dtype is not None:
            bias = torch.zeros_like(mean, dtype=bias_dtype).requires_grad_(needs[4])
        eps: float = ctx.eps  # type: ignore[attr-defined]
        axis: int = ctx.axis  # type: ignore[attr-defined]
        none: tuple[None, ...] = (None,) * 3
        if dy is None:
            return (None,) * 5 + none
        dy_x = ctx.restore(dy)  # type: ignore[attr-defined]
        inputs = (x, mean, var, weight, bias)
        if torch.is_grad_enabled() or not _has_memory(dy):
            # torch operations, differentiated by autograd: a graph for second derivatives,
            # or a dy the kernels cannot read (batched gradients)
            return (*graph_backward_eval(dy_x, inputs, needs, eps, axis), *none)
        be: Backend = ctx.backend  # type: ignore[attr-defined]
        dw = db = dmean = dvar = None
        # one pass: dx = dy·γ/√(σ² + ε) and the per-channel Σdy·(x − μ), Σdy
        dyc, xc, restore = _canonical_pair(dy_x, x, axis)
        dxc, s1, s0 = be.backward_eval(dyc, xc, mean, var, weight, eps, needs[0])
        dx = None if dxc is None else restore(dxc)
        if any(needs[1:]):
            cd = _compute_dtype(x.dtype)
            inv = torch.rsqrt(var.to(cd) + eps)
            s1, s0 = s1.to(cd), s0.to(cd)
            if needs[3] and weight is not None:
                dw = (s1 * inv).to(weight.dtype)
            if needs[4] and bias is not None:
                db = s0.to(bias.dtype)
            if needs[1] or needs[2]:  # the running statistics themselves require gradients
                scale = inv if weight is None else inv * weight.to(cd)
                if needs[1]:
                    dmean = (-scale * s0).to(mean.dtype)
                if needs[2]:
                    dvar = (-0.5 * s1 * inv * inv * scale).to(var.dtype)
        return dx, dmean, dvar, dw, db, *none


def _canonical_pair(
    dy: Tensor, x: Tensor, axis: int
) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """The canonical views of ``dy`` and ``x`` and ``x``'s restore: ``dy`` is first brought to
    ``x``'s memory layout, so that both share one canonical view. An ``x`` with gaps or
    overlaps in memory (a channel slice of a ``channels_last`` tensor, an expanded one) is
    first made contiguous, as :func:`canonical_layout` would copy it: ``empty_like`` would
    lay such an ``x`` out densely in another order, and ``dy`` would be read in that order
    against ``x`` in row-major order."""
    if dy.stride() != x.stride():
        like = torch.empty_like(x, dtype=dy.dtype)
        if like.stride() != x.stride():  # x is not dense: strides not preserved
            x = x.contiguous()
            like = torch.empty_like(x, dtype=dy.dtype)
        dy = like.copy_(dy) if like.stride() != dy.stride() else dy
    xc, restore = canonical_layout(x, axis)
    dyc, _ = canonical_layout(dy, axis)
    return dyc, xc, restore


def replaced_vector_error(v: Tensor, channels: int) -> BatchNormInputError:
    """The error for a per-channel tensor whose length changed between a forward and its
    backward (a weight replaced through ``.data``): the backward would broadcast it."""
    return BatchNormInputError(
        f"batch_norm: a per-channel tensor of shape {tuple(v.shape)} was given for {channels} "
        "channels; was a weight or bias replaced (e.g. through .data) between the forward "
        "and the backward? Replace parameters between steps, not inside one."
    )


def _check_saved_vectors(x: Tensor, axis: int, *vectors: Tensor | None) -> None:
    c = x.shape[axis % x.dim()]
    for v in vectors:
        if v is not None and v.numel() != c:
            raise replaced_vector_error(v, c)


def _dense(dy: Tensor) -> Tensor:
    """A sparse gradient (``y.backward(dy.to_sparse())``) as the dense one the backward's
    element-wise formula needs (torch.nn's operator refuses it with the backend's words)."""
    return dy if dy.layout == torch.strided else dy.to_dense()


def graph_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float, axis: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dγ, dβ)`` of :class:`BatchNormFunction` for ``create_graph=True``: differentiable
    in ``dy``, ``x`` and ``weight`` (the compiled node of :mod:`batchnorm.native` calls it)."""
    _check_saved_vectors(x, axis, weight)
    dyc, xc, restore = _canonical_pair(_dense(dy), x, axis)
    # statistics recomputed differentiably from x
    cd = _compute_dtype(x.dtype)
    xcd = xc.to(cd)
    m, _, inv = _stats(xcd, eps)
    w = None if weight is None else weight.to(cd)
    gx, dw, db = _backward_math(dyc.to(cd), xcd, m, inv, w)
    return restore(gx.to(x.dtype)), dw, db


def graph_backward_eval(
    dy: Tensor,
    inputs: tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None],
    needs: Sequence[bool],
    eps: float,
    axis: int,
) -> list[Tensor | None]:
    """The gradients of inference (Algorithm 2) in ``inputs`` — ``(x, mean, var, weight,
    bias)`` — where ``needs`` says so, by differentiating the plain-torch forward: a graph for
    ``create_graph=True``, or a ``dy`` the kernels cannot read (batched gradients). Used by
    :class:`BatchNormEvalFunction` and by the compiled node of :mod:`batchnorm.native`."""
    x, mean, var, weight, bias = inputs
    _check_saved_vectors(x, axis, mean, var, weight, bias)
    wanted = [t for t, n in zip(inputs, needs, strict=True) if n and t is not None]
    with torch.enable_grad():
        xc, restore = canonical_layout(x, axis)
        y = restore(_TORCH.forward_eval(xc, mean, var, weight, bias, eps))
    got = iter(
        torch.autograd.grad(
            y, wanted, _dense(dy), create_graph=torch.is_grad_enabled(), allow_unused=True
        )
    )
    return [next(got) if n and t is not None else None for t, n in zip(inputs, needs)]


def _tracing() -> bool:
    """Inside ``torch.jit.trace``: the plain-torch backend (see :func:`get_backend`) is called
    without the autograd Function, so that autograd and the tracer see torch operations."""
    return torch._C._get_tracing_state() is not None


_T = TypeVar("_T")


def _untraced(f: Callable[..., _T], *args: Any) -> _T:
    """``f(*args)``, with ``torch.jit.trace``'s recording paused while a trace is taken: for
    checks of an input's sizes, whose outcome is a constant of the trace either way — so that
    they record no operations and raise no ``TracerWarning`` (torch.nn's layers check nothing
    there)."""
    state = torch._C._get_tracing_state()
    if state is None:
        return f(*args)
    _set_tracing_state(None)
    try:
        return f(*args)
    finally:
        _set_tracing_state(state)


#: (not in torch's type stubs)
_set_tracing_state: Callable[[Any], None] = torch._C._set_tracing_state  # type: ignore[attr-defined]


def _torch_ops_only() -> bool:
    """Inside ``torch.jit.trace``, a forward-mode AD level (``forward_ad.dual_level``),
    ``torch.compile`` or a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, …): the
    plain-torch backend without the autograd Function, so that the tracer, the compiler and
    autograd see torch operations (the Function and the compiled node have no forward-mode
    derivative, and transforms wrap tensors that neither can take)."""
    return (
        _tracing()
        or _fw_ad._current_level >= 0
        or torch.compiler.is_compiling()
        or _functorch_level() is not None
    )


#: the innermost active ``torch.func`` transform (grad, vmap, jacrev, …), None outside them:
#: inside one, tensors are wrappers the Function (no ``setup_context``) and kernels cannot take
_functorch_level: Callable[[], int | None] = torch._C._functorch.maybe_current_level


def _graph_needed(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether autograd must record this normalization (else the Function's cost is skipped)."""
    return (
        torch.is_grad_enabled()
        and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
        and not _made_for_inference(x, weight, bias)
    )


def _made_for_inference(x: Tensor, *others: Tensor | None) -> bool:
    """Every tensor of a call (``None`` aside) made under ``torch.inference_mode()`` and used
    outside it, as when a model built under it serves from a thread pool (the mode is
    per-thread): torch's operators record no graph for such a call, since inference tensors
    have no autograd, and neither do ours. (Under ``torch.compile`` there are none to ask
    about: the compiler cannot trace the question.)"""
    return (
        not torch.compiler.is_compiling()
        and x.is_inference()
        and all(t is None or t.is_inference() for t in others)
    )


def _check_updatable(
    running_mean: Tensor, running_var: Tensor, counter: Tensor | None, layer: str | None
) -> None:
    """Refuse running buffers made under ``torch.inference_mode()`` outside it: they cannot be
    changed in place there (torch refuses such an update; the kernels would write it unseen)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    if not (
        running_mean.is_inference()
        or running_var.is_inference()
        or (counter is not None and counter.is_inference())
    ):
        return
    raise BatchNormInputError(
        f"{_name(layer)}: its running statistics were made under torch.inference_mode() "
        "(inference tensors), and a training-mode call outside it would update them in place, "
        "which torch does not allow. Call .eval() to use them as they are, run the call under "
        "torch.inference_mode(), or build or load the model outside inference_mode "
        "(torch.no_grad() turns gradients off as well) so that its buffers are ordinary tensors."
    )


def _check_input(input: Tensor, axis: int, layer: str | None) -> None:
    """The public functions' input check: a floating input whose ``axis`` exists (one
    expression when it holds: the layers call these functions on every step;
    :func:`check_channels` says what is wrong otherwise). A 1-D input with ``axis`` 0 or -1 is
    one sample's channels (what Keras' layer takes at rank 1)."""
    nd = input.dim()
    if not (nd >= 1 and -nd <= axis < nd and input.dtype in _INPUT_DTYPES):
        check_channels(input, input.shape[axis] if 0 < nd and -nd <= axis < nd else 0, axis, layer)


def _check_policy(nonfinite: Any, layer: str | None) -> None:
    if nonfinite != "warn" and nonfinite != "raise":
        raise ValueError(
            f"{_name(layer)}: nonfinite must be 'warn' or 'raise' (what to do with a batch whose "
            f"statistics are not finite), got {nonfinite!r}"
        )


def _bad_eps(eps: Any, layer: str | None) -> NoReturn:
    """Refuse an ``eps`` below 0 (or NaN), which a layer's attribute may have been set to after
    the constructor checked it: the variance plus eps would be negative, every output NaN."""
    raise BatchNormInputError(
        f"{_name(layer)}: eps must be >= 0 (it is added to the variance), got {eps!r}; the usual "
        "value is 1e-5"
    )


def _check_momentum(momentum: Any, layer: str | None) -> Any:
    """The momentum as a Python float (a NumPy float16's arithmetic would round the blend), or
    refused if it is not a finite number (``None``, a string, NaN, inf: a layer's attribute may
    be set after its constructor checked it), before it reaches the running statistics; a
    tensor (a traced or compiled cumulative factor) is taken as it is."""
    given = momentum
    if isinstance(momentum, Tensor) and momentum.dim() == 0:  # (other tensors: refused below)
        if not _has_memory(momentum) or _tracing() or torch.compiler.is_compiling():
            return momentum  # a factor inside a recorded graph
        momentum = float(momentum)  # a user's 0-d tensor (torch.nn takes one): a number
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        ok = False  # (NumPy's scalars are Real: np.float32(0.1) is a momentum)
    else:
        # comparisons, not math.isfinite: torch.compile traces them on a symbolic momentum (a
        # schedule's changing value, dynamic=True), where math.isfinite breaks the graph
        ok = -math.inf < momentum < math.inf  # type: ignore[operator]
    if not ok:
        raise BatchNormInputError(
            f"{_name(layer)}: momentum must be a finite number, the weight of the new batch in "
            f"the running averages (PyTorch's convention, usually 0.1), got {given!r}"
            + (
                "; for the cumulative average pass 1/n for the n-th batch (a layer's "
                "momentum=None does that)"
                if momentum is None
                else f"; a tensor must be 0-d, one number for every channel (torch refuses "
                f"others too), not of shape {tuple(momentum.shape)}"
                if isinstance(momentum, Tensor)
                else ""
            )
        )
    return float(momentum)


def empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None, axis: int) -> Tensor:
    """The (empty) output of an empty batch, still connected to γ and β: their gradients are
    zeros, as torch.nn gives, and DistributedDataParallel finds every parameter used in the
    step. TorchScript-compatible."""
    y = input.clone()
    nd = input.dim()
    shape = [1] * nd
    shape[axis % nd] = -1
    if weight is not None:
        y = y + weight.view(shape).to(input.dtype) * 0  # (0, C, …): still empty
    if bias is not None:
        y = y + bias.view(shape).to(input.dtype) * 0
    return y


# --------------------------------------------------------------------------------------------
# public functions


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    backend: str | None = None,
    layer: str | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Normalize with the batch's own statistics (Algorithm 1).

    Returns ``(y, mean, var, count)``: the output (same shape and dtype as ``input``; its
    layout when contiguous or with the channels innermost, else contiguous), the per-channel batch mean and biased variance (float32 for half inputs) and
    the number ``m`` of values each channel's statistics were taken over.

    With ``mask`` (boolean, True at valid positions, shaped like ``input`` without the channel
    axis — see :func:`check_mask`), the statistics are taken over the valid positions only and
    ``count`` is their number; every position is normalized with them.
    """
    if not eps >= 0:
        _bad_eps(eps, layer)
    layer = layer or "batch_norm_train"
    _check_input(input, axis, layer)
    ax = axis % input.dim() if input.dim() else axis
    check_vectors(input, ax, {"weight": weight, "bias": bias}, layer)
    if mask is not None:
        m = check_mask(input, mask, ax, layer)
        count = valid_count(input, ax, m)
        if count < 2:
            raise BatchNormInputError(
                f"{_name(layer)}: the mask leaves {count} valid value(s) per channel in input of "
                f"shape {tuple(input.shape)}; batch statistics need at least 2. Check the mask "
                "(True marks valid positions) or call .eval() to use the running statistics."
            )
        y, mean, var = _masked_train(input, weight, bias, eps, ax, m, count)
        return y, mean, var, count
    count = _check_count(input, ax, layer)
    be = get_backend(input, backend, also=(weight, bias), layer=layer)
    node = be.train_node(input, ax, weight, bias, eps, None)
    if node is not None:
        return node[0], node[1][0], node[1][1], count
    if _graph_needed(input, weight, bias) and not _torch_ops_only():
        yc, (mean, var), _, restore = BatchNormFunction.apply(
            input, weight, bias, eps, be, None, ax
        )
        return restore(yc), mean, var, count
    # no graph to record: skip the autograd Function's per-call cost (small batches)
    xc, restore = canonical_layout(input, ax)
    y, mean, var, _ = be.forward_train(xc, weight, bias, eps)
    return restore(y), mean, var, count


def batch_norm_step(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    unbiased_running_var: bool = True,
    nonfinite: NonFinitePolicy = "warn",
    backend: str | None = None,
    layer: str | None = None,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, bool]:
    """A training step: :func:`batch_norm_train` and :func:`update_running_stats` in one backend
    call (the kernels update the running buffers right after normalizing, without a round trip
    through torch operations).

    Returns ``(y, updated)``; ``updated`` is False when the batch statistics were not finite
    (the running buffers, and ``num_batches_tracked`` — incremented otherwise — are then left
    unchanged, and ``nonfinite`` says whether to warn or raise).
    """
    if not eps >= 0:
        _bad_eps(eps, layer)
    layer = layer or "batch_norm_step"
    _check_input(input, axis, layer)
    _check_policy(nonfinite, layer)
    momentum = _check_momentum(momentum, layer)
    ax = axis % input.dim() if input.dim() else axis
    count = _check_count(input, ax, layer)
    c = _factor_count(count)
    alpha = momentum * c / (c - 1) if unbiased_running_var else momentum
    node = None
    if (ext := _ready_node(backend, input)) is not None:
        T = kernels._threads(input.numel(), None)
        node = ext.train(
            input, ax, weight, bias, running_mean, running_var, num_batches_tracked, T, eps,
            momentum, alpha,
        )  # fmt: skip
    running = RunningStats(
        running_mean,
        running_var,
        momentum,
        alpha,
        num_batches_tracked,
        _graph_error(nonfinite, layer),
    )
    if node is None:
        # (the node declines tensors of another length: checked here, off its path)
        vectors = {
            "weight": weight,
            "bias": bias,
            "running_mean": running_mean,
            "running_var": running_var,
        }
        check_vectors(input, ax, vectors, layer)
        _check_updatable(running_mean, running_var, num_batches_tracked, layer)
        be = get_backend(
            input,
            backend,
            also=(weight, bias, running_mean, running_var, num_batches_tracked),
            layer=layer,
        )
        if ext is None or be.name != "numba":  # the kernels' node declined above
            node = be.train_node(input, ax, weight, bias, eps, running)
    if node is not None:
        y, _, updated = node
    elif _graph_needed(input, weight, bias) and not _torch_ops_only():
        yc, _, updated, restore = BatchNormFunction.apply(input, weight, bias, eps, be, running, ax)
        y = restore(yc)
    else:
        xc, restore = canonical_layout(input, ax)
        yc, _, _, _, updated = be.forward_train_update(xc, weight, bias, eps, running)
        y = restore(yc)
    if not updated:
        _refuse_nonfinite(nonfinite, layer)
    return y, updated


def batch_norm_eval(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    backend: str | None = None,
    layer: str | None = None,
) -> Tensor:
    """Normalize with population statistics (Algorithm 2): the affine map
    ``y = x·scale + shift`` with ``scale = γ/√(Var[x] + ε)`` and ``shift = β − scale·E[x]``."""
    if not eps >= 0:
        _bad_eps(eps, layer)
    layer = layer or "batch_norm_eval"
    _check_input(input, axis, layer)
    ext = _ready_node(backend, input)
    needs_graph = (
        torch.is_grad_enabled()
        and (
            input.requires_grad
            or running_mean.requires_grad
            or running_var.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
        and not _made_for_inference(input, running_mean, running_var, weight, bias)
    )
    if ext is not None:
        T = kernels._threads(input.numel(), None)
        # with a graph: the node records itself (its backward one pass, in C++); it declines
        # running statistics that require gradients (the Function below takes those)
        run = ext.evaluate_grad if needs_graph else ext.evaluate
        y = run(input, axis, running_mean, running_var, weight, bias, T, eps)
        if y is not None:
            return y  # type: ignore[no-any-return]
    # (the node declines tensors of another length: checked here, off its path)
    vectors = {
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
    }
    check_vectors(input, axis % input.dim(), vectors, layer)
    if _untraced(Tensor.numel, input) == 0:  # (a size: while tracing, a constant of the trace)
        # an empty batch (the node declines it): an empty output with zero gradients, as
        # torch's function gives; the half-precision operator's backward divides by zero on it
        return empty_output(input, weight, bias, axis)
    # the node is ready only outside a trace and torch.compile, so the export check is
    # needed only without it (each check a Python call: microseconds with the caches cold)
    if (
        ext is None
        and _exporting()
        and not (running_mean.requires_grad or running_var.requires_grad)
    ):
        return _operator_eval(input, running_mean, running_var, weight, bias, eps, axis)
    be = get_backend(input, backend, also=(running_mean, running_var, weight, bias), layer=layer)
    if be is _ATEN_BACKEND and not (running_mean.requires_grad or running_var.requires_grad):
        # torch's operator, recorded by autograd itself when there is a graph to record
        return be.eval_node(input, axis, running_mean, running_var, weight, bias, eps)
    if needs_graph and be is not _TORCH and not _torch_ops_only():
        # eval mode with gradients (fine-tuning with BN frozen in eval mode, gradients with
        # respect to the input): the kernels' single pass forward, and one pass back
        yc, restore = BatchNormEvalFunction.apply(
            input, running_mean, running_var, weight, bias, eps, be, axis
        )
        return restore(yc)  # type: ignore[no-any-return]
    if needs_graph:
        be = _TORCH
    elif ext is None:  # a node that declined above would decline again
        node = be.eval_node(input, axis, running_mean, running_var, weight, bias, eps)
        if node is not None:
            return node
    xc, restore = canonical_layout(input, axis)
    # with a graph: differentiable in every argument, torch operations
    return restore(be.forward_eval(xc, running_mean, running_var, weight, bias, eps))


def _exporting() -> bool:
    """Inside ``torch.jit.trace`` (the tracer of ``torch.onnx.export`` and of ``torch.export``)
    or ``torch.compile``/strict ``torch.export`` (TorchDynamo): a graph is being recorded for
    another runtime or compiler."""
    return _tracing() or torch.compiler.is_compiling()


def _operator_eval(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    """Inference through torch's own operator (``torch.batch_norm``), for recorded graphs: it
    is what ``torch.nn``'s layers record, so an exported model holds one batch-norm node per
    layer — ONNX ``BatchNormalization``, ``aten.batch_norm`` in ``torch.export`` — which
    runtimes and compilers fold into the convolution before it, and which takes any batch and
    spatial size (the element-wise form recorded reshapes to the traced input's sizes).
    Vectors of ``x``'s dtype are passed as they are (no casts in the graph); others are
    converted to the compute dtype (float32 for half inputs)."""
    vecs = (weight, bias, mean, var)
    dt = x.dtype if all(t is None or t.dtype == x.dtype for t in vecs) else _compute_dtype(x.dtype)

    def as_dt(t: Tensor | None) -> Tensor | None:
        return t if t is None or t.dtype == dt else t.to(dt)

    ax = axis % x.dim()
    # channels elsewhere: moved to dim 1 and back (transposes: no sizes fixed in the graph). A
    # contiguous (N, L, C) moved so is a channels_last (N, C, L, 1), whose layout the operator
    # keeps, as it keeps 4-D/5-D channels_last: the output comes back laid out as the eager
    # layer's, not transposed (a later .view would fail only in the recorded graph)
    xn = x if ax == 1 else x.movedim(ax, 1)
    lift = x.dim() == 3 and ax != 1
    y = torch.batch_norm(
        xn.unsqueeze(-1) if lift else xn,
        as_dt(weight),
        as_dt(bias),
        as_dt(mean),
        as_dt(var),
        False,
        0.0,
        eps,
        False,
    )
    if lift:
        y = y.squeeze(-1)
    y = y if ax == 1 else y.movedim(1, ax)
    return y.contiguous() if x.is_contiguous() else y


def _ready_node(backend: str | None, x: Tensor) -> Any | None:
    """The compiled node (:mod:`batchnorm.native`) when the general backend choice
    (:func:`get_backend`) would reach it, found in a few checks, or None for the general path.

    A layer call after a large pass finds the caches cold, and there every Python call costs
    microseconds: :func:`get_backend` and the backend's own dispatch took ~60 µs more than
    these checks. What this skips is checked by the node itself (dtype, device, layout,
    tensors with memory of their own: it declines anything else, and the general path takes
    over) or needs no check (the node is only built where the kernels can run)."""
    choice = backend if backend is not None else _env.get("BATCHNORM_BACKEND")
    if choice not in (None, "", "auto", "numba"):
        return None
    ext = native.loaded()
    if (
        ext is None
        # the node computes half inputs with torch's operator (the "aten" backend); the
        # kernels, when named, take them in float32 copies
        or (choice == "numba" and x.dtype in _HALF_DTYPES)
        or (type(x) not in _PLAIN_TYPES and _has_torch_function_unary(x))  # _overridden(x)
        or _get_tracing_state() is not None  # _torch_ops_only(), inlined
        or _fw_ad._current_level >= 0
        or torch.compiler.is_compiling()
        or _dispatch_stack_depth() > 0  # FakeTensorMode and other Python dispatch modes
    ):
        return None
    return ext


_get_tracing_state: Callable[[], Any] = torch._C._get_tracing_state
_dispatch_stack_depth: Callable[[], int] = torch._C._len_torch_dispatch_stack


def _inference_affine(
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    cd: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Algorithm 2's ``(scale, shift)`` in dtype ``cd``, with torch operations (differentiable)."""
    # (flattened: the layers take per-channel tensors of any shape holding C values)
    scale = torch.rsqrt(var.to(cd).reshape(-1) + eps)
    if weight is not None:
        scale = scale * weight.to(cd).reshape(-1)
    shift = -mean.to(cd).reshape(-1) * scale
    if bias is not None:
        shift = shift + bias.to(cd).reshape(-1)
    return scale, shift


_NUMPY_OK = (torch.float32, torch.float64)  # dtypes the NumPy update path takes
# running buffers the NumPy update path blends: half ones in the statistics' dtype (float32)
_BUFFER_OK = (*_NUMPY_OK, torch.float16, torch.bfloat16)


def _blend_view(buf: Tensor, stats: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """A running buffer as NumPy: float32/float64 buffers are their own memory (written in
    place), half ones a copy in ``stats`` (the dtype of the batch statistics)."""
    if buf.dtype in _NUMPY_OK:
        return buf.numpy()
    if buf.dtype == torch.float16:
        return buf.numpy().astype(stats)
    return buf.float().numpy().astype(stats, copy=False)  # bfloat16: NumPy has no such dtype


def _kept_finite(new: Any, old: Any) -> bool:
    """Whether every value of ``new`` is finite where the value of ``old`` it replaces is (NumPy
    arrays or tensors): a buffer value that is not finite already (a broken checkpoint) stays
    so, as in torch.nn, without holding back the other channels."""
    # (all finite, the usual case, in one test: this runs on every training step)
    if isinstance(new, Tensor):
        ok = torch.isfinite(new)
        return bool(ok.all()) or bool((ok | ~torch.isfinite(old)).all())
    finite = np.isfinite(new)
    return bool(finite.all()) or bool((finite | ~np.isfinite(old)).all())


def _rounded(new: np.ndarray[Any, Any], old: Tensor) -> Tensor | None:
    """Blended values rounded to the half dtype of the running buffer ``old`` (to nearest, as
    torch's conversion); None when one of them leaves that dtype's range (inf) where the value
    it replaces is finite."""
    if old.dtype == torch.float16:
        with np.errstate(over="ignore"):
            t = torch.from_numpy(new.astype(np.float16))
    else:
        t = torch.from_numpy(new).to(old.dtype)
    return t if _kept_finite(t, old) else None


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
    *,
    unbiased: bool = True,
    nonfinite: NonFinitePolicy = "warn",
    layer: str | None = None,
    num_batches_tracked: Tensor | None = None,
) -> bool:
    """Blend a batch's statistics into the running ones, in place, in PyTorch's convention:
    ``running = (1 − momentum)·running + momentum·batch``. The stored variance is the unbiased
    ``m/(m−1)·σ²_B`` (PyTorch) or, with ``unbiased=False``, the biased ``σ²_B`` (Keras).

    Returns False (and changes nothing) when the batch statistics are not finite;
    ``num_batches_tracked``, if given, is incremented when they were blended in — inside a
    trace too, where the refusal is part of the graph (the returned value is then True).
    """
    layer = layer or "update_running_stats"
    _check_policy(nonfinite, layer)
    momentum = _check_momentum(momentum, layer)
    for what, buf in (("running_mean", running_mean), ("running_var", running_var)):
        if buf.numel() != mean.numel() or not buf.is_floating_point():
            raise BatchNormInputError(
                f"{_name(layer)}: {what} has shape {tuple(buf.shape)} and dtype {buf.dtype}, "
                f"but the batch statistics have {mean.numel()} channels: running buffers need "
                f"{mean.numel()} floating-point values, e.g. torch.zeros({mean.numel()})."
            )
    _check_updatable(running_mean, running_var, num_batches_tracked, layer)
    # (1 − momentum)·running + momentum·(m/(m−1))·σ²_B, with the Bessel factor folded into alpha
    if isinstance(count, Tensor | torch.SymInt):  # traced or symbolic: see _factor_count
        count = _factor_count(count)  # type: ignore[assignment]
    elif unbiased and count < 2:
        raise BatchNormInputError(
            f"{_name(layer)}: the unbiased running variance m/(m−1)·σ²_B needs m ≥ 2 values "
            f"per channel, got count={count}. Train on batches of 2 or more values per channel, "
            "or pass unbiased=False to store σ²_B itself."
        )
    alpha = momentum * count / (count - 1) if unbiased else momentum
    graph_error = _graph_error(nonfinite, layer)
    running = RunningStats(
        running_mean, running_var, momentum, alpha, num_batches_tracked, graph_error
    )
    if blend_running(running, mean, var):
        return True
    return _refuse_nonfinite(nonfinite, layer)


def blend_running(running: RunningStats, mean: Tensor, var: Tensor) -> bool:
    """Blend a batch's ``mean`` and biased ``var`` into ``running`` in place (see
    :class:`RunningStats`); return False, changing nothing, when they are not finite."""
    running_mean, running_var, momentum, alpha, nbt, _ = running
    # on CPU the check and the update run on NumPy views of the same memory: each torch call
    # on a C-sized vector costs more than the arithmetic (it decides the small-batch step time)
    if _tracing() or not (_concrete(var) and _concrete(running_var)):
        # meta and fake tensors (shape propagation), or a trace: no value read in Python (mean
        # comes from the same computation as var)
        return _blend_traced(running, mean, var)
    if (
        var.is_cpu
        and var.dtype in _NUMPY_OK
        and mean.dtype in _NUMPY_OK
        and running_var.dtype in _BUFFER_OK
        and running_mean.dtype in _BUFFER_OK
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
    ):
        v = (var.detach() if var.requires_grad else var).numpy()
        # var = mean((x − μ)²) is non-finite whenever μ is (inf − inf = NaN): one check
        if not np.isfinite(v).all():
            return False
        mu = (mean.detach() if mean.requires_grad else mean).numpy()
        rm, rv = _blend_view(running_mean, v.dtype), _blend_view(running_var, v.dtype)
        # the new values are checked in the buffers' dtype before they are stored: a finite
        # variance beyond that dtype's range must not become an inf running variance
        with np.errstate(over="ignore", invalid="ignore"):
            # (1 − momentum)·running + momentum·batch, as torch.nn writes it: at momentum 1
            # the batch's value exactly (a lerp's running + momentum·(batch − running) is not)
            new_m = rm * (1.0 - momentum) + momentum * mu.astype(rm.dtype, copy=False)
            new_v = rv * (1.0 - momentum) + alpha * v.astype(rv.dtype, copy=False)
        if running_mean.dtype in _NUMPY_OK and running_var.dtype in _NUMPY_OK:
            if not (_kept_finite(new_v, rv) and _kept_finite(new_m, rm)):
                return False
            rm[...] = new_m
            rv[...] = new_v
        else:  # half buffers: blended in the statistics' dtype, rounded once into theirs
            m_t, v_t = _rounded(new_m, running_mean), _rounded(new_v, running_var)
            if m_t is None or v_t is None:
                return False
            running_mean.copy_(m_t)
            running_var.copy_(v_t)
    else:
        with torch.no_grad():
            if not bool(torch.isfinite(var).all()):
                return False
            blended_m, blended_v = _blended(running, mean, var)
            if not (_kept_finite(blended_v, running_var) and _kept_finite(blended_m, running_mean)):
                return False
            running_mean.copy_(blended_m)
            running_var.copy_(blended_v)
    if nbt is not None:
        nbt.add_(1)
    return True


def _blended(running: RunningStats, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """The blended running mean and variance, new tensors in the buffers' dtype (torch ops):
    computed in the wider of the buffers' and the statistics' dtypes and rounded once (half
    buffers are blended in float32, as torch.nn's operator and Keras do)."""
    running_mean, running_var, momentum, alpha, _, _ = running
    cm = torch.promote_types(running_mean.dtype, mean.dtype)
    cv = torch.promote_types(running_var.dtype, var.dtype)
    if torch.compiler.is_compiling():
        # momentum=None's factor is a Python float read from the counter: inductor (torch
        # 2.13) keeps the first value of such a float given as add's alpha or lerp's weight for
        # every later step, with no guard to recompile. As 0-d tensors, the values flow.
        m = torch.tensor(momentum, dtype=cm)
        # (alpha is a tensor already where the count is symbolic: see _factor_count)
        a = alpha.to(cv) if isinstance(alpha, Tensor) else torch.tensor(alpha, dtype=cv)
        blended_m = running_mean.to(cm) * (1.0 - m.to(cm)) + m * mean.to(cm)
        blended_v = running_var.to(cv) * (1.0 - m.to(cv)) + a * var.to(cv)
    elif isinstance(alpha, Tensor):  # a traced or symbolic count's factor
        blended_m = torch.lerp(running_mean.to(cm), mean.to(cm), momentum)
        blended_v = running_var.to(cv).mul(1.0 - momentum) + alpha.to(cv) * var.to(cv)
    else:
        blended_m = torch.lerp(running_mean.to(cm), mean.to(cm), momentum)
        blended_v = running_var.to(cv).mul(1.0 - momentum).add(var.to(cv), alpha=alpha)
    return blended_m.to(running_mean.dtype), blended_v.to(running_var.dtype)


def _blend_traced(running: RunningStats, mean: Tensor, var: Tensor) -> bool:
    """:func:`blend_running` inside ``torch.jit.trace`` and on values Python cannot read
    (meta and fake tensors): the refusal of non-finite values as tensor operations
    (``where``), so that the traced graph keeps it for every later input (a Python test would
    be recorded as a constant). No warning can come from a trace. A trace does not record
    ``no_grad`` either: the statistics are detached, or the replayed update would give the
    buffers an autograd history (each step's graph kept alive by the next)."""
    running_mean, running_var, _, _, nbt, _ = running
    mean, var = mean.detach(), var.detach()
    # with the statistics detached the update records no graph; no_grad only where a buffer
    # itself requires gradients (an in-place write to it would be refused): torch.export turns
    # a no_grad block into a node its serializer cannot save (torch.export.save/load)
    needs_no_grad = running_mean.requires_grad or running_var.requires_grad
    with torch.no_grad() if needs_no_grad else contextlib.nullcontext():
        blended_m, blended_v = _blended(running, mean, var)
        # as blend_running: the batch's own statistics finite, and the blend too where the
        # running statistics were (a NaN channel of a broken checkpoint stays NaN, but a NaN
        # batch is not blended into the others, nor counted)
        kept_v = torch.isfinite(blended_v) | ~torch.isfinite(running_var)
        kept_m = torch.isfinite(blended_m) | ~torch.isfinite(running_mean)
        ok = kept_v.all() & kept_m.all() & torch.isfinite(mean).all() & torch.isfinite(var).all()
        running_mean.copy_(torch.where(ok, blended_m, running_mean))
        running_var.copy_(torch.where(ok, blended_v, running_var))
        if nbt is not None:
            nbt.add_(ok.to(nbt.dtype))
    if running.graph_error is not None:
        # (outside no_grad: an error raised inside a compiled no_grad region leaves gradients
        # disabled for the caller; the buffers above are unchanged when it fires)
        torch._assert_async(ok, running.graph_error)
    return True


def _graph_error(nonfinite: NonFinitePolicy, layer: str | None) -> str | None:
    """:attr:`RunningStats.graph_error` for a call with policy ``nonfinite``."""
    if nonfinite != "raise" or not torch.compiler.is_compiling():
        return None
    return _nonfinite_message(_name(layer))


def _nonfinite_message(layer: str) -> str:
    """What a refused non-finite batch is told (also by the TorchScript path)."""
    return (
        f"{layer}: the batch statistics are not finite (NaN or inf in the input, or a variance "
        "beyond the range of the running buffers' dtype); the running statistics were left "
        "unchanged. Check the inputs and the learning rate; batchnorm.doctor(model, data) finds "
        "where non-finite values start."
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LAB_DIR = _PACKAGE_DIR + "lab" + os.sep
_TORCH_MODULES_DIR = os.path.dirname(os.path.abspath(torch.nn.modules.module.__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` with which the function calling this makes ``warnings.warn`` name
    the user's line: the first frame outside this package (the lab excepted) and outside
    ``torch.nn``'s modules (``Module.__call__``, ``Sequential``), however deep a layer, a
    subclass or the functional API calls — and outside Keras, when it has been imported (its
    ``Layer.__call__`` and traceback filtering, around :class:`batchnorm.keras`'s layer)."""
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    keras = sys.modules.get("keras")
    keras_file = getattr(keras, "__file__", None)
    keras_dir = os.path.dirname(os.path.abspath(keras_file)) + os.sep if keras_file else None
    while frame.f_back is not None:
        name = frame.f_code.co_filename
        inside = name.startswith(_PACKAGE_DIR) and not name.startswith(_LAB_DIR)
        framework = name.startswith(_TORCH_MODULES_DIR) or bool(
            keras_dir and name.startswith(keras_dir)
        )
        if not (inside or framework):
            break
        frame = frame.f_back
        level += 1
    return level


def _refuse_nonfinite(nonfinite: NonFinitePolicy, layer: str | None) -> bool:
    """The non-finite-statistics policy of :func:`update_running_stats` and
    :func:`batch_norm_step`: raise or warn (the warning names the user's line that called the
    layer or the function)."""
    msg = _nonfinite_message(_name(layer))
    if nonfinite == "raise":
        raise NonFiniteStatisticsError(msg)
    warnings.warn(msg, NonFiniteStatisticsWarning, stacklevel=_user_stacklevel())
    return False


def _check_call(
    input: Tensor,
    axis: int,
    layer: str | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> None:
    """:func:`batch_norm`'s arguments, each named when it is the one at fault: a floating
    input with batch and channel axes, running buffers both given or both absent, and every
    per-channel tensor floating with one value per channel of the input."""
    name = _name(layer)
    in_range = -input.dim() <= axis < input.dim()
    # dtype, dimensions and axis (the channel count is the input's own: checked below)
    check_channels(input, input.shape[axis] if in_range else 0, axis, layer)
    if (running_mean is None) != (running_var is None):
        given, missing = (
            ("running_mean", "running_var")
            if running_var is None
            else ("running_var", "running_mean")
        )
        raise BatchNormInputError(
            f"{name}: {given} was given without {missing}: pass both running buffers (they are "
            "updated together in training and used together in eval mode), or neither."
        )
    vectors = {
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
    }
    check_vectors(input, axis, vectors, layer, flat=True)


def check_vectors(
    input: Tensor,
    axis: int,
    vectors: Mapping[str, Tensor | None],
    layer: str | None = None,
    flat: bool = False,
) -> None:
    """Raise :class:`BatchNormInputError`, naming the tensor at fault, unless each given
    per-channel tensor in ``vectors`` (weight, bias, running buffers, by name) is floating
    point with one value per channel of ``input`` — of shape ``(C,)`` with ``flat``, of any
    shape holding ``C`` values otherwise (what ``torch.nn``'s layers accept). The kernels
    read and write exactly ``C`` values of each: a shorter tensor must never reach them."""
    if _get_tracing_state() is not None:  # sizes read while tracing would be traced values
        return _untraced(check_vectors, input, axis, vectors, layer, flat)
    name = _name(layer)
    c = input.shape[axis]
    for what, v in vectors.items():
        if v is None:
            continue
        if not v.is_floating_point():
            raise BatchNormInputError(
                f"{name}: {what} must be floating point, got dtype {v.dtype} with shape "
                f"{tuple(v.shape)}. Create it as a float tensor, e.g. torch.zeros({c})."
            )
        if v.numel() != c or (flat and v.dim() != 1):
            # the functional call's axis is the caller's to choose; a layer's is fixed, and its
            # tensors of another length were swapped after it was built
            remedy = (
                f"per-channel tensors need shape ({c},).{_axis_hint(input, v.numel(), axis)}"
                if flat
                else f"per-channel tensors need {c} values. After changing a layer's channel "
                "count (pruning, model surgery), replace weight, bias, running_mean and "
                "running_var together and set num_features to match."
            )
            raise BatchNormInputError(
                f"{name}: {what} has shape {tuple(v.shape)}, but the input of shape "
                f"{tuple(input.shape)} has {c} channels along axis {axis}: {remedy}"
            )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    unbiased_running_var: bool = True,
    nonfinite: NonFinitePolicy = "warn",
    backend: str | None = None,
    layer: str | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Batch normalization with ``torch.nn.functional.batch_norm``'s signature, plus ``axis``.

    In training (``training=True``) the batch statistics normalize the input and, when running
    buffers are given, are blended into them with ``momentum`` (PyTorch's convention: the weight
    of the new batch). Otherwise the running statistics normalize the input.

    ``mask`` (boolean, True at valid positions of padded sequences, shaped like ``input``
    without the channel axis) restricts the batch statistics — and so the running update — to
    the valid positions; in eval mode it is only validated.

    Example::

        >>> import torch
        >>> from batchnorm.functional import batch_norm
        >>> x = torch.randn(32, 8, 5, 5)
        >>> rm, rv = torch.zeros(8), torch.ones(8)
        >>> y = batch_norm(x, rm, rv, training=True)
        >>> bool(y.mean(dim=(0, 2, 3)).abs().max() < 1e-5)
        True
    """
    _check_call(input, axis, layer, running_mean, running_var, weight, bias)
    _check_policy(nonfinite, layer)
    if not eps >= 0:
        _bad_eps(eps, layer)
    if training and input.numel() == 0:
        # an empty batch (a detector's frame without boxes): an empty output, as torch's
        # function gives; nothing to learn from, so the running statistics stay as they are
        return empty_output(input, weight, bias, axis)
    if training and running_mean is not None and running_var is not None:
        _check_momentum(momentum, layer)
    if training and mask is None and running_mean is not None and running_var is not None:
        with _transform_errors(input, (running_mean, running_var), layer):
            y, _ = batch_norm_step(
                input,
                running_mean,
                running_var,
                weight,
                bias,
                momentum,
                eps,
                axis=axis,
                unbiased_running_var=unbiased_running_var,
                nonfinite=nonfinite,
                backend=backend,
                layer=layer,
            )
        return y
    if training:
        y, mean, var, count = batch_norm_train(
            input, weight, bias, eps, axis=axis, backend=backend, layer=layer, mask=mask
        )
        if running_mean is not None and running_var is not None:
            with _transform_errors(input, (running_mean, running_var), layer):
                update_running_stats(
                    running_mean,
                    running_var,
                    mean,
                    var,
                    count,
                    momentum,
                    unbiased=unbiased_running_var,
                    nonfinite=nonfinite,
                    layer=layer,
                )
        return y
    if running_mean is None or running_var is None:
        raise BatchNormInputError(
            f"{_name(layer)}: running_mean and running_var are required when training=False"
        )
    if mask is not None:
        check_mask(input, mask, axis, layer)
    return batch_norm_eval(
        input, running_mean, running_var, weight, bias, eps, axis=axis, backend=backend, layer=layer
    )


# --------------------------------------------------------------------------------------------
# TorchScript


def check_scripted_input(
    input: Tensor, num_features: int, axis: int, min_rank: int, max_rank: int, layer: str
) -> None:
    """The input checks of a scripted layer (TorchScript's subset of the eager ones): the rank,
    a floating dtype and ``num_features`` channels along ``axis``, each error naming the layer
    and the shape."""
    nd = input.dim()
    if nd < min_rank or nd > max_rank:
        raise BatchNormInputError(
            f"{layer}: expected input of rank {min_rank} to {max_rank}, got {nd}D input of "
            f"shape {input.shape}"
        )
    if not input.is_floating_point():
        raise BatchNormInputError(
            f"{layer}: expected a floating-point input, got shape {input.shape}; convert it "
            "first, e.g. x.float()"
        )
    if axis < -nd or axis >= nd or input.shape[axis] != num_features:
        raise BatchNormInputError(
            f"{layer}: expected {num_features} channels along axis {axis} of input with shape "
            f"{input.shape}"
        )


def batch_norm_scriptable(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    use_batch_stats: bool,
    update_running: bool,
    momentum: float | None,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
    nonfinite: str,
    layer: str,
) -> Tensor:
    """The layers' computation in TorchScript's subset of Python, for ``torch.jit.script``:
    torch operations only (the backends and the kernels need the Python interpreter), autograd
    for the gradients, the same conventions — biased batch variance, running variance unbiased
    unless ``unbiased_running_var=False``, ``momentum=None`` as the cumulative average, and no
    non-finite batch ever blended into the running statistics (``nonfinite``: ``"warn"`` or
    ``"raise"``). ``update_running``: blend this batch's statistics into the running ones (and
    count it); float16/bfloat16 are computed in float32, as elsewhere."""
    nd = input.dim()
    ax = axis + nd if axis < 0 else axis
    C = input.shape[ax]
    shape: list[int] = []
    dims: list[int] = []
    for d in range(nd):
        shape.append(C if d == ax else 1)
        if d != ax:
            dims.append(d)
    cdtype = input.dtype
    if cdtype == torch.float16 or cdtype == torch.bfloat16:
        cdtype = torch.float32
    x = input.to(cdtype)
    if use_batch_stats:
        var, mean = torch.var_mean(x, dims, correction=0)
        if update_running and running_mean is not None and running_var is not None:
            factor = 0.0
            if momentum is not None:
                if not math.isfinite(momentum):
                    raise BatchNormInputError(
                        f"{layer}: momentum must be a finite number (the weight of the new "
                        f"batch, usually 0.1) or None, got {momentum}"
                    )
                factor = momentum
            elif num_batches_tracked is not None:
                factor = 1.0 / (float(num_batches_tracked) + 1.0)
            count = input.numel() // C
            if unbiased_running_var and count < 2:
                raise BatchNormInputError(
                    f"{layer}: the unbiased running variance m/(m−1)·σ²_B needs m ≥ 2 values per "
                    f"channel, got input of shape {list(input.shape)}. Train on batches of 2 or "
                    "more values per channel, or set unbiased_running_var=False."
                )
            alpha = factor * count / (count - 1) if unbiased_running_var else factor
            with torch.no_grad():
                # blended in the wider of the statistics' and the buffers' dtypes and rounded
                # once into the buffers, as the eager path does: a half buffer would otherwise
                # get the batch variance rounded first (69984 is inf in float16)
                bt = torch.promote_types(cdtype, running_mean.dtype)
                new_m = torch.lerp(running_mean.to(bt), mean.detach().to(bt), factor)
                new_v = running_var.to(bt) * (1.0 - factor) + alpha * var.detach().to(bt)
                new_m = new_m.to(running_mean.dtype)
                new_v = new_v.to(running_var.dtype)
                # a buffer value that is not finite already stays so (the others update)
                kept_m = torch.isfinite(new_m) | ~torch.isfinite(running_mean)
                kept_v = torch.isfinite(new_v) | ~torch.isfinite(running_var)
                if bool(torch.isfinite(var).all() & kept_m.all() & kept_v.all()):
                    running_mean.copy_(new_m)
                    running_var.copy_(new_v)
                    if num_batches_tracked is not None:
                        num_batches_tracked.add_(1)
                elif nonfinite == "raise":
                    raise NonFiniteStatisticsError(_nonfinite_message(layer))
                else:
                    # (a UserWarning: TorchScript issues no other category)
                    warnings.warn(_nonfinite_message(layer), stacklevel=2)
        elif update_running and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    else:
        if running_mean is None or running_var is None:
            raise BatchNormInputError(f"{layer}: running statistics are required in eval mode")
        mean = running_mean.to(cdtype)
        var = running_var.to(cdtype)
    y = (x - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.to(cdtype).view(shape)
    if bias is not None:
        y = y + bias.to(cdtype).view(shape)
    return y.to(input.dtype)
