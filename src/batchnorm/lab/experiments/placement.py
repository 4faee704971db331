"""``placement`` — BN before or after the nonlinearity, and no BN.

The paper puts BN before the nonlinearity (Ioffe & Szegedy 2015, Sec. 3.2: normalize
``x = Wu``, since ``Wu`` is "more likely to have a symmetric, non-sparse distribution");
many practitioners put it after, and the common advice is "test both". This experiment trains
the same MLP with BN before, after, and without BN, for ReLU and for a saturating activation
(sigmoid by default), over several seeds, all at one learning rate.

Measured per arm: final held-out accuracy (mean of the last ``final_window`` evaluations, all
after step 0), best accuracy reached by training, and per seed the steps until the held-out
accuracy reaches a target (the no-BN arm's final seed-mean accuracy).

The arms are the two layouts as practitioners build them, so they differ in more than where BN
sits relative to the activation, and the claims say so: BN before drops the linear layer's bias
(BN's β replaces it) while BN after keeps it; with BN after, the last hidden block's BN
normalizes the classifier's input, while with BN before the classifier sees the raw
activations; and every arm trains at the same learning rate, not one tuned per arm.

Claims, per activation (verdicts computed from the per-seed numbers):

* BN before the activation gives a higher final accuracy than after, by more than the
  seed-to-seed spread (the paper's choice);
* the placement matters: before and after differ by more than the spread (the "test both" advice);
* BN trains faster: each placement reaches the no-BN arm's final accuracy in fewer steps than
  no-BN itself, by more than the seed-to-seed spread of the steps (the rule of
  :func:`~batchnorm.lab.experiments._nets.faster`: every seed of the placement must reach
  the target; a no-BN seed that never does counts as reaching it right after the run).

Spread = std(before) + std(after), population std over seeds (unknown with one seed: then any
difference passes, and the claims say so). As in paper-mnist, a diverged run ranks lowest: a
placement with a diverged seed has final accuracy −∞ (it loses the comparison, whatever its
surviving seeds reached) and is not faster; when both compared arms diverged no claim is
supported; a no-BN arm with a diverged seed has a −∞ final accuracy, which each BN placement
reaches at its first evaluation after step 0, while no-BN itself never does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from batchnorm.lab import models, train
from batchnorm.lab.config import BaseConfig, ConfigError, check_distinct
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    FASTER_RULE,
    RANK_RULE,
    accuracy_curve,
    arm_rows,
    cached_train,
    check_activations,
    check_bn1d_batch,
    check_final_window,
    diverged_flags,
    divergence,
    exceeds_spread,
    faster,
    final_acc,
    finite,
    load_data,
    mean_steps,
    ranked,
    seed_steps,
    spread_rule,
)
from batchnorm.lab.registry import register
from batchnorm.lab.results import Claim, Results, RunContext, RunData, mean_std

NAME = "placement"
SOURCE = "Ioffe & Szegedy 2015, Sec. 3.2"
PLACEMENTS = ("none", "before", "after")
LABELS = {"none": "no BN", "before": "BN before act", "after": "BN after act"}


@dataclass
class PlacementConfig(BaseConfig):
    """Settings of the placement experiment (see the module docstring)."""

    seeds: int = 3
    steps: int = 1500
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    activations: tuple[str, ...] = ("relu", "sigmoid")
    lr: float = 0.05
    momentum: float = 0.9
    eval_every: int = 100
    final_window: int = 3
    n_train: int = 0
    n_eval: int = 2000

    QUICK = {
        "seeds": 2,
        "steps": 80,
        "eval_every": 20,
        "hidden": (32, 32),
        "n_train": 800,
        "n_eval": 300,
        "final_window": 2,
    }

    def validate(self) -> None:
        super().validate()
        check_distinct(activations=self.activations)
        check_bn1d_batch(self.batch_size)
        self.at_least_one("steps", "eval_every", "final_window")
        check_final_window(self.final_window, self.steps, self.eval_every)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.hidden or min(self.hidden) < 1:
            # with no hidden layer there is nowhere to put BN: every arm is the same network
            raise ConfigError(
                f"hidden must list at least one layer width >= 1 (BN goes into the hidden "
                f"layers), got {self.hidden}"
            )
        if not self.activations:
            raise ConfigError("activations must name at least one activation")
        check_activations(*self.activations)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be positive and finite, got {self.lr}")
        if not (math.isfinite(self.momentum) and self.momentum >= 0):
            raise ConfigError(f"momentum must be >= 0 and finite, got {self.momentum}")
        if self.n_train < 0 or self.n_eval < 0:
            raise ConfigError(
                f"n_train and n_eval must be >= 0 (0 = all examples), got {self.n_train}, "
                f"{self.n_eval}"
            )
        if 0 < self.n_train < self.batch_size:
            raise ConfigError(
                f"n_train={self.n_train} is smaller than batch_size={self.batch_size}: not one "
                "full batch to train on"
            )


def _train(
    cfg: PlacementConfig, ds: Dataset, act: str, bn: str, seed: int, progress: bool | None
) -> tuple[train.TrainResult, dict[str, Any]]:
    train.seed_everything(seed)
    net = models.MLP(ds.num_features, cfg.hidden, ds.num_classes, activation=act, bn=bn)  # type: ignore[arg-type]
    opt = train.make_optimizer(net.parameters(), "sgd", cfg.lr, cfg.momentum)
    res = train.train(
        net,
        opt,
        ds.x_train,
        ds.y_train,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        eval_sets={"test": (ds.x_test, ds.y_test)},
        eval_every=cfg.eval_every,
        seed=seed,
        threads=cfg.threads,
        progress=progress,
        desc=f"{act} bn={bn} seed={seed}",
    )
    return res, {}


def _schedule(runs: list[dict[str, Any]]) -> list[int]:
    """Every evaluation step of ``runs`` (a diverged run stops early: the others set the axis)."""
    return sorted(
        {int(r["step"]) for run in runs for r in run["rows"] if r.get("test_acc") is not None}
    )


def _aligned(run: dict[str, Any], steps: list[int]) -> list[float | None]:
    """One run's held-out accuracy at ``steps`` (``None`` where it has none: after divergence)."""
    acc = {int(r["step"]): r["test_acc"] for r in run["rows"] if r.get("test_acc") is not None}
    return [acc.get(s) for s in steps]


def _best(run: dict[str, Any]) -> float | None:
    """The best held-out accuracy reached by training (step 0, the untrained network, excluded)."""
    steps, accs = accuracy_curve(run)
    return max((a for s, a in zip(steps, accs) if s > 0), default=None)


def figures(run: RunData, out: Path) -> list[Path]:
    """Held-out accuracy curves per activation and the final accuracies as points."""
    from batchnorm.lab import plots

    s = run.series
    acts = list(s["curves"])
    fig, axes = plots.new_figure(len(acts) + 1, size=(4.4, 3.4))
    for ax, act in zip(axes, acts):
        d = s["curves"][act]
        plots.curves(
            ax,
            d["steps"],
            {p: d["acc"][p] for p in PLACEMENTS if p in d["acc"]},
            labels=LABELS,
            xlabel="training step",
            ylabel="held-out accuracy",
            title=f"{act} MLP: held-out accuracy\n(mean ± std over seeds)",
        )
    finals = s["finals"]
    window = s.get("final_window")
    last = f"mean of last {window} evals" if window else "last evaluations"
    plots.grouped_points(
        axes[-1],
        acts,
        {LABELS[p]: [finals[a][p] for a in acts] for p in PLACEMENTS},
        ylabel=f"final accuracy ({last})",
        title="final held-out accuracy\n(mean ± std, seeds that did not diverge)",
    )
    lo = [v for a in acts for p in PLACEMENTS for v in finals[a][p] if v is not None]
    if lo:
        axes[-1].set_ylim(max(0.0, min(lo) - 0.05), min(1.0, max(lo) + 0.02))
    return [plots.save_figure(fig, out / f"{NAME}.png")]


@register(
    NAME,
    config=PlacementConfig,
    figures=figures,
    source=SOURCE,
    description="MLP with BN before vs after the activation (ReLU, sigmoid) and without BN, "
    "over seeds: final accuracy and steps-to-target against the seed-to-seed spread",
)
def run(cfg: PlacementConfig, ctx: RunContext) -> Results:
    """Train every (activation, placement, seed); claims from the per-seed numbers."""
    ds = load_data(cfg, ctx, cfg.n_train, cfg.n_eval, batch_size=cfg.batch_size)
    seeds = cfg.seed_list()
    rows: list[dict[str, Any]] = []
    arms: dict[str, Any] = {}
    claims: list[Claim] = []
    curves: dict[str, Any] = {}
    finals_all: dict[str, dict[str, list[float | None]]] = {}
    # the arms differ in more than the placement, as the two layouts are built in practice
    layout = (
        f"all arms train at lr={cfg.lr:g} (momentum {cfg.momentum:g}), not tuned per arm; BN "
        "before drops the linear bias (beta replaces it), BN after keeps it; with BN after, the "
        "last BN normalizes the classifier's input, with BN before the classifier sees the raw "
        "activations"
    )
    for act in cfg.activations:
        runs: dict[str, list[dict[str, Any]]] = {}
        for bn in PLACEMENTS:
            runs[bn] = []
            for seed in seeds:
                res = cached_train(
                    ctx,
                    f"{act}-{bn}-seed{seed}",
                    partial(_train, cfg, ds, act, bn, seed, ctx.progress),
                )["train"]
                runs[bn].append(res)
                rows += arm_rows(f"{act}/{bn}", seed, res, activation=act, bn=bn)
        finals = {
            bn: [final_acc(r, window=cfg.final_window) for r in runs[bn]] for bn in PLACEMENTS
        }
        div = {bn: diverged_flags(runs[bn]) for bn in PLACEMENTS}
        finals_all[act] = finals
        # the target: no-BN's seed-mean final accuracy, ranked (−∞ if a no-BN seed diverged)
        target = ranked(mean_std(finals["none"])["mean"], div["none"], -math.inf)
        reach_seeds = {bn: seed_steps(runs[bn], target) for bn in PLACEMENTS}
        reach = {bn: mean_steps(reach_seeds[bn]) for bn in PLACEMENTS}
        schedule = _schedule([r for bn in PLACEMENTS for r in runs[bn]])
        curves[act] = {
            "steps": schedule,
            "acc": {bn: [_aligned(r, schedule) for r in runs[bn]] for bn in PLACEMENTS},
        }
        for bn in PLACEMENTS:
            arms[f"{act}/{bn}"] = {
                "final_accuracy": mean_std(finals[bn]),
                "best_accuracy": mean_std([_best(r) for r in runs[bn]]),
                "steps_to_target": reach[bn],
                "steps_to_target_per_seed": reach_seeds[bn],
                "diverged": sum(bool(r["diverged"]) for r in runs[bn]),
            }
        cmp = exceeds_spread(
            finals["before"],
            finals["after"],
            div["before"],
            div["after"],
            names=("before", "after"),
        )
        rule = (
            f"final accuracy = mean of the last {cfg.final_window} evaluations; "
            + spread_rule(len(seeds), "std(before) + std(after)")
            + f"; {RANK_RULE}; {layout}"
        )
        measured = {
            "before": mean_std(finals["before"]),
            "after": mean_std(finals["after"]),
            "none": mean_std(finals["none"]),
            **cmp["measured"],
        }
        claims.append(
            Claim(
                id=f"before-better-{act}",
                statement=f"{act}: BN before the activation beats BN after it by more than the "
                "seed-to-seed spread",
                verdict=cmp["diff"] is not None and cmp["exceeds"] and cmp["diff"] > 0,
                measured=measured,
                source=SOURCE,
                seeds=seeds,
                details=rule + "; supported if before - after > spread",
            )
        )
        claims.append(
            Claim(
                id=f"placement-matters-{act}",
                statement=f"{act}: before and after differ by more than the seed-to-seed spread "
                "(the 'test both' advice)",
                verdict=cmp["exceeds"],
                measured=dict(cmp["measured"]),
                source="common practice",
                seeds=seeds,
                details=rule + "; supported if |before - after| > spread",
            )
        )
        # per placement: every seed reaches the target and no-BN needs more steps by more than
        # the spread of the steps; a diverged seed ranks lowest (no-BN's: BN wins, BN's: loses)
        censor = cfg.steps + 1
        quick = {
            b: faster(reach_seeds["none"], reach_seeds[b], censor) for b in ("before", "after")
        }
        wins = {
            b: not any(div[b])
            and None not in reach_seeds[b]
            and (any(div["none"]) or bool(quick[b]["verdict"]))
            for b in ("before", "after")
        }
        speed: dict[str, Any] = {
            "target_accuracy": finite(target),
            "steps": reach,
            "steps_per_seed": reach_seeds,
            "never_reached_as": censor,
            "difference": {b: quick[b]["measured"]["difference"] for b in quick},
            "spread": {b: quick[b]["measured"]["spread"] for b in quick},
        }
        if len(seeds) < 2:
            speed["spread_note"] = "unknown with one seed: any difference passes"
        claims.append(
            Claim(
                id=f"bn-faster-{act}",
                statement=f"{act}: BN (before and after) reaches the no-BN network's final "
                "accuracy in fewer steps, by more than the seed-to-seed spread of the steps",
                verdict=all(wins.values()),
                measured={**speed, **divergence(div)},
                source="Ioffe & Szegedy 2015, Sec. 4.1, Fig. 1a",
                seeds=seeds,
                details=f"target = the no-BN arm's seed-mean final accuracy (mean of the last "
                f"{cfg.final_window} evaluations); per seed, the first evaluation after step 0 "
                f"(every {cfg.eval_every} steps; the untrained network does not count) at which "
                f"the held-out accuracy reaches it; {FASTER_RULE}; "
                + spread_rule(len(seeds), "std + std of the steps")
                + "; supported if both placements are faster; a diverged run ranks lowest: a "
                "no-BN arm with a diverged seed has target -inf and never reaches it itself, a "
                "placement with a diverged seed is not faster (nor when no-BN diverged too)",
            )
        )
    for c in claims:
        ctx.log(f"[{'supported' if c.verdict else 'NOT supported'}] {c.statement}")
    summary = {"dataset": ds.info(), "seeds": seeds, "arms": arms, "claims": claims}
    series = {"curves": curves, "finals": finals_all, "final_window": cfg.final_window}
    return Results(rows=rows, summary=summary, series=series)
