"""Module shells around :mod:`batchnorm.functional`: they own parameters, buffers and argument
checks; the math lives in the functional core.

``BatchNorm1d/2d/3d`` are drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``: same
constructor arguments, attributes, ``state_dict`` keys (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``) and train/eval behaviour, so checkpoints load both ways;
they derive from torch.nn's classes (``isinstance(m, nn.BatchNorm2d)`` holds, as code that finds
BN layers by class expects) while computing with ours.
:class:`BatchNorm` takes any channel axis and any rank, and speaks Keras' conventions through
:meth:`BatchNorm.from_keras`.

Conventions, one sentence each:

* momentum (PyTorch's): ``running = (1 − momentum)·running + momentum·batch`` — it weighs the
  new batch; ``momentum=None`` makes the running statistics the cumulative average of all batches.
  Keras' momentum weighs the old average: ``torch_momentum = 1 − keras_momentum``.
* stored variance: unbiased ``m/(m−1)·σ²_B`` by default (PyTorch); ``unbiased_running_var=False``
  stores the biased ``σ²_B`` (Keras). Normalization in training always uses the biased ``σ²_B``.
* ``center`` (β) and ``scale`` (γ) can be switched separately, as in Keras; ``affine`` sets both.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import warnings
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.functional import BatchNormInputError, NonFinitePolicy

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SmallBatchWarning"]

SmallBatchPolicy = Literal["raise", "running", "skip"]

#: a training batch with at most this many values per channel gets a SmallBatchWarning
SMALL_COUNT_WARNING = 4


class SmallBatchWarning(UserWarning):
    """Issued (once per layer) when a training batch has very few values per channel: the batch
    statistics are then noisy and BN's training and inference behaviour drift apart."""


def positive_int(value: Any) -> int | None:
    """``value`` as an int if it is a positive integer of any integral type (NumPy's, say, as
    torch.nn takes), else None (a bool is a mistake, not a count)."""
    if isinstance(value, bool):
        return None
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if n >= 1 else None


def fx_leaf(
    module: nn.Module, name: str, input: torch.fx.Proxy, mask: Tensor | None = None
) -> Tensor:
    """Under ``torch.fx.symbolic_trace``: the layer as one ``call_module`` node, the leaf FX
    makes of torch.nn's layers (its default tracer would trace into ours, whose checks branch on
    values a Proxy does not have). The traced module calls the layer itself."""
    tracer = input.tracer
    if not isinstance(tracer, torch.fx.Tracer):
        raise TypeError(
            f"{name}: traced by {type(tracer).__name__}, which cannot record a call of this "
            "layer; trace with torch.fx.symbolic_trace or a torch.fx.Tracer"
        )
    args = (input,) if mask is None else (input, mask)
    proxy = tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})
    return proxy  # type: ignore[return-value]


class _BatchNormBase(nn.Module):
    """Parameters, buffers and the train/eval choice; subclasses check dimensions and may
    override :meth:`_forward_train` / :meth:`_forward_eval` (the variants do)."""

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine", "axis"]

    #: outputs laid out as torch.nn's BatchNormNd lays them out (the drop-in classes; see
    #: :func:`batchnorm.functional.torch_nn_layout`), else in the input's layout when it is
    #: contiguous or has its channels innermost (other views: contiguous)
    _torch_layout: bool = False

    if TYPE_CHECKING:  # for type checkers only: torch.jit.script types attributes by value
        num_features: int
        eps: float
        momentum: float | None
        affine: bool
        track_running_stats: bool
        axis: int
        center: bool
        scale: bool
        unbiased_running_var: bool
        nonfinite: NonFinitePolicy
        backend: str | None
        small_batch: SmallBatchPolicy
        weight: nn.Parameter | None
        bias: nn.Parameter | None
        running_mean: Tensor | None
        running_var: Tensor | None
        num_batches_tracked: Tensor | None
        _ranks: tuple[int, ...]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        axis: int = 1,
        bias: bool = True,
        center: bool | None = None,
        scale: bool | None = None,
        unbiased_running_var: bool = True,
        nonfinite: NonFinitePolicy = "warn",
        backend: str | None = None,
        small_batch: SmallBatchPolicy = "raise",
    ) -> None:
        # nn.Module's own: BatchNorm1d/2d/3d also derive from torch.nn's classes, whose
        # constructors would build a second set of parameters
        nn.Module.__init__(self)
        name = type(self).__name__
        n = positive_int(num_features)
        if n is None:
            raise ValueError(
                f"{name}: num_features must be a positive integer (the number of channels C), "
                f"got {num_features!r}"
            )
        num_features = n
        if not eps >= 0:
            raise ValueError(
                f"{name}({num_features}): eps must be >= 0 (it is added to the variance), got "
                f"{eps!r}; the usual value is 1e-5"
            )
        if eps == 0:
            # torch.nn accepts it; a constant channel then divides 0 by 0
            warnings.warn(
                f"{name}({num_features}): eps=0 makes a constant channel (zero variance) "
                "normalize to NaN; the usual value is 1e-5",
                UserWarning,
                stacklevel=F._user_stacklevel(),
            )
        if momentum is not None:
            if not math.isfinite(momentum):
                raise ValueError(
                    f"{name}({num_features}): momentum must be a finite number (PyTorch's "
                    f"convention: the weight of the new batch) or None, got {momentum!r}"
                )
            if not 0.0 <= momentum <= 1.0:
                # torch.nn accepts it; outside [0, 1] the running average extrapolates
                warnings.warn(
                    f"{name}({num_features}): momentum={momentum!r} is outside [0, 1] (PyTorch's "
                    "convention: the weight of the new batch); the running statistics "
                    "extrapolate and the running variance can turn negative. Keras' momentum "
                    "0.99 is PyTorch's 0.01.",
                    UserWarning,
                    stacklevel=F._user_stacklevel(),
                )
        if nonfinite not in ("warn", "raise"):
            raise ValueError(
                f"{name}({num_features}): nonfinite must be 'warn' or 'raise', got {nonfinite!r}"
            )
        if small_batch not in ("raise", "running", "skip"):
            raise ValueError(
                f"{name}({num_features}): small_batch must be 'raise', 'running' or 'skip', got "
                f"{small_batch!r}"
            )
        if small_batch == "running" and not track_running_stats:
            raise ValueError(
                f"{name}({num_features}): small_batch='running' normalizes a one-value batch with "
                "the running statistics, so it needs track_running_stats=True; use "
                "small_batch='skip' instead"
            )
        if backend is not None and backend not in F._backend_names():
            raise ValueError(
                f"{name}({num_features}): unknown batch-norm backend {backend!r}; choose one of "
                f"{F._backend_names()} (None: $BATCHNORM_BACKEND, else auto), or register it "
                "first with batchnorm.functional.register_backend"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        # torch.nn (2.13+) spells "γ without β" as affine=True, bias=False; Keras as center=False
        self.center = (affine and bias) if center is None else center
        self.scale = affine if scale is None else scale
        self.affine = self.center or self.scale
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.unbiased_running_var = unbiased_running_var
        self.nonfinite = nonfinite
        self.backend = backend
        self.small_batch = small_batch
        self._warned_small = False
        if self.scale:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if self.center:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(
                    0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}
                ),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- torch.nn.BatchNorm API ---------------------------------------------------------------

    def reset_running_stats(self) -> None:
        from batchnorm.variants import FrozenStatisticsWarning, is_frozen

        if is_frozen(self) and self.running_mean is not None:
            # a frozen layer never re-estimates them: reset, they would stay 0 and 1
            warnings.warn(
                f"{self.layer_name()}: frozen by batchnorm.freeze, so its running statistics "
                "are kept, not reset: it would not re-estimate them (torch.optim.swa_utils."
                "update_bn resets every BN layer, then runs data through them in train mode). "
                "Call batchnorm.unfreeze(model) first to reset and re-estimate them.",
                FrozenStatisticsWarning,
                stacklevel=2,
            )
            return
        if self.track_running_stats:
            missing = [
                name
                for name in ("running_mean", "running_var", "num_batches_tracked")
                if getattr(self, name) is None
            ]
            if missing:
                raise RuntimeError(
                    f"{self.layer_name()}: track_running_stats is True but {', '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} None (a layer built with "
                    "track_running_stats=False has no running statistics to reset); set "
                    "track_running_stats back to False, or build the layer with "
                    "track_running_stats=True"
                )
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        # torch.nn 2.13's fields first (bias= says whether β exists, as there)
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        if self.axis != 1:
            s += f", axis={self.axis}"
        if self.affine and not self.scale:
            s += ", scale=False"  # β without γ (Keras' scale=False): affine and bias= miss it
        if not self.unbiased_running_var:
            s += ", unbiased_running_var=False"
        if self.small_batch != "raise":
            s += f", small_batch={self.small_batch!r}"
        return s

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
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # checkpoints from before num_batches_tracked existed: the layer keeps its own
            # counter (as torch.nn 2.13 does), or starts at 0 if it has none with values
            nbt = self.num_batches_tracked
            state_dict[key] = (
                nbt
                if nbt is not None and nbt.device.type != "meta"
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- forward ------------------------------------------------------------------------------

    def layer_name(self) -> str:
        """How error messages name this layer."""
        return f"{type(self).__name__}({self.num_features})"

    #: the input ranks accepted (empty: any rank of 2 or more); BatchNorm1d/2d/3d narrow them
    _ranks = ()

    def _check_input_dim(self, input: Tensor) -> None:
        """Rank check; BatchNorm1d/2d/3d narrow it as torch.nn does."""

    def _check_input(self, input: Tensor) -> None:
        nd = input.dim()
        ax = self.axis
        # an accepted input in one expression: this runs on every call, and with the caches
        # cold after a large pass each function call and message costs microseconds; the
        # checks below say what is wrong
        if (
            nd >= 2
            and (not self._ranks or nd in self._ranks)
            and -nd <= ax < nd
            and input.shape[ax] == self.num_features
            and input.dtype in F._INPUT_DTYPES
        ):
            return
        self._check_input_dim(input)
        fixed = type(self) if self._torch_layout else None
        F.check_channels(input, self.num_features, self.axis, self.layer_name(), fixed)

    def _checked(self, input: Tensor) -> bool:
        """Check ``input`` (:meth:`_check_input`); whether it is empty."""
        self._check_input(input)
        return input.numel() == 0

    def _syncing(self) -> bool:
        """Whether this training step is collective across processes (SyncBatchNorm)."""
        return False

    def _use_batch_stats(self) -> bool:
        # as torch.nn: batch statistics in training, or always without running buffers
        b = self._buffers  # (read directly: see _tensors)
        no_mean = (b["running_mean"] if "running_mean" in b else self.running_mean) is None
        if no_mean != ((b["running_var"] if "running_var" in b else self.running_var) is None):
            self._one_buffer_missing()
        return self.training or no_mean

    def _one_buffer_missing(self) -> NoReturn:
        given, missing = ("running_var", "running_mean")
        if self.running_var is None:
            given, missing = missing, given
        raise BatchNormInputError(
            f"{self.layer_name()}: {missing} is None but {given} is not; the running statistics "
            "are used together: set both to None (batch statistics always, as "
            "track_running_stats=False) or restore the missing one (e.g. from a state_dict)"
        )

    def _momentum_factor(self) -> float:
        """The momentum for this step; for ``momentum=None``, 1/n (the cumulative average)."""
        if self.momentum is None:
            nbt = self.num_batches_tracked
            # without a counter torch.nn's factor stays 0 (the average never moves)
            return 0.0 if nbt is None else 1.0 / (float(nbt) + 1.0)
        return self.momentum

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        if not (self.training and self.track_running_stats):
            return
        _, _, rm, rv, nbt = self._tensors()
        if rm is None or rv is None:
            # running buffers set to None ("always batch statistics"): nothing to blend into,
            # but the batch is counted, as torch.nn does
            if nbt is not None:
                nbt.add_(1)
            return
        # the counter goes with the blend (inside a trace, as part of the graph: a refused
        # batch must not advance it there either)
        F.update_running_stats(
            rm,
            rv,
            mean,
            var,
            count,
            self._momentum_factor(),
            unbiased=self.unbiased_running_var,
            nonfinite=self.nonfinite,
            layer=self.layer_name(),
            num_batches_tracked=nbt,
        )

    def _tensors(
        self,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(weight, bias, running_mean, running_var, num_batches_tracked)``, read from the
        module's own dictionaries: each read through ``Module.__getattr__`` costs ~0.8 µs,
        which a (60, 100) training step notices. A name missing there (a parametrized
        weight, say) is read the ordinary way."""
        p, b = self._parameters, self._buffers
        try:
            return (
                p["weight"], p["bias"], b["running_mean"], b["running_var"],
                b["num_batches_tracked"],
            )  # fmt: skip
        except KeyError:
            return (
                self.weight, self.bias, self.running_mean, self.running_var,
                self.num_batches_tracked,
            )  # fmt: skip

    def _per_channel(self) -> dict[str, Tensor | None]:
        """The layer's per-channel tensors by name (for :func:`batchnorm.functional.check_vectors`
        and :func:`batchnorm.functional.device_error`)."""
        weight, bias, rm, rv, _ = self._tensors()
        return {"weight": weight, "bias": bias, "running_mean": rm, "running_var": rv}

    def _forward_train(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        weight, bias, rm, rv, nbt = self._tensors()
        if mask is None and self.training and self.track_running_stats and rm is not None:
            assert rv is not None
            # the running update rides in the same backend call as the normalization
            y, _ = F.batch_norm_step(
                input,
                rm,
                rv,
                weight,
                bias,
                self._momentum_factor(),
                self.eps,
                axis=self.axis,
                unbiased_running_var=self.unbiased_running_var,
                nonfinite=self.nonfinite,
                backend=self.backend,
                layer=self.layer_name(),
                num_batches_tracked=nbt,
            )
            return y
        y, mean, var, count = F.batch_norm_train(
            input,
            weight,
            bias,
            self.eps,
            axis=self.axis,
            backend=self.backend,
            layer=self.layer_name(),
            mask=mask,
        )
        self._update_running_stats(mean, var, count)
        return y

    def _forward_eval(self, input: Tensor) -> Tensor:
        weight, bias, rm, rv, _ = self._tensors()
        assert rm is not None and rv is not None
        return F.batch_norm_eval(
            input,
            rm,
            rv,
            weight,
            bias,
            self.eps,
            axis=self.axis,
            backend=self.backend,
            layer=self.layer_name(),
        )

    def _forward_single(self, input: Tensor, mask: Tensor | None) -> Tensor:
        """One value per channel, with the opt-in ``small_batch`` policy: ``"running"``
        normalizes with the running statistics; ``"skip"`` uses the batch's own statistics
        (μ_B = x, σ²_B = 0, so x̂ = 0 and y = β: torch's output in the limit) — either way the
        running statistics are left unchanged (the variance of one value is undefined)."""
        if self.small_batch == "running" and self.running_mean is not None:
            return self._forward_eval(input)
        ax = self.axis % input.dim()
        shape = [1] * input.dim()
        shape[ax] = -1
        # x·0 keeps y connected to x (the exact gradient of BN at m = 1 is zero)
        y = input * 0
        if self.bias is not None:
            y = y + self.bias.view(shape).to(input.dtype)
        if self.weight is not None:
            y = y + 0 * self.weight.view(shape).to(input.dtype)  # dγ = Σ dy·x̂ = 0
        return y

    def _empty_output(self, input: Tensor) -> Tensor:
        """The (empty) output of an empty batch, still connected to γ and β: their gradients
        are zeros, as torch.nn gives, and DDP finds every parameter used in the step."""
        weight, bias, _, _, _ = self._tensors()
        return F.empty_output(input, weight, bias, self.axis)

    def _statistics_count(self, input: Tensor, mask: Tensor | None, count: int) -> int:
        """The fewest values per channel any set of batch statistics of this call is taken
        from: the batch's ``count`` (a ghost layer's virtual batches take fewer)."""
        return count

    def _check_small(self, input: Tensor, mask: Tensor | None) -> int:
        count = F.valid_count(input, self.axis, mask)
        # getattr: layers unpickled from before this attribute existed. A symbolic count (a
        # dynamic batch in torch.export) is not compared: that would pin the exported batch
        # size. Not while torch.compile traces either: it cannot trace a warning, and would
        # not replay it (asked last: it costs a call on every step)
        if not isinstance(count, int) or getattr(self, "_warned_small", False):
            return count
        used = self._statistics_count(input, mask, count) if count >= 2 else count
        if 2 <= used <= SMALL_COUNT_WARNING and not torch.compiler.is_compiling():
            self._warned_small = True
            # remedies the layer is not already using (a renorm layer has r_max, a ghost layer
            # virtual_batch_size: its statistics come from virtual batches)
            if hasattr(self, "virtual_batch_size"):
                remedy = "a larger virtual_batch_size, larger batches, or GroupNorm"
            elif hasattr(self, "r_max"):
                remedy = "larger batches, or GroupNorm for tiny batches"
            else:
                remedy = "larger batches, BatchRenorm, or GroupNorm for tiny batches"
            gives = (
                f"gives only {count} values per channel"
                if used == count
                else f"is normalized in virtual batches of as few as {used} values per channel"
            )
            warnings.warn(
                f"{self.layer_name()}: training batch of shape {tuple(input.shape)} {gives}; "
                f"batch statistics this noisy hurt accuracy. Use {remedy}.",
                SmallBatchWarning,
                stacklevel=F._user_stacklevel(),  # the user's line that called the layer
            )
        return count

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (boolean, True at valid positions, shaped like
        ``input`` without the channel axis) restricts the batch statistics to valid positions."""
        if torch.jit.is_scripting():
            return self._forward_scripted(input, mask)
        return self._forward_eager(input, mask)

    # -- torch.jit.script ---------------------------------------------------------------------

    #: methods whose override makes a subclass compute something TorchScript's path does not
    _SCRIPT_EXACT = ("_forward_train", "_forward_eval", "_forward_single", "_syncing", "forward")

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` (for this layer and for a model holding it): the
        scripted layer runs :func:`batchnorm.functional.batch_norm_scriptable`, so a subclass
        that computes differently (the variants, synchronized BN) is refused by name."""
        cls = type(self)
        for name in self._SCRIPT_EXACT:
            if getattr(cls, name) is not getattr(_BatchNormBase, name):
                raise TypeError(
                    f"{self.layer_name()}: torch.jit.script supports batchnorm.BatchNorm, "
                    f"BatchNorm1d/2d/3d and FrozenBatchNorm*; {cls.__name__} computes outside "
                    "TorchScript. Use torch.jit.trace or torch.compile for this layer."
                )
        # what the scripted forward reads, as attributes TorchScript can type
        self._script_name = self.layer_name()
        self._script_torch_layout = self._torch_layout
        self._script_min_rank = min(self._ranks, default=2)
        self._script_max_rank = max(self._ranks, default=1 << 30)
        return self

    @torch.jit.unused
    def _forward_eager(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, self.layer_name(), input, mask)
        if (
            self._torch_layout
            and not input.is_contiguous()
            and (torch.compiler.is_compiling() or F._has_memory(input))
        ):
            # (torch.func's wrappers cannot be asked about memory formats; the transforms run
            # torch operations, which lay out as torch.nn's)
            input = F.torch_nn_layout(input)
        try:
            # (while tracing: the checks' outcomes are constants of the trace, as torch.nn's)
            empty = F._untraced(self._checked, input)
            if mask is not None:
                mask = F.check_mask(input, mask, self.axis, self.layer_name())
            if empty and not self._syncing():
                # an empty batch (a detector's frame without boxes): an empty output, as
                # torch.nn gives; nothing to learn from, so the running statistics and counter
                # stay as they are (a synchronizing layer's empty rank still joins the exchange)
                return self._empty_output(input)
            if self._use_batch_stats():
                if mask is not None and F._tracing():
                    raise BatchNormInputError(
                        f"{self.layer_name()}: a traced layer takes no mask in training: the "
                        "count of valid positions would be recorded as a constant of the trace, "
                        "and a call with another mask would be normalized with it. Call the "
                        "layer untraced, or compile it (torch.compile)"
                    )
                count = self._check_small(input, mask)
                if count < 2 and self.small_batch != "raise":
                    return self._forward_single(input, mask)
                if count < 2 and not self.training:
                    raise BatchNormInputError(
                        f"{self.layer_name()}: expected more than 1 value per channel, got input "
                        f"of shape {tuple(input.shape)}: this layer keeps no running statistics "
                        "(track_running_stats=False), so it normalizes with batch statistics in "
                        "eval mode too. Use a batch of 2 or more, small_batch='skip' (y = β for a "
                        "single value), or track_running_stats=True."
                    )
                if mask is None:
                    return self._forward_train(input)
                if "mask" not in inspect.signature(self._forward_train).parameters:
                    raise BatchNormInputError(
                        f"{self.layer_name()}: this layer does not support a mask; pass mask=None "
                        "or use batchnorm.BatchNorm"
                    )
                return self._forward_train(input, mask=mask)  # type: ignore[call-arg]
            return self._forward_eval(input)
        except (RuntimeError, NotImplementedError) as e:
            # a failure inside torch: tell a device mismatch (the model not moved with its
            # input, a layer left on the meta device) by name instead of torch's words
            error = F.device_error(e, input, self._per_channel(), self.layer_name())
            if error is None and self.training:
                running = (self.running_mean, self.running_var)
                error = F.transform_error(e, input, running, self.layer_name())
            if error is None:
                raise
            raise error from e

    def _forward_scripted(self, input: Tensor, mask: Tensor | None) -> Tensor:
        """``forward`` compiled by ``torch.jit.script``: the eager checks' essentials and the
        computation of :func:`batchnorm.functional.batch_norm_scriptable` (torch operations)."""
        name = self._script_name
        nd = input.dim()
        if self._script_torch_layout:
            input = F.torch_nn_layout(input)
        F.check_scripted_input(
            input, self.num_features, self.axis, self._script_min_rank, self._script_max_rank, name
        )
        if mask is not None:
            raise BatchNormInputError(
                f"{name}: a scripted layer takes no mask; call the layer unscripted for masked "
                "statistics"
            )
        if input.numel() == 0:
            return F.empty_output(input, self.weight, self.bias, self.axis)
        use_batch = self.training or self.running_mean is None
        if use_batch and input.numel() // self.num_features < 2:
            if self.small_batch == "running" and self.running_mean is not None:
                use_batch = False
            elif self.small_batch == "skip":
                shape = [1] * nd
                shape[self.axis % nd] = -1
                y = input * 0
                bias = self.bias
                if bias is not None:
                    y = y + bias.view(shape).to(input.dtype)
                weight = self.weight
                if weight is not None:
                    y = y + 0 * weight.view(shape).to(input.dtype)  # dγ = Σ dy·x̂ = 0
                return y
            else:
                raise BatchNormInputError(
                    f"{name}: expected more than 1 value per channel when training, got input "
                    f"of shape {input.shape}; use a batch of 2 or more, or small_batch='skip' "
                    "or 'running'"
                )
        return F.batch_norm_scriptable(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            use_batch,
            use_batch and self.training and self.track_running_stats,
            self.momentum,
            self.eps,
            self.axis,
            self.unbiased_running_var,
            self.nonfinite,
            name,
        )


class BatchNorm(_BatchNormBase):
    r"""Batch normalization over any channel axis of an input of any rank.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    with the mini-batch mean μ_B and biased variance σ²_B taken per channel over every axis but
    ``axis`` (Ioffe & Szegedy 2015, Algorithm 1); in eval mode the running statistics replace
    them (Algorithm 2).

    Args:
        num_features: C, the size of the channel axis.
        eps: ε added to the variance. momentum: the weight of the new batch in the running
        averages (PyTorch's convention), ``None`` for the cumulative average.
        affine: learnable γ and β; ``bias=False`` drops β (torch.nn 2.13's spelling);
        ``center``/``scale`` switch β/γ separately (Keras).
        track_running_stats: keep running statistics for eval mode.
        axis: the channel axis (``1`` for NC…, ``-1`` for channels-last/Keras layouts).
        unbiased_running_var: store the unbiased (PyTorch) or biased (Keras) variance.
        nonfinite: ``"warn"`` skips the running update of a non-finite batch with a warning;
        ``"raise"`` raises :class:`~batchnorm.functional.NonFiniteStatisticsError`.
        backend: ``None``/``"auto"``, ``"torch"`` or ``"numba"`` (see :mod:`batchnorm.functional`).

    Shape: any ``(…, C, …)`` with C at ``axis``; the output has the input's shape and layout.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchNorm(16, axis=-1)
        >>> bn(torch.randn(8, 10, 16)).shape
        torch.Size([8, 10, 16])
    """

    @classmethod
    def from_keras(
        cls,
        num_features: int,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        **kwargs: Any,
    ) -> BatchNorm:
        """A layer configured with ``keras.layers.BatchNormalization``'s arguments and
        conventions: Keras' ``momentum`` weighs the old average (so PyTorch's is
        ``1 − momentum``), ε defaults to 1e-3, and the moving variance is stored biased."""
        fn = f"{cls.__name__}.from_keras"
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            hint = (
                " PyTorch's momentum=None (a cumulative average) has no Keras counterpart: "
                f"create the layer with {cls.__name__}(num_features, momentum=None) instead."
                if momentum is None
                else ""
            )
            raise TypeError(
                f"{fn}: momentum must be a number, Keras' weight of the old moving average "
                f"(typically 0.9-0.999), got {momentum!r}.{hint}"
            )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{fn}: momentum must be in [0, 1], got {momentum!r}")
        return cls(
            num_features,
            eps=epsilon,
            momentum=1.0 - momentum,
            axis=axis,
            center=center,
            scale=scale,
            unbiased_running_var=False,
            **kwargs,
        )


def forwarding_signature(own: Any, base: Any) -> inspect.Signature:
    """The signature of ``own`` — an ``__init__`` taking ``*args, **kwargs`` on to ``base``'s
    — with those two replaced by what ``base`` takes, so that ``inspect.signature(cls)``
    tells the real arguments (``torch.nn.utils.skip_init`` looks for ``device`` there; IDEs
    and docs show them)."""
    kinds = inspect.Parameter
    mine = [
        p
        for p in inspect.signature(own).parameters.values()
        if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
    ]
    taken = {p.name for p in mine}
    theirs = [p for p in inspect.signature(base).parameters.values() if p.name not in taken]
    positional = [p for p in mine if p.kind is not kinds.KEYWORD_ONLY]
    positional += [p for p in theirs if p.kind is kinds.POSITIONAL_OR_KEYWORD]
    keyword = [p for p in mine if p.kind is kinds.KEYWORD_ONLY]
    keyword += [p for p in theirs if p.kind is kinds.KEYWORD_ONLY]
    return inspect.signature(own).replace(parameters=positional + keyword)


class _FixedRank(_BatchNormBase):
    """torch.nn's BatchNormNd: channels at axis 1 and a fixed set of accepted ranks.

    BatchNorm1d/2d/3d also derive from torch.nn's classes, whose stubs type γ and β as
    ``Parameter`` (torch.nn declares them by assignment); here either may be ``None``
    (``affine=False``, ``bias=False``, Keras' ``center``/``scale``), hence the type checker's
    silenced complaint on those class lines."""

    _layout: str = ""
    _torch_layout = True

    def __init__(self, num_features: int, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("axis", 1) != 1:
            raise ValueError(
                f"{type(self).__name__}: channels are at axis 1 as in torch.nn; for another "
                "channel axis use batchnorm.BatchNorm(num_features, axis=...)"
            )
        super().__init__(num_features, *args, **kwargs)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            want = " or ".join(f"{r}D" for r in self._ranks)
            others = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
            hint = others.get(input.dim())
            remedy = (
                f" For {input.dim()}D input use batchnorm.{hint}."
                if hint and hint != type(self).__name__
                else " For any rank use batchnorm.BatchNorm(num_features, axis=...)."
            )
            raise BatchNormInputError(
                f"{self.layer_name()}: expected {want} input {self._layout}, got "
                f"{input.dim()}D input of shape {tuple(input.shape)}.{remedy}"
            )


_FixedRank.__init__.__signature__ = forwarding_signature(  # type: ignore[attr-defined]
    _FixedRank.__init__, _BatchNormBase.__init__
)


class BatchNorm1d(_FixedRank, nn.BatchNorm1d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Drop-in for ``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``.
    See :class:`BatchNorm` for the formula and arguments."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_FixedRank, nn.BatchNorm2d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Drop-in for ``torch.nn.BatchNorm2d``: input ``(N, C, H, W)``, NCHW or ``channels_last``.
    See :class:`BatchNorm` for the formula and arguments."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_FixedRank, nn.BatchNorm3d):  # type: ignore[misc]  # γ/β: see _FixedRank
    """Drop-in for ``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)``.
    See :class:`BatchNorm` for the formula and arguments."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
