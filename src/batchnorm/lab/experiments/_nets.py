"""Networks and helpers shared by the claims experiments (learning-rate, placement, dropout,
initialization, noisy-bn, ics, smoothness). Not an experiment: it registers nothing.

* :class:`VGGSmall` — a VGG-like CNN (two 3×3 convs per stage, max-pooling between stages) with
  optional BN and Santurkar et al.'s time-varying noise after each conv's normalization.
* :class:`DeepLinear` — their deep linear network: ``depth`` square linear layers, optionally
  with BN after each.
* helpers to load the data, train one arm through the lab's training loop with caching, and
  compare arms with their seed-to-seed spread;
* the one home of the claims' ranking rule (:func:`ranked`, :data:`RANK_RULE`): a diverged
  run ranks lowest, as in paper-mnist's learning-rate sweep — an arm with a diverged seed has
  accuracy −∞ and error, drift or non-smoothness +∞, and when both compared arms diverged no
  claim is supported;
* :func:`exact_key`, the exact label of a number for part names.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from batchnorm.analysis import TimeVaryingNoise
from batchnorm.lab import train
from batchnorm.lab.config import BaseConfig, ConfigError
from batchnorm.lab.models import ACTIVATIONS, make_activation
from batchnorm.lab.results import RunContext, mean_std
from batchnorm.lab.train import TrainResult
from batchnorm.nn import BatchNorm1d, BatchNorm2d

__all__ = [
    "VGGSmall",
    "DeepLinear",
    "load_data",
    "check_final_window",
    "check_probe_every",
    "cached_train",
    "arm_rows",
    "final_acc",
    "mean_of",
    "exceeds_spread",
    "RANK_RULE",
    "ranked",
    "all_diverged",
    "finite",
    "diverged_flags",
    "diverged_text",
    "divergence",
    "spread_rule",
    "accuracy_curve",
    "check_bn1d_batch",
    "exponential_decay",
    "steps_to",
    "exact_key",
]


class VGGSmall(nn.Module):
    """A small VGG-like network (Santurkar et al. 2018 use VGG on CIFAR-10; this is its
    CPU-sized cousin for 28×28 / 8×8 images).

    Stage k: ``[conv3×3 → (bn) → (noise) → act] × convs_per_stage → maxpool2×2``; then
    ``flatten → linear``. Each conv block is an ``nn.Sequential`` named ``conv``, ``bn``,
    ``noise``, ``act`` inside ``blocks.<i>`` so layers can be addressed by name.

    Args:
        in_shape: ``(C, H, W)``. num_classes: output size. widths: channels per stage.
        bn: normalize each conv output with :class:`batchnorm.BatchNorm2d`.
        noise: add :class:`~batchnorm.analysis.TimeVaryingNoise` after each conv (after its BN
            when ``bn``), as in their "noisy BN" experiment.
        activation: ``relu``, ``sigmoid``, ``tanh``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int = 10,
        widths: Sequence[int] = (8, 16),
        *,
        bn: bool = False,
        noise: bool = False,
        activation: str = "relu",
        convs_per_stage: int = 2,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        pools: list[bool] = []
        for width in widths:
            for j in range(convs_per_stage):
                parts: OrderedDict[str, nn.Module] = OrderedDict()
                parts["conv"] = nn.Conv2d(c, width, 3, padding=1, bias=not bn)
                if bn:
                    parts["bn"] = BatchNorm2d(width)
                if noise:
                    parts["noise"] = TimeVaryingNoise()
                parts["act"] = make_activation(activation)
                blocks.append(nn.Sequential(parts))
                last = j == convs_per_stage - 1
                pool = last and min(h, w) > 2
                pools.append(pool)
                if pool:
                    h, w = h // 2, w // 2
                c = width
        self.blocks = nn.ModuleList(blocks)
        self._pools = pools
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(c * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for block, pool in zip(self.blocks, self._pools):
            x = block(x)  # (N, C_k, H_k, W_k)
            if pool:
                x = self.pool(x)
        out: Tensor = self.out(self.flatten(x))
        return out


class DeepLinear(nn.Module):
    """Santurkar et al.'s deep linear network: ``depth`` layers ``width × width`` without
    nonlinearity (optionally BN after each), Gaussian init N(0, 1/width) so the signal's scale
    is preserved on average.

    Shape: ``(N, width)`` → ``(N, width)``.
    """

    def __init__(self, depth: int = 25, width: int = 10, *, bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            lin = nn.Linear(width, width, bias=not bn)
            nn.init.normal_(lin.weight, 0.0, width**-0.5)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
            layers.append(lin)
            if bn:
                layers.append(BatchNorm1d(width))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def load_data(
    cfg: BaseConfig,
    ctx: RunContext,
    n_train: int,
    n_eval: int,
    *,
    batch_size: int | None = None,
) -> Any:
    """The configured dataset, cut to ``n_train`` training and ``n_eval`` held-out examples
    (0 = all).

    Raises :class:`ConfigError` for a negative count (a slice would silently mean "all but the
    last N"), checked before any data is loaded, and — if ``batch_size`` is given — when the
    training set ends up smaller than one batch."""
    for name, n in (("n_train", n_train), ("n_eval", n_eval)):
        if n < 0:
            raise ConfigError(f"{name} must be >= 0 (0 = all examples), got {n}")
    ds = ctx.load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    ds = ds.subset(train=n_train or None, test=n_eval or None)
    if batch_size is not None and ds.x_train.shape[0] < batch_size:
        raise ConfigError(
            f"the training set has {ds.x_train.shape[0]} examples, fewer than "
            f"batch_size={batch_size}; use a smaller batch_size or more data (n_train)"
        )
    return ds


def cached_train(
    ctx: RunContext, key: str, fn: Callable[[], tuple[TrainResult, dict[str, Any]]]
) -> dict[str, Any]:
    """Run ``fn`` (train one arm, return its result and extra measurements) once; a resumed run
    loads it from the run folder. Returns ``{"train": TrainResult dict, "extra": {...}}``."""

    def work() -> dict[str, Any]:
        res, extra = fn()
        ctx.log(
            f"  {key}: {res.steps_done} steps in {res.seconds:.1f} s"
            + (f", diverged at step {res.diverged_step}" if res.diverged else "")
        )
        return {"train": res.to_dict(), "extra": extra}

    out: dict[str, Any] = ctx.cached(key, work)
    return out


def arm_rows(arm: str, seed: int, train: dict[str, Any], **cols: Any) -> list[dict[str, Any]]:
    """The training rows of one arm and seed, labelled for ``metrics.csv``."""
    return [{"arm": arm, "seed": seed, **cols, **r} for r in train["rows"]]


def accuracy_curve(train: dict[str, Any], key: str = "test_acc") -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in train["rows"] if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def final_acc(train: dict[str, Any], key: str = "test_acc", window: int = 1) -> float | None:
    """The mean of the last ``window`` evaluations of ``key`` (the held-out accuracy at the end);
    ``None`` if the run diverged or has no evaluation."""
    if train.get("diverged"):
        return None
    _, accs = accuracy_curve(train, key)
    return float(np.mean(accs[-window:])) if accs else None


#: an arm "learned" only once it is this fraction of the way from chance to perfect accuracy
LEARNED_FLOOR = 0.25
#: an arm is off chance (not stuck there) once it is this fraction of the way to perfect
ABOVE_CHANCE_FLOOR = 0.1


def learned_bar(chance: float, reference: float, floor: float = LEARNED_FLOOR) -> float:
    """The accuracy an arm must reach to count as having learned: halfway from chance to
    ``reference`` (the best or target accuracy it is judged against), and never below
    ``floor`` of the way from chance to 1 — a bar relative to a reference alone falls to
    chance when the reference is there, and the best arm would always clear it."""
    return chance + max(0.5 * (reference - chance), floor * (1.0 - chance))


def mean_of(values: Sequence[float | None]) -> float | None:
    """The mean of the finite values (``None`` if there is none): a descriptive statistic,
    never a verdict's ranking (see :func:`ranked`)."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------------------------
# ranking arms for the claims: a diverged run ranks lowest (the one home of this rule)

RANK_RULE = (
    "an arm with a diverged seed ranks lowest (accuracy -inf; error, drift, non-smoothness "
    "+inf); not supported if both compared arms diverged"
)


def ranked(mean: float | None, diverged: Sequence[bool], worst: float) -> float | None:
    """An arm's seed-mean for ranking the arms: ``worst`` (``-inf`` for an accuracy, ``+inf``
    for an error or a drift) if any seed diverged — a diverged run ranks lowest, and one
    diverged seed is enough (the seed-mean of a run that scored ``worst`` is ``worst``) — else
    ``mean`` (``None``: not measured)."""
    return worst if any(diverged) else mean


def all_diverged(*arms: Sequence[bool]) -> bool:
    """Whether every compared arm has a diverged seed (then no claim comparing them holds)."""
    return all(any(d) for d in arms)


def finite(x: float | None) -> float | None:
    """``x`` if it is a finite number, else ``None`` (no ``±inf`` in the measured values)."""
    return x if x is not None and math.isfinite(x) else None


def diverged_flags(runs: Sequence[dict[str, Any]]) -> list[bool]:
    """Per seed, whether the run diverged; ``runs`` are TrainResult dicts or ``{"train": …}``."""
    return [bool(r["train"]["diverged"] if "train" in r else r["diverged"]) for r in runs]


def diverged_text(div: Mapping[str, Sequence[bool]], what: str = "diverged") -> str:
    """Which arms diverged, for the measured values: ``"none"`` or e.g. ``"baseline diverged
    in 1 of 2 seeds (ranks lowest)"``; ``"… (both arms diverged: not supported)"`` when every
    arm compared did."""
    parts = [f"{a} {what} in {sum(d)} of {len(d)} seeds" for a, d in div.items() if any(d)]
    if not parts:
        return "none"
    if len(parts) == len(div):
        every = "both arms" if len(div) == 2 else "all arms"
        return " and ".join(parts) + f" ({every} {what}: not supported)"
    return " and ".join(parts) + (" (ranks lowest)" if len(parts) == 1 else " (rank lowest)")


def divergence(div: Mapping[str, Sequence[bool]], what: str = "diverged") -> dict[str, Any]:
    """The measured values that say which arms diverged: the text of :func:`diverged_text`
    and the count per arm (``diverged_seeds``), from which a verdict can be recomputed."""
    return {
        "diverged": diverged_text(div, what),
        "diverged_seeds": {a: int(sum(d)) for a, d in div.items()},
    }


def spread_rule(n_seeds: int, what: str = "std + std") -> str:
    """The spread's definition for a claim's details; with one seed it is unknown."""
    if n_seeds > 1:
        return f"spread = {what} (population std over {n_seeds} seeds)"
    return (
        f"spread = {what}, unknown with one seed (taken as 0, so any difference passes: run "
        "more seeds)"
    )


def blew_up(run: Mapping[str, Any], key: str, skip: int = 0) -> bool:
    """The run diverged, or a value of ``key`` in one of its probes (a number, or a list per
    layer of which the first ``skip`` are left out) is not finite (null once saved): a measure
    that overflowed ranks as a diverged arm (+inf), instead of leaving the mean over the probes
    that stayed finite, which would make the arm that blew up look better."""

    def values(probe: Mapping[str, Any]) -> list[Any]:
        v = probe[key]
        return list(v[skip:]) if isinstance(v, list) else [v]

    return bool(run["train"]["diverged"]) or any(
        v is None or not np.isfinite(v) for p in run["extra"]["probes"] for v in values(p)
    )


def exceeds_spread(
    a: Sequence[float | None],
    b: Sequence[float | None],
    diverged_a: Sequence[bool],
    diverged_b: Sequence[bool],
    *,
    names: tuple[str, str] = ("a", "b"),
    worst: float = -math.inf,
) -> dict[str, Any]:
    """Is the difference of the ranked means of ``a`` and ``b`` (per-seed values) larger than
    the seed-to-seed spread?

    Spread = std(a) + std(b) (population std over the finite values); with one seed the spread
    is unknown (0) and any difference counts. Ranking (:func:`ranked`): an arm with a diverged
    seed scores ``worst`` (``-inf`` for accuracies, ``+inf`` for errors), so when only one arm
    diverged ``diff`` is ``±inf`` and exceeds any spread; when both diverged (or a mean is
    missing) ``diff`` is ``None`` and nothing exceeds.

    Returns ``diff`` (for the verdict, may be ``±inf``), ``spread``, ``exceeds`` and
    ``measured``: the values for the claim (``difference`` finite or ``None``, ``spread``,
    which arms diverged, and a note when the spread is unknown with one seed)."""
    sa, sb = mean_std(list(a)), mean_std(list(b))
    div = {names[0]: list(diverged_a), names[1]: list(diverged_b)}
    both = all_diverged(diverged_a, diverged_b)
    ra, rb = ranked(sa["mean"], diverged_a, worst), ranked(sb["mean"], diverged_b, worst)
    spread = (sa["std"] or 0.0) + (sb["std"] or 0.0)
    one_seed = min(len(a), len(b)) < 2
    if both or ra is None or rb is None:
        diff, exceeds = None, False
    else:
        diff = ra - rb
        exceeds = bool(abs(diff) > spread)
    measured: dict[str, Any] = {"difference": finite(diff), "spread": spread}
    if one_seed:
        measured["spread_note"] = "unknown with one seed: any difference passes"
    measured.update(divergence(div))
    return {"diff": diff, "spread": spread, "exceeds": exceeds, "measured": measured}


def check_bn1d_batch(batch_size: int) -> None:
    """Refuse a training batch too small for the BN layers of a fully connected network: each
    feature is normalized over the batch alone, which needs at least 2 samples (a run would
    otherwise fail at its first BN step, after whatever trained before it)."""
    if batch_size < 2:
        raise ConfigError(
            f"batch_size must be >= 2, got {batch_size}: BN after a fully connected layer "
            "normalizes each feature over the batch, which needs at least 2 samples"
        )


def check_activations(*names: str) -> None:
    """Refuse an activation :func:`batchnorm.lab.models.make_activation` does not know, before
    anything runs (the network would otherwise fail at its first build, mid-run)."""
    for name in names:
        if name not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


def check_final_window(final_window: int, steps: int, eval_every: int) -> None:
    """Refuse a final-accuracy window longer than the evaluations after step 0: the mean of the
    last ``final_window`` evaluations would average in the untrained network."""
    if min(final_window, steps, eval_every) < 1:
        raise ConfigError(
            f"final_window, steps and eval_every must be >= 1, got {final_window}, {steps} "
            f"and {eval_every}"
        )
    trained = -(-steps // eval_every)  # evaluations after step 0
    if final_window > trained:
        raise ConfigError(
            f"final_window={final_window} is more than the {trained} evaluations after step 0 "
            f"(steps={steps}, eval_every={eval_every}): the final accuracy would include the "
            "untrained network; lower final_window or eval_every"
        )


def check_probe_every(probe_every: int, steps: int) -> None:
    """Refuse a probe interval longer than the run: no probe would be taken, and the claims
    would be judged on no measurement at all."""
    if min(probe_every, steps) < 1:
        raise ConfigError(f"probe_every and steps must be >= 1, got {probe_every} and {steps}")
    if probe_every > steps:
        raise ConfigError(
            f"probe_every={probe_every} is more than steps={steps}: no measurement would be "
            "taken; lower probe_every"
        )


def exponential_decay(lr: float, steps: int, halvings: float) -> Callable[[int], float]:
    """``lr · 2^(−halvings·t/steps)``: the learning rate halves ``halvings`` times over the run."""

    def schedule(t: int) -> float:
        return lr * 2.0 ** (-halvings * t / max(1, steps))

    return schedule


def steps_to(steps: Sequence[int], curve: Sequence[float | None], target: float) -> int | None:
    """The first evaluation step after the start (step 0, the untrained network, is excluded:
    reaching a chance-level target there says nothing about training speed) at which ``curve``
    reaches ``target``; ``None`` if never."""
    pts = [(s, v) for s, v in zip(steps, curve) if s > 0]
    return train.steps_to_target([p[0] for p in pts], [p[1] for p in pts], target)


def seed_steps(
    runs: Sequence[dict[str, Any]], target: float | None, key: str = "test_acc"
) -> list[int | None]:
    """Per seed, the first evaluation after step 0 at which ``key`` reaches ``target``;
    ``None`` if never, or if the run diverged (a diverged run is never the faster one)."""
    return [
        None if target is None or run["diverged"] else steps_to(*accuracy_curve(run, key), target)
        for run in runs
    ]


def mean_steps(per_seed: Sequence[int | None]) -> float | None:
    """The seed-mean steps to the target; ``None`` if a seed never reached it."""
    if not per_seed or any(v is None for v in per_seed):
        return None
    return float(np.mean([float(v) for v in per_seed if v is not None]))


FASTER_RULE = (
    "an arm reaches the target in fewer steps than no-BN if every seed of it reaches the "
    "target and the seed-mean steps of no-BN minus those of the arm are positive and larger "
    "than the spread; a no-BN seed that never reaches the target counts as reaching it right "
    "after the run (steps + 1: a lower bound, which favours no-BN); a diverged seed never "
    "reaches it"
)


def faster(nobn: Sequence[int | None], arm: Sequence[int | None], censor: int) -> dict[str, Any]:
    """Does ``arm`` reach the target in fewer steps than ``nobn`` (steps per seed, ``None``:
    never reached) by more than the seed-to-seed spread (std + std; unknown, 0, with one seed)?
    A no-BN seed that never reached counts as ``censor`` (the run's length + 1); the arm must
    reach in every seed. Returns ``verdict`` and the measured ``difference`` (no-BN − arm,
    ``None`` if the arm missed in a seed) and ``spread`` (see :data:`FASTER_RULE`)."""
    ref: list[int | None] = [censor if v is None else v for v in nobn]
    a, b = mean_std(list(ref)), mean_std(list(arm))
    m_a, m_b = mean_steps(ref), mean_steps(arm)
    spread = (a["std"] or 0.0) + (b["std"] or 0.0)
    if m_a is None or m_b is None:
        diff, verdict = None, False
    else:
        diff = m_a - m_b
        verdict = bool(diff > 0 and diff > spread)
    measured: dict[str, Any] = {"difference": diff, "spread": spread, "never_reached_as": censor}
    if min(len(nobn), len(arm)) < 2:
        measured["spread_note"] = "unknown with one seed: any difference passes"
    return {"verdict": verdict, "measured": measured}


def exact_key(x: float) -> str:
    """A label that identifies the number ``x`` exactly, for part names, arm names and saved
    sweeps (learning rates, dropout rates, init scales): the short ``:g`` form (``0.3``, ``3``,
    ``0.001``) when it reads back as the same number, else ``repr`` (``1.0000001``, which ``:g``
    would round to ``1``). Distinct values never share a label: a label always reads back as its
    own value, and ordinary values keep their readable ``:g`` labels (so saved parts resume)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)
