"""The small-batch experiment's verdicts on constructed measurements: comparisons of seed means
need a difference larger than the seed-to-seed spread, and the non-i.i.d. claim is judged
against GroupNorm trained on the same batches."""

from __future__ import annotations

from typing import Any

import pytest

from batchnorm.lab.experiments import small_batch
from batchnorm.lab.experiments.small_batch import SmallBatchConfig
from test_lab_claims import _stub_run, _train


def _make(acc: dict[str, tuple[float, float]]) -> Any:
    """Parts whose final accuracy is ``acc[arm][seed]``."""

    def make(key: str) -> dict[str, Any]:
        name, seed = key.rsplit("-seed", 1)
        return {"train": _train([0.1, acc[name][int(seed)]]), "extra": {}}

    return make


BASE = {
    "BN-full": (0.90, 0.90),
    "GN": (0.86, 0.86),
    "BN-g2": (0.60, 0.60),
    "BN-g8": (0.89, 0.89),
    "renorm-g2": (0.85, 0.85),
    "renorm-g8": (0.89, 0.89),
    "BN-g2-noniid": (0.50, 0.50),
    "BN-g8-noniid": (0.70, 0.70),
    "renorm-g2-noniid": (0.70, 0.70),
    "renorm-g8-noniid": (0.80, 0.80),
    "GN-g8-noniid": (0.84, 0.84),
}
CFG = SmallBatchConfig(seeds=2, group_sizes=(2, 8), batch_size=16, final_window=1)


def test_renorm_wins_with_noniid_batches_only_beyond_the_spread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acc = dict(BASE)
    # renorm's mean error is lower at both sizes, by 0.02; the seeds differ by 0.2
    acc["BN-g2-noniid"] = (0.40, 0.60)
    acc["renorm-g2-noniid"] = (0.42, 0.62)
    acc["BN-g8-noniid"] = (0.60, 0.80)
    acc["renorm-g8-noniid"] = (0.62, 0.82)
    c, _ = _stub_run(monkeypatch, small_batch, CFG, _make(acc))
    claim = c["renorm-helps-noniid"]
    assert claim.measured["sizes_where_renorm_wins"] == []
    assert claim.verdict is False
    # the same means with seeds that agree: renorm wins at both sizes
    acc["BN-g2-noniid"] = acc["BN-g8-noniid"] = (0.50, 0.50)
    acc["renorm-g2-noniid"] = acc["renorm-g8-noniid"] = (0.52, 0.52)
    c, _ = _stub_run(monkeypatch, small_batch, CFG, _make(acc))
    assert c["renorm-helps-noniid"].measured["sizes_where_renorm_wins"] == [2, 8]
    assert c["renorm-helps-noniid"].verdict is True


def test_renorm_recovery_needs_differences_beyond_the_spread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acc = dict(BASE)
    # BN loses 0.04 against BN-full and renorm recovers 0.03 of it (75 %), but the seeds of BN
    # differ by 0.3: both differences are within the spread
    acc["BN-g2"] = (0.71, 1.01)  # mean 0.86
    acc["renorm-g2"] = (0.89, 0.89)
    c, _ = _stub_run(monkeypatch, small_batch, CFG, _make(acc))
    rec = c["renorm-recovers-small-batch-loss"]
    assert rec.measured["fraction_recovered"] == pytest.approx(0.75)
    assert rec.measured["spread_renorm_vs_BN"] == pytest.approx(0.15)
    assert rec.verdict is False
    # the same means without the seed-to-seed spread
    acc["BN-g2"] = (0.86, 0.86)
    c, _ = _stub_run(monkeypatch, small_batch, CFG, _make(acc))
    assert c["renorm-recovers-small-batch-loss"].verdict is True


def test_noniid_hurts_bn_is_judged_against_groupnorm_on_the_same_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acc = dict(BASE)
    # non-i.i.d. batches cost BN 0.19 at g=8, and GroupNorm, which does not look at the
    # batch, 0.20 on the same batches: the rise is not BN's
    acc["GN-g8-noniid"] = (0.66, 0.66)
    c, ctx = _stub_run(monkeypatch, small_batch, CFG, _make(acc))
    assert "GN-g8-noniid-seed0" in ctx.keys
    hurt = c["noniid-hurts-bn"]
    assert hurt.measured["rise_BN"] == pytest.approx(0.19)
    assert hurt.measured["rise_GN"] == pytest.approx(0.20)
    assert hurt.verdict is False
    # GroupNorm barely affected: BN's rise is its own
    acc["GN-g8-noniid"] = (0.85, 0.85)
    c, _ = _stub_run(monkeypatch, small_batch, CFG, _make(acc))
    assert c["noniid-hurts-bn"].verdict is True
    assert c["noniid-hurts-bn"].measured["difference"] == pytest.approx(0.18)


def test_a_diverged_iid_reference_leaves_the_noniid_rise_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rise is error(non-i.i.d.) - error(i.i.d.) per seed: where the i.i.d. reference
    diverged it is unknown, and the verdict is not taken from the seeds that are left (it was,
    and the report said nothing diverged)."""
    acc: dict[str, tuple[float, ...]] = {k: v + (v[0],) for k, v in BASE.items()}
    acc["GN-g8-noniid"] = (0.85, 0.85, 0.85)  # BN's rise is its own on seeds 0 and 1
    cfg = SmallBatchConfig(seeds=3, group_sizes=(2, 8), batch_size=16, final_window=1)

    def make(key: str) -> dict[str, Any]:
        name, seed = key.rsplit("-seed", 1)
        diverged = name == "BN-g8" and seed == "2"
        return {"train": _train([0.1, acc[name][int(seed)]], diverged=diverged), "extra": {}}

    c, _ = _stub_run(monkeypatch, small_batch, cfg, make)
    hurt = c["noniid-hurts-bn"]
    assert hurt.verdict is False and hurt.measured["difference"] is None
    assert hurt.measured["diverged_seeds"]["BN-g8"] == 1
    assert "BN-g8 diverged in 1 of 3" in hurt.measured["diverged"]
    # the same without the divergence: supported
    c, _ = _stub_run(monkeypatch, small_batch, cfg, _make(acc))
    assert c["noniid-hurts-bn"].verdict is True


def test_small_batch_figure_says_what_its_bars_are(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchnorm.lab import plots

    seen: list[Any] = []

    class Run:
        series = {
            "group_sizes": [2, 8],
            "noniid": {"BN": [[0.5, 0.6], [0.2, 0.3]]},
            "iid": {"BN": [[0.4, 0.5], [0.1, 0.2]]},
            "flat": {"GroupNorm": [0.2, 0.2]},
            "flat_noniid": {"GroupNorm (non-i.i.d. groups of 8)": [0.3, 0.3]},
        }

    orig = plots.save_figure

    def save(fig: Any, path: Any) -> Any:
        seen.append(fig)
        return orig(fig, path)

    monkeypatch.setattr(plots, "save_figure", save)
    small_batch.figures(Run(), tmp_path)  # type: ignore[arg-type]
    (fig,) = seen
    assert all("mean ± std over seeds" in ax.get_ylabel() for ax in fig.axes)
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert "GroupNorm (non-i.i.d. groups of 8)" in labels


def test_an_update_that_leaves_a_weight_non_finite_is_a_divergence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its own training loop checks the weights after the last update, as lab.train.train
    does: the arm used to be scored as a finite error from non-finite weights."""
    import torch

    from batchnorm.lab import data, train

    class InfOnLastStep(torch.optim.SGD):
        calls = 0

        def step(self, closure: Any = None) -> Any:
            super().step(closure)
            InfOnLastStep.calls += 1
            if InfOnLastStep.calls == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("inf"))

    def make_optimizer(params: Any, name: str, lr: float, momentum: float = 0.0) -> Any:
        InfOnLastStep.calls = 0
        return InfOnLastStep(params, lr=lr, momentum=momentum)

    monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    ds = data._load_digits().subset(train=200, test=100)
    cfg = SmallBatchConfig(
        steps=3, batch_size=16, group_sizes=(2, 8), channels=(4, 8), hidden=16,
        eval_every=1, final_window=1, seeds=1,
    )  # fmt: skip
    res, _ = small_batch._train_arm(cfg, ds, "BN-full", 16, False, 0)
    assert res.diverged and res.diverged_step == 3
    assert res.rows[-1]["train_loss"] is None and [r["step"] for r in res.rows] == [1, 2, 3]


def test_an_arm_shows_the_progress_bar_the_other_experiments_show(
    capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """small-batch trains with its own loop, which drew no bar where lab.train.train does."""
    from batchnorm.lab.data import load_dataset

    monkeypatch.delenv("BATCHNORM_PROGRESS", raising=False)
    cfg = SmallBatchConfig(**{**SmallBatchConfig.QUICK, "steps": 200, "eval_every": 100})
    ds = load_dataset("digits")
    result, _ = small_batch._train_arm(cfg, ds, "BN", 2, False, 0, progress=True)
    err = capsys.readouterr().err
    assert result.steps_done == 200
    assert "BN-g2 seed 0" in err and "/200" in err, err
    small_batch._train_arm(cfg, ds, "BN", 2, False, 0, progress=False)
    assert "seed 0" not in capsys.readouterr().err
