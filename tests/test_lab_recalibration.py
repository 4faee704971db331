"""The recalibration experiment's verdicts against the seed-to-seed spread, from saved runs
(no training): a mean gain smaller than the spread of the per-seed gains supports nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchnorm.lab.experiments import recalibration
from batchnorm.lab.experiments.recalibration import RecalibrationConfig
from test_lab_claims import _stub_run, _train

EMA = [0.50, 0.60, 0.70]


def _seed(key: str) -> int:
    return int(key.rsplit("seed", 1)[1])


def _part(
    precise_gain: float, shift_gains: tuple[float, ...] = (0.2, 0.2), source: float = 0.3
) -> dict[str, Any]:
    """One saved (lr, seed) run: precise − EMA = ``precise_gain`` at every checkpoint, and the
    AdaBN gain per shifted set (the unshifted set gains nothing)."""
    rows = _train(EMA, precise_acc=[a + precise_gain for a in EMA], stat_gap=[0.1] * len(EMA))
    adabn = [{"contrast": 1.0, "brightness": 0.0, "source_acc": 0.7, "target_acc": 0.7}]
    adabn += [
        {"contrast": 0.5, "brightness": 0.1 * k, "source_acc": source, "target_acc": source + g}
        for k, g in enumerate(shift_gains)
    ]
    return {"train": rows, "extra": {"adabn": adabn}}


def _cfg(seeds: int) -> RecalibrationConfig:
    cfg = RecalibrationConfig(
        seeds=seeds, lrs=(0.01, 0.1), shift_contrast=(0.5, 0.5), shift_brightness=(0.0, 0.1)
    )
    cfg.validate()
    return cfg


def test_precise_gain_within_the_seed_spread_is_not_supported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # seed 0 gains 5 points, seed 1 loses 3: mean +1 point, spread 4 points
    gains = {0: 0.05, 1: -0.03}
    c, _ = _stub_run(monkeypatch, recalibration, _cfg(2), lambda k: _part(gains[_seed(k)]))
    claim = c["precise-bn-more-accurate"]
    m = claim.measured
    assert m["mean_gain"] == pytest.approx(0.01) and m["spread"] == pytest.approx(0.04)
    assert m["gain_by_seed"] == pytest.approx([0.05, -0.03])
    assert claim.verdict is False
    assert "supported if" in claim.details and "step 0" in claim.details

    # every seed gains: the same mean is now beyond the spread
    gains = {0: 0.012, 1: 0.008}
    c, _ = _stub_run(monkeypatch, recalibration, _cfg(2), lambda k: _part(gains[_seed(k)]))
    assert c["precise-bn-more-accurate"].verdict is True


def test_lag_at_high_rate_needs_more_than_the_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    def noisy(key: str) -> dict[str, Any]:
        # the high rate gains +2 points on average but its seeds disagree (+5, -1)
        if key.startswith("lr0.1-"):
            return _part(0.05 if _seed(key) == 0 else -0.01)
        return _part(0.0)

    c, _ = _stub_run(monkeypatch, recalibration, _cfg(2), noisy)
    lag = c["ema-lags-more-at-high-lr"]
    assert lag.measured["gain_high_lr"] > lag.measured["gain_low_lr"]
    assert lag.measured["difference"] == pytest.approx(0.02)
    assert lag.measured["spread"] == pytest.approx(0.03)
    assert lag.verdict is False

    def clear(key: str) -> dict[str, Any]:
        return _part(0.05 + 0.002 * _seed(key) if key.startswith("lr0.1-") else 0.0)

    c, _ = _stub_run(monkeypatch, recalibration, _cfg(2), clear)
    assert c["ema-lags-more-at-high-lr"].verdict is True


def test_adabn_gain_within_the_seed_spread_is_not_supported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the same model evaluated both ways; seed 0 gains 30 points on each shift, seed 1 loses 20
    shifts = {0: (0.3, 0.3), 1: (-0.2, -0.2)}
    c, _ = _stub_run(monkeypatch, recalibration, _cfg(2), lambda k: _part(0.01, shifts[_seed(k)]))
    ada = c["adabn-recovers-shifted-accuracy"]
    assert ada.measured["gain"][1:] == pytest.approx([0.05, 0.05])
    assert ada.measured["gain_spread"][1:] == pytest.approx([0.25, 0.25])
    assert ada.measured["mean_gain_shifted"] == pytest.approx(0.05)
    assert ada.measured["shifts_won"] == 0
    assert ada.verdict is False

    shifts = {0: (0.3, 0.25), 1: (0.28, 0.2)}
    c, _ = _stub_run(monkeypatch, recalibration, _cfg(2), lambda k: _part(0.01, shifts[_seed(k)]))
    assert c["adabn-recovers-shifted-accuracy"].verdict is True


def test_one_seed_says_the_spread_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    c, _ = _stub_run(monkeypatch, recalibration, _cfg(1), lambda k: _part(0.01))
    for cid in ("precise-bn-more-accurate", "adabn-recovers-shifted-accuracy"):
        assert "unknown with one seed" in c[cid].details, cid
        assert "unknown with one seed" in c[cid].measured["spread_note"], cid
        assert c[cid].verdict is True, cid
    assert "unknown with one seed" in c["ema-lags-more-at-high-lr"].details


def test_adabn_arms_differ_only_in_the_domain_of_the_statistics() -> None:
    """Source and AdaBN statistics are both recomputed (precise BN) from the same training
    images, unshifted vs shifted: on the unshifted set they are the same statistics, whatever
    the model's EMA holds; the EMA's accuracy is recorded on its own."""
    from types import SimpleNamespace

    import torch

    from batchnorm.lab import models, train
    from batchnorm.nn.batchnorm import _BatchNormBase

    torch.manual_seed(0)
    net = models.SmallCNN((1, 8, 8), 10, (4, 8), bn="before")
    x = torch.rand(300, 1, 8, 8)
    cfg = RecalibrationConfig(
        precise_samples=128, batch_size=16, shift_contrast=(0.5,), shift_brightness=(0.2,)
    )
    # labels: what the model predicts with precise statistics (accuracy 1 with them)
    precise = recalibration._precise(net, recalibration._batches(x, 128, 16, seed=0))
    with torch.no_grad():
        y = precise.eval()(x[:100]).argmax(1)
    bns = [m for m in net.modules() if isinstance(m, _BatchNormBase)]
    assert len(bns) == 2
    for m in bns:  # stale EMA statistics
        assert m.running_var is not None
        m.running_var.fill_(1e4)
    ema_acc, _ = train.evaluate(net, x[:100], y)
    assert ema_acc < 0.9
    ds = SimpleNamespace(x_train=x, x_test=x[:100], y_test=y)
    out = recalibration._adabn(cfg, ds, net, seed=0)  # type: ignore[arg-type]
    assert len(out) == 2
    assert out[0]["source_acc"] == out[0]["target_acc"] == 1.0
    assert out[0]["ema_source_acc"] == pytest.approx(ema_acc)


def test_adabn_panel_says_where_the_statistics_come_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from batchnorm.lab import plots
    from batchnorm.lab.results import RunData

    figs: list[Any] = []

    def keep(fig, path):  # type: ignore[no-untyped-def]
        figs.append(fig)
        return path

    curve = {"steps": [20, 40], "ema": [[0.5, 0.6]], "precise": [[0.55, 0.6]]}
    series = {
        "lrs": [0.01, 0.1],
        "curves": {"0.01": curve, "0.1": curve},
        "adabn": {
            "lr": 0.1,
            "shifts": [{"contrast": 1.0, "brightness": 0.0}, {"contrast": 0.5, "brightness": 0.4}],
            "source": [[0.7], [0.3]],
            "target": [[0.7], [0.6]],
        },
    }
    monkeypatch.setattr(plots, "save_figure", keep)
    recalibration.figures(RunData(tmp_path, {}, {}, [], series), tmp_path)
    ax = figs[0].axes[-1]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("unshifted train" in t for t in labels)
    assert any("shifted train" in t and "AdaBN" in t for t in labels)
    assert "shifted" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()][1] == "contrast 0.5, bright. +0.4"
