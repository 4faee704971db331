"""In-place activated batch normalization (Rota Bulò, Porzi & Kontschieder 2018, "In-Place
Activated BatchNorm for Memory-Optimized Training of DNNs", arXiv 1712.02616).

BN followed by an invertible activation, fused so that backward needs only the *output*
``y = act(γ x̂ + β)``: the output is what the next layer saves anyway, so the BN input ``x`` and
the pre-activation ``z`` are not kept alive for backward. Backward inverts the activation to get
``z = act⁻¹(y)`` and ``x̂ = (z − β)/γ``, then runs BN's compact backward:

    dz = dy · act'(z),   dγ = Σ dz·x̂,   dβ = Σ dz,
    dx = γ/(m·σ_B) · (m·dz − Σdz − x̂·Σ dz·x̂)

This is the same expression as :func:`batchnorm.reference.batch_norm_backward` with x̂ in place of
``(x − μ_B)/σ_B`` — so the fused kernels' backward is reused by passing ``x := x̂``, ``μ := 0``,
``invstd := 1`` and ``γ := γ/σ_B``.

Precision limits of the inversion (where a gradient becomes approximate, warned about once per
layer with :class:`InPlaceABNPrecisionWarning`):

* **ELU saturation.** Once ``y = −α`` exactly in floating point (pre-activation ``z`` below about
  −17 in float32, −37 in float64), ``z`` cannot be recovered. Such an element's true ``dz`` is
  ``dy·α·eᶻ`` (below ``ε·α·|dy|``), so it is taken as 0 and the element adds nothing to dβ, dγ
  or the other elements' dx. Its own dx needs its x̂, which is replaced by the exact mean of the
  channel's saturated x̂ (``Σ x̂ = 0`` over the batch, so their sum is ``−Σ`` of the others): with
  one saturated element in a channel everything is exact to rounding; with several, dx at the
  saturated positions is exact in sum but each is off by ``γ/(m·σ_B)·dγ·(x̂ᵢ − mean)``.
* **ELU near saturation.** Short of that, ``z = log1p(y/α)`` keeps fewer than half of ``y``'s
  digits once ``eᶻ = 1 + y/α < √ε`` (ε of the output's dtype: z below about −18 in float64,
  −8 in float32, −2.4 in bfloat16): x̂, dx and dγ are approximate there (float64, γ = 21 putting
  the lowest pre-activation at −35: dx off by 0.7 %), with a warning.
* **|γ| small relative to |β|.** ``x̂ = (z − β)/γ`` cancels: z carries a rounding error of
  ``ε·|β|``, so x̂ is off by about ``ε·|β|/|γ|`` and loses more than half its digits once
  ``|γ| < √ε·|β|`` (3.5e-4·|β| in float32, 1.5e-8·|β| in float64; ε of the input's dtype). dγ
  and dx are then inaccurate (dβ is not: it does not use x̂). Measured, float32, β = 1,
  LeakyReLU, 64×4 batch, largest error relative to the largest true gradient: γ = 3e-4 (at the
  bound): dγ 5e-5, dx 1.3e-5; γ = 1e-6: dγ 1.8e-2, dx 5e-3; γ = 1e-8: z = β exactly, x̂ = 0,
  dγ = 0 (100 % off), dx 1e-1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.functional import BatchNormInputError
from batchnorm.nn.batchnorm import BatchNorm, forwarding_signature

__all__ = ["InPlaceABN", "Activation", "InPlaceABNPrecisionWarning", "saved_tensor_bytes"]


class InPlaceABNPrecisionWarning(RuntimeWarning):
    """InPlaceABN's backward cannot recover x̂ from the output to full precision (a saturated
    ELU, or |γ| small relative to |β|), so some gradients are approximate."""


Activation = Literal["leaky_relu", "elu", "identity"]
_ACTIVATIONS = ("leaky_relu", "elu", "identity")


def _activate_(z: Tensor, act: str, param: float) -> Tensor:
    """act(z) in place on the fresh BN output (no second activation-sized buffer)."""
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu_(z, param)
    if act == "elu":
        return torch.nn.functional.elu_(z, param)
    return z


def _invert(y: Tensor, dy: Tensor, act: str, param: float) -> tuple[Tensor, Tensor]:
    """``(z, dz)``: the pre-activation recovered from the output, and dy·act'(z) — with
    torch's derivative at z = 0 (and at NaN): LeakyReLU's is the slope unless z > 0, ELU's is
    α + y where z ≤ 0 (a constant channel's x̂ = 0 with β = 0 sits exactly there)."""
    if act == "identity":
        return y, dy
    if act == "leaky_relu":  # y = z for z > 0, slope·z otherwise
        pos = y > 0
        return torch.where(pos, y, y / param), torch.where(pos, dy, dy * param)
    # elu: y = α(eᶻ − 1) for z ≤ 0, so z = log1p(y/α) and act'(z) = y + α. y/α is clamped at
    # −1: rounding in half precision puts a saturated output a hair below −α (NaN otherwise)
    neg = y <= 0
    z = torch.log1p((y / param).clamp(min=-1.0))
    return torch.where(neg, z, y), torch.where(neg, dy * (y + param), dy)


class _InPlaceABNFunction(torch.autograd.Function):
    """Fused BN + activation on a canonical tensor, saving only the output for backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        backend: F.Backend,
        act: str,
        param: float,
        on_saturated: Callable[..., None],
        layer: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, invstd = backend.forward_train(x, weight, bias, eps)
        y = _activate_(y, act, param)
        # only the output (which the next layer saves too) and per-channel vectors are kept
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.act, ctx.param, ctx.backend, ctx.on_saturated = act, param, backend, on_saturated
        ctx.layer = layer
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @F.first_order(
        "its backward rebuilds x̂ from the output instead of keeping x",
        "use batchnorm.BatchNorm followed by the activation for this",
    )
    def backward(ctx: Any, dy: Tensor, _dmean: Tensor, _dvar: Tensor) -> tuple[Any, ...]:
        y, weight, bias, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        cd = invstd.dtype
        z, dz = _invert(y.to(cd), dy.to(cd), ctx.act, ctx.param)
        # a saturated ELU (y = −α exactly): z = log1p(−1) = −inf is not recoverable; its true
        # dz = dy·α·eᶻ is below ε·α·|dy|, so it contributes nothing (not 0·inf = NaN)
        sat = torch.isinf(z) if ctx.act == "elu" else None
        if sat is not None:
            # short of saturation, z = log1p(y/α) keeps fewer than half of y's digits once
            # eᶻ = 1 + y/α < √ε (ε of y's dtype): the recovered x̂, and dx, are approximate
            near = (~sat) & (y.to(cd) / ctx.param + 1 < math.sqrt(torch.finfo(y.dtype).eps))
            if bool(near.any()):
                ctx.on_saturated(0, near=int(near.sum()))
        if sat is not None and not bool(sat.any()):
            sat = None
        if sat is not None:
            dz = dz.masked_fill(sat, 0.0)
        xhat = z if bias is None else z - F._b(bias.to(cd), z)
        if weight is not None:
            xhat = xhat / F._b(weight.to(cd), z)
        if sat is not None:
            xhat = _fill_saturated(xhat, sat, ctx.on_saturated)
        k = invstd if weight is None else weight.to(cd) * invstd  # γ/σ_B
        backend: F.Backend = ctx.backend
        zeros, ones = torch.zeros_like(invstd), torch.ones_like(invstd)
        dx, dw, db = backend.backward(
            dz.contiguous(), xhat.contiguous(), zeros, ones, k, (needs[0], needs[1], needs[2])
        )
        dx_out = dx.to(y.dtype) if needs[0] and dx is not None else None
        dw_out = dw.to(weight.dtype) if needs[1] and weight is not None and dw is not None else None
        db_out = db.to(bias.dtype) if needs[2] and bias is not None and db is not None else None
        return dx_out, dw_out, db_out, None, None, None, None, None, None


def _fill_saturated(xhat: Tensor, sat: Tensor, on_saturated: Callable[..., None]) -> Tensor:
    """x̂ with each saturated position set to the mean x̂ of its channel's saturated positions.

    Over a batch ``Σ x̂ = 0`` exactly, so the saturated x̂ sum to ``−Σ`` of the recovered ones:
    exact for one saturated element per channel, exact in sum (the mean) for several.
    ``on_saturated(k)`` is told the largest number of saturated elements in one channel."""
    dims = (0,) if xhat.dim() == 2 else (0, 2)
    k = sat.sum(dims)
    mean = -xhat.masked_fill(sat, 0.0).sum(dims) / k.clamp(min=1).to(xhat.dtype)
    on_saturated(int(k.max()))
    return torch.where(sat, F._b(mean, xhat), xhat)


class InPlaceABN(BatchNorm):
    r"""Batch normalization fused with an invertible activation, keeping only its output for
    backward (Rota Bulò et al. 2018).

    .. math:: y = \mathrm{act}\Big(\gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta\Big)

    with ``act`` one of LeakyReLU (slope ``activation_param``, > 0), ELU (α =
    ``activation_param``, > 0) or the identity. Outputs and gradients equal ``BatchNorm`` followed
    by the activation; the memory held for backward drops from BN's input + the activation's
    input to the output alone, which the next layer saves anyway (see
    :func:`saved_tensor_bytes`). Because backward divides by γ, every γ must be non-zero when
    a graph is recorded (without one, under ``no_grad``, γ = 0 is accepted); a
    saturated ELU (y = −α exactly) or |γ| < √ε·|β| makes some gradients approximate, with an
    :class:`InPlaceABNPrecisionWarning` (see the module docstring for the exact limits).
    ``small_batch="skip"`` gives act(β).
    Eval mode is Algorithm 2's affine map followed by the activation. Masks are not supported.

    Args: those of :class:`~batchnorm.BatchNorm` (any channel axis), plus ``activation`` and
    ``activation_param`` (default 0.01 for LeakyReLU, 1.0 for ELU).

    Shape: any ``(…, C, …)`` with C at ``axis``.

    Example::

        >>> import torch, batchnorm
        >>> layer = batchnorm.InPlaceABN(8, activation="leaky_relu", activation_param=0.01)
        >>> layer(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    activation: str
    activation_param: float

    def __init__(
        self,
        num_features: int,
        *args: Any,
        activation: Activation = "leaky_relu",
        activation_param: float | None = None,
        **kwargs: Any,
    ) -> None:
        name = f"InPlaceABN({num_features})"
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"{name}: activation must be one of {_ACTIVATIONS} (invertible, so backward can "
                f"recover the input from the output), got {activation!r}; for ReLU use "
                "leaky_relu with a small slope"
            )
        if activation_param is None:
            activation_param = 1.0 if activation == "elu" else 0.01
        if activation != "identity" and not 0 < activation_param < math.inf:
            raise ValueError(
                f"{name}: activation_param must be a finite number > 0 for {activation} (a zero "
                f"or infinite slope is not invertible), got {activation_param!r}"
            )
        super().__init__(num_features, *args, **kwargs)
        self.activation, self.activation_param = activation, float(activation_param)
        self._warned_saturated = False
        self._warned_small_gamma = False

    def _on_saturated(self, k: int, near: int = 0) -> None:
        """Called by backward when ELU outputs are saturated (``k``: the most in one channel)
        or, ``near`` of them, close to it; warns once for each if dx is approximate."""
        if near and not getattr(self, "_warned_near_saturation", False):
            self._warned_near_saturation = True
            warnings.warn(
                f"{self.layer_name()}: {near} ELU outputs are within √ε of saturation (1 + y/α "
                "< √ε of the output's dtype), where z = log1p(y/α) keeps fewer than half of "
                "y's digits: the x̂ recovered for them, and dx and dγ, are approximate (in "
                "float64, 0.7 % of dx at a pre-activation of −35). Use BatchNorm followed by "
                "nn.ELU for exact gradients.",
                InPlaceABNPrecisionWarning,
                stacklevel=2,
            )
        if k >= 2 and not getattr(self, "_warned_saturated", False):
            self._warned_saturated = True
            warnings.warn(
                f"{self.layer_name()}: {k} ELU outputs of one channel are saturated (y = −α "
                "exactly, pre-activation below about ln ε), so their pre-activations cannot be "
                "recovered in backward; their dx uses the mean x̂ of the channel's saturated "
                "elements (exact in sum, not per element). dγ, dβ and the other elements' dx "
                "are unaffected. Use BatchNorm followed by nn.ELU for exact gradients.",
                InPlaceABNPrecisionWarning,
                stacklevel=2,
            )

    def _check_small_gamma(self, dtype: torch.dtype) -> None:
        """Warn once if |γ| < √ε·|β| in some channel: x̂ = (z − β)/γ, recovered in backward,
        then loses more than half its digits to cancellation and dγ is inaccurate."""
        if getattr(self, "_warned_small_gamma", False) or self.weight is None or self.bias is None:
            return
        bound = math.sqrt(torch.finfo(dtype).eps)
        with torch.no_grad():
            small = self.weight.abs() < bound * self.bias.abs()
        if bool(small.any()):
            self._warned_small_gamma = True
            ch = torch.nonzero(small).flatten().tolist()
            warnings.warn(
                f"{self.layer_name()}: |γ| < √ε·|β| = {bound:.3g}·|β| ({dtype}) in channel(s) "
                f"{ch[:10]}; in-place activated BN recovers x̂ = (z − β)/γ in backward, which "
                f"then has an error of about ε·|β|/|γ| > √ε, so dγ and dx are inaccurate (dβ "
                "is not). Use BatchNorm followed by the activation for such channels.",
                InPlaceABNPrecisionWarning,
                stacklevel=6,  # the caller of the layer (through Module.__call__)
            )

    def activation_module(self) -> nn.Module:
        """The activation as a ``torch.nn`` module (used when folding for deployment)."""
        if self.activation == "leaky_relu":
            return nn.LeakyReLU(self.activation_param)
        if self.activation == "elu":
            return nn.ELU(self.activation_param)
        return nn.Identity()

    def _forward_train(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise BatchNormInputError(
                f"{self.layer_name()}: masks are not supported by in-place activated BN; use "
                "batchnorm.BatchNorm with forward(x, mask=...) followed by the activation"
            )
        if not self.eps >= 0:
            F._bad_eps(self.eps, self.layer_name())
        # before anything reads them, or the input is written over: C values of each
        F.check_vectors(input, self.axis % input.dim(), self._per_channel(), self.layer_name())
        if (
            F._torch_ops_only()
            or input.device.type == "meta"
            or not F._has_memory(input)  # FakeTensorMode and other tensors without values
        ):
            # graph tools (trace, compile, export, torch.func) and tensors without values: BN
            # followed by the activation in torch operations, which they can record and which
            # read no values; the memory saving is an eager-mode matter
            y, mean, var, count = F.batch_norm_train(
                input,
                self.weight,
                self.bias,
                self.eps,
                axis=self.axis,
                backend=self.backend,
                layer=self.layer_name(),
            )
            self._update_running_stats(mean, var, count)
            return self.activation_module()(y)
        # backward divides by γ; without a graph (no_grad: recalibration, probes, evaluation
        # in train mode) nothing does, and γ = 0 is an ordinary forward
        graph = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, self.weight, self.bias)
        )
        if graph and self.weight is not None and bool((self.weight == 0).any()):
            zero = torch.nonzero(self.weight == 0).flatten().tolist()
            raise BatchNormInputError(
                f"{self.layer_name()}: γ is 0 in channel(s) {zero[:10]}; in-place activated BN "
                "recovers x̂ = (z − β)/γ in backward, so γ must be non-zero. Re-initialize those "
                "channels or use BatchNorm followed by the activation."
            )
        if graph:
            self._check_small_gamma(input.dtype)
        ax = self.axis % input.dim()
        count = F._check_count(input, ax, self.layer_name())
        xc, restore = F.canonical_layout(input, ax)
        backend = F.get_backend(xc, self.backend, layer=self.layer_name())
        y, mean, var = _InPlaceABNFunction.apply(
            xc,
            self.weight,
            self.bias,
            self.eps,
            backend,
            self.activation,
            self.activation_param,
            self._on_saturated,
            self.layer_name(),
        )
        self._update_running_stats(mean, var, count)
        return restore(y)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:  # in eval mode as in training (eval would ignore it silently)
            raise BatchNormInputError(
                f"{self.layer_name()}: masks are not supported by in-place activated BN; use "
                "batchnorm.BatchNorm with forward(x, mask=...) followed by the activation"
            )
        return super().forward(input)

    def _forward_eval(self, input: Tensor) -> Tensor:
        return self.activation_module()(super()._forward_eval(input))

    def _forward_single(self, input: Tensor, mask: Tensor | None) -> Tensor:
        """One value per channel (``small_batch``): ``"running"`` goes through
        :meth:`_forward_eval`, which applies the activation; ``"skip"`` gives act(β)."""
        if self.small_batch == "running" and self.running_mean is not None:
            return super()._forward_single(input, mask)  # → self._forward_eval: activated
        return self.activation_module()(super()._forward_single(input, mask))

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", activation={self.activation!r}, activation_param={self.activation_param}"
        )


InPlaceABN.__init__.__signature__ = forwarding_signature(  # type: ignore[attr-defined]
    InPlaceABN.__init__, BatchNorm.__init__
)


def saved_tensor_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes held for backward while ``fn()`` builds its graph: the distinct storages packed
    by autograd (``torch.autograd.graph.saved_tensors_hooks``), each counted once however many
    operations save it (parameters included).

    Example::

        >>> import torch, batchnorm
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> batchnorm.inplace_abn.saved_tensor_bytes(lambda: (x * x).sum()) == x.numel() * 4
        True
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())
