"""Smoke run of the sync-bn experiment (quick size, digits, real gloo process groups) and its
verdicts recomputed from the saved measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchnorm.lab.config import ConfigError, make_config
from batchnorm.lab.experiments import sync_bn
from batchnorm.lab.experiments.sync_bn import SyncBNConfig
from batchnorm.lab.registry import run_experiment
from test_lab_claims import _stub_run


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="world must be >= 2"):
        make_config(SyncBNConfig, sets=["world=1"])
    with pytest.raises(ConfigError, match="warmup < steps"):
        make_config(SyncBNConfig, sets=["steps=5", "warmup=5"])
    with pytest.raises(ConfigError, match="per_replica_batches"):
        make_config(SyncBNConfig, sets=["per_replica_batches=0,2"])
    with pytest.raises(ConfigError, match="model must be"):
        make_config(SyncBNConfig, sets=["model=resnet"])


@pytest.mark.timeout(180)
def test_quick_run_counts_collectives_and_checks_running_stats(tmp_path: Path) -> None:
    out = run_experiment(
        "sync-bn", tmp_path / "sync", quick=True, dataset="digits",
        sets=["steps=8", "warmup=3"], log=lambda m: None, progress=False,
    )  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    claims = {c["id"]: c for c in s["claims"]}
    assert set(claims) == {
        "sync-more-accurate-small-batch", "sync-costs-throughput",
        "two-collectives-per-layer", "identical-running-stats",
    }  # fmt: skip
    # the library's promises, measured in real processes: one exchange per BN layer in the
    # forward and one in the backward, none for plain BN; identical running statistics
    col = claims["two-collectives-per-layer"]["measured"]
    assert col["bn_layers"] == 2 and col["sync_per_step"] == [4] and col["local_per_step"] == [0]
    assert claims["two-collectives-per-layer"]["verdict"] is True
    rs = claims["identical-running-stats"]["measured"]
    assert rs["sync_max_abs_diff"] == 0.0 and rs["local_min_of_max_abs_diff"] > 0.0
    # verdicts follow from the saved numbers
    acc = claims["sync-more-accurate-small-batch"]["measured"]
    assert acc["diverged"] == "none"
    assert claims["sync-more-accurate-small-batch"]["verdict"] == (
        acc["difference"] > acc["spread"] and acc["difference"] > 0
    )
    ratios = claims["sync-costs-throughput"]["measured"]["throughput_ratio_sync_over_local"]
    assert set(ratios) == {"b=2"}
    assert claims["sync-costs-throughput"]["verdict"] == all(r < 1 for r in ratios.values())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert {r.split(",")[0] for r in rows[1:]} == {"local", "sync"}
    assert (out / "sync_bn.png").stat().st_size > 0
    assert s["dataset"]["name"] == "digits" and s["world"] == 2


def _record(acc, *, sync, diverged=False, diff=None):  # type: ignore[no-untyped-def]
    """One saved (arm, batch, seed) run: rank 0's measurements, no processes started."""
    return {
        "rank": 0, "accuracy": acc, "diverged": diverged, "loss": 0.1,
        "samples_per_s": 80.0 if sync else 100.0, "bn_collectives_per_step": 4.0 if sync else 0.0,
        "ddp_allreduces_per_step": 1.0, "bn_layers": 2,
        "running_stats_max_diff": (0.0 if sync else 0.01) if diff is None else diff,
    }  # fmt: skip


def test_per_replica_batches_are_sorted(monkeypatch: pytest.MonkeyPatch) -> None:
    acc = {("sync", 16): 0.90, ("local", 16): 0.89, ("sync", 2): 0.90, ("local", 2): 0.70}

    def make(key: str):  # type: ignore[no-untyped-def]
        arm, b, _ = key.split("-")
        return _record(acc[arm, int(b[1:])], sync=arm == "sync")

    for batches in ((16, 2), (2, 16)):
        cfg = SyncBNConfig(seeds=1, per_replica_batches=batches)
        c, _ = _stub_run(monkeypatch, sync_bn, cfg, make)
        assert c["sync-advantage-shrinks"].verdict is True, batches
        assert "of 2 samples each" in c["sync-more-accurate-small-batch"].statement
        assert "at a per-replica batch of 16 than at 2" in c["sync-advantage-shrinks"].statement


def test_diverged_per_replica_bn_ranks_lowest(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(key: str):  # type: ignore[no-untyped-def]
        if key.startswith("local"):  # NaN running statistics arrive as null
            return _record(None, sync=False, diverged=True, diff=float("nan"))
        return _record(0.09, sync=True)

    c, _ = _stub_run(monkeypatch, sync_bn, SyncBNConfig(seeds=1, per_replica_batches=(2,)), make)
    acc = c["sync-more-accurate-small-batch"]
    assert acc.verdict is True
    assert acc.measured["diverged"] == "local/b=2 diverged in 1 of 1 seeds (ranks lowest)"
    assert "unknown with one seed" in acc.details and "spread_note" in acc.measured
    assert c["identical-running-stats"].verdict is True  # no TypeError on the null statistic
    # every claim's details state its rule
    for claim in c.values():
        assert "supported if" in claim.details, claim.id

    def both(key: str):  # type: ignore[no-untyped-def]
        return _record(None, sync=key.startswith("sync"), diverged=True)

    c, _ = _stub_run(monkeypatch, sync_bn, SyncBNConfig(seeds=1, per_replica_batches=(2,)), both)
    assert c["sync-more-accurate-small-batch"].verdict is False
    assert (
        "both arms diverged: not supported"
        in (c["sync-more-accurate-small-batch"].measured["diverged"])
    )
