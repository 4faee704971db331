"""``batchnorm doctor MODULE:FACTORY --data ...``: loads a model from a factory (and a
checkpoint), data from .pt/.npy/.npz files or a MODULE:FUNCTION, prints the report, and exits
non-zero when a finding of severity error exists."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.cli import main

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
        )


    def make_keras_momentum():
        m = make_model()
        m[1].momentum = 0.99
        return m


    def not_a_model():
        return 3


    def batches():
        g = torch.Generator().manual_seed(5)
        for _ in range(4):
            yield torch.randn(32, 8, generator=g) * 2 + 1, torch.zeros(32)
    """
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Path]:
    """A factory file, input files in three formats and the checkpoint of a calibrated model."""
    factory = tmp_path / "netdef.py"
    factory.write_text(FACTORY)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g) * 2 + 1
    torch.save(x, tmp_path / "x.pt")
    torch.save({"inputs": x, "labels": torch.zeros(256)}, tmp_path / "xd.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    np.savez(tmp_path / "x.npz", features=x.numpy(), y=np.zeros(256))
    # a checkpoint whose running statistics come from the same distribution
    ns: dict = {}
    exec(FACTORY, ns)
    model = ns["make_model"]()
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = None  # cumulative average: exact population statistics
        for xb in torch.split(torch.randn(2048, 8, generator=g) * 2 + 1, 64):
            model(xb)
    torch.save(model.state_dict(), tmp_path / "good.pt")
    return {
        "dir": tmp_path,
        "factory": factory,
        "pt": tmp_path / "x.pt",
        "ptdict": tmp_path / "xd.pt",
        "npy": tmp_path / "x.npy",
        "npz": tmp_path / "x.npz",
        "ckpt": tmp_path / "good.pt",
    }


def doctor_cli(*args: str) -> int:
    return main(["doctor", *args])


def test_fresh_model_is_an_error(project, capsys):
    code = doctor_cli(f"{project['factory']}:make_model", "--data", str(project["pt"]))
    out = capsys.readouterr().out
    assert code == 1
    assert "ERROR   initial-running-stats  [1]" in out
    assert "batchnorm.recalibrate(model, data)" in out


@pytest.mark.parametrize("fmt", ["pt", "npy", "npz", "ptdict"])
def test_calibrated_checkpoint_passes_for_every_data_format(project, capsys, fmt):
    extra = ["--key", "features"] if fmt == "npz" else []
    code = doctor_cli(
        f"{project['factory']}:make_model",
        "--data",
        str(project[fmt]),
        "--checkpoint",
        str(project["ckpt"]),
        "--batch-size",
        "32",
        "--json",
        *extra,
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report["findings"]
    assert report["summary"]["error"] == 0 and report["summary"]["warning"] == 0
    assert report["batch_size"] == 32 and report["num_batches"] == 8
    assert report["layers"] == ["1"]


def test_warnings_do_not_fail_but_are_printed(project, capsys):
    code = doctor_cli(
        f"{project['factory']}:make_keras_momentum",
        "--data",
        str(project["npy"]),
        "--checkpoint",
        str(project["ckpt"]),
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "WARNING keras-momentum  [1]" in out
    strict = doctor_cli(
        f"{project['factory']}:make_keras_momentum",
        "--data",
        str(project["npy"]),
        "--checkpoint",
        str(project["ckpt"]),
        "--fail-on",
        "warning",
    )
    assert strict == 1


def test_data_from_a_function_and_small_train_batch(project, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(project["dir"]))
    code = doctor_cli(
        "netdef:make_model",
        "--data",
        "netdef:batches",
        "--checkpoint",
        str(project["ckpt"]),
        "--train-batch-size",
        "4",
        "--json",
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["num_batches"] == 4
    assert [f["check"] for f in report["findings"]] == ["small-count"]
    assert report["findings"][0]["evidence"]["count"] == 4


@pytest.mark.parametrize(
    "spec, data, message",
    [
        ("no_colon", "x.pt", "MODULE:NAME"),
        ("{factory}:missing", "x.pt", "has no attribute"),
        ("{factory}:not_a_model", "x.pt", "not an nn.Module"),
        ("{factory}:make_model", "nothere.npy", "no file"),
        ("{factory}:make_model", "x.csv", "unknown file type"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(project, capsys, spec, data, message):
    import re

    d = project["dir"]
    (d / "x.csv").write_text("1,2\n")
    code = doctor_cli(spec.format(factory=project["factory"]), "--data", str(d / data))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err


def test_key_and_checkpoint_errors_name_the_option(project, capsys):
    f = f"{project['factory']}:make_model"
    d = project["dir"]
    torch.save({"a": torch.zeros(4, 8), "b": torch.zeros(4)}, d / "ab.pt")
    cases = (
        (["--data", str(d / "ab.pt")], "holds a dict ['a', 'b']; choose one with --key"),
        (["--data", str(d / "ab.pt"), "--key", "zz"], "has no entry 'zz' (it has ['a', 'b'])"),
        (["--data", str(project["npz"]), "--key", "zz"], "has no array 'zz'"),
        (["--data", str(project["pt"]), "--checkpoint", str(d / "none.pt")], "--checkpoint: no"),
    )
    for args, says in cases:
        assert doctor_cli(f, *args) == 2
        err = capsys.readouterr().err
        assert says in err, err
        assert not err.startswith('batchnorm doctor: "'), err  # not a KeyError's repr


def test_console_entry_point(project):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchnorm.cli",
            "doctor",
            f"{project['factory']}:make_model",
            "--data",
            str(project["pt"]),
            "--num-batches",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "initial-running-stats" in proc.stdout
    assert "2 batch(es) of 64" in proc.stdout
