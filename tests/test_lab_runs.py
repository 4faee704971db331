"""Run folders under resume: parts are reused only for the code and key that computed them,
damaged files are never trusted, a failed start does not block the corrected command, and a
bug inside a run is not reported as a user's mistake."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from batchnorm.cli import main as cli_main
from batchnorm.lab import registry, results
from batchnorm.lab.config import BaseConfig, ConfigError
from batchnorm.lab.results import Claim, Results, RunContext, RunDir


@dataclass
class RunsToyConfig(BaseConfig):
    steps: int = 20
    fail: str = ""


CALLS = {"n": 0}


def _toy_run(cfg: RunsToyConfig, ctx: RunContext) -> Results:
    ds = ctx.load_dataset("synthetic")
    if cfg.steps > 1000:  # a setting found bad only once the data is there
        raise ConfigError(f"steps={cfg.steps} is too many; use --set steps=20")

    def one(seed: int) -> dict:
        CALLS["n"] += 1
        # a value that depends on the seed and on nothing saved before
        return {"seed": seed, "acc": 0.5 + 0.01 * seed, "steps": cfg.steps}

    finals = []
    for seed in cfg.seed_list():
        part = ctx.cached(f"seed{seed}", lambda seed=seed: one(seed))
        if cfg.fail == "keyerror":
            part["missing"]  # noqa: B018  (a bug in an experiment)
        finals.append(part["acc"])
    m = results.mean_std(finals)
    claim = Claim("toy", "toy claim", m["mean"] > 0.1, {"acc": m})
    return Results(
        [{"arm": "a", "seed": s, "step": 0, "acc": a} for s, a in zip(cfg.seed_list(), finals)],
        {"dataset": ds.info(), "claims": [claim]},
    )


@pytest.fixture
def toy():
    registry.register("runs-toy", config=RunsToyConfig, description="toy")(_toy_run)
    CALLS["n"] = 0
    yield "runs-toy"
    registry._REGISTRY.pop("runs-toy", None)


def _quiet(msg: str) -> None:
    pass


def test_parts_computed_by_other_code_are_recomputed(toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    registry.run_experiment(toy, out, seeds=2, log=_quiet)
    assert CALLS["n"] == 2
    first = json.loads((out / "summary.json").read_text())["claims"]
    (out / "summary.json").unlink()  # an unfinished run, resumed by the same code: reused
    registry.run_experiment(toy, out, seeds=2, log=_quiet)
    assert CALLS["n"] == 2

    (out / "summary.json").unlink()  # the same folder resumed after the code changed
    monkeypatch.setattr(registry, "code_fingerprint", lambda module: "other-code")
    logs: list[str] = []
    registry.run_experiment(toy, out, seeds=2, log=logs.append)
    assert CALLS["n"] == 4  # both parts computed again, none mixed in from the old code
    assert all(any(f"'seed{i}' was computed by other code" in m for m in logs) for i in (0, 1))
    assert json.loads((out / "summary.json").read_text())["claims"] == first
    part = json.loads((out / "parts" / "seed0.json").read_text())
    assert part["code"] == "other-code" and part["key"] == "seed0"


def test_parts_without_a_code_record_are_recomputed(toy, tmp_path):
    """A part written before parts recorded their code."""
    out = tmp_path / "run"
    registry.run_experiment(toy, out, log=_quiet)
    p = out / "parts" / "seed0.json"
    old = json.loads(p.read_text())
    del old["code"]
    old["value"]["acc"] = 0.0  # what that older code computed
    p.write_text(json.dumps(old))
    (out / "summary.json").unlink()
    registry.run_experiment(toy, out, log=_quiet)
    assert CALLS["n"] == 2
    s = json.loads((out / "summary.json").read_text())
    assert s["claims"][0]["measured"]["acc"]["mean"] == 0.5


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_code_fingerprint_follows_the_code_not_its_comments(tmp_path):
    src = tmp_path / "fp_exp_mod.py"
    src.write_text("X = 1\n")
    try:
        _load_module(src, "fp_exp_mod")
        a = registry.code_fingerprint("fp_exp_mod")
        src.write_text("# a comment\nX = 1  # one\n")
        os.utime(src, ns=(1, 1))
        assert registry.code_fingerprint("fp_exp_mod") == a
        src.write_text("X = 2\n")
        os.utime(src, ns=(2, 2))
        assert registry.code_fingerprint("fp_exp_mod") != a
    finally:
        sys.modules.pop("fp_exp_mod", None)


def test_fingerprint_ignores_other_experiments_and_presentation():
    import batchnorm.lab.experiments.placement as placement

    fp = registry.code_fingerprint(placement.__name__)
    assert fp == registry.code_fingerprint(placement.__name__)
    assert fp != registry.code_fingerprint("batchnorm.lab.experiments.dropout")


def test_damaged_part_is_recomputed_not_trusted(toy, tmp_path):
    out = tmp_path / "run"
    registry.run_experiment(toy, out, seeds=2, log=_quiet)
    p = out / "parts" / "seed1.json"
    p.write_text(p.read_text()[:30])  # a truncated file (a copy cut short, a full disk)
    (out / "summary.json").unlink()
    logs: list[str] = []
    registry.run_experiment(toy, out, seeds=2, log=logs.append)
    assert CALLS["n"] == 3
    assert any("'seed1' is unreadable" in m for m in logs)
    assert json.loads(p.read_text())["value"]["acc"] == 0.51


def test_keys_that_share_a_file_name_do_not_share_a_part(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare("x", {})
    ctx = RunContext(rd)
    assert ctx.cached("a|b", lambda: 1) == 1
    assert ctx.cached("a_b", lambda: 2) == 2
    assert ctx.cached("a/b", lambda: 3) == 3
    assert [ctx.cached(k, lambda: -1) for k in ("a|b", "a_b", "a/b")] == [1, 2, 3]


def test_damaged_summary_is_not_taken_for_a_finished_run(toy, tmp_path):
    out = tmp_path / "run"
    registry.run_experiment(toy, out, seeds=2, log=_quiet)
    good = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text('{"schema": 1, "exp')
    assert not RunDir(out).complete
    registry.run_experiment(toy, out, seeds=2, log=_quiet)
    assert CALLS["n"] == 2  # rebuilt from the saved parts
    again = json.loads((out / "summary.json").read_text())
    assert again["claims"] == good["claims"] and again["status"] == "complete"


def test_corrected_command_takes_over_a_run_that_failed_after_loading_its_data(
    toy, tmp_path, capsys
):
    out = tmp_path / "run"
    args = ["lab", "run", toy, "--out", str(out)]
    assert cli_main([*args, "--set", "steps=5000"]) == 2
    assert "steps=5000 is too many" in capsys.readouterr().err
    assert [p.name.startswith("dataset-") for p in (out / "parts").iterdir()] == [True]
    assert cli_main([*args, "--set", "steps=20"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["steps"] == 20
    # the record of the failed start went with it
    assert len(list((out / "parts").glob("dataset-*"))) == 1


def test_a_key_error_inside_a_run_keeps_its_traceback(toy, tmp_path, capsys):
    """Only an unknown experiment name is a one-line user error; a KeyError raised by the
    experiment is a bug, not to be shown as ``error: missing``."""
    with pytest.raises(KeyError, match="missing"):
        cli_main(["lab", "run", toy, "--out", str(tmp_path / "run"), "--set", "fail=keyerror"])
    assert cli_main(["lab", "run", "no-such-exp", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no-such-exp'" in err and "Traceback" not in err


def test_interrupted_run_resumes_to_the_uninterrupted_result(toy, tmp_path, monkeypatch):
    ref = registry.run_experiment(toy, tmp_path / "ref", seeds=3, log=_quiet)
    CALLS["n"] = 0
    real = results.RunContext.cached

    def dies_on_third(self, key, fn):
        if key == "seed2":
            raise KeyboardInterrupt
        return real(self, key, fn)

    monkeypatch.setattr(results.RunContext, "cached", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        registry.run_experiment(toy, tmp_path / "int", seeds=3, log=_quiet)
    monkeypatch.setattr(results.RunContext, "cached", real)
    out = registry.run_experiment(toy, tmp_path / "int", seeds=3, log=_quiet)
    assert CALLS["n"] == 3
    a, b = (json.loads((p / "summary.json").read_text()) for p in (ref, out))
    for s in (a, b):  # (the summary's own digest covers these two, so it differs with them)
        s.pop("runtime_s"), s.pop("finished"), s.pop("summary_sha256")
    assert a == b
    assert (ref / "metrics.csv").read_text() == (out / "metrics.csv").read_text()


@pytest.mark.parametrize("name", ["small-batch", "initialization"])
def test_a_batch_larger_than_the_data_is_a_one_line_error(tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    """small-batch looped forever (hence a subprocess with a time limit); the others raised a
    traceback from the training loop."""
    args = ["lab", "run", name, "--quick", "--dataset", "digits", "--out", str(tmp_path / "r")]
    code = "import sys; from batchnorm.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--set", "batch_size=5000"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 2
    assert "fewer than batch_size=5000" in done.stderr and "Traceback" not in done.stderr


def test_combined_report_takes_the_figures_the_run_report_shows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from batchnorm.lab.cli import report_figures

    (tmp_path / "report.md").write_text("# x\n\n![arms](arms.png)\n", encoding="utf-8")
    for name in ("arms.png", "old-name.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    assert [p.name for p in report_figures(tmp_path)] == ["arms.png"]


def test_fingerprint_covers_the_compiled_node_s_cpp_source(tmp_path):
    # the lab's BN layers train through the C++ node: a change there must not let saved parts
    # of the old code be mixed in
    import batchnorm.lab.experiments.placement as placement

    root, files = registry._fingerprinted(placement.__name__)
    assert "native.cpp" in {f.relative_to(root).as_posix() for f in files}
    cpp = tmp_path / "node.cpp"
    cpp.write_text("int f() { return 1; }  // one\n")
    a = registry._source_digest(str(cpp), 1, 1)
    cpp.write_text("int f() { return 2; }  // one\n")
    assert registry._source_digest(str(cpp), 2, 2) != a


def test_results_hold_arrays_and_tensors_as_lists(tmp_path):
    import numpy as np
    import torch

    from batchnorm.lab.results import RunContext, RunDir, atomic_write_json

    value = {
        "vector": np.arange(3),
        "one": np.array([7]),
        "matrix": torch.tensor([[1.0, float("nan")], [2.0, 3.0]]),
        "scalar": np.float64(0.5),
        "zero_d": torch.tensor(2),
    }
    path = tmp_path / "v.json"
    atomic_write_json(path, value)
    assert json.loads(path.read_text()) == {
        "vector": [0, 1, 2],
        "one": [7],  # a one-element array stays a list
        "matrix": [[1.0, None], [2.0, 3.0]],  # NaN as null, as for floats
        "scalar": 0.5,
        "zero_d": 2,
    }
    rd = RunDir(tmp_path / "run")
    rd.prepare("x", {})
    ctx = RunContext(rd)
    assert ctx.cached("unit", lambda: np.arange(4)) is not None
    assert json.loads(next((tmp_path / "run" / "parts").glob("*.json")).read_text())["value"] == [
        0,
        1,
        2,
        3,
    ]


def _saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:  # type: ignore[type-arg]
    """The figures an experiment's ``figures`` function saves, as they were saved."""
    from batchnorm.lab import plots

    seen: list = []  # type: ignore[type-arg]
    orig = plots.save_figure

    def save(fig, path, dpi=120):  # type: ignore[no-untyped-def]
        seen.append(fig)
        return orig(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", save)
    return seen


def test_dropout_variance_panel_keeps_the_arms_colours_and_shows_the_seeds(
    tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The variance panel drew the BN arm in the no-BN arm's colour and the dropout-last arm
    in BN's, as seed means without error bars although the run had several seeds."""
    from matplotlib.colors import to_hex

    from batchnorm.lab.experiments import dropout

    seen = _saved_figures(monkeypatch)
    layers = ["hidden.0.bn", "hidden.1.bn"]
    per_seed = {
        "BN-p0.5": [
            {k: {"var_ratio": v} for k, v in zip(layers, r)} for r in [(1.0, 0.7), (1.04, 0.8)]
        ],
        "BN-last-p0.5": [
            {k: {"var_ratio": v} for k, v in zip(layers, r)} for r in [(1.0, 0.96), (0.98, 0.99)]
        ],
    }
    mean = {
        a: {k: sum(s[k]["var_ratio"] for s in v) / 2 for k in layers} for a, v in per_seed.items()
    }
    series = {
        "rates": [0.0, 0.5],
        "test": {"no BN": [[0.8, 0.82], [0.8, 0.81]], "BN": [[0.9, 0.91], [0.88, 0.9]],
                 "BN, dropout last": [[None], [0.9, 0.92]]},
        "gap": {"no BN": [[0.1, 0.05], [0.08, 0.04]], "BN": [[0.06, 0.05], [0.05, 0.06]],
                "BN, dropout last": [[None], [0.05, 0.04]]},
        "var_ratio": {"dropout before BN": mean["BN-p0.5"], "dropout after last BN": mean["BN-last-p0.5"]},
    }  # fmt: skip
    run = results.RunData(tmp_path, {}, {"variance_shift": per_seed}, [], series)
    dropout.figures(run, tmp_path)
    acc, _, shift = seen[0].axes

    def colours(ax):  # type: ignore[no-untyped-def]
        return {c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers}

    arm = colours(acc)
    assert colours(shift) == {
        "dropout before BN": arm["BN"],
        "dropout after last BN": arm["BN, dropout last"],
    }
    for c in shift.containers:  # ±1 std over the two seeds, per layer
        (bars,) = c.lines[2]
        heights = [abs(seg[1][1] - seg[0][1]) for seg in bars.get_segments()]
        assert len(heights) == len(layers) and all(h > 0 for h in heights)


def test_combined_report_keeps_the_run_report_s_figure_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """paper-mnist's report shows tuned, shared, sweep: the combined one sorted them by name."""
    from batchnorm.lab.cli import report_figures

    names = ["paper-mnist-tuned.png", "paper-mnist-shared.png", "paper-mnist-sweep.png"]
    text = "".join(f"![{n}]({n})\n\n" for n in names) + f"again: ![x]({names[0]})\n"
    (tmp_path / "report.md").write_text(text, encoding="utf-8")
    for name in names:
        (tmp_path / name).write_bytes(b"\x89PNG")
    assert [p.name for p in report_figures(tmp_path)] == names
