"""Conversion between ``torch.nn``'s batch-norm layers and ours (and, in :mod:`batchnorm.keras`
users' terms, between conventions).

``convert_model(model)`` swaps every ``torch.nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) for
ours, keeping its state (parameters, running statistics, ``num_batches_tracked``), its mode
(train/eval) and its device and dtype; ``convert_model(model, to="torch")`` swaps back.

``keras_to_torch(keras_model, torch_module)`` and ``torch_to_keras(torch_module, keras_model)``
move batch-norm state between Keras and PyTorch, translating momentum, ε and the biased/unbiased
moving variance, and report the converted layers' output differences. Keras is imported only
inside them.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from batchnorm.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase
from batchnorm.variants import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)

__all__ = [
    "convert_model",
    "keras_to_torch",
    "torch_to_keras",
    "ConversionReport",
    "LayerConversion",
]

_TO_OURS: dict[type[nn.Module], type[_BatchNormBase]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
}


_TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


def _bias_kwarg(has_gamma: bool, has_beta: bool) -> dict[str, bool]:
    """torch.nn >= 2.13 takes ``bias=False`` for γ without β; older versions have no such arg."""
    return {"bias": has_beta} if (_TORCH_HAS_BIAS_ARG and has_gamma) else {}


_TORCH_BY_RANK: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _our_sync(m: nn.Module) -> bool:
    """``m`` is our :class:`~batchnorm.sync.SyncBatchNorm` itself (not a subclass)."""
    from batchnorm.sync import SyncBatchNorm  # sync imports this module

    return type(m) is SyncBatchNorm


def _torch_class_for(
    m: _BatchNormBase, name: str, rank: int | None
) -> type[nn.modules.batchnorm._BatchNorm]:
    sync = _our_sync(m)
    problems = []
    if m.axis != 1:
        problems.append(f"axis={m.axis} (torch.nn normalizes axis 1)")
    if m.center and not m.scale:
        problems.append("β without γ (torch.nn has no such layer)")
    if m.scale and not m.center and not _TORCH_HAS_BIAS_ARG:
        problems.append("γ without β (this torch version has no bias=False)")
    if not m.unbiased_running_var:
        problems.append("a biased running variance (torch.nn stores the unbiased one)")
    if type(m) not in _TO_TORCH and type(m) is not BatchNorm and not sync:
        problems.append(f"{type(m).__name__} has no torch.nn counterpart")
    if problems:
        raise ValueError(
            f"convert_model: layer {name!r} ({m.layer_name()}) cannot become a torch.nn layer: "
            + "; ".join(problems)
            + ". Keep our layer for it, or rebuild it as a BatchNorm1d/2d/3d without these."
        )
    if type(m) in _TO_TORCH:
        return _TO_TORCH[type(m)]
    if sync:  # torch.nn.SyncBatchNorm takes any rank
        return nn.SyncBatchNorm
    if rank not in _TORCH_BY_RANK:
        # torch.nn's classes check the input's rank: the wrong one fails at the next forward
        seen = "example_input did not reach it" if rank is None else f"it saw {rank}-D input"
        raise ValueError(
            f"convert_model: layer {name!r} ({m.layer_name()}) works on any input rank, but "
            f"each torch.nn class takes one (BatchNorm1d: 2-D/3-D, 2d: 4-D, 3d: 5-D) and {seen}. "
            "Pass example_input=<a batch for the model> so the rank can be seen, or build the "
            "layer as BatchNorm1d/2d/3d."
        )
    return _TORCH_BY_RANK[rank]


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` (a new layer of another class) the state of ``src``: its very parameter
    and buffer objects — as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does — so that an
    optimizer built before the conversion still trains γ and β, and anything else holding the
    running statistics still sees them; its mode, frozen state and hooks."""
    from batchnorm.variants import carry_hooks, freeze_like

    tensors = [*src.parameters(recurse=False), *src.buffers(recurse=False)]
    if tensors:
        dst = dst.to(device=tensors[0].device)
    dst.load_state_dict(src.state_dict())  # checks that the two hold the same state
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, b in src.named_buffers(recurse=False):
        if name in dst._buffers:
            dst._buffers[name] = b
    dst.train(src.training)
    carry_hooks(src, dst)
    freeze_like(src, dst)  # frozen stays frozen; unfreeze still restores γ/β's gradients
    return dst


def _dtype(m: nn.Module) -> Any:
    """The dtype of a layer's state: γ's, else the running statistics' (affine=False)."""
    for name in ("weight", "running_mean"):
        t = getattr(m, name, None)
        if t is not None:
            return t.dtype
    return None


def _convert_one(
    m: nn.Module, to: str, name: str, ranks: dict[str, int], width: int
) -> nn.Module | None:
    if to == "ours" and type(m) is nn.SyncBatchNorm:
        from batchnorm.sync import _to_sync

        # as convert_sync_batchnorm converts it: its process group, the layer's name and the
        # model's message width
        return _to_sync(m, name, None, None, width)
    if to == "ours" and type(m) in _TO_OURS:
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        new: nn.Module = _TO_OURS[type(m)](
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
            dtype=_dtype(m),
            bias=m.bias is not None or not m.affine,
        )
        return _copy_state(m, new)
    if to == "torch" and isinstance(m, _BatchNormBase):
        cls = _torch_class_for(m, name, ranks.get(name))
        group: dict[str, Any] = {}
        if cls is nn.SyncBatchNorm:
            group["process_group"] = getattr(m, "process_group", None)
            if getattr(m, "timeout", None) is not None:
                warnings.warn(
                    f"convert_model: layer {name!r} ({m.layer_name()}): torch.nn.SyncBatchNorm "
                    f"has no per-layer timeout, so timeout={m.timeout} is dropped (the process "
                    "group's timeout applies: init_process_group(timeout=...))",
                    UserWarning,
                    stacklevel=3,
                )
        new = cls(
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.scale,
            track_running_stats=m.track_running_stats,
            dtype=_dtype(m),
            **group,
            **_bias_kwarg(m.scale, m.center),
        )
        return _copy_state(m, new)
    return None


def convert_model(
    model: nn.Module, to: Literal["ours", "torch"] = "ours", *, example_input: Any = None
) -> nn.Module:
    """Replace every batch-norm layer of ``model`` in place with the other implementation and
    return the model (a bare batch-norm layer is returned converted).

    ``torch.nn.SyncBatchNorm`` and our :class:`~batchnorm.SyncBatchNorm` swap too, keeping the
    process group (ours gets the layer's name and the message width that
    :func:`~batchnorm.convert_sync_batchnorm` gives; torch's has no per-layer timeout, so a
    timeout set on ours is dropped with a warning).

    Our generic :class:`~batchnorm.BatchNorm` (channel axis 1) takes any input rank, each
    ``torch.nn`` class one: converting it ``to="torch"`` needs ``example_input``, a batch the
    model is run on once (in eval mode, nothing updated) to see each such layer's input rank.

    Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> net = batchnorm.convert_model(net)
        >>> type(net[1]).__name__
        'BatchNorm1d'
    """
    if to not in ("ours", "torch"):
        raise ValueError(f"convert_model: to must be 'ours' or 'torch', got {to!r}")
    from batchnorm.variants import check_editable

    check_editable(model, "convert_model")
    for name, m in model.named_modules():
        if isinstance(
            m, nn.modules.batchnorm._NormBase | _BatchNormBase
        ) and parametrize.is_parametrized(m):
            # its class is one torch.nn.utils.parametrize generated (ParametrizedBatchNorm2d):
            # it matches no class of either side, and would be skipped or refused obscurely
            held = ", ".join(m.parametrizations.keys())  # type: ignore[union-attr, operator]
            raise ValueError(
                f"convert_model: layer {name or type(m).__name__!r} has a parametrization on "
                f"{held} (weight_norm, register_parametrization, ...), so its class is a "
                "generated subclass with no counterpart; remove it first "
                "(torch.nn.utils.parametrize.remove_parametrizations(layer, name)), convert, "
                "then register it again on the new layer (nothing was converted)"
            )
    ranks: dict[str, int] = {}  # our generic BatchNorm's input rank, by name
    if to == "torch" and example_input is not None:
        if any(type(m) is BatchNorm for m in model.modules()):
            from batchnorm.tools import _record_ranks

            ranks = _record_ranks(model, example_input, lambda m: type(m) is BatchNorm)
    # the message width of synchronized layers converted to ours, as convert_sync_batchnorm
    # gives it: the largest channel count among the model's synchronized layers
    width = max(
        (int(m.num_features) for m in model.modules() if type(m) is nn.SyncBatchNorm),  # type: ignore[arg-type]
        default=0,
    )
    top = _convert_one(model, to, "", ranks, width)
    if top is not None:
        return top
    done: dict[int, nn.Module | None] = {}  # a layer registered twice is converted once
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for name, child in list(model.named_modules(remove_duplicate=False)):
        # _modules: every entry, a layer listed twice in one container included
        for cname, c in list(child._modules.items()):
            if c is None:
                continue
            if id(c) not in done:
                full = f"{name}.{cname}" if name else cname
                done[id(c)] = _convert_one(c, to, full, ranks, width)
            new = done[id(c)]
            if new is not None:
                swaps.append((child, cname, new))
    # every layer is converted before any is put in place: an error leaves the model as it was
    for child, cname, new in swaps:
        setattr(child, cname, new)
    return model


# ---------------------------------------------------------------------------------------------
# Keras ↔ PyTorch: moving batch-norm state between conventions
#
# The two frameworks store the same four per-channel vectors under different conventions:
#
#   Keras (BatchNormalization)           PyTorch (BatchNorm*d, ours)
#   gamma, beta                          weight, bias
#   moving_mean                          running_mean
#   moving_variance: EMA of the biased   running_var: EMA of the unbiased m/(m−1)·σ²_B
#     σ²_B (Keras 3)                       (ours: either, `unbiased_running_var`)
#   momentum weighs the old average      momentum weighs the new batch: 1 − keras momentum
#   epsilon = 1e-3                       eps = 1e-5
#
# Inference uses the stored variance as is in both, so copying it keeps the converted layer's
# function; `bessel_count=m` rescales it by m/(m−1) to turn the one estimate into the other.


@dataclass(frozen=True)
class LayerConversion:
    """One converted layer: what was translated and how far the converted layer's output is
    from the source layer's on a probe batch drawn from the layer's own moving statistics."""

    source: str
    target: str
    num_features: int
    eps: tuple[float, float]  # (source, target) after the conversion
    momentum: tuple[float | None, float | None]  # each in its own framework's convention
    variance: str  # how the moving variance was translated
    max_abs_diff_eval: float  # inference mode (moving statistics)
    # training mode (batch statistics; the states are not updated); NaN where it cannot be
    # measured (a torch.nn module with eps=0, which torch refuses to run in training mode)
    max_abs_diff_train: float
    notes: tuple[str, ...] = ()  # what else the conversion did or could not keep


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`keras_to_torch` / :func:`torch_to_keras` did, layer by layer."""

    direction: str
    layers: tuple[LayerConversion, ...] = field(default_factory=tuple)

    @property
    def max_abs_diff(self) -> float:
        """The largest output difference over all layers and both modes (a mode that could
        not be measured, NaN in its layer, is left out)."""
        diffs = [d for c in self.layers for d in (c.max_abs_diff_eval, c.max_abs_diff_train)]
        return max((d for d in diffs if not math.isnan(d)), default=0.0)

    def __str__(self) -> str:
        lines = [f"{self.direction}: {len(self.layers)} batch-norm layer(s)"]
        for c in self.layers:
            lines.append(
                f"  {c.source} -> {c.target} ({c.num_features} ch): eps {c.eps[0]:g}->{c.eps[1]:g}, "
                f"momentum {_fmt(c.momentum[0])}->{_fmt(c.momentum[1])}, variance {c.variance}; "
                f"max |Δy| eval {c.max_abs_diff_eval:.2e}, train {_fmt_diff(c.max_abs_diff_train)}"
            )
            lines.extend(f"    note: {n}" for n in c.notes)
        return "\n".join(lines)


# FrozenBatchNorm holds the same state as buffers (γ, β, statistics) and has no momentum
_TorchBN = (nn.modules.batchnorm._BatchNorm, _BatchNormBase, FrozenBatchNorm)
_RANKS: dict[type[nn.Module], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
    BatchNorm1d: (2, 3),
    BatchNorm2d: (4,),
    BatchNorm3d: (5,),
    FrozenBatchNorm1d: (2, 3),
    FrozenBatchNorm2d: (4,),
    FrozenBatchNorm3d: (5,),
}


def _misplaced(obj: Any, fn: str, role: str, wanted: str, other: str | None) -> TypeError:
    """The error for an argument of ``fn`` (its ``role``, "source" or "target") that is not
    ``wanted``; ``other``: the kind it is when that is the other argument's (swapped)."""
    message = f"{fn}: the {role} must be a {wanted}, got {type(obj).__name__}."
    if other is not None:
        keras_first = fn == "keras_to_torch"
        order = "(keras_source, torch_target)" if keras_first else "(torch_source, keras_target)"
        reverse = "torch_to_keras" if keras_first else "keras_to_torch"
        message += (
            f" It is a {other}: {fn} takes {order}; swap the two arguments, or use {reverse} "
            "for the other direction."
        )
    return TypeError(message)


def _is_keras_layer(obj: Any) -> bool:
    import sys

    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.layers.Layer)


def _keras_bn_layers(obj: Any, fn: str, role: str) -> list[tuple[str, Any]]:
    import keras

    bn = keras.layers.BatchNormalization
    if isinstance(obj, bn):
        return [(obj.name, obj)]
    if not isinstance(obj, keras.layers.Layer):
        other = "torch module" if isinstance(obj, nn.Module) else None
        raise _misplaced(obj, fn, role, "Keras layer or model", other)
    # every nested layer in creation order (Sequential/Functional models, nested models and
    # layers that own sublayers)
    layers = obj._flatten_layers(include_self=False, recursive=True)
    return [(layer.name, layer) for layer in layers if isinstance(layer, bn)]


def _torch_bn_layers(obj: nn.Module, fn: str, role: str) -> list[tuple[str, Any]]:
    if not isinstance(obj, nn.Module):
        raise _misplaced(
            obj, fn, role, "torch.nn.Module", "Keras layer" if _is_keras_layer(obj) else None
        )
    if isinstance(obj, _TorchBN):
        return [(type(obj).__name__, obj)]
    return [(n, m) for n, m in obj.named_modules() if isinstance(m, _TorchBN)]


def _pairs(
    keras_layers: list[tuple[str, Any]],
    torch_layers: list[tuple[str, Any]],
    pairs: dict[str, str] | None,
    fn: str,
) -> list[tuple[str, Any, str, Any]]:
    if pairs is not None:
        kd, td = dict(keras_layers), dict(torch_layers)
        out = []
        for kn, tn in pairs.items():
            if kn not in kd:
                raise ValueError(
                    f"{fn}: no Keras BatchNormalization layer named {kn!r}; the model has "
                    f"{sorted(kd)}"
                )
            if tn not in td:
                raise ValueError(
                    f"{fn}: no torch batch-norm module named {tn!r}; the module has {sorted(td)}"
                )
            out.append((kn, kd[kn], tn, td[tn]))
        return out
    if len(keras_layers) != len(torch_layers):
        raise ValueError(
            f"{fn}: the Keras side has {len(keras_layers)} BatchNormalization layer(s) "
            f"{[n for n, _ in keras_layers]} but the torch side has {len(torch_layers)} batch-norm "
            f"module(s) {[n for n, _ in torch_layers]}; they are paired in order, so the counts "
            "must match. Pass pairs={keras_name: torch_name, ...} to choose the pairs."
        )
    if not keras_layers:
        raise ValueError(f"{fn}: no batch-norm layers found on either side")
    return [(kn, kl, tn, tm) for (kn, kl), (tn, tm) in zip(keras_layers, torch_layers)]


def _keras_rank(layer: Any) -> int | None:
    spec = getattr(layer, "input_spec", None)
    return getattr(spec, "ndim", None) if spec is not None else None


def _channel_place(axis: int, rank: int | None) -> str:
    """'first' (axis 1), 'last' (the innermost axis) or the axis itself."""
    if rank is not None:
        axis = axis % rank
        if axis == rank - 1:
            return "last" if rank > 2 else "first"  # (N, C): both
        return "first" if axis == 1 else f"axis {axis}"
    return "first" if axis == 1 else "last" if axis == -1 else f"axis {axis}"


def _check_pair(kn: str, kl: Any, tn: str, tm: Any, fn: str) -> tuple[int, int, int]:
    """Check a Keras/torch pair; return (C, Keras rank, torch rank) for the probe."""
    where = f"{fn}: Keras layer {kn!r} <-> torch module {tn!r} ({type(tm).__name__})"
    if getattr(kl, "moving_mean", None) is None:
        raise ValueError(
            f"{where}: the Keras layer is not built, so it has no weights yet. Build the model "
            "first, e.g. model.build(input_shape) or call it once on a batch."
        )
    c_k = int(kl.moving_mean.shape[0])
    if isinstance(tm, nn.modules.lazy.LazyModuleMixin) and tm.has_uninitialized_params():  # type: ignore[misc]
        raise ValueError(
            f"{where}: the torch module is lazy and has not seen an input yet, so it has no "
            "channels or state. Run the model once on a batch (it then becomes an ordinary "
            "layer), then convert."
        )
    c_t = int(tm.num_features)
    if c_k != c_t:
        raise ValueError(
            f"{where}: {c_k} channels in Keras (moving_mean shape ({c_k},)) but {c_t} in torch "
            f"(num_features={c_t}). Pair the layers explicitly with pairs={{...}} or fix the "
            "architecture."
        )
    if getattr(tm, "running_mean", None) is None:
        raise ValueError(
            f"{where}: the torch module has no running statistics (track_running_stats=False); "
            "create it with track_running_stats=True to hold Keras' moving statistics."
        )
    k_rank = _keras_rank(kl)
    # subclasses too (renorm, ghost and users' own layers of a fixed rank)
    t_ranks = next((r for cls, r in _RANKS.items() if isinstance(tm, cls)), None)
    if k_rank is not None and t_ranks is not None and k_rank not in t_ranks:
        raise ValueError(
            f"{where}: the Keras layer normalizes {k_rank}D inputs, the torch module takes "
            f"{' or '.join(f'{r}D' for r in t_ranks)} inputs. Pair it with a torch module of "
            "the same rank (BatchNorm1d: 2D/3D, BatchNorm2d: 4D, BatchNorm3d: 5D)."
        )
    t_axis = int(getattr(tm, "axis", 1))
    t_rank = t_ranks[0] if t_ranks else (k_rank or 2)
    k_place = _channel_place(int(kl.axis), k_rank)
    t_place = _channel_place(t_axis, t_rank)
    # channels-first and channels-last layouts hold the same per-channel state (NCHW <-> NHWC);
    # any other axis must be the same axis on both sides
    if {k_place, t_place} - {"first", "last"} and k_place != t_place:
        raise ValueError(
            f"{where}: the Keras layer normalizes {k_place} (axis={kl.axis}"
            f"{f' of {k_rank}D inputs' if k_rank else ''}), the torch module {t_place} "
            f"(axis={t_axis}). The channel axis must correspond: rebuild one side so both "
            "normalize the same (channel) axis."
        )
    return c_k, k_rank or t_rank, t_rank


def _probe_shape(n: int, c: int, axis: int, rank: int) -> list[int]:
    shape = [n] + [1] * (rank - 1)
    shape[axis % rank] = c
    return shape


def _torch_impl(tm: Any) -> bool:
    """Whether ``tm`` computes with torch.nn's batch norm (our BatchNorm1d/2d/3d derive from
    torch.nn's classes, but compute with ours)."""
    return isinstance(tm, nn.modules.batchnorm._BatchNorm) and not isinstance(tm, _BatchNormBase)


def _torch_trains(tm: Any) -> bool:
    """Whether the torch module can run in training mode: torch.nn's batch norm refuses ε = 0
    there (ours accepts it)."""
    return not (_torch_impl(tm) and float(tm.eps) <= 0.0)


def _max_diff(a: Any, b: Any) -> float:
    """max |a − b|, where NaN against NaN (and equal infinities) count as equal and NaN against
    a number as an infinite difference."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        d = np.where(a == b, 0.0, np.abs(a - b))
    d[np.isnan(a) & np.isnan(b)] = 0.0
    d[np.isnan(d)] = np.inf
    return float(d.max()) if d.size else 0.0


def _output_diffs(
    kl: Any, tm: Any, c: int, k_rank: int, t_rank: int, n: int, seed: int
) -> tuple[float, float]:
    """max |y_keras − y_torch| on a probe batch ~ N(moving_mean, moving_var), in inference and
    in training mode (NaN where the torch module cannot run in training mode). Nothing is
    written: the Keras layer runs through ``stateless_call``, the torch module as a copy."""
    import copy

    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    mean = np.asarray(kl.moving_mean.numpy(), dtype=np.float64)
    std = np.sqrt(np.maximum(np.asarray(kl.moving_variance.numpy(), dtype=np.float64), 0.0))
    probe = (mean + std * rng.standard_normal((n, c))).astype(np.float32)  # (n, C)
    k_shape = _probe_shape(n, c, int(kl.axis), k_rank)
    t_shape = _probe_shape(n, c, int(getattr(tm, "axis", 1)), t_rank)
    x_k = keras.ops.cast(keras.ops.convert_to_tensor(probe.reshape(k_shape)), kl.compute_dtype)
    t_dtype = tm.running_mean.dtype
    t_device = tm.running_mean.device
    x_t = torch.as_tensor(probe.reshape(t_shape), dtype=t_dtype, device=t_device)
    trainable = [v.value for v in kl.trainable_variables]
    non_trainable = [v.value for v in kl.non_trainable_variables]
    diffs = []
    for training in (False, True):
        # each side as it would train: a Keras layer with trainable=False runs in inference
        # mode even when training, a torch module frozen by batchnorm.freeze stays in eval mode
        t_train = training
        if t_train and not _torch_trains(tm):
            diffs.append(math.nan)
            continue
        with torch.no_grad():
            y, _ = kl.stateless_call(trainable, non_trainable, x_k, training=training)
            # (in float64: NumPy has no bfloat16 of torch's, and Keras' is ml_dtypes')
            y_k = np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)
            y_t = copy.deepcopy(tm).train(t_train)(x_t).detach().cpu().double().numpy()
        diffs.append(_max_diff(y_k.reshape(n, c), y_t.reshape(n, c)))
    return diffs[0], diffs[1]


def _torch_state(tm: Any) -> tuple[dict[str, Any], float, Any]:
    tensors = {
        name: t.detach().clone()
        for name in ("weight", "bias", "running_mean", "running_var")
        if (t := getattr(tm, name, None)) is not None
    }
    return tensors, tm.eps, getattr(tm, "momentum", None)


def _restore_torch_state(tm: Any, state: tuple[dict[str, Any], float, Any]) -> None:
    tensors, tm.eps, momentum = state
    if not isinstance(tm, FrozenBatchNorm):
        tm.momentum = momentum
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(tm, name).copy_(t)


def _keras_state(kl: Any) -> tuple[list[Any], float, float]:
    return [v.numpy() for v in kl.variables], kl.epsilon, kl.momentum


def _restore_keras_state(kl: Any, state: tuple[list[Any], float, float]) -> None:
    values, kl.epsilon, kl.momentum = state
    for v, value in zip(kl.variables, values):
        v.assign(value)


@dataclass(frozen=True)
class _Step:
    """One pair's translated state, computed before anything is written."""

    kn: str
    kl: Any
    tn: str
    tm: Any
    shape: tuple[int, int, int]  # (C, Keras rank, torch rank) for the probe
    gamma: Any  # the values for the target's scale/shift (None: neutral) and statistics
    beta: Any
    mean: Any
    var: Any
    eps_source: float
    eps: float  # the target's ε
    momentum: float | None  # the target's momentum
    how: str
    notes: tuple[str, ...] = ()


def _complement(momentum: float) -> float:
    """1 − momentum, rounded to 12 digits so 1 − 0.99 reads 0.01 (not 0.010000000000000009)."""
    return round(1.0 - momentum, 12)


def _fmt(v: float | None) -> str:
    return "None" if v is None else f"{v:g}"


def _fmt_diff(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2e}"


def _eps_note(tm: Any, eps_t: float) -> tuple[str, ...]:
    if _torch_impl(tm) and eps_t <= 0.0:
        return (
            "torch.nn's batch norm refuses eps=0 in training mode: the torch module runs in "
            "inference only, and the training-mode difference is not measured",
        )
    return ()


def _training_notes(kl: Any, tm: Any) -> tuple[str, ...]:
    """Why the training-mode outputs differ by design: a frozen side, or a torch variant."""
    from batchnorm.inplace_abn import InPlaceABN
    from batchnorm.variants import _Ghost, _Renorm, is_frozen

    notes: tuple[str, ...] = ()
    frozen_t = is_frozen(tm) or isinstance(tm, FrozenBatchNorm)
    if not kl.trainable and not frozen_t:
        notes += (
            "the Keras layer is frozen (trainable=False: it normalizes with its moving "
            "statistics also in training) but the torch module is not: "
            "batchnorm.freeze(module) makes it do the same",
        )
    elif frozen_t and kl.trainable:
        how = "a FrozenBatchNorm" if isinstance(tm, FrozenBatchNorm) else "batchnorm.freeze"
        notes += (
            f"the torch module is frozen ({how}) but the Keras layer is not: set "
            "layer.trainable = False to make it normalize with its moving statistics in training",
        )
    if isinstance(tm, _Ghost):
        notes += (
            f"the torch module normalizes virtual batches of {tm.virtual_batch_size} samples in "
            "training (ghost batch norm): training-mode outputs differ",
        )
    if isinstance(tm, _Renorm):
        notes += ("the torch module uses batch renormalization: training-mode outputs differ",)
    if isinstance(tm, InPlaceABN):
        notes += (
            f"the torch module applies its activation ({tm.activation}) after normalizing; "
            "the reported differences include it",
        )
    return notes


def _check_mode(name: str, value: str, fn: str) -> None:
    if value not in ("copy", "keep"):
        raise ValueError(f"{fn}: {name} must be 'copy' or 'keep', got {value!r}")


def _whole(value: Any) -> bool:
    """Whether ``value`` is a whole number (a NumPy integer too; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bessel(bessel_count: int | None, fn: str) -> None:
    if bessel_count is not None and (not _whole(bessel_count) or bessel_count < 2):
        raise ValueError(
            f"{fn}: bessel_count is m, the number of values per channel in a training batch "
            f"(batch size × spatial size), a whole number of at least 2; got {bessel_count!r}"
        )


def _check_probe(probe_size: int, fn: str) -> None:
    if not _whole(probe_size) or probe_size < 2:
        raise ValueError(
            f"{fn}: probe_size is the batch size of the probe whose outputs are compared, a "
            f"whole number of at least 2 (training mode needs 2 values per channel); got "
            f"{probe_size!r}"
        )


def _check_learned(value: Any, neutral: float, missing: bool, fn: str, message: str) -> None:
    """Refuse to drop a learned γ/β that the target layer has no place for."""
    if missing and value is not None and (value != neutral).any():
        raise ValueError(f"{fn}: {message}")


def _dtype_of(layer: Any, attr: str) -> Any:
    """The dtype of ``layer``'s variable or tensor ``attr`` (None where it has none)."""
    v = getattr(layer, attr, None)
    return None if v is None else v.dtype


def _check_fits(fn: str, values: Sequence[tuple[str, Any, Any]], source: str, target: str) -> None:
    """Refuse a finite value that the target's variable cannot hold (a running variance of 1e5
    into float16 would be stored as inf, and inference would give NaN): ``values`` holds
    ``(name, value, dtype)``, the dtype a torch dtype or a name of one (Keras')."""
    for name, value, dtype in values:
        if value is None or dtype is None:
            continue
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        src = torch.as_tensor(np.asarray(value, dtype=np.float64))
        bad = torch.isfinite(src) & ~torch.isfinite(src.to(dt))
        if bool(bad.any()):
            channels = bad.reshape(-1).nonzero().reshape(-1).tolist()
            largest = float(src.reshape(-1)[channels].abs().max())
            raise ValueError(
                f"{fn}: the {name} of {source} does not fit the "
                f"{str(dt).replace('torch.', '')} of {target} in {len(channels)} channel(s) "
                f"{channels[:8]} (|value| up to {largest:g}); "
                "convert into a layer of a wider dtype (float32), or recompute the statistics in "
                "this dtype"
            )


def _translate_eps(
    var: Any,
    eps_src: float,
    eps_dst: float,
    mode: str,
    fn: str,
    var_name: str,
    where: tuple[str, str],
) -> tuple[float, Any]:
    """The target's ε and variance: ``eps='copy'`` takes the source's ε; ``'keep'`` keeps the
    target's and shifts the variance so that √(var + ε) — the inference map — is unchanged.
    ``where`` names the source and the target layer."""
    for side, value, layer in (("source", eps_src, where[0]), ("target", eps_dst, where[1])):
        if not value >= 0.0 and (side == "source" or mode == "keep"):
            raise ValueError(
                f"{fn}: the {side}'s eps is {value!r}, in {layer}; ε must be >= 0 (it is added "
                "to the variance under the square root). Set it on that layer first, e.g. "
                "1e-3 (Keras' default) or 1e-5 (PyTorch's)."
            )
    if mode == "copy":
        return eps_src, var
    var = var + eps_src - eps_dst
    if (var < 0).any():
        raise ValueError(
            f"{fn}: eps='keep' needs {var_name} + {eps_src:g} − {eps_dst:g} ≥ 0 for {where[0]}; "
            "use eps='copy'."
        )
    return eps_dst, var


def _write_all(
    direction: str,
    steps: list[_Step],
    write: Callable[[_Step], tuple[str, str, float | None, float | None]],
    saved: list[tuple[Any, Any]],
    restore: Callable[[Any, Any], None],
    probe_size: int,
    seed: int,
) -> ConversionReport:
    """Both directions' writes, all or nothing: ``write`` sets one target layer and returns
    ``(source name, target name, source momentum, target momentum)``; each pair's outputs are
    then compared; on any failure every target is put back from ``saved`` (with ``restore``)."""
    done = []
    try:
        for st in steps:
            src, dst, m_src, m_dst = write(st)
            d_eval, d_train = _output_diffs(st.kl, st.tm, *st.shape, probe_size, seed)
            done.append(
                LayerConversion(
                    src,
                    dst,
                    st.shape[0],
                    (st.eps_source, st.eps),
                    (m_src, m_dst),
                    st.how,
                    d_eval,
                    d_train,
                    st.notes,
                )
            )
    except BaseException:
        for module, state in reversed(saved):  # the first snapshot of a layer is restored last
            restore(module, state)
        raise
    return ConversionReport(direction, tuple(done))


def keras_to_torch(
    source: Any,
    target: nn.Module,
    *,
    pairs: dict[str, str] | None = None,
    eps: Literal["copy", "keep"] = "copy",
    momentum: Literal["copy", "keep"] = "copy",
    bessel_count: int | None = None,
    probe_size: int = 64,
    seed: int = 0,
) -> ConversionReport:
    """Move batch-norm state from a Keras layer/model into a torch module (torch.nn's
    ``BatchNorm*d`` or ours), in place, translating the conventions; return a report with the
    converted layers' output differences.

    Layers are paired in order (Keras' layer order, torch's ``named_modules`` order) unless
    ``pairs={keras_name: torch_name}`` says otherwise. Per pair: γ→``weight``, β→``bias`` (1 and
    0 where Keras has none), ``moving_mean``→``running_mean``, ``moving_variance``→``running_var``.

    Args:
        source: a built ``keras.layers.BatchNormalization`` (Keras' or ours) or a model holding
            some. Works with any Keras backend (only weights are read).
        target: a torch batch-norm module or a module holding some.
        eps: ``"copy"`` sets the torch ``eps`` to Keras' ε (1e-3 by default) so outputs agree;
            ``"keep"`` keeps the torch ε and stores ``var + ε_keras − ε_torch`` instead, which
            keeps inference outputs equal (training outputs then differ slightly).
        momentum: ``"copy"`` sets ``momentum = 1 − keras_momentum`` (PyTorch's convention);
            ``"keep"`` leaves it.
        bessel_count: m, the values per channel in a training batch. Keras' moving variance
            averages the biased σ²_B; PyTorch's averages m/(m−1)·σ²_B. With m given the variance
            is scaled by m/(m−1) for targets that store the unbiased one (this changes
            inference outputs by that factor); without it the variance is copied as stored,
            which keeps the function.
        probe_size: the probe batch's size for the reported differences (at least 2).

    Every pair is checked and translated before anything is written, and if a later step
    fails the targets are restored: a conversion that raises leaves both sides as they were.
    The source is only read (the report's probe runs it through ``stateless_call``).

    A Keras layer with batch renormalization (``renorm=True``) infers with ``moving_mean`` and
    ``moving_variance``, which are copied; torch has no batch renormalization, so the training
    functions differ (the report says so). ε = 0 (legal in Keras) is copied as well; torch.nn's
    layers refuse it in training mode, so their training-mode difference is reported as NaN
    (``eps="keep"`` keeps the torch ε instead).

    Raises:
        ValueError: when the layer counts, channel counts, ranks or channel axes don't match,
            a side is not built or holds no running statistics, or ``eps="keep"`` would make a
            variance negative.

    Example::

        >>> import os; os.environ.setdefault("KERAS_BACKEND", "torch")
        'torch'
        >>> import keras, torch
        >>> from batchnorm.convert import keras_to_torch
        >>> k = keras.layers.BatchNormalization(momentum=0.9); k.build((None, 8))
        >>> t = torch.nn.BatchNorm1d(8)
        >>> report = keras_to_torch(k, t)
        >>> (t.eps, round(t.momentum, 6), report.max_abs_diff < 1e-5)
        (0.001, 0.1, True)
    """

    fn = "keras_to_torch"
    _check_mode("eps", eps, fn)
    _check_mode("momentum", momentum, fn)
    _bessel(bessel_count, fn)
    _check_probe(probe_size, fn)
    plan = _pairs(
        _keras_bn_layers(source, fn, "source"), _torch_bn_layers(target, fn, "target"), pairs, fn
    )
    checked = [_check_pair(kn, kl, tn, tm, fn) for kn, kl, tn, tm in plan]
    # every value is translated (and can fail) before anything is written
    steps = []
    for (kn, kl, tn, tm), (c, k_rank, t_rank) in zip(plan, checked):
        gamma = kl.gamma.numpy().astype("float64") if kl.scale else None
        beta = kl.beta.numpy().astype("float64") if kl.center else None
        mm = kl.moving_mean.numpy().astype("float64")
        mv = kl.moving_variance.numpy().astype("float64")
        for name, value, neutral, attr in (
            ("gamma", gamma, 1.0, "weight"),
            ("beta", beta, 0.0, "bias"),
        ):
            _check_learned(
                value,
                neutral,
                getattr(tm, attr, None) is None,
                fn,
                f"Keras layer {kn!r} has a learned {name} but torch module {tn!r} has "
                f"no {attr}; create it with affine=True.",
            )
        eps_k = float(kl.epsilon)
        eps_t, mv = _translate_eps(
            mv,
            eps_k,
            float(tm.eps),
            eps,
            fn,
            "moving_variance",
            (f"layer {kn!r}", f"module {tn!r}"),
        )
        target_unbiased = bool(getattr(tm, "unbiased_running_var", True))
        if bessel_count is not None and target_unbiased:
            mv = mv * bessel_count / (bessel_count - 1)
            how = f"x m/(m-1), m={bessel_count} (biased -> unbiased estimate)"
        elif target_unbiased:
            how = "copied as stored (Keras' biased estimate; bessel_count=m rescales)"
        else:
            how = "copied (both store the biased estimate)"
        _check_fits(
            fn,
            [
                ("gamma", gamma, _dtype_of(tm, "weight")),
                ("beta", beta, _dtype_of(tm, "bias")),
                ("moving_mean", mm, tm.running_mean.dtype),
                ("moving_variance", mv, tm.running_var.dtype),
            ],
            f"Keras layer {kn!r}",
            f"torch module {tn!r}",
        )
        # (a FrozenBatchNorm has no momentum: its statistics never change)
        mom_t = getattr(tm, "momentum", None)
        if momentum == "copy" and not isinstance(tm, FrozenBatchNorm):
            mom_t = _complement(float(kl.momentum))
        notes = _eps_note(tm, eps_t) + _training_notes(kl, tm)
        if getattr(kl, "renorm", False):
            notes += (
                "the Keras layer uses batch renormalization (renorm=True), which torch's batch "
                "norm does not: inference is the same, training-mode outputs differ",
            )
        steps.append(
            _Step(
                kn=kn,
                kl=kl,
                tn=tn,
                tm=tm,
                shape=(c, k_rank, t_rank),
                gamma=gamma,
                beta=beta,
                mean=mm,
                var=mv,
                eps_source=eps_k,
                eps=eps_t,
                momentum=mom_t,
                how=how,
                notes=notes,
            )
        )
    saved = [(tm, _torch_state(tm)) for _, _, _, tm in plan]

    def write(st: _Step) -> tuple[str, str, float | None, float | None]:
        tm = st.tm
        with torch.no_grad():
            for attr, value, neutral in (("weight", st.gamma, 1.0), ("bias", st.beta, 0.0)):
                p = getattr(tm, attr, None)
                if p is not None:
                    p.copy_(
                        torch.as_tensor(value) if value is not None else torch.full_like(p, neutral)
                    )
            tm.running_mean.copy_(torch.as_tensor(st.mean))
            tm.running_var.copy_(torch.as_tensor(st.var))
        tm.eps = st.eps
        if not isinstance(tm, FrozenBatchNorm):
            tm.momentum = st.momentum
        return st.kn, st.tn, float(st.kl.momentum), st.momentum

    return _write_all("keras -> torch", steps, write, saved, _restore_torch_state, probe_size, seed)


def torch_to_keras(
    source: nn.Module,
    target: Any,
    *,
    pairs: dict[str, str] | None = None,
    eps: Literal["copy", "keep"] = "copy",
    momentum: Literal["copy", "keep"] = "copy",
    bessel_count: int | None = None,
    probe_size: int = 64,
    seed: int = 0,
) -> ConversionReport:
    """Move batch-norm state from a torch module (torch.nn's ``BatchNorm*d`` or ours) into a
    built Keras layer/model, in place, translating the conventions; the mirror of
    :func:`keras_to_torch` (``pairs`` maps Keras names to torch names there too).

    ``eps="copy"`` sets the Keras layer's ``epsilon`` to the torch ε (it is saved with the
    model's config); ``"keep"`` stores ``var + ε_torch − ε_keras`` instead (an error where that
    is negative). ``momentum="copy"`` sets Keras' ``momentum = 1 − torch_momentum`` (a torch
    ``momentum=None``, the cumulative average, has no Keras counterpart: Keras' is kept).
    ``bessel_count=m`` scales an unbiased running variance by (m−1)/m into Keras' biased one.
    A Keras target with batch renormalization (``renorm=True``) also gets ``moving_stddev``,
    ``renorm_stddev`` = √(var + ε) and ``renorm_mean`` = the mean, the values Keras keeps
    consistent with its moving statistics. As in :func:`keras_to_torch`, nothing is written when
    the conversion fails, the source is only read, and a torch.nn source with ε = 0 (which
    torch runs in inference only) gets a NaN training-mode difference.

    Example::

        >>> import os; os.environ.setdefault("KERAS_BACKEND", "torch")
        'torch'
        >>> import keras, torch
        >>> from batchnorm.convert import torch_to_keras
        >>> t = torch.nn.BatchNorm1d(8, momentum=0.05)
        >>> k = keras.layers.BatchNormalization(); k.build((None, 8))
        >>> report = torch_to_keras(t, k)
        >>> (k.epsilon, round(k.momentum, 6), report.max_abs_diff < 1e-5)
        (1e-05, 0.95, True)
    """
    import numpy as np

    fn = "torch_to_keras"
    _check_mode("eps", eps, fn)
    _check_mode("momentum", momentum, fn)
    _bessel(bessel_count, fn)
    _check_probe(probe_size, fn)
    plan = _pairs(
        _keras_bn_layers(target, fn, "target"), _torch_bn_layers(source, fn, "source"), pairs, fn
    )
    checked = [_check_pair(kn, kl, tn, tm, fn) for kn, kl, tn, tm in plan]

    def arr(t: Any) -> Any:
        return None if t is None else t.detach().cpu().double().numpy()

    # every value is translated (and can fail) before anything is written
    steps = []
    for (kn, kl, tn, tm), shape in zip(plan, checked):
        weight, bias = arr(getattr(tm, "weight", None)), arr(getattr(tm, "bias", None))
        rm, rv = arr(tm.running_mean), arr(tm.running_var)
        for name, value, neutral, attr in (
            ("weight", weight, 1.0, "gamma"),
            ("bias", bias, 0.0, "beta"),
        ):
            _check_learned(
                value,
                neutral,
                getattr(kl, attr, None) is None,
                fn,
                f"torch module {tn!r} has a learned {name} but Keras layer {kn!r} has "
                f"no {attr}; create it with {'scale' if attr == 'gamma' else 'center'}=True.",
            )
        eps_t = float(tm.eps)
        eps_k, rv = _translate_eps(
            rv,
            eps_t,
            float(kl.epsilon),
            eps,
            fn,
            "running_var",
            (f"module {tn!r}", f"layer {kn!r}"),
        )
        source_unbiased = bool(getattr(tm, "unbiased_running_var", True))
        if bessel_count is not None and source_unbiased:
            rv = rv * (bessel_count - 1) / bessel_count
            how = f"x (m-1)/m, m={bessel_count} (unbiased -> biased estimate)"
        elif source_unbiased:
            how = "copied as stored (PyTorch's unbiased estimate; bessel_count=m rescales)"
        else:
            how = "copied (both store the biased estimate)"
        renorm_std = np.sqrt(np.maximum(rv + eps_k, 0.0)) if getattr(kl, "renorm", False) else None
        _check_fits(
            fn,
            [
                ("weight", weight, _dtype_of(kl, "gamma")),
                ("bias", bias, _dtype_of(kl, "beta")),
                ("running_mean", rm, kl.moving_mean.dtype),
                ("running_var", rv, kl.moving_variance.dtype),
                (
                    "sqrt(running_var + eps)",
                    renorm_std,
                    _dtype_of(kl, "moving_stddev"),
                ),
            ],
            f"torch module {tn!r}",
            f"Keras layer {kn!r}",
        )
        mom_k = float(kl.momentum)
        mom_t = getattr(tm, "momentum", None)  # (none for a FrozenBatchNorm: Keras' kept)
        if momentum == "copy" and mom_t is not None:
            mom_k = _complement(float(mom_t))
        notes = _eps_note(tm, eps_t) + _training_notes(kl, tm)
        if getattr(kl, "renorm", False):
            notes += (
                "the Keras layer uses batch renormalization (renorm=True): its moving_stddev, "
                "renorm_mean and renorm_stddev were set to the translated statistics "
                "(sqrt(var + eps)); inference is the same, training-mode outputs differ",
            )
        steps.append(
            _Step(
                kn=kn,
                kl=kl,
                tn=tn,
                tm=tm,
                shape=shape,
                gamma=weight,
                beta=bias,
                mean=rm,
                var=rv,
                eps_source=eps_t,
                eps=eps_k,
                momentum=mom_k,
                how=how,
                notes=notes,
            )
        )
    saved = [(kl, _keras_state(kl)) for _, kl, _, _ in plan]

    def write(st: _Step) -> tuple[str, str, float | None, float | None]:
        kl = st.kl
        for attr, value, neutral in (("gamma", st.gamma, 1.0), ("beta", st.beta, 0.0)):
            v = getattr(kl, attr, None)
            if v is not None:
                full = value if value is not None else np.full(v.shape, neutral)
                v.assign(np.asarray(full, dtype=v.dtype))
        kl.moving_mean.assign(np.asarray(st.mean, dtype=kl.moving_mean.dtype))
        kl.moving_variance.assign(np.asarray(st.var, dtype=kl.moving_variance.dtype))
        if getattr(kl, "renorm", False):
            # Keras' batch renormalization keeps √(var + ε) and derives the moving variance
            # from it at each training step; its renorm statistics start from the same values
            std = np.sqrt(np.maximum(st.var + st.eps, 0.0))
            kl.moving_stddev.assign(np.asarray(std, dtype=kl.moving_stddev.dtype))
            kl.renorm_mean.assign(np.asarray(st.mean, dtype=kl.renorm_mean.dtype))
            kl.renorm_stddev.assign(np.asarray(std, dtype=kl.renorm_stddev.dtype))
        kl.epsilon = st.eps
        kl.momentum = st.momentum
        return st.tn, st.kn, getattr(st.tm, "momentum", None), st.momentum

    return _write_all("torch -> keras", steps, write, saved, _restore_keras_state, probe_size, seed)
