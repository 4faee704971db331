"""A Keras 3 batch-normalization layer that runs on this package's functional core.

:class:`BatchNormalization` takes ``keras.layers.BatchNormalization``'s arguments and behaves like
it (``training`` argument, ``trainable=False`` meaning inference mode, moving statistics, masks,
``get_config``/``from_config``, ``.keras`` files). It *is* a ``keras.layers.BatchNormalization``
(a subclass): it inherits the weights (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``,
same names, order and initializers), so Keras' weights, checkpoints and tooling work unchanged and
``set_weights(keras_bn.get_weights())`` moves state both ways. It overrides ``call`` (the forward
pass), ``__init__`` (argument checks and two arguments of its own), ``build`` (clearer errors for
an axis out of range or a channel axis of unknown size), Keras' input check (its error for a wrong
rank or channel count gets a remedy) and ``get_config`` (the two extra arguments).

Backends: with ``KERAS_BACKEND=torch`` the forward pass runs on
:func:`batchnorm.functional.batch_norm_train` / :func:`~batchnorm.functional.batch_norm_eval`
(fused kernels, exact backward) and the moving statistics go through
:func:`~batchnorm.functional.update_running_stats` (a non-finite batch never reaches them). With
any other Keras backend (JAX, TensorFlow) our core cannot run — it is torch code — and the layer
runs Keras' own ``keras.ops`` implementation (the inherited ``call``), with a warning at
construction; models and ``.keras`` files therefore stay portable across backends. Batch
renormalization (``renorm=True``, where the installed Keras has it) also runs Keras' own code.

Importing this module imports keras (``import batchnorm`` does not). The library never sets
``KERAS_BACKEND``: set it before keras is first imported.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Any

import keras
import numpy as np
import torch

from batchnorm import functional as F
from batchnorm.functional import NonFinitePolicy

__all__ = ["BatchNormalization", "uses_batchnorm_core"]

_WARNED_BACKEND = False

# older Keras 3 releases have no batch renormalization (renorm, renorm_clipping, ...)
_KERAS_HAS_RENORM = "renorm" in inspect.signature(keras.layers.BatchNormalization).parameters


def _keras_backend() -> str:
    """The running Keras backend's name (one place, so tests can stand in another one)."""
    return str(keras.backend.backend())


def uses_batchnorm_core() -> bool:
    """True when :class:`BatchNormalization` runs on :mod:`batchnorm.functional` (Keras' torch
    backend); False when it falls back to Keras' own ``keras.ops`` implementation."""
    return _keras_backend() == "torch"


@keras.saving.register_keras_serializable(package="batchnorm", name="BatchNormalization")
class BatchNormalization(keras.layers.BatchNormalization):  # type: ignore[misc]
    r"""Batch normalization as ``keras.layers.BatchNormalization``, computed by ``batchnorm``.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    In training (``fit``, or ``training=True``) μ_B and the biased σ²_B are the batch's per-channel
    statistics over every axis but ``axis`` (Ioffe & Szegedy 2015, arXiv 1502.03167, Algorithm 1),
    and the moving statistics follow Keras' convention::

        moving_mean     = moving_mean     · momentum + μ_B  · (1 − momentum)
        moving_variance = moving_variance · momentum + σ²_B · (1 − momentum)

    (Keras' ``momentum`` weighs the old average: PyTorch's momentum is ``1 − momentum``; the stored
    variance is the biased one). In inference (``predict``/``evaluate``, ``training=False`` or
    ``None``, or a layer with ``trainable=False``) the moving statistics replace μ_B and σ²_B
    (Algorithm 2).

    Args:
        axis: the channel axis (``-1`` for ``channels_last``, ``1`` after a ``channels_first``
            ``Conv2D``).
        momentum: weight of the old moving average (Keras' convention), usually in [0, 1]
            (0.9-0.999). A finite value outside [0, 1] is accepted, as Keras does, with a
            warning: the moving statistics then extrapolate instead of averaging.
        epsilon: ε ≥ 0 added to the variance (Keras' default 1e-3; PyTorch's is 1e-5). ε = 0 is
            accepted as in Keras; a constant channel then normalizes to NaN.
        center, scale: learn β / γ.
        beta_initializer, gamma_initializer, moving_mean_initializer,
            moving_variance_initializer: Keras initializers.
        beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint: as in Keras.
        renorm, renorm_clipping, renorm_momentum: Keras' batch renormalization (where the
            installed Keras has it); ``renorm=True`` runs Keras' own implementation.
        synchronized: as in Keras (``True`` is only accepted on the TensorFlow backend).
        compute_backend: the core's compute backend: ``None``/``"auto"``, ``"torch"`` or
            ``"numba"`` (see :mod:`batchnorm.functional`). Keyword-only.
        nonfinite: ``"warn"`` (default) skips the moving update of a batch whose statistics are
            NaN/inf with a warning; ``"raise"`` raises
            :class:`~batchnorm.functional.NonFiniteStatisticsError`. (Keras' own layer would
            write the NaN into the moving statistics.) Keyword-only.
        **kwargs: Keras layer arguments (``name``, ``dtype``, ``trainable``, …) and any further
            arguments of the installed ``keras.layers.BatchNormalization``.

    The positional arguments are Keras' own, in Keras' order.

    Call arguments: ``inputs`` of any rank with C channels along ``axis``; ``training``;
    ``mask`` with one dimension less than ``inputs`` (no channel axis), ``True`` where values
    count towards the batch statistics (a mask from ``Masking``/``Embedding(mask_zero=True)``).

    Shape: the output has the input's shape; its dtype is the layer's compute dtype (statistics
    are computed in float32 for float16/bfloat16 inputs, as Keras does).

    Example::

        >>> import os; os.environ.setdefault("KERAS_BACKEND", "torch")  # before importing keras
        'torch'
        >>> import keras
        >>> from batchnorm.keras import BatchNormalization
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                           BatchNormalization(), keras.layers.Activation("relu")])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> model.predict(keras.ops.ones((2, 4)), verbose=0).shape
        (2, 8)
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        *,
        compute_backend: str | None = None,
        nonfinite: NonFinitePolicy = "warn",
        **kwargs: Any,
    ) -> None:
        name = f"BatchNormalization({kwargs.get('name') or 'unnamed'})"
        for arg, value in (
            ("momentum", momentum),
            ("renorm_momentum", renorm_momentum),
            ("epsilon", epsilon),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"{name}: {arg} must be a number, got {value!r}"
                    + (
                        " (PyTorch's momentum=None, a cumulative average, has no Keras "
                        "counterpart; Keras' momentum weighs the old average, typically 0.9-0.999)"
                        if value is None and arg == "momentum"
                        else ""
                    )
                )
        for arg, value in (("momentum", momentum), ("renorm_momentum", renorm_momentum)):
            if not math.isfinite(float(value)):
                raise ValueError(
                    f"{name}: {arg} must be a finite number (Keras' convention: the weight of "
                    f"the old moving average, typically 0.9-0.999), got {value!r}"
                )
            if not 0.0 <= float(value) <= 1.0:
                warnings.warn(
                    f"{name}: {arg}={value!r} is outside [0, 1]: the moving statistics "
                    "extrapolate (moving·momentum + batch·(1 − momentum)) instead of averaging. "
                    "Keras' momentum weighs the old average, typically 0.9-0.999.",
                    UserWarning,
                    stacklevel=2,
                )
        if not float(epsilon) >= 0.0:
            raise ValueError(
                f"{name}: epsilon must be >= 0 (Keras' default is 1e-3), got {epsilon!r}"
            )
        if nonfinite not in ("warn", "raise"):
            raise ValueError(f"{name}: nonfinite must be 'warn' or 'raise', got {nonfinite!r}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(
                f"{name}: axis must be one integer, the channel axis (-1 for channels_last, 1 "
                f"for channels_first), got {axis!r}"
            )
        if compute_backend not in (None, "auto", "torch", "numba"):
            raise ValueError(
                f"{name}: compute_backend must be None, 'auto', 'torch' or 'numba', got "
                f"{compute_backend!r}"
            )
        if synchronized and _keras_backend() != "tensorflow":
            raise ValueError(
                f"{name}: synchronized=True is supported by Keras on the TensorFlow backend "
                f"only, and this is {_keras_backend()!r}. For statistics synchronized across "
                "processes in a torch model, use batchnorm.SyncBatchNorm (or "
                "batchnorm.convert_sync_batchnorm(model))."
            )
        if _KERAS_HAS_RENORM:
            kwargs.update(
                renorm=renorm, renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum
            )
        elif renorm:
            raise ValueError(
                f"{name}: renorm=True needs a Keras whose BatchNormalization has batch "
                f"renormalization; Keras {keras.__version__} has none. Upgrade Keras."
            )
        super().__init__(
            axis=int(axis),
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            synchronized=synchronized,
            **kwargs,
        )
        self.compute_backend: str | None = compute_backend
        self.nonfinite: NonFinitePolicy = nonfinite
        self._use_core: bool = uses_batchnorm_core()
        if not self._use_core:
            global _WARNED_BACKEND
            if not _WARNED_BACKEND:
                _WARNED_BACKEND = True
                warnings.warn(
                    f"batchnorm.keras.BatchNormalization: the Keras backend is "
                    f"{_keras_backend()!r}; batchnorm's core runs on torch only, so this layer "
                    "runs Keras' own keras.ops implementation. Set KERAS_BACKEND=torch before "
                    "importing keras to use batchnorm's kernels.",
                    UserWarning,
                    stacklevel=2,
                )

    # -- helpers -------------------------------------------------------------------------------

    def layer_name(self) -> str:
        """How error messages name this layer."""
        c = self.gamma.shape[0] if self.gamma is not None else None
        if c is None and self.moving_mean is not None:
            c = self.moving_mean.shape[0]
        return f"BatchNormalization({self.name!r}, {c} channels, axis={self.axis})"

    def _update_moving(self, mean: Any, var: Any, count: int) -> None:
        """Blend the batch statistics into the moving ones through Keras' ``assign`` (so Keras'
        stateless scopes and trackers see the update); the rule itself is the core's."""
        # blended in the statistics' dtype (float32 for float16/bfloat16 variables) and rounded
        # once into the variables' dtype, as Keras does (the core's rule for half buffers); a
        # value beyond the variables' range refuses the batch
        rm = self.moving_mean.value.detach().clone()
        rv = self.moving_variance.value.detach().clone()
        updated = F.update_running_stats(
            rm,
            rv,
            mean.detach(),
            var.detach(),
            count,
            1.0 - self.momentum,  # Keras' momentum weighs the old average; ours the new batch
            unbiased=False,  # Keras stores the biased batch variance
            nonfinite=self.nonfinite,
            layer=self.layer_name(),
        )
        if updated:
            self.moving_mean.assign(rm)
            self.moving_variance.assign(rv)

    def build(self, input_shape: Any) -> None:
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"BatchNormalization({self.name!r}): axis={self.axis} is out of range for inputs "
                f"of rank {rank} (shape {tuple(input_shape)}). Use the channel axis: -1 for "
                "channels_last, 1 for channels_first."
            )
        if input_shape[self.axis] is None:
            raise ValueError(
                f"BatchNormalization({self.name!r}): the channel axis (axis={self.axis}) of the "
                f"input shape {tuple(input_shape)} has unknown size; the layer keeps one gamma, "
                "beta, moving mean and variance per channel, so it needs the channel count. Give "
                "that dimension a size in keras.Input(...), or set axis to the channel axis."
            )
        super().build(input_shape)

    def _assert_input_compatibility(self, arg_0: Any) -> None:
        # Keras checks a built layer's input against the rank and channel count it was built
        # for; its message names the layer and the shape, this adds what to do about it
        try:
            super()._assert_input_compatibility(arg_0)
        except ValueError as e:
            raise ValueError(
                f"{self.layer_name()}: {str(e).rstrip('.')}. The layer's per-channel weights fit only the rank "
                "and channel count it was built for: check the axis (1 for channels_first "
                "inputs, -1 for channels_last), or give this input its own BatchNormalization "
                "layer."
            ) from e

    # -- forward -------------------------------------------------------------------------------

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if not self._use_core:
            return super().call(inputs, training=training, mask=mask)
        if getattr(self, "renorm", False):
            return self._renorm_call(inputs, training, mask)
        x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
        if mask is not None:
            mask = torch.as_tensor(mask, device=x.device)
        if mask is not None and mask.dim() != x.dim() - 1:
            raise ValueError(
                f"{self.layer_name()}: the mask should have one dimension less than the inputs "
                f"(no channel axis); got mask.shape={tuple(mask.shape)} for inputs.shape="
                f"{tuple(x.shape)}."
            )
        # as Keras: statistics in float32 for half inputs, float64 stays float64
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(cd)
        if x.numel() == 0:  # an empty batch: an empty output, the moving statistics untouched
            return keras.ops.cast(x, self.compute_dtype)
        axis = self.axis % x.dim()
        if mask is not None:
            fits = tuple(n for d, n in enumerate(x.shape) if d != axis)
            if any(m not in (n, 1) for m, n in zip(mask.shape, fits)):
                raise ValueError(
                    f"{self.layer_name()}: a mask of shape {tuple(mask.shape)} does not fit "
                    f"inputs of shape {tuple(x.shape)}: it should have the inputs' shape without "
                    f"the channel axis, {fits}."
                )
        gamma = self.gamma.value.to(cd) if self.scale else None
        beta = self.beta.value.to(cd) if self.center else None
        kw: dict[str, Any] = {
            "axis": axis,
            "backend": self.compute_backend,
            "layer": self.layer_name(),
        }
        if training and self.trainable:
            count = x.numel() // max(x.shape[axis], 1)
            if mask is None and count >= 2:
                y, mean, var, count = F.batch_norm_train(x, gamma, beta, self.epsilon, **kw)
            else:
                # a mask, or a single value per channel (Keras allows it: σ²_B = 0): statistics
                # from torch ops, differentiable, normalized by the same core function
                mean, var, count = _moments(x, mask, axis)
                # centered first: a single value per channel gives β exactly (x·s − μ·s does
                # not cancel in rounding)
                shape = [1] * x.dim()
                shape[axis] = -1
                xc = x - mean.view(shape)
                zero = torch.zeros_like(mean)
                y = F.batch_norm_eval(xc, zero, var, gamma, beta, self.epsilon, **kw)
            if count > 0:
                self._update_moving(mean, var, count)
        else:
            y = F.batch_norm_eval(
                x,
                self.moving_mean.value.to(cd),
                self.moving_variance.value.to(cd),
                gamma,
                beta,
                self.epsilon,
                **kw,
            )
        return keras.ops.cast(y, self.compute_dtype)

    def _renorm_call(self, inputs: Any, training: bool | None, mask: Any) -> Any:
        """Keras' batch renormalization, with this layer's ``nonfinite`` policy: a training
        batch that leaves a moving statistic NaN/inf where it was finite is undone (every
        moving variable put back) and warned about, or raised on."""
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        state = self.non_trainable_variables  # moving mean, variance, stddev, renorm's two
        before = [v.value.detach().clone() for v in state]
        y = super().call(inputs, training=training, mask=mask)
        broke = any(
            bool((~torch.isfinite(v.value) & torch.isfinite(b)).any())
            for v, b in zip(state, before)
        )
        if broke:
            for v, b in zip(state, before):
                v.assign(b)
            F._refuse_nonfinite(self.nonfinite, self.layer_name())
        return y

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"compute_backend": self.compute_backend, "nonfinite": self.nonfinite})
        return config


def _moments(x: Any, mask: Any, axis: int) -> tuple[Any, Any, int]:
    """Per-channel mean and biased variance over the values where ``mask`` is True (all values
    without a mask), and their count; an all-False mask gives mean 0, variance 0 (as Keras)."""
    dims = tuple(d for d in range(x.dim()) if d != axis)
    if not dims:
        # rank 1: one value per channel (and torch reduces over every dim when given none)
        valid = torch.ones((), dtype=torch.bool) if mask is None else mask.to(torch.bool)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(valid, x, zero), torch.zeros_like(x), int(valid.item())
    if mask is None:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, x.numel() // max(x.shape[axis], 1)
    m = mask.to(torch.bool).unsqueeze(axis).expand_as(x)
    n = m.sum(dims).to(x.dtype)  # the same for every channel
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mean = torch.where(m, x, zero).sum(dims) / n.clamp_min(1)
    shape = [1] * x.dim()
    shape[axis] = -1
    d = torch.where(m, x - mean.view(shape), zero)
    var = d.square().sum(dims) / n.clamp_min(1)
    return mean, var, int(n[0].item()) if n.numel() else 0
