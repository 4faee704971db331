"""What a trained model needs around batch normalization: exact population statistics
(:func:`recalibrate`), and deployment without BN (:func:`fold`, :func:`to_inference`).

Recalibration (population statistics as the mean and variance pooled over all the values seen,
where Algorithm 2 of Ioffe & Szegedy 2015 averages the per-batch variances): the running averages
a layer keeps during training lag behind the weights (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", whose "precise BN" pools the same way); after weight averaging (SWA/EMA), pruning, or a change of data (AdaBN, Li et al.
2016: recompute the statistics on the target domain, no labels needed) they are simply wrong.
:func:`recalibrate` recomputes them in one pass over the data.

Folding: in eval mode BN is the per-channel affine map ``y = s·z + t`` with
``s = γ/√(Var[x] + ε)`` and ``t = β − s·E[x]``; after a convolution or linear layer
``z = W∗x + b`` it folds into it: ``W' = s·W`` (per output channel), ``b' = s·b + t``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.diagnostics import INPUT_KEYS, _tensors
from batchnorm.functional import NonFiniteStatisticsWarning
from batchnorm.inplace_abn import InPlaceABN
from batchnorm.nn.batchnorm import SmallBatchWarning, _BatchNormBase
from batchnorm.recorder import first_tensor
from batchnorm.variants import (
    FrozenBatchNorm,
    _Renorm,
    _tensor,
    carry_hooks,
    check_editable,
    is_frozen,
    unfreeze_hook,
    user_hooks,
)

__all__ = [
    "Moments",
    "merge_moments",
    "accumulate_moments",
    "recalibrate",
    "fold",
    "to_inference",
    "safe_globals",
]

_BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, _BatchNormBase)


def _axis(m: nn.Module) -> int:
    return int(getattr(m, "axis", 1))


# --------------------------------------------------------------------------------------------
# recalibration


@dataclass
class Moments:
    """Per-channel moments of everything one layer saw: ``count`` values per channel, their
    ``mean`` and ``m2 = Σ(x − mean)²`` (float64). Exact to merge (:func:`merge_moments`)."""

    count: int
    mean: Tensor
    m2: Tensor

    @staticmethod
    def of(x: Tensor, axis: int, mask: Tensor | None = None) -> Moments:
        """The moments of one batch; ``mask`` (True at valid positions, the input's shape with
        or without the channel axis) selects the positions that count."""
        ax = axis % x.dim()
        rows = x.detach().to(torch.float64).movedim(ax, -1)  # (..., C)
        c = rows.shape[-1]
        if mask is not None:
            m = mask if mask.dim() == x.dim() - 1 else mask.squeeze(ax)
            rows = rows[m.expand(rows.shape[:-1])]  # (valid, C)
        rows = rows.reshape(-1, c)  # (M, C)
        mean = rows.mean(0)
        return Moments(rows.shape[0], mean, ((rows - mean) ** 2).sum(0))

    def variance(self, unbiased: bool = True) -> Tensor:
        return self.m2 / (self.count - 1 if unbiased else self.count)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s exact pairwise merge: the moments of the union of two sets of values."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    return Moments(n, mean, a.m2 + b.m2 + delta * delta * (a.count * b.count / n))


def _inputs(data: Iterable[Any]) -> Iterator[Any]:
    """The model inputs of a DataLoader/iterable yielding tensors, ``(x, y, …)`` tuples or dicts
    with one of :data:`batchnorm.diagnostics.INPUT_KEYS`."""
    for item in data:
        if isinstance(item, (tuple, list)):
            yield item[0] if item else item
        elif isinstance(item, Mapping):
            key = next((k for k in INPUT_KEYS if k in item), None)
            if key is None:
                raise TypeError(
                    f"recalibrate: a batch is a dict with keys {sorted(map(str, item))}, none of "
                    f"which is a known input key {INPUT_KEYS}; pass the inputs yourself, e.g. "
                    "(batch['my_input'] for batch in loader), or ((batch,) for batch in loader) "
                    "for a model that takes the whole dict"
                )
            yield item[key]
        else:
            yield item


def _map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``x`` with ``fn`` applied to every tensor in it (tuples, lists, dicts kept)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def _first_samples(x: Any, n: int, size: int) -> Any:
    """The first ``n`` samples of a model input of ``size`` samples: every tensor in it whose
    dimension 0 is the batch, cut."""
    return _map_tensors(x, lambda t: t[:n] if t.dim() and t.shape[0] == size else t)


def _batch_size(x: Any) -> int:
    t = first_tensor(x)
    if t is not None and t.dim() > 0:
        return int(t.shape[0])
    raise TypeError(
        "recalibrate: expected the data to yield tensors or (x, y) tuples (or dicts with one of "
        f"the keys {INPUT_KEYS}) holding a batch of inputs, got a model input of type "
        f"{type(x).__name__}"
    )


def _recalibrated_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The BN layers to recalibrate: those with running statistics, not frozen."""
    return {
        name or type(m).__name__: m
        for name, m in model.named_modules()
        if isinstance(m, _BN_TYPES)
        and getattr(m, "running_mean", None) is not None
        and not is_frozen(m)
    }


def accumulate_moments(
    model: nn.Module, data: Iterable[Any], num_samples: int | None = None
) -> dict[str, Moments]:
    """One pass over ``data``: the exact per-channel :class:`Moments` of every BN layer's
    input, keyed by layer name, weighted by values (samples), not by batches.

    During the pass the model is in eval mode (dropout off, as at inference) except the BN
    layers, which normalize with batch statistics as in training; their running statistics,
    momentum, ``num_batches_tracked`` and every module's mode are restored afterwards. This is
    the local half of :func:`recalibrate`: the moments of several processes merge exactly with
    :func:`merge_moments` (that is what ``recalibrate(..., distributed=True)`` does).
    """
    return _accumulate(model, data, num_samples)[0]


@torch.no_grad()
def _accumulate(
    model: nn.Module, data: Iterable[Any], num_samples: int | None, require_data: bool = True
) -> tuple[dict[str, Moments], int]:
    if num_samples is not None and num_samples < 1:
        raise ValueError(
            f"recalibrate: num_samples must be >= 1 (one image gives its pixels), got "
            f"{num_samples}; pass None to use all the data"
        )
    check_editable(model, "recalibrate")
    layers = _recalibrated_layers(model)
    moments: dict[str, Moments] = {}
    seen = 0
    modes = {m: m.training for m in model.modules()}
    saved = {
        name: (
            m.momentum,
            _tensor(m, "running_mean").clone(),
            _tensor(m, "running_var").clone(),
            None if m.num_batches_tracked is None else _tensor(m, "num_batches_tracked").clone(),
        )
        for name, m in layers.items()
    }
    # the moments pool exactly over all batches, so a small one does no harm here: no warning,
    # and the layers' once-only warning is left for the user's own training batches
    warned = {m: getattr(m, "_warned_small", None) for m in layers.values()}
    # batch renormalization corrects towards the running statistics this pass replaces: it runs
    # as plain BN (r = 1, d = 0), and its training record (last_r, last_d) is kept
    renorm = {
        r: (r.r_max, r.d_max, r.last_r, r.last_d) for r in layers.values() if isinstance(r, _Renorm)
    }
    handles = []

    pending: dict[str, Moments] = {}  # the current batch's, merged once its forward succeeds
    single: list[str] = []  # layers that got one value per channel from the current batch

    def hook_for(name: str, layer: nn.Module) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0]
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            new = Moments.of(x, _axis(layer), mask)
            if new.count < 2:
                single.append(name)
            pending[name] = merge_moments(pending[name], new) if name in pending else new

        return hook

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        # the layers' own running update is a no-op here; non-finite data is reported below
        warnings.simplefilter("ignore", NonFiniteStatisticsWarning)
        try:
            model.eval()
            for r in renorm:
                r.r_max, r.d_max = 1.0, 0.0
            for name, m in layers.items():
                m.train()
                # the layers keep normalizing; their own running update becomes a no-op
                m.momentum = 0.0  # type: ignore[assignment]
                handles.append(m.register_forward_pre_hook(hook_for(name, m), with_kwargs=True))
            device = next((p.device for p in model.parameters()), None)
            for x in _inputs(data):
                n = size = _batch_size(x)
                if num_samples is not None:
                    n = min(n, num_samples - seen)
                    x = _first_samples(x, n, size)
                pending.clear()
                single.clear()
                try:
                    model(x if device is None else _map_tensors(x, lambda t: t.to(device)))
                except ValueError as e:
                    # one sample gives a layer one value per channel (a feature vector, unlike
                    # an image) in train mode: skipped, e.g. a DataLoader's last batch of one
                    if n != 1 or "value per channel" not in str(e):
                        raise
                    single.append("")
                if single and n == 1:
                    # (also where a layer's small_batch policy let it through: "running" would
                    # normalize with the statistics being replaced, "skip" give β, and every
                    # later layer would count that)
                    if size == 1:
                        continue
                    break  # the one sample left to take under num_samples
                for name, new in pending.items():
                    moments[name] = merge_moments(moments[name], new) if name in moments else new
                seen += n
                if num_samples is not None and seen >= num_samples:
                    break
            if seen == 0 and require_data:
                raise ValueError(
                    "recalibrate: the data yielded no batch (that the layers can normalize: "
                    "2 or more samples, or one sample with 2 or more values per channel, such "
                    "as an image); pass a DataLoader or iterable of tensors or (x, y) tuples"
                )
        finally:
            for h in handles:
                h.remove()
            for name, m in layers.items():
                momentum, rm, rv, nbt = saved[name]
                m.momentum = momentum
                _tensor(m, "running_mean").copy_(rm)
                _tensor(m, "running_var").copy_(rv)
                if nbt is not None:
                    _tensor(m, "num_batches_tracked").copy_(nbt)
            for mod, mode in modes.items():
                mod.training = mode
            for m, flag in warned.items():
                if flag is not None:
                    m._warned_small = flag
            for r, (r_max, d_max, last_r, last_d) in renorm.items():
                r.r_max, r.d_max, r.last_r, r.last_d = r_max, d_max, last_r, last_d
    return moments, seen


def _all_gather_moments(
    moments: dict[str, Moments],
    channels: dict[str, int],
    seen: int,
    process_group: Any,
    timeout: float | None,
) -> tuple[dict[str, Moments], int]:
    """Merge every rank's moments exactly (``torch.distributed`` must be initialized):
    :func:`batchnorm.sync.all_reduce_population_stats`, one handshake and one all-gather for the
    whole model; ``channels`` (name → C) lists the layers in the same order on every rank, and a
    layer a rank never saw contributes a zero count. Returns the merged moments and the number of
    samples over all ranks (``seen`` is this rank's)."""
    import torch.distributed as dist

    from batchnorm.sync import all_reduce_population_stats

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "recalibrate(distributed=True) needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group); on one process use distributed=False"
        )
    local = {n: (m.count, m.mean, m.m2) for n, m in moments.items()}
    # the samples ride along as one more entry ("" is no layer's name)
    local[""] = (seen, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    merged = all_reduce_population_stats(
        local, {"": 1, **channels}, process_group=process_group, timeout=timeout
    )
    total = merged.pop("", (0, None, None))[0]
    return {n: Moments(*v) for n, v in merged.items()}, total


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_samples: int | None = None,
    *,
    distributed: bool = False,
    process_group: Any = None,
    timeout: float | None = None,
) -> int:
    """Recompute the running statistics of every BN layer of ``model`` exactly, in one pass.

    Each layer gets the pooled mean and variance of all the values it saw in the pass:
    ``running_mean = E[x]`` and ``running_var = m/(m−1)·Var[x]`` with m the total number of
    values per channel (biased, without m/(m−1), for layers with ``unbiased_running_var=False``).
    This differs from Algorithm 2's ``m/(m−1)·E_B[σ²_B]`` (m the batch size), the average of the
    variances within each batch, which ``torch.optim.swa_utils.update_bn`` computes: the pooled
    variance also counts the spread between the batch means. For shuffled (i.i.d.) batches the
    two estimate the same quantity; when the batch means differ (unshuffled, class-sorted or
    per-domain batches) the pooled variance can be much larger. Layers frozen with
    :func:`batchnorm.freeze` and layers without running statistics are left alone; every module's train/eval mode and each
    layer's momentum and ``num_batches_tracked`` are restored. The pass runs the model in eval
    mode with the BN layers in training mode (batch statistics, dropout off); a layer that
    saw no data keeps its statistics (with a warning).

    Args:
        model: any module containing our or ``torch.nn``'s BN layers.
        data: a DataLoader or iterable yielding input tensors, ``(x, y, …)`` tuples or dicts
            with one of the keys :data:`batchnorm.diagnostics.INPUT_KEYS` (``"input"``, ``"x"``, ``"image"``, …),
            as :func:`batchnorm.doctor` takes them (labels are not used: AdaBN needs none).
            The input may be a tuple or dict of tensors (a model of several inputs), the batch
            along dimension 0 of its first tensor. A batch of one sample counts when the
            layers can normalize it (an image: its pixels) and is skipped when a layer gets one
            value per channel from it (a feature vector, e.g. a DataLoader's uneven last
            batch).
        num_samples: use only the first ``num_samples`` samples (the last batch is cut).
        distributed: merge the moments of all ``torch.distributed`` ranks exactly (each rank
            passes its own shard of the data) before writing the statistics. A rank whose shard
            yields no batch takes part with count 0; the pass fails (on every rank) only when no
            rank has data. With synchronized layers (:class:`batchnorm.SyncBatchNorm`) every
            rank must pass the same number of batches.
        process_group: with ``distributed``, the group whose ranks share statistics (default:
            the default group).
        timeout: with ``distributed``, seconds to wait for the other ranks at the merge before
            raising :class:`batchnorm.sync.SyncBatchNormError`; ``None`` uses the process
            group's timeout.

    Returns:
        The number of samples used (on this process).

    Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> data = [torch.randn(16, 3) for _ in range(4)]
        >>> batchnorm.recalibrate(net, data)
        64
    """
    if isinstance(data, torch.Tensor):
        # iterating a tensor yields its rows: single examples without a batch axis
        raise TypeError(
            f"recalibrate: data is one tensor of shape {tuple(data.shape)}; pass batches: "
            "[x], x.split(batch_size) or a DataLoader"
        )
    if distributed:
        from batchnorm.sync import check_timeout

        check_timeout(timeout, "recalibrate(distributed=True)")  # before the pass over the data
    layers = _recalibrated_layers(model)
    moments, seen = _accumulate(model, data, num_samples, require_data=not distributed)
    if distributed:
        channels = {n: _tensor(m, "running_mean").numel() for n, m in layers.items()}
        moments, total = _all_gather_moments(moments, channels, seen, process_group, timeout)
        if total == 0:
            raise ValueError(
                "recalibrate(distributed=True): no rank's data yielded a batch (of at least 2 "
                "samples); pass each rank a DataLoader or iterable of tensors or (x, y) tuples"
            )
    # every layer's statistics are checked before any is written: an error leaves them all
    new: dict[str, tuple[Tensor, Tensor]] = {}
    for name, m in layers.items():
        mom = moments.get(name)
        if mom is None:
            warnings.warn(
                f"recalibrate: layer {name!r} ({type(m).__name__}) saw no data in the pass; its "
                "statistics were left unchanged",
                UserWarning,
                stacklevel=2,
            )
            continue
        if mom.count < 2:
            raise ValueError(
                f"recalibrate: layer {name!r} ({type(m).__name__}) saw {mom.count} value(s) per "
                "channel (its masks leave too few valid positions); need >= 2. Pass more data. "
                "No layer's statistics were changed."
            )
        var = mom.variance(unbiased=bool(getattr(m, "unbiased_running_var", True)))
        if not bool(torch.isfinite(mom.mean).all() and torch.isfinite(var).all()):
            raise FloatingPointError(
                f"recalibrate: layer {name!r} ({type(m).__name__}) saw non-finite values; no "
                "layer's statistics were changed. Check the data and the weights "
                "(batchnorm.doctor(model, data) finds where they start)."
            )
        rm, rv = _tensor(m, "running_mean"), _tensor(m, "running_var")
        mean_t, var_t = mom.mean.to(rm), var.to(rv)
        if not bool(torch.isfinite(mean_t).all() and torch.isfinite(var_t).all()):
            big = max(float(mom.mean.abs().max()), float(var.abs().max()))
            wider = (
                "Recalibrate the model in float32 (model.float()), or rescale"
                if torch.finfo(rv.dtype).bits < 32
                else "Rescale"  # float32 activations beyond its range: the network overflows
            )
            raise OverflowError(
                f"recalibrate: layer {name!r} ({type(m).__name__}) holds its statistics in "
                f"{rm.dtype}, which cannot hold the data's (up to {big:.3g}); no layer's "
                f"statistics were changed. {wider} the data or the weights before this layer."
            )
        new[name] = (mean_t, var_t)
    for name, (mean, var) in new.items():
        _tensor(layers[name], "running_mean").copy_(mean)
        _tensor(layers[name], "running_var").copy_(var)
    return seen


# --------------------------------------------------------------------------------------------
# folding

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = (*_CONV, *_CONV_T, nn.Linear)
_AFFINE_TYPES: tuple[type[nn.Module], ...] = (*_BN_TYPES, FrozenBatchNorm)


def _not_foldable(layer: nn.Module) -> str | None:
    """Why ``layer``'s output is not ``W·x + b`` of its own parameters (None: it is), so a BN
    after it cannot be folded into them."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(layer):
        return (
            "its weight is parametrized (weight_norm, spectral_norm, ...); remove that first: "
            "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')"
        )
    base = next(c for c in type(layer).__mro__ if c in _FOLDABLE)
    for method in ("forward", "_conv_forward", "_output_padding"):  # what computes the output
        if getattr(type(layer), method, None) is not getattr(base, method, None):
            return f"{type(layer).__name__} overrides {method} (it may transform its weight)"
    if layer._forward_pre_hooks or layer._forward_hooks:
        return "it has forward hooks (e.g. torch.nn.utils.weight_norm's), which may change it"
    return None


def _hooked(bn: nn.Module) -> str | None:
    """Why a BN cannot be folded away because of its hooks (None: it can)."""
    if user_hooks(bn):
        return "the BN has forward hooks, which would be lost with it"
    return None


def _check_inference_ready(bn: nn.Module, name: str, what: str) -> None:
    # a FrozenBatchNorm is a fixed map in either mode, from statistics that may still be broken
    fixed = isinstance(bn, FrozenBatchNorm)
    if bn.training and not fixed and not is_frozen(bn):
        raise ValueError(
            f"{what}: layer {name!r} ({type(bn).__name__}) is in training mode, where it "
            "normalizes with batch statistics, which cannot be folded into a fixed map. Call "
            "model.eval() first."
        )
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError(
            f"{what}: layer {name!r} ({type(bn).__name__}) has no running statistics "
            "(track_running_stats=False), so its inference map depends on the batch; train it "
            "with running statistics or compute them with batchnorm.recalibrate."
        )
    rm, rv = _tensor(bn, "running_mean").detach(), _tensor(bn, "running_var").detach()
    eps = float(getattr(bn, "eps", 1e-5))
    # var + ε as the layer computes it, in its own dtype (−1e-5 in float32 is not −ε in float64)
    bad = ~(rm.isfinite() & rv.isfinite() & (rv + torch.tensor(eps, dtype=rv.dtype) > 0))
    if bool(bad.any()):
        channels = bad.reshape(-1).nonzero().reshape(-1).tolist()
        shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        raise ValueError(
            f"{what}: layer {name!r} ({type(bn).__name__}) has running statistics that are not "
            f"finite or a running variance at or below -eps in {len(channels)} of "
            f"{rm.numel()} channels ({shown}): its inference map would be NaN or infinite there. "
            + (
                "Load statistics saved before they broke (a FrozenBatchNorm keeps what it was "
                "given; recalibrate leaves it alone)."
                if fixed
                else "Compute the statistics again with batchnorm.recalibrate(model, data), or "
                "load a checkpoint saved before they broke."
            )
        )


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Algorithm 2's ``(scale, shift)`` of a BN layer in float64."""
    rm = _tensor(bn, "running_mean").detach().double()
    rv = _tensor(bn, "running_var").detach().double()
    w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
    scale = torch.rsqrt(rv + float(getattr(bn, "eps", 1e-5)))
    if w is not None:
        scale = scale * w.detach().double()
    shift = -rm * scale
    if b is not None:
        shift = shift + b.detach().double()
    return scale, shift


def _out_channels(layer: nn.Module) -> int:
    return int(getattr(layer, "out_features" if isinstance(layer, nn.Linear) else "out_channels"))


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` with ``bn``'s inference map folded in (computed in float64)."""
    scale, shift = _bn_affine(bn)
    new = copy.deepcopy(layer)
    weight = _tensor(layer, "weight")
    w = weight.detach().double()
    if isinstance(layer, _CONV_T):
        # weight (C_in, C_out/groups, k…): output channel g·(C_out/groups) + j is w[i, j] for
        # the input channels i of group g
        g = layer.groups
        shaped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s = scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        w_new = (shaped * s).reshape(w.shape)
    else:  # Conv (C_out, C_in/groups, k…) and Linear (C_out, C_in)
        w_new = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    bias = getattr(layer, "bias", None)
    b = torch.zeros_like(scale) if bias is None else bias.detach().double()
    b_new = scale * b + shift
    new.weight = nn.Parameter(w_new.to(weight.dtype), requires_grad=weight.requires_grad)
    # a frozen layer stays frozen: the bias as the old bias (or, if it had none, the weight)
    trained = (bias if bias is not None else weight).requires_grad
    new.bias = nn.Parameter(b_new.to(weight.dtype).to(weight.device), requires_grad=trained)
    return new


def _overflow(new: nn.Module, old: nn.Module) -> str | None:
    """Why the folded layer ``new`` cannot replace ``old``: a weight or bias that became
    infinite in the layers' dtype (float16's 65504 is reached by a large γ/√(var + ε))."""
    for name in ("weight", "bias"):
        t, before = getattr(new, name, None), getattr(old, name, None)
        if t is None or bool(torch.isfinite(t).all()):
            continue
        if before is not None and not bool(torch.isfinite(before).all()):
            continue  # not finite before folding either: not the folding's doing
        wider = "float32 (model.float())" if torch.finfo(t.dtype).bits < 32 else "float64"
        return (
            f"the folded {name} does not fit {t.dtype} (it would hold inf); fold in {wider} "
            "to fold this pair"
        )
    return None


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """(layer, bn) module names where the BN's only input is the layer's output, used nowhere
    else — found in the model's traced graph; None when the model cannot be traced."""
    from torch import fx

    class _Tracer(fx.Tracer):
        # our BN layers have shape checks in forward: keep them (and the foldable layers) whole
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (*_AFFINE_TYPES, *_FOLDABLE)) or super().is_leaf_module(
                m, qualname
            )

    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 — any tracing failure falls back to Sequential adjacency
        return None
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    read = set()  # layers whose parameters or buffers forward reads directly (self.conv.weight)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            read.add(str(node.target).rpartition(".")[0])
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), _AFFINE_TYPES):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(str(src.target)), _FOLDABLE)
            and len(src.users) == 1
            and calls[str(src.target)] == 1
            and calls[str(node.target)] == 1
            # folding rewrites both layers' tensors: a weight read elsewhere would change there
            and not read & {str(src.target), str(node.target)}
            and len(node.args) == 1
            # a BN called with a mask keyword: the nn.Identity left by folding takes no mask
            and not node.kwargs
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            # every entry, a layer used twice included (named_children lists it once, which
            # would make the entries around the repeat look adjacent)
            children = [(n, c) for n, c in mod._modules.items() if c is not None]
            for (n1, c1), (n2, c2) in zip(children, children[1:]):
                if isinstance(c1, _FOLDABLE) and isinstance(c2, _AFFINE_TYPES):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + n1, prefix + n2))
    return pairs


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every name ``old`` is registered under (forward may call a layer by a
    name other than the one ``torch.fx`` reports), in ``old``'s train/eval mode."""
    new.train(old.training)
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if m is old and name:
            _set(model, name, new)


def _record_ranks(
    model: nn.Module, example_input: Any, select: Callable[[nn.Module], bool] | None = None
) -> dict[str, int]:
    """The input rank of every BN layer (every layer ``select`` picks) on ``example_input``,
    under every name it is registered under (see :func:`_fold_in_place`): where the channel
    axis is. The model runs once in eval mode, without a graph (nothing updated; modes
    restored)."""
    pick = select or (lambda m: isinstance(m, _AFFINE_TYPES))
    ranks: dict[str, int] = {}

    def hook_for(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            ranks[name] = args[0].dim()

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(name))
        for name, m in model.named_modules(remove_duplicate=False)
        if pick(m)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return ranks


def _fold_in_place(model: nn.Module, ranks: dict[str, int] | None, what: str) -> list[str]:
    # every name a layer is registered under: a pair found in a Sequential may name a layer
    # that is also an attribute elsewhere (registered there first)
    mods = dict(model.named_modules(remove_duplicate=False))
    pairs = _fx_pairs(model)
    traced = pairs is not None
    if pairs is None:
        pairs = _sequential_pairs(model)
    folded = []
    unknown_rank = []
    refused = []
    for layer_name, bn_name in pairs:
        layer, bn = mods[layer_name], mods[bn_name]
        _check_inference_ready(bn, bn_name, what)
        if int(_tensor(bn, "running_mean").numel()) != _out_channels(layer):
            continue
        why = _not_foldable(layer) or _hooked(bn)
        if why is not None:
            refused.append(f"{layer_name!r} → {bn_name!r}: {why}")
            continue
        ax = _axis(bn)
        rank = None if ranks is None else ranks.get(bn_name)
        if isinstance(layer, nn.Linear):
            # a Linear layer's features are the last axis: a BN on axis 1 normalizes them only
            # on 2-D input, which only an example input can tell (on (N, L, F) input with
            # L == F, folding would scale the wrong axis without an error)
            ok = ax == -1 or (rank is not None and ax % rank == rank - 1)
            if rank is None and ax == 1:
                unknown_rank.append(bn_name)
        else:
            # channels at axis 1 of batched input; unbatched input (C, L) puts them at axis 0,
            # where a BN on axis 1 normalizes positions, not the layer's output channels
            batched = len(layer.weight.shape)
            ok = (ax == 1 or (rank is not None and ax % rank == 1)) and rank in (None, batched)
        if not ok:
            continue
        new_layer = _folded(layer, bn)
        overflow = _overflow(new_layer, layer)
        if overflow is not None:
            refused.append(f"{layer_name!r} → {bn_name!r}: {overflow}")
            continue
        after = bn.activation_module() if isinstance(bn, InPlaceABN) else nn.Identity()
        if traced:
            # each is called once in the whole forward, by whichever name: replace at all
            _replace(model, layer, new_layer)
            _replace(model, bn, after)
        else:
            # a Sequential pair is one place; the layers' other names may be used elsewhere
            _set(model, layer_name, new_layer.train(layer.training))
            _set(model, bn_name, after.train(bn.training))
        folded.append(bn_name)
    if unknown_rank:
        warnings.warn(
            f"{what}: Linear → BN pairs {unknown_rank} were not folded: whether the BN's "
            "axis 1 is the Linear layer's feature axis depends on the input's rank (2-D: yes; "
            f"(N, L, F): no). Pass example_input to {what} to fold them.",
            stacklevel=3,
        )
    if refused:
        warnings.warn(
            f"{what}: pairs not folded (their BN is kept as a fixed map): " + "; ".join(refused),
            stacklevel=3,
        )
    if folded and not traced and what == "to_inference":
        # fold measures its result; to_inference cannot, and order is not data flow
        warnings.warn(
            f"{what}: the model could not be traced (torch.fx), so the BN layers {folded} were "
            "folded into the layer before them in their nn.Sequential — right only if nothing "
            "else uses that layer's output. batchnorm.fold(model, example_input) measures the "
            "difference.",
            stacklevel=3,
        )
    return folded


def fold(model: nn.Module, example_input: Any, *, inplace: bool = False) -> tuple[nn.Module, float]:
    """Fold every eval-mode BN layer into the ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``
    (groups included) or ``Linear`` layer whose output it normalizes, for deployment.

    ``W' = s·W`` per output channel and ``b' = s·b + t`` (a bias is created where there was
    none) with Algorithm 2's ``s = γ/√(Var[x] + ε)``, ``t = β − s·E[x]``, computed in float64
    and stored in the layer's dtype; the BN becomes ``nn.Identity`` (an :class:`InPlaceABN`
    becomes its activation). Pairs are found in the traced graph (``torch.fx``): a BN whose only
    input is the output of such a layer that nothing else uses; if the model cannot be traced,
    adjacent pairs inside ``nn.Sequential`` containers. A BN without such a layer is left as is
    (see :func:`to_inference`).

    Args:
        model: the model, every BN in eval mode with running statistics — otherwise a
            ``ValueError`` names the layer.
        example_input: an input for the model; the output before and after is compared on it.
        inplace: modify ``model`` itself instead of a copy.

    Returns:
        ``(folded_model, max_abs_error)``: the error is ``max |model(x) − folded(x)|`` on
        ``example_input`` (random layers such as dropout see the same random numbers), over
        every tensor of the output when it is a tuple, list or dict of tensors.

    Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> folded, err = batchnorm.fold(net, torch.randn(2, 3, 8, 8))
        >>> [type(m).__name__ for m in folded], err < 1e-5
        (['Conv2d', 'Identity'], True)
    """
    check_editable(model, "fold")
    for name, m in model.named_modules():
        if isinstance(m, _BN_TYPES):
            _check_inference_ready(m, name or type(m).__name__, "fold")
    ranks = _record_ranks(model, example_input)
    reference_out = _run_seeded(model, example_input)
    new = model if inplace else copy.deepcopy(model)
    _fold_in_place(new, ranks, "fold")
    out = _run_seeded(new, example_input)
    if len(out) != len(reference_out):
        raise RuntimeError(
            f"fold: the folded model returned {len(out)} tensor(s), the model "
            f"{len(reference_out)}; the model's outputs depend on more than its layers"
        )
    err = max(
        (
            float((a.double() - b.double()).abs().max())
            for a, b in zip(out, reference_out)
            if a.numel()
        ),
        default=0.0,
    )
    return new, err


def _run_seeded(model: nn.Module, x: Any) -> list[Tensor]:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = model(x)
    # every tensor of the output, in order (torchvision's segmentation models return dicts)
    tensors = _tensors(out)
    if not tensors:
        raise TypeError(
            f"fold: the model returned {type(out).__name__}, which holds no tensor to measure "
            "the folding error on; return a tensor, or tuples/lists/dicts of tensors (wrap the "
            "model in a module whose forward does), or use batchnorm.to_inference, which "
            "measures nothing"
        )
    return tensors


@torch.no_grad()
def to_inference(
    model: nn.Module, example_input: Any = None, *, inplace: bool = False
) -> nn.Module:
    """The model for deployment: BN layers folded into their conv/linear layer where possible
    (:func:`fold`), every other BN replaced by Algorithm 2's fixed affine map
    (:class:`~batchnorm.FrozenBatchNorm`; an :class:`InPlaceABN` by the map followed by its
    activation). The result contains no layer that depends on the batch or the mode.

    ``example_input`` (optional) tells the rank of each BN's input, which decides whether a
    ``Linear`` + ``BatchNorm`` pair with ``axis=1`` can be folded (only on 2-D input); without
    it such pairs are not folded (their BN becomes ``FrozenBatchNorm``), with a warning; and
    whether a convolution runs on unbatched input (``(C, L)``, where its BN's axis 1 holds
    positions: not folded) — without it, convolutions are taken to run on batched input.

    Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).eval()
        >>> [type(m).__name__ for m in batchnorm.to_inference(net)]
        ['FrozenBatchNorm', 'Linear']
    """
    check_editable(model, "to_inference")
    for name, m in model.named_modules():
        if isinstance(m, _BN_TYPES):
            _check_inference_ready(m, name or type(m).__name__, "to_inference")
    ranks = None if example_input is None else _record_ranks(model, example_input)
    new = model if inplace else copy.deepcopy(model)
    _fold_in_place(new, ranks, "to_inference")
    if isinstance(new, _BN_TYPES):
        return _fixed(new).train(new.training)
    fixed: dict[int, nn.Module] = {}  # a layer registered under two names stays one layer
    for name, m in list(new.named_modules(remove_duplicate=False)):
        if isinstance(m, _BN_TYPES):
            if id(m) not in fixed:
                fixed[id(m)] = _fixed(m).train(m.training)
            _set(new, name, fixed[id(m)])
    return new


def _fixed(bn: nn.Module) -> nn.Module:
    """The fixed map replacing ``bn``, with ``bn``'s hooks (and not the hook that keeps a frozen
    layer in eval mode)."""
    frozen = FrozenBatchNorm.from_batchnorm(bn)
    fixed: nn.Module = frozen
    if isinstance(bn, InPlaceABN):
        fixed = nn.Sequential(frozen, bn.activation_module())
    carry_hooks(bn, fixed)
    unfreeze_hook(fixed)
    return fixed


def safe_globals() -> list[Any]:
    """What ``torch.load(..., weights_only=True)`` must be allowed to build to load a whole
    pickled model (``torch.save(model, path)``) that holds this package's layers: their classes,
    and the forward pre-hook :func:`freeze` puts on a frozen layer. Allow them with
    ``torch.serialization.add_safe_globals(batchnorm.safe_globals())`` or, for one load, inside
    ``with torch.serialization.safe_globals(batchnorm.safe_globals()):``, together with the
    model's other classes (``torch.nn.Sequential``, your own) that the loader names. A
    ``state_dict`` — the usual checkpoint — needs none of this.

    Example::

        >>> import io, torch, batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), batchnorm.BatchNorm1d(4))
        >>> buffer = io.BytesIO()
        >>> torch.save(model, buffer)
        >>> _ = buffer.seek(0)
        >>> allowed = [*batchnorm.safe_globals(), torch.nn.Sequential, torch.nn.Linear]
        >>> with torch.serialization.safe_globals(allowed):
        ...     loaded = torch.load(buffer, weights_only=True)
        >>> type(loaded[1]).__name__
        'BatchNorm1d'
    """
    import batchnorm
    from batchnorm.variants import _stay_in_eval

    public = (getattr(batchnorm, name) for name in batchnorm.__all__)
    layers = [obj for obj in public if isinstance(obj, type) and issubclass(obj, nn.Module)]
    return [*layers, _stay_in_eval]
