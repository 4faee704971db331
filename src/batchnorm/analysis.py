"""Measurements of what batch normalization does to training, usable on any torch model.

These are the instruments behind the lab's claims experiments, kept in the library so they can
be pointed at any network:

* :func:`internal_covariate_shift` — Santurkar, Tsipras, Ilyas & Madry (2018, arXiv 1805.11604),
  Definition 2.1: for layer *i*, ``G = ∇_{W_i} L(W_1, …, W_k; x, y)`` and
  ``G' = ∇_{W_i} L(W'_1, …, W'_{i−1}, W_i, …, W_k; x, y)`` where ``W'_j`` are the weights after
  the optimizer's update of the same step; the shift is ``‖G − G'‖₂`` and ``cos(G, G')``.
* :func:`loss_landscape` — their Sec. 3.2: along the gradient direction ``θ − η·g`` for several
  step sizes η, the loss variation, the gradient predictiveness ``‖∇L(θ − ηg) − ∇L(θ)‖₂`` and the
  effective β-smoothness ``max_η ‖∇L(θ − ηg) − ∇L(θ)‖₂ / ‖ηg‖₂``.
* :func:`activation_statistics` / :func:`distribution_drift` — per-unit mean, standard deviation
  and quantiles of chosen layers' outputs, and how much they moved between two checkpoints.
* :func:`bn_statistics_mismatch` — for every batch-norm layer, the statistics its input really has
  at evaluation time against the running statistics it will normalize with (the "variance shift"
  of Li, Chen, Hu & Yang 2019, arXiv 1801.05134, when dropout precedes BN).
* :class:`TimeVaryingNoise` — Santurkar et al.'s injected distribution noise (App. A.2.1), the
  module that makes a BN network's activations deliberately unstable.

Every measurement leaves the model as it found it: parameters, their ``.grad`` (values, or
``None``), buffers (running statistics) and train/eval mode are restored, and random layers
(dropout, noise) see the same random numbers in every forward pass of one measurement so that
only the weights differ between passes; an attached :class:`~batchnorm.ActivationRecorder` does
not record those passes.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from batchnorm.functional import check_mask
from batchnorm.recorder import first_tensor, measuring, quantiles, single_number

__all__ = [
    "LayerShift",
    "LandscapeProbe",
    "ActivationStats",
    "TimeVaryingNoise",
    "internal_covariate_shift",
    "loss_landscape",
    "activation_statistics",
    "distribution_drift",
    "bn_statistics_mismatch",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

# weight-carrying layers measured by default (Santurkar et al. measure linear and conv layers)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------------------------
# shared plumbing


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore parameters, their ``.grad``, buffers and train/eval modes of ``model`` on exit.

    A ``.grad`` that was ``None`` is ``None`` again; one that was a tensor is the same tensor
    object again, holding the same values (a pending ``optimizer.step()`` is unaffected).
    """
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads: dict[str, tuple[Tensor, Tensor] | None] = {
        k: None if v.grad is None else (v.grad, v.grad.detach().clone())
        for k, v in model.named_parameters()
    }
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_parameters():
                v.copy_(params[k])
                saved = grads[k]
                if saved is None:
                    v.grad = None
                else:
                    g, values = saved
                    g.copy_(values)
                    v.grad = g
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        for name, m in model.named_modules():
            m.training = modes[name]


def check_initialized(model: nn.Module, where: str) -> None:
    """Refuse a model with uninitialized lazy modules (``nn.LazyLinear``,
    ``nn.LazyBatchNorm1d``), naming them and ``where``, the function the user called."""
    from torch.nn.parameter import is_lazy

    lazy = [
        n or type(model).__name__
        for n, mod in model.named_modules()
        if any(is_lazy(t) for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)))
    ]
    if lazy:
        raise TypeError(
            f"{where}: the model has uninitialized lazy modules ({', '.join(lazy[:8])}"
            f"{', …' if len(lazy) > 8 else ''}); run one forward pass on a batch "
            f"(model(batch)) to initialize them, then call {where} again"
        )


def _check_model(model: nn.Module, where: str) -> None:
    """Refuse a model with uninitialized lazy modules, or with parameters or buffers on the
    meta device (shapes without values): every measurement reads values."""
    check_initialized(model, where)
    meta = next(
        (n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None
    )
    if meta is not None:
        raise ValueError(
            f"{where}: the model's {meta!r} is on the meta device (a shape without values), and "
            "the measurement reads values; materialize the model first: "
            "model.to_empty(device='cpu'), then load_state_dict(...) or reset_parameters()"
        )


def bn_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
    """The input tensor a batch-norm layer is called with (a forward pre-hook's ``args`` and
    ``kwargs``) — the first positional tensor, or by keyword (``bn(input=x)``); None without
    one — and its padding mask (``bn(x, mask)``, ``bn(x, mask=m)``; None without one)."""
    x = first_tensor(args) if args else kwargs.get("input", kwargs.get("x"))
    if not isinstance(x, Tensor):
        return None, None
    mask = args[1] if len(args) > 1 and args[0] is x else kwargs.get("mask")
    return x, mask if isinstance(mask, Tensor) else None


def channel_values(x: Tensor, axis: int, mask: Tensor | None = None) -> Tensor:
    """``(C, M)`` float64 copy of ``x``: each channel's values (on ``axis``) over every other
    axis; with a padding ``mask`` (True at valid positions), the valid positions only, as a
    batch-norm layer called with that mask takes its statistics."""
    t = x.detach().to(torch.float64, copy=True).movedim(axis, 0)
    if mask is None:
        return t.reshape(t.shape[0], -1)
    valid = check_mask(x, mask, axis).movedim(axis, 0)[0].expand(t.shape[1:])
    return t[:, valid]


def _rng_seed() -> int:
    # one seed per measurement, drawn from torch's global generator so results follow
    # torch.manual_seed, then replayed before every pass: dropout/noise masks stay identical;
    # the global generator is left as it was (a probe inside a training loop must not change
    # the training's data order or dropout masks)
    with torch.random.fork_rng(devices=[]):
        return int(torch.randint(0, 2**62, (1,)).item())


def _devices() -> list[int]:
    """The CUDA devices whose generators a replay must fork: those torch has set up."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextlib.contextmanager
def _replay_rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=_devices()):
        torch.manual_seed(seed)
        yield


def _check_batch(batch: Batch, where: str) -> Batch:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"{where}: batch must be a pair (inputs, targets), got {type(batch).__name__}; "
            "pass e.g. (x, y) as taken from a DataLoader"
        )
    return batch[0], batch[1]


@contextlib.contextmanager
def _swapped(model: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """Run ``model`` with the parameters named in ``values`` replaced by those tensors.

    Each module slot holding a parameter gets the tensor for that parameter object, so a module
    used under several names and a parameter tied between modules are swapped everywhere, and
    the very same ``nn.Parameter`` objects are put back on exit (an optimizer holding them stays
    attached; ``torch.func.functional_call`` re-registers a module reachable under two names
    with a plain tensor).
    """
    by_id = {id(p): values[k] for k, p in model.named_parameters() if k in values}
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for m in model.modules():  # each module object once
            for k, p in m._parameters.items():
                if p is not None and id(p) in by_id:
                    saved.append((m, k, p))
                    m._parameters[k] = by_id[id(p)]  # type: ignore[assignment]
        yield
    finally:
        for m, k, p in saved:
            m._parameters[k] = p


def _loss_and_grads(
    model: nn.Module,
    params: dict[str, Tensor],
    loss_fn: LossFn,
    batch: Batch,
    seed: int,
    wrt: Sequence[str],
) -> tuple[float, list[Tensor]]:
    """Loss at ``params`` (a full name → tensor mapping) and its gradient w.r.t. ``wrt``."""
    x, y = batch
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "the measurement differentiates the loss, which torch.inference_mode() forbids; "
            "call it outside inference_mode"
        )
    leaves = {k: (v.detach().requires_grad_(k in wrt)) for k, v in params.items()}
    # (inside torch.no_grad() too: the gradients are the measurement)
    with torch.enable_grad(), _replay_rng(seed), _swapped(model, leaves):
        out = model(x)
        loss = loss_fn(out, y)
        return _grads_of(loss, leaves, wrt)


def _grads_of(
    loss: Tensor, leaves: dict[str, Tensor], wrt: Sequence[str]
) -> tuple[float, list[Tensor]]:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return the loss as a scalar tensor (differentiable), got "
            f"{type(loss).__name__} {loss!r}; return the tensor itself, not loss.item()"
        )
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar, got shape {tuple(loss.shape)}; "
            "use a reduction such as 'mean'"
        )
    grads = torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)
    out_grads = [
        torch.zeros_like(leaves[k]) if g is None else g.detach() for k, g in zip(wrt, grads)
    ]
    return float(loss.detach()), out_grads


def _check_start(loss: float, grads: Sequence[Tensor], where: str) -> None:
    """The loss and gradient at the model's own parameters must be finite: from NaN every
    measure is NaN, and its comparisons would read as zeros (a cosine of 0, a β of 0)."""
    bad = not math.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads)
    if bad:
        what = "loss" if not math.isfinite(loss) else "gradient"
        raise ValueError(
            f"{where}: the {what} at the model's parameters is not finite (loss {loss}); "
            "check the batch for NaN/inf and the model for overflow — nothing can be measured "
            "from there"
        )


#: tensor functions that read a parameter's metadata, not its values (``x.to(w.dtype)``,
#: ``next(m.parameters()).device``, ``w.data``): property getters are all ``__get__``
_METADATA = frozenset(
    {
        "__get__",
        "dim",
        "ndimension",
        "size",
        "numel",
        "nelement",
        "stride",
        "storage_offset",
        "element_size",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "data_ptr",
        "get_device",
        "__len__",
        "__repr__",
        "__format__",
        "__hash__",
    }
)


class _ParameterUses(TorchFunctionMode):
    """Records, in ``events``, the owner of each parameter passed to a torch function (a
    weight a module uses directly, as ``nn.MultiheadAttention`` uses ``out_proj.weight``)."""

    def __init__(self, owner: dict[int, str], events: list[tuple[str, str]]) -> None:
        super().__init__()
        self.owner, self.events = owner, events

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _METADATA:  # reads no values: not a use
            return func(*args, **kwargs)

        def record(values: Iterable[Any]) -> None:  # in argument order: the order of use
            for a in values:
                if isinstance(a, list | tuple):
                    record(a)
                elif isinstance(a, Tensor) and id(a) in self.owner:
                    self.events.append(("use", self.owner[id(a)]))

        record([*args, *kwargs.values()])
        return func(*args, **kwargs)


def _forward_order(model: nn.Module, x: Tensor, seed: int) -> tuple[list[str], int]:
    """Names of the modules owning parameters, in the order the forward pass first uses their
    parameters, then the ones it never uses; and how many it used.

    A module's place is where a torch function first takes one of its parameters — a
    container's own parameter applied at the output (a learned logit scale, a LayerScale) comes
    after the layers it scales, and a weight used directly by another module (``out_proj`` of
    ``nn.MultiheadAttention``) counts as used — or, where no torch function sees them (kernels
    called directly), where its ``forward`` starts (a pre-hook). The forward runs in the
    model's mode and may update running statistics; callers restore them.
    """
    owners = {
        name: m
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    }
    # (a parameter tied between modules says nothing about which of them uses it: left to the
    # modules' calls)
    holders: dict[int, list[str]] = {}
    for name, m in owners.items():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    owner = {i: names[0] for i, names in holders.items() if len(names) == 1}
    events: list[tuple[str, str]] = []
    handles = []
    for name, m in owners.items():

        def hook(_m: nn.Module, _i: object, name: str = name) -> None:
            events.append(("call", name))

        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), _replay_rng(seed), _ParameterUses(owner, events):
            model(x)
    finally:
        for h in handles:
            h.remove()
    first: dict[str, dict[str, int]] = {"use": {}, "call": {}}
    for i, (kind, name) in enumerate(events):
        first[kind].setdefault(name, i)
    # a use decides; a call only where no torch function saw the module's parameters
    place = {**first["call"], **first["use"]}
    order = sorted(place, key=place.__getitem__)
    # modules never used (unused heads) come last: they precede nothing
    called = len(order)
    order += [n for n in owners if n not in place]
    return order, called


def _param_names(model: nn.Module, module_name: str, canonical: dict[int, str]) -> list[str]:
    """Trainable parameters a module owns, by their names in ``model.named_parameters()``
    (``canonical``: id → first name, so a tied parameter has one name wherever it is used)."""
    m = model.get_submodule(module_name)
    return [canonical[id(p)] for p in m.parameters(recurse=False) if p.requires_grad]


def _flat(ts: Iterable[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts]).double()


# --------------------------------------------------------------------------------------------
# internal covariate shift


@dataclass(frozen=True)
class LayerShift:
    """Internal covariate shift of one layer at one step (Santurkar et al. 2018, Def. 2.1).

    Attributes:
        layer: the module name in ``model.named_modules()``.
        grad_norm: ``‖G‖₂``, the layer's weight gradient before any update.
        l2: ``‖G − G'‖₂``, with ``G'`` the gradient after the preceding layers' update.
        cosine: ``cos(G, G') = ⟨G, G'⟩ / (‖G‖‖G'‖)`` (1 when either is zero and they are equal).
    """

    layer: str
    grad_norm: float
    l2: float
    cosine: float

    @property
    def relative_l2(self) -> float:
        """``‖G − G'‖ / ‖G‖`` (0 when ``G = 0``)."""
        return self.l2 / self.grad_norm if self.grad_norm > 0 else 0.0


def internal_covariate_shift(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    update: float | OptimizerFactory,
    layers: Sequence[str] | None = None,
) -> list[LayerShift]:
    r"""Santurkar et al.'s internal covariate shift of each layer for one optimization step.

    .. math::
        G_i = \nabla_{W_i} L(W_1, \dots, W_k; x, y), \qquad
        G'_i = \nabla_{W_i} L(W'_1, \dots, W'_{i-1}, W_i, \dots, W_k; x, y),

    where ``W'`` are the weights after the optimizer's step computed from ``G`` on the same batch
    (Santurkar, Tsipras, Ilyas & Madry 2018, arXiv 1805.11604, Definition 2.1). A layer's
    "preceding layers" are all parameter-owning modules (convolutions, linear and batch-norm
    layers) whose parameters the forward pass uses before it: a module counts where a torch
    function first takes one of its parameters (a container's own parameter applied to the
    output, a logit scale, comes after the layers it scales; a weight another module uses
    directly, ``nn.MultiheadAttention``'s ``out_proj``, counts there), or where its ``forward``
    starts when no torch function sees its parameters; a module used twice counts at its first
    use. A parameter tied between modules is one parameter: the measured layer's own
    parameters keep ``W_i`` even when an earlier layer shares them, and ``G`` is the gradient of
    the shared tensor. Every pass starts from the model's own running statistics. ``G'`` is what layer *i* would see if it
    accounted for its inputs' change; ``‖G − G'‖`` large / ``cos`` small means a large shift.

    Args:
        model: any ``nn.Module``; its current mode (train/eval) is used and it is left unchanged.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        batch: ``(x, y)``.
        update: a learning rate (plain SGD ``W' = W − η·G``) or a factory
            ``params -> torch.optim.Optimizer`` whose first step defines ``W'`` (e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)``; its state starts fresh).
        layers: names of the modules to measure (their ``weight``); default every
            ``nn.Linear``/``nn.ConvNd`` with a trainable weight, in forward order.

    Returns:
        one :class:`LayerShift` per measured layer, in forward order.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
        >>> shifts = internal_covariate_shift(net, nn.functional.cross_entropy, batch, 0.1)
        >>> [s.layer for s in shifts], shifts[0].l2
        (['0', '2'], 0.0)
    """
    x, y = _check_batch(batch, "internal_covariate_shift")
    _check_model(model, "internal_covariate_shift")
    if not callable(update) and (not isinstance(update, numbers.Real) or isinstance(update, bool)):
        raise TypeError(
            "internal_covariate_shift: update must be a learning rate (a number) or a function "
            f"making an optimizer from the parameters, got {update!r}"
        )
    if not callable(update) and not math.isfinite(float(update)):
        raise ValueError(
            f"internal_covariate_shift: the learning rate must be finite, got {update!r}; every "
            "G' would be NaN"
        )
    seed = _rng_seed()
    with _preserved(model), measuring():
        # the state every pass starts from: taken before the ordering pass, which in train mode
        # updates running statistics (a layer that normalizes with them, such as batch
        # renormalization, must see the model's own buffers in G and G')
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        order, called = _forward_order(model, x, seed)
        if layers is None:
            # the layers the forward calls (an unused head has no gradient to shift), with a
            # trainable weight of their own (a parametrized one, weight_norm say, is computed)
            measured = [
                n
                for n in order[:called]
                if isinstance(m := model.get_submodule(n), _WEIGHT_LAYERS)
                and isinstance(m.weight, nn.Parameter)
                and m.weight.requires_grad
            ]
        else:
            if isinstance(layers, str):
                raise TypeError(
                    f"internal_covariate_shift: layers must be a list of module names, got the "
                    f"string {layers!r}; pass layers=[{layers!r}]"
                )
            unknown = [n for n in layers if n not in order]
            if unknown:
                raise ValueError(
                    f"internal_covariate_shift: layers {unknown} own no trainable parameters or "
                    f"are not modules of the model; choose among {order}"
                )
            measured = [n for n in order if n in layers]
            unused = [n for n in measured if order.index(n) >= called]
            if unused:
                raise ValueError(
                    f"internal_covariate_shift: layers {unused} are not called by the forward "
                    "pass on this batch, so their loss gradient is 0 and cannot shift; measure "
                    f"layers among {order[:called]}"
                )
        if not measured:
            # nothing to measure: torch.autograd.grad would fail on an empty list of inputs
            raise ValueError(
                f"internal_covariate_shift: {type(model).__name__} has no nn.Linear/nn.ConvNd "
                "layer with a trainable weight (requires_grad) to measure; pass layers=[...] "
                f"naming modules with a trainable 'weight' among {order}, or unfreeze them"
            )
        for n in measured:
            w = getattr(model.get_submodule(n), "weight", None)
            if not (isinstance(w, nn.Parameter) and w.requires_grad):
                raise ValueError(
                    f"internal_covariate_shift: layer {n!r} "
                    f"({type(model.get_submodule(n)).__name__}) has no trainable 'weight' "
                    "parameter of its own (frozen, or computed by a parametrization such as "
                    "weight_norm); measure layers whose weight is a parameter that requires grad"
                )
        theta = {k: v.detach().clone() for k, v in model.named_parameters()}
        trainable = [k for k, v in model.named_parameters() if v.requires_grad]
        canonical = {id(v): k for k, v in model.named_parameters()}

        def restore_buffers() -> None:
            # train-mode BN updates running statistics in every pass; each pass starts equal
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])

        restore_buffers()
        loss0, g_all = _loss_and_grads(model, theta, loss_fn, (x, y), seed, trainable)
        _check_start(loss0, g_all, "internal_covariate_shift")
        grads = dict(zip(trainable, g_all))

        # W' from one optimizer step on the same gradients
        if callable(update):
            live = [p for p in model.parameters() if p.requires_grad]
            opt = update(live)
            if not callable(getattr(opt, "step", None)):
                raise TypeError(
                    "internal_covariate_shift: update(params) must return an optimizer (with a "
                    f"step() method), got {opt!r}; e.g. lambda p: torch.optim.SGD(p, lr=0.1)"
                )
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if p.requires_grad:
                        p.grad = grads[k].clone()
            opt.step()
            theta_new = {k: v.detach().clone() for k, v in model.named_parameters()}
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(theta[k])
                    p.grad = None
        else:
            lr = float(update)
            theta_new = {k: (theta[k] - lr * grads[k]) if k in grads else theta[k] for k in theta}

        results = []
        for name in measured:
            wname = canonical[id(model.get_submodule(name).weight)]
            before = order[: order.index(name)]
            # the layer's own parameters stay at W_i even when tied to an earlier layer's
            own = set(_param_names(model, name, canonical))
            updated = {p for n in before for p in _param_names(model, n, canonical)} - own
            mixed = {k: (theta_new[k] if k in updated else theta[k]) for k in theta}
            restore_buffers()
            _, (g_prime,) = _loss_and_grads(model, mixed, loss_fn, (x, y), seed, [wname])
            g = grads[wname].double()
            gp = g_prime.double()
            gn, gpn = float(g.norm()), float(gp.norm())
            diff = float((g - gp).norm())
            if not (math.isfinite(gn) and math.isfinite(gpn)):
                cos = math.nan  # G' not finite (the step overflowed): no angle to report
            elif gn > 0 and gpn > 0:
                # (rounding can take the quotient a hair past ±1)
                cos = min(1.0, max(-1.0, float((g * gp).sum() / (gn * gpn))))
            else:
                cos = 1.0 if diff == 0 else 0.0
            results.append(LayerShift(layer=name, grad_norm=gn, l2=diff, cosine=cos))
    return results


# --------------------------------------------------------------------------------------------
# loss landscape along the gradient


@dataclass(frozen=True)
class LandscapeProbe:
    """The loss and gradient along ``θ − η·g`` at one point (Santurkar et al. 2018, Sec. 3.2).

    Attributes:
        step_sizes: the η values, shape ``(S,)``.
        loss0: ``L(θ)``.
        grad_norm: ``‖g‖₂`` with ``g = ∇L(θ)``.
        losses: ``L(θ − η g)`` per η, shape ``(S,)``.
        grad_distances: ``‖∇L(θ − η g) − ∇L(θ)‖₂`` per η (gradient predictiveness; smaller is
            more predictive), shape ``(S,)``.
    """

    step_sizes: np.ndarray
    loss0: float
    grad_norm: float
    losses: np.ndarray
    grad_distances: np.ndarray

    @property
    def loss_variation(self) -> float:
        """``max_η L(θ − ηg) − min_η L(θ − ηg)`` over the probed step sizes."""
        return float(np.max(self.losses) - np.min(self.losses))

    @property
    def gradient_predictiveness(self) -> float:
        """``max_η ‖∇L(θ − ηg) − ∇L(θ)‖₂``: the largest gradient change (smaller = smoother)."""
        return float(np.max(self.grad_distances))

    @property
    def betas(self) -> np.ndarray:
        """``‖∇L(θ − ηg) − ∇L(θ)‖₂ / (η‖g‖₂)`` per η (0 where ``g = 0``)."""
        denom = self.step_sizes * self.grad_norm
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(denom > 0, self.grad_distances / denom, 0.0)
        return np.asarray(b, dtype=np.float64)

    @property
    def beta_smoothness(self) -> float:
        """Effective β-smoothness: ``max_η ‖∇L(θ − ηg) − ∇L(θ)‖₂ / ‖ηg‖₂``."""
        return float(np.max(self.betas))


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    step_sizes: Sequence[float],
    params: Sequence[str] | None = None,
) -> LandscapeProbe:
    r"""Probe the loss landscape along the gradient direction (Santurkar et al. 2018, Sec. 3.2).

    With ``g = ∇L(θ)`` on ``batch`` and each step size η, it evaluates ``L(θ − ηg)`` and
    ``∇L(θ − ηg)``. For a quadratic ``L(θ) = ½ θᵀHθ − bᵀθ`` the answers are closed form:
    ``L(θ − ηg) = L(θ) − η‖g‖² + ½η² gᵀHg``, ``‖∇L(θ − ηg) − ∇L(θ)‖ = η‖Hg‖`` and the effective
    β-smoothness is ``‖Hg‖/‖g‖`` (the eigenvalue when ``g`` is an eigenvector of ``H``; never more
    than the largest eigenvalue).

    Args:
        model: any ``nn.Module`` in the mode to probe (train mode: BN uses batch statistics); it is
            left unchanged (running statistics included).
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        batch: ``(x, y)``, the same batch for every evaluation.
        step_sizes: the η values (positive), e.g. ``lr * np.array([0.5, 1, 2, 4])``.
        params: parameter names spanning θ (default all trainable parameters).

    Returns:
        a :class:`LandscapeProbe` with the loss variation, gradient predictiveness and effective
        β-smoothness as properties.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
        >>> probe = loss_landscape(net, nn.functional.cross_entropy, batch, [0.1, 0.4])
        >>> probe.losses.shape
        (2,)
    """
    x, y = _check_batch(batch, "loss_landscape")
    _check_model(model, "loss_landscape")
    if isinstance(params, str):
        raise TypeError(
            f"loss_landscape: params must be a list of parameter names, got the string "
            f"{params!r}; pass params=[{params!r}]"
        )
    if isinstance(step_sizes, Tensor | np.ndarray) and step_sizes.ndim == 0:
        step_sizes = [float(step_sizes)]  # one step size: a 0-d array of it
    if not isinstance(step_sizes, Iterable) or isinstance(step_sizes, str):
        raise TypeError(
            f"loss_landscape: step_sizes must be a list of step sizes, got {step_sizes!r}; "
            f"pass step_sizes=[{step_sizes!r}]"
        )
    etas = np.asarray(list(step_sizes), dtype=np.float64)
    if etas.ndim != 1 or etas.size == 0 or not np.all((etas > 0) & np.isfinite(etas)):
        raise ValueError(
            f"loss_landscape: step_sizes must be a non-empty list of positive finite numbers, "
            f"got {list(step_sizes)!r}"
        )
    seed = _rng_seed()
    with _preserved(model), measuring():
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        theta = {k: v.detach().clone() for k, v in model.named_parameters()}
        names = (
            [k for k, v in model.named_parameters() if v.requires_grad]
            if params is None
            else list(params)
        )
        unknown = [k for k in names if k not in theta]
        if unknown:
            raise ValueError(
                f"loss_landscape: unknown parameters {unknown}; choose among {list(theta)}"
            )
        repeated = sorted({k for k in names if names.count(k) > 1})
        if repeated:
            # each would count its gradient twice in ‖g‖ and the gradient distances
            raise ValueError(f"loss_landscape: params names {repeated} more than once")
        if not names:
            raise ValueError(
                "loss_landscape: no parameters span the direction (params is empty, or none "
                f"requires grad); name some of {list(theta)}"
            )

        def evaluate(p: dict[str, Tensor]) -> tuple[float, list[Tensor]]:
            # train-mode BN updates running statistics in every pass; each pass starts equal
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
            return _loss_and_grads(model, p, loss_fn, (x, y), seed, names)

        loss0, g_parts = evaluate(theta)
        _check_start(loss0, g_parts, "loss_landscape")
        g0 = _flat(g_parts)
        losses, dists = [], []
        for eta in etas:
            moved = dict(theta)
            for k, gk in zip(names, g_parts):
                moved[k] = theta[k] - float(eta) * gk
            loss, g = evaluate(moved)
            losses.append(loss)
            dists.append(float((_flat(g) - g0).norm()))
    return LandscapeProbe(
        step_sizes=etas,
        loss0=loss0,
        grad_norm=float(g0.norm()),
        losses=np.asarray(losses, dtype=np.float64),
        grad_distances=np.asarray(dists, dtype=np.float64),
    )


# --------------------------------------------------------------------------------------------
# activation distributions and their drift


@dataclass(frozen=True)
class ActivationStats:
    """Per-unit statistics of one layer's output over a batch (units = the channel axis: a
    batch-norm layer's ``axis``, axis 1 for any other layer; every other axis is reduced).

    Attributes:
        mean, std: shape ``(C,)``; std is the biased (population) standard deviation.
        quantiles: shape ``(Q, C)`` at the levels ``levels`` (shape ``(Q,)``).
    """

    mean: np.ndarray
    std: np.ndarray
    quantiles: np.ndarray
    levels: np.ndarray

    def to_dict(self) -> dict[str, list[float] | list[list[float]]]:
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "quantiles": self.quantiles.tolist(),
            "levels": self.levels.tolist(),
        }


def _per_unit(t: Tensor, axis: int = 1, mask: Tensor | None = None) -> Tensor:
    """Units on ``axis`` → ``(C, M)``: each row holds one unit's values over every other axis
    (with a padding ``mask``, the valid positions only)."""
    if t.dim() < 2:
        raise ValueError(
            f"activation_statistics: a layer output of shape {tuple(t.shape)} has no unit axis; "
            "measure a layer whose output is (N, C) or (N, C, ...)"
        )
    # a copy also of a float64 output (.double() would return it as is): the values are reduced
    # after the forward, and an in-place operation after the layer (ReLU(inplace=True)) would
    # have rewritten them by then
    return channel_values(t, axis, mask)


def _too_few_values(where: str, layer: str, inputs: Any, count: int, need: int = 1) -> ValueError:
    """The refusal of a layer that got ``count`` (0 or 1) values per channel, below the
    ``need`` (1 or 2) of the measurement."""
    shape = f" of shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor) else ""
    if count == 0:
        return ValueError(
            f"{where}: layer {layer!r} gave no values (an empty batch{shape}?); pass inputs "
            f"with at least {'one sample' if need == 1 else 'two samples'}"
        )
    return ValueError(
        f"{where}: layer {layer!r} got one value per channel (a batch of one{shape}?), which "
        "has no variance to measure; pass inputs with at least two samples"
    )


def _unit_axis(m: nn.Module) -> int:
    """The channel axis of ``m``'s output: a batch-norm layer's ``axis`` (as in
    :func:`bn_statistics_mismatch`), 1 for every other layer."""
    return int(getattr(m, "axis", 1)) if hasattr(m, "running_mean") else 1


def activation_statistics(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[str] | None = None,
    levels: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
) -> dict[str, ActivationStats]:
    """Per-unit mean, std and quantiles of the outputs of ``layers`` on ``inputs``.

    The model runs in its current mode without gradients; running statistics are restored, and
    random layers are replayed with a fixed seed per call.

    A layer called several times in one forward pass is measured over all its calls; of a tuple
    output (an LSTM's) the first tensor is measured.

    Units are the channels of a batch-norm layer (any module with ``running_mean``) on its
    ``axis`` attribute (e.g. ``BatchNorm(C, axis=-1)`` on ``(N, T, C)``: C units), and axis 1 of
    every other layer's output (``(N, C)``, ``(N, C, ...)``).

    Args:
        model: any ``nn.Module``.
        inputs: a batch ``x`` for ``model(x)``.
        layers: module names (default: every batch-norm layer — any module with
            ``running_mean`` — or, if there is none, every ``nn.Linear``/``nn.ConvNd``; default
            layers the forward pass does not call are left out). A named layer that the forward
            pass does not call is an error.
        levels: the quantile levels in ``[0, 1]``.

    Returns:
        ``{layer name: ActivationStats}``.
    """
    _check_model(model, "activation_statistics")
    modules = dict(model.named_modules())
    if layers is None:
        chosen = [n for n, m in modules.items() if hasattr(m, "running_mean")]
        if not chosen:
            chosen = [n for n, m in modules.items() if isinstance(m, _WEIGHT_LAYERS)]
    else:
        if isinstance(layers, str):
            raise TypeError(
                f"activation_statistics: layers must be a list of module names, got the string "
                f"{layers!r}; pass layers=[{layers!r}]"
            )
        chosen = list(layers)
        missing = [n for n in chosen if n not in modules]
        if missing:
            raise ValueError(
                f"activation_statistics: no modules named {missing}; choose among "
                f"{[n for n in modules if n]}"
            )
        repeated = sorted({n for n in chosen if chosen.count(n) > 1})
        if repeated:  # each value would be pooled twice, which moves the quantiles
            raise ValueError(f"activation_statistics: layers names {repeated} more than once")
    one = single_number(levels)
    if one is not None:
        raise TypeError(
            f"activation_statistics: levels must be a list of quantile levels, got {levels!r}; "
            f"pass levels=[{one!r}]"
        )
    q = torch.tensor(list(levels), dtype=torch.float64)
    if q.numel() == 0 or not bool(((q >= 0) & (q <= 1)).all()):  # (NaN is neither)
        raise ValueError(f"activation_statistics: levels must be in [0, 1], got {list(levels)}")
    captured: dict[str, list[Tensor]] = {}
    handles = []
    for n in chosen:

        def hook(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: object, n: str = n
        ) -> None:
            # of a tuple output (an LSTM's) the first tensor; every call of the forward pooled;
            # a batch-norm layer called with a padding mask over the valid positions only
            t = first_tensor(out)
            if t is not None:
                _, mask = bn_input(args, kwargs) if hasattr(_m, "running_mean") else (None, None)
                captured.setdefault(n, []).append(_per_unit(t, _unit_axis(_m), mask))

        handles.append(modules[n].register_forward_hook(hook, with_kwargs=True))
    seed = _rng_seed()
    try:
        with _preserved(model), measuring(), torch.no_grad(), _replay_rng(seed):
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    not_called = [n for n in chosen if n not in captured]
    if not_called and layers is not None:
        raise ValueError(
            f"activation_statistics: layers {not_called} were not called by the model's forward "
            "pass on these inputs, so they have no output to measure; choose layers the forward "
            "uses"
        )
    result = {}
    for n in chosen:
        if n not in captured:
            continue  # a default layer the forward skips (e.g. an unused head)
        if len({c.shape[0] for c in captured[n]}) > 1:
            raise ValueError(
                f"activation_statistics: layer {n!r} is called several times per forward with "
                f"outputs of {sorted({c.shape[0] for c in captured[n]})} units; its calls "
                "cannot be pooled — measure a layer of one width"
            )
        u = torch.cat(captured[n], dim=1)  # (C, M): every call's values
        if u.shape[1] == 0:
            raise _too_few_values("activation_statistics", n, inputs, 0)
        result[n] = ActivationStats(
            mean=u.mean(dim=1).numpy(),
            std=u.std(dim=1, unbiased=False).numpy(),
            quantiles=quantiles(u, q, dim=1).numpy(),
            levels=q.numpy(),
        )
    return result


def distribution_drift(
    before: dict[str, ActivationStats], after: dict[str, ActivationStats]
) -> dict[str, dict[str, float]]:
    r"""How far each layer's per-unit activation distribution moved between two checkpoints.

    For every layer present in both, averaged over units c:

    * ``mean_shift`` = mean_c |μ'_c − μ_c|;
    * ``normalized_mean_shift`` = mean_c |μ'_c − μ_c| / σ_c (in units of the earlier spread;
      units with σ_c = 0 are skipped; NaN when every unit has σ_c = 0);
    * ``log_std_ratio`` = mean_c |log(σ'_c / σ_c)| (0 when the spread is unchanged; units with
      either σ = 0 skipped, NaN when none is left);
    * ``quantile_shift`` = mean over units and levels of |q'_c − q_c|.

    Returns:
        ``{layer: {measure: value}}``.
    """
    out: dict[str, dict[str, float]] = {}
    for n in before:
        if n not in after:
            continue
        a, b = before[n], after[n]
        if a.mean.shape != b.mean.shape:
            raise ValueError(
                f"distribution_drift: layer {n!r} has {a.mean.shape[0]} units before and "
                f"{b.mean.shape[0]} after; compare checkpoints of the same architecture"
            )
        if a.levels.shape != b.levels.shape or not np.array_equal(a.levels, b.levels):
            raise ValueError(
                f"distribution_drift: layer {n!r} was measured at quantile levels "
                f"{a.levels.tolist()} before and {b.levels.tolist()} after; measure both with "
                "the same levels"
            )
        dmu = np.abs(b.mean - a.mean)
        ok = a.std > 0
        both = ok & (b.std > 0)
        out[n] = {
            "mean_shift": float(dmu.mean()),
            # NaN when no unit had a spread to compare with (0 would read as "no change")
            "normalized_mean_shift": float((dmu[ok] / a.std[ok]).mean()) if ok.any() else math.nan,
            "log_std_ratio": float(np.abs(np.log(b.std[both] / a.std[both])).mean())
            if both.any()
            else math.nan,
            "quantile_shift": float(np.abs(b.quantiles - a.quantiles).mean()),
        }
    return out


def bn_statistics_mismatch(model: nn.Module, inputs: Tensor) -> dict[str, dict[str, float]]:
    r"""Train/eval statistics mismatch of every batch-norm layer on ``inputs``.

    In eval mode each BN layer normalizes with its running statistics (μ_run, σ²_run). This runs
    the model in eval mode and compares them with the statistics its input really has
    (μ_B, σ²_B, per channel):

    * ``var_ratio`` = mean_c σ²_B / (σ²_run + ε) — the variance of the eval-mode normalized
      input x̂ (ε is the layer's ``eps``, what BN divides by); 1 when they agree; below 1 is
      Li et al.'s (2019) "variance shift" of dropout-before-BN (the running variance was
      accumulated with dropout's inflated variance); σ²_B is the biased batch variance;
    * ``mean_shift`` = mean_c |μ_B − μ_run| / √(σ²_run + ε).

    A layer called several times in one forward pass is measured over all its calls (its
    running statistics were accumulated from all of them); a layer called with a padding mask
    (``bn(x, mask=m)``) over the valid positions only, as it takes its statistics. Layers without
    running statistics are skipped. The model is left unchanged. A layer with fewer than two
    values per channel (an empty batch, a batch of one) has no variance to compare: refused.

    Returns:
        ``{layer: {"var_ratio": …, "mean_shift": …}}``.
    """
    _check_model(model, "bn_statistics_mismatch")
    modules = {
        n: m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "running_mean", None), Tensor)
        and isinstance(getattr(m, "running_var", None), Tensor)
    }
    captured: dict[str, list[Tensor]] = {}
    handles = []
    for n, m in modules.items():
        axis = int(getattr(m, "axis", 1))

        def hook(
            mod: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            n: str = n,
            axis: int = axis,
        ) -> None:
            x, mask = bn_input(args, kwargs)
            if x is not None:  # over the valid positions only when called with a mask
                captured.setdefault(n, []).append(channel_values(x, axis, mask))

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    seed = _rng_seed()
    try:
        with _preserved(model), measuring(), torch.no_grad(), _replay_rng(seed):
            model.eval()
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, m in modules.items():
        if n not in captured:
            continue
        u = torch.cat(captured[n], dim=1)  # (C, M) over every call
        if u.shape[1] < 2:  # no variance to compare (NaN from none, 0 from one)
            raise _too_few_values("bn_statistics_mismatch", n, inputs, u.shape[1], need=2)
        mu, var = u.mean(dim=1), u.var(dim=1, unbiased=False)
        rm = m.running_mean.detach().double()  # type: ignore[union-attr]
        rv = m.running_var.detach().double()  # type: ignore[union-attr]
        eps = float(getattr(m, "eps", 1e-5))
        out[n] = {
            "var_ratio": float((var / (rv + eps)).mean()),
            "mean_shift": float(((mu - rm).abs() / torch.sqrt(rv + eps)).mean()),
        }
    return out


# --------------------------------------------------------------------------------------------
# Santurkar et al.'s injected noise


class TimeVaryingNoise(nn.Module):
    r"""Distribution noise that changes at every step (Santurkar et al. 2018, Sec. 2, App. A.2.1).

    In training mode, at every forward call (one optimization step) each unit c draws
    ``μ_c ~ U(−mean_range, mean_range)`` and ``σ_c ~ U(scale_low, scale_high)``; then each
    sample n draws ``m_{n,c} ~ U(μ_c − mean_jitter, μ_c + mean_jitter)`` and
    ``s_{n,c} ~ N(σ_c, scale_jitter)``, and the activation becomes

    .. math:: a_{n,c,\dots} \leftarrow s_{n,c} \, a_{n,c,\dots} + m_{n,c}.

    Placed after each BN layer it makes the distribution of every layer's input unstable by
    design (non-zero mean, non-unit variance, changing every step) — the experiment that shows
    BN's success is not explained by stable input distributions. Identity in eval mode.

    Args:
        axis: the unit (channel) axis of the input. The defaults are the paper's values.

    Shape: ``(N, C, *)`` (with ``axis=1``) → same shape.

    Example::

        >>> import torch
        >>> noise = TimeVaryingNoise()
        >>> noise(torch.zeros(4, 3, 2, 2)).shape
        torch.Size([4, 3, 2, 2])
    """

    def __init__(
        self,
        axis: int = 1,
        mean_range: float = 0.5,
        scale_low: float = 1.0,
        scale_high: float = 1.25,
        mean_jitter: float = 0.1,
        scale_jitter: float = 0.1,
    ) -> None:
        super().__init__()
        values = {
            "mean_range": mean_range,
            "scale_low": scale_low,
            "scale_high": scale_high,
            "mean_jitter": mean_jitter,
            "scale_jitter": scale_jitter,
        }
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"TimeVaryingNoise: every range must be a finite number, got {bad}")
        if not (scale_low <= scale_high and mean_range >= 0 and mean_jitter >= 0):
            raise ValueError(
                "TimeVaryingNoise: need scale_low <= scale_high and non-negative ranges, got "
                f"mean_range={mean_range}, scale=({scale_low}, {scale_high}), "
                f"mean_jitter={mean_jitter}"
            )
        if scale_jitter < 0:
            raise ValueError(f"TimeVaryingNoise: scale_jitter must be >= 0, got {scale_jitter}")
        self.axis = axis
        self.mean_range = mean_range
        self.scale_low = scale_low
        self.scale_high = scale_high
        self.mean_jitter = mean_jitter
        self.scale_jitter = scale_jitter

    def extra_repr(self) -> str:
        return (
            f"mean~U(±{self.mean_range}), scale~U({self.scale_low}, {self.scale_high}), "
            f"jitter=({self.mean_jitter}, {self.scale_jitter})"
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if x.dim() < 2:
            raise ValueError(
                f"TimeVaryingNoise: expected input (N, C, ...), got shape {tuple(x.shape)}"
            )
        if not -x.dim() < self.axis < x.dim() or self.axis % x.dim() == 0:
            raise ValueError(
                f"TimeVaryingNoise: axis={self.axis} is not a channel axis of input with shape "
                f"{tuple(x.shape)}; use an axis from 1 to {x.dim() - 1} (or -1)"
            )
        xc = x.movedim(self.axis, 1)  # (N, C, *)
        n, c = xc.shape[0], xc.shape[1]
        opts: dict[str, Any] = {"device": x.device, "dtype": x.dtype}
        mu = (torch.rand(c, **opts) * 2 - 1) * self.mean_range  # (C,)
        sigma = self.scale_low + torch.rand(c, **opts) * (self.scale_high - self.scale_low)
        m = mu + (torch.rand(n, c, **opts) * 2 - 1) * self.mean_jitter  # (N, C)
        s = sigma + torch.randn(n, c, **opts) * self.scale_jitter  # (N, C)
        shape = (n, c) + (1,) * (xc.dim() - 2)
        y = s.reshape(shape) * xc + m.reshape(shape)
        return y.movedim(1, self.axis)
