"""Smoke runs of the small-batch and recalibration experiments (quick size, digits), their
batch composition and image shifts, and verdicts recomputed from the saved measurements."""

import json

import pytest
import torch

from batchnorm.lab.config import ConfigError, make_config
from batchnorm.lab.experiments import recalibration, small_batch
from batchnorm.lab.experiments.recalibration import RecalibrationConfig, shift
from batchnorm.lab.experiments.small_batch import SmallBatchConfig, grouped_batches
from batchnorm.lab.registry import run_experiment
from test_lab_claims import _stub_run, _train


def test_grouped_batches_iid_and_noniid_composition() -> None:
    y = torch.arange(100) % 10
    gen = torch.Generator().manual_seed(0)
    iid = grouped_batches(y, 20, 4, None, gen)
    first = [next(iid) for _ in range(5)]  # one epoch: a permutation of the data
    assert sorted(torch.cat(first).tolist()) == list(range(100))
    noniid = grouped_batches(y, 20, 4, 2, gen)
    for _ in range(10):
        b = next(noniid)
        assert b.shape == (20,)
        for group in b.view(5, 4):
            assert len(set(y[group].tolist())) <= 2


def test_shift_is_clipped_affine() -> None:
    x = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift(x, -1.0, 1.0), 1 - x)
    assert float(shift(x, 2.0, 0.5).max()) == 1.0 and float(shift(x, 0.5, -0.6).min()) == 0.0


def test_configs_reject_bad_values() -> None:
    with pytest.raises(ConfigError, match="divide batch_size"):
        make_config(SmallBatchConfig, sets=["group_sizes=3,8"])
    with pytest.raises(ConfigError, match="equal length"):
        make_config(RecalibrationConfig, sets=["shift_contrast=0.5,1"])
    with pytest.raises(ConfigError, match="adabn_lr"):
        make_config(RecalibrationConfig, sets=["adabn_lr=0.3"])


def _summary(path):  # type: ignore[no-untyped-def]
    return json.loads((path / "summary.json").read_text())


def test_small_batch_quick_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_experiment(
        "small-batch", tmp_path / "sb", quick=True, dataset="digits",
        sets=["steps=6", "eval_every=3"], log=lambda m: None, progress=False,
    )  # fmt: skip
    s = _summary(out)
    claims = {c["id"]: c for c in s["claims"]}
    assert set(claims) == {
        "bn-error-rises-at-small-batches", "gn-beats-bn-at-small-batches",
        "renorm-recovers-small-batch-loss", "noniid-hurts-bn", "renorm-helps-noniid",
    }  # fmt: skip
    for c in claims.values():
        assert isinstance(c["verdict"], bool)
    # verdicts follow from the saved numbers
    rec = claims["renorm-recovers-small-batch-loss"]["measured"]
    frac = rec["fraction_recovered"]
    gain, loss = rec["gain_of_renorm"], rec["loss_of_BN_ranked"]  # None: a diverged BN
    assert claims["renorm-recovers-small-batch-loss"]["verdict"] == (
        frac is not None and frac >= 0.5
        and (gain is None or gain > rec["spread_renorm_vs_BN"])
        and (loss is None or loss > rec["spread_BN_vs_BN_full"])
    )  # fmt: skip
    errs = claims["bn-error-rises-at-small-batches"]["measured"]["error_by_batch"]
    assert set(errs) == {"2", "8"} and all(0.0 <= v <= 1.0 for v in errs.values())
    assert (out / "small_batch.png").stat().st_size > 0
    arms = {r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()[1:]}
    assert {"BN-full", "GN", "BN-g2", "renorm-g8-noniid", "GN-g8-noniid"} <= arms


def test_recalibration_quick_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_experiment(
        "recalibration", tmp_path / "rc", quick=True, dataset="digits",
        sets=["steps=8", "eval_every=4", "precise_samples=64"], log=lambda m: None, progress=False,
    )  # fmt: skip
    s = _summary(out)
    claims = {c["id"]: c for c in s["claims"]}
    lag = claims["ema-lags-more-at-high-lr"]
    lo, hi = lag["measured"]["gain_low_lr"], lag["measured"]["gain_high_lr"]
    assert lag["verdict"] == (hi > lo)
    ada = claims["adabn-recovers-shifted-accuracy"]["measured"]
    assert len(ada["shifts"]) == 4 and len(ada["gain"]) == 4  # unshifted + three shifts
    for src, tgt, g in zip(ada["source_acc"], ada["adabn_acc"], ada["gain"]):
        assert g == pytest.approx(tgt - src)
    assert claims["precise-bn-more-accurate"]["measured"]["checkpoints"] == 2 * 2
    assert (out / "recalibration.png").stat().st_size > 0
    # the doctor before/after recalibration on each final model (and AdaBN on shifted images)
    assert "adabn" in s["doctor"]
    for entries in s["doctor"].values():
        for d in entries:
            if d is not None:
                assert d["after"]["errors"] <= d["before"]["errors"]


@pytest.mark.parametrize(
    "sets",
    [
        ["hidden="],  # no hidden layer: nowhere to put BN, every arm the same network
        ["hidden=32,0"],
        ["n_train=10"],  # fewer than one batch of 60
        ["n_train=100", "batch_size=200"],
        ["n_train=-100"],
        ["n_eval=-5"],
        ["batch_size=0"],
        ["momentum=-1"],
        ["activations="],
    ],
    ids=" ".join,
)
def test_placement_config_rejects_bad_values(sets) -> None:  # type: ignore[no-untyped-def]
    from batchnorm.lab.experiments.placement import PlacementConfig

    with pytest.raises(ConfigError):
        make_config(PlacementConfig, quick=True, sets=sets)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, 0.0])
def test_placement_config_rejects_bad_lr(value: float) -> None:
    from batchnorm.lab.experiments.placement import PlacementConfig

    with pytest.raises(ConfigError, match="lr must be positive and finite"):
        make_config(PlacementConfig, quick=True, sets={"lr": value})


def test_placement_config_accepts_small_but_whole_batches() -> None:
    from batchnorm.lab.experiments.placement import PlacementConfig

    cfg = make_config(PlacementConfig, quick=True, sets=["n_train=60", "hidden=8"])
    assert cfg.n_train == cfg.batch_size == 60 and cfg.hidden == (8,)


class _FakeCtx:
    """Stands in for a RunContext: hands out a 100-example dataset, counting the loads."""

    def __init__(self) -> None:
        self.loads = 0

    def load_dataset(self, name, data_dir, download):  # type: ignore[no-untyped-def]
        from batchnorm.lab.data import Dataset

        self.loads += 1
        x, y = torch.zeros(100, 1, 2, 2), torch.zeros(100, dtype=torch.long)
        return Dataset("synthetic", x, y, x[:40], y[:40], 2, "test")


@pytest.mark.parametrize("n_train, n_eval", [(-100, 0), (0, -5), (-1, -1)])
def test_load_data_refuses_negative_counts(n_train: int, n_eval: int) -> None:
    from batchnorm.lab.config import BaseConfig
    from batchnorm.lab.experiments._nets import load_data

    ctx = _FakeCtx()
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_data(BaseConfig(), ctx, n_train, n_eval)  # type: ignore[arg-type]
    assert ctx.loads == 0  # refused before loading anything


def test_load_data_cuts_and_checks_one_batch() -> None:
    from batchnorm.lab.config import BaseConfig
    from batchnorm.lab.experiments._nets import load_data

    ds = load_data(BaseConfig(), _FakeCtx(), 30, 0)  # type: ignore[arg-type]
    assert ds.x_train.shape[0] == 30 and ds.x_test.shape[0] == 40  # 0 = all
    assert load_data(BaseConfig(), _FakeCtx(), 0, 0, batch_size=100).x_train.shape[0] == 100  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="has 100 examples, fewer than batch_size=120"):
        load_data(BaseConfig(), _FakeCtx(), 0, 0, batch_size=120)  # type: ignore[arg-type]


def test_learning_rate_negative_counts_are_a_clean_error(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from batchnorm.cli import main as cli_main

    args = ["lab", "run", "learning-rate", "--quick", "--dataset", "digits"]
    code = cli_main([*args, "--set", "n_train=-100", "--out", str(tmp_path / "lr")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: n_train must be >= 0"), err
    code = cli_main([*args, "--set", "n_val=-5", "--out", str(tmp_path / "lr2")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: n_val must be >= 0"), err


def test_initialization_measured_scales_use_one_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_experiment(
        "initialization", tmp_path / "init", quick=True, dataset="digits",
        sets=["steps=6", "eval_every=3", "n_train=100", "n_eval=50", "init_scales=0.1,10",
              "hidden=8", "seeds=1"],
        log=lambda m: None, progress=False,
    )  # fmt: skip
    claims = {c["id"]: c for c in _summary(out)["claims"]}
    acc = claims["bn-init-insensitive"]["measured"]
    status = claims["bn-init-fewer-failures"]["measured"]
    for arm in ("noBN", "BN"):
        assert list(acc[f"acc_{arm}"]) == ["0.1", "10"]
        assert list(status[f"status_{arm}"]) == ["0.1", "10"]  # not "10.0"


@pytest.mark.parametrize(
    ("config", "sets", "message"),
    [
        (SmallBatchConfig, ["group_sizes=8"], "at least 2 distinct normalization batch sizes"),
        (SmallBatchConfig, ["group_sizes=8,8"], "group_sizes lists 8 more than once"),
        (RecalibrationConfig, ["lrs=0.1,0.1"], "lrs lists 0.1 more than once"),
    ],
)
def test_configs_refuse_comparisons_that_cannot_be_supported(config, sets, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        make_config(config, sets=sets)


def test_small_batch_bn_that_diverges_has_the_largest_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = SmallBatchConfig(seeds=2, group_sizes=(2, 8), batch_size=16, final_window=1)
    acc = {"BN-full": 0.90, "GN": 0.85, "BN-g8": 0.89, "renorm-g2": 0.80, "renorm-g8": 0.88,
           "BN-g8-noniid": 0.70, "renorm-g2-noniid": 0.75, "renorm-g8-noniid": 0.65,
           "GN-g8-noniid": 0.84}  # fmt: skip

    def make(key):  # type: ignore[no-untyped-def]
        name = key.rsplit("-seed", 1)[0]
        if name.startswith("BN-g2"):  # BN at normalization batch 2 diverges in every seed
            return {"train": _train([0.1, 0.2], diverged=True), "extra": {}}
        return {"train": _train([0.1, acc[name]]), "extra": {}}

    c, _ = _stub_run(monkeypatch, small_batch, cfg, make)
    assert c["bn-error-rises-at-small-batches"].verdict is True
    assert c["gn-beats-bn-at-small-batches"].verdict is True
    rec = c["renorm-recovers-small-batch-loss"]
    assert rec.verdict is True and rec.measured["fraction_recovered"] == 1.0
    assert c["renorm-helps-noniid"].measured["sizes_where_renorm_wins"] == [2]
    assert c["bn-error-rises-at-small-batches"].measured["diverged"] == (
        "BN-g2 diverged in 2 of 2 seeds (ranks lowest)"
    )
    # renorm diverging too: both compared arms diverged, nothing recovered or beaten

    def make2(key):  # type: ignore[no-untyped-def]
        name = key.rsplit("-seed", 1)[0]
        if name.startswith(("BN-g2", "renorm-g2")):
            return {"train": _train([0.1, 0.2], diverged=True), "extra": {}}
        return {"train": _train([0.1, acc[name]]), "extra": {}}

    c, _ = _stub_run(monkeypatch, small_batch, cfg, make2)
    assert c["renorm-recovers-small-batch-loss"].verdict is False
    assert c["renorm-helps-noniid"].measured["sizes_where_renorm_wins"] == []


def test_small_batch_states_an_unknown_spread_with_one_seed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = SmallBatchConfig(seeds=1, group_sizes=(2, 8), batch_size=16, final_window=1)
    c, _ = _stub_run(
        monkeypatch, small_batch, cfg, lambda key: {"train": _train([0.1, 0.8]), "extra": {}}
    )
    for cid in ("bn-error-rises-at-small-batches", "gn-beats-bn-at-small-batches",
                "noniid-hurts-bn"):  # fmt: skip
        assert "unknown with one seed" in c[cid].details
        assert "unknown with one seed" in c[cid].measured["spread_note"]


def test_recalibration_close_rates_are_separate_parts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def make(key):  # type: ignore[no-untyped-def]
        high = key.startswith("lr0.1000001")
        rows = _train([0.5, 0.6], precise_acc=[0.55, 0.7 if high else 0.62], stat_gap=[0.1, 0.1])
        adabn = [{"contrast": 1, "brightness": 0, "source_acc": 0.6, "target_acc": 0.6},
                 {"contrast": 0.5, "brightness": 0.4, "source_acc": 0.3, "target_acc": 0.5}]  # fmt: skip
        return {"train": rows, "extra": {"adabn": adabn}}

    cfg = RecalibrationConfig(
        seeds=1, lrs=(0.1, 0.1000001), shift_contrast=(0.5,), shift_brightness=(0.4,)
    )
    cfg.validate()
    c, ctx = _stub_run(monkeypatch, recalibration, cfg, make)
    assert ctx.keys == ["lr0.1-seed0", "lr0.1000001-seed0"]  # 0.1 keeps its readable name
    lag = c["ema-lags-more-at-high-lr"]
    assert "lr=0.1000001 than at lr=0.1" in lag.statement
    assert lag.verdict is True  # the high rate's own run, not the low rate's part


@pytest.mark.parametrize(
    "name",
    ["paper-mnist", "placement", "dropout", "initialization", "noisy-bn", "ics", "smoothness"],
)
def test_bn1d_experiments_refuse_a_batch_of_one_before_training(name: str) -> None:
    """A batch of one cannot be normalized by a fully connected network's BN layers: refused
    by the config, not by a traceback after part of the run has trained and been saved."""
    from batchnorm.lab import registry
    from batchnorm.lab.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        make_config(registry.get(name).config_cls, quick=True, sets=["batch_size=1"])
