"""``noisy-bn`` — Santurkar, Tsipras, Ilyas & Madry (2018, arXiv 1805.11604), Sec. 2 and
App. A.2.1: does BN work by stabilizing the distributions of layer inputs?

A small VGG-like CNN is trained four ways at one learning rate: ``standard``; ``BN``;
``noisy-BN`` — BN followed by their time-varying noise (:class:`~batchnorm.analysis.
TimeVaryingNoise`: per step and unit μ ~ U(−0.5, 0.5), σ ~ U(1, 1.25); per sample
m ~ U(μ ± 0.1), s ~ N(σ, 0.1); a ← s·a + m), which makes every layer's input distribution
unstable on purpose; and ``standard+noise`` — the plain network with the same noise.

Distribution stability is measured on a fixed probe batch of training images, in training mode
(BN uses batch statistics, the noise is active — what the next layer really receives), every
``probe_every`` steps, at the input of the second-to-last conv block's activation (the output
of its conv, BN or noise layer: what the nonlinearity receives). Between consecutive probes:
``normalized_mean_shift`` (per unit |Δμ|/σ, averaged) and ``log_std_ratio`` (|log σ'/σ|) of :func:`batchnorm.analysis.distribution_drift`.

Claims (their Fig. 2 / Fig. 7):

* noisy BN trains about as well as BN: its final accuracy is at most ``tolerance`` below BN's;
* noisy BN trains better than the standard network, by more than the seed-to-seed spread;
* noisy BN's layer-input distributions are less stable than the standard network's (larger
  mean drift between probes, by more than the seed-to-seed spread).

With one seed the spread is unknown and any difference counts (``exceeds_spread``).

As in paper-mnist, a diverged run ranks lowest: an arm with a diverged seed has final accuracy
−∞ and drift +∞ in the claims, whatever its surviving seeds measured; a claim whose two
compared arms both diverged is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchnorm.analysis import activation_statistics, distribution_drift
from batchnorm.lab import train
from batchnorm.lab.config import (
    BaseConfig,
    ConfigError,
    check_non_negative,
    check_positive,
    check_widths,
)
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    RANK_RULE,
    VGGSmall,
    all_diverged,
    arm_rows,
    cached_train,
    check_bn1d_batch,
    check_final_window,
    check_probe_every,
    diverged_flags,
    divergence,
    exceeds_spread,
    final_acc,
    finite,
    load_data,
    ranked,
    spread_rule,
)
from batchnorm.lab.registry import register
from batchnorm.lab.results import Claim, Results, RunContext, RunData, mean_std

NAME = "noisy-bn"
SOURCE = "Santurkar et al. 2018 (arXiv 1805.11604), Sec. 2, Fig. 2 and 7, App. A.2.1"
# arm -> (bn, noise)
ARMS: dict[str, tuple[bool, bool]] = {
    "standard": (False, False),
    "BN": (True, False),
    "noisy-BN": (True, True),
    "standard+noise": (False, True),
}
LEVELS = (0.15, 0.5, 0.85)


@dataclass
class NoisyBNConfig(BaseConfig):
    """Settings of the noisy-bn experiment (see the module docstring)."""

    steps: int = 600
    batch_size: int = 60
    widths: tuple[int, ...] = (8, 16)
    lr: float = 0.02
    momentum: float = 0.9
    eval_every: int = 100
    probe_every: int = 50
    probe_size: int = 256
    final_window: int = 2
    tolerance: float = 0.02
    n_train: int = 0
    n_eval: int = 1000

    QUICK = {
        "steps": 60,
        "widths": (4, 8),
        "eval_every": 20,
        "probe_every": 20,
        "probe_size": 64,
        "n_train": 500,
        "n_eval": 200,
    }

    def validate(self) -> None:
        super().validate()
        check_widths(widths=self.widths)
        check_probe_every(self.probe_every, self.steps)
        check_positive(lr=self.lr)
        check_non_negative(momentum=self.momentum)
        if self.final_window < 1:
            raise ConfigError(f"final_window must be >= 1, got {self.final_window}")
        check_final_window(self.final_window, self.steps, self.eval_every)
        check_bn1d_batch(self.batch_size)
        self.at_least_one("steps", "eval_every", "probe_every", "probe_size")
        if self.tolerance < 0:
            raise ConfigError(f"tolerance must be >= 0, got {self.tolerance}")


def _probe_layer(net: VGGSmall) -> str:
    """The input of the second-to-last block's activation: the output of its last module
    before ``act`` (``conv``, ``bn`` or ``noise``), i.e. what the nonlinearity receives."""
    k = len(net.blocks) - 2
    names = [n for n, _ in net.blocks[k].named_children() if n != "act"]
    return f"blocks.{k}.{names[-1]}"


def _train(
    cfg: NoisyBNConfig, ds: Dataset, bn: bool, noise: bool, seed: int, progress: bool | None
) -> tuple[train.TrainResult, dict[str, Any]]:
    train.seed_everything(seed)
    net = VGGSmall(ds.input_shape, ds.num_classes, cfg.widths, bn=bn, noise=noise)
    opt = train.make_optimizer(net.parameters(), "sgd", cfg.lr, cfg.momentum)
    probe = ds.x_train[: cfg.probe_size]
    layer = _probe_layer(net)
    history: list[dict[str, Any]] = []

    def record(step: int, model: torch.nn.Module) -> None:
        was = model.training
        model.train()  # what the next layer receives during training: batch stats, noise on
        st = activation_statistics(model, probe, [layer], levels=LEVELS)[layer]
        model.train(was)
        history.append({"step": step, "stats": st})

    record(0, net)

    def callback(info: train.StepInfo) -> None:
        if info.step % cfg.probe_every == 0:
            record(info.step, info.model)

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
        callbacks=[callback],
        threads=cfg.threads,
        progress=progress,
        desc=f"bn={bn} noise={noise} seed={seed}",
    )
    drifts = [
        distribution_drift({layer: a["stats"]}, {layer: b["stats"]})[layer]
        for a, b in zip(history, history[1:])
    ]
    # one typical unit's quantiles over time for the figure (unit 0 of the probed layer)
    extra = {
        "layer": layer,
        "probe_steps": [h["step"] for h in history],
        "drift": {k: [d[k] for d in drifts] for k in ("normalized_mean_shift", "log_std_ratio")},
        "quantiles_unit0": [h["stats"].quantiles[:, 0].tolist() for h in history],
    }
    return res, extra


def _padded(values: list[Any], n: int) -> list[Any]:
    """``values`` with ``None`` (a missing point) up to length ``n``."""
    return list(values) + [None] * (n - len(values))


def _mean_drift(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [v for r in runs for v in r["extra"]["drift"][key] if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def figures(run: RunData, out: Path) -> list[Path]:
    """Held-out accuracy per arm, drift between probes, and a unit's quantiles over training
    (their Fig. 2: standard vs noisy BN)."""
    from batchnorm.lab import plots

    s = run.series
    fig, axes = plots.new_figure(2, 2, size=(4.6, 3.4))
    plots.curves(
        axes[0],
        s["steps"],
        {a: s["acc"][a] for a in ARMS},
        ylabel="held-out accuracy",
        title="training",
    )
    plots.curves(
        axes[1],
        s["probe_steps"][1:],
        {a: s["drift"][a] for a in ARMS},
        ylabel="mean |Δμ| / σ between probes (log)",
        title="drift of the input of the 2nd-to-last activation",
    )
    # log: standard+noise drifts ten times more than the two arms the stability claim
    # compares (standard, noisy BN), which a linear axis flattened together at its bottom
    axes[1].set_yscale("log")
    for ax, arm in ((axes[2], "standard"), (axes[3], "noisy-BN")):
        # each arm in its color of the other panels (the curves' by position among the arms)
        color = plots.color_for(arm, list(ARMS).index(arm))
        q = np.asarray(s["quantiles"][arm], dtype=float)  # (T, Q)
        plots.percentile_bands(
            ax,
            s["probe_steps"],
            {f"{lv * 100:g}": q[:, i].tolist() for i, lv in enumerate(s["levels"])},
            color=color,
            ylabel="activation (unit 0)",
            title=f"{arm}: layer input percentiles",
        )
    return [plots.save_figure(fig, out / f"{NAME}.png")]


@register(
    NAME,
    config=NoisyBNConfig,
    figures=figures,
    source=SOURCE,
    description="VGG-like CNN: standard, BN, BN + time-varying noise, standard + noise - does "
    "BN still help when its layers' input distributions are deliberately unstable?",
)
def run(cfg: NoisyBNConfig, ctx: RunContext) -> Results:
    """Train the four arms per seed, recording the probed layer's distribution over time."""
    ds = load_data(cfg, ctx, cfg.n_train, cfg.n_eval)
    seeds = cfg.seed_list()
    rows: list[dict[str, Any]] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for arm, (bn, noise) in ARMS.items():
        results[arm] = []
        for seed in seeds:
            res = cached_train(
                ctx, f"{arm}-seed{seed}", partial(_train, cfg, ds, bn, noise, seed, ctx.progress)
            )
            results[arm].append(res)
            rows += arm_rows(arm, seed, res["train"])
    finals = {
        a: [final_acc(r["train"], window=cfg.final_window) for r in rs] for a, rs in results.items()
    }
    div = {a: diverged_flags(rs) for a, rs in results.items()}
    # ranked seed-means for the verdicts: a diverged seed makes the accuracy −∞, the drift +∞
    fin = {a: ranked(mean_std(v)["mean"], div[a], -math.inf) for a, v in finals.items()}
    drift = {a: _mean_drift(rs, "normalized_mean_shift") for a, rs in results.items()}
    std_drift = {a: _mean_drift(rs, "log_std_ratio") for a, rs in results.items()}
    nb, b = fin["noisy-BN"], fin["BN"]

    def both(x: str, y: str) -> bool:
        return all_diverged(div[x], div[y])

    def pair(x: str, y: str) -> dict[str, Any]:
        return divergence({x: div[x], y: div[y]})

    beats = exceeds_spread(
        finals["noisy-BN"], finals["standard"], div["noisy-BN"], div["standard"],
        names=("noisy-BN", "standard"),
    )  # fmt: skip
    per_seed_drift = {
        a: [_mean_drift([r], "normalized_mean_shift") for r in rs] for a, rs in results.items()
    }
    shaky = exceeds_spread(
        per_seed_drift["noisy-BN"], per_seed_drift["standard"], div["noisy-BN"],
        div["standard"], names=("noisy-BN", "standard"), worst=math.inf,
    )  # fmt: skip
    rule = f"final = mean of the last {cfg.final_window} evaluations, seed-mean"
    claims = [
        Claim(
            id="noisy-bn-as-good-as-bn",
            statement="BN with injected time-varying noise trains about as well as BN",
            verdict=not both("noisy-BN", "BN")
            and nb is not None
            and b is not None
            and nb >= b - cfg.tolerance,
            measured={
                "noisy_BN": mean_std(finals["noisy-BN"]),
                "BN": mean_std(finals["BN"]),
                "difference": None if nb is None or b is None else finite(nb - b),
                "tolerance": cfg.tolerance,
                **pair("noisy-BN", "BN"),
            },  # fmt: skip
            source=SOURCE,
            seeds=seeds,
            details=rule + f"; supported if noisy-BN >= BN - {cfg.tolerance:g}; {RANK_RULE}",
        ),
        Claim(
            id="noisy-bn-beats-standard",
            statement="BN with injected noise still trains better than the standard network "
            "(by more than the seed-to-seed spread)",
            verdict=beats["diff"] is not None and beats["diff"] > 0 and beats["exceeds"],
            measured={
                "noisy_BN": mean_std(finals["noisy-BN"]),
                "standard": mean_std(finals["standard"]),
                "standard+noise": mean_std(finals["standard+noise"]),
                **beats["measured"],
            },
            source=SOURCE,
            seeds=seeds,
            details=rule
            + "; supported if noisy-BN - standard > spread; "
            + spread_rule(len(seeds), "std(noisy-BN) + std(standard)")
            + f"; {RANK_RULE} (so a standard network with a diverged seed counts as beaten)",
        ),
        Claim(
            id="noisy-bn-less-stable",
            statement="noisy BN's layer-input distributions are less stable than the standard "
            "network's (by more than the seed-to-seed spread)",
            verdict=shaky["diff"] is not None and shaky["diff"] > 0 and shaky["exceeds"],
            measured={
                "mean_shift_per_probe": drift,
                "log_std_ratio_per_probe": std_drift,
                **shaky["measured"],
            },
            source=SOURCE + " (Fig. 2, 7)",
            seeds=seeds,
            details=f"drift = mean over consecutive probes (every {cfg.probe_every} steps) and "
            f"units of |Δμ|/σ at the input of the second-to-last activation, probe of "
            f"{cfg.probe_size} training images in training mode; supported if noisy-BN's drift "
            "- the standard network's > spread; "
            + spread_rule(len(seeds), "std(noisy-BN) + std(standard) of the per-seed drifts")
            + f"; {RANK_RULE} (a diverged arm's drift counts as +inf)",
        ),
    ]
    for c in claims:
        ctx.log(f"[{'supported' if c.verdict else 'NOT supported'}] {c.statement}")
    arms = {
        a: {
            "final_accuracy": mean_std(finals[a]),
            "mean_shift_per_probe": drift[a],
            "log_std_ratio_per_probe": std_drift[a],
            "diverged": sum(bool(r["train"]["diverged"]) for r in results[a]),
        }
        for a in ARMS
    }
    first = {a: rs[0] for a, rs in results.items()}
    everyone = [x for rs in results.values() for x in rs]
    # the axes of the longest run: a seed that diverged earlier ends in missing points (None)
    steps = sorted(
        {int(r["step"]) for x in everyone for r in x["train"]["rows"] if "test_acc" in r}
    )
    longest = max((x["extra"]["probe_steps"] for x in everyone), key=len)

    def accuracies(x: dict[str, Any]) -> list[float | None]:
        at = {int(r["step"]): r.get("test_acc") for r in x["train"]["rows"] if "test_acc" in r}
        return [at.get(s) for s in steps]

    series = {
        "steps": steps,
        "acc": {a: [accuracies(x) for x in rs] for a, rs in results.items()},
        "probe_steps": longest,
        "drift": {
            a: [_padded(x["extra"]["drift"]["normalized_mean_shift"], len(longest) - 1) for x in rs]
            for a, rs in results.items()
        },
        "quantiles": {a: first[a]["extra"]["quantiles_unit0"] for a in ARMS},
        "levels": list(LEVELS),
        "layer": first["BN"]["extra"]["layer"],
    }
    summary = {"dataset": ds.info(), "seeds": seeds, "arms": arms, "claims": claims}
    return Results(rows=rows, summary=summary, series=series)
