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
            and int(r["step"]) > 0
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
        diff, spread = np.mean(bn) - np.mean(base), np.std(bn) + np.std(base)
        assert hi["verdict"] is bool(diff > 0 and diff > spread)

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
        # step 0 (the untrained network) never counts as reaching the target, and BN's curve
        # is averaged over as many evaluations as the target
        after = [(st, v) for st, v in zip(steps, curve) if st > 0]
        smooth = [
            (after[i][0], np.mean([v for _, v in after[i - window + 1 : i + 1]]))
            for i in range(window - 1, len(after))
        ]
        reach = next((st for st, v in smooth if v >= target), None)
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


# --------------------------------------------------------------------------------------------
# claim rules on constructed measurements (no training)


def _cfg(**sets):
    from batchnorm.lab.config import make_config

    return make_config(pm.PaperMnistConfig, quick=True, sets=sets)  # steps 300, eval every 50


def _fake_run(accs, *, diverge_at=None, drift=0.5):
    """One seed's saved run: ``accs`` at steps 0, 50, 100, …; ``diverge_at``: the loss became
    non-finite at that step (the last row then has no metrics, as train.train writes it)."""
    rows = [{"step": 50 * i, "test_acc": a} for i, a in enumerate(accs)]
    run = {"rows": rows, "diverged": diverge_at is not None, "seconds": 1.0}
    if diverge_at is not None:
        rows.append({"step": diverge_at, "train_loss": None})
    if drift is not None:
        run["percentiles"] = {"drift": drift}
    return run


def _claims(baseline, bn, **sets):
    claims, arms = pm._compare(
        _cfg(**sets), "shared", {"baseline": 3.0, "bn": 0.3}, {"baseline": baseline, "bn": bn}, [0]
    )
    return {c.id.rsplit("-", 1)[0]: c for c in claims}, arms


def test_faster_does_not_count_step_0():
    # the baseline ends at chance; the untrained BN net is a little above it at step 0, but BN
    # only gets there again (after training) at step 150 > the budget 300 / 4
    base = [_fake_run([0.1] * 7)]
    bn = [_fake_run([0.12, 0.05, 0.08, 0.5, 0.9, 0.9, 0.9])]
    c, _ = _claims(base, bn)
    fa = c["faster"]
    assert fa.measured["bn_steps_to_it"] == 150 and fa.measured["bn_steps_per_seed"] == [150]
    assert fa.verdict is False
    assert fa.measured["fraction_of_steps"] == 0.5
    # reached at the first evaluation after the start (a window of one): supported
    bn1 = [_fake_run([0.1, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9])]
    c, _ = _claims(base, bn1, final_window=1)
    assert c["faster"].measured["bn_steps_to_it"] == 50 and c["faster"].verdict is True


def test_only_the_baseline_diverged_ranks_it_lowest():
    base = [_fake_run([0.1, 0.2], diverge_at=73, drift=0.01)]
    bn = [_fake_run([0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3], drift=0.4)]
    c, arms = _claims(base, bn, final_window=1)
    assert arms["baseline"]["diverged"] == 1
    assert c["higher"].verdict is True  # BN finished: at or above a diverged baseline
    assert c["faster"].verdict is True and c["faster"].measured["bn_steps_to_it"] == 50
    assert c["stable"].verdict is True  # a diverged arm counts as the largest drift
    for claim in c.values():
        assert claim.measured["diverged"] == "baseline diverged in 1 of 1 seeds (ranks lowest)"
    assert c["higher"].measured["difference"] is None
    assert c["faster"].measured["baseline_final_acc"] is None  # no -inf in summary.json
    # one diverged seed of two is enough: the seed-mean of a run that scored -inf is -inf
    base2 = [_fake_run([0.1, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]), *base]
    bn2 = bn * 2
    c, _ = _claims(base2, bn2, final_window=1)
    assert c["higher"].verdict is True
    assert c["higher"].measured["diverged"].startswith("baseline diverged in 1 of 2 seeds")


def test_only_bn_diverged_is_not_supported():
    base = [_fake_run([0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3], drift=0.4)]
    bn = [_fake_run([0.1, 0.9], diverge_at=60, drift=0.01)]
    c, _ = _claims(base, bn)
    assert c["higher"].verdict is False and c["stable"].verdict is False
    # it was above the baseline's final accuracy before it diverged: a diverged BN ranks
    # lowest, so it is not "faster" either
    assert c["faster"].measured["bn_steps_to_it"] is None and c["faster"].verdict is False
    assert c["faster"].measured["bn_steps_per_seed"] == [None]
    assert c["higher"].measured["diverged"] == "bn diverged in 1 of 1 seeds (ranks lowest)"


def test_both_diverged_supports_nothing():
    base = [_fake_run([0.1, 0.2], diverge_at=60, drift=0.5)]
    bn = [_fake_run([0.1, 0.3], diverge_at=70, drift=0.1)]
    c, _ = _claims(base, bn)
    assert [claim.verdict for claim in c.values()] == [False, False, False]
    for claim in c.values():
        assert "both arms diverged: not supported" in claim.measured["diverged"]
    assert c["faster"].measured["bn_steps_to_it"] is None


def test_faster_needs_the_target_held_over_the_final_window() -> None:
    """One evaluation above the baseline's final accuracy (a mean of three) is not a level
    reached: BN's curve is averaged over three evaluations too."""
    base = [_fake_run([0.1, 0.5, 0.6, 0.8, 0.8, 0.8, 0.8])]  # final 0.8
    spike = [_fake_run([0.1, 0.6, 0.85, 0.7, 0.7, 0.82, 0.84])]  # one evaluation above at 100
    c, _ = _claims(base, spike, speedup=1)
    assert c["faster"].measured["bn_steps_to_it"] is None and c["faster"].verdict is False
    level = [_fake_run([0.1, 0.6, 0.85, 0.8, 0.82, 0.82, 0.84])]  # mean of 3 >= 0.8 at 200
    c, _ = _claims(base, level, speedup=1)
    assert c["faster"].measured["bn_steps_to_it"] == 200 and c["faster"].verdict is True


def test_final_accuracy_never_includes_step_0() -> None:
    # two evaluations after the start, a window of three: the final is their mean, not with 0.1
    assert pm._final([{"step": s, "test_acc": a} for s, a in ((0, 0.1), (50, 0.7), (100, 0.8))],
                     "test_acc", 3) == pytest.approx(0.75)  # fmt: skip


def test_higher_needs_more_than_the_seed_spread() -> None:
    base = [_fake_run([0.1, 0.8, 0.8, 0.8], drift=0.2), _fake_run([0.1, 0.9, 0.9, 0.9], drift=0.2)]
    close = [_fake_run([0.1, 0.86, 0.86, 0.86]), _fake_run([0.1, 0.86, 0.86, 0.86])]
    c, _ = _claims(base, close)  # 0.86 vs 0.85 ± 0.05: within the spread
    assert c["higher"].verdict is False and c["higher"].measured["spread"] == pytest.approx(0.05)
    far = [_fake_run([0.1, 0.95, 0.95, 0.95]), _fake_run([0.1, 0.95, 0.95, 0.95])]
    c, _ = _claims(base, far)
    assert c["higher"].verdict is True


def test_nothing_diverged_keeps_the_plain_comparisons():
    base = [_fake_run([0.1, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8], drift=0.2)]
    bn = [_fake_run([0.1, 0.6, 0.7, 0.75, 0.76, 0.77, 0.78], drift=0.3)]
    c, _ = _claims(base, bn)
    assert c["higher"].verdict is False and c["stable"].verdict is False
    assert c["faster"].measured["bn_steps_to_it"] is None and c["faster"].verdict is False
    assert all(claim.measured["diverged"] == "none" for claim in c.values())


def test_measured_learning_rates_read_cleanly():
    from batchnorm.lab.report import format_value

    c, _ = _claims([_fake_run([0.1] * 7)], [_fake_run([0.1] * 7)])
    for claim in c.values():
        text = format_value(claim.measured)
        assert "lr_baseline=3, lr_bn=0.3" in text and "lr=lr" not in text, text


# --------------------------------------------------------------------------------------------
# config validation and part keys


@pytest.mark.parametrize(
    "sets",
    [
        {"batch_size": 0},
        {"batch_size": -5},
        {"probe_size": 0},
        {"hidden": ()},
        {"hidden": (100, 0)},
        {"val_fraction": 0.0},
        {"val_fraction": 1.5},
        {"val_fraction": math.nan},
        {"activation": "foo"},
        {"optimizer": "foo"},
        {"percentiles": (15.0, 50.0, 150.0)},
        {"percentiles": (-1.0, 50.0)},
        {"percentiles": (85.0, 50.0, 15.0)},
        {"percentiles": (15.0, math.nan)},
        {"momentum": -1.0},
        {"momentum": math.inf},
        {"init_std": -1.0},
        {"init_std": math.nan},
        {"lr_grid": (0.1, math.inf)},
        {"lr_grid": (math.nan,)},
        {"shared_lr": math.nan},
        {"speedup": math.inf},
        {"speedup": math.nan},
        {"final_window": 0},
    ],
    ids=repr,
)
def test_config_rejects_bad_values(sets):
    from batchnorm.lab.config import ConfigError

    with pytest.raises(ConfigError):
        _cfg(**sets)


def test_config_accepts_the_defaults_and_good_values():
    default = _cfg()
    assert default.quick is True and default.steps == 300  # the --quick size
    cfg = _cfg(optimizer="adam", activation="relu", percentiles=(0.0, 100.0), shared_lr=None)
    assert (cfg.optimizer, cfg.activation) == ("adam", "relu")
    assert tuple(cfg.percentiles) == (0.0, 100.0) and cfg.shared_lr is None


@pytest.mark.parametrize("bad", ["batch_size=0", "probe_size=0", "hidden=", "percentiles=15,150"])
def test_cli_reports_bad_values_before_training(tmp_path, capsys, bad):
    out = tmp_path / "run"
    args = ["lab", "run", "paper-mnist", "--quick", "--dataset", "digits", "--out", str(out)]
    assert cli_main([*args, "--set", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (out / "parts").exists() or not any((out / "parts").glob("sweep-*"))


def test_batch_larger_than_the_training_split_is_a_clean_error(tmp_path, capsys):
    args = ["lab", "run", "paper-mnist", "--quick", "--dataset", "digits"]
    assert cli_main([*args, "--set", "batch_size=5000", "--out", str(tmp_path / "r")]) == 2
    assert "batch_size=5000 is larger than the" in capsys.readouterr().err


def test_exact_key_is_exact_and_keeps_ordinary_rates_readable():
    assert [pm.exact_key(x) for x in (0.03, 0.3, 1.0, 3.0, 10.0, 1e-4)] == [
        "0.03", "0.3", "1", "3", "10", "0.0001",
    ]  # fmt: skip
    close = [1.0, 1.0000001, 1.00000001, 0.1 + 0.2, 0.3]
    keys = [pm.exact_key(x) for x in close]
    assert len(set(keys)) == len(close)
    assert [float(k) for k in keys] == close


def test_rates_equal_at_6_digits_are_trained_separately(tmp_path):
    from batchnorm.lab.registry import run_experiment

    sets = [
        "lr_grid=1,1.0000001", "shared_lr=1.0000001", "steps=20", "sweep_steps=20",
        "eval_every=5", "hidden=8", "probe_size=50", "final_window=1",
    ]  # fmt: skip
    out = run_experiment(
        "paper-mnist", tmp_path / "r", quick=True, dataset="digits", sets=sets,
        log=lambda m: None, progress=False,
    )  # fmt: skip
    parts = {p.name for p in (out / "parts").glob("*-lr*")}
    for a in pm.ARMS:
        assert f"sweep-{a}-lr1-seed0.json" in parts
        assert f"sweep-{a}-lr1.0000001-seed0.json" in parts
        assert f"full-{pm.PARTS_VERSION}-{a}-lr1.0000001-seed0.json" in parts
    s = json.loads((out / "summary.json").read_text())
    assert set(s["learning_rates"]["sweep"]["bn"]) == {"1", "1.0000001"}
    with open(out / "metrics.csv", newline="") as f:
        lrs = {float(r["lr"]) for r in csv.DictReader(f) if r["phase"] == "sweep"}
    assert lrs == {1.0, 1.0000001}


def test_sweep_figure_says_how_many_evaluations_it_averages(tmp_path, monkeypatch):
    """The y label read "mean of the last evaluations to 100": no count, and "to" a step."""
    from batchnorm.lab import plots
    from batchnorm.lab.experiments import paper_mnist
    from batchnorm.lab.results import RunData

    seen = []
    orig = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: seen.append(fig) or orig(fig, path))
    series = {
        "sweep": {"baseline": {"0.1": 0.5, "1": 0.6}, "bn": {"0.1": 0.7, "1": 0.8}},
        "sweep_steps": 100,
    }
    config = {"final_window": 3, "eval_every": 25, "sweep_steps": 100}
    paper_mnist.figures(RunData(tmp_path, config, {}, [], series), tmp_path)
    label = seen[0].axes[0].get_ylabel()
    assert "mean of the last 3 evaluations up to step 100" in label.replace("\n", " ")
    # fewer evaluations than the window: the count the mean really took
    config = {"final_window": 3, "eval_every": 60, "sweep_steps": 100}
    saved = {"experiment": "paper-mnist", "config": config}  # as config.json holds it
    paper_mnist.figures(RunData(tmp_path, saved, {}, [], series), tmp_path)
    assert "mean of the last 2 evaluations up to step 100" in seen[1].axes[0].get_ylabel().replace(
        "\n", " "
    )
