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


    CONSTANT = 3


    def batches():
        g = torch.Generator().manual_seed(5)
        for _ in range(4):
            yield torch.randn(32, 8, generator=g) * 2 + 1, torch.zeros(32)
    """
)


# tiny models: one torch thread (conftest.one_torch_thread) for the whole module
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
        ("{factory}:not_a_model", "x.pt", "MODULE:FACTORY: .*:not_a_model returned .*, not an nn"),
        ("{factory}:CONSTANT", "x.pt", "MODULE:FACTORY: .*:CONSTANT is an int, not a function"),
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


def one_line_error(capsys) -> str:
    """The whole of stderr, which must be one line (no traceback)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "doctor: doctor:" not in err, err
    return err.strip()


@pytest.fixture
def forget_modules():
    """Names of modules a test imports from its tmp_path, removed from sys.modules after it."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "option, name, says",
    [
        ("--data", "corrupt.pt", "not a torch.save file"),
        ("--data", "trunc.pt", "corrupt or truncated torch file"),
        ("--data", "numpy_in.pt", "holds objects other than tensors"),
        ("--data", "empty.pt", "not a torch.save file"),
        ("--checkpoint", "corrupt.pt", "not a torch.save file"),
        ("--checkpoint", "trunc.pt", "corrupt or truncated torch file"),
        ("--checkpoint", "x.pt", "holds a Tensor, not a state dict"),
        ("--data", "corrupt.npy", "not a NumPy .npy file"),
        ("--data", "trunc.npy", "corrupt or truncated"),
        ("--data", "corrupt.npz", "not a NumPy .npz file"),
        ("--data", "trunc.npz", "corrupt or truncated"),
    ],
)
def test_unreadable_files_are_one_line_naming_option_file_and_reason(
    project, capsys, option, name, says
):
    d = project["dir"]
    (d / "corrupt.pt").write_bytes(b"not a pickle at all")
    (d / "empty.pt").write_bytes(b"")
    (d / "trunc.pt").write_bytes(project["ckpt"].read_bytes()[:700])
    torch.save(np.zeros((64, 8), dtype=np.float32), d / "numpy_in.pt")
    (d / "corrupt.npy").write_bytes(b"not numpy")
    (d / "trunc.npy").write_bytes(project["npy"].read_bytes()[:300])
    (d / "corrupt.npz").write_bytes(b"PK\n")
    (d / "trunc.npz").write_bytes(project["npz"].read_bytes()[:600])
    args = ["--data", str(d / name)] if option == "--data" else ["--data", str(project["npy"])]
    if option == "--checkpoint":
        args += ["--checkpoint", str(d / name)]
    code = doctor_cli(f"{project['factory']}:make_model", *args)
    err = one_line_error(capsys)
    assert code == 2
    assert err.startswith(f"batchnorm doctor: {option}: cannot read {str(d / name)!r} ("), err
    assert says in err, err


def test_a_checkpoint_that_does_not_fit_names_the_option(project, capsys):
    torch.save({"fc.weight": torch.zeros(2, 2)}, project["dir"] / "other.pt")
    code = doctor_cli(
        f"{project['factory']}:make_model",
        "--data",
        str(project["npy"]),
        "--checkpoint",
        str(project["dir"] / "other.pt"),
    )
    assert code == 2
    assert "--checkpoint: " in capsys.readouterr().err


def test_a_syntax_error_in_the_factory_file_is_one_line_with_file_and_line(project, capsys):
    bad = project["dir"] / "syn.py"
    bad.write_text("import torch\n\ndef f(:\n    pass\n")
    code = doctor_cli(f"{bad}:f", "--data", str(project["npy"]))
    err = one_line_error(capsys)
    assert code == 2
    assert f"syntax error in {str(bad)!r}, line 3" in err, err


def test_module_in_the_current_folder_is_found_as_python_would(
    project, capsys, monkeypatch, forget_modules
):
    d = project["dir"]
    (d / "here_model.py").write_text(FACTORY)
    forget_modules += ["here_model"]
    monkeypatch.chdir(d)
    path_before = list(sys.path)
    code = doctor_cli(
        "here_model:make_model",
        "--data",
        "here_model:batches",
        "--checkpoint",
        str(project["ckpt"]),
        "--json",
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["num_batches"] == 4
    assert sys.path == path_before  # put there only while the user's code runs


def test_a_model_file_can_import_a_module_beside_it(project, capsys, monkeypatch, forget_modules):
    sub = project["dir"] / "models"
    sub.mkdir()
    (sub / "beside_defs.py").write_text(FACTORY)
    (sub / "entry.py").write_text(
        "from beside_defs import make_model\n\n\ndef make():\n    return make_model()\n"
    )
    forget_modules += ["beside_defs", "entry"]
    monkeypatch.chdir(project["dir"].parent)  # not the file's folder
    code = doctor_cli(f"{sub / 'entry.py'}:make", "--data", str(project["npy"]), "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["layers"] == ["1"]


@pytest.mark.parametrize(
    "spec, option",
    [("nowhere_mod:make_model", "MODULE:FACTORY"), ("{factory}:make_model", "--data")],
)
def test_a_module_not_found_says_how_to_fix_it(project, capsys, monkeypatch, spec, option):
    monkeypatch.chdir(project["dir"].parent)
    data = "nowhere_mod:batches" if option == "--data" else str(project["npy"])
    code = doctor_cli(spec.format(factory=project["factory"]), "--data", data)
    err = one_line_error(capsys)
    assert code == 2
    assert f"{option}: no module named 'nowhere_mod'" in err, err
    assert "path/to/file.py:" in err and "PYTHONPATH" in err, err


@pytest.mark.parametrize(
    "option, value",
    [
        ("--train-batch-size", "0"),
        ("--train-batch-size", "-3"),
        ("--batch-size", "0"),
        ("--num-batches", "0"),
    ],
)
def test_counts_below_one_are_refused_with_the_option_name(project, capsys, option, value):
    code = doctor_cli(
        f"{project['factory']}:make_model", "--data", str(project["npy"]), option, value
    )
    err = one_line_error(capsys)
    assert code == 2
    assert err == f"batchnorm doctor: {option} must be >= 1, got {value}"


def test_library_messages_lose_their_prefix_on_the_command_line(project, capsys):
    (project["dir"] / "empty_gen.py").write_text("def none():\n    return iter(())\n")
    code = doctor_cli(
        f"{project['factory']}:make_model",
        "--data",
        f"{project['dir'] / 'empty_gen.py'}:none",
    )
    assert code == 2
    assert one_line_error(capsys) == "batchnorm doctor: data yielded no batches"


@pytest.mark.parametrize("fmt", ["npy", "pt", "function"])
def test_a_key_that_names_nothing_is_refused(project, capsys, fmt):
    data = f"{project['factory']}:batches" if fmt == "function" else str(project[fmt])
    code = doctor_cli(f"{project['factory']}:make_model", "--data", data, "--key", "features")
    err = one_line_error(capsys)
    assert code == 2
    assert err.startswith("batchnorm doctor: --key 'features': "), err
    assert "names nothing there" in err or "holds one array" in err, err


def test_npz_without_key_uses_the_only_or_the_input_array_and_refuses_to_guess(project, capsys):
    d = project["dir"]
    x = np.load(project["npy"])
    np.savez(d / "one.npz", whatever=x)
    np.savez(d / "named.npz", y=np.zeros(256), x=x)
    f = f"{project['factory']}:make_model"
    for name in ("one.npz", "named.npz"):
        assert doctor_cli(f, "--data", str(d / name), "--json") == 1
        assert json.loads(capsys.readouterr().out)["layers"] == ["1"]
    assert doctor_cli(f, "--data", str(project["npz"])) == 2
    err = one_line_error(capsys)
    assert "holds arrays ['features', 'y']; choose one with --key" in err, err


@pytest.mark.parametrize("key", ["images", "pixel_values", "input"])
def test_the_command_line_takes_the_input_keys_of_the_python_api(project, capsys, key):
    """A dict or .npz under one of diagnostics.INPUT_KEYS needs no --key, as in doctor()."""
    d = project["dir"]
    x = torch.load(project["pt"])
    torch.save({key: x, "labels": torch.zeros(256)}, d / "keyed.pt")
    np.savez(d / "keyed.npz", labels=np.zeros(256), **{key: x.numpy()})
    f = f"{project['factory']}:make_model"
    for name in ("keyed.pt", "keyed.npz"):
        assert doctor_cli(f, "--data", str(d / name), "--json") == 1
        assert json.loads(capsys.readouterr().out)["layers"] == ["1"]


def test_an_exception_in_the_users_code_says_where_it_came_from(project, capsys):
    d = project["dir"]
    (d / "raising.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make_model():
                raise RuntimeError("boom")

            def batches():
                raise ValueError("no data today")

            def bad_batches():
                yield torch.zeros(4, 8)
                raise OSError("disk gone")
            """
        )
    )
    r, f = f"{d / 'raising.py'}", f"{project['factory']}:make_model"
    cases = (
        (
            [f"{r}:make_model", "--data", str(project["npy"])],
            f"MODULE:FACTORY: make_model() in {r!r} raised RuntimeError: boom",
        ),
        (
            [f, "--data", f"{r}:batches"],
            f"--data: batches() in {r!r} raised ValueError: no data today",
        ),
        (
            [f, "--data", f"{r}:bad_batches"],
            f"--data: the batches of bad_batches() in {r!r} raised OSError while being read",
        ),
    )
    for args, says in cases:
        assert doctor_cli(*args) == 2
        err = one_line_error(capsys)
        assert says in err, err


def test_an_exception_while_importing_the_factory_file_is_one_line(project, capsys):
    bad = project["dir"] / "import_fails.py"
    bad.write_text("raise RuntimeError('config missing')\n")
    assert doctor_cli(f"{bad}:f", "--data", str(project["npy"])) == 2
    err = one_line_error(capsys)
    assert f"importing {str(bad)!r} raised RuntimeError: config missing" in err, err


def test_a_checkpoint_without_bn_buffers_is_loaded_and_diagnosed(project, capsys):
    state = torch.load(project["ckpt"], weights_only=True)
    params = {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}
    path = project["dir"] / "params_only.pt"
    torch.save(params, path)
    code = doctor_cli(
        f"{project['factory']}:make_model", "--data", str(project["pt"]), "--checkpoint", str(path)
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "ERROR   initial-running-stats  [1]" in captured.out
    assert "holds no BN buffers" in captured.err
