"""The learning-rate experiment: the target accuracy is chosen on validation images (no-BN's
best validation step) and measured, like the steps to it, on the test images; 'fewer steps' needs a difference larger than the
seed-to-seed spread; the best accuracy is one reached by training (not step 0)."""

from __future__ import annotations

import csv
import json
from typing import Any

import numpy as np
import pytest
import torch

from batchnorm.lab import train as lab_train
from batchnorm.lab.experiments import learning_rate
from batchnorm.lab.registry import run_experiment
from test_lab_claims import _stub_run, _StubCtx, _train

FLAT = [0.1, 0.1, 0.1, 0.1, 0.1]


def _make(test: dict[str, list[list[float]]], val: dict[str, list[list[float]]]) -> Any:
    """Parts: the sweep learns at every rate; arm ``a``'s seed ``s`` has the test curve
    ``test[a][s]`` and the validation curve ``val[a][s]`` (steps 0, 20, 40, ...); arms not
    named are flat at chance."""

    def make(key: str) -> dict[str, Any]:
        if key.startswith("sweep-"):
            return {"train": _train([0.1, 0.5], key="val_acc"), "extra": {}}
        arm, seed = key[4:].rsplit("-seed", 1)
        t = test.get(arm, [FLAT] * 3)[int(seed)]
        v = val.get(arm, test.get(arm, [FLAT] * 3))[int(seed)]
        return {"train": _train(t, val_acc=v), "extra": {}}

    return make


def test_target_is_chosen_on_validation_images(monkeypatch: pytest.MonkeyPatch) -> None:
    # no-BN's test curve has a high point at step 40 (0.86) that its validation curve does not
    # have: validation is best at step 60, where the test accuracy is 0.80. BN-Baseline reaches
    # 0.80 at step 20 and never 0.86; the validation maximum (0.9) is on another scale
    test = {
        "noBN": [[0.1, 0.5, 0.86, 0.8, 0.78]],
        "BN-Baseline": [[0.1, 0.82, 0.83, 0.84, 0.84]],
    }
    val = {"noBN": [[0.1, 0.5, 0.7, 0.9, 0.89]]}
    cfg = learning_rate.LearningRateConfig(seeds=1, sweep_lrs=(0.01, 0.1))
    c, _ = _stub_run(monkeypatch, learning_rate, cfg, _make(test, val))
    fast = c["bn-trains-faster"]
    assert fast.measured["target_accuracy"] == pytest.approx(0.8)
    assert fast.measured["target_step"] == 60
    assert fast.measured["noBN_steps"] == 40 and fast.measured["BN-Baseline_steps"] == 20
    assert fast.verdict is True
    assert c["nobn-x5-diverges"].measured["learn_threshold"] == pytest.approx(0.1 + 0.5 * 0.7)


def test_fewer_steps_needs_more_than_the_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    # no-BN reaches 0.9 at steps 20 and 80 (mean 50, std 30), BN at 20 and 40 (mean 30, std
    # 10): 20 steps fewer on average, within the spread of 40; the seed-mean curves (no-BN at
    # 80, BN at 40) would hide that
    test = {
        "noBN": [[0.1, 0.9, 0.9, 0.9, 0.9], [0.1, 0.2, 0.3, 0.5, 0.9]],
        "BN-Baseline": [[0.1, 0.9, 0.9, 0.9, 0.9], [0.1, 0.5, 0.9, 0.9, 0.9]],
        "BN-x5": [[0.1, 0.9, 0.9, 0.9, 0.9], [0.1, 0.9, 0.9, 0.9, 0.9]],
    }
    cfg = learning_rate.LearningRateConfig(seeds=2, sweep_lrs=(0.01, 0.1))
    c, _ = _stub_run(monkeypatch, learning_rate, cfg, _make(test, {}))
    fast = c["bn-trains-faster"]
    assert fast.measured["target_accuracy"] == pytest.approx(0.9)
    assert fast.measured["steps_per_seed"] == {"noBN": [20, 80], "BN-Baseline": [20, 40]}
    assert fast.measured["difference"] == pytest.approx(20)
    assert fast.measured["spread"] == pytest.approx(40)
    assert fast.verdict is False
    # BN-x5 at step 20 in both seeds: 30 fewer, spread 30 — not more than the spread either
    assert c["bn-x5-14x-fewer-steps"].measured["difference"] == pytest.approx(30)
    assert c["bn-x5-14x-fewer-steps"].verdict is False
    # a no-BN seed that never reaches the target (the seed mean at step 80, 0.7) counts as
    # reaching it right after the run: steps 80 and 801 against BN's 20 and 40
    test["noBN"] = [[0.1, 0.3, 0.4, 0.5, 0.9], [0.1, 0.5, 0.5, 0.5, 0.5]]
    val = {"noBN": [[0.1, 0.2, 0.3, 0.4, 0.9]] * 2}
    c, _ = _stub_run(monkeypatch, learning_rate, cfg, _make(test, val))
    fast = c["bn-trains-faster"]
    assert fast.measured["target_accuracy"] == pytest.approx(0.7)
    assert fast.measured["steps_per_seed"]["noBN"] == [80, None]
    assert fast.measured["noBN_steps"] is None and fast.measured["never_reached_as"] == 801
    assert fast.measured["difference"] == pytest.approx((80 + 801) / 2 - 30)
    assert fast.measured["spread"] == pytest.approx((801 - 80) / 2 + 10)
    assert fast.verdict is True
    # ... but when the no-BN seed that reaches it is as fast as BN, the spread swallows it
    test["noBN"][0] = [0.1, 0.9, 0.9, 0.9, 0.9]
    c, _ = _stub_run(monkeypatch, learning_rate, cfg, _make(test, val))
    assert c["bn-trains-faster"].measured["steps_per_seed"]["noBN"] == [20, None]
    assert c["bn-trains-faster"].verdict is False


def test_best_accuracy_is_reached_by_training(monkeypatch: pytest.MonkeyPatch) -> None:
    # the untrained network scores 0.3 by chance, training never does better than 0.2
    test = {"noBN-x5": [[0.3, 0.2, 0.15, 0.2, 0.1]]}
    cfg = learning_rate.LearningRateConfig(seeds=1, sweep_lrs=(0.01, 0.1))
    monkeypatch.setattr(learning_rate, "load_data", lambda *a, **k: _fake())
    res = learning_rate.run(cfg, _StubCtx(_make(test, {})))  # type: ignore[arg-type]
    assert res.summary["arms"]["noBN-x5"]["best_accuracy"]["mean"] == pytest.approx(0.2)


def test_an_arm_whose_every_seed_diverged_has_no_final_accuracy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every seed diverged before its second evaluation: what is left is the untrained
    network's step-0 accuracy, which the claims used to show as the arm's final accuracy."""
    cfg = learning_rate.LearningRateConfig(seeds=2, sweep_lrs=(0.01, 0.1))
    make = _make({}, {})

    def with_diverged(key: str) -> dict[str, Any]:
        if key.startswith("arm-noBN-x5") or key.startswith("arm-BN-x5-seed"):
            return {"train": _train([0.03], diverged=True, val_acc=[0.03]), "extra": {}}
        return make(key)

    c, _ = _stub_run(monkeypatch, learning_rate, cfg, with_diverged)
    measured = c["nobn-x5-diverges"].measured
    assert measured["final_accuracy"] is None and measured["BN-x5_final"] is None


def _fake() -> Any:
    from test_lab_claims import _FakeData

    return _FakeData()


def test_arms_train_without_the_validation_images_and_score_both_sets(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, tuple[str, ...]]] = []
    real = lab_train.train

    def spy(model: Any, opt: Any, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> Any:
        seen.append((int(x.shape[0]), tuple(kw["eval_sets"])))
        return real(model, opt, x, y, **kw)

    monkeypatch.setattr(lab_train, "train", spy)
    out = run_experiment(
        "learning-rate", tmp_path / "lr", quick=True, dataset="digits",
        sets=["steps=8", "sweep_steps=4", "eval_every=4", "n_train=300", "n_eval=60",
              "n_val=20", "val_fraction=0.2", "sweep_lrs=0.01,0.1"],
        log=lambda m: None, progress=False,
    )  # fmt: skip
    sizes = {n for n, _ in seen}
    assert sizes == {240}  # 300 training images minus the 60 of the validation split
    arms = [sets for _, sets in seen if "test" in sets]
    assert len(arms) == len(learning_rate.ARMS) and all(s == ("val", "test") for s in arms)
    summary = json.loads((out / "summary.json").read_text())
    claim = next(c for c in summary["claims"] if c["id"] == "bn-trains-faster")
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["arm"] == "noBN" and r["val_acc"]]
    best = max((float(r["val_acc"]), -int(r["step"])) for r in rows if int(r["step"]) > 0)
    at = next(r for r in rows if int(r["step"]) == -best[1])
    assert claim["measured"]["target_step"] == -best[1]
    assert claim["measured"]["target_accuracy"] == pytest.approx(float(at["test_acc"]))


def test_learning_rate_figure_labels_the_target_and_the_steps(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchnorm.lab import plots

    seen: list[Any] = []
    orig = plots.save_figure

    def save(fig: Any, path: Any) -> Any:
        seen.append(fig)
        return orig(fig, path)

    class Run:
        series = {
            "curves": {"noBN": {"steps": [0, 20], "acc": [[0.1, 0.8]]}},
            "sweep": {"noBN": {"0.1": 0.8}, "BN": {"0.1": 0.85}},
            "sweep_steps": 30,
        }
        summary = {"target_accuracy": 0.8, "steps_to_target": {"noBN": 20.0}}

    monkeypatch.setattr(plots, "save_figure", save)
    learning_rate.figures(Run(), tmp_path)  # type: ignore[arg-type]
    arms = seen[0]
    assert arms.axes[0].get_ylabel() == "test accuracy"
    legend = arms.axes[0].get_legend()
    assert "best validation step" in " ".join(t.get_text() for t in legend.get_texts())
    assert "mean over seeds" in arms.axes[1].get_xlabel()


def test_parts_without_validation_accuracy_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(key: str) -> dict[str, Any]:
        if key.startswith("sweep-"):
            return {"train": _train([0.1, 0.5], key="val_acc"), "extra": {}}
        return {"train": _train([0.1, 0.5, 0.8]), "extra": {}}  # test accuracy only

    cfg = learning_rate.LearningRateConfig(seeds=1, sweep_lrs=(0.01, 0.1))
    with pytest.raises(RuntimeError, match="no validation accuracy"):
        _stub_run(monkeypatch, learning_rate, cfg, make)


def test_learning_rate_steps_panel_keeps_dots_and_notes_inside(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The panel ended at the last step, cutting a seed's dot there in half, and the note of
    a seed that missed, written after the last dot, ran past the frame."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from batchnorm.lab import plots

    seen: list[Any] = []
    orig = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: seen.append(fig) or orig(fig, path))

    class Run:
        series = {
            "curves": {
                a: {"steps": [0, 20, 40, 60], "acc": [[0.1, 0.4, 0.6, 0.8]] * 3}
                for a in ("noBN", "BN")
            },
            "sweep": {"noBN": {"0.1": 0.8}, "BN": {"0.1": 0.85}},
            "sweep_steps": 30,
        }
        summary = {
            "target_accuracy": 0.8,
            "steps_to_target": {"noBN": 60.0, "BN": None},
            "arms": {"noBN": {"steps_to_target_per_seed": [60, 60, None]},
                     "BN": {"steps_to_target_per_seed": [None, None, None]}},
        }  # fmt: skip

    learning_rate.figures(Run(), tmp_path)  # type: ignore[arg-type]
    fig = seen[0]
    ax = fig.axes[1]
    canvas = FigureCanvasAgg(fig)  # (a saved figure is closed: its canvas no longer draws)
    canvas.draw()
    frame = ax.get_window_extent(canvas.get_renderer())
    for line in ax.get_lines():  # the seeds' dots, whole
        radius = line.get_markersize() / 2 * fig.dpi / 72
        for x, _y in ax.transData.transform(np.column_stack(line.get_data()).astype(float)):
            assert frame.x0 <= x - radius and x + radius <= frame.x1
    # each note under its arm's name, beside the frame, where it covers no bar and no dot
    assert not ax.texts
    notes = {t.get_text().split("\n")[0]: t.get_text() for t in ax.get_yticklabels()}
    assert notes["noBN"].endswith("\nnot reached in 1 of 3 seeds")
    assert notes["BN"].endswith("\nnot reached in 3 of 3 seeds")
