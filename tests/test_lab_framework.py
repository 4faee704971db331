"""The lab framework: configs, registry, run folders (atomic, resume-or-refuse), the training
loop, models, plots, reports and the CLI, exercised with a toy experiment."""

import dataclasses
import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.cli import main as cli_main
from batchnorm.lab import models, plots, registry, report, results, train
from batchnorm.lab.config import BaseConfig, ConfigError, config_to_dict, make_config
from batchnorm.lab.data import synthetic
from batchnorm.lab.results import Claim, Results, RunContext, RunDir, RunDirConflict

# --------------------------------------------------------------------------------------------
# configs


@dataclass
class ToyConfig(BaseConfig):
    steps: int = 60
    lr: float = 0.5
    widths: tuple[int, ...] = (16,)
    bn: bool = True
    shared_lr: float | None = None
    QUICK = {"steps": 30}


def test_set_converts_to_field_types():
    cfg = make_config(
        ToyConfig,
        sets=["steps=7", "lr=1e-2", "widths=8,4", "bn=false", "shared_lr=0.3", "dataset=digits"],
    )
    assert (cfg.steps, cfg.lr, cfg.widths, cfg.bn, cfg.shared_lr) == (7, 0.01, (8, 4), False, 0.3)
    assert make_config(ToyConfig, sets=["shared_lr=none"]).shared_lr is None
    assert config_to_dict(cfg)["widths"] == [8, 4]


def test_unknown_keys_and_bad_values_are_errors():
    with pytest.raises(ConfigError, match="unknown config key 'stpes'.*valid keys: .*steps"):
        make_config(ToyConfig, sets=["stpes=3"])
    with pytest.raises(ConfigError, match="steps: expected int"):
        make_config(ToyConfig, sets=["steps=many"])
    with pytest.raises(ConfigError, match="boolean"):
        make_config(ToyConfig, sets=["bn=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        make_config(ToyConfig, sets=["steps"])
    with pytest.raises(ConfigError, match="dataset must be one of"):
        make_config(ToyConfig, sets=["dataset=cifar"])
    with pytest.raises(ConfigError, match="seeds"):
        make_config(ToyConfig, seeds=0)
    # a built-in set reads no files: a folder or a download asked for would be ignored
    for sets in (["data_dir=/nowhere"], ["download=true"], ["data_dir=x", "download=true"]):
        for dataset in ("digits", "synthetic"):
            with pytest.raises(ConfigError, match=f"would be ignored: dataset '{dataset}' is"):
                make_config(ToyConfig, sets=[f"dataset={dataset}", *sets])
    assert make_config(ToyConfig, sets=["dataset=mnist", "download=true"]).download


def test_quick_applies_first_and_set_wins():
    assert make_config(ToyConfig, quick=True).steps == 30
    cfg = make_config(ToyConfig, quick=True, sets=["steps=5"], seeds=3)
    assert cfg.steps == 5 and cfg.quick and cfg.seed_list() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# a toy experiment, registered for these tests only

CALLS = {"n": 0}


def _toy_figures(run, out):
    fig, (ax,) = plots.new_figure(1)
    rows = run.select(arm="net")
    plots.curves(ax, [r["step"] for r in rows], {"net": [[r["test_acc"] for r in rows]]})
    return [plots.save_figure(fig, out / "toy.png")]


def _toy_run(cfg: ToyConfig, ctx: RunContext) -> Results:
    ds = ctx.load_dataset("synthetic")

    def one(seed):
        CALLS["n"] += 1
        train.seed_everything(seed)
        net = models.MLP(ds.num_features, cfg.widths, 10, bn="before" if cfg.bn else "none")
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
        res = train.train(
            net,
            opt,
            ds.x_train,
            ds.y_train,
            steps=cfg.steps,
            batch_size=50,
            eval_sets={"test": (ds.x_test, ds.y_test)},
            eval_every=20,
            seed=seed,
        )
        return res.to_dict()

    rows, finals = [], []
    for seed in cfg.seed_list():
        r = ctx.cached(f"seed{seed}", lambda seed=seed: one(seed))
        rows += [{"arm": "net", "seed": seed, **x} for x in r["rows"]]
        finals.append(r["rows"][-1]["test_acc"])
    m = results.mean_std(finals)
    claim = Claim(
        "learns",
        "the toy network beats chance",
        m["mean"] > 0.1,
        {"final_acc": m, "chance": 0.1},
        source="toy",
    )
    return Results(
        rows,
        {"dataset": ds.info(), "arms": {"net": {"final_accuracy": m}}, "claims": [claim]},
        {"note": [1, 2, 3]},
    )


@pytest.fixture
def toy():
    registry.register(
        "toy", config=ToyConfig, figures=_toy_figures, description="toy", source="tests"
    )(_toy_run)
    CALLS["n"] = 0
    yield "toy"
    registry._REGISTRY.pop("toy", None)


def test_discovery_finds_experiment_modules():
    assert "paper-mnist" in registry.names()
    exp = registry.get("paper-mnist")
    assert exp.module == "batchnorm.lab.experiments.paper_mnist"
    assert issubclass(exp.config_cls, BaseConfig) and exp.figures is not None
    with pytest.raises(KeyError, match="unknown experiment 'nope'.*paper-mnist"):
        registry.get("nope")


def test_run_writes_everything_and_resumes_or_refuses(toy, tmp_path):
    out = tmp_path / "run"
    path = registry.run_experiment(toy, out, quick=True, seeds=2, log=lambda m: None)
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "metrics.csv",
        "series.json",
        "summary.json",
        "toy.png",
        "report.md",
        "report.html",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete" and s["experiment"] == "toy"
    assert s["dataset"]["name"] == "synthetic" and s["seeds"] == [0, 1]
    assert s["config"]["steps"] == 30 and s["config"]["quick"] is True
    (c,) = s["claims"]
    assert c["verdict"] == (c["measured"]["final_acc"]["mean"] > 0.1)  # computed, not typed
    assert c["seeds"] == [0, 1] and len(c["measured"]["final_acc"]["values"]) == 2
    run = results.load_run(out)
    assert [r["step"] for r in run.select(seed=0)] == [0, 20, 30]
    assert run.series == {"note": [1, 2, 3]}
    md = (out / "report.md").read_text()
    assert "the toy network beats chance" in md and "![toy](toy.png)" in md
    assert "synthetic" in md and '<img src="toy.png"' in (out / "report.html").read_text()
    assert "Quick size (`--quick`)" in md and "few seeds" in md  # a smoke test, said so
    assert CALLS["n"] == 2

    # same config: nothing recomputed
    registry.run_experiment(toy, out, quick=True, seeds=2, log=lambda m: None)
    assert CALLS["n"] == 2
    # another config: refused, folder untouched
    before = (out / "summary.json").read_bytes()
    with pytest.raises(RunDirConflict, match="steps: 30 there vs 31 now"):
        registry.run_experiment(toy, out, quick=True, seeds=2, sets=["steps=31"])
    assert (out / "summary.json").read_bytes() == before


def _interrupted_toy_run(toy, out, monkeypatch):
    """A two-seed toy run stopped by Ctrl-C in its second training run (seed 0 saved)."""
    real = train.train

    def dies_on_second(*a, **k):
        if CALLS["n"] >= 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "train", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        registry.run_experiment(toy, out, quick=True, seeds=2, log=lambda m: None)
    monkeypatch.setattr(train, "train", real)


def test_interrupted_run_resumes_from_finished_parts(toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_toy_run(toy, out, monkeypatch)
    assert not (out / "summary.json").exists()  # no half-written summary
    assert (out / "parts" / "seed0.json").is_file()
    logs = []
    registry.run_experiment(toy, out, quick=True, seeds=2, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert CALLS["n"] == 3  # seed 0 reused, seed 1 trained
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_quick_reports_say_they_are_smoke_tests(toy, tmp_path):
    one = registry.run_experiment(toy, tmp_path / "one", quick=True, seeds=1, log=lambda m: None)
    assert "one seed: every seed-to-seed spread is 0" in (one / "report.md").read_text()
    full = registry.run_experiment(toy, tmp_path / "full", seeds=1, log=lambda m: None)
    assert "Quick size" not in (full / "report.md").read_text()


def test_non_run_folder_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(RunDirConflict, match="not a run folder"):
        RunDir(tmp_path).prepare("toy", {"a": 1})


def test_written_files_get_the_usual_mode(tmp_path):
    """Results and reports are as readable as files made by open() (0666 less the umask), not
    mkstemp's private 0600."""
    old = os.umask(0o022)
    try:
        results.atomic_write_text(tmp_path / "r.md", "x")
        assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    p = tmp_path / "s.json"
    results.atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        results.atomic_write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["s.json"]
    results.atomic_write_json(p, {"nan": float("nan")})
    assert json.loads(p.read_text()) == {"nan": None}


def test_summary_requires_claims_and_dataset(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.prepare("x", {})
    with pytest.raises(ValueError, match="without 'claims'"):
        rd.save_results("x", {}, Results([], {"dataset": {}}), 1.0)
    assert not rd.complete


def test_mean_std():
    m = results.mean_std([1.0, 3.0, None])
    assert m["mean"] == 2.0 and m["std"] == 1.0 and m["n"] == 2
    assert results.mean_std([None])["mean"] is None


# --------------------------------------------------------------------------------------------
# the training loop


def _setup(seed=0, bn="before"):
    ds = synthetic(n_train=240, n_test=60, seed=3)
    train.seed_everything(seed)
    net = models.MLP(ds.num_features, (16, 16), 10, bn=bn, dropout=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    return ds, net, opt


def test_train_is_deterministic_and_seeded():
    def once(seed):
        ds, net, opt = _setup(seed)
        return train.train(
            net,
            opt,
            ds.x_train,
            ds.y_train,
            steps=25,
            batch_size=32,
            eval_sets={"test": (ds.x_test, ds.y_test)},
            eval_every=10,
            seed=seed,
        )

    a, b, c = once(0), once(0), once(1)
    assert a.rows == b.rows
    assert a.rows != c.rows
    assert [r["step"] for r in a.rows] == [0, 10, 20, 25]
    assert {"train_loss", "test_acc", "test_loss", "lr"} <= set(a.rows[-1])
    assert a.steps_done == 25 and not a.diverged


def test_eval_matches_manual_accuracy_and_callbacks_run():
    ds, net, opt = _setup()
    seen = []
    res = train.train(
        net,
        opt,
        ds.x_train,
        ds.y_train,
        steps=12,
        batch_size=40,
        eval_every=6,
        eval_sets={"test": (ds.x_test, ds.y_test)},
        callbacks=[lambda info: seen.append(info.step)],
        on_eval=lambda step, m: {"was_training": m.training},
    )
    assert seen == list(range(1, 13))
    assert all(r["was_training"] is False for r in res.rows)  # on_eval sees eval mode
    assert net.training  # train() leaves the model in train mode
    net.eval()
    with torch.no_grad():
        acc = (net(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert math.isclose(res.final("test_acc"), acc, rel_tol=1e-6)


def test_divergence_stops_the_arm():
    ds, net, opt = _setup(bn="none")
    calls = {"n": 0}

    def loss_fn(logits, y):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if calls["n"] > 5 else loss

    res = train.train(
        net,
        opt,
        ds.x_train,
        ds.y_train,
        steps=50,
        batch_size=40,
        eval_every=100,
        loss_fn=loss_fn,
        eval_sets={"test": (ds.x_test, ds.y_test)},
    )
    assert res.diverged and res.diverged_step == 6 and res.steps_done == 6
    assert res.rows[-1]["train_loss"] is None and "test_acc" not in res.rows[-1]
    assert all(torch.isfinite(p).all() for p in net.parameters())  # NaN step not applied


def test_weights_made_non_finite_by_the_last_update_count_as_diverged():
    ds, net, opt = _setup(bn="none")
    res = train.train(
        net,
        opt,
        ds.x_train,
        ds.y_train,
        steps=6,
        batch_size=40,
        eval_every=3,
        lr_schedule=lambda step: float("inf") if step == 5 else 0.01,  # the 6th update
        eval_sets={"test": (ds.x_test, ds.y_test)},
    )
    assert res.diverged and res.diverged_step == 6 and res.steps_done == 6
    assert res.rows[-1]["train_loss"] is None and "test_acc" not in res.rows[-1]
    assert [r["step"] for r in res.rows] == [0, 3, 6]  # the earlier evaluations kept


def test_outputs_or_activations_that_overflow_count_as_diverged():
    """A loss that stays finite while the network's outputs overflow on the held-out set, or
    while its activations exceed what recalibration can hold, is a diverged run too: its
    accuracy would be argmax of NaN, or its measurement would abort the experiment."""
    ds, net, opt = _setup(bn="none")
    x_bad = ds.x_test.clone()
    x_bad[0] = float("inf")  # the network's output on it is not finite
    res = train.train(
        net, opt, ds.x_train, ds.y_train, steps=6, batch_size=40, eval_every=3,
        eval_sets={"test": (ds.x_test, ds.y_test), "bad": (x_bad, ds.y_test)},
    )  # fmt: skip
    assert res.diverged and res.diverged_step == 0 and res.steps_done == 0
    assert res.rows == [{"step": 0, "train_loss": None, "lr": opt.param_groups[0]["lr"]}]

    def overflowing(step: int, model: nn.Module) -> dict[str, float]:
        if step >= 3:
            raise OverflowError("recalibrate: ... cannot hold the data's (up to 1.7e+49)")
        return {"extra": 1.0}

    ds, net, opt = _setup(bn="none")
    res = train.train(
        net, opt, ds.x_train, ds.y_train, steps=6, batch_size=40, eval_every=3,
        eval_sets={"test": (ds.x_test, ds.y_test)}, on_eval=overflowing,
    )  # fmt: skip
    assert res.diverged and res.diverged_step == 3 and res.steps_done == 3
    assert [r["step"] for r in res.rows] == [0, 3] and res.rows[0]["extra"] == 1.0
    assert res.rows[-1]["train_loss"] is None and net.training

    ds, net, opt = _setup(bn="none")
    res = train.train(net, opt, ds.x_train, ds.y_train, steps=6, batch_size=40, eval_every=3)
    assert not res.diverged and [r["step"] for r in res.rows] == [0, 3, 6]
    train.mark_diverged(res)  # what an experiment's measurement after training found
    assert res.diverged and res.diverged_step == 6
    assert [r["step"] for r in res.rows] == [0, 3, 6] and res.rows[-1]["train_loss"] is None


def test_lr_schedule_and_bad_arguments():
    ds, net, opt = _setup()
    res = train.train(
        net,
        opt,
        ds.x_train,
        ds.y_train,
        steps=10,
        batch_size=40,
        eval_every=5,
        lr_schedule=lambda s: 0.1 / (1 + s),
    )
    assert math.isclose(res.rows[-1]["lr"], 0.1 / 10)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train.train(net, opt, ds.x_train[:10], ds.y_train[:10], steps=1, batch_size=60)


def test_steps_to_target():
    assert train.steps_to_target([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
    assert train.steps_to_target([0, 10], [0.1, None], 0.5) is None


def test_progress_bar_switch(monkeypatch):
    monkeypatch.setenv("BATCHNORM_PROGRESS", "0")
    assert train.progress_enabled(True) is False
    monkeypatch.setenv("BATCHNORM_PROGRESS", "1")
    assert train.progress_enabled() is True
    monkeypatch.delenv("BATCHNORM_PROGRESS")
    assert train.progress_enabled(False) is False


# --------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("bn", ["none", "before", "after"])
def test_mlp_bn_placement(bn):
    net = models.MLP(64, (8, 8), 10, activation="sigmoid", bn=bn, init_std=0.05)
    block = list(net.hidden[0].named_children())
    names = [n for n, _ in block]
    want = {
        "none": ["linear", "act"],
        "before": ["linear", "bn", "act"],
        "after": ["linear", "act", "bn"],
    }[bn]
    assert names == want
    if bn != "none":
        assert isinstance(net.hidden[0].bn, batchnorm.BatchNorm1d)
    assert (net.hidden[0].linear.bias is None) == (bn == "before")  # β replaces the bias
    assert net(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert len(net.activations) == 2 and isinstance(net.activations[0], nn.Sigmoid)


def test_init_scale_is_applied():
    torch.manual_seed(0)
    net = models.MLP(784, (400,), 10, init_std=0.05)
    w = net.hidden[0].linear.weight
    assert abs(w.std().item() - 0.05) < 0.002 and net.hidden[0].linear.bias.abs().max() == 0


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
def test_small_cnn_shapes(shape):
    net = models.SmallCNN(shape, 10, (4, 8, 8), bn="before", dropout=0.2)
    assert isinstance(net.features[0].bn, batchnorm.BatchNorm2d)
    assert net(torch.rand(3, *shape)).shape == (3, 10)
    with pytest.raises(ValueError, match="bn placement"):
        models.SmallCNN(shape, bn="middle")


# --------------------------------------------------------------------------------------------
# plots, reports, CLI


def test_plot_primitives_write_pngs(tmp_path):
    fig, axes = plots.new_figure(3)
    plots.curves(axes[0], [0, 1, 2], {"bn": [[0.1, 0.5, None], [0.2, 0.6, 0.7]]})
    plots.grouped_points(axes[1], ["a", "b"], {"bn": [[1, 2], [3, None]], "baseline": [[1], [2]]})
    plots.percentile_bands(axes[2], [1, 2], {"15": [0, 1], "50": [1, 2], "85": [2, 3]})
    p = plots.save_figure(fig, tmp_path / "f.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_primitives_take_runs_that_ended_early(tmp_path):
    """A seed that diverged has fewer points than the axis (noisy-bn's drift and accuracy
    rows used to be ragged, and the figure failed): the missing points are gaps."""
    fig, axes = plots.new_figure(2)
    plots.curves(axes[0], [0, 1, 2, 3], {"bn": [[0.1, 0.5], [0.2, 0.6, 0.7, 0.8]]})
    (line,) = [ln for ln in axes[0].get_lines() if ln.get_label().startswith("bn")]
    np.testing.assert_allclose(line.get_ydata(), [0.15, 0.55, 0.7, 0.8])
    plots.percentile_bands(axes[1], [1, 2, 3], {"15": [0, 1], "50": [1, 2], "85": [2, 3]})
    assert all(len(ln.get_xdata()) == 2 for ln in axes[1].get_lines())
    assert plots.save_figure(fig, tmp_path / "f.png").stat().st_size > 0


def test_combined_report_lists_every_claim(toy, tmp_path):
    path = registry.run_experiment(toy, tmp_path / "a" / "toy", quick=True, log=lambda m: None)
    run = results.load_run(path)
    md, htm = report.write_combined_report(
        tmp_path / "a",
        [(run, [path / "toy.png"])],
        [("broken_exp", "ImportError: x")],
        {"quick": True},
    )
    text = md.read_text()
    assert "Claims (" in text and "the toy network beats chance" in text
    assert "toy/toy.png" in text and "broken_exp" in text and "synthetic" in text
    assert "<table>" in htm.read_text()
    # a quick run says so above the claims table, as each run's own report does
    notice = text.index("**Quick size (`--quick`) for every run")
    assert notice < text.index("## Claims (")
    full = registry.run_experiment(toy, tmp_path / "b" / "toy", log=lambda m: None)
    md, _ = report.write_combined_report(tmp_path / "b", [(results.load_run(full), [])])
    assert "Quick size" not in md.read_text()


def test_cli_interrupt_says_how_to_resume(capsys, tmp_path, monkeypatch):
    from batchnorm.lab import cli as lab_cli

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_cli, "_run_one", interrupted)
    out = tmp_path / "run"
    assert cli_main(["lab", "run", "paper-mnist", "--quick", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"finished parts in {out} are kept" in err and "Traceback" not in err


def test_cli_list_and_errors(capsys, tmp_path):
    assert cli_main(["lab", "list"]) == 0
    assert "paper-mnist" in capsys.readouterr().out
    code = cli_main(
        [
            "lab",
            "run",
            "paper-mnist",
            "--quick",
            "--out",
            str(tmp_path / "x"),
            "--set",
            "nonsense=1",
        ]
    )
    assert code == 2
    assert "unknown config key 'nonsense'" in capsys.readouterr().err
    assert cli_main(["lab", "run", "no-such-experiment"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    afile = tmp_path / "a.txt"
    afile.write_text("keep")
    for out, says in ((afile, "is a file"), (afile / "sub", "cannot create the run folder")):
        assert cli_main(["lab", "run", "paper-mnist", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Choose another --out" in err and "Traceback" not in err
    assert afile.read_text() == "keep"


def test_run_all_says_an_error_shared_by_every_experiment_once(toy, tmp_path, capsys, monkeypatch):
    """``--dataset mnist`` without the files fails every experiment that reads data with the
    same long message: printed once, then named."""
    from batchnorm.lab import cli as lab_cli
    from batchnorm.lab.data import DatasetNotFoundError

    monkeypatch.setattr(
        registry, "_REGISTRY", {n: registry._REGISTRY["toy"] for n in ("toy", "toy2", "toy3")}
    )
    monkeypatch.setattr(registry, "_BROKEN", {})

    def no_data(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "toy3":
            raise ValueError("something else")
        raise DatasetNotFoundError("mnist not found; looked in:\n  - here\n  - there")

    monkeypatch.setattr(lab_cli, "_run_one", no_data)
    assert cli_main(["lab", "run", "all", "--quick", "--out", str(tmp_path / "all")]) == 1
    err = capsys.readouterr().err
    assert err.count("mnist not found") == 1 and "error: toy2: the same error as toy" in err
    assert "error: toy3: ValueError: something else" in err
    assert (tmp_path / "all" / "report.md").read_text().count("mnist not found") == 2


def test_cli_run_all_writes_combined_report(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {"toy": registry._REGISTRY["toy"]})
    monkeypatch.setattr(registry, "_BROKEN", {})
    code = cli_main(["lab", "run", "all", "--quick", "--out", str(tmp_path / "all")])
    assert code == 0
    assert (tmp_path / "all" / "toy" / "summary.json").is_file()
    assert "toy network beats chance" in (tmp_path / "all" / "report.md").read_text()
    out = capsys.readouterr().out
    assert "dataset used: synthetic" in out and "combined report" in out


def test_cli_help_lists_run_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["lab", "run", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--quick", "--seeds", "--dataset", "--data-dir", "--out", "--set", "--download"):
        assert flag in help_text


def test_run_data_paths_are_relative(toy, tmp_path):
    path = registry.run_experiment(toy, tmp_path / "r", quick=True, log=lambda m: None)
    assert str(tmp_path) not in (path / "report.md").read_text().split("## Settings")[0]
    assert Path(path / "toy.png").is_file()


def test_set_refuses_non_finite_numbers_and_the_quick_field():
    for bad in ("lr=nan", "lr=inf", "lr=-inf"):
        with pytest.raises(ConfigError, match="finite"):
            make_config(ToyConfig, sets=[bad])
    with pytest.raises(ConfigError, match="--quick flag"):
        make_config(ToyConfig, quick=True, sets=["quick=false"])


def test_resume_refuses_data_other_than_its_parts_were_computed_on(toy, tmp_path, monkeypatch):
    """The config records what was asked for (a name such as 'auto'); a resumed run must not
    mix parts computed on one dataset with training on another that the same request finds."""
    from batchnorm.lab import data

    out = tmp_path / "run"
    real_load = data.load_dataset
    _interrupted_toy_run(toy, out, monkeypatch)

    def fewer(ds):
        return dataclasses.replace(ds, x_train=ds.x_train[:-10], y_train=ds.y_train[:-10])

    def other_values(ds):  # the same name, source and sizes: files replaced by others
        return dataclasses.replace(ds, x_train=ds.x_train.flip(0))

    for change, says in ((fewer, "computed on synthetic"), (other_values, "other values")):
        monkeypatch.setattr(data, "load_dataset", lambda *a, c=change, **k: c(real_load(*a, **k)))
        with pytest.raises(RunDirConflict, match=says):
            registry.run_experiment(toy, out, quick=True, seeds=2, log=lambda m: None)
        assert not (out / "summary.json").exists() and CALLS["n"] == 2
    monkeypatch.setattr(data, "load_dataset", real_load)  # the same data again: it resumes
    registry.run_experiment(toy, out, quick=True, seeds=2, log=lambda m: None)
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_a_run_that_failed_before_any_result_does_not_block_the_corrected_one(toy, tmp_path):
    out = tmp_path / "run"
    results.RunDir(out).prepare("toy", {"dataset": "mnist"})  # what a failed start leaves
    (out / "parts").mkdir()
    path = registry.run_experiment(toy, out, quick=True, log=lambda m: None)
    assert json.loads((path / "summary.json").read_text())["status"] == "complete"


def test_cli_name_after_set_values(toy, tmp_path, capsys):
    code = cli_main(
        ["lab", "run", "--quick", "--set", "steps=5", "toy", "--out", str(tmp_path / "r")]
    )
    assert code == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["steps"] == 5
    assert cli_main(["lab", "run", "--quick", "--set", "steps=5"]) == 2
    assert "experiment name" in capsys.readouterr().err


def test_cli_run_all_keeps_foreign_files_and_its_report(toy, tmp_path, capsys, monkeypatch):
    from batchnorm.lab import cli as lab_cli

    monkeypatch.setattr(registry, "_REGISTRY", {"toy": registry._REGISTRY["toy"]})
    monkeypatch.setattr(registry, "_BROKEN", {})
    mine = tmp_path / "proj"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    assert cli_main(["lab", "run", "all", "--quick", "--out", str(mine)]) == 2
    assert "holds no report of 'lab run all'" in capsys.readouterr().err
    assert (mine / "report.md").read_text() == "my notes\n" and not (mine / "toy").exists()

    root = tmp_path / "all"
    assert cli_main(["lab", "run", "all", "--quick", "--out", str(root)]) == 0
    good = (root / "report.md").read_text()
    # other settings: every experiment refused (its folder holds another run), report kept
    assert cli_main(["lab", "run", "all", "--quick", "--set", "steps=7", "--out", str(root)]) == 1
    assert "left as it was" in capsys.readouterr().err
    assert (root / "report.md").read_text() == good

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_cli, "_run_one", interrupted)
    assert cli_main(["lab", "run", "all", "--quick", "--out", str(root)]) == 130
    err = capsys.readouterr().err
    assert "resumes from them" in err and "Traceback" not in err


def test_cli_unwritable_run_folder_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    from batchnorm.lab import cli as lab_cli

    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lab_cli, "_run_one", read_only)
    out = tmp_path / "run"
    assert cli_main(["lab", "run", "paper-mnist", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the run's files in {out}: Permission denied" in err


def test_cli_tells_a_timeout_and_other_system_errors_from_write_errors(
    capsys, tmp_path, monkeypatch
):  # type: ignore[no-untyped-def]
    import errno

    from batchnorm.lab import cli as lab_cli

    out = tmp_path / "run"
    argv = ["lab", "run", "sync-bn", "--quick", "--out", str(out)]

    def raising(error: BaseException):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise error

        return run

    # a process group slower than its timeout (TimeoutError is an OSError): its own message
    slow = TimeoutError("sync-bn: local b=2 seed=0 did not finish within 0.5 s (raise ...)")
    monkeypatch.setattr(lab_cli, "_run_one", raising(slow))
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "error: sync-bn: local b=2 seed=0 did not finish" in err and "cannot write" not in err
    # a full disk is a write error, with or without a file name
    monkeypatch.setattr(lab_cli, "_run_one", raising(OSError(errno.ENOSPC, "No space left")))
    assert cli_main(argv) == 2
    assert "cannot write the run's files" in capsys.readouterr().err
    # any other system error is not blamed on the files: it keeps its traceback
    monkeypatch.setattr(lab_cli, "_run_one", raising(ConnectionResetError(104, "reset")))
    with pytest.raises(ConnectionResetError):
        cli_main(argv)


def test_output_to_a_closed_pipe_does_not_stop_the_work():
    import sys

    script = (
        "import sys\n"
        "from batchnorm._console import say\n"
        "for i in range(2000):\n"
        "    say('line %d ' % i + 'x' * 200)\n"
        "print('finished', file=sys.stderr)\n"
    )
    from conftest import run_into_closed_pipe

    proc = run_into_closed_pipe(f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}", 10)
    assert proc.stdout == "line 0 xxx"
    assert "finished" in proc.stderr and "Traceback" not in proc.stderr


def test_the_doctor_table_names_the_seeds_that_ran() -> None:
    # a run with --set seed=5 (two seeds: 5 and 6): its rows say 5 and 6, not list positions
    def entry(gap: float) -> dict[str, object]:
        summary = {"findings": [{"check": "stale-running-stats", "severity": "warning"}]}
        return {
            "before": {**summary, "output_gap": gap},
            "after": {"findings": [], "output_gap": gap / 10},
            "cured": [{"check": "stale-running-stats"}],
        }

    section = report.doctor_section(
        "t", {"BN": [entry(0.5), None], "adabn": [entry(0.2), entry(0.3)]}, [5, 6]
    )
    rows = section["table"]["rows"]
    assert [(r[0], r[1]) for r in rows] == [("BN", 5), ("adabn", 5), ("adabn", 6)]
    assert rows[2][2] == "stale-running-stats" and rows[2][4] == "none"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["small-batch", "--set", "group_sizes=1,16"], "a group of 1 sample gives the hidden"),
        (["placement", "--set", "activations=relu,relu"], "activations lists relu more than once"),
        (["paper-mnist", "--set", "lr_grid=0.3,0.1,0.3"], "lr_grid lists 0.3 more than once"),
        (["sync-bn", "--set", "per_replica_batches=2,2"], "per_replica_batches lists 2 more"),
        (["placement", "--set", "lr=1e39"], "lr must be within float32's range"),
        (["smoothness", "--set", "lr=1e39"], "lr must be within float32's range"),
        (["initialization", "--set", "seed=18446744073709551615"], "seed must be from"),
        (["ics", "--seeds", "3", "--set", f"seed={2**62 - 1}"], "seed must be from"),
    ],
)
def test_settings_that_would_fail_mid_run_are_refused_before_it(argv, message, capsys, tmp_path):  # type: ignore[no-untyped-def]
    # each of these trained for minutes before failing with a traceback (a batch of one value,
    # an optimizer's float32 overflow, a seed past the generators' range), or ran an arm twice
    # and counted its claims twice
    out = tmp_path / "run"
    assert cli_main(["lab", "run", *argv, "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_percentile_bands_draw_only_the_median_solid_and_empty_axes_say_why(tmp_path):
    fig, axes = plots.new_figure(3)
    plots.percentile_bands(axes[0], [1, 2], {"15": [0, 1], "85": [2, 3]})
    plots.percentile_bands(axes[1], [1, 2], {"15": [0, 1], "50": [1, 2], "85": [2, 3]})
    styles = [{line.get_label(): line.get_linestyle() for line in ax.lines} for ax in axes[:2]]
    assert styles[0] == {"15th": "--", "85th": "--"}  # no median: no line drawn as one
    assert styles[1] == {"15th": "--", "50th": "-", "85th": "--"}
    # every run diverged before its first measurement: the axis says so, no empty legend
    plots.curves(axes[2], [0, 10], {"bn": [[None, None]], "none": [[None, None]]})
    assert any("no finite values" in t.get_text() for t in axes[2].texts)
    assert axes[2].get_legend() is None
    plots.save_figure(fig, tmp_path / "f.png")


def test_noisy_bn_percentile_panels_use_the_arms_colors(monkeypatch, tmp_path):
    from batchnorm.lab.experiments import noisy_bn

    drawn: dict[str, str] = {}
    curve_colors: dict[str, str] = {}

    def bands(ax, x, percentiles, *, color, title, **kw):  # type: ignore[no-untyped-def]
        drawn[title.split(":")[0]] = color

    def curves(ax, x, groups, **kw):  # type: ignore[no-untyped-def]
        for i, name in enumerate(groups):
            curve_colors[name] = plots.color_for(name, i)

    monkeypatch.setattr(plots, "percentile_bands", bands)
    monkeypatch.setattr(plots, "curves", curves)
    arms = list(noisy_bn.ARMS)
    series = {
        "steps": [0],
        "probe_steps": [0, 1],
        "acc": {a: [[0.5]] for a in arms},
        "drift": {a: [[0.1]] for a in arms},
        "quantiles": {a: [[0.0, 1.0], [0.0, 1.0]] for a in arms},
        "levels": [0.15, 0.85],
    }
    run = type("Run", (), {"series": series})()
    noisy_bn.figures(run, tmp_path)  # type: ignore[arg-type]
    assert drawn == {"standard": curve_colors["standard"], "noisy-BN": curve_colors["noisy-BN"]}


def test_evaluation_of_a_half_model_sums_its_loss_in_float32() -> None:
    """A float16 sum over 10000 samples at a loss of 7 is inf: the run was marked diverged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 1000)).half()
    x, y = torch.randn(10000, 20).half(), torch.randint(0, 1000, (10000,))
    _, loss = train.evaluate(net, x, y)
    _, ref = train.evaluate(net.float(), x.float(), y)
    assert math.isfinite(loss) and loss == pytest.approx(ref, rel=1e-2)


def test_a_list_setting_with_an_empty_item_is_refused() -> None:
    # "32,,32" ran as (32, 32): an item left out, dropped without a word
    from batchnorm.lab.config import ConfigError, parse_value

    assert parse_value("32, 64", tuple[int, ...], "hidden") == (32, 64)
    for text in ("32,,32", "32,", ",32"):
        with pytest.raises(ConfigError, match=r"^hidden: .* has an empty item"):
            parse_value(text, tuple[int, ...], "hidden")


def test_lab_run_all_refuses_a_bad_setting_before_running_anything(capsys, tmp_path):
    # each experiment refused it in turn, a combined report of no claims was written, exit 1
    root = tmp_path / "all"
    argv = ["lab", "run", "all", "--quick", "--set", "steps=-1", "--out", str(root)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "nothing was run" and not root.exists()
    assert any(line.startswith("error: ") and "steps must be >= 1, got -1" in line for line in err)
    assert any("ics: steps, dln_steps and probe_every must be >= 1" in line for line in err)


def test_a_lab_size_beyond_the_memory_is_one_line(capsys, tmp_path):
    argv = ["lab", "run", "placement", "--quick", "--dataset", "synthetic"]
    assert cli_main([*argv, "--set", "hidden=1000000000", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "need more memory than this machine has" in err and "Traceback" not in err


def _covered_by_legend(fig, ax) -> int:  # type: ignore[no-untyped-def]
    """How many data points of ``ax`` its legend box covers: points along every drawn line,
    its markers, and points along every error bar (sampled in display coordinates)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection

    canvas = FigureCanvasAgg(fig)  # (a saved figure is closed: its canvas no longer draws)
    canvas.draw()
    box = ax.get_legend().get_window_extent(canvas.get_renderer())
    t = np.linspace(0, 1, 30)[:, None]
    pts = []
    for line in ax.get_lines():
        xy = ax.transData.transform(np.column_stack(line.get_data()).astype(float))
        if line.get_linestyle() not in ("None", ""):
            pts += [a + t * (b - a) for a, b in zip(xy[:-1], xy[1:])]
        if line.get_marker() not in (None, "None", ""):
            pts.append(xy)
    for c in ax.collections:
        if isinstance(c, LineCollection):
            for seg in c.get_segments():
                s = ax.transData.transform(seg)
                pts += [a + t * (b - a) for a, b in zip(s[:-1], s[1:])]
    allp = np.concatenate(pts)
    allp = allp[np.isfinite(allp).all(axis=1)]
    return int(sum(box.contains(x, y) for x, y in allp))


def test_plot_legends_cover_no_data_and_stay_in_the_image(tmp_path):
    """matplotlib's "best" place hid a median line under its own legend (paper-mnist's panel
    (c)), error bars (its "best" ignores them: dropout's gap panel) and the learning-rate
    arms' curves under eight entries."""
    rng = np.random.default_rng(0)
    x = list(range(0, 301, 25))
    fig, axes = plots.new_figure(3, size=(4.4, 3.5))
    med = (0.1 * rng.standard_normal(len(x))).tolist()
    plots.percentile_bands(axes[0], x, {"15": [-1.2] * len(x), "50": med, "85": [1.2] * len(x)})
    plots.grouped_points(
        axes[1],
        ["p=0", "p=0.2", "p=0.5"],
        {
            "no BN": [[0.0983, 0.0367], [0.0933, 0.035], [0.08, 0.04]],
            "BN": [[0.0633, 0.055], [0.0483, 0.06], [0.0517, 0.0867]],
            "BN, dropout last": [[None], [0.0567, 0.055], [0.0467, 0.05]],
        },
    )
    groups = {f"arm {k}": [list(rng.uniform(0, 1, len(x)))] for k in range(8)}
    plots.curves(axes[2], x, groups)
    plots.save_figure(fig, tmp_path / "f.png")
    image = fig.bbox
    for ax in axes:
        assert _covered_by_legend(fig, ax) == 0, ax.get_legend().get_texts()[0].get_text()
        box = ax.get_legend().get_window_extent()
        assert image.x0 <= box.x0 and box.x1 <= image.x1 and image.y0 <= box.y0
        assert box.y1 <= image.y1


def test_noisy_bn_drift_panel_reads_both_compared_arms(monkeypatch, tmp_path):
    """standard+noise drifts ten times more than the arms the stability claim compares
    (standard 1.2, noisy BN 0.29, BN 0.009): on a linear axis it flattened them together."""
    from batchnorm.lab.experiments import noisy_bn

    seen = []
    orig = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: seen.append(fig) or orig(fig, path))
    arms = list(noisy_bn.ARMS)
    level = {"standard": 1.2, "BN": 0.009, "noisy-BN": 0.29, "standard+noise": 3.5}
    series = {
        "steps": [0, 20, 40],
        "probe_steps": [0, 20, 40],
        "acc": {a: [[0.1, 0.5, 0.8]] for a in arms},
        "drift": {a: [[level[a], level[a]]] for a in arms},
        "quantiles": {a: [[0.0, 1.0]] * 3 for a in arms},
        "levels": [0.15, 0.85],
    }
    noisy_bn.figures(type("Run", (), {"series": series})(), tmp_path)  # type: ignore[arg-type]
    drift = seen[0].axes[1]
    assert drift.get_yscale() == "log"
    low, high = drift.get_ylim()
    assert low <= level["BN"] and level["standard+noise"] <= high


def test_format_value_keeps_list_items_with_commas_apart():
    """recalibration's four AdaBN shifts read as eight items beside four accuracies."""
    shifts = ["contrast 1, brightness 0", "contrast 0.5, brightness 0.4"]
    text = report.format_value({"shifts": shifts, "source_acc": [0.52, 0.23]})
    assert text == (
        'shifts=["contrast 1, brightness 0", "contrast 0.5, brightness 0.4"], '
        "source_acc=[0.52, 0.23]"
    )
    assert report.format_value(["a", "b"]) == "[a, b]"  # nothing to tell apart: as they were
    assert report.format_value([[1, 2], [3]]) == "[[1, 2], [3]]"
