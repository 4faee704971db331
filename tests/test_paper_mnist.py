"""paper-mnist (Figure 1): a --quick run through the CLI, then the produced files and every
number in summary.json recomputed from metrics.csv."""

import csv
import json
import math

import numpy as np
import pytest

from batchnorm.cli import main as cli_main
from batchnorm.lab import data
from batchnorm.lab.experiments import paper_mnist as pm


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run, 2 seeds, ``--dataset auto`` with no MNIST/Fashion-MNIST visible."""
    tmp = tmp_path_factory.mktemp("pm")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
    mp.delenv(data.ENV_DATA_DIR, raising=False)
    mp.setattr(data, "SYSTEM_DATA_ROOT", tmp / "none")
    out = tmp / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(["lab", "run", "paper-mnist", "--quick", "--seeds", "2", "--out", str(out)])
    mp.undo()
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, summary, rows, buf.getvalue()


def _f(x):
    return None if x in ("", None) else float(x)


def test_files_and_dataset_are_reported(quick_run):
    out, s, _, stdout = quick_run
    for name in (
        "config.json",
        "metrics.csv",
        "series.json",
        "summary.json",
        "report.md",
        "report.html",
        "paper-mnist-tuned.png",
        "paper-mnist-shared.png",
        "paper-mnist-sweep.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "paper-mnist-tuned.png").read_bytes()[:4] == b"\x89PNG"
    # auto fell back to digits, and says so everywhere
    assert s["dataset"]["name"] == "digits" and s["dataset"]["requested"] == "auto"
    assert "dataset: digits" in stdout and "dataset used: digits" in stdout
    assert "**digits**" in (out / "report.md").read_text()
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["optimizer"] == "sgd" and cfg["init_std"] > 0 and cfg["quick"] is True
    assert s["seeds"] == [0, 1] and s["command"].startswith("batchnorm lab run paper-mnist")


def test_learning_rates_chosen_on_validation_only(quick_run):
    _, s, rows, _ = quick_run
    sweep = [r for r in rows if r["phase"] == "sweep"]
    assert sweep and all(r["test_acc"] in ("", None) for r in sweep)  # never the test set
    window = s["config"]["final_window"]
    for arm in pm.ARMS:
        scores = {}
        for lr in s["config"]["lr_grid"]:
            vals = [_f(r["val_acc"]) for r in sweep if r["arm"] == arm and float(r["lr"]) == lr]
            vals = [v for v in vals if v is not None]
            scores[lr] = float(np.mean(vals[-window:]))
        best = max(scores.values())
        assert s["learning_rates"]["chosen"][arm] == min(
            lr for lr, v in scores.items() if v == best
        )
    assert s["learning_rates"]["shared"] == s["config"]["shared_lr"] == 0.1
    assert s["arms"]["baseline @ shared lr"]["lr"] == 0.1
    assert s["arms"]["bn @ shared lr"]["lr"] == s["learning_rates"]["shared"]


def _finals(rows, protocol, arm, window):
    out = []
    for seed in ("0", "1"):
        acc = [
            _f(r["test_acc"])
            for r in rows
            if r["phase"] == "full"
            and r["protocol"] == protocol
            and r["arm"] == arm
            and r["seed"] == seed
        ]
        out.append(float(np.mean([a for a in acc if a is not None][-window:])))
    return out


def test_claims_are_computed_from_the_measurements(quick_run):
    _, s, rows, _ = quick_run
    claims = {c["id"]: c for c in s["claims"]}
    assert set(claims) == {
        f"{k}-{p}" for k in ("faster", "higher", "stable") for p in ("tuned", "shared")
    }
    window = s["config"]["final_window"]
    for protocol in ("tuned", "shared"):
        base = _finals(rows, protocol, "baseline", window)
        bn = _finals(rows, protocol, "bn", window)
        hi = claims[f"higher-{protocol}"]
        assert hi["measured"]["baseline_final_acc"]["values"] == pytest.approx(base)
        assert hi["measured"]["bn_final_acc"]["values"] == pytest.approx(bn)
        assert hi["verdict"] is bool(np.mean(bn) >= np.mean(base))

        fa = claims[f"faster-{protocol}"]
        target = fa["measured"]["baseline_final_acc"]
        assert target == pytest.approx(np.mean(base))
        steps = sorted(
            {
                int(r["step"])
                for r in rows
                if r["phase"] == "full" and r["protocol"] == protocol and r["arm"] == "bn"
            }
        )
        curve = [
            np.mean(
                [
                    _f(r["test_acc"])
                    for r in rows
                    if r["phase"] == "full"
                    and r["protocol"] == protocol
                    and r["arm"] == "bn"
                    and int(r["step"]) == st
                ]
            )
            for st in steps
        ]
        reach = next((st for st, v in zip(steps, curve) if v >= target), None)
        assert fa["measured"]["bn_steps_to_it"] == reach
        budget = s["config"]["steps"] / s["config"]["speedup"]
        assert fa["verdict"] is (reach is not None and reach <= budget)

        st = claims[f"stable-{protocol}"]
        b, n = st["measured"]["baseline_drift"], st["measured"]["bn_drift"]
        assert len(b["values"]) == 2 and all(v >= 0 for v in b["values"] + n["values"])
        assert st["verdict"] is bool(n["mean"] < b["mean"])
        assert st["seeds"] == [0, 1] and st["source"].startswith("Ioffe & Szegedy 2015")
    for arm in ("baseline", "bn", "baseline @ shared lr", "bn @ shared lr"):
        a = s["arms"][arm]
        assert a["best_accuracy"]["mean"] >= a["final_accuracy"]["mean"] - 1e-12
        assert a["final_accuracy"]["n"] == 2


def test_report_states_each_verdict_with_numbers(quick_run):
    out, s, _, _ = quick_run
    md = (out / "report.md").read_text()
    for c in s["claims"]:
        assert c["statement"] in md
    assert md.count("**supported**") + md.count("**not supported**") == len(s["claims"])
    assert "![paper-mnist-tuned](paper-mnist-tuned.png)" in md
    assert "Learning-rate sweep" in md and "drift" in md
    assert "<img" in (out / "report.html").read_text()


def test_rerun_same_out_reuses_and_other_config_is_refused(quick_run, capsys):
    out = quick_run[0]
    before = (out / "summary.json").read_bytes()
    args = ["lab", "run", "paper-mnist", "--quick", "--seeds", "2", "--out", str(out)]
    assert cli_main(args) == 0  # finished: nothing retrained, report re-rendered
    assert "already holds this finished run" in capsys.readouterr().out
    assert cli_main([*args, "--set", "steps=301"]) == 2
    assert "steps: 300 there vs 301 now" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before


def test_drift_measure():
    t = np.linspace(0, 1, 5)
    steady = np.tile(np.array([-1.0, 0.0, 1.0])[None, :, None], (5, 1, 2))  # (T, Q, U)
    assert pm.drift_per_unit(steady).tolist() == [0.0, 0.0]
    moving = steady.copy()
    moving[:, :, 0] += (t * 4)[:, None]  # unit 0 shifts by 4 = 2 spreads over training
    d = pm.drift_per_unit(moving)
    # mean_t |4 t - 4| / spread 2 = 4 * mean(1 - t) / 2 = 1
    assert math.isclose(d[0], 1.0) and d[1] == 0.0


def test_pick_lr_prefers_best_then_smaller_and_skips_diverged():
    assert pm._pick_lr({0.1: 0.5, 1.0: 0.9, 3.0: None}) == 1.0
    assert pm._pick_lr({0.1: 0.9, 1.0: 0.9}) == 0.1
    assert pm._pick_lr({0.1: None, 1.0: 0.2}) == 1.0


def test_sigmoid_inputs_are_recorded_as_in_training_without_touching_running_stats():
    import copy

    import torch

    from batchnorm.lab.models import MLP

    torch.manual_seed(0)
    net = MLP(12, (8, 8), 3, bn="before")
    net.train()
    net(torch.randn(50, 12) * 3 + 1)  # running statistics away from their initial values
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe = torch.randn(40, 12)
    twin = copy.deepcopy(net).train()
    with torch.no_grad():
        want = twin(probe)  # training-mode output (batch statistics of the probe)
    got = pm.batch_stats_forward(net, probe)
    torch.testing.assert_close(got, want)
    assert not net.training  # mode restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched
