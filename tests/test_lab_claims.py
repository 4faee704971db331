"""Smoke runs of the claims experiments at --quick size on scikit-learn's digits: every run must
complete, write its files and figures, and produce claims whose boolean verdicts follow from
the numbers stored next to them (each verdict is recomputed here from ``measured``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchnorm.lab import registry
from batchnorm.lab.results import load_run

EXPERIMENTS = (
    "learning-rate",
    "placement",
    "dropout",
    "initialization",
    "noisy-bn",
    "ics",
    "smoothness",
)


def _lt(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a < b


# claim id (or id prefix) -> the verdict recomputed from the claim's measured numbers
RECOMPUTE: dict[str, Callable[[dict[str, Any]], bool]] = {
    # learning-rate
    "bn-trains-faster": lambda m: _lt(m["BN-Baseline_steps"], m["noBN_steps"]),
    "bn-x5-14x-fewer-steps": lambda m: _lt(m["steps"]["BN-x5"], m["steps"]["noBN"]),
    "nobn-x5-diverges": lambda m: (
        m["diverged"] or m["final_accuracy"] is None or m["final_accuracy"] < m["learn_threshold"]
    ),
    "sigmoid-needs-bn": lambda m: (
        m["BN-x5-Sigmoid_final"] is not None
        and m["BN-x5-Sigmoid_final"] >= m["learn_threshold"]
        and not (
            m["noBN-Sigmoid_final"] is not None and m["noBN-Sigmoid_final"] >= m["learn_threshold"]
        )
    ),
    "bn-larger-stable-lr": lambda m: (
        m["largest_stable_lr_BN"] is not None
        and (
            m["largest_stable_lr_noBN"] is None
            or m["largest_stable_lr_BN"] > m["largest_stable_lr_noBN"]
        )
    ),
    # placement
    "before-better-": lambda m: (
        m["difference"] is not None and m["difference"] > m["spread"] and m["difference"] > 0
    ),
    "placement-matters-": lambda m: (
        m["difference"] is not None and abs(m["difference"]) > m["spread"]
    ),
    "bn-faster-": lambda m: (
        m["steps"]["none"] is not None
        and all(_lt(m["steps"][b], m["steps"]["none"]) for b in ("before", "after"))
    ),
    # dropout
    "bn-reduces-dropout-benefit": lambda m: _lt(m["benefit_with_BN"], m["benefit_without_BN"]),
    "bn-regularizes": lambda m: _lt(m["gap_BN"], m["gap_noBN"]),
    "dropout-before-bn-variance-shift": lambda m: _lt(
        m["mean_abs_log_ratio"]["safe_arm"], m["mean_abs_log_ratio"]["shift_arm"]
    ),
    "variance-shift-hurts": lambda m: (
        m["difference"] is not None and m["difference"] > m["spread"] and m["difference"] > 0
    ),
    # initialization
    "bn-init-insensitive": lambda m: m["range_BN"] < m["range_noBN"],
    "bn-init-fewer-failures": lambda m: m["failures_BN"] < m["failures_noBN"],
    # noisy-bn
    "noisy-bn-as-good-as-bn": lambda m: (
        m["difference"] is not None and m["difference"] >= -m["tolerance"]
    ),
    "noisy-bn-beats-standard": lambda m: (
        m["noisy_BN"]["mean"] is not None
        and (m["standard"]["mean"] is None or m["noisy_BN"]["mean"] > m["standard"]["mean"])
    ),
    "noisy-bn-less-stable": lambda m: _lt(
        m["mean_shift_per_probe"]["standard"], m["mean_shift_per_probe"]["noisy-BN"]
    ),
    # ics
    "bn-does-not-reduce-ics-": lambda m: (
        m["one_minus_cos_BN"] is not None
        and m["one_minus_cos_noBN"] is not None
        and m["one_minus_cos_BN"] >= m["one_minus_cos_noBN"]
    ),
    # smoothness
    "bn-smaller-": lambda m: _lt(m["BN"], m["noBN"]),
}


def _recompute(claim_id: str) -> Callable[[dict[str, Any]], bool]:
    for key in sorted(RECOMPUTE, key=len, reverse=True):
        if claim_id == key or (key.endswith("-") and claim_id.startswith(key)):
            return RECOMPUTE[key]
    raise AssertionError(f"no verdict rule known for claim {claim_id!r}")


def _has_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return any(_has_number(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_number(x) for x in v)
    return False


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # these tests check the experiments' outputs; the fused kernels have their own tests, and
    # their one-off JIT compilation would dominate a few-second smoke run
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_run_produces_consistent_claims(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    path = registry.run_experiment(
        name, out, quick=True, dataset="digits", log=lambda msg: None, progress=False
    )
    assert path == out
    for f in ("config.json", "metrics.csv", "series.json", "summary.json", "report.md"):
        assert (out / f).is_file(), f
    figures = sorted(out.glob("*.png"))
    assert figures and all(f.name.startswith(name) and f.stat().st_size > 1000 for f in figures)

    run = load_run(out)
    s = run.summary
    assert s["status"] == "complete" and s["experiment"] == name
    assert s["dataset"]["name"] == "digits"
    assert s["config"]["quick"] is True
    assert s["seeds"] and s["arms"]
    assert run.rows and all("arm" in r and "step" in r for r in run.rows)
    claims = run.claims
    assert claims, "an experiment must test at least one claim"
    assert len({c.id for c in claims}) == len(claims)
    for c in claims:
        assert isinstance(c.verdict, bool)
        assert c.statement and c.source and c.details
        assert c.seeds
        assert _has_number(c.measured), f"{c.id}: no measured numbers"
        assert _recompute(c.id)(c.measured) == c.verdict, f"{c.id}: verdict vs {c.measured}"
    report = (out / "report.md").read_text()
    assert all(c.statement in report for c in claims)


def test_dropout_keeps_per_layer_variance_shift(tmp_path: Path) -> None:
    """The train/eval statistics mismatch is stored per BN layer and seed, and dropout before
    BN lowers the variance ratio of the layers it precedes (Li et al.'s variance shift)."""
    out = tmp_path / "dropout"
    registry.run_experiment(
        "dropout",
        out,
        quick=True,
        dataset="digits",
        log=lambda msg: None,
        progress=False,
        sets=["dropout_rates=0,0.5", "hidden=32,32"],
    )
    s = load_run(out).summary
    shift = s["variance_shift"]
    assert set(shift) == {"BN-p0", "BN-p0.5", "BN-last-p0.5"}
    per_seed = shift["BN-p0.5"]
    assert len(per_seed) == len(s["seeds"])
    assert set(per_seed[0]) == {"hidden.0.bn", "hidden.1.bn"}
    # hidden.1.bn follows a dropout of rate 0.5: its eval-time variance is well below the
    # running variance accumulated with dropout on; hidden.0.bn sees the raw input (no dropout)
    assert per_seed[0]["hidden.1.bn"]["var_ratio"] < 0.9
    assert per_seed[0]["hidden.1.bn"]["var_ratio"] < per_seed[0]["hidden.0.bn"]["var_ratio"]
    # the doctor's measurement on every BN arm, before and after its fix (recalibration)
    doc = s["doctor"]
    assert set(doc) == {"BN-p0", "BN-p0.5", "BN-last-p0.5"}
    for entry in doc["BN-p0.5"]:
        assert set(entry) >= {"before", "after", "cured", "remaining"}
        assert isinstance(entry["before"]["output_gap"], float)
        # findings name a BN layer, or "" for the whole model (the output gap)
        layers = {f["layer"] for f in entry["before"]["findings"]}
        assert layers <= {"", "hidden.0.bn", "hidden.1.bn"}
    report = (out / "report.md").read_text()
    assert "The doctor on the BN arms" in report


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    from batchnorm.lab.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key"):
        registry.run_experiment(
            "smoothness", tmp_path / "x", quick=True, dataset="digits", sets=["nope=1"]
        )
