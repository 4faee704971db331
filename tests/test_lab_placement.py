"""The placement experiment: 'BN trains faster' needs a difference in steps larger than the
seed-to-seed spread, and a placement with a diverged seed is not faster; the final accuracy never
averages in step 0 and the best accuracy is one reached by training; the figure draws runs that
diverged; the claims name what else differs between the arms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchnorm.lab.config import ConfigError, make_config
from batchnorm.lab.experiments import placement
from batchnorm.lab.results import RunData
from test_lab_claims import _FakeData, _recompute, _stub_run, _StubCtx, _train

NONE = [0.1, 0.5, 0.6, 0.8]  # steps 0, 20, 40, 60: reaches its final 0.8 at step 60


def _make(before: list[list[float]], after: list[list[float]], none: Any = None) -> Any:
    """Parts: seed ``s`` of before/after has the curve ``before[s]`` / ``after[s]``; no-BN has
    ``NONE`` (or ``none(s)``, a saved run)."""

    def make(key: str) -> dict[str, Any]:
        _, arm, seed = key.split("-")
        s = int(seed[4:])
        if arm == "none":
            return {"train": _train(NONE) if none is None else none(s), "extra": {}}
        return {"train": _train((before if arm == "before" else after)[s]), "extra": {}}

    return make


def _cfg(seeds: int) -> placement.PlacementConfig:
    return placement.PlacementConfig(seeds=seeds, activations=("relu",), final_window=1)


def test_bn_faster_needs_a_difference_larger_than_the_spread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # before: seed 0 reaches no-BN's 0.8 at step 20, seed 1 only at step 60 (like no-BN); the
    # seed-mean curve (0.82 at step 40) reaches it before no-BN does, but 60 - 40 = 20 is not
    # more than the spread of the steps (std [20, 60] = 20)
    fast = [0.1, 0.9, 0.9, 0.9]
    make = _make([[0.1, 0.85, 0.85, 0.85], [0.1, 0.5, 0.79, 0.8]], [fast, fast])
    c, _ = _stub_run(monkeypatch, placement, _cfg(2), make)
    f = c["bn-faster-relu"]
    assert f.measured["steps_per_seed"] == {
        "none": [60, 60],
        "before": [20, 60],
        "after": [20, 20],
    }
    assert f.measured["difference"]["before"] == 20 and f.measured["spread"]["before"] == 20
    assert f.verdict is False
    assert "spread" in f.statement and "std + std of the steps" in f.details
    assert _recompute(f.id)(f.measured) is False
    # both placements reach it at step 20 in every seed: 40 fewer steps, spread 0
    c, _ = _stub_run(monkeypatch, placement, _cfg(2), _make([fast, fast], [fast, fast]))
    assert c["bn-faster-relu"].verdict is True
    assert _recompute("bn-faster-relu")(c["bn-faster-relu"].measured) is True


def test_a_placement_with_a_diverged_seed_is_not_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    # seed 1 of before reached the target at step 20, then diverged: it ranks lowest
    fast = [0.1, 0.9, 0.9, 0.9]

    def make(key: str) -> dict[str, Any]:
        _, arm, seed = key.split("-")
        if arm == "before" and seed == "seed1":
            return {"train": _train([0.1, 0.9], diverged=True), "extra": {}}
        return {"train": _train(NONE if arm == "none" else fast), "extra": {}}

    c, _ = _stub_run(monkeypatch, placement, _cfg(2), make)
    f = c["bn-faster-relu"]
    assert f.measured["steps_per_seed"]["before"] == [20, None]
    assert f.verdict is False and _recompute(f.id)(f.measured) is False


def test_one_seed_says_the_spread_of_the_steps_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = [0.1, 0.9, 0.9, 0.9]
    c, _ = _stub_run(monkeypatch, placement, _cfg(1), _make([fast], [fast]))
    f = c["bn-faster-relu"]
    assert f.verdict is True
    assert "unknown with one seed" in f.measured["spread_note"]
    assert "unknown with one seed" in f.details


def test_final_window_never_reaches_back_to_step_0() -> None:
    # steps=100, eval_every=50: evaluations at 0, 50, 100; a window of 3 would average in the
    # untrained network
    with pytest.raises(ConfigError, match="untrained network"):
        make_config(
            placement.PlacementConfig,
            quick=True,
            sets=["steps=100", "eval_every=50", "final_window=3"],
        )
    cfg = make_config(
        placement.PlacementConfig, quick=True, sets=["steps=101", "eval_every=50", "final_window=3"]
    )
    assert cfg.final_window == 3  # evaluations at 50, 100, 101


def test_best_accuracy_is_reached_by_training(monkeypatch: pytest.MonkeyPatch) -> None:
    # the untrained network scores 0.3 by chance; training never does better than 0.2
    make = _make([[0.3, 0.2, 0.15, 0.2]], [[0.1, 0.9, 0.9, 0.9]])
    monkeypatch.setattr(placement, "load_data", lambda *a, **k: _FakeData())
    res = placement.run(_cfg(1), _StubCtx(make))  # type: ignore[arg-type]
    assert res.summary["arms"]["relu/before"]["best_accuracy"]["mean"] == pytest.approx(0.2)


def test_figure_draws_a_run_with_a_diverged_seed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    fast = [0.1, 0.6, 0.8, 0.9]
    make = _make(
        [fast, fast],
        [fast, fast],
        none=lambda s: _train([0.1, 0.3], diverged=True) if s == 0 else _train(NONE),
    )
    monkeypatch.setattr(placement, "load_data", lambda *a, **k: _FakeData())
    res = placement.run(_cfg(2), _StubCtx(make))  # type: ignore[arg-type]
    curves = res.series["curves"]["relu"]
    assert curves["steps"] == [0, 20, 40, 60]  # the whole schedule, not the diverged seed's
    assert curves["acc"]["none"][0] == [0.1, 0.3, None, None]
    run = RunData(tmp_path, {"final_window": 1}, res.summary, res.rows, res.series)
    (png,) = placement.figures(run, tmp_path)
    assert png.exists() and png.stat().st_size > 0


def test_claims_name_what_else_differs_between_the_arms(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = [0.1, 0.9, 0.9, 0.9]
    c, _ = _stub_run(monkeypatch, placement, _cfg(2), _make([fast, fast], [fast, fast]))
    for claim_id in ("before-better-relu", "placement-matters-relu"):
        details = c[claim_id].details
        assert "bias" in details and "classifier's input" in details
        assert "lr=0.05" in details and "not tuned per arm" in details
