"""Record how the distribution of a layer's inputs evolves over training.

Ioffe & Szegedy (2015, Sec. 4.1, Figure 1b/c) show the 15th, 50th and 85th percentiles of the
input to one sigmoid over training: drifting without BN, stable with it. :class:`ActivationRecorder`
records such percentiles for any layers of any model through forward hooks, cheaply: only on
chosen calls, only for chosen units, as a handful of numbers per record.
"""

from __future__ import annotations

import numbers
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ActivationRecorder"]

#: open blocks of the library's own measurements (they nest), whose forward passes no
#: recorder records or counts
_measuring = 0


@contextmanager
def measuring() -> Iterator[None]:
    """Mark the forward passes inside as a measurement of the library's (the analysis
    functions, the doctor): an attached :class:`ActivationRecorder` neither records nor counts
    them, so a measurement inside a training loop leaves its records and its ``every``
    schedule as they were (the doctor's deep copies carry the recorder's hooks too)."""
    global _measuring
    _measuring += 1
    try:
        yield
    finally:
        _measuring -= 1


class ActivationRecorder:
    r"""Record quantiles of the inputs (or outputs) of chosen layers over training.

    For a layer whose input is ``x`` with channels (units) on ``axis``, one record is, for each
    requested quantile :math:`q` and each recorded unit :math:`u`, the empirical quantile
    :math:`Q_q(\{x_{n,u,\dots}\})` over every other axis (examples and positions), computed by
    :func:`torch.quantile` (linear interpolation). A record is taken

    * every ``every``-th forward call of the layer (``every=1``: every call), or
    * with ``every=None``, only inside :meth:`capture` — e.g. on a fixed probe batch at
      evaluation points, which is what the lab's ``paper-mnist`` experiment does.

    A layer called with its tensor by keyword (``self.fc(input=x)``) is recorded; of a tuple
    output (an LSTM's) the first tensor; a call with no tensor warns once, an empty batch is
    skipped. The forward passes of the library's measurements (``batchnorm.analysis``, the
    doctor) are neither recorded nor counted.

    Memory: a record keeps its ``Q×U`` values and about half a kilobyte of bookkeeping, for as
    long as the recorder lives — with ``every=1`` a long training run grows it by one record per
    layer and step; record every k-th call, or ``history()`` then ``clear()`` as you go.

    Cost per record: one ``quantile`` over ``(N·L, U)`` values for the recorded units only
    (``max_samples`` subsamples larger inputs: a random subset of the ``N·L`` rows drawn from a
    fixed seed, the same from run to run, which cannot alias with periodic structure such as
    alternating columns the way a fixed stride would); nothing on other calls.

    Args:
        model: the network. layers: module names (``model.get_submodule`` paths, e.g.
            ``"hidden.2.act"``) or a mapping ``name → module``.
        quantiles: in [0, 1], e.g. ``(0.15, 0.5, 0.85)``.
        units: which channels to record: ``None`` (all), an int ``k >= 1`` (the first ``k``;
            all if the layer has fewer) or a non-empty list of indices ``>= 0`` (each must be
            below the layer's channel count; checked when the layer is recorded).
        every: record every ``every``-th call; ``None`` for :meth:`capture` only.
        what: ``"input"`` (a forward pre-hook: what the layer receives) or ``"output"``.
        axis: the channel axis of the recorded tensor (1 for ``(N, C)`` and ``(N, C, H, W)``).
        max_samples: cap on the values per unit used for one record (``None``: no cap).

    Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid())
        >>> rec = batchnorm.ActivationRecorder(net, ["1"], quantiles=(0.15, 0.5, 0.85))
        >>> with rec:
        ...     for step in range(3):
        ...         rec.step = step
        ...         _ = net(torch.randn(32, 4))
        >>> steps, values = rec.history("1")
        >>> steps.tolist(), values.shape    # (records, quantiles, units)
        ([0, 1, 2], (3, 3, 3))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | Mapping[str, nn.Module],
        quantiles: Sequence[float] = (0.15, 0.5, 0.85),
        *,
        units: int | Sequence[int] | None = None,
        every: int | None = 1,
        what: Literal["input", "output"] = "input",
        axis: int = 1,
        max_samples: int | None = 100_000,
    ) -> None:
        if isinstance(layers, str):
            raise TypeError(
                f"ActivationRecorder: layers must be a list of layer names (or a mapping), got "
                f"the string {layers!r}; pass [{layers!r}]"
            )
        if isinstance(layers, Mapping):
            self.layers: dict[str, nn.Module] = dict(layers)
            wrong = [k for k, v in self.layers.items() if not isinstance(v, nn.Module)]
            if wrong:
                raise TypeError(
                    f"ActivationRecorder: a mapping of layers must map names to modules; "
                    f"{wrong} map to {[type(layers[k]).__name__ for k in wrong]}"
                )
        else:
            self.layers = {}
            for name in layers:
                try:
                    self.layers[name] = model.get_submodule(name)
                except AttributeError:
                    known = [n for n, _ in model.named_modules() if n][:20]
                    raise ValueError(
                        f"ActivationRecorder: the model has no layer {name!r}; layer names "
                        f"look like {known}"
                    ) from None
        if not self.layers:
            raise ValueError("ActivationRecorder: give at least one layer to record")
        one = single_number(quantiles)
        if one is not None:
            raise TypeError(
                f"ActivationRecorder: quantiles must be a list of levels, got {quantiles!r}; "
                f"pass quantiles=[{one!r}]"
            )
        q = [float(v) for v in quantiles]
        if not q or not all(0.0 <= v <= 1.0 for v in q):
            raise ValueError(f"ActivationRecorder: quantiles must be in [0, 1], got {quantiles}")
        if every is not None and (
            not isinstance(every, int) or isinstance(every, bool) or every < 1
        ):
            raise ValueError(
                f"ActivationRecorder: every must be an int >= 1 or None, got {every!r}"
            )
        if what not in ("input", "output"):
            raise ValueError(f"ActivationRecorder: what must be 'input' or 'output', got {what!r}")
        cap: Any = max_samples
        if cap is not None and (
            not isinstance(cap, numbers.Integral) or isinstance(cap, bool) or cap < 1
        ):
            raise ValueError(
                f"ActivationRecorder: max_samples must be an int >= 1 or None (no cap), got "
                f"{max_samples!r}"
            )
        unit_axis: Any = axis
        if not isinstance(unit_axis, numbers.Integral) or isinstance(unit_axis, bool):
            raise TypeError(
                f"ActivationRecorder: axis must be an int, the unit (channel) axis, got {axis!r}"
            )
        self.quantiles = tuple(q)
        self.units: int | tuple[int, ...] | None = _check_units(units)
        self.every = every
        self.what = what
        self.axis = axis
        self.max_samples = max_samples
        #: the step a record is tagged with; set it from the training loop (default: call index)
        self.step: int | None = None
        self._q = torch.tensor(q, dtype=torch.float64)  # (converted to the values' dtype)
        self._calls: dict[str, int] = dict.fromkeys(self.layers, 0)
        self._records: dict[str, list[tuple[int, Tensor]]] = {n: [] for n in self.layers}
        self._handles: list[Any] = []
        self._capturing = 0  # open capture blocks (they nest)
        self._warned: set[str] = set()
        self._subsets: dict[int, Tensor] = {}  # rows kept when subsampling, by row count

    # -- hooks ----------------------------------------------------------------------------

    def attach(self) -> ActivationRecorder:
        """Install the hooks (idempotent)."""
        if self._handles:
            return self
        for name, module in self.layers.items():
            if self.what == "input":
                h = module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True)
            else:
                h = module.register_forward_hook(self._post_hook(name))
            self._handles.append(h)
        return self

    def detach(self) -> None:
        """Remove the hooks; the records are kept."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ActivationRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @contextmanager
    def capture(self, step: int | None = None) -> Iterator[ActivationRecorder]:
        """Record every hooked call inside the block (tagged with ``step``), whatever
        ``every`` says; attaches the hooks for the block if they are not attached."""
        attached_here = not self._handles
        self.attach()
        old_step = self.step
        self._capturing += 1
        if step is not None:
            self.step = step
        try:
            yield self
        finally:
            self._capturing -= 1
            self.step = old_step if step is not None else self.step
            if attached_here:
                self.detach()

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # the first tensor argument, given by position or by keyword (self.fc(input=x))
            self._observe(name, first_tensor([*args, *kwargs.values()]), module)

        return hook

    def _post_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # a tuple output (an LSTM's (output, (h, c))): its first tensor
            self._observe(name, first_tensor(output), module)

        return hook

    def _observe(self, name: str, x: Tensor | None, module: nn.Module) -> None:
        if _measuring:  # a pass of the library's measurements: not a call of the training
            return
        call = self._calls[name]
        self._calls[name] = call + 1
        if not self._capturing and (self.every is None or call % self.every != 0):
            return
        if x is None:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"ActivationRecorder: layer {name!r} ({type(module).__name__}) was called "
                    f"with no tensor {self.what} to record; nothing is recorded for it",
                    stacklevel=3,
                )
            return
        if x.numel() == 0:  # an empty batch: no values to take quantiles of
            return
        step = self.step if self.step is not None else call
        self._records[name].append((step, self._quantiles(x.detach(), name)))

    def _subset(self, rows: int, keep: int) -> Tensor:
        """Sorted indices of ``keep`` of ``rows`` rows, drawn without replacement from a fixed
        seed: reproducible run to run, and unlike a stride, blind to periodic structure."""
        idx = self._subsets.get(rows)
        if idx is None or idx.numel() != keep:
            if len(self._subsets) >= 16:  # many input sizes (variable lengths): bound the cache
                self._subsets.clear()
            gen = torch.Generator().manual_seed(0)
            idx = torch.randperm(rows, generator=gen)[:keep].sort().values
            self._subsets[rows] = idx
        return idx

    def _quantiles(self, x: Tensor, name: str = "") -> Tensor:
        """``(Q, U)`` quantiles of ``x`` per unit over all other axes."""
        if x.dim() == 1:
            x = x.unsqueeze(1)  # (N,) -> (N, 1): one unit
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(
                f"ActivationRecorder: axis={self.axis} but layer {name!r} records a "
                f"{x.dim()}-D tensor (shape {tuple(x.shape)}); pass the channel axis of that "
                f"tensor, between {-x.dim()} and {x.dim() - 1} (1 for (N, C) and (N, C, H, W))"
            )
        flat = x.movedim(self.axis, -1).reshape(-1, x.shape[self.axis])  # (N·L, C)
        if self.units is not None:
            c = flat.shape[1]
            if isinstance(self.units, int):
                idx = torch.arange(min(self.units, c))
            else:
                bad = [u for u in self.units if u >= c]
                if bad:
                    raise ValueError(
                        f"ActivationRecorder: units={list(self.units)} but layer {name!r} has "
                        f"{c} units on axis {self.axis} (shape {tuple(x.shape)}); indices "
                        f"{bad} are out of range: pass indices below {c}, or units=None for all"
                    )
                idx = torch.as_tensor(self.units, dtype=torch.long)
            flat = flat.index_select(1, idx.to(flat.device))  # (N·L, U)
        if self.max_samples is not None and flat.shape[0] > self.max_samples:
            rows = self._subset(flat.shape[0], self.max_samples)
            flat = flat.index_select(0, rows.to(flat.device))
        if flat.dtype != torch.float64:  # (float64 keeps its digits)
            flat = flat.float()
        return quantiles(flat, self._q).cpu()  # (Q, U)

    # -- results --------------------------------------------------------------------------

    def history(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps (T,), values (T, Q, U))`` recorded for ``layer``."""
        if layer not in self._records:
            raise KeyError(
                f"ActivationRecorder.history: {layer!r} is not a recorded layer; the recorded "
                f"layers are {list(self._records)}"
            )
        recs = self._records[layer]
        if not recs:
            return np.zeros(0, dtype=np.int64), np.zeros((0, len(self.quantiles), 0))
        steps = np.array([s for s, _ in recs], dtype=np.int64)
        widths = sorted({v.shape[1] for _, v in recs})
        if len(widths) > 1:
            raise ValueError(
                f"ActivationRecorder.history: layer {layer!r} was recorded with {widths} units "
                "(its input changed width between calls); record a fixed number of units "
                "(units=k or a list of indices), or clear() between the phases"
            )
        values = torch.stack([v.double() for _, v in recs]).numpy()
        return steps, values

    def clear(self) -> None:
        """Forget all records and call counts."""
        for n in self.layers:
            self._records[n] = []
            self._calls[n] = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"quantiles", "layers": {name: {"steps", "values" (T×Q×U)}}}``."""
        out: dict[str, Any] = {"quantiles": list(self.quantiles), "layers": {}}
        for n in self.layers:
            steps, values = self.history(n)
            out["layers"][n] = {"steps": steps.tolist(), "values": values.tolist()}
        return out


#: the most values torch.quantile takes in one call (2**24); NumPy takes more
_QUANTILE_MAX = 1 << 24


def quantiles(values: Tensor, levels: Tensor, dim: int = 0) -> Tensor:
    """``torch.quantile(values, levels, dim)`` (linear interpolation) in ``values``' dtype, for
    any number of values: beyond torch's limit of 2**24 NumPy computes them, the same way."""
    if values.numel() <= _QUANTILE_MAX:
        return torch.quantile(values, levels.to(values), dim=dim)
    q = np.quantile(values.cpu().numpy(), levels.double().numpy(), axis=dim)
    return torch.from_numpy(np.asarray(q)).to(values.dtype)


def single_number(x: Any) -> float | None:
    """``x`` as a Python number when it is one number — a Python or NumPy scalar, a 0-d tensor
    or array — where a list of numbers is expected (to name the list to pass instead); else
    None."""
    if isinstance(x, np.generic | Tensor | np.ndarray) and x.ndim == 0:
        return x.item()
    return x if isinstance(x, int | float) else None


def first_tensor(y: Any) -> Tensor | None:
    """The first tensor in ``y``: ``y`` itself, or the first found depth first in its tuples,
    lists and dict values (a layer's tuple output, a model's dict output), else its
    ``logits``."""
    if isinstance(y, Tensor):
        return y
    if isinstance(y, list | tuple):
        for v in y:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(y, Mapping):
        for v in y.values():
            t = first_tensor(v)
            if t is not None:
                return t
    logits = getattr(y, "logits", None)  # a model output object (transformers' ModelOutput)
    return logits if isinstance(logits, Tensor) else None


def _check_units(units: int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    """Validate ``units`` up front (the channel count is only known when a layer runs)."""
    if units is None:
        return None
    if isinstance(units, bool):
        raise ValueError(
            f"ActivationRecorder: units must be None, an int >= 1 or a list of indices, got "
            f"{units!r}"
        )
    if not isinstance(units, Sequence | np.ndarray | Tensor):
        try:
            k = operator.index(units)
        except TypeError:
            raise ValueError(
                f"ActivationRecorder: units must be None, an int >= 1 or a list of indices, got "
                f"{type(units).__name__}"
            ) from None
        if k < 1:
            raise ValueError(
                f"ActivationRecorder: units={k} records no unit; pass k >= 1 for the first k "
                "units, a list of indices, or units=None for all"
            )
        return k
    try:
        if any(isinstance(u, bool) for u in units):
            raise TypeError
        idx = tuple(operator.index(u) for u in units)
    except TypeError:
        raise ValueError(
            f"ActivationRecorder: units must be a list of integer indices, got {units!r}"
        ) from None
    if not idx:
        raise ValueError(
            "ActivationRecorder: units=[] records no unit; list at least one index, or pass "
            "units=None for all"
        )
    negative = [u for u in idx if u < 0]
    if negative:
        raise ValueError(
            f"ActivationRecorder: units={list(idx)} has negative indices {negative}; pass indices "
            ">= 0 (e.g. C - 1 for the last of C units)"
        )
    return idx
