"""``ics`` — does BN reduce internal covariate shift? Santurkar, Tsipras, Ilyas & Madry (2018,
arXiv 1805.11604), Sec. 2.2, Definition 2.1 and Figure 5.

Their optimization-based definition: for layer i at step t, ``G = ∇_{W_i} L`` on a batch and
``G' = ∇_{W_i} L`` on the same batch after the layers before i took their SGD update; a large
``‖G − G'‖`` or small ``cos(G, G')`` means the layer's optimization landscape moved under it.
Measured with :func:`batchnorm.analysis.internal_covariate_shift` every ``probe_every`` steps,
for every conv/linear layer, on two networks trained with plain SGD, before the step is taken:
G at the current weights on the step's batch, and ``W'`` exactly the update the training then
makes (SGD at the same rate, on the same gradient):

* ``cnn`` — a small VGG-like CNN on the configured dataset, with and without BN;
* ``dln`` — their 25-layer deep linear network of width 10 (with and without BN after each
  layer) on synthetic Gaussian regression data ``y = A x``, MSE loss.

Claim (per network): BN does not reduce this internal covariate shift — neither the mean over
probes and layers of ``1 − cos(G, G')`` nor that of ``‖G − G'‖ / ‖G‖`` is smaller with BN by
more than the seed-to-seed spread (with one seed the spread is unknown: BN's must be at least
no-BN's). The first layer is left out of the means: no layer precedes it, so its shift is 0 by
definition. As in paper-mnist, a diverged run ranks lowest: an arm with a diverged seed
has shift +∞ (its probes after blowing up measure nothing), and when both arms diverged the
claim is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from batchnorm.analysis import internal_covariate_shift
from batchnorm.lab import train
from batchnorm.lab.config import (
    BaseConfig,
    ConfigError,
    check_widths,
)
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    RANK_RULE,
    DeepLinear,
    VGGSmall,
    arm_rows,
    blew_up,
    cached_train,
    check_bn1d_batch,
    divergence,
    exceeds_spread,
    load_data,
    spread_rule,
)
from batchnorm.lab.registry import register
from batchnorm.lab.results import Claim, Results, RunContext, RunData, mean_std

NAME = "ics"
SOURCE = "Santurkar et al. 2018 (arXiv 1805.11604), Sec. 2.2, Def. 2.1, Fig. 5"
NETS = ("cnn", "dln")
ARMS = ("noBN", "BN")


@dataclass
class ICSConfig(BaseConfig):
    """Settings of the ics experiment (see the module docstring)."""

    steps: int = 400
    batch_size: int = 60
    widths: tuple[int, ...] = (8, 16)
    cnn_lr: float = 0.05
    dln_depth: int = 25
    dln_width: int = 10
    dln_lr: float = 0.005
    dln_steps: int = 600
    dln_samples: int = 4096
    probe_every: int = 40
    eval_every: int = 100
    n_train: int = 0
    n_eval: int = 1000

    QUICK = {
        "steps": 40,
        "widths": (4, 8),
        "dln_depth": 6,
        "dln_steps": 40,
        "dln_samples": 512,
        "probe_every": 20,
        "eval_every": 20,
        "n_train": 500,
        "n_eval": 200,
    }

    def validate(self) -> None:
        super().validate()
        check_widths(widths=self.widths)
        if min(self.steps, self.dln_steps, self.probe_every) < 1:
            raise ConfigError(
                "steps, dln_steps and probe_every must be >= 1, got "
                f"{self.steps}, {self.dln_steps} and {self.probe_every}"
            )
        if self.probe_every > min(self.steps, self.dln_steps):
            # no probe would be taken: the claims would be judged on no measurement at all
            raise ConfigError(
                f"probe_every={self.probe_every} is more than steps={self.steps} or "
                f"dln_steps={self.dln_steps}: a network would be measured never; lower "
                "probe_every"
            )
        if self.dln_samples < self.batch_size:
            raise ConfigError(
                f"dln_samples={self.dln_samples} is fewer than batch_size={self.batch_size}: not "
                "one batch for the deep linear network to train on"
            )
        check_bn1d_batch(self.batch_size)
        self.at_least_one("steps", "dln_steps", "probe_every", "eval_every")
        if self.dln_depth < 2 or self.dln_width < 1:
            raise ConfigError("the deep linear network needs dln_depth >= 2 and dln_width >= 1")
        if self.cnn_lr <= 0 or self.dln_lr <= 0:
            raise ConfigError("learning rates must be positive")


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y)


def _dln_data(cfg: ICSConfig, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    a = torch.randn(cfg.dln_width, cfg.dln_width, generator=g) / cfg.dln_width**0.5
    x = torch.randn(cfg.dln_samples, cfg.dln_width, generator=g)
    return x, x @ a.T


def _train(
    cfg: ICSConfig, ds: Dataset | None, net_name: str, bn: bool, seed: int, progress: bool | None
) -> tuple[train.TrainResult, dict[str, Any]]:
    train.seed_everything(seed)
    model: nn.Module
    if net_name == "cnn":
        assert ds is not None
        model = VGGSmall(ds.input_shape, ds.num_classes, cfg.widths, bn=bn)
        x, y = ds.x_train, ds.y_train
        loss_fn: Any = F.cross_entropy
        lr, steps = cfg.cnn_lr, cfg.steps
        eval_sets = {"test": (ds.x_test, ds.y_test)}
    else:
        model = DeepLinear(cfg.dln_depth, cfg.dln_width, bn=bn)
        x, y = _dln_data(cfg, seed)
        loss_fn = _mse
        lr, steps = cfg.dln_lr, cfg.dln_steps
        eval_sets = {}
    opt = train.make_optimizer(model.parameters(), "sgd", lr)
    probes: list[dict[str, Any]] = []

    def probe(info: train.StepInfo) -> None:
        if info.step % cfg.probe_every == 0:
            shifts = internal_covariate_shift(info.model, loss_fn, (info.x, info.y), lr)
            probes.append(
                {
                    "step": info.step,
                    "layers": [s.layer for s in shifts],
                    "l2": [s.l2 for s in shifts],
                    "relative_l2": [s.relative_l2 for s in shifts],
                    "cosine": [s.cosine for s in shifts],
                }
            )

    res = train.train(
        model,
        opt,
        x,
        y,
        steps=steps,
        batch_size=cfg.batch_size,
        eval_sets=eval_sets,
        eval_every=cfg.eval_every,
        seed=seed,
        loss_fn=loss_fn,
        before_step=[probe],
        threads=cfg.threads,
        progress=progress,
        desc=f"{net_name} bn={bn} seed={seed}",
    )
    return res, {"probes": probes, "lr": lr}


def _mean_over(probes: list[dict[str, Any]], key: str, transform: Any = None) -> float | None:
    """Mean over probes and the layers after the first (whose shift is 0 by definition)."""
    vals = [
        (transform(v) if transform else v)
        for p in probes
        for v in p[key][1:]
        if v is not None and np.isfinite(v)
    ]
    return float(np.mean(vals)) if vals else None


def _avg(vals: list[float]) -> float | None:
    ok = [v for v in vals if np.isfinite(v)]
    return float(np.mean(ok)) if ok else None


def _per_probe(
    runs: list[dict[str, Any]], steps: list[int], key: str, flip: bool
) -> list[list[float | None]]:
    """Per seed, the mean over the layers after the first of ``key`` (or of ``1 − key``) at each
    probe; a run that diverged early is padded with ``None``."""
    out = []
    for r in runs:
        vals = [
            _avg([(1 - v) if flip else v for v in p[key][1:] if v is not None])
            for p in r["extra"]["probes"]
        ]
        out.append((vals + [None] * len(steps))[: len(steps)])
    return out


def figures(run: RunData, out: Path) -> list[Path]:
    """Per network: 1 − cos(G, G') and ‖G − G'‖/‖G‖ over training (mean over the layers after
    the first)."""
    from batchnorm.lab import plots

    s = run.series
    fig, axes = plots.new_figure(2, 2, size=(4.6, 3.3))
    for row, net in enumerate(NETS):
        for col, (key, label) in enumerate(
            (("one_minus_cos", "1 - cos(G, G')"), ("relative_l2", "||G - G'|| / ||G||"))
        ):
            ax = axes[row * 2 + col]
            d = s[net]
            plots.curves(
                ax,
                d["steps"],
                {arm: d[key][arm] for arm in ARMS},
                labels={"noBN": "no BN", "BN": "BN"},
                ylabel=label,
                title=f"{net.upper()}: internal covariate shift",
            )
            ax.set_yscale("log")
    return [plots.save_figure(fig, out / f"{NAME}.png")]


@register(
    NAME,
    config=ICSConfig,
    figures=figures,
    source=SOURCE,
    description="internal covariate shift per Santurkar et al. Def. 2.1 (gradient change after "
    "the preceding layers' update) over training, CNN and 25-layer deep linear network, with "
    "and without BN",
)
def run(cfg: ICSConfig, ctx: RunContext) -> Results:
    """Train each network with and without BN, measuring ICS every ``probe_every`` steps."""
    ds = load_data(cfg, ctx, cfg.n_train, cfg.n_eval)
    seeds = cfg.seed_list()
    rows: list[dict[str, Any]] = []
    claims: list[Claim] = []
    arms: dict[str, Any] = {}
    series: dict[str, Any] = {}
    for net in NETS:
        results: dict[str, list[dict[str, Any]]] = {}
        for arm in ARMS:
            results[arm] = []
            for seed in seeds:
                res = cached_train(
                    ctx,
                    f"{net}-{arm}-seed{seed}",
                    partial(
                        _train, cfg, ds if net == "cnn" else None, net, arm == "BN", seed,
                        ctx.progress,
                    ),
                )  # fmt: skip
                results[arm].append(res)
                rows += arm_rows(f"{net}/{arm}", seed, res["train"], net=net)
        per_seed = {
            "one_minus_cos": {
                a: [_mean_over(r["extra"]["probes"], "cosine", lambda c: 1 - c) for r in results[a]]
                for a in ARMS
            },
            "relative_l2": {
                a: [_mean_over(r["extra"]["probes"], "relative_l2") for r in results[a]]
                for a in ARMS
            },
            "l2": {a: [_mean_over(r["extra"]["probes"], "l2") for r in results[a]] for a in ARMS},
        }
        means = {k: {a: mean_std(v[a])["mean"] for a in ARMS} for k, v in per_seed.items()}
        for a in ARMS:
            tr = results[a]
            last = [r["train"]["rows"][-1] for r in tr]
            arms[f"{net}/{a}"] = {
                "mean_1_minus_cos": means["one_minus_cos"][a],
                "mean_relative_l2": means["relative_l2"][a],
                "mean_l2": means["l2"][a],
                "final_train_loss": mean_std([r.get("train_loss") for r in last]),
                "final_accuracy": mean_std([r.get("test_acc") for r in last])
                if net == "cnn"
                else None,
                "diverged": sum(bool(r["train"]["diverged"]) for r in tr),
            }
        # per measure: no-BN − BN (> 0: BN's shift is smaller); the shift of an arm that
        # diverged, or whose G' overflowed at a probe (a non-finite value), is +inf
        # (both measures are non-finite together: G' overflowed)
        div = {
            a: [blew_up(r, "cosine", 1) or blew_up(r, "relative_l2", 1) for r in results[a]]
            for a in ARMS
        }
        cmp = {
            k: exceeds_spread(
                per_seed[k]["noBN"], per_seed[k]["BN"], div["noBN"], div["BN"],
                names=("noBN", "BN"), worst=np.inf,
            )
            for k in ("one_minus_cos", "relative_l2")
        }  # fmt: skip
        reduced = {
            k: c["diff"] is not None and c["diff"] > 0 and c["exceeds"] for k, c in cmp.items()
        }
        measured: dict[str, Any] = {
            f"{k}_{a}": means[k][a] for k in ("one_minus_cos", "relative_l2", "l2") for a in ARMS
        }
        for k, cv in cmp.items():
            measured[f"difference_{k}"] = cv["measured"]["difference"]
            measured[f"spread_{k}"] = cv["measured"]["spread"]
        if len(seeds) < 2:
            measured["spread_note"] = "unknown with one seed: any difference counts"
        measured.update(divergence(div, "diverged or had a non-finite probe"))
        claims.append(
            Claim(
                id=f"bn-does-not-reduce-ics-{net}",
                statement=f"{net.upper()}: BN does not reduce internal covariate shift "
                "(Santurkar et al. Def. 2.1)",
                verdict=all(cv["diff"] is not None for cv in cmp.values())
                and not any(reduced.values()),
                measured=measured,
                source=SOURCE,
                seeds=seeds,
                details=f"means over probes (every {cfg.probe_every} steps, before the update, on "
                "its batch), the layers after the first and seeds of 1 - cos(G, G') and "
                "||G - G'||/||G||; supported unless no-BN - BN > spread for either measure; "
                f"{spread_rule(len(seeds), 'std(BN) + std(no-BN)')}; {RANK_RULE} (a diverged "
                "arm's shift counts as +inf, and so does one with a non-finite probe: G' "
                "overflowed)",
            )
        )
        first = {a: results[a][0]["extra"]["probes"] for a in ARMS}
        steps = max(([p["step"] for p in first[a]] for a in ARMS), key=len)

        series[net] = {
            "steps": steps,
            "one_minus_cos": {a: _per_probe(results[a], steps, "cosine", True) for a in ARMS},
            "relative_l2": {a: _per_probe(results[a], steps, "relative_l2", False) for a in ARMS},
            "per_layer": {a: first[a][-1] if first[a] else None for a in ARMS},
        }
    for c in claims:
        ctx.log(f"[{'supported' if c.verdict else 'NOT supported'}] {c.statement}")
    summary = {
        "dataset": ds.info(),
        "seeds": seeds,
        "arms": arms,
        "claims": claims,
        "dln_data": f"synthetic regression y = A x, x ~ N(0, I_{cfg.dln_width}), "
        f"{cfg.dln_samples} samples, A ~ N(0, 1/{cfg.dln_width})",
    }
    return Results(rows=rows, summary=summary, series=series)
