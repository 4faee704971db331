"""Batch-norm variants that differ from plain BN in one place each.

* :class:`BatchRenorm` (Ioffe 2017) — the batch statistics are corrected towards the running
  ones by the constants r and d, so training and inference agree for small or non-i.i.d. batches;
* :class:`GhostBatchNorm` (Hoffer et al. 2017; Keras' ``virtual_batch_size``) — statistics per
  virtual batch inside the mini-batch;
* :class:`FrozenBatchNorm` — Algorithm 2's fixed affine map as a module (torchvision's
  ``FrozenBatchNorm2d``), and :func:`freeze` / :func:`unfreeze`, which keep a model's BN layers in
  inference behaviour even when ``model.train()`` is called (fine-tuning with small batches).

Each variant overrides only ``_forward_train`` of :class:`~batchnorm.nn.batchnorm._BatchNormBase`;
the math is :mod:`batchnorm.functional`'s.
"""

from __future__ import annotations

import itertools
import warnings
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from batchnorm import functional as F
from batchnorm.functional import BatchNormInputError
from batchnorm.nn.batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNormBase,
    forwarding_signature,
    fx_leaf,
    positive_int,
)

__all__ = [
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenStatisticsWarning",
    "freeze",
    "unfreeze",
    "is_frozen",
]


def _per_channel(v: Tensor, x: Tensor, axis: int) -> Tensor:
    """A per-channel vector shaped to broadcast against ``x`` along ``axis``."""
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.view(shape)


# --------------------------------------------------------------------------------------------
# Batch Renormalization


def _limits_dtype(t: Tensor) -> torch.dtype:
    """float64 for the warm-up arithmetic (the Python floats' precision) where the device has it."""
    return torch.float32 if t.device.type == "mps" else torch.float64


class _Renorm(_BatchNormBase):
    r"""Batch Renormalization's training step (Ioffe 2017, arXiv 1702.03275).

    .. math::
        r = \mathrm{clip}_{[1/r_{max},\,r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \mathrm{clip}_{[-d_{max},\,d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
        y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

    with σ_B = √(σ²_B + ε) and σ = √(running_var + ε); r and d are constants for the gradient
    (``stop_gradient`` in the paper), computed from the running statistics *before* this batch
    updates them. In eval mode the layer is plain BN with the running statistics. The running
    statistics are the usual moving averages of μ_B and the unbiased σ²_B (this package's
    momentum convention), one update per batch.

    Warm-up (the paper's schedule, Sec. 4): r_max = 1 and d_max = 0 (plain BN) for the first
    ``warmup_steps`` updates, then relaxed linearly to reach ``r_max`` at update ``r_max_step``
    and ``d_max`` at ``d_max_step`` (paper: 5000, 40k, 25k). Steps are counted by
    ``num_batches_tracked``; ``warmup_steps=r_max_step=d_max_step=0`` uses the limits from the start.
    """

    r_max: float
    d_max: float
    warmup_steps: int
    r_max_step: int
    d_max_step: int

    def __init__(
        self,
        num_features: int,
        *args: Any,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_step: int = 40000,
        d_max_step: int = 25000,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        for arg, value, kind, example in (
            ("r_max", r_max, Real, "3.0"),
            ("d_max", d_max, Real, "5.0"),
            ("warmup_steps", warmup_steps, Integral, "5000"),
            ("r_max_step", r_max_step, Integral, "40000"),
            ("d_max_step", d_max_step, Integral, "25000"),
        ):
            if not isinstance(value, kind) or isinstance(value, bool):
                want = "a number" if kind is Real else "an int"
                raise ValueError(
                    f"{name}({num_features}): {arg} must be {want}, got {value!r} of type "
                    f"{type(value).__name__}; pass e.g. {arg}={example} (the paper's value)"
                )
        if not r_max >= 1.0:
            raise ValueError(
                f"{name}({num_features}): r_max must be a number >= 1 (1 disables the scale "
                f"correction), got {r_max!r}"
            )
        if not d_max >= 0.0:
            raise ValueError(
                f"{name}({num_features}): d_max must be a number >= 0 (0 disables the shift "
                f"correction), got {d_max!r}"
            )
        if not 0 <= warmup_steps <= min(r_max_step, d_max_step):
            raise ValueError(
                f"{name}({num_features}): need 0 <= warmup_steps <= r_max_step and d_max_step, "
                f"got warmup_steps={warmup_steps}, r_max_step={r_max_step}, d_max_step="
                f"{d_max_step}; set all three to 0 to use r_max and d_max from the start"
            )
        super().__init__(num_features, *args, **kwargs)
        if not self.track_running_stats:  # (also when given positionally)
            raise ValueError(
                f"{name}({num_features}): batch renormalization corrects the batch statistics "
                "towards the running ones, so it needs track_running_stats=True"
            )
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_step, self.d_max_step = (
            int(warmup_steps),
            int(r_max_step),
            int(d_max_step),
        )
        # r and d of the last training step, for monitoring how far the correction reaches
        self.last_r: Tensor | None = None
        self.last_d: Tensor | None = None

    def renorm_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` for the next training step, from the warm-up schedule."""
        assert self.num_batches_tracked is not None
        return self._schedule(int(self.num_batches_tracked))

    def _schedule(self, t: Any) -> tuple[Any, Any]:
        """``(r_max, d_max)`` after ``t`` updates: Python floats for an int ``t``, tensors for a
        floating tensor ``t`` (traced or compiled modules then follow the counter)."""
        w = self.warmup_steps

        def ramp(end: int) -> Any:
            # 0 before update w, then linear up to 1 at update `end` (a step at w if end == w)
            v = t - w + 1 if end <= w else (t - w) / (end - w)
            return v.clamp(0.0, 1.0) if isinstance(v, Tensor) else min(1.0, max(0.0, v))

        def toward(start: float, limit: float, r: Any) -> Any:
            # start + (limit − start)·r, exactly start at r = 0 also for an infinite limit
            # (no clipping once warmed up), where the product would be inf·0 = NaN
            if isinstance(r, Tensor):
                return torch.where(r > 0, start + (limit - start) * r, torch.full_like(r, start))
            return start + (limit - start) * r if r > 0 else start

        return (
            toward(1.0, self.r_max, ramp(self.r_max_step)),
            toward(0.0, self.d_max, ramp(self.d_max_step)),
        )

    def _clip_bounds(self, var: Tensor) -> tuple[Any, Any, Any]:
        """``(1/r_max, r_max, d_max)`` for this step: Python floats in eager mode; under
        ``torch.jit.trace`` or ``torch.compile``, tensors computed from ``num_batches_tracked``
        in the graph, so the traced or compiled module follows the warm-up schedule."""
        nbt = self.num_batches_tracked
        assert nbt is not None
        # as tensors also where the counter has no value to read (meta, fake), or Python
        # cannot read it: a real layer's counter under FakeTensorMode, whose batch is fake
        if not F._tracing() and F._concrete(nbt) and F._concrete(var):
            r_max, d_max = self.renorm_limits()
            return 1.0 / r_max, r_max, d_max
        r_max_t, d_max_t = self._schedule(nbt.to(_limits_dtype(nbt)))
        return (1.0 / r_max_t).to(var.dtype), r_max_t.to(var.dtype), d_max_t.to(var.dtype)

    def _corrections(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, d)`` for batch statistics ``mean`` and biased ``var``: r = clip(σ_B/σ,
        1/r_max, r_max), d = clip((μ_B − μ)/σ, ±d_max) with σ = √(running_var + ε), constants
        for the gradient (the paper's stop_gradient); kept as ``last_r``/``last_d``."""
        assert self.running_mean is not None and self.running_var is not None
        with torch.no_grad():
            r_lo, r_hi, d_hi = self._clip_bounds(var)
            sigma = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
            r = torch.clamp(torch.sqrt(var + self.eps) / sigma, min=r_lo, max=r_hi)
            d = torch.clamp((mean - self.running_mean.to(mean.dtype)) / sigma, min=-d_hi, max=d_hi)
        # detached as well: torch.jit.trace does not record no_grad, and its replayed graph
        # would differentiate through r and d
        r, d = r.detach(), d.detach()
        self.last_r, self.last_d = r, d
        return r, d

    def _forward_train(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.running_mean is None or self.running_var is None:
            raise BatchNormInputError(
                f"{self.layer_name()}: running_mean / running_var were set to None (by "
                "torch.func.replace_all_batch_norm_modules_, say), but batch renormalization "
                "corrects the batch statistics towards the running ones. Keep the running "
                "buffers, or use batchnorm.BatchNorm* (track_running_stats=False) here."
            )
        F.check_vectors(input, self.axis % input.dim(), self._per_channel(), self.layer_name())
        # x̂ = (x − μ_B)/σ_B through the exact BN backward; γ, β applied below with r and d. Half
        # inputs are normalized in float32 and the output rounded once, as BN computes them: in
        # the half dtype dγ and dβ would be sums rounded to it
        xhat, mean, var, count = F.batch_norm_train(
            input.to(F._compute_dtype(input.dtype)),
            None,
            None,
            self.eps,
            axis=self.axis,
            backend=self.backend,
            layer=self.layer_name(),
            mask=mask,
        )
        r, d = self._corrections(mean, var)
        # (a weight of any shape holding C values, a (C, 1) one say, as torch.nn takes it)
        weight = None if self.weight is None else self.weight.reshape(-1)
        scale: Tensor = r if weight is None else weight.to(r.dtype) * r
        shift: Tensor = d if weight is None else weight.to(d.dtype) * d
        if self.bias is not None:
            shift = shift + self.bias.reshape(-1).to(shift.dtype)
        y = xhat * _per_channel(scale, xhat, self.axis).to(xhat.dtype) + _per_channel(
            shift, xhat, self.axis
        ).to(xhat.dtype)
        self._update_running_stats(mean, var, count)
        return y.to(input.dtype)

    def _forward_single(self, input: Tensor, mask: Tensor | None) -> Tensor:
        """One value per channel with ``small_batch="skip"``: Algorithm 1 of batch renorm at
        m = 1 (μ_B = x, σ²_B = 0, so x̂ = 0 and y = γ·d + β with d = clip((μ_B − μ)/σ, ±d_max),
        r multiplying x̂ = 0); plain BN's y = β would drop the correction renorm exists for.
        ``"running"`` normalizes with the running statistics, as inference does; either way
        the running statistics are left unchanged."""
        if self.small_batch != "skip" or self.running_mean is None or self.running_var is None:
            return super()._forward_single(input, mask)
        ax = self.axis % input.dim()
        dims = [i for i in range(input.dim()) if i != ax]
        x = input.detach()
        if mask is None:
            mean = x.mean(dims)
        else:  # the one valid value of each channel (the mask has a size-1 channel axis)
            # (where, not a product: padding may hold anything, inf and NaN included)
            mean = torch.where(mask, x, 0).sum(dims) / mask.to(x.dtype).sum(dims)
        _, d = self._corrections(mean, torch.zeros_like(mean))
        # x·0 keeps y connected to x (dx = 0 at m = 1); dγ = Σ dy·d, dβ = Σ dy
        shift: Tensor = d if self.weight is None else self.weight.reshape(-1).to(d.dtype) * d
        if self.bias is not None:
            shift = shift + self.bias.reshape(-1).to(shift.dtype)
        return input * 0 + _per_channel(shift, input, ax).to(input.dtype)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps="
            f"{self.warmup_steps}, r_max_step={self.r_max_step}, d_max_step={self.d_max_step}"
        )


_Renorm.__init__.__signature__ = forwarding_signature(  # type: ignore[attr-defined]
    _Renorm.__init__, _BatchNormBase.__init__
)


class BatchRenorm(_Renorm, BatchNorm):
    """Batch Renormalization over any channel axis (see :class:`_Renorm` for the formula).

    Args: those of :class:`~batchnorm.BatchNorm`, plus ``r_max`` (≥ 1), ``d_max`` (≥ 0) and the
    warm-up schedule ``warmup_steps``, ``r_max_step``, ``d_max_step`` (counted in updates).

    Shape: any ``(…, C, …)`` with C at ``axis``.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchRenorm(8, r_max=3.0, d_max=5.0, warmup_steps=0, r_max_step=0,
        ...                            d_max_step=0)
        >>> bn(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    __doc__ = (_Renorm.__doc__ or "") + (__doc__ or "")


class BatchRenorm1d(_Renorm, BatchNorm1d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Batch Renormalization for ``(N, C)`` or ``(N, C, L)`` input; see :class:`BatchRenorm`."""


class BatchRenorm2d(_Renorm, BatchNorm2d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Batch Renormalization for ``(N, C, H, W)`` input; see :class:`BatchRenorm`."""


class BatchRenorm3d(_Renorm, BatchNorm3d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Batch Renormalization for ``(N, C, D, H, W)`` input; see :class:`BatchRenorm`."""


# --------------------------------------------------------------------------------------------
# Ghost batch normalization


def ghost_chunks(n: int, virtual_batch_size: int, values_per_sample: int) -> list[int]:
    """Sizes of the virtual batches a mini-batch of ``n`` samples is split into: as many full
    ``virtual_batch_size`` chunks as fit, then the remainder — merged into the previous chunk when
    it would have fewer than 2 values per channel (``values_per_sample`` per sample)."""
    sizes = [virtual_batch_size] * (n // virtual_batch_size)
    rest = n - sum(sizes)
    if rest:
        if rest * values_per_sample < 2 and sizes:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return sizes


def _values_per_sample(input: Tensor, axis: int) -> int:
    """Values per channel that each sample (dimension 0) of ``input`` holds."""
    return input.numel() // max(input.shape[0] * input.shape[axis], 1)


def _valid_per_sample(input: Tensor, mask: Tensor, axis: int) -> list[int]:
    """How many valid values per channel each sample (dimension 0) of ``input`` has; ``mask``
    as :func:`~batchnorm.functional.check_mask` returns it, expanded along dimension 0."""
    shape = list(input.shape)
    shape[axis % input.dim()] = 1
    return [int(c) for c in mask.expand(shape).reshape(input.shape[0], -1).sum(1).tolist()]


def _merge_sparse_chunks(sizes: list[int], valid: list[int]) -> list[int]:
    """The virtual batch ``sizes`` with every chunk of fewer than 2 valid values per channel
    (``valid``: per sample) joined with the chunks after it until it has 2; a remainder that
    never reaches 2 joins the last chunk that did (or is the whole batch if none did)."""
    merged: list[int] = []
    size = count = start = 0
    for chunk in sizes:
        count += sum(valid[start : start + chunk])
        start += chunk
        size += chunk
        if count >= 2:
            merged.append(size)
            size = count = 0
    if size:
        if merged:
            merged[-1] += size
        else:
            merged.append(size)
    return merged


class _Ghost(_BatchNormBase):
    r"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize
    better"; Keras' ``virtual_batch_size``).

    In training, the mini-batch is split along dimension 0 into virtual batches of
    ``virtual_batch_size`` samples; each is normalized with its own statistics
    (y = γ (x − μ_v)/√(σ²_v + ε) + β). An uneven last chunk keeps the remainder (merged into the
    previous chunk if it would have fewer than 2 values per channel; see :func:`ghost_chunks`).
    With a ``mask``, a virtual batch left with fewer than 2 valid values per channel (short
    sequences sorted into one bucket, say) is joined with the virtual batches after it until
    it has 2, and a last one that never gets there joins the previous one; if the whole batch
    has fewer than 2 valid values, the usual error of a batch too small for batch statistics
    is raised.

    Running statistics rule: one update per virtual batch, in order, each with the layer's
    momentum — exactly what a plain BN layer fed the chunks one after another would store;
    ``num_batches_tracked`` counts virtual batches. Eval mode is plain BN: with running
    statistics it normalizes with them; without (``track_running_stats=False``) it normalizes
    with the statistics of the whole batch, not per virtual batch, as ``torch.nn`` does.

    Each virtual batch goes through the parent class's training step, so ghost batches combine
    with batch renormalization by inheritance:
    ``class GhostRenorm2d(_Ghost, _Renorm, BatchNorm2d)`` renormalizes every virtual batch
    (its warm-up then counts virtual batches).
    """

    virtual_batch_size: int

    def __init__(self, num_features: int, *args: Any, virtual_batch_size: int, **kwargs: Any):
        vbs = positive_int(virtual_batch_size)
        if vbs is None:
            raise ValueError(
                f"{type(self).__name__}({num_features}): virtual_batch_size must be a positive "
                f"int, got {virtual_batch_size!r}"
            )
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch_size = vbs

    def _forward_train(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        parent_step = super()._forward_train  # bound here: a comprehension has no super()
        if not self.training:
            # eval mode without running statistics: the whole batch's statistics, as torch.nn
            # uses for track_running_stats=False
            return parent_step(input, mask=mask)
        if self.axis % input.dim() == 0:
            raise BatchNormInputError(
                f"{self.layer_name()}: ghost batches split dimension 0, which is the channel "
                f"axis of input with shape {tuple(input.shape)}; put the batch first"
            )
        # the whole batch's shape in the message, not a virtual batch's
        F.check_vectors(input, self.axis % input.dim(), self._per_channel(), self.layer_name())
        n = input.shape[0]
        per_sample = _values_per_sample(input, self.axis)
        if n >= 2 and self.virtual_batch_size * per_sample < 2:
            raise BatchNormInputError(
                f"{self.layer_name()}: virtual batches of {self.virtual_batch_size} sample(s) "
                f"of input with shape {tuple(input.shape)} give {self.virtual_batch_size * per_sample} "
                "value per channel; batch statistics need at least 2. Use "
                "virtual_batch_size=2 or more."
            )
        sizes, mask_b, _ = self._virtual_batches(input, mask)
        if F._tracing():
            warnings.warn(
                f"{self.layer_name()}: the virtual batches are split in Python, so this trace "
                f"holds the batch size {input.shape[0]} (sizes {sizes}); another batch size "
                "fails in the traced module. Trace with the batch size you will train with, or "
                "run the layer eagerly or compiled (torch.compile)",
                torch.jit.TracerWarning,
                stacklevel=2,
            )
        masks: list[Tensor | None]
        if mask_b is None:
            masks = [None] * len(sizes)
        else:
            masks = list(torch.split(mask_b, sizes))
        # each virtual batch is one training step of the parent class (plain BN, or batch
        # renorm in a class combining both), so the running statistics are updated in order,
        # once per virtual batch
        outs = [parent_step(c, mask=m) for c, m in zip(torch.split(input, sizes), masks)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def _virtual_batches(
        self, input: Tensor, mask: Tensor | None
    ) -> tuple[list[int], Tensor | None, list[int] | None]:
        """The sizes (samples) of the virtual batches ``input`` is split into, ``mask``
        expanded along dimension 0 and its valid values per sample (None, None without one)."""
        n = input.shape[0]
        sizes = ghost_chunks(n, self.virtual_batch_size, _values_per_sample(input, self.axis))
        if mask is None:
            return sizes, None, None
        mask_b = mask.expand(n, *mask.shape[1:]) if mask.shape[0] == 1 else mask
        valid = _valid_per_sample(input, mask_b, self.axis)
        return _merge_sparse_chunks(sizes, valid), mask_b, valid

    def _statistics_count(self, input: Tensor, mask: Tensor | None, count: int) -> int:
        """Values per channel of the smallest virtual batch: what the small-batch warning
        judges (a batch of 64 split into virtual batches of 2 samples is a batch of 2 to BN)."""
        if not self.training or self.axis % input.dim() == 0 or input.shape[0] < 2:
            return count
        per_sample = _values_per_sample(input, self.axis)
        if self.virtual_batch_size * per_sample < 2:
            return count  # refused by the training step, with its own message
        sizes, _, valid = self._virtual_batches(input, mask)
        if valid is None:
            return min(sizes) * per_sample
        bounds = [0, *itertools.accumulate(sizes)]
        return min(sum(valid[a:b]) for a, b in zip(bounds, bounds[1:]))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


_Ghost.__init__.__signature__ = forwarding_signature(  # type: ignore[attr-defined]
    _Ghost.__init__, _BatchNormBase.__init__
)


class GhostBatchNorm(_Ghost, BatchNorm):
    """Ghost batch normalization over any channel axis (the batch is dimension 0).

    Args: those of :class:`~batchnorm.BatchNorm`, plus ``virtual_batch_size`` (keyword).

    Example::

        >>> import torch, batchnorm
        >>> gbn = batchnorm.GhostBatchNorm(8, virtual_batch_size=16)
        >>> gbn(torch.randn(64, 8)).shape  # four virtual batches of 16
        torch.Size([64, 8])
    """

    __doc__ = (_Ghost.__doc__ or "") + (__doc__ or "")


class GhostBatchNorm1d(_Ghost, BatchNorm1d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Ghost batch normalization for ``(N, C)`` or ``(N, C, L)``; see :class:`GhostBatchNorm`."""


class GhostBatchNorm2d(_Ghost, BatchNorm2d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Ghost batch normalization for ``(N, C, H, W)``; see :class:`GhostBatchNorm`."""


class GhostBatchNorm3d(_Ghost, BatchNorm3d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Ghost batch normalization for ``(N, C, D, H, W)``; see :class:`GhostBatchNorm`."""


# --------------------------------------------------------------------------------------------
# Frozen batch normalization


class FrozenStatisticsWarning(UserWarning):
    """Issued when statistics that were never updated (mean 0, variance 1) are frozen."""


class FrozenBatchNorm(nn.Module):
    r"""Batch normalization with fixed statistics and fixed γ, β: Algorithm 2's affine map

    .. math:: y = \frac{\gamma}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,(x - \mathrm{E}[x]) + \beta

    in training and eval mode alike, with no parameters to learn (torchvision's
    ``FrozenBatchNorm2d``; e.g. detection backbones fine-tuned with a few images per batch).
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers, so a
    ``torch.nn.BatchNorm`` ``state_dict`` loads into it (``num_batches_tracked`` is ignored; a
    checkpoint without ``weight`` or ``bias``, from ``affine=False`` or ``bias=False``, loads
    as γ = 1 or β = 0, as :meth:`from_batchnorm` gives).

    Args:
        num_features: C. eps: ε. axis: the channel axis (any rank).

    Shape: any ``(…, C, …)`` with C at ``axis``.

    Example::

        >>> import torch, batchnorm
        >>> bn = torch.nn.BatchNorm2d(4).eval()
        >>> frozen = batchnorm.FrozenBatchNorm2d.from_batchnorm(bn)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> bool(torch.allclose(frozen(x), bn(x), atol=1e-6))
        True
    """

    if TYPE_CHECKING:  # for type checkers only: torch.jit.script types attributes by value
        _ranks: tuple[int, ...]
        weight: Tensor
        bias: Tensor
        running_mean: Tensor
        running_var: Tensor
    _ranks = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        axis: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = positive_int(num_features)
        if n is None:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}"
            )
        num_features = n
        if self._ranks and axis != 1:
            raise ValueError(
                f"{type(self).__name__}: channels are at axis 1; for another axis use "
                "batchnorm.FrozenBatchNorm(num_features, axis=...)"
            )
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.axis = num_features, eps, axis
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def reset_parameters(self) -> None:
        """Set the map to its initial values, γ = 1, β = 0, E[x] = 0, Var[x] = 1 (what a layer
        materialized from the meta device with ``to_empty`` needs when no checkpoint follows)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """The fixed affine map of a BN layer (ours or ``torch.nn``'s) with running statistics;
        γ = 1 and β = 0 where the layer has none. The class's rank check applies; for any rank
        use :class:`FrozenBatchNorm`."""
        rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if rm is None or rv is None:
            raise ValueError(
                f"FrozenBatchNorm.from_batchnorm: {type(bn).__name__} has no running statistics "
                "(track_running_stats=False); nothing to freeze. Recompute them first with "
                "batchnorm.recalibrate(model, data) on a layer that tracks them."
            )
        axis = getattr(bn, "axis", 1)
        kwargs: dict[str, Any] = {} if cls._ranks else {"axis": axis}
        if cls._ranks and axis != 1:
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: the layer normalizes axis {axis}; use "
                "batchnorm.FrozenBatchNorm.from_batchnorm"
            )
        eps = float(getattr(bn, "eps", 1e-5))
        new = cls(int(rm.numel()), eps, device=rm.device, dtype=rm.dtype, **kwargs)
        with torch.no_grad():
            new.running_mean.copy_(rm)
            new.running_var.copy_(rv)
            w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
            if w is not None:
                new.weight.copy_(w.detach())
            if b is not None:
                new.bias.copy_(b.detach())
        return new

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BN checkpoint loads as is
        rm = state_dict.get(prefix + "running_mean")
        if isinstance(rm, Tensor):
            # a BN layer without γ (affine=False, Keras' scale=False) or β (bias=False,
            # center=False) has none in its checkpoint: its map uses γ = 1, β = 0
            state_dict.setdefault(prefix + "weight", torch.ones_like(rm))
            state_dict.setdefault(prefix + "bias", torch.zeros_like(rm))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """The fixed affine map. ``mask`` (boolean, True at valid positions, as for the other
        modules) is only validated: the map does not depend on the batch, as in eval mode."""
        if torch.jit.is_scripting():
            return self._forward_scripted(input)
        return self._forward_eager(input, mask)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: what the scripted forward reads, as attributes
        TorchScript can type."""
        self._script_name = self.layer_name()
        self._script_min_rank = min(self._ranks, default=2)
        self._script_max_rank = max(self._ranks, default=1 << 30)
        return self

    def _forward_scripted(self, input: Tensor) -> Tensor:
        """``forward`` compiled by ``torch.jit.script`` (torch operations; no mask)."""
        F.check_scripted_input(
            input,
            self.num_features,
            self.axis,
            self._script_min_rank,
            self._script_max_rank,
            self._script_name,
        )
        return F.batch_norm_scriptable(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            None,
            False,
            False,
            None,
            self.eps,
            self.axis,
            True,
            "warn",
            self._script_name,
        )

    @torch.jit.unused
    def _forward_eager(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, self.layer_name(), input, mask)
        if self._ranks and input.dim() not in self._ranks:
            want = " or ".join(f"{r}D" for r in self._ranks)
            raise BatchNormInputError(
                f"{self.layer_name()}: expected {want} input, got {input.dim()}D input of shape "
                f"{tuple(input.shape)}. For any rank use batchnorm.FrozenBatchNorm(..., axis=...)."
            )
        # (while tracing: the check's outcome is a constant of the trace, as in BatchNorm)
        fixed = type(self) if self._ranks else None
        name = self.layer_name()
        F._untraced(F.check_channels, input, self.num_features, self.axis, name, fixed)
        if mask is not None:
            F.check_mask(input, mask, self.axis, self.layer_name())
        try:
            return F.batch_norm_eval(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.eps,
                axis=self.axis,
                layer=self.layer_name(),
            )
        except (RuntimeError, NotImplementedError) as e:
            # a device mismatch named, as BatchNorm does (F.device_error)
            tensors = {
                "weight": self.weight,
                "bias": self.bias,
                "running_mean": self.running_mean,
                "running_var": self.running_var,
            }
            error = F.device_error(e, input, tensors, self.layer_name())
            if error is None:
                raise
            raise error from e

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        return s + (f", axis={self.axis}" if self.axis != 1 else "")


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input."""

    _ranks = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, H, W)`` input (torchvision's FrozenBatchNorm2d)."""

    _ranks = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, D, H, W)`` input."""

    _ranks = (5,)


# --------------------------------------------------------------------------------------------
# freeze / unfreeze

_BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, _BatchNormBase)
_FROZEN = "_batchnorm_frozen"  # attribute marking a frozen layer: the γ/β names we switched off
_FROZEN_MODE = "_batchnorm_frozen_training"  # a frozen layer's train/eval mode before freeze


def _stay_in_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen layer: whatever ``model.train()`` set, use the statistics."""
    module.training = False


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze` froze this BN layer."""
    return hasattr(module, _FROZEN)


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN_TYPES)]


def _scripted_batchnorm(model: nn.Module) -> list[str]:
    """The names of ``model``'s TorchScript batch-norm layers (``torch.jit.script`` of one, or
    of a model holding one): no tool can read or replace them in place."""
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.jit.ScriptModule):
            continue
        original = str(getattr(m, "original_name", ""))
        buffers = dict(m.named_buffers(recurse=False))
        if "BatchNorm" in original or "running_mean" in buffers:
            found.append(name or original or type(m).__name__)
    return found


def check_editable(model: nn.Module, what: str) -> None:
    """Refuse a model whose layers a tool cannot see, naming the first such layer: lazy layers
    (``nn.LazyConv2d``, ``nn.LazyBatchNorm2d``, …) that have not yet seen an input, whose shapes
    are unknown, and batch-norm layers compiled by ``torch.jit.script``, which are not BN classes
    to the tools and cannot be replaced in place (the tool would silently do nothing)."""
    for name, m in model.named_modules():
        tensors = itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False))
        if any(is_lazy(t) for t in tensors):
            raise ValueError(
                f"{what}: layer {name or type(m).__name__!r} ({type(m).__name__}) is a lazy "
                "layer that has not seen an input yet, so its shape is unknown; run one batch "
                f"through the model first (model(x)), then call {what} again"
            )
    check_not_scripted(model, what)


def check_not_scripted(model: nn.Module, what: str) -> None:
    """Refuse a model holding a batch-norm layer compiled by ``torch.jit.script``, naming it."""
    scripted = _scripted_batchnorm(model)
    if scripted:
        raise TypeError(
            f"{what}: batch-norm layer {scripted[0]!r} is compiled by torch.jit.script, so "
            f"{what} can neither read nor replace it (it would do nothing); call {what} on the "
            "eager model, before torch.jit.script"
        )


def freeze(model: nn.Module, *, affine: bool = False) -> nn.Module:
    """Freeze every batch-norm layer of ``model`` (ours and ``torch.nn``'s): they normalize with
    their running statistics and never update them, even after ``model.train()``; with
    ``affine=True`` γ and β stop receiving gradients too (``requires_grad=False``), also on
    layers an earlier call froze without it (staged fine-tuning: statistics first, then γ, β).

    The layers keep their class and state (a pre-forward hook keeps them in eval mode), so
    :func:`unfreeze` restores them exactly. Freezing statistics that were never updated (mean 0,
    variance 1) issues a :class:`FrozenStatisticsWarning`: such a layer only rescales by 1/√(1+ε).

    Returns ``model``. Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> _ = net(torch.randn(8, 3))                   # statistics from training
        >>> _ = batchnorm.freeze(net).train()
        >>> before = net[1].running_mean.clone(); _ = net(torch.randn(8, 3))
        >>> bool(torch.equal(before, net[1].running_mean))
        True
    """
    check_editable(model, "freeze")
    layers = _bn_layers(model)
    # every layer is checked before any is frozen: an error leaves the model as it was
    for name, m in layers:
        if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
            raise ValueError(
                f"freeze: layer {name or type(m).__name__!r} ({type(m).__name__}) has no running "
                "statistics (track_running_stats=False), so it cannot normalize without a batch; "
                "replace it or recompute statistics first with a layer that tracks them (nothing "
                "was frozen)"
            )
    for name, m in layers:
        label = name or type(m).__name__
        rm, rv = _tensor(m, "running_mean"), _tensor(m, "running_var")
        if is_frozen(m):
            if affine:  # frozen before without γ/β: switch them off now, for unfreeze too
                getattr(m, _FROZEN).extend(_switch_off_affine(m))
            continue
        if bool((rm == 0).all() and (rv == 1).all()):
            warnings.warn(
                f"freeze: layer {label!r} ({type(m).__name__}) still has its initial statistics "
                "(mean 0, variance 1); frozen, it will not normalize. Train first or run "
                "batchnorm.recalibrate(model, data) before freezing.",
                FrozenStatisticsWarning,
                stacklevel=2,
            )
        _mark_frozen(m, _switch_off_affine(m) if affine else [], m.training)
    return model


def _tensor(m: nn.Module, name: str) -> Tensor:
    """A tensor attribute (parameter or buffer) of a layer known to have it."""
    t = getattr(m, name)
    assert isinstance(t, Tensor), name
    return t


def _switch_off_affine(m: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on the layer's γ and β; the names of those switched off."""
    switched: list[str] = []
    for pname in ("weight", "bias"):
        p = getattr(m, pname, None)
        if isinstance(p, nn.Parameter) and p.requires_grad:
            p.requires_grad_(False)
            switched.append(pname)
        elif parametrize.is_parametrized(m, pname):
            # γ under a parametrization (weight_norm, ...) is computed from the parameters
            # that hold it: those stop receiving gradients
            held = m.get_submodule(f"parametrizations.{pname}")
            for qname, q in held.named_parameters():
                if q.requires_grad:
                    q.requires_grad_(False)
                    switched.append(f"parametrizations.{pname}.{qname}")
    return switched


def _mark_frozen(m: nn.Module, switched: list[str], training: bool) -> None:
    """Freeze one layer: the marker (γ/β names whose gradients were switched off), its mode
    before freezing, and the pre-forward hook that keeps it in eval mode."""
    setattr(m, _FROZEN, switched)
    setattr(m, _FROZEN_MODE, training)
    if _stay_in_eval not in m._forward_pre_hooks.values():  # a replaced layer's hooks carried over
        m.register_forward_pre_hook(_stay_in_eval)
    m.training = False


def freeze_like(src: nn.Module, dst: nn.Module) -> None:
    """Freeze ``dst`` as ``src`` is frozen (nothing if it is not), so that :func:`unfreeze`
    restores ``dst`` as it would ``src`` — for a layer replaced by another class."""
    if is_frozen(src):
        _mark_frozen(dst, list(getattr(src, _FROZEN)), getattr(src, _FROZEN_MODE, src.training))


# a layer's forward and backward hooks (and their flags), which a replaced layer keeps
_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


def carry_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst``, the layer replacing ``src``, ``src``'s forward and backward hooks: the very
    containers, so the handles the user holds still remove them."""
    for name in _HOOKS:
        setattr(dst, name, getattr(src, name))


def user_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks besides the one :func:`freeze` adds."""
    pre = [h for h in m._forward_pre_hooks.values() if h is not _stay_in_eval]
    return bool(pre or m._forward_hooks)


def unfreeze_hook(m: nn.Module) -> None:
    """Remove the pre-forward hook :func:`freeze` put on ``m`` (its marks stay)."""
    for key, hook in list(m._forward_pre_hooks.items()):
        if hook is _stay_in_eval:
            del m._forward_pre_hooks[key]


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: the layers follow ``model``'s train/eval mode again (they take the
    mode of ``model`` now; a BN layer passed as ``model`` itself gets back the mode it had
    when it was frozen) and γ, β get back ``requires_grad=True`` if freeze switched it off.
    Returns ``model``."""
    for _, m in _bn_layers(model):
        if not is_frozen(m):
            continue
        for pname in getattr(m, _FROZEN):
            m.get_parameter(pname).requires_grad_(True)  # (a parametrization's: dotted)
        mode = getattr(m, _FROZEN_MODE, model.training)
        delattr(m, _FROZEN)
        if hasattr(m, _FROZEN_MODE):
            delattr(m, _FROZEN_MODE)
        unfreeze_hook(m)
        m.training = mode if m is model else model.training
    return model
