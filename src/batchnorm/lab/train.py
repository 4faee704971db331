"""The one training loop every experiment uses, and its helpers.

:func:`train` runs mini-batch training for a fixed number of steps: seeded (the batch order
comes from a ``torch.Generator`` seeded with ``seed``, and the global torch RNG — dropout — is
seeded too, so two runs with the same seed on CPU are identical), evaluates on a schedule
(``eval_every``, plus step 0 and the last step), records one metrics row per evaluation,
stops an arm whose loss becomes non-finite (``diverged``), and shows a tqdm progress bar only
on a terminal (never when ``BATCHNORM_PROGRESS=0`` or stderr is not a TTY).

Small networks with mini-batches of 60 are overhead-bound, so the loop is kept tight: data are
preloaded tensors, batches are ``index_select`` with a per-epoch permutation, the loss is read
back once per step (for divergence detection) and everything else happens only at evaluation
points. Hooks for extra measurements: ``callbacks`` (every step) and ``on_eval`` (at
evaluation points, returning extra columns for the row).

Example::

    >>> import torch
    >>> from batchnorm.lab import data, models, train
    >>> ds = data.synthetic(n_train=300, n_test=100)
    >>> net = models.MLP(ds.num_features, (32,), 10, bn="before")
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.5)
    >>> res = train.train(net, opt, ds.x_train, ds.y_train, steps=50, batch_size=30,
    ...                   eval_sets={"test": (ds.x_test, ds.y_test)}, eval_every=25)
    >>> [r["step"] for r in res.rows]
    [0, 25, 50]
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from batchnorm import _env
from batchnorm.lab.config import ConfigError

__all__ = [
    "TrainResult",
    "StepInfo",
    "train",
    "evaluate",
    "seed_everything",
    "torch_threads",
    "progress_enabled",
    "progress_bar",
    "steps_to_target",
    "make_optimizer",
]


@dataclass
class StepInfo:
    """What a step callback sees: after the optimizer step (``callbacks``), or after the
    backward pass and before the step (``before_step``: the model still holds the weights the
    batch's gradient was taken at, and ``.grad`` the gradient the step will use)."""

    step: int  # the update's 1-based number (after it: steps done so far)
    loss: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor  # the mini-batch
    y: Tensor


@dataclass
class TrainResult:
    """Rows (one per evaluation: ``step``, ``train_loss``, ``<set>_acc``, ``<set>_loss``,
    ``lr``, extra columns from ``on_eval``), divergence status and wall time."""

    rows: list[dict[str, Any]]
    diverged: bool = False
    diverged_step: int | None = None
    steps_done: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def final(self, key: str) -> float | None:
        """The last recorded value of column ``key`` (``None`` if diverged before any)."""
        for r in reversed(self.rows):
            if r.get(key) is not None:
                return float(r[key])
        return None

    def best(self, key: str) -> float | None:
        vals = [float(r[key]) for r in self.rows if r.get(key) is not None]
        return max(vals) if vals else None

    def column(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "diverged": self.diverged,
            "diverged_step": self.diverged_step,
            "steps_done": self.steps_done,
            "seconds": self.seconds,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainResult:
        return cls(**dict(d))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global RNG (model init, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - legacy global RNG is what third-party code draws from
    torch.manual_seed(seed)


def _numba() -> Any:
    try:
        import numba
    except ImportError:  # the kernels are optional; nothing to configure without them
        return None
    return numba


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` CPU threads for torch and for the Numba kernels behind our BN layers,
    restoring the previous counts after. Tiny MLPs are fastest on one thread: the per-op
    parallel overhead exceeds the work. On a busy machine it matters even more: an OpenMP
    thread that has to wait for a descheduled sibling spins, so a parallel kernel can burn
    many times its work in CPU time (measured: a 50,000-step BN run used > 10 min of CPU instead
    of ~2.5 min with two Numba threads on an oversubscribed 2-core machine)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    numba = _numba()
    old_nb = None
    if numba is not None:
        old_nb = numba.get_num_threads()
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if numba is not None and old_nb is not None:
            numba.set_num_threads(old_nb)


@contextlib.contextmanager
def progress_bar(
    total: int, desc: str, flag: bool | None = None
) -> Iterator[Callable[[int], None]]:
    """A tqdm bar of ``total`` steps when :func:`progress_enabled` (``flag`` forces it); yields
    ``advance(n)``, which does nothing without a bar. The bar is closed however the work ends:
    a bar left open by Ctrl-C or an error keeps the line, and the message that follows is
    printed onto the end of it."""
    bar = None
    if progress_enabled(flag):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, leave=False, mininterval=0.5, file=sys.stderr)
    try:
        yield (lambda n: None) if bar is None else bar.update
    finally:
        if bar is not None:
            bar.close()


def progress_enabled(flag: bool | None = None) -> bool:
    """Progress bars: off when ``BATCHNORM_PROGRESS=0``, else on a TTY only (CI logs stay
    quiet); ``flag`` forces it."""
    env = _env.get("BATCHNORM_PROGRESS")
    if _env.is_off("BATCHNORM_PROGRESS"):
        return False
    if flag is not None:
        return flag
    if env is not None and env.strip().lower() in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def make_optimizer(
    params: Any,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``sgd`` (plain or with momentum) or ``adam``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 10000
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode (restoring its mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    try:
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i : i + batch_size])
            yy = y[i : i + batch_size]
            # summed in float32 at least: a float16 sum over thousands of samples overflows
            loss_sum += float(F.cross_entropy(logits.float(), yy, reduction="sum"))
            correct += int((logits.argmax(1) == yy).sum())
    finally:
        model.train(was_training)
    n = max(1, x.shape[0])
    return correct / n, loss_sum / n


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_train: Tensor,
    y_train: Tensor,
    *,
    steps: int,
    batch_size: int = 60,
    eval_sets: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    eval_every: int = 500,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    lr_schedule: Callable[[int], float] | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    before_step: Sequence[Callable[[StepInfo], None]] = (),
    on_eval: Callable[[int, nn.Module], Mapping[str, Any] | None] | None = None,
    eval_at_start: bool = True,
    threads: int | None = 1,
    progress: bool | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` for ``steps`` mini-batch updates.

    Args:
        model, optimizer: the network (put in train mode) and its optimizer.
        x_train, y_train: the training set as preloaded tensors.
        steps: number of updates. batch_size: examples per update (the last partial batch of
            an epoch is dropped, so every BN batch has the same size).
        eval_sets: name → ``(x, y)`` evaluated (in eval mode) at step 0, every ``eval_every``
            steps and at the end; gives columns ``<name>_acc`` and ``<name>_loss``.
        seed: batch order and the global torch RNG (dropout). Model init is the caller's
            (call :func:`seed_everything` before building the model).
        lr_schedule: step → learning rate, applied before each update.
        callbacks: called after every update with a :class:`StepInfo`.
        before_step: called before every update, after its backward pass (a measurement of
            the update about to be taken, on its batch, at the weights its gradient was taken
            at); it must leave the parameters and their ``.grad`` as it found them.
        on_eval: called at each evaluation point as ``on_eval(step, model)`` (model in eval
            mode, no grad); its dict is merged into the row.
        threads: torch CPU threads while training (``None``: leave as is).
        progress: force the progress bar on/off (default: :func:`progress_enabled`).

    Returns: a :class:`TrainResult`; if the loss becomes NaN/inf the run stops there with
    ``diverged=True`` and a final row whose metrics are ``None`` (likewise if the last update
    left a weight NaN/inf, if an evaluation loss is NaN/inf — outputs that overflow — or if
    ``on_eval`` raises ``OverflowError``/``FloatingPointError``, as
    :func:`batchnorm.recalibrate` does for activations beyond the float range).
    """
    if steps < 0 or batch_size < 1 or eval_every < 1:
        raise ValueError(
            f"train: need steps >= 0, batch_size >= 1, eval_every >= 1; got {steps}, "
            f"{batch_size}, {eval_every}"
        )
    n = x_train.shape[0]
    if n < batch_size:
        raise ConfigError(  # a setting to change: the CLI prints one line
            f"train: the training set has {n} examples, fewer than batch_size={batch_size}; "
            "use a smaller batch or more data"
        )
    eval_sets = dict(eval_sets or {})
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    per_epoch = n // batch_size
    rows: list[dict[str, Any]] = []
    result = TrainResult(rows)
    t0 = time.perf_counter()

    def diverged_at(step: int) -> None:
        result.diverged = True
        result.diverged_step = step
        rows.append({"step": step, "train_loss": None, "lr": optimizer.param_groups[0]["lr"]})

    def eval_row(step: int, train_loss: float | None) -> bool:
        """Record the evaluation at ``step``; False (and the run diverged) when the network's
        outputs overflow — a non-finite evaluation loss — or its activations do: statistics
        that ``on_eval``'s recalibration cannot hold. Its accuracy would be argmax of NaN."""
        row: dict[str, Any] = {"step": step, "train_loss": train_loss}
        for name, (xe, ye) in eval_sets.items():
            acc, loss = evaluate(model, xe, ye)
            if not math.isfinite(loss):
                diverged_at(step)
                return False
            row[f"{name}_acc"] = acc
            row[f"{name}_loss"] = loss
        row["lr"] = optimizer.param_groups[0]["lr"]
        if on_eval is not None:
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    extra = on_eval(step, model)
            except (OverflowError, FloatingPointError):
                # (what batchnorm.recalibrate raises for activations beyond the float range)
                diverged_at(step)
                return False
            finally:
                model.train(was)
            if extra:
                row.update(extra)
        rows.append(row)
        return True

    with torch_threads(threads), progress_bar(steps, desc, progress) as advance:
        model.train()
        fine = eval_row(0, None) if eval_at_start else True
        loss_sum, loss_count = 0.0, 0
        perm = torch.randperm(n, generator=gen)
        pos = 0
        step = 0
        while step < steps and fine:
            if pos + batch_size > per_epoch * batch_size:
                perm = torch.randperm(n, generator=gen)  # new epoch
                pos = 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            xb = x_train.index_select(0, idx)
            yb = y_train.index_select(0, idx)
            if lr_schedule is not None:
                lr = lr_schedule(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lv = loss.item()
            if not math.isfinite(lv):
                # a diverged arm stops here; later rows would be meaningless
                step += 1
                diverged_at(step)
                break
            if before_step:
                info = StepInfo(step + 1, lv, model, optimizer, xb, yb)
                for cb in before_step:
                    cb(info)
            optimizer.step()
            step += 1
            loss_sum += lv
            loss_count += 1
            if callbacks:
                info = StepInfo(step, lv, model, optimizer, xb, yb)
                for cb in callbacks:
                    cb(info)
            if step % eval_every == 0 or step == steps:
                if not eval_row(step, loss_sum / max(1, loss_count)):
                    break
                loss_sum, loss_count = 0.0, 0
            if step % 100 == 0:
                advance(100)
    if not result.diverged and not finite_weights(model):
        # the last update made the weights non-finite: no later loss would say so
        if rows and rows[-1]["step"] == step:
            rows.pop()  # its metrics came from non-finite weights
        diverged_at(step)
    result.steps_done = step
    result.seconds = time.perf_counter() - t0
    return result


def finite_weights(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (after the last update, which no later
    loss would check)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def mark_diverged(result: TrainResult) -> None:
    """Mark a finished run as diverged at its last step, after a measurement found that its
    activations overflow (what the training loop cannot see while the loss stays finite): its
    last row's metrics give way to the divergence row, as in :func:`train`."""
    step = result.steps_done
    rows = result.rows
    lr = rows[-1].get("lr") if rows else None
    if rows and rows[-1]["step"] == step:
        rows.pop()
    rows.append({"step": step, "train_loss": None, "lr": lr})
    result.diverged = True
    result.diverged_step = step


def steps_to_target(
    steps: Sequence[int], values: Sequence[float | None], target: float
) -> int | None:
    """The first step at which ``values`` reaches ``target`` (``>=``), or ``None`` if never."""
    for s, v in zip(steps, values):
        if v is not None and v >= target:
            return int(s)
    return None
