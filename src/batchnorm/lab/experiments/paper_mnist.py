"""``paper-mnist`` — the paper's first evidence (Ioffe & Szegedy 2015, Sec. 4.1, Figure 1).

A network of 3 fully-connected hidden layers of 100 sigmoid units, trained with mini-batches of
60 for 50,000 steps, without (``baseline``) and with BN before each sigmoid (``bn``). Figure 1a:
held-out accuracy vs steps; 1b/c: the 15th, 50th and 85th percentiles of the input to a typical
sigmoid of the last hidden layer over training.

What the paper leaves open is chosen here and recorded in the config: plain SGD, Gaussian
init N(0, ``init_std``²) with zero biases, inputs scaled to [0, 1].

Protocol (fair to both arms, the test set never used for a choice):

1. **Sweep** — each arm is trained for ``sweep_steps`` at every rate of ``lr_grid`` on the
   training set minus a validation split (``val_fraction``, carved with the first seed); the
   rate with the best final validation accuracy is that arm's rate (ties: the smaller rate; a
   diverged run scores −∞).
2. **Tuned** — each arm trained for ``steps`` at its own rate, for every seed, evaluated on the
   held-out (test) set every ``eval_every`` steps.
3. **Shared** — both arms at one rate, ``shared_lr``: by default 0.1, a common first choice
   for plain SGD (what a new user would try); ``shared_lr=none`` takes the baseline's chosen
   rate (the rate a user who tuned the plain network would keep when adding BN).

Measured, per protocol: *final* accuracy = mean of the last ``final_window`` evaluations;
*steps to the baseline's final accuracy* = the first evaluation after step 0 (the untrained
network does not count) at which BN's seed-mean curve reaches the baseline's seed-mean final
accuracy; *drift* of the sigmoid-input percentiles. As in the sweep, a diverged run ranks
lowest: an arm with a diverged seed has final accuracy −∞ and drift +∞ in the claims, and when
both arms diverged no claim is supported.

Drift measure: the last hidden layer's sigmoid inputs on a fixed probe of ``probe_size``
held-out examples are recorded at every evaluation (step 0 included), as the network computes
them in training — BN normalizes with the probe's own batch statistics, running statistics
untouched — so what is measured is the distribution the sigmoid sees while it learns, not the
noise of the running averages used at inference. For each unit u
and percentile q ∈ {15, 50, 85}:
``drift_u = mean_{q,t} |p_q(t) − p_q(T)| / max_t (p_85(t) − p_15(t))``
— the average distance of the percentile from where it ends, in units of the unit's largest
15–85 spread (scale-free, so the two arms compare although BN changes the scale). The arm's
drift is the median over units; the "typical" sigmoid plotted is the unit with that median drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchnorm.lab import models, train
from batchnorm.lab.config import BaseConfig, ConfigError, check_distinct
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    all_diverged,
    check_activations,
    check_bn1d_batch,
    diverged_text,
    exact_key,
    exceeds_spread,
    finite,
    ranked,
    spread_rule,
    steps_to,
)
from batchnorm.lab.registry import register
from batchnorm.lab.results import Claim, Results, RunContext, RunData, mean_std
from batchnorm.recorder import ActivationRecorder

ARMS = ("baseline", "bn")
OPTIMIZERS = ("sgd", "adam")  # what train.make_optimizer builds
# bumped when what a saved training run contains changes, so a resumed run never mixes versions
PARTS_VERSION = "v2"
SOURCE = "Ioffe & Szegedy 2015, Sec. 4.1, Figure 1"


@dataclass
class PaperMnistConfig(BaseConfig):
    """Settings of the paper-mnist experiment (see the module docstring for the protocol)."""

    steps: int = 50_000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    optimizer: str = "sgd"
    momentum: float = 0.0
    init_std: float = 0.05
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    sweep_steps: int = 3000
    val_fraction: float = 1 / 6
    shared_lr: float | None = 0.1
    eval_every: int = 500
    final_window: int = 3
    probe_size: int = 2000
    percentiles: tuple[float, ...] = (15.0, 50.0, 85.0)
    speedup: float = 4.0

    QUICK = {
        "steps": 300,
        "sweep_steps": 100,
        "lr_grid": (0.3, 3.0),
        # BN's averaged curve has its first point at final_window·eval_every = 75 steps, the
        # `faster` budget (steps/speedup): the claim can come out either way at this size
        "eval_every": 25,
        "probe_size": 500,
    }

    def validate(self) -> None:
        super().validate()
        check_distinct(lr_grid=self.lr_grid, percentiles=self.percentiles)
        check_bn1d_batch(self.batch_size)
        self.at_least_one("steps", "sweep_steps", "eval_every", "batch_size")
        first = self.final_window * self.eval_every
        if self.speedup > 0 and self.steps / self.speedup < first:
            # BN's curve is averaged as a final accuracy is: no point before `first`, so `faster`
            # could not come out supported whatever was measured
            raise ConfigError(
                f"steps/speedup = {self.steps / self.speedup:g} is less than final_window x "
                f"eval_every = {first}, where BN's averaged curve has its first point: the "
                "`faster` claim could never be supported; lower eval_every or final_window, or "
                "raise steps"
            )
        if self.probe_size < 2:
            # the probe goes through BN with its own batch statistics: 2 samples at least
            raise ConfigError(f"probe_size must be >= 2, got {self.probe_size}")
        if not self.hidden or min(self.hidden) < 1:
            # the recorded sigmoid is in the last hidden layer, and BN goes into hidden layers
            raise ConfigError(f"hidden must list at least one layer width >= 1, got {self.hidden}")
        check_activations(self.activation)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if not (math.isfinite(self.momentum) and self.momentum >= 0):
            raise ConfigError(f"momentum must be >= 0 and finite, got {self.momentum}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ConfigError(f"init_std must be positive and finite, got {self.init_std}")
        if not self.lr_grid or not all(math.isfinite(lr) and lr > 0 for lr in self.lr_grid):
            raise ConfigError(f"lr_grid must hold positive, finite rates, got {self.lr_grid}")
        if self.shared_lr is not None and not (
            math.isfinite(self.shared_lr) and self.shared_lr > 0
        ):
            raise ConfigError(f"shared_lr must be positive and finite, got {self.shared_lr}")
        if not 0 < self.val_fraction < 1:  # also refuses nan
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if len(self.percentiles) < 2:
            raise ConfigError("percentiles needs at least a low and a high percentile")
        if not all(math.isfinite(q) and 0 <= q <= 100 for q in self.percentiles):
            raise ConfigError(
                f"percentiles are in percent and must lie in [0, 100], got {self.percentiles}"
            )
        if any(lo >= hi for lo, hi in zip(self.percentiles, self.percentiles[1:])):
            # the drift measure uses the first and the last as the low and high percentile
            raise ConfigError(f"percentiles must be strictly increasing, got {self.percentiles}")
        if self.final_window < 1:
            raise ConfigError(f"final_window must be >= 1, got {self.final_window}")
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ConfigError(f"speedup must be positive and finite, got {self.speedup}")


# --------------------------------------------------------------------------------------------
# one training run


def _net(cfg: PaperMnistConfig, ds: Dataset, arm: str) -> models.MLP:
    return models.MLP(
        ds.num_features,
        cfg.hidden,
        ds.num_classes,
        activation=cfg.activation,
        bn="before" if arm == "bn" else "none",
        init_std=cfg.init_std,
    )


def batch_stats_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as in training — BN normalizes with the statistics of ``x`` — with the
    running statistics left exactly as they were (they are saved and restored)."""
    saved = [
        (b, b.detach().clone())
        for name, b in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    ]
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for buf, old in saved:
            buf.copy_(old)
        model.train(was_training)


def drift_per_unit(values: np.ndarray) -> np.ndarray:
    """``values`` (T, Q, U) percentile trajectories, Q sorted ascending → drift per unit (U,):
    mean over q and t of ``|p_q(t) − p_q(T)|`` divided by the largest outer spread
    ``max_t (p_hi(t) − p_lo(t))`` (the largest rather than the final spread, so a unit whose
    distribution collapses does not divide by ~0)."""
    final = values[-1]  # (Q, U)
    spread = np.maximum((values[:, -1] - values[:, 0]).max(axis=0), 1e-12)  # (U,)
    return np.abs(values - final[None]).mean(axis=(0, 1)) / spread


def _train_one(
    cfg: PaperMnistConfig,
    ds: Dataset,
    arm: str,
    lr: float,
    seed: int,
    steps: int,
    *,
    record: bool,
    progress: bool | None,
) -> dict[str, Any]:
    train.seed_everything(seed)
    net = _net(cfg, ds, arm)
    opt = train.make_optimizer(net.parameters(), cfg.optimizer, lr, cfg.momentum)
    held = "val" if ds.split == "validation" else "test"
    on_eval = None
    rec = None
    if record:
        rec = ActivationRecorder(
            net,
            [f"hidden.{len(cfg.hidden) - 1}.act"],
            [p / 100 for p in cfg.percentiles],
            every=None,
        )
        probe = ds.x_test[: cfg.probe_size]

        def on_eval(step: int, model: torch.nn.Module) -> None:
            with rec.capture(step):
                batch_stats_forward(model, probe)

    res = train.train(
        net,
        opt,
        ds.x_train,
        ds.y_train,
        steps=steps,
        batch_size=cfg.batch_size,
        eval_sets={held: (ds.x_test, ds.y_test)},
        eval_every=min(cfg.eval_every, steps),
        seed=seed,
        on_eval=on_eval,
        threads=cfg.threads,
        progress=progress,
        desc=f"{arm} lr={lr:g} seed={seed}",
    )
    out: dict[str, Any] = {
        "rows": res.rows,
        "diverged": res.diverged,
        "seconds": res.seconds,
        "steps_done": res.steps_done,
    }
    if rec is not None:
        steps_rec, values = rec.history(rec_name := next(iter(rec.layers)))
        if len(steps_rec) >= 2 and np.isfinite(values).all():
            drift = drift_per_unit(values)
            typical = int(np.argsort(drift)[len(drift) // 2])
            out["percentiles"] = {
                "layer": rec_name,
                "steps": steps_rec.tolist(),
                "unit": typical,
                "values": values[:, :, typical].tolist(),  # (T, Q)
                "drift_per_unit": drift.tolist(),
                "drift": float(np.median(drift)),
            }
    return out


# --------------------------------------------------------------------------------------------
# the experiment


def _final(rows: list[dict[str, Any]], key: str, window: int) -> float | None:
    """The mean of the last ``window`` evaluations after step 0 (the untrained network is never
    part of a final accuracy); None when the run diverged or has none."""
    vals = [r[key] for r in rows if r.get(key) is not None and r["step"] > 0]
    if not vals or (rows and rows[-1].get(key) is None):  # diverged: no final accuracy
        return None
    return float(np.mean(vals[-window:]))


def _sweep_window(final_window: int, sweep_steps: int, eval_every: int) -> int:
    """How many evaluations a sweep run's accuracy averages: the last ``final_window`` after
    step 0, of the ``⌈sweep_steps / eval_every⌉`` it has."""
    return min(final_window, -(-sweep_steps // eval_every))


def _trailing(curve: list[float | None], window: int) -> list[float | None]:
    """The mean of each point and the ``window − 1`` before it (None until ``window`` points,
    or where one is missing): a curve smoothed as a final accuracy is, so that reaching a
    final accuracy compares like with like (one high evaluation is not a level reached)."""
    out: list[float | None] = []
    for i in range(len(curve)):
        part = curve[max(0, i - window + 1) : i + 1]
        ok = len(part) == window and all(v is not None for v in part)
        out.append(float(np.mean(part)) if ok else None)  # type: ignore[arg-type]
    return out


def _pick_lr(scores: dict[float, float | None]) -> float:
    """The rate with the best score; ties → the smaller rate; ``None`` (diverged) loses."""
    best = max(scores.items(), key=lambda kv: (-math.inf if kv[1] is None else kv[1], -kv[0]))
    return best[0]


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float | None]]:
    steps = [int(r["step"]) for r in runs[0]["rows"] if r.get(key) is not None]
    curve: list[float | None] = []
    for i, s in enumerate(steps):
        vals = []
        for run in runs:
            pts = [r for r in run["rows"] if r["step"] == s and r.get(key) is not None]
            if pts:
                vals.append(float(pts[0][key]))
        curve.append(float(np.mean(vals)) if len(vals) == len(runs) else None)
        del i
    return steps, curve


def _compare(
    cfg: PaperMnistConfig,
    protocol: str,
    lrs: dict[str, float],
    runs: dict[str, list[dict[str, Any]]],
    seeds: list[int],
) -> tuple[list[Claim], dict[str, Any]]:
    """The three claims for one protocol, computed from its runs.

    A diverged run ranks lowest, as in the sweep (:func:`_pick_lr`): an arm with a diverged
    seed has final accuracy −∞ and drift +∞, so BN finishing is at or above a diverged baseline,
    reaches its (−∞) final accuracy at BN's first evaluation after step 0 and drifts less; when
    both arms diverged, none of the claims is supported."""
    key = "test_acc"
    w = cfg.final_window
    div = {a: [bool(r["diverged"]) for r in runs[a]] for a in ARMS}
    both_diverged = all_diverged(*(div[a] for a in ARMS))
    div_text = diverged_text(div)
    finals = {a: [_final(r["rows"], key, w) for r in runs[a]] for a in ARMS}
    fin = {a: mean_std(finals[a]) for a in ARMS}
    score = {a: ranked(fin[a]["mean"], div[a], -math.inf) for a in ARMS}
    base_final = score["baseline"]  # the target BN has to reach (−∞: the baseline diverged)
    steps, bn_curve = _mean_curve(runs["bn"], key)
    # step 0 (the untrained network) never counts: an untrained BN net "reaching" a baseline
    # that ended at chance says nothing about training speed; BN's curve is averaged over the
    # same window as the target, after step 0
    after = [i for i, st in enumerate(steps) if st > 0]
    smooth_steps = [steps[i] for i in after]
    smooth = _trailing([bn_curve[i] for i in after], w)
    reach = (
        None
        if base_final is None or both_diverged or any(div["bn"])
        else steps_to(smooth_steps, smooth, base_final)
    )
    budget = cfg.steps / cfg.speedup

    def seed_reach(rows: list[dict[str, Any]]) -> int | None:
        st, vals = _column([r for r in rows if r["step"] > 0], key)
        return steps_to(st, _trailing(vals, w), base_final)  # type: ignore[arg-type]

    per_seed_reach = [
        None if base_final is None or both_diverged or r["diverged"] else seed_reach(r["rows"])
        for r in runs["bn"]
    ]
    higher = exceeds_spread(
        finals["bn"], finals["baseline"], div["bn"], div["baseline"], names=("bn", "baseline")
    )
    label = "each arm at its own best learning rate" if protocol == "tuned" else "a shared rate"
    lr_info = {"lr_baseline": lrs["baseline"], "lr_bn": lrs["bn"]}
    ranking = (
        "an arm with a diverged seed ranks lowest (as in the learning-rate sweep); not "
        "supported if both arms diverged"
    )
    claims = [
        Claim(
            id=f"faster-{protocol}",
            statement=(
                f"BN reaches the baseline's final accuracy in <= 1/{cfg.speedup:g} of the steps "
                f"({label}; the fraction is this lab's threshold, the paper gives none for MNIST)"
            ),
            verdict=reach is not None and reach <= budget,
            measured={
                "baseline_final_acc": finite(base_final),
                "bn_steps_to_it": reach,
                "step_budget": budget,
                "fraction_of_steps": None if reach is None else reach / cfg.steps,
                "bn_steps_per_seed": per_seed_reach,
                "diverged": div_text,
                **lr_info,
            },
            source=SOURCE + "a",
            seeds=seeds,
            details=(
                f"first evaluation after step 0 (the untrained network does not count) at which "
                f"BN's seed-mean test accuracy, averaged over it and the {w - 1} evaluations "
                f"before it (as the target is), >= the baseline's seed-mean final accuracy (mean "
                f"of its last {w} evaluations); supported if at or before step {budget:g} of "
                f"{cfg.steps} and BN did not diverge; {ranking}, so a BN curve that reaches any "
                "level reaches a diverged baseline"
            ),
        ),
        Claim(
            id=f"higher-{protocol}",
            statement=f"BN ends above the baseline by more than the seed-to-seed spread ({label})",
            verdict=higher["diff"] is not None and higher["diff"] > 0 and higher["exceeds"],
            measured={
                "baseline_final_acc": fin["baseline"],
                "bn_final_acc": fin["bn"],
                **higher["measured"],
                "diverged": div_text,
                **lr_info,
            },
            source=SOURCE + "a",
            seeds=seeds,
            details=(
                f"seed-mean final test accuracy (mean of the last {w} evaluations after step 0),"
                f" supported if BN - baseline > spread; "
                f"{spread_rule(len(seeds), 'std(BN) + std(baseline)')}; {ranking}"
            ),
        ),
    ]
    drifts = {a: [r.get("percentiles", {}).get("drift") for r in runs[a]] for a in ARMS}  # per seed
    dm = {a: mean_std(drifts[a]) for a in ARMS}
    drift_rank = {a: ranked(dm[a]["mean"], div[a], math.inf) for a in ARMS}
    d_bn, d_base = drift_rank["bn"], drift_rank["baseline"]
    claims.append(
        Claim(
            id=f"stable-{protocol}",
            statement=(
                f"the BN network's sigmoid-input percentiles drift less than the baseline's "
                f"({label})"
            ),
            verdict=not both_diverged and d_bn is not None and d_base is not None and d_bn < d_base,
            measured={
                "baseline_drift": dm["baseline"],
                "bn_drift": dm["bn"],
                "diverged": div_text,
                **lr_info,
            },
            source=SOURCE + "b,c",
            seeds=seeds,
            details=(
                "drift = median over the last hidden layer's units of mean_{q,t} |p_q(t) - "
                "p_q(T)| / max_t (p_85(t) - p_15(t)), on a fixed held-out probe at every "
                "evaluation, computed as in training (BN with the probe's batch statistics); "
                "seed-mean, BN < baseline; an arm with a diverged seed counts as the largest "
                "drift; not supported if both arms diverged"
            ),
        )
    )
    arms = {}
    for a in ARMS:
        bests = [
            max((r[key] for r in run["rows"] if r.get(key) is not None), default=None)
            for run in runs[a]
        ]
        arms[a] = {
            "lr": lrs[a],
            "final_accuracy": fin[a],
            "best_accuracy": mean_std(bests),
            "drift": dm[a],
            "diverged": sum(bool(r["diverged"]) for r in runs[a]),
            "train_seconds": mean_std([r["seconds"] for r in runs[a]]),
        }
    return claims, arms


def _column(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float | None]]:
    return [int(r["step"]) for r in rows], [r.get(key) for r in rows]


def _unit_drift(p: dict[str, Any]) -> float:
    """The plotted unit's own drift (the arm's drift is the median over units)."""
    per_unit = p.get("drift_per_unit")
    return float(per_unit[p["unit"]]) if per_unit else float(p["drift"])


def figures(run: RunData, out: Path) -> list[Path]:
    """Figure 1 (a: held-out accuracy; b, c: a typical sigmoid's input percentiles), once per
    protocol, and the learning-rate sweep. Reads only the saved run."""
    from batchnorm.lab import plots

    s = run.series
    paths: list[Path] = []
    ds_name = run.summary.get("dataset", {}).get("name", "?")
    for protocol in ("tuned", "shared"):
        if protocol not in s:
            continue
        block = s[protocol]
        fig, axes = plots.new_figure(3, size=(4.4, 3.4))
        groups = {}
        labels = {}
        steps: list[int] = []
        for a in ARMS:
            rows_by_seed = [
                [
                    r
                    for r in run.rows
                    if r.get("protocol") == protocol
                    and r.get("arm") == a
                    and r.get("seed") == seed
                    and r.get("phase") == "full"
                ]
                for seed in run.summary.get("seeds", [])
            ]
            rows_by_seed = [rs for rs in rows_by_seed if rs]
            if not rows_by_seed:
                continue
            steps = [int(r["step"]) for r in rows_by_seed[0]]
            groups[a] = [[r.get("test_acc") for r in rs][: len(steps)] for rs in rows_by_seed]
            labels[a] = f"{'BN' if a == 'bn' else 'baseline'} (lr={block['lr'][a]:g})"
        plots.curves(
            axes[0],
            steps,
            groups,
            labels=labels,
            ylabel="held-out accuracy",
            title=f"(a) {ds_name}, {protocol} lr",
        )
        # zoom like the paper's Figure 1a: skip the first 5 % of training when setting the floor
        late = [
            v
            for g in groups.values()
            for r in g
            for st, v in zip(steps, r)
            if v is not None and st >= 0.05 * (steps[-1] if steps else 0)
        ]
        if late:
            axes[0].set_ylim(max(0.0, min(late) - 0.02), min(1.0, max(late) + 0.01))
        for ax, a, tag in ((axes[1], "baseline", "(b) without BN"), (axes[2], "bn", "(c) with BN")):
            p = block["percentiles"].get(a)
            if not p:
                ax.set_title(f"{tag}: not recorded")
                continue
            vals = np.asarray(p["values"], dtype=float)  # (T, Q)
            pct = {f"{q:g}": vals[:, i].tolist() for i, q in enumerate(block["percentile_levels"])}
            plots.percentile_bands(
                ax,
                p["steps"],
                pct,
                color=plots.color_for(a),
                ylabel="sigmoid input",
                title=f"{tag}: unit {p['unit']}, drift {_unit_drift(p):.3f}",
            )
        paths.append(plots.save_figure(fig, out / f"paper-mnist-{protocol}.png"))
    if "sweep" in s:
        fig, (ax,) = plots.new_figure(1, size=(5.0, 3.6))
        for a in ARMS:
            pts = sorted((float(lr), v) for lr, v in s["sweep"][a].items())
            ax.plot(
                [p[0] for p in pts],
                [np.nan if p[1] is None else p[1] for p in pts],
                "o-",
                color=plots.color_for(a),
                label="BN" if a == "bn" else "baseline",
            )
        plots.log_axis(ax, [float(lr) for a in ARMS for lr in s["sweep"][a]])
        ax.set_xlabel("learning rate")
        cfg, last = run.config.get("config", run.config), int(s["sweep_steps"])  # (config.json)
        n = _sweep_window(cfg["final_window"], last, cfg["eval_every"])
        ax.set_ylabel(f"validation accuracy (mean of the\nlast {n} evaluations up to step {last})")
        ax.set_title("learning-rate sweep (validation split)")
        ax.grid(alpha=0.3)
        plots.legend(ax)
        paths.append(plots.save_figure(fig, out / "paper-mnist-sweep.png"))
    return paths


@register(
    "paper-mnist",
    config=PaperMnistConfig,
    figures=figures,
    source=SOURCE,
    description=(
        "3x100 sigmoid MLP, batch 60, with vs without BN before each sigmoid: held-out "
        "accuracy and a sigmoid's input percentiles over training (Figure 1), each arm at its "
        "own validated learning rate and both at a shared one"
    ),
)
def run(cfg: PaperMnistConfig, ctx: RunContext) -> Results:
    """Sweep on a validation split, then full runs per protocol and seed; claims from them."""
    ds: Dataset = ctx.load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    seeds = cfg.seed_list()
    val = ds.validation_split(cfg.val_fraction, seed=cfg.seed)
    if val.x_train.shape[0] < cfg.batch_size:  # the sweep trains on the smaller set
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the {val.x_train.shape[0]} training "
            f"examples left after the validation split ({ds.x_train.shape[0]} in {ds.name}); "
            "use a smaller batch_size or val_fraction"
        )
    ctx.log(
        f"sweep: lr in {list(cfg.lr_grid)}, {cfg.sweep_steps} steps each, on a validation split "
        f"of {val.x_test.shape[0]} training examples"
    )

    # 1. sweep
    timing = {"sweep_train_s": 0.0, "full_train_s": 0.0}
    counted: set[tuple[str, float, int]] = set()
    sweep: dict[str, dict[float, float | None]] = {a: {} for a in ARMS}
    rows: list[dict[str, Any]] = []
    for a in ARMS:
        for lr in cfg.lr_grid:
            res = ctx.cached(
                f"sweep-{a}-lr{exact_key(lr)}-seed{cfg.seed}",
                partial(
                    _train_one,
                    cfg,
                    val,
                    a,
                    lr,
                    cfg.seed,
                    cfg.sweep_steps,
                    record=False,
                    progress=ctx.progress,
                ),
            )
            sweep[a][lr] = _final(res["rows"], "val_acc", cfg.final_window)
            timing["sweep_train_s"] += res["seconds"]
            rows += [
                {"phase": "sweep", "protocol": "sweep", "arm": a, "seed": cfg.seed, "lr": lr, **r}
                for r in res["rows"]
            ]
    chosen = {a: _pick_lr(sweep[a]) for a in ARMS}
    shared = cfg.shared_lr if cfg.shared_lr is not None else chosen["baseline"]
    ctx.log(
        f"chosen on validation: baseline lr={chosen['baseline']:g}, bn lr={chosen['bn']:g}; "
        f"shared lr={shared:g}"
    )

    # 2./3. full runs (a run at the same arm, rate and seed is shared by both protocols)
    protocols = {"tuned": chosen, "shared": {a: shared for a in ARMS}}
    series: dict[str, Any] = {
        "sweep": {a: {exact_key(lr): v for lr, v in sweep[a].items()} for a in ARMS},
        "sweep_steps": cfg.sweep_steps,
    }
    claims: list[Claim] = []
    arms_summary: dict[str, Any] = {}
    sections = []
    for protocol, lrs in protocols.items():
        runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
        for a in ARMS:
            for seed in seeds:
                lr = lrs[a]
                res = ctx.cached(
                    f"full-{PARTS_VERSION}-{a}-lr{exact_key(lr)}-seed{seed}",
                    partial(
                        _train_one,
                        cfg,
                        ds,
                        a,
                        lr,
                        seed,
                        cfg.steps,
                        record=True,
                        progress=ctx.progress,
                    ),
                )
                if (a, lr, seed) not in counted:  # runs shared by both protocols once
                    counted.add((a, lr, seed))
                    timing["full_train_s"] += res["seconds"]
                runs[a].append(res)
                rows += [
                    {
                        "phase": "full",
                        "protocol": protocol,
                        "arm": a,
                        "seed": seed,
                        "lr": lr,
                        **{k: v for k, v in r.items()},
                    }
                    for r in res["rows"]
                ]
        pc, arms = _compare(cfg, protocol, lrs, runs, seeds)
        claims += pc
        suffix = "" if protocol == "tuned" else " @ shared lr"
        arms_summary.update({f"{a}{suffix}": v for a, v in arms.items()})
        series[protocol] = {
            "lr": lrs,
            "percentile_levels": list(cfg.percentiles),
            "percentiles": {a: runs[a][0].get("percentiles") for a in ARMS},  # first seed
        }
        for c in pc:
            ctx.log(f"[{'supported' if c.verdict else 'NOT supported'}] {c.statement}")
    sections.append(
        {
            "title": "Learning-rate sweep (validation split, first seed)",
            "text": (
                f"Each arm trained {cfg.sweep_steps} steps per rate on {val.x_train.shape[0]} "
                f"training examples, scored on {val.x_test.shape[0]} held-out training examples "
                f"(mean of the last "
                f"{_sweep_window(cfg.final_window, cfg.sweep_steps, cfg.eval_every)} "
                f"evaluations). Chosen: baseline "
                f"{chosen['baseline']:g}, BN {chosen['bn']:g}; shared rate {shared:g}"
                + (" (the baseline's)" if cfg.shared_lr is None else " (set)")
                + "."
                + (
                    " Both arms chose the shared rate, so the tuned and shared protocols are the"
                    " same runs."
                    if chosen["bn"] == shared == chosen["baseline"]
                    else ""
                )
                + (
                    " A chosen rate lies at the edge of the grid: widen lr_grid to be sure it is"
                    " the best."
                    if any(lr in (min(cfg.lr_grid), max(cfg.lr_grid)) for lr in chosen.values())
                    and len(cfg.lr_grid) > 2
                    else ""
                )
            ),
            "table": {
                "headers": ["lr", "baseline val acc", "BN val acc"],
                "rows": [[lr, sweep["baseline"][lr], sweep["bn"][lr]] for lr in cfg.lr_grid],
            },
        }
    )
    sections.append(
        {
            "title": "Choices the paper leaves open",
            "text": (
                f"optimizer {cfg.optimizer} (momentum {cfg.momentum:g}), Gaussian init "
                f"N(0, {cfg.init_std:g}^2) with zero biases, inputs scaled to [0, 1], BN momentum "
                f"0.1, accuracy evaluated every {cfg.eval_every} steps in eval mode (BN uses "
                "running statistics). Sigmoid inputs recorded at each evaluation on "
                f"{min(cfg.probe_size, ds.x_test.shape[0])} held-out examples in training mode "
                "(BN with the probe's own batch statistics; running statistics untouched), "
                "so they show the distribution the sigmoid sees while it learns."
            ),
        }
    )
    summary = {
        "dataset": ds.info(),
        "seeds": seeds,
        "arms": arms_summary,
        "claims": claims,
        "learning_rates": {"chosen": chosen, "shared": shared, "sweep": series["sweep"]},
        "sections": sections,
        "timing": timing,
    }
    return Results(rows=rows, summary=summary, series=series)
