"""Synchronized batch normalization across processes, on :mod:`torch.distributed`.

When a batch is split over R replicas, each replica normalizes with the statistics of the whole
batch instead of its own slice (Ioffe & Szegedy 2015, Algorithm 1, with the mini-batch being the
union of the per-replica batches). The transport is torch.distributed itself — gloo on CPU,
NCCL on GPU — through one ``all_gather`` per layer per forward and one per backward.

Protocol (one message per collective, float64)::

    [kind, C, tag, call, count, width, 0, 0 | payload₀ (width) | payload₁ (width)]

* forward: ``payload = (mean_r, M2_r)`` of the rank's slice, ``count = n_r`` (0 allowed);
* backward: ``payload = (Σdy, Σdy·x̂)`` of the rank's slice;
* recalibration: ``payload = (mean_r, M2_r)`` of the rank's population statistics.

Why ``all_gather`` of ``(n, mean, M2)`` rather than an ``all_reduce`` of sums: every rank receives
the same R messages and merges them in rank order with Chan et al.'s parallel formula
(``mean = Σ nᵣ·meanᵣ / N``, ``M2 = Σ M2ᵣ + Σ nᵣ·(meanᵣ − mean)²``) in float64 — no
``Σx² − N·mean²`` cancellation, exact for ranks with ``n = 0``, and bitwise identical statistics
(hence running statistics) on every rank. The header rides in the same message, so checking that
every rank is at the same layer, the same call and the same channel count costs no extra
collective. R·max(8 + 2·width, 8 + 2·2048) doubles per layer are negligible next to a gradient
all-reduce.

All messages of one layer have the same length ``8 + 2·width``; :func:`convert_sync_batchnorm`
gives every layer of a model the model's largest channel count as ``width``. Collectives of
unequal lengths cannot be reported (gloo aborts the receiving process), so the first collective
of every exchange has one fixed length, 8 + 2·2048 doubles (the header and the start of the
payload, zero-padded),
whatever the layer or the kind of exchange; a wider message sends its rest in a second
collective once the headers agree. Ranks at different layers, calls or kinds of exchange (a
skipped layer, a recalibration pass with a different number of batches) or with different
channel counts get a clear :class:`SyncBatchNormError` on every rank instead of a crash.
"""

from __future__ import annotations

import datetime
import numbers
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.convert import _copy_state
from batchnorm.functional import BatchNormInputError, NonFinitePolicy
from batchnorm.nn.batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNormBase,
    forwarding_signature,
)
from batchnorm.variants import check_not_scripted

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormError",
    "convert_sync_batchnorm",
    "all_reduce_population_stats",
    "merge_stats",
]

_HEADER = 8
# doubles in the first collective of every exchange: the header and payloads of up to 2048
# channels, the width convert_sync_batchnorm gives every layer of most CNNs anyway (wider
# messages send their rest in a second collective)
_FIRST = _HEADER + 2 * 2048
_FORWARD, _BACKWARD, _POPULATION = 1, 2, 3
_KIND_NAMES = {
    _FORWARD: "forward",
    _BACKWARD: "backward",
    _POPULATION: "recalibration",
}
# the message of another rank's gloo error when that rank's process closed its connections
_CLOSED = ("closed by peer", "connection closed", "connection reset", "broken pipe", "refused")

# process groups on which an exchange was given up after a timeout, with what was given up: the
# abandoned collective stays pending, and a later one of this rank would pair with another
# rank's earlier message (its statistics merged with the wrong step's, without an error)
_OUT_OF_STEP: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _group_key(group: Any) -> Any:
    return group if group is not None else dist.group.WORLD


# tag -> layer name, so a rank can name the layer another rank is in (models are identical)
_TAG_NAMES: dict[int, str] = {}


class SyncBatchNormError(RuntimeError):
    """The ranks of a synchronized layer disagree (layer, call, channel count) or did not all
    reach it in time; raised on every rank that takes part, naming the layer and a remedy."""


# --------------------------------------------------------------------------------------------
# statistics


def merge_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-group ``(n_r, mean_r, M2_r)`` into ``(N, mean, M2)`` (Chan, Golub & LeVeque 1979,
    the k-group form of the pairwise update), in float64, groups in order.

    Args:
        counts: ``(R,)`` sample counts (0 allowed). means, m2s: ``(R, C)``; rows with ``n_r = 0``
        are ignored whatever they hold.

    Returns ``N`` (0-dim), ``mean`` and ``M2 = Σ (x − mean)²`` (both ``(C,)``); the biased
    variance is ``M2 / N``.
    """
    n = counts.to(torch.float64)
    total = n.sum()
    live = (n > 0).view(-1, 1)
    mu = torch.where(live, means.to(torch.float64), 0.0)
    m2 = torch.where(live, m2s.to(torch.float64), 0.0)
    w = n.view(-1, 1)
    mean = (w * mu).sum(0) / total.clamp_min(1.0)
    dev = torch.where(live, mu - mean, 0.0)
    return total, mean, m2.sum(0) + (w * dev * dev).sum(0)


# --------------------------------------------------------------------------------------------
# the exchange


@dataclass
class _Exchange:
    """Who a layer talks to and how its messages are labelled."""

    group: Any  # a ProcessGroup or None (the default group)
    timeout: float | None
    layer: str
    tag: int
    width: int
    channels: int


def _tag(name: str | None) -> int:
    """A stable integer for a layer's qualified name (exact in float64)."""
    tag = zlib.crc32((name or "").encode()) if name else 0
    if name:
        _TAG_NAMES[tag] = name
    return tag


def _world(group: Any) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _describe(row: Tensor) -> str:
    kind, c, tag, call = (int(v) for v in row[:4].tolist())
    where = f"'{_TAG_NAMES[tag]}'" if tag in _TAG_NAMES else f"a layer with {c} channels"
    return f"the {_KIND_NAMES.get(kind, '?')} of {where} (call {call}, {c} channels)"


def _check_headers(gathered: Tensor, ex: _Exchange, rank: int) -> None:
    """Every rank must be at the same kind of exchange of the same layer, call and width."""
    head = gathered[:, :6]
    keys = [0, 1, 2, 3, 5]  # kind, channels, tag, call, width (the counts may differ)
    if bool((head[:, keys] == head[rank, keys]).all()):
        return
    rows = "; ".join(f"rank {r} is in {_describe(gathered[r])}" for r in range(len(gathered)))
    same_place = bool((head[:, [0, 2, 3]] == head[rank, [0, 2, 3]]).all())
    if same_place and bool((head[:, 1] == head[rank, 1]).all()):
        widths = ", ".join(f"rank {r}: {int(head[r, 5])}" for r in range(len(gathered)))
        raise SyncBatchNormError(
            f"{ex.layer} on rank {rank}: the message widths differ across ranks ({widths}): the "
            "models differ elsewhere (convert_sync_batchnorm uses the widest BN layer). Build the "
            "model identically on every rank."
        )
    if same_place:
        channels = ", ".join(f"rank {r}: {int(head[r, 1])}" for r in range(len(gathered)))
        raise SyncBatchNormError(
            f"{ex.layer} on rank {rank}: the channel counts differ across ranks ({channels}). "
            "Build the model identically on every rank (same widths, same checkpoint)."
        )
    kinds = set(head[:, 0].tolist())
    if _POPULATION in kinds and len(kinds) > 1:
        raise SyncBatchNormError(
            f"{ex.layer} on rank {rank}: the ranks are not at the same synchronized layer: {rows}. "
            "recalibrate(distributed=True) runs the model's synchronized layers once per batch, "
            "so every rank must pass the same number of batches (after num_samples); give "
            "every rank an equal share of the data, or convert the "
            "synchronized layers to plain BN for the recalibration pass."
        )
    raise SyncBatchNormError(
        f"{ex.layer} on rank {rank}: the ranks are not at the same synchronized layer: {rows}. "
        "A rank skipped a synchronized layer or ran the model a different number of times in "
        "training mode; every rank must run the same synchronized layers in the same order "
        "(same control flow on every rank, or model.eval() for local-only passes)."
    )


def _exchange(
    ex: _Exchange, kind: int, call: int, count: int, payload: Tensor
) -> tuple[Tensor, Tensor]:
    """All-gather this rank's message; return the ranks' ``(counts (R,), payloads (R, 2, C))``.

    The first collective always carries :data:`_FIRST` doubles on every rank (the header and
    the start of the payload, zero-padded), whatever the layer or the kind of exchange, so ranks
    at different layers, calls or widths are reported from the headers instead of exchanging
    messages of different lengths; a longer message sends its rest in a second collective once
    the headers agree. Raises :class:`SyncBatchNormError` on every participating rank when the
    headers disagree, and on a rank whose collective fails or times out.
    """
    c, width = ex.channels, ex.width
    full = _HEADER + 2 * width
    msg = torch.zeros(max(full, _FIRST), dtype=torch.float64, device=payload.device)
    msg[:6] = torch.tensor([kind, c, ex.tag, call, count, width], dtype=torch.float64)
    body = msg[_HEADER:full].view(2, width)  # (2, width): the payload, zero-padded to the width
    body[:, :c] = payload
    gathered = _gather(ex, kind, call, msg[:_FIRST])
    if full > _FIRST:  # the headers agree, so every rank sends a rest of the same length
        rest = _gather(ex, kind, call, msg[_FIRST:full], check=False)
        gathered = torch.cat([gathered, rest], dim=1)
    world = gathered.shape[0]
    payloads = gathered[:, _HEADER:full].reshape(world, 2, width)[:, :, :c]
    return gathered[:, 4], payloads


def _gather(ex: _Exchange, kind: int, call: int, msg: Tensor, *, check: bool = True) -> Tensor:
    """All-gather ``msg`` over the layer's group (bounded by the timeouts) and check the headers;
    returns the ranks' messages stacked, (R, len(msg))."""
    world, rank = _world(ex.group)
    if world == 1:
        gathered = msg.unsqueeze(0)
    else:
        if F._tracing():
            # (the tracer cannot take the collective's list of tensors, and a traced graph
            # would replay one step's exchange as constants)
            raise SyncBatchNormError(
                f"{ex.layer} on rank {rank}: torch.jit.trace cannot record the exchange of a "
                f"synchronized layer in training mode across {world} ranks. Trace the model in "
                "eval mode (model.eval()), or use torch.compile, which runs the exchange."
            )
        key = _group_key(ex.group)
        given_up = _OUT_OF_STEP.get(key)
        if given_up is not None:
            raise SyncBatchNormError(
                f"{ex.layer} on rank {rank}: this rank gave up an earlier exchange on this "
                f"process group after its timeout ({given_up}), and that collective is still "
                "pending: any later one would pair with another rank's earlier message and "
                "merge the wrong step's statistics. The process group cannot be used for "
                "synchronized BN any more; re-create it (dist.destroy_process_group(), then "
                "dist.init_process_group(...) on every rank), e.g. by restarting from a "
                "checkpoint, or raise the layer's timeout."
            )
        out = [torch.empty_like(msg) for _ in range(world)]
        try:
            work = dist.all_gather(out, msg, group=ex.group, async_op=True)
            assert work is not None
            if ex.timeout is None:
                work.wait()  # bounded by the process group's timeout
            else:
                work.wait(timeout=datetime.timedelta(seconds=ex.timeout))
        except RuntimeError as err:
            what = f"{ex.layer} on rank {rank}: the {_KIND_NAMES[kind]} exchange (call {call})"
            if any(s in str(err).lower() for s in _CLOSED):
                raise SyncBatchNormError(
                    f"{what} failed: another rank closed its connection (it crashed or exited, "
                    "e.g. after an error of its own: see that rank's output). Every rank must "
                    f"run every synchronized layer in training mode. Original error: {err}"
                ) from err
            limit = (
                f"{ex.timeout:g} s (the layer's timeout)"
                if ex.timeout is not None
                else "the process group's timeout"
            )
            _OUT_OF_STEP[key] = f"{what} after {limit}"
            raise SyncBatchNormError(
                f"{what} did not complete within {limit}: another rank did not reach this layer "
                "(it skipped it, raised an error, or stopped). Every rank must run every "
                "synchronized layer in training mode, including ranks with an empty batch. "
                "Synchronized layers on this process group now refuse to run on this rank (the "
                "abandoned collective is still pending); re-create the group to go on. "
                f"Original error: {err}"
            ) from err
        gathered = torch.stack(out)  # (R, len(msg))
    if check:
        _check_headers(gathered, ex, rank)
    return gathered


# --------------------------------------------------------------------------------------------
# the autograd Function


class _SyncBatchNormFunction(torch.autograd.Function):
    """Algorithm 1 over the union of the ranks' batches, on a canonical tensor.

    Forward: local ``(n, mean, M2)`` → one all-gather → merged statistics → the core's
    normalization. Backward: local ``(Σdy, Σdy·x̂)`` → one all-gather → the compact gradient
    ``dx = γ·invstd/N · (N·dy − Σ_all dy − x̂·Σ_all dy·x̂)``; ``dγ``, ``dβ`` stay local sums
    (DistributedDataParallel reduces them across ranks like any parameter gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        ex: _Exchange,
        call: int,
        update: Callable[[Tensor, Tensor, int], None],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cd = F._compute_dtype(x.dtype)
        xc = x.to(cd)
        n = xc.numel() // ex.channels
        if n > 0:
            local_mean, local_var, _ = F._stats(xc, eps)
            payload = torch.stack([local_mean, local_var * n]).to(torch.float64)  # (2, C)
        else:  # an empty slice: count 0, still part of the exchange
            payload = torch.zeros(2, ex.channels, dtype=torch.float64, device=x.device)
        counts, data = _exchange(ex, _FORWARD, call, n, payload)
        total, mean64, m2 = merge_stats(counts, data[:, 0], data[:, 1])
        if total < 2:
            raise BatchNormInputError(
                f"{ex.layer}: expected more than 1 value per channel over all ranks when "
                f"training, got {int(total)} (this rank's input has shape {tuple(x.shape)}). "
                "Use larger batches, or call .eval() to use the running statistics."
            )
        var64 = m2 / total
        mean, var = mean64.to(cd), var64.to(cd)
        invstd = torch.rsqrt(var64 + eps).to(cd)
        w = None if weight is None else weight.to(cd)
        b = None if bias is None else bias.to(cd)
        y = F._normalize(xc, mean, invstd, w, b).to(x.dtype)
        # the running statistics before anything is saved: non-reentrant activation
        # checkpointing stops its recomputation once the last saved tensor is packed, and the
        # recomputed step updates them as torch.nn's layers do (twice per step, as there)
        update(mean, var, int(total))
        ctx.save_for_backward(x, weight, mean, invstd)  # type: ignore[arg-type]
        ctx.ex, ctx.call, ctx.total = ex, call, float(total)  # type: ignore[attr-defined]
        ctx.layer = ex.layer  # type: ignore[attr-defined]
        total_t = total.to(device=x.device)
        ctx.mark_non_differentiable(mean, var, total_t)
        return y, mean, var, total_t

    @staticmethod
    @F.first_order(
        "its backward exchanges sums across the ranks outside autograd (torch.nn.SyncBatchNorm "
        "has none either)",
        "a BatchNorm of each rank's own batch has one",
    )
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        dy: Tensor,
        _dmean: Tensor,
        _dvar: Tensor,
        _dtotal: Tensor,
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        ex: _Exchange = ctx.ex  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        cd = mean.dtype
        xc, dyc = x.to(cd), dy.to(cd)
        dims = F._dims(xc)
        xhat = (xc - F._b(mean, xc)) * F._b(invstd, xc)
        sum_dy = dyc.sum(dims)  # this rank's dβ
        sum_dy_xhat = (dyc * xhat).sum(dims)  # this rank's dγ
        dx = None
        # needs_input_grad is a property of the graph, the same on every rank, so skipping the
        # exchange when no rank needs dx (BN straight on the data) keeps the ranks in step
        if needs[0]:
            n = xc.numel() // ex.channels
            local = torch.stack([sum_dy, sum_dy_xhat]).to(torch.float64)  # (2, C)
            _, data = _exchange(ex, _BACKWARD, ctx.call, n, local)  # type: ignore[attr-defined]
            all_dy, all_dy_xhat = data.sum(0).to(cd)  # ranks summed in rank order: identical
            total: float = ctx.total  # type: ignore[attr-defined]
            w = None if weight is None else weight.to(cd)
            # the core's compact formula with all ranks' sums and count
            dx = F.dx_from_sums(dyc, xhat, invstd, w, total, all_dy, all_dy_xhat).to(x.dtype)
        dw = sum_dy_xhat.to(weight.dtype) if needs[1] and weight is not None else None
        db = None
        if needs[2]:
            db = sum_dy.to(dy.dtype if weight is None else weight.dtype)
        return dx, dw, db, None, None, None, None


# --------------------------------------------------------------------------------------------
# the module


class SyncBatchNorm(_BatchNormBase):
    r"""Batch normalization whose training statistics span every rank of a process group.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    with μ_B and the biased σ²_B taken per channel over the union of the ranks' batches
    (Ioffe & Szegedy 2015, Algorithm 1, arXiv 1502.03167). Ranks may hold different batch sizes,
    including empty ones: statistics are weighted by sample count, so outputs, input gradients,
    the ranks' summed γ/β gradients and the running statistics equal single-process BN on the
    concatenated batch. The running statistics are bitwise identical on every rank.

    Communication: one ``all_gather`` per forward and one per backward (two each for messages
    wider than 2048 channels), on ``process_group``
    (default: the default group); none in eval mode (inherited: the running statistics), none
    without an initialized process group (then it is plain BN). gloo (CPU) and NCCL (GPU).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, axis, center,
        scale, unbiased_running_var, nonfinite, backend and further keyword options: as
        :class:`batchnorm.BatchNorm` (``backend`` applies to eval mode and to single-process
        use, the synchronized path is plain torch around the exchange; ``small_batch`` applies
        only without a process group, since a rank's slice may hold 0 or 1 samples).
        process_group: the group whose ranks share statistics (``torch.distributed.new_group``).
        timeout: seconds to wait for the other ranks at this layer before raising
        :class:`SyncBatchNormError`; ``None`` uses the process group's timeout
        (``init_process_group(timeout=...)``).
        name: the layer's qualified name, used in errors and to check that all ranks are at the
        same layer (set by :func:`convert_sync_batchnorm`).
        sync_width: message width (≥ ``num_features``); the same for every layer of a model
        makes a rank that diverges between layers a clear error (set by
        :func:`convert_sync_batchnorm`).

    Shape: any ``(…, C, …)`` with C at ``axis``, at least 2-D; a rank's batch may be empty.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.SyncBatchNorm(8)  # without a process group: plain BN
        >>> bn(torch.randn(4, 8, 3, 3)).shape
        torch.Size([4, 8, 3, 3])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        axis: int = 1,
        center: bool | None = None,
        scale: bool | None = None,
        unbiased_running_var: bool = True,
        nonfinite: NonFinitePolicy = "warn",
        backend: str | None = None,
        timeout: float | None = None,
        name: str | None = None,
        sync_width: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            axis=axis,
            center=center,
            scale=scale,
            unbiased_running_var=unbiased_running_var,
            nonfinite=nonfinite,
            backend=backend,
            **kwargs,
        )
        self.name = name
        _tag(name)  # known by name, so that another rank's errors can name this layer
        check_timeout(timeout, self.layer_name())
        if sync_width is not None and sync_width < num_features:
            raise ValueError(
                f"{self.layer_name()}: sync_width must be >= num_features ({num_features}), "
                f"got {sync_width}"
            )
        self.process_group = process_group
        self.timeout = timeout
        self.sync_width = sync_width
        self._sync_calls = 0  # synchronized forwards so far: every rank must agree

    def layer_name(self) -> str:
        base = super().layer_name()
        return f"{base} '{self.name}'" if self.name else base

    # True: training normalizes with this rank's batch alone, without communication (the
    # doctor's probe copies, so that one rank can be checked on its own without a hang)
    _local_only = False

    def _syncing(self) -> bool:
        return self.training and not self._local_only and _world(self.process_group)[0] > 1

    def _check_small(self, input: Tensor, mask: Tensor | None) -> int:
        # a rank's slice may be tiny or empty: only the count over all ranks matters, and it is
        # known after the exchange (which raises below 2); a local shortcut would skip the
        # collective and leave the other ranks waiting
        if self._syncing():
            return 2 + input.numel()
        return super()._check_small(input, mask)  # type: ignore[misc]

    def _forward_train(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise BatchNormInputError(
                f"{self.layer_name()}: SyncBatchNorm does not support a mask (input shape "
                f"{tuple(input.shape)}); use batchnorm.BatchNorm for masked statistics."
            )
        if not self._syncing():
            # one process, or eval mode without running statistics: the local batch
            return super()._forward_train(input)
        ax = self.axis % input.dim()
        # before the exchange: a rank that fails inside it leaves the others waiting
        F.check_vectors(input, ax, self._per_channel(), self.layer_name())
        xc, restore = F.canonical_layout(input, ax)  # (N, C, L) or (M, C)
        ex = _Exchange(
            group=self.process_group,
            timeout=self.timeout,
            layer=self.layer_name(),
            tag=_tag(self.name),
            width=self.sync_width or self.num_features,
            channels=self.num_features,
        )
        y, _, _, _ = _SyncBatchNormFunction.apply(
            xc, self.weight, self.bias, self.eps, ex, self._sync_calls - 1,
            self._update_running_stats,
        )  # fmt: skip
        if input.numel() == 0:
            # an empty rank's output: laid out as torch.nn lays out an empty batch's
            return restore(y).as_strided(input.shape, torch.empty_like(input).stride())
        return restore(y)

    def _checked(self, input: Tensor) -> bool:
        if self._syncing():
            # the call is counted before any check of its input: a rank whose input is refused
            # and which goes on to its next batch is then a call ahead, which the next exchange
            # reports on every rank, instead of merging that batch with this call's
            self._sync_calls += 1
        return super()._checked(input)


# --------------------------------------------------------------------------------------------
# conversion

# converted whatever their subclass: torch.nn's batch norm (as torch's own converter does) and
# our plain layers; our variants (ghost, renorm, frozen, …) change what the statistics mean, so
# they are left as they are
_TORCH_BN: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
_OURS: tuple[type[nn.Module], ...] = (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)
# the attributes a layer class may define without changing what the layer computes
_PLAIN_ATTRS = {"__module__", "__qualname__", "__doc__", "__init__", "__annotations__"}
_PLAIN_ATTRS |= {"__dict__", "__weakref__", "__firstlineno__", "__static_attributes__"}


SyncBatchNorm.__init__.__signature__ = forwarding_signature(  # type: ignore[attr-defined]
    SyncBatchNorm.__init__, _BatchNormBase.__init__
)


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "batchnorm"


def _convertible(m: nn.Module) -> bool:
    cls = type(m)
    if isinstance(m, _TORCH_BN) and not isinstance(m, _BatchNormBase):
        return True  # torch.nn's (ours derive from its classes: decided below)
    if cls in _OURS:
        return True
    # a user's subclass of our plain layers (not of a variant)
    return isinstance(m, _OURS) and all(not _ours(k) or k in _OURS for k in _user_classes(cls))


def _user_classes(cls: type) -> list[type]:
    """The classes of ``cls``'s MRO below the library's base layer (torch's or ours)."""
    out = []
    for k in cls.__mro__:
        if k in _OURS or k.__module__.startswith("torch."):
            break
        out.append(k)
    return out


def _named_bn(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # every name a layer is registered under (a layer listed twice is replaced at both)
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, SyncBatchNorm) or _convertible(m):
            yield name, m
        elif isinstance(m, (*_TORCH_BN, _BatchNormBase)) and not _ours(type(m)):
            warnings.warn(
                f"convert_sync_batchnorm: layer {name!r} ({type(m).__name__}) subclasses a "
                "batch-norm variant of batchnorm and is left unchanged (not synchronized); "
                "replace it yourself if it should share statistics across ranks",
                UserWarning,
                stacklevel=3,
            )


def _check_lazy(m: nn.Module, name: str) -> None:
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise ValueError(
            f"convert_sync_batchnorm: layer {name!r} ({type(m).__name__}) is not initialized, so "
            "its channel count (and the model's message width) is unknown; run one forward "
            "pass first (a dry run materializes lazy layers) or give it num_features"
        )


def _extra_state(m: nn.Module, new: nn.Module, name: str) -> None:
    """Carry a subclass's own parameters, buffers, submodules and attributes over to ``new``,
    and warn when the class changes the computation, which the synchronized layer cannot keep."""
    classes = _user_classes(type(m))
    if not classes:
        return
    for key, p in m._parameters.items():
        if key not in new._parameters and not hasattr(new, key):
            new.register_parameter(key, p)
    for key, b in m._buffers.items():
        if key not in new._buffers and not hasattr(new, key):
            new.register_buffer(key, b, persistent=key not in m._non_persistent_buffers_set)
    for key, child in m._modules.items():
        if not hasattr(new, key):
            new.add_module(key, child)
    for key, value in vars(m).items():
        if not key.startswith("_") and not hasattr(new, key):
            setattr(new, key, value)
    overrides = sorted({a for k in classes for a in vars(k)} - _PLAIN_ATTRS)
    if overrides:
        warnings.warn(
            f"convert_sync_batchnorm: layer {name!r} ({type(m).__name__}) was converted to "
            "SyncBatchNorm, which does plain synchronized batch normalization: the class's "
            f"own {', '.join(overrides)} are not kept (its parameters, buffers and attributes "
            "are). Synchronize such a layer yourself if they change the computation.",
            UserWarning,
            stacklevel=4,
        )


#: the longest wait ``datetime.timedelta`` (what ``torch.distributed`` waits with) can express
_MAX_TIMEOUT = datetime.timedelta.max.total_seconds()


def check_timeout(timeout: Any, where: str) -> None:
    """Refuse a ``timeout`` (seconds to wait for the other ranks) that is not None or a number
    in ``(0, _MAX_TIMEOUT]``: it would fail (or time out at once) in every exchange."""
    if timeout is None:
        return
    number = isinstance(timeout, numbers.Real) and not isinstance(timeout, bool)
    if not (number and 0 < timeout <= _MAX_TIMEOUT):
        raise ValueError(
            f"{where}: timeout must be a number of seconds > 0 and at most {_MAX_TIMEOUT:.3g} "
            f"(or None: the process group's timeout), got {timeout!r}"
        )


def _to_sync(m: nn.Module, name: str, group: Any, timeout: float | None, width: int) -> nn.Module:
    if isinstance(m, SyncBatchNorm):
        m.name, m.sync_width = name, width
        _tag(name)
        if group is not None:
            m.process_group = group
        if timeout is not None:
            m.timeout = timeout
        return m
    assert isinstance(m, (nn.modules.batchnorm._BatchNorm, _BatchNormBase))
    p = m.weight if m.weight is not None else m.running_mean
    # torch.nn layers: γ and β may be switched separately (affine=True, bias=False)
    kwargs: dict[str, Any] = {"center": m.bias is not None, "scale": m.weight is not None}
    if isinstance(m, _BatchNormBase):
        kwargs = {
            "axis": m.axis,
            "center": m.center,
            "scale": m.scale,
            "unbiased_running_var": m.unbiased_running_var,
            "nonfinite": m.nonfinite,
            "backend": m.backend,
        }
        if hasattr(m, "small_batch"):
            kwargs["small_batch"] = m.small_batch
    new = SyncBatchNorm(
        m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        # torch.nn.SyncBatchNorm: its own group unless one is given
        process_group=group if group is not None else getattr(m, "process_group", None),
        dtype=None if p is None else p.dtype,
        timeout=timeout,
        name=name,
        sync_width=width,
        **kwargs,
    )
    _extra_state(m, new, name)
    if hasattr(m, "qconfig"):
        new.qconfig = m.qconfig
    return _copy_state(m, new)


def convert_sync_batchnorm(
    model: nn.Module, process_group: Any = None, *, timeout: float | None = None
) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and our
    ``BatchNorm``/``BatchNorm1d/2d/3d`` in ``model`` with :class:`SyncBatchNorm`, in place,
    keeping state, mode, device, dtype and options (axis, center/scale, …); return the model (a
    bare layer is returned converted). Like torch's converter, subclasses of torch.nn's batch
    norm (and of our plain layers) are converted too: their own parameters, buffers and
    attributes are kept, and a warning names any method the class overrides (the synchronized
    layer does plain batch normalization). Our variants (ghost, renorm, frozen, …) are left
    unchanged, with a warning for a user's subclass of one; an uninitialized ``LazyBatchNorm``
    is an error (its channel count is unknown until a forward pass). A
    ``torch.nn.SyncBatchNorm`` keeps its ``process_group`` unless ``process_group`` is given.

    Every converted layer gets its qualified name and the model's largest channel count as
    message width, so ranks that diverge between layers get a clear error. Call it before
    wrapping the model in ``DistributedDataParallel``.

    Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = batchnorm.convert_sync_batchnorm(net)
        >>> net[1].layer_name()
        "SyncBatchNorm(8) '1'"
    """
    check_timeout(timeout, "convert_sync_batchnorm")
    layers = list(_named_bn(model))
    for full, m in layers:
        _check_lazy(m, full)
    check_not_scripted(model, "convert_sync_batchnorm")
    if not layers:
        return model
    width = max(int(m.num_features) for _, m in layers)  # type: ignore[arg-type]
    if layers[0][0] == "":  # the model is itself a batch-norm layer
        return _to_sync(model, "", process_group, timeout, width)
    synced: dict[int, nn.Module] = {}  # a shared layer stays one layer (named where first met)
    for full, m in layers:
        if id(m) not in synced:
            synced[id(m)] = _to_sync(m, full, process_group, timeout, width)
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, synced[id(m)])
    return model


# --------------------------------------------------------------------------------------------
# recalibration across ranks


Stats = tuple[int, Tensor, Tensor]  # (count, mean, M2) per channel


@torch.no_grad()
def all_reduce_population_stats(
    stats: Mapping[str, Stats],
    channels: Mapping[str, int],
    *,
    process_group: Any = None,
    timeout: float | None = None,
) -> dict[str, Stats]:
    """Merge every rank's population statistics, layer by layer, weighted by sample count.

    Each rank passes, for the layers it saw data for, ``(count, mean, M2)`` with
    ``M2 = Σ (x − mean)²`` per channel; ``channels`` lists every layer to merge (name → C) in
    the same order on every rank (a layer a rank never saw counts 0 there). Every rank gets back
    the same merged ``(count, mean, M2)`` (float64, Chan's merge in rank order) for each layer
    some rank saw. This is the cross-rank step of ``batchnorm.tools.recalibrate(...,
    distributed=True)``.

    Two collectives for the whole model, whatever its depth (three when the statistics exceed
    4096 values): a fixed-size handshake (message
    length and a checksum of the layer names and widths, so that ranks with different models
    get a clear error instead of a mismatched collective) and one all-gather of every layer's
    ``[n, mean, M2]``. Without an initialized process group the input is returned as float64.

    Example::

        >>> import torch
        >>> s = {"bn": (10, torch.zeros(3), torch.ones(3))}
        >>> merged = all_reduce_population_stats(s, {"bn": 3})
        >>> merged["bn"][0]
        10
    """
    check_timeout(timeout, "all_reduce_population_stats")
    names = list(channels)
    layout = ",".join(f"{n}:{channels[n]}" for n in names)
    ex = _Exchange(process_group, timeout, "recalibrate(distributed=True)", 0, 2, 2)
    size = len(names) + sum(channels.values())
    tag = zlib.crc32(layout.encode())
    dev = next((t.device for _, t, _ in stats.values()), torch.device("cpu"))
    shake = torch.tensor([[size, tag], [len(names), 0]], dtype=torch.float64, device=dev)
    _, got = _exchange(ex, _POPULATION, 0, 0, shake)  # (R, 2, 2)
    if not bool((got[:, 0] == got[0, 0]).all()):
        per_rank = "; ".join(
            f"rank {r}: {int(got[r, 1, 0])} layers, message of {int(got[r, 0, 0])} values"
            for r in range(len(got))
        )
        raise SyncBatchNormError(
            "recalibrate(distributed=True): the ranks have different batch-norm layers "
            f"(names or widths differ: {per_rank}). Build the model identically on every rank."
        )
    # (2, L + ΣC): row 0 = [n_1 … n_L | mean_1 … mean_L], row 1 = [n_1 … n_L | M2_1 … M2_L]
    payload = torch.zeros(2, size, dtype=torch.float64, device=dev)
    offset = len(names)
    spans = []
    for i, name in enumerate(names):
        c = channels[name]
        if name in stats:
            count, mean, m2 = stats[name]
            if mean.numel() != c:
                raise SyncBatchNormError(
                    f"recalibrate(distributed=True): layer {name!r} has {mean.numel()} channels "
                    f"of statistics, expected {c}"
                )
            payload[:, i] = float(count)
            payload[0, offset : offset + c] = mean.reshape(-1).to(payload)
            payload[1, offset : offset + c] = m2.reshape(-1).to(payload)
        spans.append((offset, c))
        offset += c
    ex = _Exchange(process_group, timeout, "recalibrate(distributed=True)", tag, size, size)
    _, data = _exchange(ex, _POPULATION, 1, 0, payload)  # (R, 2, L + ΣC)
    out: dict[str, Stats] = {}
    for i, (name, (start, c)) in enumerate(zip(names, spans)):
        total, mean, m2 = merge_stats(
            data[:, 0, i], data[:, 0, start : start + c], data[:, 1, start : start + c]
        )
        if total > 0:
            out[name] = (int(total), mean, m2)
    return out
