"""``dropout`` — does BN act as a regularizer and reduce the need for dropout, and what does
dropout before BN do to its statistics?

The paper (Ioffe & Szegedy 2015, Sec. 3.4 and 4.2.1) says BN regularizes the model and that
dropout can be removed or reduced. Li, Chen, Hu & Yang (2019, arXiv 1801.05134) show that
dropout placed before a BN layer shifts the variance BN sees between training (dropout on,
inverted scaling inflates the variance) and inference (dropout off): the running variance no
longer matches the inputs at test time ("variance shift").

Setup: an MLP trained on a small training subset (``n_train``) long enough to overfit, with
and without BN before each activation, for each dropout rate in ``dropout_rates``:

* ``noBN-p`` — dropout after every hidden block;
* ``BN-p`` — the same with BN: the dropout of block k precedes the BN of block k+1 (shift);
* ``BN-last-p`` — BN, with dropout only before the classifier, after the last BN (no shift).

Measured: final held-out accuracy, the generalization gap (accuracy on the training examples
minus held-out accuracy), and at the end of training, for every BN layer, the train/eval
statistics mismatch of :func:`batchnorm.analysis.bn_statistics_mismatch` on held-out inputs
(``var_ratio`` = actual variance / running variance, 1 = no shift).

Claims:

* BN reduces the benefit of dropout: (held-out accuracy with the best dropout rate − accuracy
  without) is smaller with BN than without; the best rate is chosen on a validation set of
  ``n_val`` training images that no arm trains on (choosing it by the test accuracy it is then
  judged on would inflate both benefits), the smaller rate on a tie;
* BN regularizes: without dropout, the BN network's generalization gap is smaller;
* dropout before BN shifts the variance: the BN layers preceded by dropout have
  ``|log var_ratio|`` larger than the same layers in the ``BN-last`` arm;
* moving dropout after the last BN improves accuracy: at the largest rate, ``BN-last`` beats
  ``BN`` by more than the seed-to-seed spread (std + std over seeds; unknown with one seed, when
  any difference passes). The two arms differ in the variance shift *and* in the amount of
  dropout (one dropout layer instead of one per hidden block), so this compares placements; the
  shift's own share is measured alongside as ``recalibration_gain``: the held-out accuracy gained
  by recomputing the BN statistics with dropout off (:func:`batchnorm.recalibrate`, which removes
  the shift and nothing else), on the shift arm and on the no-shift arm.

As in paper-mnist, a diverged run ranks lowest: an arm with a diverged seed has held-out
accuracy −∞ and generalization gap and ``|log var_ratio|`` +∞ in the claims, whatever its
surviving seeds measured; a claim whose compared arms both diverged is not supported.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from batchnorm.analysis import bn_statistics_mismatch
from batchnorm.diagnostics import before_after
from batchnorm.lab import models, train
from batchnorm.lab.config import (
    BaseConfig,
    ConfigError,
    check_distinct,
    check_non_negative,
    check_positive,
    check_widths,
)
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    RANK_RULE,
    all_diverged,
    arm_rows,
    cached_train,
    check_bn1d_batch,
    check_final_window,
    diverged_flags,
    divergence,
    exact_key,
    exceeds_spread,
    final_acc,
    finite,
    load_data,
    ranked,
    spread_rule,
)
from batchnorm.lab.registry import register
from batchnorm.lab.report import doctor_section
from batchnorm.lab.results import Claim, Results, RunContext, RunData, mean_std
from batchnorm.tools import recalibrate

NAME = "dropout"
SOURCE = "Ioffe & Szegedy 2015, Sec. 3.4 and 4.2.1"
SOURCE_LI = "Li, Chen, Hu & Yang 2019 (arXiv 1801.05134), Sec. 3"


@dataclass
class DropoutConfig(BaseConfig):
    """Settings of the dropout experiment (see the module docstring)."""

    seeds: int = 2
    steps: int = 1500
    batch_size: int = 60
    hidden: tuple[int, ...] = (256, 256, 256)
    dropout_rates: tuple[float, ...] = (0.0, 0.2, 0.5)
    lr: float = 0.05
    momentum: float = 0.9
    eval_every: int = 150
    final_window: int = 3
    n_train: int = 5000
    n_eval: int = 2000
    n_train_eval: int = 2000
    n_val: int = 2000

    QUICK = {
        "steps": 80,
        "hidden": (32, 32, 32),
        "eval_every": 20,
        "n_train": 500,
        "n_eval": 300,
        "n_train_eval": 300,
        "n_val": 200,
        "final_window": 2,
    }

    def validate(self) -> None:
        super().validate()
        check_distinct(dropout_rates=self.dropout_rates)
        check_widths(hidden=self.hidden)
        check_positive(lr=self.lr)
        check_non_negative(momentum=self.momentum)
        if self.n_train_eval < 0:
            raise ConfigError(
                f"n_train_eval must be >= 0 (0 = all training examples), got {self.n_train_eval}"
            )
        check_bn1d_batch(self.batch_size)
        self.at_least_one("steps", "eval_every", "final_window")
        check_final_window(self.final_window, self.steps, self.eval_every)
        if 0.0 not in self.dropout_rates or len(self.dropout_rates) < 2:
            raise ConfigError(
                f"dropout_rates must include 0.0 and at least one positive rate, got "
                f"{self.dropout_rates}"
            )
        if any(not 0 <= p < 1 for p in self.dropout_rates):
            raise ConfigError(f"dropout rates must be in [0, 1), got {self.dropout_rates}")
        if len(self.hidden) < 2:
            raise ConfigError("hidden needs >= 2 layers so that a dropout can precede a BN")
        if self.n_val < 1:
            raise ConfigError(f"n_val must be >= 1 (the validation images), got {self.n_val}")


def _net(cfg: DropoutConfig, ds: Dataset, bn: bool, p: float, where: str) -> nn.Module:
    net = models.MLP(
        ds.num_features,
        cfg.hidden,
        ds.num_classes,
        activation="relu",
        bn="before" if bn else "none",
        dropout=p if where == "every" else 0.0,
    )
    if where == "last" and p > 0:
        # dropout only after the last BN, right before the classifier: no BN sees its variance
        net.out = nn.Sequential(nn.Dropout(p), net.out)  # type: ignore[assignment]
    return net


def _split(cfg: DropoutConfig, ds: Dataset) -> tuple[Dataset, tuple[Tensor, Tensor]]:
    """The training set (its first ``n_train`` images, all but the validation images when
    ``n_train`` is 0) and the ``n_val`` training images after them, for choosing the rate."""
    total = ds.x_train.shape[0]
    n = cfg.n_train or total - cfg.n_val
    if n < cfg.batch_size or n + cfg.n_val > total:
        raise ConfigError(
            f"dropout: {total} training images do not hold n_train={cfg.n_train} training and "
            f"n_val={cfg.n_val} validation images (at least batch_size={cfg.batch_size} for "
            "training); lower n_train or n_val"
        )
    val = (ds.x_train[n : n + cfg.n_val], ds.y_train[n : n + cfg.n_val])
    return ds.subset(train=n, test=ds.x_test.shape[0]), val


def _train(
    cfg: DropoutConfig,
    ds: Dataset,
    val: tuple[Tensor, Tensor],
    bn: bool,
    p: float,
    where: str,
    seed: int,
    progress: bool | None,
) -> tuple[train.TrainResult, dict[str, Any]]:
    train.seed_everything(seed)
    net = _net(cfg, ds, bn, p, where)
    opt = train.make_optimizer(net.parameters(), "sgd", cfg.lr, cfg.momentum)
    n = cfg.n_train_eval or ds.x_train.shape[0]
    res = train.train(
        net,
        opt,
        ds.x_train,
        ds.y_train,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        eval_sets={
            "test": (ds.x_test, ds.y_test),
            "train": (ds.x_train[:n], ds.y_train[:n]),
            "val": val,
        },
        eval_every=cfg.eval_every,
        seed=seed,
        threads=cfg.threads,
        progress=progress,
        desc=f"bn={bn} p={p:g} {where} seed={seed}",
    )
    mismatch = {} if res.diverged else bn_statistics_mismatch(net, ds.x_test)
    extra: dict[str, Any] = {"mismatch": mismatch}
    if bn and not res.diverged:
        # the doctor's findings on this arm, and after its fix: statistics recomputed with
        # Dropout off (batchnorm.recalibrate) on training inputs
        calib = list(torch.split(ds.x_train[:2000], cfg.batch_size))
        try:
            doctor = before_after(
                net, ds.x_test, lambda m: recalibrate(m, calib), batch_size=cfg.batch_size
            )
            fixed = copy.deepcopy(net)
            recalibrate(fixed, calib)
        except (OverflowError, FloatingPointError):
            # activations beyond the float range, whose statistics no BN layer can hold: the
            # run diverged, though its loss stayed finite
            train.mark_diverged(res)
            return res, {"mismatch": {}}
        extra["doctor"] = doctor
        extra["doctor"]["test_acc_before"] = train.evaluate(net, ds.x_test, ds.y_test)[0]
        extra["doctor"]["test_acc_after"] = train.evaluate(fixed, ds.x_test, ds.y_test)[0]
    return res, extra


def _arm_name(bn: bool, p: float, where: str) -> str:
    # exact: two close rates never share an arm (or its saved parts); 0.5 stays "p0.5"
    return ("BN-last" if where == "last" else "BN" if bn else "noBN") + f"-p{exact_key(p)}"


def _recalibration_gain(runs: list[dict[str, Any]]) -> float | None:
    """Seed-mean held-out accuracy gained by recomputing the BN statistics with dropout off (the
    variance shift removed, nothing else changed); None when no seed has the measurement."""
    gains = [
        d["test_acc_after"] - d["test_acc_before"]
        for r in runs
        if (d := r["extra"].get("doctor")) is not None
        and d.get("test_acc_after") is not None
        and d.get("test_acc_before") is not None
    ]
    return float(np.mean(gains)) if gains else None


def figures(run: RunData, out: Path) -> list[Path]:
    """Accuracy and generalization gap per dropout rate, and the BN layers' variance ratios
    (±1 std over seeds), each arm in one colour in every panel."""
    from batchnorm.lab import plots

    s = run.series
    rates = [f"p={p:g}" for p in s["rates"]]
    colors = {arm: plots.color_for(arm, i) for i, arm in enumerate(s["test"])}
    fig, axes = plots.new_figure(3, size=(4.4, 3.5))
    plots.grouped_points(
        axes[0],
        rates,
        s["test"],
        colors=colors,
        ylabel="final held-out accuracy",
        title="held-out accuracy",
    )
    vals = [v for g in s["test"].values() for c in g for v in c if v is not None]
    if vals:
        axes[0].set_ylim(max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.02))
    plots.grouped_points(
        axes[1],
        rates,
        s["gap"],
        colors=colors,
        ylabel="train acc - held-out acc",
        title="generalization gap",
    )
    vr = s["var_ratio"]
    layers = sorted({layer for arm in vr.values() for layer in arm})
    top = s["rates"][-1]
    # each series: the arm of the other panels (its colour) and its name in the saved runs
    shown = {
        "dropout before BN": ("BN", _arm_name(True, top, "every")),
        "dropout after last BN": ("BN, dropout last", _arm_name(True, top, "last")),
    }
    per_seed = run.summary.get("variance_shift", {})

    def ratios(label: str, layer: str) -> list[float | None]:
        """Each seed's ratio (the seeds that trained); the seed mean without them."""
        seeds = per_seed.get(shown[label][1])
        if not seeds:  # (results saved with the means only)
            return [vr[label].get(layer)]
        return [m[layer]["var_ratio"] for m in seeds if layer in m]

    plots.grouped_points(
        axes[2],
        [layer.replace("hidden.", "h").replace(".bn", "") for layer in layers],
        {label: [ratios(label, layer) for layer in layers] for label in vr},
        colors={label: colors[shown[label][0]] for label in vr},
        ylabel="eval variance / running variance",
        title=f"BN variance shift (p={s['rates'][-1]:g})",
    )
    axes[2].axhline(1.0, color="k", lw=1, ls=":")
    return [plots.save_figure(fig, out / f"{NAME}.png")]


@register(
    NAME,
    config=DropoutConfig,
    figures=figures,
    source=SOURCE + "; " + SOURCE_LI,
    description="MLP with/without BN x dropout rates on a small training set: does BN reduce "
    "dropout's benefit and regularize; dropout before BN and the train/eval variance shift",
)
def run(cfg: DropoutConfig, ctx: RunContext) -> Results:
    """Train every arm and seed; claims from accuracies, gaps and measured BN statistics."""
    full = load_data(cfg, ctx, cfg.n_train and cfg.n_train + cfg.n_val, cfg.n_eval)
    ds, val = _split(cfg, full)
    seeds = cfg.seed_list()
    rates = sorted(cfg.dropout_rates)
    top = rates[-1]
    specs = [(False, p, "every") for p in rates] + [(True, p, "every") for p in rates]
    specs += [(True, p, "last") for p in rates if p > 0]
    rows: list[dict[str, Any]] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for bn, p, where in specs:
        name = _arm_name(bn, p, where)
        results[name] = []
        for seed in seeds:
            res = cached_train(
                ctx,
                f"{name}-seed{seed}",
                partial(_train, cfg, ds, val, bn, p, where, seed, ctx.progress),
            )
            results[name].append(res)
            rows += arm_rows(name, seed, res["train"], bn=bn, dropout=p, where=where)
    w = cfg.final_window
    test = {a: [final_acc(r["train"], "test_acc", w) for r in rs] for a, rs in results.items()}
    valid = {a: [final_acc(r["train"], "val_acc", w) for r in rs] for a, rs in results.items()}
    tr = {a: [final_acc(r["train"], "train_acc", w) for r in rs] for a, rs in results.items()}
    gap = {
        a: [None if x is None or y is None else x - y for x, y in zip(tr[a], test[a])]
        for a in results
    }
    div = {a: diverged_flags(rs) for a, rs in results.items()}
    # ranked seed-means (a diverged seed: accuracy −∞, gap +∞), for the verdicts
    m = {a: ranked(mean_std(v)["mean"], div[a], -math.inf) for a, v in test.items()}
    g = {a: ranked(mean_std(v)["mean"], div[a], math.inf) for a, v in gap.items()}

    def mismatch(arm: str) -> dict[str, float]:
        """Per BN layer, the seed-mean variance ratio (over the seeds that trained)."""
        layers: dict[str, list[float]] = {}
        for r in results[arm]:
            for layer, d in r["extra"]["mismatch"].items():
                layers.setdefault(layer, []).append(d["var_ratio"])
        return {layer: float(np.mean(v)) for layer, v in layers.items()}

    shift_arm, safe_arm = _arm_name(True, top, "every"), _arm_name(True, top, "last")
    vr_shift, vr_safe = mismatch(shift_arm), mismatch(safe_arm)
    # BN layers preceded by a dropout in the shift arm: every hidden BN but the first
    after_drop = [f"hidden.{k}.bn" for k in range(1, len(cfg.hidden))]

    def log_shift(arm: str, vr: dict[str, float]) -> float | None:
        vals = [abs(np.log(vr[layer])) for layer in after_drop if vr.get(layer, 0) > 0]
        return ranked(float(np.mean(vals)) if vals else None, div[arm], math.inf)

    shift_a, shift_b = log_shift(shift_arm, vr_shift), log_shift(safe_arm, vr_safe)
    shift_both = all_diverged(div[shift_arm], div[safe_arm])

    def difference(x: float | None, y: float | None) -> float | None:
        """``x - y`` of ranked values; ``None`` if either is missing or both are infinite of
        the same sign (both arms ranked lowest: undefined)."""
        if x is None or y is None:
            return None
        d = x - y
        return None if math.isnan(d) else d

    # ranked validation accuracy: the rate with dropout is chosen on it, never on the test set
    mv = {a: ranked(mean_std(v)["mean"], div[a], -math.inf) for a, v in valid.items()}

    def chosen(prefix: str) -> str | None:
        # the best validation accuracy; on a tie the smaller rate (max keeps the first)
        arms = [_arm_name(prefix == "BN", p, "every") for p in sorted(rates) if p > 0]
        scored = [(v, a) for a in arms if (v := mv[a]) is not None]
        return max(scored, key=lambda va: va[0])[1] if scored else None

    def benefit(prefix: str) -> float | None:
        best = chosen(prefix)
        return None if best is None else difference(m[best], m.get(f"{prefix}-p0"))

    b_nobn, b_bn = benefit("noBN"), benefit("BN")
    benefit_arms = [_arm_name(bn, p, "every") for bn in (False, True) for p in rates]
    reg_arms = ["noBN-p0", "BN-p0"]
    reg_both = all_diverged(*(div[a] for a in reg_arms))
    cost = exceeds_spread(
        test[safe_arm],
        test[shift_arm],
        div[safe_arm],
        div[shift_arm],
        names=(safe_arm, shift_arm),
    )
    claims = [
        Claim(
            id="bn-reduces-dropout-benefit",
            statement="BN reduces the benefit of dropout",
            verdict=b_nobn is not None and b_bn is not None and b_bn < b_nobn,
            measured={
                "benefit_without_BN": finite(b_nobn),
                "benefit_with_BN": finite(b_bn),
                "acc": {a: mean_std(test[a])["mean"] for a in benefit_arms},
                "val_acc": {a: mean_std(valid[a])["mean"] for a in benefit_arms},
                "chosen": {"noBN": chosen("noBN"), "BN": chosen("BN")},
                **divergence({a: div[a] for a in benefit_arms}),
            },
            source=SOURCE + " (BN-x5: dropout removed)",
            seeds=seeds,
            details="benefit = seed-mean final held-out accuracy at the positive dropout rate "
            f"with the best validation accuracy ({cfg.n_val} training images no arm trains on) "
            "minus the accuracy without dropout; supported if BN's benefit < "
            f"no-BN's; {RANK_RULE} (a diverged arm without dropout makes the benefit +inf, "
            "diverged arms with every rate make it -inf; undefined, not supported, when both)",
        ),
        Claim(
            id="bn-regularizes",
            statement="BN acts as a regularizer: without dropout, a smaller generalization gap",
            verdict=not reg_both
            and g["BN-p0"] is not None
            and g["noBN-p0"] is not None
            and g["BN-p0"] < g["noBN-p0"],
            measured={
                "gap_noBN": mean_std(gap["noBN-p0"])["mean"],
                "gap_BN": mean_std(gap["BN-p0"])["mean"],
                "acc_noBN": mean_std(test["noBN-p0"])["mean"],
                "acc_BN": mean_std(test["BN-p0"])["mean"],
                **divergence({a: div[a] for a in reg_arms}),
            },
            source=SOURCE,
            seeds=seeds,
            details=f"gap = accuracy on {cfg.n_train_eval} training examples - held-out "
            f"accuracy (mean of the last {w} evaluations), trained on {ds.x_train.shape[0]} "
            f"examples, without dropout; supported if BN's gap < no-BN's gap; {RANK_RULE}",
        ),
        Claim(
            id="dropout-before-bn-variance-shift",
            statement=f"dropout (p={top:g}) before BN shifts the variance BN sees between "
            "training and inference",
            verdict=not shift_both
            and shift_a is not None
            and shift_b is not None
            and shift_a > shift_b,
            measured={
                "var_ratio_dropout_before_bn": vr_shift,
                "var_ratio_dropout_after_last_bn": vr_safe,
                "mean_abs_log_ratio": {"shift_arm": finite(shift_a), "safe_arm": finite(shift_b)},
                "expected_ratio_li_et_al": 1 - top,
                **divergence({shift_arm: div[shift_arm], safe_arm: div[safe_arm]}),
            },
            source=SOURCE_LI,
            seeds=seeds,
            details="var_ratio = mean over channels of the held-out batch variance of the BN "
            f"input in eval mode / running variance; compared on layers {after_drop}: "
            "supported if the mean |log var_ratio| of the dropout-before-BN arm > that of the "
            f"dropout-after-last-BN arm; {RANK_RULE}",
        ),
        Claim(
            id="variance-shift-hurts",
            statement=f"moving dropout (p={top:g}) after the last BN (one dropout layer instead "
            "of one per hidden block) improves held-out accuracy by more than the seed-to-seed "
            "spread",
            verdict=cost["diff"] is not None and cost["exceeds"] and cost["diff"] > 0,
            measured={
                "acc_dropout_after_last_bn": mean_std(test[safe_arm]),
                "acc_dropout_before_bn": mean_std(test[shift_arm]),
                **cost["measured"],
                "recalibration_gain": {
                    "shift_arm": _recalibration_gain(results[shift_arm]),
                    "safe_arm": _recalibration_gain(results[safe_arm]),
                },
            },
            source=SOURCE_LI,
            seeds=seeds,
            details=f"final held-out accuracy = mean of the last {w} evaluations; "
            + spread_rule(len(seeds))
            + "; supported if after-last - before > spread; "
            + RANK_RULE
            + "; the arms also differ in the number of dropout layers: recalibration_gain "
            "(seed-mean held-out accuracy after - before recomputing the BN statistics with "
            "dropout off) is the part of the accuracy the variance shift alone costs",
        ),
    ]
    for c in claims:
        ctx.log(f"[{'supported' if c.verdict else 'NOT supported'}] {c.statement}")
    arms = {
        a: {
            "final_accuracy": mean_std(test[a]),
            "train_accuracy": mean_std(tr[a]),
            "generalization_gap": mean_std(gap[a]),
            "diverged": sum(bool(r["train"]["diverged"]) for r in results[a]),
        }
        for a in results
    }
    # per layer and seed: kept whole so the doctor's train/eval check can be compared with it
    variance_shift = {
        a: [r["extra"]["mismatch"] for r in rs] for a, rs in results.items() if a.startswith("BN")
    }
    series = {
        "rates": rates,
        "test": {
            lbl: [
                test[_arm_name(bn, p, where)] if (where == "every" or p > 0) else [None]
                for p in rates
            ]
            for lbl, bn, where in (
                ("no BN", False, "every"),
                ("BN", True, "every"),
                ("BN, dropout last", True, "last"),
            )
        },  # fmt: skip
        "gap": {
            lbl: [
                gap[_arm_name(bn, p, where)] if (where == "every" or p > 0) else [None]
                for p in rates
            ]
            for lbl, bn, where in (
                ("no BN", False, "every"),
                ("BN", True, "every"),
                ("BN, dropout last", True, "last"),
            )
        },  # fmt: skip
        "var_ratio": {"dropout before BN": vr_shift, "dropout after last BN": vr_safe},
    }
    # batchnorm.doctor per BN arm and seed: findings, output gap and held-out accuracy before
    # and after batchnorm.recalibrate (the fix it names for the variance shift)
    doctor = {
        a: [r["extra"].get("doctor") for r in rs] for a, rs in results.items() if a.startswith("BN")
    }
    summary = {
        "dataset": ds.info(),
        "seeds": seeds,
        "arms": arms,
        "claims": claims,
        "variance_shift": variance_shift,
        "doctor": doctor,
        "sections": [
            doctor_section(
                "The doctor on the BN arms: variance shift found, and cured by recalibration",
                doctor,
                seeds,
            )
        ],
    }
    return Results(rows=rows, summary=summary, series=series)
