"""``recalibration`` — are BN's moving averages the right statistics at inference, and does
recomputing them help (on the training distribution, and on a shifted one)?

Claims tested:

* Wu & Johnson 2021 ("Rethinking 'Batch' in BatchNorm", arXiv 2105.07576, Sec. 3): the EMA of
  the batch statistics lags behind the weights, so evaluating with *precise* population
  statistics (recomputed with the weights fixed, "PreciseBN") is at least as accurate — and the
  gap is larger when the weights move fast (large learning rates, early in training).
* Li et al. 2016 (AdaBN, arXiv 1603.04779): on a shifted domain, recomputing the BN statistics
  on unlabeled target data recovers accuracy lost with the source statistics.

Protocol:

1. A small CNN with BN (:class:`batchnorm.lab.models.SmallCNN`) trained with SGD + momentum at
   each learning rate of ``lrs``. At every evaluation checkpoint the held-out accuracy is
   measured twice: with the EMA running statistics (what the model holds), and after
   :func:`batchnorm.recalibrate` on ``precise_samples`` training examples in batches of
   ``batch_size`` (on a copy; training continues with the EMA). Also recorded: how far the EMA
   means are from the precise ones, in units of the precise standard deviation.
2. AdaBN, on the model trained at ``adabn_lr``: held-out accuracy on contrast/brightness-shifted
   images ``clip(c·x + b, 0, 1)`` for each ``(shift_contrast[i], shift_brightness[i])``, with the
   source statistics and with statistics recomputed on shifted *training* images (no labels;
   the held-out images are not used to recompute). The source statistics are recomputed the
   same way on the same (unshifted) training images, so the two arms differ only in the domain
   of the images the statistics come from, not also in EMA vs precise estimation (on the
   unshifted set they coincide); the accuracy with the model's EMA statistics is recorded as
   ``ema_source_acc``.

Verdicts need a difference larger than the seed-to-seed spread. EMA vs precise and source vs
AdaBN evaluate the same weights both ways, so each seed's gain is a paired difference and the
spread is the std over seeds of that gain; the comparison of two learning rates (different
runs) uses std + std over seeds, as the other experiments do. With one seed the spread is
unknown and any positive difference passes. Step 0 (the untrained network) is never a
checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.diagnostics import before_after
from batchnorm.lab import models, train
from batchnorm.lab.config import (
    BaseConfig,
    ConfigError,
    check_distinct,
    check_fraction,
    check_non_negative,
    check_widths,
)
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    arm_rows,
    cached_train,
    exact_key,
    exceeds_spread,
    load_data,
    mean_of,
    spread_rule,
)
from batchnorm.lab.registry import register
from batchnorm.lab.report import doctor_section
from batchnorm.lab.results import Claim, Results, RunContext, RunData, mean_std
from batchnorm.nn.batchnorm import _BatchNormBase
from batchnorm.tools import recalibrate

NAME = "recalibration"
SOURCE_WJ = "Wu & Johnson 2021 (arXiv 2105.07576), Sec. 3"
SOURCE_ADABN = "Li, Wang, Shi, Liu & Hou 2016 (AdaBN, arXiv 1603.04779)"


@dataclass
class RecalibrationConfig(BaseConfig):
    """Settings of the recalibration experiment (see the module docstring)."""

    seeds: int = 2
    steps: int = 600
    batch_size: int = 64
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    momentum: float = 0.9
    bn_momentum: float = 0.1
    channels: tuple[int, ...] = (16, 32)
    eval_every: int = 100
    precise_samples: int = 2000
    adabn_lr: float | None = None
    shift_contrast: tuple[float, ...] = (0.5, 1.0, -1.0)
    shift_brightness: tuple[float, ...] = (0.4, 0.3, 1.0)
    n_train: int = 20000
    n_eval: int = 5000

    QUICK = {
        "seeds": 1,
        "steps": 40,
        "batch_size": 16,
        "lrs": (0.01, 0.2),
        "channels": (4, 8),
        "eval_every": 20,
        "precise_samples": 128,
        "n_train": 600,
        "n_eval": 200,
    }

    def validate(self) -> None:
        super().validate()
        check_distinct(lrs=self.lrs)
        check_widths(channels=self.channels)
        check_non_negative(momentum=self.momentum)
        check_fraction(bn_momentum=self.bn_momentum)
        if min(self.steps, self.eval_every, self.batch_size) < 1 or self.batch_size < 2:
            raise ConfigError(
                "steps and eval_every must be >= 1 and batch_size >= 2, got "
                f"{self.steps}, {self.eval_every} and {self.batch_size}"
            )
        if len(set(self.lrs)) < 2 or any(lr <= 0 for lr in self.lrs):
            # the claims compare the gain at the smallest and the largest rate
            raise ConfigError(f"lrs needs at least two distinct positive rates, got {self.lrs}")
        if self.precise_samples < 2:
            raise ConfigError(f"precise_samples must be >= 2, got {self.precise_samples}")
        if len(self.shift_contrast) != len(self.shift_brightness) or not self.shift_contrast:
            raise ConfigError(
                "shift_contrast and shift_brightness must be non-empty and of equal length, got "
                f"{self.shift_contrast} and {self.shift_brightness}"
            )
        if self.adabn_lr is not None and self.adabn_lr not in self.lrs:
            raise ConfigError(f"adabn_lr must be one of lrs {self.lrs}, got {self.adabn_lr}")

    def adabn_rate(self) -> float:
        """The learning rate whose model the AdaBN test uses (default: the middle of ``lrs``)."""
        lrs = sorted(self.lrs)
        return self.adabn_lr if self.adabn_lr is not None else lrs[len(lrs) // 2]


def shift(x: Tensor, contrast: float, brightness: float) -> Tensor:
    """A contrast/brightness-shifted copy of images in [0, 1]: ``clip(c·x + b, 0, 1)``."""
    return (contrast * x + brightness).clamp(0.0, 1.0)


def _batches(x: Tensor, n: int, batch_size: int, seed: int) -> list[Tensor]:
    """``n`` examples of ``x`` in a fixed random order, cut into batches (none of one)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[: min(n, x.shape[0])]
    out = [x[idx[i : i + batch_size]] for i in range(0, idx.numel(), batch_size)]
    return [b for b in out if b.shape[0] >= 2]


def _precise(model: nn.Module, batches: list[Tensor]) -> nn.Module:
    """A copy of ``model`` with recalibrated (precise) BN statistics."""
    twin = copy.deepcopy(model)
    recalibrate(twin, batches)
    return twin


def _stat_gap(ema: nn.Module, precise: nn.Module) -> float:
    """Mean over BN channels of |EMA mean − precise mean| / precise std."""
    gaps = []
    for a, b in zip(ema.modules(), precise.modules()):
        if isinstance(a, _BatchNormBase) and isinstance(b, _BatchNormBase):
            assert a.running_mean is not None and b.running_mean is not None
            assert b.running_var is not None
            d = (a.running_mean - b.running_mean).abs() / torch.sqrt(b.running_var + a.eps)
            gaps.append(d)
    return float(torch.cat(gaps).mean()) if gaps else 0.0


def _train(
    cfg: RecalibrationConfig,
    ds: Dataset,
    lr: float,
    seed: int,
    adabn: bool,
    progress: bool | None,
) -> tuple[train.TrainResult, dict[str, Any]]:
    train.seed_everything(seed)
    net = models.SmallCNN(
        ds.input_shape, ds.num_classes, cfg.channels, bn="before", bn_momentum=cfg.bn_momentum
    )
    opt = train.make_optimizer(net.parameters(), "sgd", lr, cfg.momentum)
    calib = _batches(ds.x_train, cfg.precise_samples, cfg.batch_size, seed)

    def on_eval(step: int, model: nn.Module) -> dict[str, Any]:
        twin = _precise(model, calib)
        acc, _ = train.evaluate(twin, ds.x_test, ds.y_test)
        return {"precise_acc": acc, "stat_gap": _stat_gap(model, twin)}

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
        on_eval=on_eval,
        eval_at_start=False,
        threads=cfg.threads,
        progress=progress,
        desc=f"lr={exact_key(lr)} seed={seed}",
    )
    extra: dict[str, Any] = {}
    try:
        if not res.diverged:
            with train.torch_threads(cfg.threads):
                # the doctor on the final model (EMA statistics) and after its fix, precise BN
                extra["doctor"] = before_after(
                    net, ds.x_test, lambda m: recalibrate(m, calib), batch_size=cfg.batch_size
                )
        if adabn and not res.diverged:
            with train.torch_threads(cfg.threads):
                extra["adabn"] = _adabn(cfg, ds, net, seed)
                # on the most shifted images: source statistics vs AdaBN's
                c, b = cfg.shift_contrast[-1], cfg.shift_brightness[-1]
                target = _batches(
                    shift(ds.x_train, c, b), cfg.precise_samples, cfg.batch_size, seed
                )
                extra["doctor_shifted"] = before_after(
                    net,
                    shift(ds.x_test, c, b),
                    lambda m: recalibrate(m, target),
                    batch_size=cfg.batch_size,
                )
    except (OverflowError, FloatingPointError):
        # activations beyond the float range (here, or on shifted images), whose statistics
        # no BN layer can hold: the run diverged, though its loss stayed finite
        train.mark_diverged(res)
        extra = {}
    return res, extra


def _adabn(
    cfg: RecalibrationConfig, ds: Dataset, net: nn.Module, seed: int
) -> list[dict[str, Any]]:
    """Per shift: held-out accuracy with the source statistics and with AdaBN's. Both are
    recomputed the same way (precise BN on the same ``precise_samples`` training images, in the
    same order), on unshifted vs shifted images, so the two differ only in the domain the
    statistics come from; the model's own EMA statistics are recorded alongside."""
    out = []
    pairs = [(1.0, 0.0), *zip(cfg.shift_contrast, cfg.shift_brightness)]
    source = _precise(net, _batches(ds.x_train, cfg.precise_samples, cfg.batch_size, seed))
    for c, b in pairs:
        x_test = shift(ds.x_test, c, b)
        source_acc, _ = train.evaluate(source, x_test, ds.y_test)
        ema_acc, _ = train.evaluate(net, x_test, ds.y_test)
        target = _precise(
            net, _batches(shift(ds.x_train, c, b), cfg.precise_samples, cfg.batch_size, seed)
        )
        target_acc, _ = train.evaluate(target, x_test, ds.y_test)
        out.append(
            {
                "contrast": c,
                "brightness": b,
                "source_acc": source_acc,
                "ema_source_acc": ema_acc,
                "target_acc": target_acc,
            }
        )
    return out


def figures(run: RunData, out: Path) -> list[Path]:
    """EMA vs precise accuracy over training per learning rate; AdaBN per shift."""
    from batchnorm.lab import plots

    s = run.series
    lrs = s["lrs"]
    fig, axes = plots.new_figure(len(lrs) + 1, size=(4.2, 3.4))
    for ax, lr in zip(axes, lrs):
        d = s["curves"][str(lr)]
        plots.curves(
            ax,
            d["steps"],
            {"EMA statistics": d["ema"], "precise statistics": d["precise"]},
            ylabel="held-out accuracy",
            title=f"lr = {lr:g}",
        )
    shifts = [
        f"contrast {p['contrast']:g}, bright. {p['brightness']:+g}" for p in s["adabn"]["shifts"]
    ]
    plots.grouped_points(
        axes[-1],
        shifts,
        {
            "source statistics (unshifted train)": s["adabn"]["source"],
            "AdaBN (shifted train)": s["adabn"]["target"],
        },
        ylabel="held-out accuracy (shifted images)",
        title=f"AdaBN (lr = {s['adabn']['lr']:g})",
    )
    axes[-1].tick_params(axis="x", labelrotation=20, labelsize=7)
    return [plots.save_figure(fig, out / "recalibration.png")]


@register(
    NAME,
    config=RecalibrationConfig,
    figures=figures,
    source=SOURCE_WJ + "; " + SOURCE_ADABN,
    description="EMA vs precise (recalibrated) BN statistics over training at several learning "
    "rates; AdaBN on contrast/brightness-shifted images",
)
def run(cfg: RecalibrationConfig, ctx: RunContext) -> Results:
    """Train each learning rate and seed; claims from EMA vs precise and source vs AdaBN."""
    ds = load_data(cfg, ctx, cfg.n_train, cfg.n_eval)
    seeds = cfg.seed_list()
    lrs = sorted(cfg.lrs)
    lr_a = cfg.adabn_rate()
    rows: list[dict[str, Any]] = []
    runs: dict[float, list[dict[str, Any]]] = {}
    for lr in lrs:
        runs[lr] = []
        for seed in seeds:
            name = f"lr{exact_key(lr)}"  # exact: close rates never share a saved part
            res = cached_train(
                ctx,
                f"{name}-seed{seed}",
                partial(_train, cfg, ds, lr, seed, lr == lr_a, ctx.progress),
            )
            runs[lr].append(res)
            rows += arm_rows(name, seed, res["train"], lr=lr)

    def column(res: dict[str, Any], key: str) -> list[float | None]:
        return [r.get(key) for r in res["train"]["rows"] if r.get("test_acc") is not None]

    def checkpoint_gains(res: dict[str, Any]) -> list[float]:
        """precise − EMA accuracy at every checkpoint of one run (none if it diverged)."""
        if res["train"]["diverged"]:
            return []
        pairs = zip(column(res, "precise_acc"), column(res, "test_acc"))
        return [p - e for p, e in pairs if p is not None and e is not None]

    curves: dict[str, Any] = {}
    gain: dict[float, list[float]] = {}  # per lr: precise − EMA at every checkpoint and seed
    seed_gain: dict[float, list[float | None]] = {}  # per lr: each seed's mean over checkpoints
    final_gain: dict[float, list[float]] = {}
    gaps: dict[float, float | None] = {}
    for lr, rs in runs.items():
        ok = [r for r in rs if not r["train"]["diverged"]]
        steps = (
            [r["step"] for r in ok[0]["train"]["rows"] if r.get("test_acc") is not None]
            if ok
            else []
        )
        ema = [column(r, "test_acc") for r in ok]
        precise = [column(r, "precise_acc") for r in ok]
        curves[str(lr)] = {"steps": steps, "ema": ema, "precise": precise}
        gain[lr] = [d for r in rs for d in checkpoint_gains(r)]
        seed_gain[lr] = [mean_of(checkpoint_gains(r)) for r in rs]
        final_gain[lr] = [
            p - e
            for pe, ee in zip(precise, ema)
            if pe and ee
            for p, e in [(pe[-1], ee[-1])]
            if p is not None and e is not None
        ]
        gaps[lr] = mean_of([g for r in ok for g in column(r, "stat_gap")])
    all_gain = [d for v in gain.values() for d in v]
    mean_gain = {lr: mean_of(v) for lr, v in gain.items()}
    # each seed's gain over all its checkpoints at every rate (diverged runs excluded)
    per_seed_gain = [
        mean_of([d for lr in lrs for d in checkpoint_gains(runs[lr][i])]) for i in range(len(seeds))
    ]
    overall = mean_std(per_seed_gain)
    overall_spread = overall["std"] or 0.0
    precise_better = (
        overall["mean"] is not None and overall["mean"] > 0 and overall["mean"] > overall_spread
    )
    lag = exceeds_spread(
        seed_gain[lrs[-1]],
        seed_gain[lrs[0]],
        [False] * len(seeds),  # a diverged run has no gain: excluded, not ranked
        [False] * len(seeds),
        names=(f"lr={exact_key(lrs[-1])}", f"lr={exact_key(lrs[0])}"),
    )
    lo, hi = mean_gain[lrs[0]], mean_gain[lrs[-1]]

    adabn_runs = [r["extra"].get("adabn") for r in runs[lr_a] if r["extra"].get("adabn")]
    n_shift = len(adabn_runs[0]) if adabn_runs else 0
    src = [[a[i]["source_acc"] for a in adabn_runs] for i in range(n_shift)]
    ema_src = [[a[i].get("ema_source_acc") for a in adabn_runs] for i in range(n_shift)]
    tgt = [[a[i]["target_acc"] for a in adabn_runs] for i in range(n_shift)]
    shifted = list(range(1, n_shift))  # index 0 is the unshifted test set
    # per shift, each seed's gain (the same model evaluated both ways: a paired difference)
    shift_gain = [[t - s for s, t in zip(src[i], tgt[i])] for i in range(n_shift)]
    shift_stats = [mean_std(g) for g in shift_gain]
    adabn_gain = {i: shift_stats[i]["mean"] for i in range(n_shift)}
    adabn_spread = {i: shift_stats[i]["std"] or 0.0 for i in range(n_shift)}
    wins = [i for i in shifted if (adabn_gain[i] or 0.0) > max(adabn_spread[i], 0.0)]
    per_seed_shifted = [
        mean_of([shift_gain[i][k] for i in shifted]) for k in range(len(adabn_runs))
    ]
    shifted_overall = mean_std(per_seed_shifted)
    shifted_spread = shifted_overall["std"] or 0.0
    shift_names = [
        f"contrast {a['contrast']:g}, brightness {a['brightness']:g}"
        for a in (adabn_runs[0] if adabn_runs else [])
    ]
    one_seed: dict[str, Any] = (
        {"spread_note": "unknown with one seed: any positive difference passes"}
        if len(seeds) < 2
        else {}
    )
    paired_rule = (
        "spread = population std over seeds of the per-seed gain (the same weights are "
        "evaluated both ways, so each seed's gain is a paired difference)"
        if len(seeds) > 1
        else "spread = std over seeds of the per-seed gain, unknown with one seed (taken as 0, "
        "so any positive gain passes: run more seeds)"
    )
    claims = [
        Claim(
            id="precise-bn-more-accurate",
            statement="evaluating with precise (recalibrated) statistics is more accurate than "
            "with the EMA statistics, on average over checkpoints and learning rates, by more "
            "than the seed-to-seed spread",
            verdict=precise_better,
            measured={
                "mean_gain": overall["mean"],
                "spread": overall_spread,
                "gain_by_seed": per_seed_gain,
                **one_seed,
                "mean_gain_by_lr": {str(k): v for k, v in mean_gain.items()},
                "final_gain_by_lr": {str(k): mean_of(v) for k, v in final_gain.items()},
                "ema_vs_precise_mean_gap_in_std": {str(k): v for k, v in gaps.items()},
                "checkpoints": len(all_gain),
            },
            source=SOURCE_WJ,
            seeds=seeds,
            details="gain = held-out accuracy(precise) - accuracy(EMA) at every checkpoint "
            "after training started (step 0 is not measured); a seed's gain is its mean over "
            "its checkpoints at every rate (runs that diverged excluded); "
            f"{paired_rule}; supported if the mean of the per-seed gains is > 0 and > spread; "
            f"precise statistics from {cfg.precise_samples} training examples in batches of "
            f"{cfg.batch_size}",
        ),
        Claim(
            id="ema-lags-more-at-high-lr",
            statement=f"the gain of precise statistics is larger at lr={exact_key(lrs[-1])} "
            f"than at lr={exact_key(lrs[0])} by more than the seed-to-seed spread",
            verdict=lag["diff"] is not None and lag["diff"] > 0 and lag["exceeds"],
            measured={
                "gain_low_lr": lo,
                "gain_high_lr": hi,
                "gain_by_seed_low_lr": seed_gain[lrs[0]],
                "gain_by_seed_high_lr": seed_gain[lrs[-1]],
                "difference": lag["measured"]["difference"],
                "spread": lag["spread"],
                **({"spread_note": lag["measured"]["spread_note"]} if one_seed else {}),
                "stat_gap_low_lr": gaps[lrs[0]],
                "stat_gap_high_lr": gaps[lrs[-1]],
            },
            source=SOURCE_WJ,
            seeds=seeds,
            details="a seed's gain at a rate = its mean of precise - EMA accuracy over the "
            "checkpoints (runs that diverged excluded); difference = mean over seeds at the "
            "largest rate - at the smallest; "
            f"{spread_rule(len(seeds), 'std(largest rate) + std(smallest rate)')}; "
            "supported if difference > 0 and > spread",
        ),
        Claim(
            id="adabn-recovers-shifted-accuracy",
            statement="recomputing BN statistics on unlabeled shifted images (AdaBN) raises "
            "held-out accuracy on the shifted images, on average and for most shifts, by more "
            "than the seed-to-seed spread",
            verdict=bool(shifted)
            and len(wins) > len(shifted) / 2
            and shifted_overall["mean"] is not None
            and shifted_overall["mean"] > 0
            and shifted_overall["mean"] > shifted_spread,
            measured={
                "shifts": shift_names,
                "source_acc": [mean_of(v) for v in src],
                "adabn_acc": [mean_of(v) for v in tgt],
                "ema_source_acc": [mean_of(v) for v in ema_src],
                "gain": [adabn_gain[i] for i in range(n_shift)],
                "gain_spread": [adabn_spread[i] for i in range(n_shift)],
                "mean_gain_shifted": shifted_overall["mean"],
                "spread_shifted": shifted_spread,
                "shifts_won": len(wins),
                **one_seed,
                "lr": lr_a,
            },
            source=SOURCE_ADABN,
            seeds=seeds,
            details="index 0 is the unshifted held-out set (there both statistics are the same); "
            "source statistics = precise statistics of unshifted training images, AdaBN's = "
            "of the same training images shifted (ema_source_acc: with the EMA statistics, for "
            "reference); "
            "gain = accuracy(AdaBN) - accuracy(source statistics) on the same model and "
            f"images; {paired_rule}; supported if the mean gain over the shifted sets is > 0 "
            "and > its spread (of the per-seed means over the shifted sets), and the gain "
            "exceeds its own spread (and 0) for more than half of the shifted sets",
        ),
    ]
    for c in claims:
        ctx.log(f"[{'supported' if c.verdict else 'NOT supported'}] {c.statement}")
    series = {
        "lrs": lrs,
        "curves": curves,
        "adabn": {
            "lr": lr_a,
            "shifts": [
                {"contrast": a["contrast"], "brightness": a["brightness"]} for a in adabn_runs[0]
            ]
            if adabn_runs
            else [],
            "source": src,
            "target": tgt,
        },
    }
    arms = {
        f"lr{exact_key(lr)}": {
            "final_ema_acc": mean_std([c[-1] for c in curves[str(lr)]["ema"] if c]),
            "final_precise_acc": mean_std([c[-1] for c in curves[str(lr)]["precise"] if c]),
            "diverged": sum(bool(r["train"]["diverged"]) for r in runs[lr]),
        }
        for lr in lrs
    }
    # batchnorm.doctor on each final model before/after recalibration (and on shifted images
    # before/after AdaBN): the findings, and the output gap the fix removes
    doctor = {
        f"lr{exact_key(lr)}": [r["extra"].get("doctor") for r in rs] for lr, rs in runs.items()
    } | {"adabn": [r["extra"].get("doctor_shifted") for r in runs[lr_a]]}
    summary = {
        "dataset": ds.info(),
        "seeds": seeds,
        "arms": arms,
        "claims": claims,
        "doctor": doctor,
        "sections": [
            doctor_section(
                "The doctor: stale statistics found, and cured by recalibration (and AdaBN)",
                doctor,
                seeds,
            )
        ],
    }
    return Results(rows=rows, summary=summary, series=series)
