"""``batchnorm.doctor``: check a model on a few batches of its data for the classic
batch-normalization bugs, and say for each finding what was measured, why it matters and the fix.

The question behind most BN bug reports is "my model is good in train mode and bad in eval
mode". In train mode a BN layer normalizes with the statistics of the batch (Ioffe & Szegedy
2015, Algorithm 1); in eval mode with its running statistics, the moving averages that stand in
for the population statistics (Algorithm 2). Everything that makes the two disagree shows up as
a gap between them, and the doctor measures that gap per layer:

* **train probe** — the model runs in train mode (as when the running statistics were
  accumulated); at each BN input the mean over batches of the batch mean μ_B and of the
  unbiased batch variance s²_B are compared with ``running_mean`` / ``running_var``:

  .. math:: \\text{mean shift}_c = \\frac{|\\bar\\mu_{B,c} - \\mu_{run,c}|}{\\sqrt{\\sigma^2_{run,c}+\\epsilon}},
            \\qquad \\text{std ratio}_c = \\sqrt{\\frac{\\bar s^2_{B,c}+\\epsilon}{\\sigma^2_{run,c}+\\epsilon}}

  A large gap means the running statistics do not describe what the layer sees: never updated,
  stale after the weights changed, poisoned, or estimated with a wrong momentum.
* **inference probe** — the same numbers with every other layer in eval mode (Dropout off) and BN
  on batch statistics: what inference really feeds the layer. A gap here and in the train probe
  means stale statistics; a gap only here is a train/eval *input* shift upstream, the classic one
  being Dropout before BN (Li et al. 2019, "Understanding the disharmony between dropout and
  batch normalization by variance shift", arXiv 1801.05134).
* **output gap** — the relative RMS difference between the model's eval-mode outputs and its
  outputs with BN on batch statistics pooled over the probed batches: the symptom itself, without
  the noise of single-batch statistics.

Every gap is judged against its own sampling noise, estimated from the batch-to-batch spread of
the statistics (see :class:`LayerGap`, :class:`OutputGap` and :class:`Thresholds`), so a healthy
model on a few batches raises no alarm.

The structural checks (Dropout / a bias / another normalization next to BN) need the dataflow
order: it comes from a ``torch.fx`` symbolic trace when the model traces, otherwise from one
forward pass run with hooks that link modules and torch operations by tensor identity; each
finding says which.

The model is never changed: every forward pass runs on a deep copy under ``torch.no_grad()`` and
a forked RNG, so the model's parameters, buffers (running statistics, ``num_batches_tracked``),
train/eval modes and the global RNG stream are the same before and after.

Measurement functions with a stable API for the lab and for users' own checks:
:func:`stat_gaps` (per-layer gap), :func:`output_gap` (train/eval output gap),
:func:`before_after` (the report before and after a fix) and :func:`doctor` itself (a
:class:`DoctorReport`).

The command line: ``batchnorm doctor MODULE:FACTORY --data inputs.pt`` (see :func:`main`); the
exit code is 1 when a finding of severity ``error`` exists, so it can gate a CI job.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from batchnorm._console import say
from batchnorm.analysis import bn_input, channel_values, check_initialized
from batchnorm.nn.batchnorm import _BatchNormBase
from batchnorm.recorder import first_tensor, measuring

__all__ = [
    "doctor",
    "DoctorReport",
    "Finding",
    "LayerGap",
    "OutputGap",
    "Thresholds",
    "stat_gaps",
    "output_gap",
    "before_after",
    "is_batchnorm",
    "add_arguments",
    "main",
]

Severity = Literal["error", "warning", "info"]
_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
Evidence = Mapping[str, float | int | str | bool | None | list[int] | list[float]]

# --------------------------------------------------------------------------------------------
# report types


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        check: a stable identifier of the check (e.g. ``"stale-running-stats"``).
        severity: ``"error"`` (eval-mode results are wrong now), ``"warning"`` (likely wrong
            or fragile), ``"info"`` (harmless but worth knowing).
        layer: the qualified module name (``model.get_submodule(layer)``), ``""`` for the model.
        measured: what was measured, with the numbers.
        why: why it matters.
        fix: what to do, usually one call of ours.
        evidence: the numbers behind ``measured``, machine-readable.
    """

    check: str
    severity: Severity
    layer: str
    measured: str
    why: str
    fix: str
    evidence: Evidence = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evidence"] = dict(self.evidence)
        return d


@dataclass(frozen=True)
class LayerGap:
    """Batch statistics of one BN layer's input against its running statistics.

    For channel c, with μ̄_c the mean over the probed batches of the batch mean and s̄²_c the mean
    of the unbiased batch variance (the quantity ``running_var`` averages in PyTorch's
    convention), ``mean_shift_c = |μ̄_c − running_mean_c| / sqrt(running_var_c + ε)`` and
    ``std_ratio_c = sqrt((s̄²_c + ε) / (running_var_c + ε))``. Channels with a constant input
    (``dead_channels``) are left out of the summaries.

    Attributes:
        layer: qualified module name. kind: the layer's class name.
        count: values per channel in one batch (N × spatial size), the smallest seen.
        batches: batches measured.
        mean_shift_max / mean_shift_median: over channels, in units of the running std.
        std_ratio_worst: the channel ratio farthest from 1 (in log scale); std_ratio_median.
        noise: the median over channels of the mean shift's sampling noise (its standard
            error, from the batch-to-batch spread of the batch means, for the probe's average
            and for the running average alike).
        mean_shift_significant / std_ratio_significant: the largest mean shift / the std ratio
            farthest from 1 among channels whose gap exceeds ``Thresholds.noise_factor`` times
            their own sampling noise (0 and 1 when none does): the numbers findings are judged
            on.
        nonfinite: a batch statistic was NaN/inf (the input carries non-finite values).
        dead_channels: channels whose input is constant (variance ≈ 0).
        has_running_stats: False for ``track_running_stats=False`` (no gap is defined).
    """

    layer: str
    kind: str
    num_features: int
    count: int
    batches: int
    mean_shift_max: float
    mean_shift_median: float
    std_ratio_worst: float
    std_ratio_median: float
    noise: float
    mean_shift_significant: float
    std_ratio_significant: float
    nonfinite: bool
    dead_channels: tuple[int, ...]
    has_running_stats: bool

    @property
    def std_log_gap(self) -> float:
        """``|log std_ratio_significant|``: 0 when batch and running std agree."""
        r = self.std_ratio_significant
        return abs(math.log(r)) if r > 0 and math.isfinite(r) else math.inf

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dead_channels"] = list(self.dead_channels)
        return d


@dataclass(frozen=True)
class OutputGap:
    """The train/eval gap of the whole model: its eval-mode outputs against its outputs with BN
    on batch statistics (every other layer in eval mode, so Dropout is off), on the same batches.

    Batch statistics of one batch are noisy (their standard error is 1/sqrt(values per
    channel)), so a perfectly calibrated model still shows a per-batch gap; the headline number
    removes that noise by pooling: the reference outputs are those of the model in eval mode
    with each BN's running statistics replaced by its batch statistics averaged over the probed
    batches (what ``batchnorm.recalibrate`` would install from this data).

    Attributes:
        relative_rms: ``‖y_eval − y_pooled‖ / ‖y_pooled‖`` over all probed outputs: ≈ 0 when the
            running statistics describe the data, the symptom's size otherwise.
        batch_relative_rms: ``‖y_eval − y_batch‖ / ‖y_batch‖`` with per-batch statistics (what
            "train mode vs eval mode" shows, including the batch noise).
        agreement: for (N, K>1) outputs, the fraction of rows whose argmax agrees between
            ``y_eval`` and ``y_pooled``; else None.
        batches: batches measured.
        noise: the sampling noise of ``relative_rms`` (half the gap between the references
            pooled over the even and over the odd batches); NaN for a single batch. The doctor
            reports a gap only above ``Thresholds.output_noise_factor`` times it.
    """

    relative_rms: float
    batch_relative_rms: float
    agreement: float | None
    batches: int
    noise: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Thresholds:
    """Where a measurement becomes a finding (defaults chosen on trained models: a healthy
    model stays well below the warning level, the bugs the doctor knows land above the error
    level). Mean shifts are in units of the running std; std ratios are symmetric in log scale
    (a ratio r and 1/r are judged alike); a channel's gap counts only above ``noise_factor``
    times its own sampling noise. The output gap is judged only on at least ``min_batches``
    batches: its sampling noise is estimated from the spread between batches."""

    mean_shift_warning: float = 0.5
    mean_shift_error: float = 2.0
    std_ratio_warning: float = 1.25
    std_ratio_error: float = 2.0
    noise_factor: float = 5.0
    output_gap_warning: float = 0.15
    output_gap_error: float = 0.5
    output_noise_factor: float = 3.0
    min_batches: int = 2
    min_count: int = 16
    keras_momentum: float = 0.5
    dead_gamma: float = 1e-5
    dead_var: float = 1e-10


@dataclass
class DoctorReport:
    """What :func:`doctor` found: ``findings`` (most severe first, then in dataflow order) and
    the measurements behind them. ``str(report)`` is the text report, :meth:`to_dict` /
    :meth:`to_json` the machine-readable one.

    Example (``model`` and ``loader`` are yours)::

        report = batchnorm.doctor(model, loader)
        print(report)
        if report.has_errors: ...
    """

    model: str
    num_batches: int
    batch_size: int
    order: str
    layers: list[str]
    findings: list[Finding]
    train_gaps: dict[str, LayerGap]
    inference_gaps: dict[str, LayerGap]
    output_gap: OutputGap | None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def by_check(self, check: str) -> list[Finding]:
        """The findings of one check (e.g. ``"dropout-before-bn"``)."""
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_batches": self.num_batches,
            "batch_size": self.batch_size,
            "order": self.order,
            "layers": list(self.layers),
            "summary": {s: sum(f.severity == s for f in self.findings) for s in _SEVERITY_RANK},
            "findings": [f.to_dict() for f in self.findings],
            "train_gaps": {k: v.to_dict() for k, v in self.train_gaps.items()},
            "inference_gaps": {k: v.to_dict() for k, v in self.inference_gaps.items()},
            "output_gap": None if self.output_gap is None else self.output_gap.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=indent, ensure_ascii=False)

    def summary(self) -> dict[str, Any]:
        """A compact, JSON-safe digest for experiment summaries: the findings as
        ``{check, severity, layer}``, the output gap and, per layer, the inference-time
        (Dropout off) std ratio median and largest mean shift against the running statistics."""
        og = self.output_gap
        return _json_safe(
            {
                "findings": [
                    {"check": f.check, "severity": f.severity, "layer": f.layer}
                    for f in self.findings
                ],
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "output_gap": None if og is None else og.relative_rms,
                "output_gap_noise": None if og is None else og.noise,
                "argmax_agreement": None if og is None else og.agreement,
                "std_ratio_median": {k: g.std_ratio_median for k, g in self.inference_gaps.items()},
                "mean_shift_max": {k: g.mean_shift_max for k, g in self.inference_gaps.items()},
            }
        )

    def format_text(self, width: int = 100) -> str:
        lines = [
            f"batchnorm doctor: {self.model} — {len(self.layers)} BN layer(s), "
            f"{self.num_batches} batch(es) of {self.batch_size}, dataflow order from {self.order}"
        ]
        if self.output_gap is not None:
            og = self.output_gap
            agree = "" if og.agreement is None else f", argmax agreement {og.agreement:.1%}"
            lines.append(
                f"train/eval output gap: {og.relative_rms:.3f} relative RMS between eval mode and "
                f"BN on batch statistics pooled over the batches ({og.batch_relative_rms:.3f} "
                f"with per-batch statistics{agree})"
            )
        for f in self.findings:
            where = f.layer or "(model)"
            lines.append("")
            lines.append(f"{f.severity.upper():8s}{f.check}  [{where}]")
            for label, text in (("measured", f.measured), ("why", f.why), ("fix", f.fix)):
                lines.extend(_wrap(f"{label}: {text}", width, "  ", "    "))
        counts = {s: sum(f.severity == s for f in self.findings) for s in _SEVERITY_RANK}
        lines.append("")
        lines.append(
            f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
            if self.findings
            else "no findings"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_text()


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    import textwrap

    return textwrap.wrap(
        text, width=width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    ) or [first]


def _json_safe(x: Any) -> Any:
    # JSON has no NaN/inf: write them as strings so the output stays valid JSON
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# model helpers


def _frozen_tools() -> tuple[type[nn.Module] | None, Callable[[nn.Module], bool] | None]:
    # imported lazily: the variants are optional for the doctor
    try:
        from batchnorm.variants import FrozenBatchNorm, is_frozen
    except ImportError:  # pragma: no cover — a build without the variants
        return None, None
    return FrozenBatchNorm, is_frozen


def is_batchnorm(m: nn.Module) -> bool:
    """A torch.nn batch-norm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy ones), one
    of ours (:class:`batchnorm.BatchNorm` and every variant built on its base) or a
    ``FrozenBatchNorm``."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm | _BatchNormBase):
        return True
    frozen_cls, _ = _frozen_tools()
    return frozen_cls is not None and isinstance(m, frozen_cls)


def _always_running(m: nn.Module) -> bool:
    """The layer normalizes with its running statistics even in train mode: a
    ``FrozenBatchNorm`` or a layer frozen by ``batchnorm.freeze``."""
    frozen_cls, is_frozen = _frozen_tools()
    if frozen_cls is not None and isinstance(m, frozen_cls):
        return True
    return bool(is_frozen is not None and is_frozen(m))


def _bn_axis(m: nn.Module) -> int:
    """The channel axis: ``axis`` of our layers (``FrozenBatchNorm`` included), 1 for torch.nn's
    (whose subclasses may use the name ``axis`` for something else)."""
    frozen_cls, _ = _frozen_tools()
    ours = isinstance(m, _BatchNormBase) or (frozen_cls is not None and isinstance(m, frozen_cls))
    return int(getattr(m, "axis", 1)) if ours else 1


def _stores_biased(m: nn.Module) -> bool:
    return isinstance(m, _BatchNormBase) and not m.unbiased_running_var


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]


def _has_running(m: nn.Module) -> bool:
    return (
        getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None
    )


_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_OTHER_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
_TRANSPARENT_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)
_TRANSPARENT_METHODS = {
    "view",
    "reshape",
    "flatten",
    "contiguous",
    "unflatten",
    "squeeze",
    "unsqueeze",
}
_TRANSPARENT_FUNCTIONS = {"flatten", "reshape", "squeeze", "unsqueeze"}
_DROPOUT_FUNCTIONS = {
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
}


# --------------------------------------------------------------------------------------------
# data


# keys under which a dict batch (a Dataset returning dicts) holds the model input, in order;
# batchnorm.recalibrate takes the same batches
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")
#: the entries ``batchnorm doctor --data`` takes without ``--key`` from an ``.npz`` file or a
#: dict saved in a ``.pt`` file: the input keys the Python API knows, and two usual names
DATA_KEYS = (*INPUT_KEYS, "X", "data")


def _as_input(batch: Any, what: str = "doctor") -> Any:
    """The model input of one batch: a tensor as is; (inputs, targets, ...) -> inputs."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise TypeError(
            f"{what}: a batch is a dict with keys {sorted(map(str, batch))}, none of which is a "
            f"known input key {INPUT_KEYS}; pass the inputs yourself, e.g. "
            "(batch['my_input'] for batch in loader), or ((batch,) for batch in loader) for a "
            "model that takes the whole dict"
        )
    raise TypeError(
        f"{what}: cannot find the model input in a batch of type {type(batch).__name__}; pass "
        "tensors, (inputs, targets) tuples, or dicts with an 'inputs'/'x' key; for a model "
        "that takes such a batch whole, wrap each in a tuple: ((batch,) for batch in loader)"
    )


def _on_device(batches: list[Any], model: nn.Module) -> list[Any]:
    """Tensor batches moved to the model's device (a CPU loader for a GPU model just works)."""
    p: Tensor | None = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    if p is None:
        return batches
    return [
        b.to(p.device) if isinstance(b, Tensor) and b.device != p.device else b for b in batches
    ]


def _take_batches(data: Any, num_batches: int, batch_size: int, what: str = "doctor") -> list[Any]:
    """Up to ``num_batches`` model inputs from ``data``; errors are named after ``what``, the
    function the user called."""
    if num_batches < 1:
        raise ValueError(f"{what}: num_batches must be >= 1, got {num_batches}")
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(
                f"{what}: data must be a batch of inputs, got shape {tuple(data.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"{what}: batch_size must be >= 1, got {batch_size}")
        chunks = list(torch.split(data, batch_size))
        if len(chunks) > 1 and chunks[-1].shape[0] < batch_size:
            chunks = chunks[:-1]  # a short remainder is not a batch of the user's size
        return chunks[:num_batches]
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(
            f"{what}: data must be a tensor of inputs or an iterable of batches (e.g. a "
            f"DataLoader), got {type(data).__name__}"
        ) from None
    out: list[Any] = []
    exhausted = True
    for batch in it:
        if len(out) >= num_batches:
            exhausted = False
            break
        out.append(_as_input(batch, what))
    if not out:
        raise ValueError(f"{what}: data yielded no batches")
    if exhausted and len(out) > 1 and _batch_len(out[-1]) < min(_batch_len(b) for b in out[:-1]):
        out.pop()  # a DataLoader's short last batch, as for tensor data: not the user's size
    return out


def _batch_len(x: Any) -> int:
    t = first_tensor(x)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 1


def _call(model: nn.Module, x: Any) -> Any:
    return model(x)


# --------------------------------------------------------------------------------------------
# statistics probes


class _Accumulator:
    """Per-channel sums over batches of the batch mean and unbiased batch variance (float64)."""

    def __init__(self) -> None:
        self.mean_sum: Tensor | None = None
        self.var_sum: Tensor | None = None
        self.mean_sq: Tensor | None = None  # sums of squares: the batch-to-batch spread
        self.var_sq: Tensor | None = None
        self.batches = 0
        self.count = 0
        self.per_sample = 0.0
        self.ndim = 0
        self.nonfinite = False

    def add(self, x: Tensor, axis: int, mask: Tensor | None = None) -> None:
        # (C, values per channel): the valid positions only for a layer called with a mask
        flat = channel_values(x, axis, mask)
        count = flat.shape[1]
        mean = flat.mean(dim=1)
        var = flat.var(dim=1, unbiased=True) if count > 1 else torch.full_like(mean, math.nan)
        # one value per channel has no variance (NaN here): not a non-finite input (a frozen
        # layer normalizes a batch of 1 with its running statistics)
        if not (torch.isfinite(mean).all() and (count < 2 or torch.isfinite(var).all())):
            self.nonfinite = True
        self.mean_sum = mean if self.mean_sum is None else self.mean_sum + mean
        self.var_sum = var if self.var_sum is None else self.var_sum + var
        self.mean_sq = mean**2 if self.mean_sq is None else self.mean_sq + mean**2
        self.var_sq = var**2 if self.var_sq is None else self.var_sq + var**2
        self.count = count if self.batches == 0 else min(self.count, count)
        n = max(int(x.shape[0]), 1) if x.dim() > 0 else 1
        self.per_sample = count / n
        self.ndim = x.dim()
        self.batches += 1

    def variance(self) -> Tensor | None:
        """The mean of the unbiased batch variances; with one value per channel in a batch
        (which has no variance: a frozen layer fed single samples), the unbiased variance of
        those values across the batches; None with fewer than 2 such batches."""
        if self.var_sum is None or self.mean_sum is None or self.mean_sq is None:
            return None
        b = self.batches
        if self.count >= 2:
            return self.var_sum / b
        if b < 2:
            return None
        return (self.mean_sq / b - (self.mean_sum / b) ** 2).clamp_min(0) * b / (b - 1)


def _probe_copy(model: nn.Module) -> nn.Module:
    from batchnorm.variants import check_not_scripted

    check_not_scripted(model, "doctor")
    check_initialized(model, "doctor")
    try:
        probe = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 — any failure means we cannot probe safely
        raise TypeError(
            f"doctor: the model ({type(model).__name__}) cannot be deep-copied ({e}); the doctor "
            "probes a copy so the model itself is never changed. Pass a copyable model (e.g. "
            "rebuild it and load_state_dict) or remove non-copyable attributes."
        ) from e
    _unsynchronized(probe)
    return probe


class _LocalTorchSyncBatchNorm(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm computing plain BN on the local batch (the base class's forward)."""

    forward = nn.modules.batchnorm._BatchNorm.forward


def _unsynchronized(probe: nn.Module) -> None:
    """Make the synchronized BN layers of a probe copy normalize with the local batch: the
    doctor runs on one process (often rank 0 alone), where a synchronized layer in train mode
    would wait for the other ranks until the process group's timeout."""
    from batchnorm.sync import SyncBatchNorm

    for m in probe.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = _LocalTorchSyncBatchNorm
        elif isinstance(m, SyncBatchNorm):
            m._local_only = True


def _set_modes(model: nn.Module, how: Literal["train", "eval", "inference"]) -> None:
    """``train``: as in training (a model already in train mode keeps its per-layer modes, so a
    deliberately frozen BN stays frozen); ``eval``; ``inference``: every layer in eval mode
    (Dropout off) except the BN layers, which normalize with batch statistics."""
    if how == "train":
        if not model.training:
            model.train()
    else:
        model.eval()
        if how == "inference":
            for _, m in _bn_layers(model):
                m.train()


def _run(
    model: nn.Module,
    batches: Sequence[Any],
    bn_names: Sequence[str],
    hooks_on: bool,
    outputs: list[Tensor | None] | None = None,
    halves: tuple[dict[str, _Accumulator], dict[str, _Accumulator]] | None = None,
    sites: dict[str, list[_Accumulator]] | None = None,
) -> tuple[dict[str, _Accumulator], BaseException | None]:
    """Forward every batch; with ``hooks_on``, accumulate each BN input's statistics (and, with
    ``halves``, also into the accumulators of the even and the odd batches; with ``sites``, into
    one accumulator per call of the layer within a forward pass: the k-th call of a layer used
    several times per forward goes to ``sites[name][k]``)."""
    accs = {n: _Accumulator() for n in bn_names}
    if halves is not None:
        for half in halves:
            half.update({n: _Accumulator() for n in bn_names})
    if sites is not None:
        sites.update({n: [] for n in bn_names})
    calls: dict[str, int] = {}
    index = [0]
    handles = []
    if hooks_on:
        for name in bn_names:
            m = model.get_submodule(name)
            axis = _bn_axis(m)

            def pre(
                _m: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                name: str = name,
                axis: int = axis,
            ) -> None:
                # by position or by keyword (bn(input=h)), with its padding mask if any
                x, mask = bn_input(args, kwargs)
                if x is not None:
                    accs[name].add(x, axis, mask)
                    if halves is not None:
                        halves[index[0] % 2][name].add(x, axis, mask)
                    if sites is not None:
                        k = calls.get(name, 0)
                        calls[name] = k + 1
                        if k == len(sites[name]):
                            sites[name].append(_Accumulator())
                        sites[name][k].add(x, axis, mask)

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    err: BaseException | None = None
    try:
        with torch.no_grad(), measuring(), warnings.catch_warnings():
            # our layers warn about non-finite batches; the doctor reports them as findings
            warnings.simplefilter("ignore")
            for i, x in enumerate(batches):
                index[0] = i
                calls.clear()
                y = _call(model, x)
                if outputs is not None:
                    t = first_tensor(y)
                    outputs.append(None if t is None else t.detach().to(torch.float64))
    except Exception as e:  # noqa: BLE001 — whatever the model raises is a finding
        # (an IndexError, the AssertionError of an `assert x.shape[1] == ...`, a KeyError)
        err = e
    finally:
        for h in handles:
            h.remove()
    return accs, err


def _training_count(
    m: nn.Module, acc: _Accumulator, train_batch_size: int | None
) -> tuple[int, bool, int | None]:
    """Values per channel in one training batch's statistics: the probe's, or scaled to
    ``train_batch_size``, and at most one virtual batch's for a ghost layer. Returns the count,
    whether it was scaled, and the virtual batch size (None for other layers)."""
    count = acc.count
    scaled = train_batch_size is not None
    if train_batch_size is not None:
        count = int(round(acc.per_sample * train_batch_size))
    # GhostBatchNorm normalizes each virtual batch with its own statistics (and updates its
    # running statistics once per virtual batch)
    vbs = getattr(m, "virtual_batch_size", None)
    if not (isinstance(vbs, int) and vbs >= 1 and isinstance(m, _BatchNormBase)):
        return count, scaled, None
    return min(count, int(round(acc.per_sample * vbs))), scaled, vbs


def _gap_from(
    name: str,
    m: nn.Module,
    acc: _Accumulator,
    running: tuple[Tensor, Tensor] | None,
    t: Thresholds,
    train_batch_size: int | None = None,
) -> LayerGap | None:
    if acc.batches == 0 or acc.mean_sum is None or acc.var_sum is None:
        return None
    nf = int(getattr(m, "num_features", acc.mean_sum.numel()))
    mean = acc.mean_sum / acc.batches
    pooled = acc.variance()
    var = acc.var_sum / acc.batches if pooled is None else pooled
    if _stores_biased(m) and acc.count > 1:
        var = var * (acc.count - 1) / acc.count  # compare like with like: Keras' biased σ²
    eps = float(getattr(m, "eps", 1e-5))
    scale = var.abs().nan_to_num(0.0).median().item() if var.numel() else 0.0
    dead_mask = var <= t.dead_var * max(1.0, scale)
    dead = tuple(int(i) for i in torch.nonzero(dead_mask).flatten().tolist())
    base = dict(
        layer=name,
        kind=type(m).__name__,
        num_features=nf,
        count=acc.count,
        batches=acc.batches,
        nonfinite=acc.nonfinite,
        dead_channels=dead,
    )
    if running is None:
        return LayerGap(
            mean_shift_max=math.nan,
            mean_shift_median=math.nan,
            std_ratio_worst=math.nan,
            std_ratio_median=math.nan,
            noise=math.nan,
            mean_shift_significant=0.0,
            std_ratio_significant=1.0,
            has_running_stats=False,
            **base,  # type: ignore[arg-type]
        )
    rm, rv = (r.detach().to(torch.float64).reshape(-1) for r in running)
    keep = ~dead_mask
    if not bool(keep.any()):
        keep = torch.ones_like(dead_mask)
    denom = (rv + eps).clamp_min(0).sqrt()
    shift = ((mean - rm).abs() / denom)[keep]
    ratio = ((var.clamp_min(0) + eps) / (rv + eps).clamp_min(1e-300)).sqrt()[keep]
    logr = ratio.log().abs()
    finite = bool(torch.isfinite(logr).all())
    worst = ratio[logr.argmax()].item() if finite else math.nan
    # sampling noise per channel, from the batch-to-batch spread (heavy tails and spatial
    # correlation included), for the probe's average of B batches and for the running average
    # itself (an EMA with momentum m has variance m/(2−m) of one batch's); the Gaussian
    # formulas are a floor, since a spread measured on a few batches is often far too small
    b = acc.batches
    assert acc.mean_sq is not None and acc.var_sq is not None
    sd_mean = (var.clamp_min(0) / max(acc.count, 1)).sqrt()
    sd_var = var.clamp_min(0) * math.sqrt(2.0 / max(acc.count - 1, 1))
    if b >= 2:
        spread_mean = ((acc.mean_sq / b - mean**2).clamp_min(0) * b / (b - 1)).sqrt()
        raw_var = acc.var_sum / b
        spread_var = ((acc.var_sq / b - raw_var**2).clamp_min(0) * b / (b - 1)).sqrt()
        sd_mean = torch.maximum(sd_mean, spread_mean)
        sd_var = torch.fmax(sd_var, spread_var)  # no spread with one value per batch (NaN)
    mom = getattr(m, "momentum", None)
    ema = mom / (2.0 - mom) if isinstance(mom, float | int) and 0 < mom < 2 else 0.0
    # the running average's batches are the training batches: a ghost layer's virtual batches,
    # or train_batch_size's, whose statistics are noisier than the probe's in proportion
    train_count = _training_count(m, acc, train_batch_size)[0]
    ema *= max(acc.count, 1) / max(train_count, 1)
    factor = math.sqrt(1.0 / b + ema)
    noise_mean = (sd_mean * factor / denom)[keep]
    noise_logstd = (0.5 * sd_var / (var.clamp_min(0) + eps) * factor)[keep]
    sig_mean = shift > t.noise_factor * noise_mean
    sig_std = logr > t.noise_factor * noise_logstd
    return LayerGap(
        mean_shift_max=shift.max().item(),
        mean_shift_median=shift.median().item(),
        std_ratio_worst=worst,
        std_ratio_median=ratio.median().item(),
        noise=noise_mean.median().item(),
        mean_shift_significant=shift[sig_mean].max().item() if bool(sig_mean.any()) else 0.0,
        std_ratio_significant=(
            ratio[sig_std][logr[sig_std].argmax()].item() if bool(sig_std.any()) else 1.0
        ),
        has_running_stats=True,
        **base,  # type: ignore[arg-type]
    )


def _never_updated(m: nn.Module) -> bool:
    """Running statistics at their initial values (mean 0, variance 1) with a zero counter."""
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    nbt = getattr(m, "num_batches_tracked", None)
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        return False
    counted = isinstance(nbt, Tensor) and int(nbt.item()) != 0
    return not counted and bool((rm == 0).all() and (rv == 1).all())


def _updates(m: nn.Module) -> bool:
    """The layer updates its running statistics when the model trains: in train mode and not
    frozen."""
    return m.training and not _always_running(m)


def _bad_running(m: nn.Module) -> tuple[list[int], list[int]] | None:
    """The channels with a non-finite running mean/var and those with a negative running var,
    or None when there are none."""
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        return None
    rm, rv = rm.detach().reshape(-1), rv.detach().reshape(-1)
    nonfinite = ~(torch.isfinite(rm) & torch.isfinite(rv))
    negative = (rv < 0) & ~nonfinite
    if not bool(nonfinite.any() or negative.any()):
        return None
    return (
        [int(i) for i in torch.nonzero(nonfinite).flatten()],
        [int(i) for i in torch.nonzero(negative).flatten()],
    )


def _channels_text(channels: Sequence[int], limit: int = 16) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return f"[{shown}{', …' if len(channels) > limit else ''}]"


def _running(m: nn.Module) -> tuple[Tensor, Tensor] | None:
    if not _has_running(m):
        return None
    rm, rv = m.running_mean, m.running_var
    assert isinstance(rm, Tensor) and isinstance(rv, Tensor)
    return (rm.detach().clone(), rv.detach().clone())


def stat_gaps(
    model: nn.Module,
    data: Any,
    num_batches: int = 8,
    *,
    mode: Literal["train", "inference"] = "train",
    batch_size: int = 64,
    thresholds: Thresholds | None = None,
) -> dict[str, LayerGap]:
    """Per BN layer, the gap between the batch statistics of its input and its running
    statistics (see :class:`LayerGap` for the formulas), measured on up to ``num_batches``
    batches of ``data``. The model is not changed.

    ``mode="train"`` runs the model as in training: what the running statistics estimate, so a
    gap means they are wrong. ``mode="inference"`` runs every other layer in eval mode (Dropout
    off) with BN on batch statistics: what inference feeds the layer, so a gap here but not in
    train mode is a train/eval shift upstream (Dropout's variance shift).

    Args:
        model: any ``nn.Module`` holding torch.nn or batchnorm BN layers.
        data: a tensor of inputs (split into ``batch_size`` rows) or an iterable of batches
            (tensors, ``(inputs, targets)`` tuples or dicts with an ``inputs``/``x`` key).
        num_batches: batches to average over. mode: ``"train"`` or ``"inference"``.

    Returns:
        ``{qualified layer name: LayerGap}`` in module order; layers the data never reached are
        absent.

    Raises:
        RuntimeError: the model fails on the data in that mode.

    Example (``model`` and ``loader`` are yours)::

        gaps = batchnorm.stat_gaps(model, loader)
        max(g.mean_shift_max for g in gaps.values())   # ≈ 0 after recalibration
    """
    if mode not in ("train", "inference"):
        raise ValueError(f"stat_gaps: mode must be 'train' or 'inference', got {mode!r}")
    t = thresholds or Thresholds()
    batches = _on_device(_take_batches(data, num_batches, batch_size, "stat_gaps"), model)
    layers = _bn_layers(model)
    probe = _probe_copy(model)
    _set_modes(probe, mode)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # reproducible Dropout masks; the caller's RNG is restored
        accs, err = _run(probe, batches, [n for n, _ in layers], True)
    if err is not None:
        raise RuntimeError(f"stat_gaps: the model failed in {mode} mode: {err}") from err
    out: dict[str, LayerGap] = {}
    for name, m in layers:
        g = _gap_from(name, m, accs[name], _running(m), t)
        if g is not None:
            out[name] = g
    return out


def output_gap(
    model: nn.Module, data: Any, num_batches: int = 8, *, batch_size: int = 64
) -> OutputGap:
    """The train/eval gap of the whole model: its eval-mode outputs against its outputs with BN
    on batch statistics (every other layer in eval mode, so Dropout is off), on the same
    batches. See :class:`OutputGap`; the model is not changed; ``data`` as in
    :func:`stat_gaps`.

    Raises:
        RuntimeError: the model fails on the data.

    Example (``model`` and ``loader`` are yours)::

        batchnorm.output_gap(model, loader).relative_rms   # ≈ 0 for healthy statistics
    """
    batches = _on_device(_take_batches(data, num_batches, batch_size, "output_gap"), model)
    names = [n for n, _ in _bn_layers(model)]
    pr = _probes(model, batches, names)
    if pr.err is not None or pr.output is None:
        raise RuntimeError(f"output_gap: the model failed on the data: {pr.err}") from pr.err
    return pr.output


def _load_pooled(model: nn.Module, accs: Mapping[str, _Accumulator]) -> None:
    """Set each BN layer's running statistics to the pooled batch statistics of ``accs``; a
    frozen layer keeps its own, with which it normalizes in training too."""
    for name, m in _bn_layers(model):
        acc = accs.get(name)
        if acc is None or not acc.batches or acc.nonfinite or not _has_running(m):
            continue
        if _always_running(m):
            continue
        var = acc.variance()
        if var is None:
            continue
        assert acc.mean_sum is not None
        mean = acc.mean_sum / acc.batches
        if _stores_biased(m) and acc.count > 1:
            var = var * (acc.count - 1) / acc.count
        rm, rv = m.running_mean, m.running_var
        assert isinstance(rm, Tensor) and isinstance(rv, Tensor)
        rm.copy_(mean.reshape(rm.shape))
        rv.copy_(var.reshape(rv.shape))


def _rel_gap(ys: Sequence[Tensor | None], refs: Sequence[Tensor | None]) -> float:
    num = den = 0.0
    for a, b in zip(ys, refs):
        if a is None or b is None or a.shape != b.shape:
            continue
        # where the reference itself is not finite (NaN in the data: a finding of its own),
        # there is nothing to compare; a non-finite output against a finite reference is a gap
        ok = torch.isfinite(b)
        if not bool(ok.all()):
            a, b = a[ok], b[ok]
        num += float(((a - b) ** 2).nan_to_num(math.inf).sum())
        den += float((b**2).sum())
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return math.inf if math.isnan(rel) else rel


def _agreement(ys: Sequence[Tensor | None], refs: Sequence[Tensor | None]) -> float | None:
    agree = total = 0
    for a, b in zip(ys, refs):
        if a is None or b is None or a.shape != b.shape or a.dim() != 2 or a.shape[1] < 2:
            continue
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += a.shape[0]
    return agree / total if total else None


def _eval_with_stats(
    model: nn.Module, batches: Sequence[Any], accs: Mapping[str, _Accumulator]
) -> tuple[list[Tensor | None], BaseException | None]:
    """Eval-mode outputs of a copy whose running statistics are the pooled ``accs``."""
    ref = _probe_copy(model)
    with torch.no_grad():
        _load_pooled(ref, accs)
    _set_modes(ref, "eval")
    ys: list[Tensor | None] = []
    _, err = _run(ref, batches, [], False, ys)
    return ys, err


@dataclass
class _Probes:
    train: dict[str, _Accumulator]
    train_err: BaseException | None
    train_sites: dict[str, list[_Accumulator]]  # per call within a forward pass
    inference: dict[str, _Accumulator]
    output: OutputGap | None
    err: BaseException | None  # the model failed in eval/inference mode


def _probes(model: nn.Module, batches: Sequence[Any], names: Sequence[str]) -> _Probes:
    """Train-mode statistics, inference-mode statistics and the output gap, each on a copy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # reproducible Dropout masks; the caller's RNG is restored
        probe = _probe_copy(model)
        _set_modes(probe, "train")
        train_sites: dict[str, list[_Accumulator]] = {}
        train_accs, train_err = _run(probe, batches, names, True, sites=train_sites)
        probe = _probe_copy(model)
        _set_modes(probe, "inference")
        yb: list[Tensor | None] = []
        halves: tuple[dict[str, _Accumulator], dict[str, _Accumulator]] = ({}, {})
        inf_accs, inf_err = _run(probe, batches, names, True, yb, halves)
        probe = _probe_copy(model)
        _set_modes(probe, "eval")
        ye: list[Tensor | None] = []
        _, eval_err = _run(probe, batches, [], False, ye)
        err = eval_err or inf_err
        og: OutputGap | None = None
        if err is None:
            yr, err = _eval_with_stats(model, batches, inf_accs)
            noise = math.nan
            if err is None and len(batches) >= 2:
                # the reference's own sampling noise: references from the even and the odd
                # batches differ by about twice the noise of the one from all batches
                y0, e0 = _eval_with_stats(model, batches, halves[0])
                y1, e1 = _eval_with_stats(model, batches, halves[1])
                if e0 is None and e1 is None:
                    noise = _rel_gap(y0, y1) / 2
            if err is None:
                og = OutputGap(
                    relative_rms=_rel_gap(ye, yr),
                    batch_relative_rms=_rel_gap(ye, yb),
                    agreement=_agreement(ye, yr),
                    batches=len(ye),
                    noise=noise,
                )
    return _Probes(train_accs, train_err, train_sites, inf_accs, og, err)


# --------------------------------------------------------------------------------------------
# dataflow


@dataclass
class _Node:
    name: str  # qualified module name, or a function/method name
    kind: Literal["module", "function", "method", "input", "other"]
    module: nn.Module | None
    inputs: list[int]
    p: float | None = None  # dropout probability for functional dropout


@dataclass
class _Graph:
    nodes: list[_Node]
    how: str

    def consumers(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in range(len(self.nodes))}
        for i, n in enumerate(self.nodes):
            for j in n.inputs:
                out[j].append(i)
        return out

    def index_of(self, module_name: str) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.kind == "module" and n.name == module_name]


class _Tracer(torch.fx.Tracer):
    """Keeps every BN layer (ours trace into Python otherwise) and torch.nn layer a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def _fx_graph(model: nn.Module) -> _Graph:
    tracer = _Tracer()
    graph = tracer.trace(model)
    index: dict[Any, int] = {}
    nodes: list[_Node] = []
    for node in graph.nodes:
        if node.op == "output":
            continue
        ins = [index[a] for a in node.all_input_nodes if a in index]
        if node.op == "placeholder":
            n = _Node(str(node.target), "input", None, ins)
        elif node.op == "call_module":
            sub = model.get_submodule(str(node.target))
            if is_batchnorm(sub):
                # the data it normalizes, not its padding mask (a second input it only reads)
                kw = node.kwargs
                x = node.args[0] if node.args else kw.get("input", kw.get("x"))
                ins = [index[x]] if x in index else ins
            n = _Node(str(node.target), "module", sub, ins)
        elif node.op == "call_function":
            fname = getattr(node.target, "__name__", str(node.target))
            p = None
            if fname in _DROPOUT_FUNCTIONS:
                p_arg = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
                p = (
                    float(p_arg)
                    if isinstance(p_arg, int | float) and training is not False
                    else 0.0
                )
            n = _Node(fname, "function", None, ins, p)
        elif node.op == "call_method":
            n = _Node(str(node.target), "method", None, ins)
        else:
            n = _Node(str(node.target), "other", None, ins)
        index[node] = len(nodes)
        nodes.append(n)
    return _Graph(nodes, "the torch.fx graph")


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _hook_graph(model: nn.Module, batch: Any, reason: str) -> _Graph:
    """The dataflow of one forward pass run for real, for models torch.fx cannot trace: forward
    hooks record every leaf-module call and a torch-function mode every torch operation between
    them, each linked to the calls that produced its input tensors (by tensor identity)."""
    nodes = [_Node("input", "input", None, [])]
    owner: dict[int, int] = {}  # id(tensor) -> index of the node that produced it
    alive: list[Tensor] = []  # keeps those tensors alive so that their ids stay unique
    inside = [0]  # > 0 while a hooked module runs: its own operations are not recorded

    def produced(out: Any, index: int) -> None:
        for t in _tensors(out):
            owner[id(t)] = index
            alive.append(t)

    def sources(*objs: Any) -> list[int]:
        return sorted({owner[id(t)] for o in objs for t in _tensors(o) if id(t) in owner})

    class _Provenance(TorchFunctionMode):
        def __torch_function__(
            self,
            func: Callable[..., Any],
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if inside[0] == 0 and _tensors(out):
                srcs = sources(args, kwargs)
                if srcs:
                    name = getattr(func, "__name__", str(func))
                    p = None
                    if name in _DROPOUT_FUNCTIONS:
                        p_arg = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                        on = kwargs.get("training", args[2] if len(args) > 2 else True)
                        p = float(p_arg) if isinstance(p_arg, int | float) and on else 0.0
                    kind: Literal["method", "function"] = (
                        "method" if name in _TRANSPARENT_METHODS else "function"
                    )
                    nodes.append(_Node(name, kind, None, srcs, p))
                    produced(out, len(nodes) - 1)
            return out

    def model_input(_m: nn.Module, args: tuple[Any, ...]) -> None:
        produced(args, 0)

    def post(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        inside[0] -= 1
        produced(out, len(nodes) - 1)  # hooked modules are leaves: the last node is this call

    def forward(mode: Literal["train", "eval"]) -> None:
        nodes[1:] = []
        owner.clear()
        alive.clear()
        inside[0] = 0
        probe = _probe_copy(model)
        probe.train(mode == "train")
        handles = [probe.register_forward_pre_hook(model_input)]
        for name, m in probe.named_modules():
            if name and (is_batchnorm(m) or not list(m.children())):

                def pre(
                    _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
                ) -> None:
                    srcs = sources(args, kwargs)  # a module called by keyword too
                    if is_batchnorm(_m) and (x := bn_input(args, kwargs)[0]) is not None:
                        srcs = sources(x)  # the data it normalizes, not its padding mask
                    nodes.append(_Node(name, "module", model.get_submodule(name), srcs))
                    inside[0] += 1

                handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(m.register_forward_hook(post))
        try:
            with (
                torch.no_grad(),
                torch.random.fork_rng(devices=[]),
                warnings.catch_warnings(),
                _Provenance(),
            ):
                torch.manual_seed(0)
                warnings.simplefilter("ignore")
                _call(probe, batch)
        finally:
            for h in handles:
                h.remove()

    try:
        forward("train")  # the dataflow of training (Dropout makes fresh tensors)
    except Exception:  # noqa: BLE001
        try:
            forward("eval")  # e.g. a batch of one for BN in train mode
        except Exception:  # noqa: BLE001 — the probes report it (forward-failed)
            pass  # the dataflow up to the failure: the structure seen so far is still checked
    short = reason.strip().splitlines()[0][:120] if reason.strip() else "unknown reason"
    return _Graph(nodes, f"a hooked forward pass (torch.fx tracing failed: {short})")


def _dataflow(model: nn.Module, batch: Any) -> _Graph:
    with measuring():  # (tracing calls the hooks of the modules it traces through)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # traced in train mode: the dataflow of training (F.dropout(x, p, self.training))
                return _fx_graph(_probe_copy(model).train())
        except Exception as e:  # noqa: BLE001 — any tracing failure falls back to hooks
            return _hook_graph(model, batch, f"{type(e).__name__}: {e}")


def _transparent(n: _Node) -> bool:
    if n.kind == "module":
        return isinstance(n.module, _TRANSPARENT_MODULES)
    if n.kind == "method":
        return n.name in _TRANSPARENT_METHODS
    if n.kind == "function":
        return n.name in _TRANSPARENT_FUNCTIONS
    return False


def _is_dropout(n: _Node) -> float | None:
    if n.kind == "module" and isinstance(n.module, _DROPOUT):
        return float(n.module.p)
    if n.kind == "function" and n.name in _DROPOUT_FUNCTIONS:
        return n.p
    return None


def _producer(g: _Graph, i: int) -> tuple[int | None, list[int]]:
    """The first non-transparent node feeding node ``i`` (single-input chain), and the path."""
    path: list[int] = []
    cur = i
    while True:
        ins = g.nodes[cur].inputs
        if len(ins) != 1:
            return None, path
        cur = ins[0]
        path.append(cur)
        if not _transparent(g.nodes[cur]):
            return cur, path


def _consumers_through(g: _Graph, i: int, cons: dict[int, list[int]]) -> list[int]:
    out: list[int] = []
    stack = list(cons[i])
    seen: set[int] = set()
    while stack:
        j = stack.pop()
        if j in seen:
            continue
        seen.add(j)
        if _transparent(g.nodes[j]):
            stack.extend(cons[j])
        else:
            out.append(j)
    return out


def _upstream_dropout(g: _Graph, i: int) -> tuple[int, list[int]] | None:
    """A Dropout reaching node ``i`` with no BN in between (depth-first), and the path."""
    stack: list[tuple[int, list[int]]] = [(j, [j]) for j in g.nodes[i].inputs]
    seen: set[int] = set()
    while stack:
        j, path = stack.pop()
        if j in seen:
            continue
        seen.add(j)
        n = g.nodes[j]
        p = _is_dropout(n)
        if p is not None and p > 0:
            return j, path
        if n.kind == "module" and n.module is not None and is_batchnorm(n.module):
            continue
        stack.extend((k, [*path, k]) for k in n.inputs)
    return None


def _bias_on_bn_axis(producer: nn.Module, bn: nn.Module, rank: int | None) -> bool:
    """The producer's bias runs along the axis BN normalizes per channel, so BN's mean
    subtraction cancels it: a Linear's bias is along its output's last axis, a convolution's
    along axis 1 (the BN input's rank comes from the measurement)."""
    if rank is None or rank < 2:
        return False
    axis = _bn_axis(bn) % rank
    if isinstance(producer, nn.Linear):
        return axis == rank - 1
    return axis == 1


def _label(n: _Node) -> str:
    if n.kind == "module":
        return f"{type(n.module).__name__} '{n.name}'"
    if n.kind == "function":
        return f"F.{n.name}"
    if n.kind == "method":
        return f".{n.name}()"
    return n.name


# --------------------------------------------------------------------------------------------
# the doctor

_FIX_RECAL = (
    "batchnorm.recalibrate(model, data) — recomputes every running mean/var exactly from the "
    "data (BN on batch statistics, Dropout off), weights untouched"
)


_FIX_COUNTER = (
    "; the layer has momentum=None (a cumulative average), so afterwards set its counter to the "
    "number of batches behind the statistics — layer.num_batches_tracked.fill_(number of "
    "batches) — or the next train-mode batch replaces them entirely"
)


def _initial_fix(m: nn.Module) -> str:
    """The fix for statistics at their initial values: recalibrate (around a freeze), or load
    the buffers; with momentum=None, also the counter."""
    counter = _FIX_COUNTER if _cumulative(m) else ""
    frozen_cls, is_frozen = _frozen_tools()
    if frozen_cls is not None and isinstance(m, frozen_cls):
        return (
            "load the checkpoint that holds the BN buffers, or estimate the statistics before "
            "converting to FrozenBatchNorm: " + _FIX_RECAL + " on the unfrozen model"
        )
    if is_frozen is not None and is_frozen(m):
        return (
            "batchnorm.unfreeze(model), then "
            + _FIX_RECAL
            + counter
            + ", then batchnorm.freeze(model) again (recalibrate leaves frozen layers alone); "
            "or load the checkpoint that holds the BN buffers"
        )
    return _FIX_RECAL + counter + "; or load the checkpoint that holds the BN buffers"


def _cumulative(m: nn.Module) -> bool:
    """A torch.nn layer averaging cumulatively (``momentum=None``, counter-weighted)."""
    return hasattr(m, "momentum") and m.momentum is None and hasattr(m, "num_batches_tracked")


def _shared_finding(
    name: str,
    m: nn.Module,
    label: str,
    pooled: _Accumulator,
    sites: Sequence[_Accumulator],
    running: tuple[Tensor, Tensor],
    og: OutputGap | None,
    t: Thresholds,
) -> Finding | None:
    """``shared-bn``: the calls of one layer within a forward pass see inputs whose statistics
    differ (each call's batch statistics against those of all calls together, beyond their
    sampling noise). Train mode normalizes each call with its own statistics, eval mode all of
    them with running statistics that average the calls."""
    if pooled.mean_sum is None or pooled.var_sum is None or not pooled.batches:
        return None
    mix_mean = pooled.mean_sum / pooled.batches
    mix_var = pooled.var_sum / pooled.batches
    if _stores_biased(m) and pooled.count > 1:
        mix_var = mix_var * (pooled.count - 1) / pooled.count
    if not bool(torch.isfinite(mix_mean).all() and torch.isfinite(mix_var).all()):
        return None
    apart = [_gap_from(name, m, a, (mix_mean, mix_var), t) for a in sites]
    sevs = [_severity_of_gap(g, t) for g in apart if g is not None and not g.nonfinite]
    found = [s for s in sevs if s is not None]
    if not found:
        return None
    sev: Severity = min(found, key=lambda s: _SEVERITY_RANK[s])
    rm, rv = (r.detach().to(torch.float64).reshape(-1) for r in running)
    calls: list[str] = []
    per_call: dict[str, list[float]] = {
        "call_mean_median": [],
        "call_var_median": [],
        "call_mean_shift_max": [],
        "call_std_ratio_median": [],
    }
    for k, a in enumerate(sites):
        g = _gap_from(name, m, a, running, t)
        if g is None or a.mean_sum is None or a.var_sum is None:
            continue
        mean = (a.mean_sum / a.batches).median().item()
        var = (a.var_sum / a.batches).median().item()
        calls.append(
            f"call {k + 1}: batch mean {mean:.3g}, batch var {var:.3g} (medians over channels), "
            f"up to {g.mean_shift_max:.2f} running std from running_mean, batch std / running "
            f"std {g.std_ratio_median:.3g} (median)"
        )
        for key, v in zip(per_call, (mean, var, g.mean_shift_max, g.std_ratio_median)):
            per_call[key].append(v)
    run_mean, run_var = rm.median().item(), rv.median().item()
    symptom = (
        ""
        if og is None or not math.isfinite(og.batch_relative_rms)
        else f"; the model's eval-mode outputs differ from its train-mode ones (per-batch "
        f"statistics) by {og.batch_relative_rms:.3f} relative RMS"
    )
    return Finding(
        "shared-bn",
        sev,
        name,
        f"{label} is called {len(sites)} times per forward pass on inputs with different "
        f"statistics: " + "; ".join(calls) + f"; running_mean {run_mean:.3g}, running_var "
        f"{run_var:.3g} (medians over channels){symptom}",
        "in train mode each call is normalized with its own batch statistics, but there is one "
        "set of running statistics, the average over all the calls: in eval mode every call is "
        "normalized with that mixture, so eval mode computes a different function than training",
        "give each input its own BN layer (with trained weights: copy the shared layer into "
        "each, then " + _FIX_RECAL + "); or, if one normalization for all the inputs is "
        "intended, accept the mixed statistics: pass the inputs through the layer in one call "
        "(torch.cat along the batch axis) so that training normalizes with them too",
        {
            "calls": len(sites),
            **per_call,
            "running_mean_median": run_mean,
            "running_var_median": run_var,
            "batch_relative_rms": None if og is None else og.batch_relative_rms,
        },
    )


def _severity_of_gap(g: LayerGap, t: Thresholds) -> Severity | None:
    # judged on channels whose gap is above their own sampling noise (LayerGap)
    shift, logr = g.mean_shift_significant, g.std_log_gap
    if shift > t.mean_shift_error or logr > math.log(t.std_ratio_error):
        return "error"
    if shift > t.mean_shift_warning or logr > math.log(t.std_ratio_warning):
        return "warning"
    return None


def _gap_text(g: LayerGap) -> str:
    return (
        f"batch mean is up to {g.mean_shift_max:.2f} running std away from running_mean "
        f"(median {g.mean_shift_median:.2f}, over {g.num_features - len(g.dead_channels)} "
        f"channels, {g.batches} batches of {g.count} values per channel); batch std / running "
        f"std = {g.std_ratio_worst:.3g} at worst (median {g.std_ratio_median:.3g})"
    )


def _gap_evidence(g: LayerGap) -> dict[str, Any]:
    return {
        "mean_shift_max": g.mean_shift_max,
        "mean_shift_median": g.mean_shift_median,
        "std_ratio_worst": g.std_ratio_worst,
        "std_ratio_median": g.std_ratio_median,
        "count": g.count,
        "batches": g.batches,
        "noise": g.noise,
    }


def doctor(
    model: nn.Module,
    data: Any,
    num_batches: int = 8,
    *,
    batch_size: int = 64,
    train_batch_size: int | None = None,
    thresholds: Thresholds | None = None,
) -> DoctorReport:
    """Check ``model`` on up to ``num_batches`` batches of ``data`` for the classic
    batch-normalization bugs and return a :class:`DoctorReport` (print it, or ``to_json()``).

    Checks, each reported with its measurement, the reason and the fix:

    * ``train-eval-gap``: outputs with BN on batch statistics vs eval mode (:func:`output_gap`);
    * ``stale-running-stats``: per layer, batch statistics vs running statistics, in train mode
      and with Dropout off (:func:`stat_gaps`); ``eval-input-shift``: a gap only with Dropout
      off, as at inference;
    * ``initial-running-stats``, ``nonfinite-running-stats``, ``nonfinite-activations``,
      ``untracked-running-stats`` (``num_batches_tracked`` = 0 with ``momentum=None``),
      ``batch-stats-in-eval`` (``track_running_stats=False``);
    * ``small-count``: values per channel in a batch below ``thresholds.min_count``;
    * ``frozen-stats`` / ``unfrozen-stats``: BN in eval mode inside a training model, or still
      updating its statistics while its γ/β are frozen;
    * ``dropout-before-bn``, ``bias-before-bn``, ``bn-undone`` (another normalization right
      after), from the dataflow order;
    * ``keras-momentum``: a momentum like 0.99 that is Keras' convention used in PyTorch's;
    * ``dead-channels`` (constant input) and ``zero-gamma`` (γ ≈ 0);
    * ``forward-failed`` (the model raises on the data) and ``no-batchnorm``.

    Severities: ``error`` — eval-mode results are wrong now; ``warning`` — likely wrong or
    fragile; ``info`` — worth knowing. A model in train mode whose statistics were never updated
    is taken to be about to train (its initial statistics are reported as info).

    Args:
        model: any ``nn.Module`` with torch.nn or batchnorm BN layers; never changed (its
            parameters, buffers, modes and the global RNG state are the same afterwards).
        data: a tensor of inputs (split into ``batch_size`` rows) or an iterable of batches
            (tensors, ``(inputs, targets)`` tuples, dicts with an ``inputs``/``x`` key).
        num_batches: batches to measure (statistics are averaged over them).
        batch_size: rows per batch when ``data`` is a tensor.
        train_batch_size: the batch size used in training, if not the one in ``data``: the
            per-channel count check scales to it.
        thresholds: where measurements become findings (:class:`Thresholds`).

    Example (``model`` and ``loader`` are yours; README's *A real example* runs one)::

        report = batchnorm.doctor(model, loader, num_batches=8)
        print(report)                 # text
        report.to_json()              # machine-readable
        [f.check for f in report.errors]
    """
    t = thresholds or Thresholds()
    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: model must be a torch.nn.Module, got {type(model).__name__}")
    if train_batch_size is not None and train_batch_size < 1:
        raise ValueError(f"doctor: train_batch_size must be >= 1, got {train_batch_size}")
    batches = _on_device(_take_batches(data, num_batches, batch_size), model)
    layers = _bn_layers(model)
    names = [n for n, _ in layers]
    graph = _dataflow(model, batches[0])
    order_rank: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        if n.kind == "module":
            order_rank.setdefault(n.name, i)
    findings: list[Finding] = []

    # -- probes on copies: train mode, inference mode, eval mode ---------------------------
    pr = _probes(model, batches, names)
    train_accs, og, eval_err, train_err = pr.train, pr.output, pr.err, pr.train_err
    train_gaps: dict[str, LayerGap] = {}
    inference_gaps: dict[str, LayerGap] = {}
    for name, m in layers:
        g = _gap_from(name, m, train_accs[name], _running(m), t, train_batch_size)
        if g is not None and train_err is None:
            train_gaps[name] = g
        g = _gap_from(name, m, pr.inference[name], _running(m), t, train_batch_size)
        if g is not None and eval_err is None:
            inference_gaps[name] = g

    # the same error in both modes is said once: with the batch-size remedy when it is BN's
    # "values per channel" error, else as the data not fitting the model (the eval finding)
    same = eval_err is not None and str(train_err) == str(eval_err)
    per_channel = "value per channel" in str(train_err)
    if eval_err is not None and not (same and per_channel):
        findings.append(
            Finding(
                "forward-failed",
                "error",
                "",
                f"the model raised in eval mode (or with only BN in train mode) on the given "
                f"data: {eval_err}",
                "the doctor measures the model on the data it will see; it could not run",
                "fix the error above (input shape/dtype) and run the doctor again",
                {"mode": "eval"},
            )
        )
    if train_err is not None and not (same and not per_channel):
        findings.append(
            Finding(
                "forward-failed",
                "error",
                "",
                f"the model raised in train mode on the given data: {train_err}",
                "training with this data would fail the same way"
                + (
                    " (a BN layer in train mode needs at least 2 values per channel)"
                    if per_channel
                    else ""
                ),
                "train with larger batches (DataLoader(drop_last=True) avoids a last batch of "
                "1), or batchnorm.freeze(model) to fine-tune on running statistics"
                if per_channel
                else "fix the error above and run the doctor again",
                {"mode": "train"},
            )
        )

    if not layers:
        findings.append(
            Finding(
                "no-batchnorm",
                "info",
                "",
                f"{type(model).__name__} holds no batch-normalization layer the doctor knows "
                "(torch.nn.BatchNorm*/SyncBatchNorm, batchnorm's layers, FrozenBatchNorm)",
                "there is nothing to check; a custom BN layer is not recognized",
                "for a custom layer, batchnorm.convert_model or a subclass of batchnorm.BatchNorm "
                "makes it visible",
                {},
            )
        )

    # a model in train mode whose statistics were never updated is about to be trained: its
    # initial statistics are expected, not a bug — unless a layer is frozen (FrozenBatchNorm,
    # batchnorm.freeze, or held in eval mode), which keeps its initial statistics for good
    before_training = (
        model.training
        and bool(layers)
        and all(_never_updated(m) and _updates(m) for _, m in layers)
    )
    bad_stats: dict[str, tuple[list[int], list[int]]] = {}
    for name, m in layers:
        bad = _bad_running(m)
        if bad is not None:
            bad_stats[name] = bad

    # -- the symptom ------------------------------------------------------------------------
    if og is not None and layers and og.batches < t.min_batches:
        findings.append(
            Finding(
                "few-batches",
                "info",
                "",
                f"the train/eval output gap was measured on {og.batches} batch(es): "
                f"{og.relative_rms:.3f} relative RMS, not judged",
                "the gap of a healthy model on few batches is mostly sampling noise, and the "
                f"noise is estimated from the spread between batches: the check needs at least "
                f"{t.min_batches} batches",
                f"run the doctor on at least {t.min_batches} batches (num_batches, and data "
                "holding that many full batches)",
                {"batches": og.batches, "min_batches": t.min_batches},
            )
        )
    elif og is not None and not (bad_stats and not math.isfinite(og.relative_rms)):
        # (non-finite running statistics make the eval outputs non-finite: said per layer)
        sev: Severity | None = None
        above_noise = not og.noise > og.relative_rms / t.output_noise_factor
        if above_noise and og.relative_rms > t.output_gap_error:
            sev = "error"
        elif above_noise and og.relative_rms > t.output_gap_warning:
            sev = "warning"
        if sev is not None and before_training:
            sev = "info"
        if sev is not None:
            agree = "" if og.agreement is None else f"; argmax agrees on {og.agreement:.1%} of rows"
            findings.append(
                Finding(
                    "train-eval-gap",
                    sev,
                    "",
                    f"outputs in eval mode differ from outputs with BN on batch statistics "
                    f"(pooled over {og.batches} batches, other layers in eval mode) by "
                    f"{og.relative_rms:.3f} relative RMS (sampling noise {og.noise:.3f}; "
                    f"{og.batch_relative_rms:.3f} with per-batch statistics){agree}",
                    "the model behaves differently in eval mode than in training: the running "
                    "statistics do not match the activations; the per-layer findings below say "
                    "where",
                    "fix the layers reported below; usually " + _FIX_RECAL,
                    og.to_dict(),
                )
            )

    # -- per-layer statistics ---------------------------------------------------------------
    model_training = model.training
    for name, m in layers:
        label = f"{type(m).__name__}({getattr(m, 'num_features', '?')})"
        running = _running(m)
        tg = train_gaps.get(name)
        eg = inference_gaps.get(name)
        at_init = False
        if running is not None:
            rm, rv = running
            nbt = getattr(m, "num_batches_tracked", None)
            nbt_v = int(nbt.item()) if isinstance(nbt, Tensor) else None
            finite = bool(torch.isfinite(rm).all() and torch.isfinite(rv).all())
            if name in bad_stats:
                nf_ch, neg_ch = bad_stats[name]
                n_bad = int((~torch.isfinite(rm)).sum() + (~torch.isfinite(rv)).sum())
                parts = []
                if n_bad:
                    parts.append(
                        f"{n_bad} non-finite value(s) in running_mean/running_var (channels "
                        f"{_channels_text(nf_ch)})"
                    )
                if neg_ch:
                    parts.append(
                        f"running_var is negative in {len(neg_ch)} of {rv.numel()} channel(s) "
                        f"{_channels_text(neg_ch)}"
                    )
                findings.append(
                    Finding(
                        "nonfinite-running-stats",
                        "error",
                        name,
                        f"{label}: " + "; ".join(parts),
                        (
                            "in eval mode every output of this layer (and everything after it) "
                            "is NaN"
                            if len(set(nf_ch) | set(neg_ch)) >= int(rv.numel())
                            else "in eval mode those channels' outputs are NaN (and whatever "
                            "the layers after it compute from them)"
                        )
                        + (" (a negative variance has no square root)" if neg_ch else "")
                        + "; torch.nn writes a NaN batch straight into the running averages",
                        "find the batch that produced NaN/inf"
                        + (" or the code that wrote the negative variance" if neg_ch else "")
                        + ", then "
                        + _FIX_RECAL
                        + "; batchnorm.convert_model(model) makes the layers skip non-finite "
                        "batches instead of storing them",
                        {
                            "nonfinite_values": n_bad,
                            "nonfinite_channels": nf_ch,
                            "negative_var": bool(neg_ch),
                            "negative_var_count": len(neg_ch),
                            "negative_var_channels": neg_ch,
                        },
                    )
                )
            at_init = bool((rm == 0).all() and (rv == 1).all())
            if at_init and (nbt_v in (0, None)):
                probe_gap = eg if eg is not None and eg.has_running_stats else tg
                gap_sev = None if probe_gap is None else _severity_of_gap(probe_gap, t)
                sev2: Severity = (
                    "info"
                    if before_training
                    else "error"
                    if gap_sev is not None or (model_training and not _updates(m))
                    else "warning"
                )
                meas = (
                    f"{label}: running_mean is all 0 and running_var all 1 (their initial values)"
                )
                if nbt_v is not None:
                    meas += ", num_batches_tracked = 0"
                if probe_gap is not None and probe_gap.has_running_stats:
                    meas += f"; its input (Dropout off): {_gap_text(probe_gap)}"
                findings.append(
                    Finding(
                        "initial-running-stats",
                        sev2,
                        name,
                        meas,
                        "the running statistics were never updated (no training step in train "
                        "mode, or a checkpoint without BN buffers was loaded): eval mode "
                        "normalizes with mean 0 / variance 1 instead of the real statistics",
                        _initial_fix(m),
                        {
                            "num_batches_tracked": nbt_v,
                            **({} if probe_gap is None else _gap_evidence(probe_gap)),
                        },
                    )
                )
            elif nbt_v == 0 and finite and getattr(m, "momentum", 0.1) is None:
                # with a fixed momentum a zero counter is harmless (recalibrate leaves it so)
                findings.append(
                    Finding(
                        "untracked-running-stats",
                        "warning",
                        name,
                        f"{label}: num_batches_tracked = 0 with momentum=None, but the running "
                        "statistics are not at their initial values",
                        "the statistics were loaded or computed without their counter; with "
                        "momentum=None (cumulative average, weight 1/(n+1)) the next train-mode "
                        "batch replaces them entirely",
                        "set layer.num_batches_tracked to the number of batches behind the "
                        "statistics, or give the layer a fixed momentum",
                        {"num_batches_tracked": 0, "momentum": None},
                    )
                )
        else:
            findings.append(
                Finding(
                    "batch-stats-in-eval",
                    "warning",
                    name,
                    f"{label}: track_running_stats=False — the layer has no running statistics",
                    "it normalizes with the statistics of the batch in eval mode too: a "
                    "prediction depends on which other samples share its batch, and a batch of "
                    "1 fails",
                    "build the layer with track_running_stats=True and "
                    "batchnorm.recalibrate(model, data) to estimate its statistics",
                    {},
                )
            )

        # the gap itself (not repeated when it is already explained by initial values)
        if tg is not None and tg.nonfinite:
            findings.append(
                Finding(
                    "nonfinite-activations",
                    "error",
                    name,
                    f"{label}: the batch statistics of the layer's input are NaN/inf on the "
                    "given data (train mode)",
                    "a training step on this data would store NaN in the running statistics "
                    "(torch.nn) and the loss would be NaN",
                    "find the source (inputs, an exploding layer before it, a too-large learning "
                    "rate); batchnorm.convert_model(model) makes BN skip non-finite batches",
                    {"count": tg.count},
                )
            )
        elif tg is not None and tg.has_running_stats and not at_init and name not in bad_stats:
            # eval mode is right when the statistics match the inference-time input (Dropout
            # off); the train-mode gap says whether they are wrong for training too (stale) or
            # only at inference (a train/eval shift upstream)
            usable = eg is not None and eg.has_running_stats and not eg.nonfinite
            sev_inf = _severity_of_gap(eg, t) if usable and eg is not None else None
            sev_tr = _severity_of_gap(tg, t)
            frozen_here = _always_running(m) or (model_training and not m.training)
            if (sev_inf is not None and sev_tr is not None) or (not usable and sev_tr is not None):
                sev3 = sev_inf or sev_tr
                assert sev3 is not None
                inf_text = (
                    f"; with Dropout off (as at inference) the {_gap_text(eg)}"
                    if usable and eg is not None
                    else ""
                )
                findings.append(
                    Finding(
                        "stale-running-stats",
                        sev3,
                        name,
                        f"{label}: in train mode the {_gap_text(tg)}{inf_text}",
                        "in eval mode the layer normalizes with running statistics that do not "
                        "describe its input (stale after the weights changed, too few updates, a "
                        "wrong momentum, or data unlike the training data)",
                        _FIX_RECAL
                        + (
                            " (the layer is frozen: recalibrate before freezing)"
                            if frozen_here
                            else ""
                        ),
                        _gap_evidence(tg)
                        | (
                            {f"inference_{k}": v for k, v in _gap_evidence(eg).items()}
                            if usable and eg is not None
                            else {}
                        ),
                    )
                )
            elif sev_inf is not None and eg is not None:
                findings.append(
                    Finding(
                        "eval-input-shift",
                        sev_inf,
                        name,
                        f"{label}: the running statistics match the layer's input in train "
                        f"mode (mean shift {tg.mean_shift_max:.2f}, std ratio "
                        f"{tg.std_ratio_worst:.3g}) but not with Dropout off, as at inference: "
                        f"{_gap_text(eg)}",
                        "a layer upstream behaves differently in train and eval mode (Dropout "
                        "is the classic one: its train-mode noise inflates the variance the "
                        "running statistics learned — Li et al. 2019, arXiv 1801.05134)",
                        "re-estimate the statistics with Dropout off: "
                        + _FIX_RECAL
                        + "; or move Dropout after the last BN layer",
                        {
                            **{f"inference_{k}": v for k, v in _gap_evidence(eg).items()},
                            "train_mean_shift_max": tg.mean_shift_max,
                            "train_std_ratio_worst": tg.std_ratio_worst,
                        },
                    )
                )

        # one layer called several times per forward on inputs with different statistics
        sites = pr.train_sites.get(name, [])
        if len(sites) > 1 and train_err is None and running is not None:
            shared = _shared_finding(name, m, label, train_accs[name], sites, running, og, t)
            if shared is not None:
                findings.append(shared)

        # per-channel sample count
        acc = train_accs[name] if train_accs[name].batches else pr.inference[name]
        if acc.batches:
            count, scaled, vbs = _training_count(m, acc, train_batch_size)
            ghost = vbs is not None
            frozen_here = _always_running(m) or ((not m.training) and model_training)
            if count < t.min_count and not frozen_here:
                sev5: Severity = "error" if count < 2 else "warning"
                findings.append(
                    Finding(
                        "small-count",
                        sev5,
                        name,
                        f"{label}: {count} value(s) per channel in a "
                        + (f"virtual batch of {vbs} sample(s)" if ghost else "batch")
                        + (f" at batch size {train_batch_size}" if scaled else "")
                        + f" (threshold {t.min_count})",
                        "batch statistics from so few values are noisy: training normalizes with "
                        "noise the eval-mode running averages do not have (Wu & He 2018 see BN "
                        "degrade below batch 16)"
                        + ("; fewer than 2 values fails in train mode" if count < 2 else ""),
                        "use "
                        + ("a larger virtual_batch_size, " if ghost else "larger batches, ")
                        + "GroupNorm/LayerNorm, or batchnorm.freeze(model) "
                        "to fine-tune on the running statistics",
                        {"count": count, "threshold": t.min_count},
                    )
                )

        # modes: frozen by accident, or not frozen while fine-tuning
        params = [
            p
            for p in (getattr(m, "weight", None), getattr(m, "bias", None))
            if isinstance(p, nn.Parameter)
        ]
        grads = [bool(p.requires_grad) for p in params]
        explicit = _always_running(m)  # frozen on purpose: nothing to report about modes
        if model_training and not m.training and running is not None and not explicit:
            findings.append(
                Finding(
                    "frozen-stats",
                    "info" if grads and not any(grads) else "warning",
                    name,
                    f"{label}: in eval mode inside a model in train mode; γ/β "
                    + ("frozen" if grads and not any(grads) else "trainable"),
                    "its running statistics do not update while the rest trains; intended "
                    "when fine-tuning with small batches, a bug when a stray .eval() was never "
                    "undone",
                    "if intended, batchnorm.freeze(model) makes it explicit and survives "
                    "model.train(); if not, call model.train() before training",
                    {"layer_training": False, "weights_trainable": any(grads)},
                )
            )
        if m.training and running is not None and grads and not any(grads) and not explicit:
            findings.append(
                Finding(
                    "unfrozen-stats",
                    "warning",
                    name,
                    f"{label}: γ/β have requires_grad=False but the layer is in train mode",
                    "the weights are frozen yet every forward pass in train mode still "
                    "overwrites the running statistics: the fine-tuned model drifts from the "
                    "checkpoint (the classic fine-tuning bug)",
                    "batchnorm.freeze(model) — eval-mode statistics and frozen γ/β that "
                    "survive model.train()",
                    {"layer_training": True, "weights_trainable": False},
                )
            )

        # momentum convention
        mom = getattr(m, "momentum", None)
        if isinstance(mom, float | int) and mom > t.keras_momentum:
            findings.append(
                Finding(
                    "keras-momentum",
                    "warning",
                    name,
                    f"{label}: momentum = {mom:g} in PyTorch's convention (the weight of the "
                    f"new batch); it looks like Keras' convention (the weight of the old average)",
                    f"the running statistics are {mom:.0%} the last batch: eval mode normalizes "
                    "with one batch's noisy statistics instead of a population average",
                    f"momentum = 1 − {mom:g} = {1 - mom:.3g} (torch_momentum = 1 − "
                    "keras_momentum), or build the layer with batchnorm.BatchNorm.from_keras(...)",
                    {"momentum": float(mom), "suggested": 1.0 - float(mom)},
                )
            )

        # dead channels and γ ≈ 0
        if tg is not None and tg.dead_channels:
            dc = list(tg.dead_channels)
            findings.append(
                Finding(
                    "dead-channels",
                    "warning",
                    name,
                    f"{label}: {len(dc)} of {tg.num_features} channel(s) get a constant input "
                    f"(variance ≈ 0): {dc[:16]}{' …' if len(dc) > 16 else ''}",
                    "a constant channel normalizes to 0 and outputs β: capacity wasted (dead "
                    "ReLUs or pruned filters upstream) and its statistics carry no signal",
                    "check the layer before it (dead ReLU units: lower learning rate, "
                    "LeakyReLU); prune the channel if it stays dead",
                    {"dead_channels": dc, "num_features": tg.num_features},
                )
            )
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and w.numel():
            wz = w.detach().abs() <= t.dead_gamma
            nz = int(wz.sum())
            if nz:
                allz = nz == w.numel()
                findings.append(
                    Finding(
                        "zero-gamma",
                        "info" if allz else "warning",
                        name,
                        f"{label}: γ ≈ 0 (|γ| ≤ {t.dead_gamma:g}) for {nz} of {w.numel()} channel(s)",
                        "a channel with γ = 0 outputs β whatever its input: it is switched off"
                        + (
                            "; all-zero γ is the zero-γ residual initialization (Goyal et al. "
                            "2017) — intended at init, a dead branch after training"
                            if allz
                            else ""
                        ),
                        "if unintended: lower weight decay on γ (exclude BN parameters from it), "
                        "or prune the channels",
                        {
                            "zero_gamma_channels": [int(i) for i in torch.nonzero(wz).flatten()][
                                :64
                            ],
                            "num_features": int(w.numel()),
                        },
                    )
                )

    # -- structure --------------------------------------------------------------------------
    ranks = {n: a.ndim for accs in (pr.inference, train_accs) for n, a in accs.items() if a.batches}
    findings.extend(_structural_findings(graph, layers, inference_gaps, train_gaps, t, ranks))

    def key(f: Finding) -> tuple[int, int, str]:
        return (
            _SEVERITY_RANK[f.severity],
            order_rank.get(f.layer, -1 if not f.layer else 10**9),
            f.check,
        )

    findings.sort(key=key)
    return DoctorReport(
        model=type(model).__name__,
        num_batches=len(batches),
        batch_size=_batch_len(batches[0]),
        order=graph.how,
        layers=names,
        findings=findings,
        train_gaps=train_gaps,
        inference_gaps=inference_gaps,
        output_gap=og,
    )


def _structural_findings(
    g: _Graph,
    layers: list[tuple[str, nn.Module]],
    inference_gaps: Mapping[str, LayerGap],
    train_gaps: Mapping[str, LayerGap],
    t: Thresholds,
    ranks: Mapping[str, int],
) -> list[Finding]:
    """The findings from the dataflow order; ``ranks`` is the number of dimensions of each BN
    layer's input, as measured."""
    out: list[Finding] = []
    cons = g.consumers()
    order = f"(order from {g.how})"
    for name, m in layers:
        label = f"{type(m).__name__}({getattr(m, 'num_features', '?')})"
        idxs = g.index_of(name)
        if not idxs:
            continue
        i = idxs[0]
        # Dropout reaching the BN with no BN in between
        hit = _upstream_dropout(g, i)
        if hit is not None:
            j, path = hit
            dn = g.nodes[j]
            chain = " → ".join(_label(g.nodes[k]) for k in reversed(path)) + f" → {label} '{name}'"
            direct = all(_transparent(g.nodes[k]) for k in path[:-1])
            eg, tg = inference_gaps.get(name), train_gaps.get(name)
            shift = ""
            ev: dict[str, Any] = {"p": _is_dropout(dn), "immediate": direct, "path": chain}
            sev: Severity = "info"
            if eg is not None and eg.has_running_stats and not eg.nonfinite:
                shift = (
                    f"; measured with Dropout off (as at inference): std / running std = "
                    f"{eg.std_ratio_worst:.3g} at worst "
                    f"(median {eg.std_ratio_median:.3g})"
                )
                if tg is not None and tg.has_running_stats:
                    shift += f" vs {tg.std_ratio_median:.3g} (median) in train mode"
                    ev["train_std_ratio_median"] = tg.std_ratio_median
                ev["inference_std_ratio_worst"] = eg.std_ratio_worst
                ev["inference_std_ratio_median"] = eg.std_ratio_median
                if (
                    eg.std_log_gap > math.log(t.std_ratio_warning)
                    or eg.mean_shift_significant > t.mean_shift_warning
                ):
                    sev = "warning"
            else:
                sev = "warning"  # nothing measured: the pattern alone
            out.append(
                Finding(
                    "dropout-before-bn",
                    sev,
                    name,
                    f"{'immediately ' if direct else ''}after Dropout(p={_is_dropout(dn):g}): "
                    f"{chain} {order}{shift}",
                    "Dropout scales the variance of what BN sees in training but not in eval: "
                    "the running variance is learned on the noisy train-mode input and is wrong "
                    "at inference (variance shift, Li et al. 2019, arXiv 1801.05134)",
                    "move Dropout after the last BN layer (before the classifier), or re-estimate "
                    "the statistics with Dropout off: " + _FIX_RECAL,
                    ev,
                )
            )
        # a bias right before BN (a frozen layer subtracts its fixed running mean, not the
        # batch mean: the bias before it is not cancelled, it is the one shift that learns)
        p, _path = _producer(g, i)
        if p is not None and not _always_running(m):
            pn = g.nodes[p]
            pm = pn.module
            bias = getattr(pm, "bias", None) if pm is not None else None
            if (
                pn.kind == "module"
                and isinstance(pm, nn.Linear | nn.modules.conv._ConvNd)
                and isinstance(bias, Tensor)
                and bias.numel() == getattr(m, "num_features", -1)
                # every call of the layer feeds only this BN: a call whose output goes
                # elsewhere too (fc(x) added to bn(fc(x))) needs its bias
                and all(
                    set(_consumers_through(g, k, cons)) <= set(idxs) for k in g.index_of(pn.name)
                )
                and _bias_on_bn_axis(pm, m, ranks.get(name))
            ):
                out.append(
                    Finding(
                        "bias-before-bn",
                        "info",
                        name,
                        f"{_label(pn)} has a bias ({bias.numel()} parameters) and feeds {label} "
                        f"directly {order}",
                        "BN subtracts the batch mean, so a constant per-channel bias before it "
                        "cancels exactly and never learns anything"
                        + (
                            "; β takes its role"
                            if getattr(m, "bias", None) is not None
                            else " (this layer has no β: it normalizes to mean 0)"
                        ),
                        f"build {_label(pn)} with bias=False (batchnorm.fold puts a bias back "
                        "when BN is folded into it for deployment)",
                        {"producer": pn.name, "redundant_parameters": int(bias.numel())},
                    )
                )
        # a normalization right after BN (a frozen BN next is a fixed affine map: it re-centres
        # nothing by the batch, so it undoes nothing)
        for j in _consumers_through(g, i, cons):
            cn = g.nodes[j]
            if (
                cn.kind == "module"
                and cn.module is not None
                and (is_batchnorm(cn.module) or isinstance(cn.module, _OTHER_NORMS))
                and not _always_running(cn.module)
            ):
                out.append(
                    Finding(
                        "bn-undone",
                        "warning",
                        name,
                        f"{label} feeds {_label(cn)} directly {order}",
                        "the second normalization re-centres and re-scales the first one's "
                        "output, undoing its γ and β: the pair costs compute and parameters and "
                        "adds nothing",
                        f"remove one of the two, or put the layer that was meant to be between "
                        f"them back ({label} → Linear/Conv → activation → {_label(cn)})",
                        {"next": cn.name},
                    )
                )
    return out


def before_after(
    model: nn.Module,
    data: Any,
    fix: Callable[[nn.Module], Any],
    num_batches: int = 8,
    *,
    batch_size: int = 64,
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """The doctor before and after a fix, for experiments that show a finding and its cure.

    ``fix`` is applied to a deep copy of ``model`` (e.g. ``lambda m: batchnorm.recalibrate(m,
    loader)``); ``model`` itself is not changed. Returns a JSON-safe dict::

        {"before": DoctorReport.summary(), "after": DoctorReport.summary(),
         "cured": [checks at warning or error level before that are gone or only info after],
         "remaining": [checks still at warning or error level after]}

    Example (``net``, ``x_test`` and ``loader`` are yours)::

        d = before_after(net, x_test, lambda m: batchnorm.recalibrate(m, loader))
        d["before"]["output_gap"], d["after"]["output_gap"], d["cured"]
    """
    before = doctor(model, data, num_batches, batch_size=batch_size, thresholds=thresholds)
    fixed = _probe_copy(model)
    with measuring():  # the copy carries the model's hooks (an ActivationRecorder's)
        fix(fixed)
    after = doctor(fixed, data, num_batches, batch_size=batch_size, thresholds=thresholds)

    def serious(r: DoctorReport) -> set[tuple[str, str]]:
        return {(f.check, f.layer) for f in r.findings if f.severity != "info"}

    b, a = serious(before), serious(after)
    return {
        "before": before.summary(),
        "after": after.summary(),
        "cured": [{"check": c, "layer": layer} for c, layer in sorted(b - a)],
        "remaining": [{"check": c, "layer": layer} for c, layer in sorted(a)],
    }


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``batchnorm doctor``."""
    parser.add_argument(
        "factory",
        metavar="MODULE:FACTORY",
        help="a function returning the model: 'package.module:make_model' or 'path/to/file.py:make_model'",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="inputs: a .pt/.npy/.npz file (first axis = samples), or MODULE:FUNCTION returning "
        "an iterable of batches",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch for file data")
    parser.add_argument("--num-batches", type=int, default=8, help="batches to measure (default 8)")
    parser.add_argument("--checkpoint", help="a state_dict (.pt) to load into the model")
    parser.add_argument(
        "--key", help="the array/entry to use in an .npz file or a dict saved in a .pt file"
    )
    parser.add_argument(
        "--train-batch-size", type=int, help="the batch size used in training (count check)"
    )
    parser.add_argument(
        "--mode",
        choices=("as-built", "eval", "train"),
        default="eval",
        help="put the model in this mode before checking (default eval: the model as deployed)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--fail-on",
        choices=("error", "warning"),
        default="error",
        help="exit 1 when a finding of this severity or worse exists (default error)",
    )


class _LoadError(Exception):
    """The model or the data cannot be loaded: printed as one line, exit code 2."""


_PATH_HINT = (
    "give the file as path/to/file.py:{attr}, or set PYTHONPATH to the folder that holds the module"
)


@contextlib.contextmanager
def _import_paths(*folders: str) -> Iterator[None]:
    """``folders`` first on ``sys.path`` while the user's code runs (as ``python`` puts the
    current folder or the script's folder there), restored afterwards."""
    saved = list(sys.path)
    for folder in reversed(folders):
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_failure(e: BaseException, what: str, source: str, attr: str) -> _LoadError:
    """One line for an exception raised while importing the user's module or file."""
    if isinstance(e, SyntaxError):
        where = e.filename or source
        line = f", line {e.lineno}" if e.lineno else ""
        return _LoadError(f"{what}: syntax error in {where!r}{line}: {e.msg}")
    if isinstance(e, ModuleNotFoundError):
        hint = _PATH_HINT.format(attr=attr)
        return _LoadError(f"{what}: importing {source!r}: no module named {e.name!r} ({hint})")
    return _LoadError(f"{what}: importing {source!r} raised {type(e).__name__}: {e}")


def _load_object(spec: str, what: str) -> Any:
    """The object ``NAME`` of ``MODULE:NAME`` or ``path/to/file.py:NAME`` (imported with the
    ``sys.path`` that :func:`main` sets up: the current folder and the files' folders)."""
    if ":" not in spec:
        raise ValueError(f"{what} must be MODULE:NAME or path/to/file.py:NAME, got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    module: Any
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no file {str(path)!r}")
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        if spec_ is None or spec_.loader is None:
            raise ImportError(f"{what}: cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(spec_)
        sys.modules.setdefault(path.stem, module)
        try:
            spec_.loader.exec_module(module)
        except Exception as e:
            if sys.modules.get(path.stem) is module:
                del sys.modules[path.stem]
            raise _import_failure(e, what, str(path), attr) from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                hint = _PATH_HINT.format(attr=attr)
                raise _LoadError(f"{what}: no module named {e.name!r} ({hint})") from e
            raise _import_failure(e, what, mod_name, attr) from e
        except Exception as e:
            raise _import_failure(e, what, mod_name, attr) from e
    if not hasattr(module, attr):
        raise AttributeError(f"{what}: {mod_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _call_user(func: Any, spec: str, what: str) -> Any:
    """``func()``; an exception raised inside it is said to come from it, with the option
    (``what``) and the file."""
    module, _, name = spec.rpartition(":")
    if not callable(func):
        kind = type(func).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise TypeError(f"{what}: {spec} is {article} {kind}, not a function")
    try:
        return func()
    except Exception as e:
        raise _LoadError(f"{what}: {name}() in {module!r} raised {type(e).__name__}: {e}") from e


def _file_kind(path: Path) -> str | None:
    """'zip' (torch.save, .npz), 'pickle' (old torch.save), 'npy', or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    if head == b"\x93NUMPY":
        return "npy"
    return None


def _first_line(e: BaseException) -> str:
    """``Type: the first sentence of the message`` (torch's messages go on for a paragraph)."""
    text = str(e).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _cannot_read(option: str, path: Path, reason: str) -> _LoadError:
    return _LoadError(f"{option}: cannot read {str(path)!r} ({reason})")


def _torch_load(path: Path, option: str) -> Any:
    """``torch.load(path, weights_only=True)``, a one-line :class:`_LoadError` when it fails."""
    try:
        kind = _file_kind(path)
    except OSError as e:
        raise _cannot_read(option, path, _first_line(e)) from e
    if kind not in ("zip", "pickle"):
        what = "a NumPy .npy file; name it .npy" if kind == "npy" else "not a torch.save file"
        raise _cannot_read(option, path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        i = text.find("Unsupported global:")
        if i >= 0:
            glob = text[i:].splitlines()[0].partition(" was not")[0].rstrip(".")
            reason = f"it holds objects other than tensors, dicts and lists; {glob}"
        else:
            reason = f"corrupt or truncated torch file: {_first_line(e)}"
        raise _cannot_read(option, path, reason) from e


def _numpy_array(path: Path, key: str | None) -> Tensor:
    import numpy as np

    suffix = path.suffix.lower()
    try:
        kind = _file_kind(path)
    except OSError as e:
        raise _cannot_read("--data", path, _first_line(e)) from e
    if (suffix, kind) not in ((".npy", "npy"), (".npz", "zip")):
        raise _cannot_read("--data", path, f"not a NumPy {suffix} file")
    try:
        if suffix == ".npy":
            if key is not None:
                raise _LoadError(
                    f"--key {key!r}: {str(path)!r} is a .npy file, which holds one array; "
                    "--key names an array in an .npz file or an entry of a dict in a .pt file"
                )
            return torch.from_numpy(np.load(path, allow_pickle=False))
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if not names:
                raise ValueError(f"--data: {str(path)!r} holds no arrays")
            k = key or next((n for n in DATA_KEYS if n in names), None)
            if k is None:
                if len(names) > 1:
                    raise _LoadError(
                        f"--data: {str(path)!r} holds arrays {names}; choose one with --key"
                    )
                k = names[0]
            if k not in names:
                raise KeyError(f"--data: {str(path)!r} has no array {k!r} (it has {names})")
            return torch.from_numpy(z[k])
    except (_LoadError, KeyError):
        raise
    except ValueError as e:
        if str(e).startswith("--data:"):
            raise
        raise _cannot_read("--data", path, f"corrupt or truncated: {_first_line(e)}") from e
    except Exception as e:
        raise _cannot_read("--data", path, f"corrupt or truncated: {_first_line(e)}") from e


def _load_tensor_file(path: Path, key: str | None) -> Tensor:
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _numpy_array(path, key)
    if suffix in (".pt", ".pth"):
        obj = _torch_load(path, "--data")
        if isinstance(obj, Mapping):
            k = key or next((n for n in DATA_KEYS if n in obj), None)
            if k is None:
                raise KeyError(
                    f"--data: {str(path)!r} holds a dict {list(obj)}; choose one with --key"
                )
            if k not in obj:
                raise KeyError(f"--data: {str(path)!r} has no entry {k!r} (it has {list(obj)})")
            obj = obj[k]
        elif key is not None:
            raise _LoadError(
                f"--key {key!r}: {str(path)!r} holds a {type(obj).__name__}, not a dict, so "
                "--key names nothing there; leave it out"
            )
        if isinstance(obj, list | tuple) and obj:
            obj = obj[0]
        if not isinstance(obj, Tensor):
            raise TypeError(f"--data: {str(path)!r} holds {type(obj).__name__}, not a tensor")
        return obj
    raise ValueError(
        f"--data: unknown file type {suffix!r}; use .pt, .npy, .npz or MODULE:FUNCTION"
    )


def _option_problem(args: argparse.Namespace) -> str | None:
    """The first bad numeric option, said with the option's name."""
    for option, value in (
        ("--batch-size", args.batch_size),
        ("--num-batches", args.num_batches),
        ("--train-batch-size", args.train_batch_size),
    ):
        if value is not None and value < 1:
            return f"{option} must be >= 1, got {value}"
    return None


def _load_checkpoint(model: nn.Module, file: str) -> None:
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no file {file!r}")
    state = _torch_load(path, "--checkpoint")
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise _cannot_read(
            "--checkpoint", path, f"it holds a {type(state).__name__}, not a state dict"
        )
    missing, unexpected = _state_mismatch(model, state)
    bn_buffers = [k for k in missing if k.rpartition(".")[2] in _BN_BUFFERS]
    if missing and not unexpected and len(bn_buffers) == len(missing):
        # the checkpoint lacks only BN buffers: load the rest, so that the report shows what
        # the model does with the statistics it then has
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise _LoadError(f"--checkpoint: {file!r} does not fit the model: {e}") from e
        layers = sorted({k.rpartition(".")[0] for k in bn_buffers})
        print(
            f"batchnorm doctor: note: --checkpoint {file!r} holds no BN buffers (running_mean/"
            f"running_var/num_batches_tracked) for {len(layers)} layer(s) ({', '.join(layers[:8])}"
            f"{', …' if len(layers) > 8 else ''}); loaded the rest, those layers keep the "
            "statistics the model was built with",
            file=sys.stderr,
        )
        return
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise _LoadError(f"--checkpoint: {file!r} does not fit the model: {e}") from e


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _state_mismatch(model: nn.Module, state: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The model's state keys the checkpoint lacks, and the checkpoint's keys the model lacks."""
    own = set(model.state_dict().keys())
    given = {str(k) for k in state.keys()}
    return sorted(own - given), sorted(given - own)


def _first_batches(data: Any, num_batches: int, spec: str) -> Any:
    """Up to ``num_batches`` batches of what ``--data MODULE:FUNCTION`` returned, so that an
    exception raised while producing them is said to come from the user's function."""
    try:
        it = iter(data)
    except TypeError:
        return data  # not iterable: doctor() says so
    name = spec.rpartition(":")[2]
    out: list[Any] = []
    try:
        for batch in it:
            out.append(batch)
            if len(out) >= num_batches:
                break
    except Exception as e:
        raise _LoadError(
            f"--data: the batches of {name}() in {spec.rpartition(':')[0]!r} raised "
            f"{type(e).__name__} while being read: {e}"
        ) from e
    return out


def _spec_folders(*specs: str) -> list[str]:
    """The folders of the ``path/to/file.py:NAME`` specs, then the current folder."""
    out: list[str] = []
    for spec in specs:
        mod_name = spec.rpartition(":")[0]
        if mod_name.endswith(".py") or "/" in mod_name:
            out.append(str(Path(mod_name).resolve().parent))
    return [*out, os.getcwd()]


def main(args: argparse.Namespace) -> int:
    """Run ``batchnorm doctor``; exit code 1 when a finding of severity error (or, with
    ``--fail-on warning``, warning) exists, 2 when the model or data cannot be loaded, 0
    otherwise. The user's code runs with the current folder (and the folder of a
    ``path/to/file.py:NAME``) first on ``sys.path``, as ``python`` would have it."""
    problem = _option_problem(args)
    if problem is not None:
        say(f"batchnorm doctor: {problem}", err=True)
        return 2
    try:
        with _import_paths(*_spec_folders(args.factory, args.data)):
            report = _run_cli(args)
    except (
        _LoadError,
        ImportError,
        AttributeError,
        ValueError,
        TypeError,
        KeyError,
        FileNotFoundError,
        RuntimeError,
    ) as e:
        # a KeyError's str() is the repr of its message: print the message itself
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        msg = msg.removeprefix("doctor: ")  # the prefix of the library's messages
        # one line: torch's load_state_dict errors span several
        say(f"batchnorm doctor: {' '.join(msg.split())}", err=True)
        return 2
    # a reader that quits (`| head`) must not turn the exit code into a traceback's
    say(report.to_json() if args.json else report.format_text())
    failing = {"error"} if args.fail_on == "error" else {"error", "warning"}
    return 1 if any(f.severity in failing for f in report.findings) else 0


def _run_cli(args: argparse.Namespace) -> DoctorReport:
    model = _call_user(_load_object(args.factory, "MODULE:FACTORY"), args.factory, "MODULE:FACTORY")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"MODULE:FACTORY: {args.factory} returned {type(model).__name__}, not an nn.Module "
            "(the factory is called with no arguments and must return the model)"
        )
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    if args.mode == "eval":
        model.eval()
    elif args.mode == "train":
        model.train()
    data_path = Path(args.data)
    data: Any
    if data_path.suffix.lower() in (".pt", ".pth", ".npy", ".npz") or data_path.is_file():
        if not data_path.is_file():
            raise FileNotFoundError(f"--data: no file {args.data!r}")
        x = _load_tensor_file(data_path, args.key)
        if x.is_floating_point():
            x = x.to(next(model.parameters(), torch.empty(0)).dtype)
        data = x
    else:
        if args.key is not None:
            raise _LoadError(
                f"--key {args.key!r}: --data {args.data} is a function, so --key names "
                "nothing there; leave it out"
            )
        data = _call_user(_load_object(args.data, "--data"), args.data, "--data")
        data = _first_batches(data, args.num_batches, args.data)
    return doctor(
        model,
        data,
        args.num_batches,
        batch_size=args.batch_size,
        train_batch_size=args.train_batch_size,
    )
