"""``smoothness`` — does BN make the loss landscape smoother? Santurkar, Tsipras, Ilyas & Madry
(2018, arXiv 1805.11604), Sec. 3.1-3.2, Figure 4.

A small VGG-like CNN is trained with and without BN at the same learning rate η (plain SGD).
Every ``probe_every`` steps, on the current training batch and before the step is taken (at the
weights the batch's gradient is taken at, as in their Sec. 3.2), :func:`batchnorm.analysis.
loss_landscape` moves along the gradient, ``θ − s·g`` for step sizes ``s = m·η`` with
``m`` in ``step_multiples``, and measures:

* **loss variation** — max − min of ``L(θ − s g)`` over the step sizes (their Fig. 4a);
* **gradient predictiveness** — max over s of ``‖∇L(θ − s g) − ∇L(θ)‖`` (Fig. 4b; smaller =
  the gradient stays predictive);
* **effective β-smoothness** — max over s of ``‖∇L(θ − s g) − ∇L(θ)‖ / ‖s g‖`` (Fig. 4c).

Claims: each of the three, averaged over probes (and seeds), is smaller with BN by more than
the seed-to-seed spread (``exceeds_spread``; with one seed the spread is unknown and any
difference counts).

As in paper-mnist, a diverged run ranks lowest: a seed whose run diverged, or whose probes of
the measure include a non-finite value (the loss or gradient along the step overflowed: no
smoothness at all), makes the arm's measure +∞; when both arms have such a seed no claim is
supported. (Non-finite values are stored as null, so a saved probe of null counts as one.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch.nn import functional as F

from batchnorm.analysis import loss_landscape
from batchnorm.lab import train
from batchnorm.lab.config import (
    BaseConfig,
    ConfigError,
    check_distinct,
    check_widths,
)
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    RANK_RULE,
    VGGSmall,
    arm_rows,
    blew_up,
    cached_train,
    check_bn1d_batch,
    check_probe_every,
    divergence,
    exceeds_spread,
    load_data,
    spread_rule,
)
from batchnorm.lab.registry import register
from batchnorm.lab.results import Claim, Results, RunContext, RunData, mean_std

NAME = "smoothness"
SOURCE = "Santurkar et al. 2018 (arXiv 1805.11604), Sec. 3.2, Fig. 4"
ARMS = ("noBN", "BN")
MEASURES = {
    "loss_variation": "loss variation along the gradient",
    "gradient_predictiveness": "gradient change along the gradient (gradient predictiveness)",
    "beta_smoothness": "effective β-smoothness",
}


@dataclass
class SmoothnessConfig(BaseConfig):
    """Settings of the smoothness experiment (see the module docstring)."""

    steps: int = 400
    batch_size: int = 60
    widths: tuple[int, ...] = (8, 16)
    lr: float = 0.05
    step_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    probe_every: int = 40
    eval_every: int = 100
    n_train: int = 0
    n_eval: int = 1000

    QUICK = {
        "steps": 40,
        "widths": (4, 8),
        "probe_every": 20,
        "eval_every": 20,
        "n_train": 500,
        "n_eval": 200,
    }

    def validate(self) -> None:
        super().validate()
        check_distinct(step_multiples=self.step_multiples)
        check_widths(widths=self.widths)
        check_probe_every(self.probe_every, self.steps)
        check_bn1d_batch(self.batch_size)
        self.at_least_one("steps", "probe_every", "eval_every")
        if not self.step_multiples or min(self.step_multiples) <= 0:
            raise ConfigError(f"step_multiples must be positive, got {self.step_multiples}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


def _train(
    cfg: SmoothnessConfig, ds: Dataset, bn: bool, seed: int, progress: bool | None
) -> tuple[train.TrainResult, dict[str, Any]]:
    train.seed_everything(seed)
    model = VGGSmall(ds.input_shape, ds.num_classes, cfg.widths, bn=bn)
    opt = train.make_optimizer(model.parameters(), "sgd", cfg.lr)
    sizes = [m * cfg.lr for m in cfg.step_multiples]
    probes: list[dict[str, Any]] = []

    def probe(info: train.StepInfo) -> None:
        if info.step % cfg.probe_every == 0:
            p = loss_landscape(info.model, F.cross_entropy, (info.x, info.y), sizes)
            probes.append(
                {
                    "step": info.step,
                    "loss0": p.loss0,
                    "losses": p.losses.tolist(),
                    "grad_distances": p.grad_distances.tolist(),
                    "loss_variation": p.loss_variation,
                    "gradient_predictiveness": p.gradient_predictiveness,
                    "beta_smoothness": p.beta_smoothness,
                }
            )

    res = train.train(
        model,
        opt,
        ds.x_train,
        ds.y_train,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        eval_sets={"test": (ds.x_test, ds.y_test)},
        eval_every=cfg.eval_every,
        seed=seed,
        before_step=[probe],
        threads=cfg.threads,
        progress=progress,
        desc=f"bn={bn} seed={seed}",
    )
    return res, {"probes": probes, "step_sizes": sizes}


def _avg(vals: list[Any]) -> float | None:
    ok = [float(v) for v in vals if v is not None and np.isfinite(v)]
    return float(np.mean(ok)) if ok else None


# what each panel's y axis shows (step sizes s = m·η along −g, on the training batch)
AXES = {
    "loss_variation": "max - min of L(θ - s g)",
    "gradient_predictiveness": "max ||∇L(θ - s g) - ∇L(θ)||\n(lower = more predictive)",
    "beta_smoothness": "max ||Δ∇L|| / ||s g||",
}


def figures(run: RunData, out: Path) -> list[Path]:
    """The three measures over training, with and without BN (their Fig. 4)."""
    from batchnorm.lab import plots

    s = run.series
    fig, axes = plots.new_figure(3, size=(4.4, 3.4))
    for ax, (key, label) in zip(axes, MEASURES.items()):
        plots.curves(
            ax,
            s["steps"],
            {a: s[key][a] for a in ARMS},
            labels={"noBN": "no BN", "BN": "BN"},
            ylabel=AXES[key],
            title=label if len(label) < 40 else key.replace("_", " "),
        )
        ax.set_xlabel("step (training batch, before its update)")
        ax.set_yscale("log")
    return [plots.save_figure(fig, out / f"{NAME}.png")]


@register(
    NAME,
    config=SmoothnessConfig,
    figures=figures,
    source=SOURCE,
    description="loss landscape along the gradient during training (loss variation, gradient "
    "predictiveness, effective beta-smoothness), CNN with and without BN",
)
def run(cfg: SmoothnessConfig, ctx: RunContext) -> Results:
    """Train with and without BN, probing the landscape every ``probe_every`` steps."""
    ds = load_data(cfg, ctx, cfg.n_train, cfg.n_eval)
    seeds = cfg.seed_list()
    rows: list[dict[str, Any]] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in ARMS:
        results[arm] = []
        for seed in seeds:
            res = cached_train(
                ctx, f"{arm}-seed{seed}", partial(_train, cfg, ds, arm == "BN", seed, ctx.progress)
            )
            results[arm].append(res)
            rows += arm_rows(arm, seed, res["train"])
    # descriptive seed-means over the finite probes; the verdicts rank (+inf for a blow-up)
    per_seed = {
        key: {a: [_avg([p[key] for p in r["extra"]["probes"]]) for r in results[a]] for a in ARMS}
        for key in MEASURES
    }
    means = {key: {a: mean_std(v[a])["mean"] for a in ARMS} for key, v in per_seed.items()}
    what = "diverged or had a non-finite probe"
    claims = []
    for key, label in MEASURES.items():
        div = {a: [blew_up(r, key) for r in results[a]] for a in ARMS}
        # noBN − BN: positive when BN's is smaller; a blown-up arm ranks +inf
        cmp = exceeds_spread(
            per_seed[key]["noBN"], per_seed[key]["BN"], div["noBN"], div["BN"],
            names=("noBN", "BN"), worst=np.inf,
        )  # fmt: skip
        b, n = means[key]["BN"], means[key]["noBN"]
        measured = {
            "BN": b,
            "noBN": n,
            "ratio_BN_to_noBN": None if not b or not n else b / n,
            **cmp["measured"],
        }
        measured.update(divergence(div, what))
        claims.append(
            Claim(
                id=f"bn-smaller-{key.replace('_', '-')}",
                statement=f"BN makes the {label} smaller (by more than the seed-to-seed spread)",
                verdict=cmp["diff"] is not None and cmp["diff"] > 0 and cmp["exceeds"],
                measured=measured,
                source=SOURCE,
                seeds=seeds,
                details=f"mean over probes (every {cfg.probe_every} steps, on the training "
                f"batch before its update) and seeds; step sizes "
                f"{[m * cfg.lr for m in cfg.step_multiples]} (multiples {list(cfg.step_multiples)} "
                f"of lr {cfg.lr:g}); supported if no-BN - BN > spread; "
                f"{spread_rule(len(seeds), 'std(BN) + std(no-BN)')}; {RANK_RULE} (a seed with "
                "a non-finite probe counts as diverged: +inf)",
            )
        )
    for c in claims:
        ctx.log(f"[{'supported' if c.verdict else 'NOT supported'}] {c.statement}")
    arms = {}
    for a in ARMS:
        last = [r["train"]["rows"][-1] for r in results[a]]
        arms[a] = {
            **{key: means[key][a] for key in MEASURES},
            "final_accuracy": mean_std([r.get("test_acc") for r in last]),
            "diverged": sum(bool(r["train"]["diverged"]) for r in results[a]),
        }
    steps = max(([p["step"] for p in results[a][0]["extra"]["probes"]] for a in ARMS), key=len)
    series: dict[str, Any] = {"steps": steps}
    for key in MEASURES:
        series[key] = {
            a: [
                ([p[key] for p in r["extra"]["probes"]] + [None] * len(steps))[: len(steps)]
                for r in results[a]
            ]
            for a in ARMS
        }
    summary = {"dataset": ds.info(), "seeds": seeds, "arms": arms, "claims": claims}
    return Results(rows=rows, summary=summary, series=series)
