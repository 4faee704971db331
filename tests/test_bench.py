"""``batchnorm bench``: structure of the table and the JSON on a tiny run (no speed asserted)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm import bench
from batchnorm.cli import main as cli_main

pytest.importorskip("numba")


def test_parse_case():
    assert bench.parse_case("60x100") == bench.Case((60, 100))
    assert bench.parse_case("2x3x4x5@cl") == bench.Case((2, 3, 4, 5), "channels_last")
    assert bench.parse_case("2x3x4x5x6@cl").layout == "channels_last_3d"
    # int() alone took "1_0" as 10, "+4" and " 4"; an empty "@" suffix was contiguous
    for bad in ("60", "60xa", "0x3", "4x3@cl", "4x3@nhwc", "1x3", "2x3@", "2x1_0", "+4x3", " 4x 3"):
        with pytest.raises(ValueError, match="bench"):
            bench.parse_case(bad)


def test_suite_is_the_documented_one():
    names = [c.name for c in bench.SUITE]
    assert "60x100" in names and "32x64x56x56@cl" in names and "4x32x16x32x32" in names
    assert len(names) == 10


def test_run_and_cli_write_consistent_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    code = cli_main(["bench", "--shapes", "6x5x3x4@cl", "--repeats", "2", "--json", str(path)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| 6x5x3x4 | channels_last |" in table and "ours/roof" in table
    data = json.loads(path.read_text())
    assert data["repeats"] == 2 and data["dtype"] == "float32"
    (case,) = data["cases"]
    assert case["shape"] == [6, 5, 3, 4] and case["numel"] == 360
    for p in bench.PASSES:
        # the ratios are the ratios of the reported medians
        assert math.isclose(case["ours_over_torch"][p], case["ours_s"][p] / case["torch_s"][p])
        roof = case["copy_s"] * bench.PASS_VALUES[p] / 2
        assert math.isclose(case["roofline_s"][p], roof)
        assert math.isclose(case["ours_over_roofline"][p], case["ours_s"][p] / roof)
        fastest = data["summary"][f"{p} geomean speedup vs torch, fastest repeats"]
        assert math.isclose(fastest, case["torch_min_s"][p] / case["ours_min_s"][p])
        assert f"- {p} geomean speedup vs torch, fastest repeats: {fastest:.2f}x" in table
        # the per-channel affine reference, timed in the same rounds
        assert case["affine_s"][p] > 0
        ref = data["summary"][
            f"{p} geomean speedup vs torch of a per-channel affine (no statistics)"
        ]
        assert math.isclose(ref, case["torch_s"][p] / case["affine_s"][p])
    head = next(line for line in table.splitlines() if line.startswith("| shape |"))
    assert head.endswith(" fwd+bwd affine ms |")
    row = next(line for line in table.splitlines() if line.startswith("| 6x5x3x4 |"))
    assert row.endswith(f" {case['affine_s']['fwd+bwd'] * 1e3:.3f} |")
    target = data["targets"]["fwd+bwd no shape slower than torch"]
    assert target["met"] == (case["ours_over_torch"]["fwd+bwd"] <= 1.0)
    assert set(data["machine"]) >= {"cpu", "cores", "loadavg_before", "numba_threads", "busy"}
    assert ("WARNING" in table) == data["machine"]["busy"]
    # the cache size the streaming policy used, said where known
    from batchnorm import kernels

    llc = data["machine"]["llc_bytes"]
    assert llc == kernels.LLC_BYTES
    assert ("MiB last-level cache;" in table) == (llc > 0)
    assert not list(path.parent.glob(".bench-*"))  # the temporary file was renamed away


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 2, 2)])
def test_the_affine_reference_is_one_addcmul_per_channel(shape):
    """The reference layer without statistics computes x·γ + β with γ, β along axis 1 and
    records one node, whose gradients are the affine map's."""
    torch.manual_seed(0)
    m = bench.Affine(shape[1], len(shape), torch.float64)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = m(x)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    torch.testing.assert_close(y, x * m.weight.view(view) + m.bias.view(view))
    assert y.grad_fn is not None and y.grad_fn.name() == "AddcmulBackward0"
    torch.autograd.gradcheck(m, (x,))
    # channels_last keeps its layout
    if len(shape) == 4:
        xc = x.detach().contiguous(memory_format=torch.channels_last)
        assert m(xc).is_contiguous(memory_format=torch.channels_last)


def test_results_saved_before_the_affine_reference_still_print(tmp_path):
    data = bench.run(["7x3"], repeats=1, warmup=1)
    for case in data["cases"]:
        del case["affine_s"]
    table = bench.format_table(data).splitlines()
    row = next(line for line in table if line.startswith("| 7x3"))
    # no case has the affine reference: no column for it (the header and the rows agree)
    assert "affine ms" not in table[0] and row.count("|") == table[0].count("|")
    if bench._has_matplotlib():
        assert os.path.exists(bench.plot(data, tmp_path / "old.png"))


def test_run_python_api_float64():
    before = torch.get_num_threads()
    data = bench.run(["7x3"], repeats=1, warmup=1, dtype=torch.float64, threads=1)
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["numba_threads"] == 1
    assert torch.get_num_threads() == before  # restored
    assert data["dtype"] == "float64"
    assert "(60, 100) training step no slower than torch" not in data["targets"]
    assert bench.format_table(data).count("\n| 7x3 |") == 1
    with pytest.raises(ValueError, match="repeats"):
        bench.run(["7x3"], repeats=0)


def test_plot_and_from_json_read_saved_results(tmp_path, capsys, monkeypatch):
    """--from-json measures nothing: it prints the saved table, and --plot draws it."""
    pytest.importorskip("matplotlib")
    saved = tmp_path / "bench.json"
    assert (
        cli_main(["bench", "--shapes", "7x3", "2x3x4x5@cl", "--repeats", "1", "--json", str(saved)])
        == 0
    )
    measured = capsys.readouterr().out
    data = json.loads(saved.read_text())

    def no_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("--from-json must not measure")

    monkeypatch.setattr(bench, "run", no_run)
    png = tmp_path / "fig" / "bench.png"
    assert cli_main(["bench", "--from-json", str(saved), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert bench.format_table(data) in out and bench.format_table(data) in measured
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(png.parent.glob(".*"))  # written atomically: no temporary file left

    for extra in (
        ["--json", str(tmp_path / "again.json")],
        ["--shapes", "7x3"],
        # options of a measurement, which a saved table would silently not follow
        ["--dtype", "float64"],
        ["--repeats", "99"],
        ["--threads", "1"],
        ["--passes", "eval"],
        ["--warmup", "5"],
        # spelled with their default values, they are given all the same
        ["--dtype", "float32"],
        ["--repeats", "15"],
        ["--processes", "1"],
    ):
        assert cli_main(["bench", "--from-json", str(saved), *extra]) == 2
        err = capsys.readouterr().err
        assert "--from-json measures nothing" in err and extra[0] in err

    bad = tmp_path / "bad.json"
    bad.write_text('{"cases": 3}')
    for path in (bad, tmp_path / "missing.json"):
        assert cli_main(["bench", "--from-json", str(path)]) == 2
        assert f"cannot read --from-json {path}" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    assert cli_main(["bench", "--from-json", str(saved), "--plot", str(png)]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert cli_main(["bench", "--shapes", "7x3", "--plot", str(png)]) == 2  # before run()
    with pytest.raises(RuntimeError, match="plotting needs matplotlib"):
        bench.plot(data, png)


def test_unwritable_outputs_fail_before_measuring_and_writes_lose_no_table(
    tmp_path, capsys, monkeypatch
):
    def no_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("must not measure when an output cannot be written")

    afile = tmp_path / "afile"
    afile.write_text("")
    with monkeypatch.context() as m:
        m.setattr(bench, "run", no_run)
        assert cli_main(["bench", "--shapes", "7x3", "--json", str(afile / "x.json")]) == 2
        assert "cannot write --json" in capsys.readouterr().err
        assert cli_main(["bench", "--shapes", "7x3", "--plot", str(tmp_path)]) == 2
        assert "it is a directory" in capsys.readouterr().err
        # a folder os.access calls writable (root is let in everywhere) is tried for real,
        # and the trial leaves nothing behind
        m.setattr(bench.os, "access", lambda *a, **k: True)
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            if os.geteuid() != 0:  # root writes into a 0o500 folder: /proc stands in for it
                assert cli_main(["bench", "--shapes", "7x3", "--json", str(locked / "x.json")]) == 2
                assert "is not writable" in capsys.readouterr().err
            assert cli_main(["bench", "--shapes", "7x3", "--json", "/proc/x.json"]) == 2
            assert "/proc is not writable" in capsys.readouterr().err
        finally:
            locked.chmod(0o700)
        assert list(tmp_path.glob("**/.batchnorm-write-test-*")) == []
        # errors go to stderr with the command's name once; bad counts fail before measuring
        for bad_args, says in (
            (["--shapes", "abc"], "batchnorm bench: cannot read shape 'abc'"),
            (["--repeats", "0"], "batchnorm bench: --repeats must be >= 1, got 0"),
            (["--warmup", "-1"], "batchnorm bench: --warmup must be >= 0, got -1"),
            (["--threads", "0"], "batchnorm bench: --threads must be in 1.."),
            (["--threads", "999"], "batchnorm bench: --threads must be in 1.."),
            (["--plot", "out.xyz"], "batchnorm bench: --plot out.xyz: cannot write .xyz"),
            # a shape whose tensors cannot fit the memory: before the first shape is measured
            (
                ["--shapes", "7x3", "100000x100000x1000"],
                "batchnorm bench: shape 100000x100000x1000 needs about",
            ),
        ):
            assert cli_main(["bench", *bad_args]) == 2
            captured = capsys.readouterr()
            assert captured.err.startswith(says) and not captured.out

    def failing_write(path, data):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "_write_json_atomic", failing_write)
    path = tmp_path / "new" / "bench.json"  # a directory that does not exist yet is fine
    assert cli_main(["bench", "--shapes", "7x3", "--repeats", "1", "--json", str(path)]) == 2
    captured = capsys.readouterr()
    assert "| 7x3 | contiguous |" in captured.out  # measurements printed before the failure
    assert "No space left on device" in captured.err


def test_saved_results_of_another_shape_and_a_closed_pipe(tmp_path, capsys):
    """--from-json of a file whose entries lack what the table needs is a one-line error; a
    reader that quits (``| head``) neither loses the --json file nor ends in a traceback."""
    import shlex
    import subprocess

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cases": [{"x": 1}]}))
    assert cli_main(["bench", "--from-json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "no usable benchmark data" in err and "Traceback" not in err

    out = tmp_path / "b.json"
    main = "import sys; from batchnorm.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", main, "bench", "--shapes", "7x3", "--repeats", "2"]
    proc = subprocess.run(
        shlex.join([*cmd, "--json", str(out)]) + " | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(out.read_text())["cases"][0]["shape"] == [7, 3]


def test_plot_follows_the_extension(tmp_path):
    pytest.importorskip("matplotlib")
    data = bench.load("docs/bench.json")
    path = bench.plot(data, str(tmp_path / "b.pdf"))
    assert open(path, "rb").read(4) == b"%PDF"


def test_other_share_is_the_cpu_other_processes_used() -> None:
    cores = os.cpu_count() or 1
    # 2 CPU-seconds used by all processes in 1 s, 1.5 of them by this one
    assert bench.other_share((10.0, 1.0, 0.0), (12.0, 2.5, 1.0)) == pytest.approx(0.5 / cores)
    assert bench.other_share(None, (1.0, 1.0, 1.0)) is None


@pytest.mark.skipif(bench.cpu_sample() is None, reason="needs /proc/stat")
def test_other_share_sees_another_process_and_not_this_one() -> None:
    cores = os.cpu_count() or 1
    # CPU seconds, not wall time: on a loaded machine a spinning process gets less than its wall
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\n"
    before = bench.cpu_sample()
    subprocess.run([sys.executable, "-c", spin], check=True)
    after = bench.cpu_sample()
    assert before is not None and after is not None
    share = bench.other_share(before, after)
    wall = after[2] - before[2]
    # the child's 0.8 CPU-seconds are "other" (clock ticks of 10 ms aside; more if others run)
    assert share is not None and share * wall * cores >= 0.7
    before = bench.cpu_sample()
    t = time.process_time()
    while time.process_time() - t < 0.5:  # this process's own work is not "other"
        pass
    after = bench.cpu_sample()
    assert before is not None and after is not None
    wall = after[2] - before[2]
    total = (after[0] - before[0]) / (wall * cores)
    own = (after[1] - before[1]) / (wall * cores)
    assert own * wall * cores >= 0.5
    share = bench.other_share(before, after)
    assert share == pytest.approx(max(0.0, total - own), abs=0.05 / (wall * cores) + 1e-9)


def test_eval_with_gradients_is_timed_on_request(tmp_path, capsys):
    """--passes eval+bwd times BN in eval mode with a backward (ours and torch's modules stay
    in train mode after); the table, summary, targets and plot follow the passes timed."""
    path = tmp_path / "b.json"
    code = cli_main(
        ["bench", "--shapes", "6x5x3x4", "--repeats", "2", "--passes", "eval+bwd", "eval"]
        + ["--json", str(path)]
    )
    assert code == 0
    table = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["passes"] == ["eval", "eval+bwd"]  # the table's order
    (case,) = data["cases"]
    assert set(case["ours_s"]) == {"eval", "eval+bwd"}
    roof = case["copy_s"] * bench.PASS_VALUES["eval+bwd"] / 2
    assert math.isclose(case["roofline_s"]["eval+bwd"], roof)
    assert "eval+bwd ours/torch" in table and "fwd+bwd ours ms" not in table
    assert list(data["targets"]) == ["eval no shape slower than torch"]
    assert "- eval+bwd geomean speedup vs torch: " in table
    # no fwd+bwd affine reference without fwd+bwd: no column of dashes for it
    assert "affine ms" not in table
    if bench._has_matplotlib():
        assert os.path.exists(bench.plot(bench.load(path), tmp_path / "p.png"))
    with pytest.raises(ValueError, match="passes must be some of"):
        bench.run(["7x3"], repeats=1, passes=("bwd",))
    with pytest.raises(SystemExit):
        cli_main(["bench", "--passes", "bwd"])
    # the timed call: eval mode with gradients reaching x, γ and β, train mode after
    m = bench._modules(bench.Case((6, 5)), torch.float32)[0]
    x, dy = torch.randn(6, 5), torch.randn(6, 5)
    bench._calls(m, x, dy)["eval+bwd"]()
    assert m.training and int(m.num_batches_tracked) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_half_precision_dtypes_can_be_benchmarked(capsys):
    """--dtype bfloat16/float16: both modules in that dtype (ours on torch's operator, as
    ``auto`` chooses for half inputs), the dtype named in the footer."""
    for dt in ("bfloat16", "float16"):
        assert cli_main(["bench", "--shapes", "6x5", "--repeats", "1", "--dtype", dt]) == 0
        out = capsys.readouterr().out
        assert "| 6x5 | contiguous |" in out and f"; {dt}, median of 1;" in out


def _fake_run(ratios: dict[str, float], scale: float) -> dict:
    """A saved run of two cases whose times are ``scale`` times a base and whose ratios ours/
    torch are ``ratios`` (per case name), as :func:`bench.run` would save it."""
    results = []
    for name, shape in (("60x100", (60, 100)), ("8x4x5x5", (8, 4, 5, 5))):
        r = ratios[name]
        results.append(
            bench.CaseResult(
                name=name,
                shape=shape,
                layout="contiguous",
                numel=math.prod(shape),
                copy_s=1e-4 * scale,
                copy_gbps=10.0 / scale,
                ours_s={"fwd+bwd": r * 1e-3 * scale},
                torch_s={"fwd+bwd": 1e-3 * scale},
                roofline_s={"fwd+bwd": 2.5e-4 * scale},
                affine_s={"fwd+bwd": 5e-4 * scale},
                ours_over_torch={"fwd+bwd": r},
                ours_over_roofline={"fwd+bwd": 4.0 * r},
                ours_min_s={"fwd+bwd": r * 1e-3 * scale / 2},
                torch_min_s={"fwd+bwd": 1e-3 * scale / 2},
                copy_min_s=1e-4 * scale / 2,
            )
        )
    machine = {"cpu": "test", "cores": 2, "torch": "t", "numba": "n", "python": "p"}
    machine |= {"torch_threads": 2, "numba_threads": 2}
    machine |= {"loadavg_before": [0.1] * 3, "loadavg_after": [0.2 * scale] * 3}
    machine |= {"other_cpu_share": 0.01 * scale, "busy": scale > 2}
    return bench._assemble(results, "2026-01-01T00:00:00", machine, "float32", 5, ("fwd+bwd",))


def test_combine_takes_each_value_as_the_median_over_the_processes():
    """Times and ratios: the median over the processes, case by case; fastest repeats: the
    fastest of all; the targets computed from the medians, each process's kept beside them."""
    runs = [
        _fake_run({"60x100": 0.9, "8x4x5x5": 0.4}, 1.0),
        _fake_run({"60x100": 1.3, "8x4x5x5": 0.5}, 3.0),
        _fake_run({"60x100": 0.8, "8x4x5x5": 0.2}, 2.0),
    ]
    data = bench.combine(runs)
    assert data["processes"] == 3
    small, conv = data["cases"]
    assert small["ours_over_torch"]["fwd+bwd"] == 0.9 and conv["ours_over_torch"]["fwd+bwd"] == 0.4
    assert small["ours_s"]["fwd+bwd"] == pytest.approx(1.6e-3)  # 0.9 ms, 3.9 ms, 1.6 ms
    assert small["copy_s"] == pytest.approx(2e-4) and small["copy_min_s"] == pytest.approx(5e-5)
    assert small["ours_min_s"]["fwd+bwd"] == pytest.approx(0.45e-3)  # the first run's
    assert data["targets"]["fwd+bwd no shape slower than torch"] == {"value": 0.9, "met": True}
    geomean = data["targets"]["fwd+bwd geometric-mean speedup >= 2.0"]["value"]
    assert geomean == pytest.approx(math.sqrt(1 / 0.9 * 1 / 0.4))
    each = [t["fwd+bwd no shape slower than torch"] for t in data["process_targets"]]
    assert each == [0.9, 1.3, 0.8]  # the second process alone would have failed the target
    assert data["machine"]["busy"] is True  # one process shared the CPU: said
    assert data["machine"]["other_cpu_share"] == pytest.approx(0.03)
    table = bench.format_table(data)
    assert "(each process: 0.90 / 1.30 / 0.80)" in table
    assert "median of 5, then over 3 processes" in table
    other = _fake_run({"60x100": 0.9, "8x4x5x5": 0.4}, 1.0)
    other["cases"] = other["cases"][:1]
    with pytest.raises(ValueError, match="different cases"):
        bench.combine([runs[0], other])
    with pytest.raises(ValueError, match="no runs"):
        bench.combine([])


def test_cli_runs_the_benchmark_in_fresh_processes(tmp_path, capsys, monkeypatch):
    """--processes N: N processes one after another, their results combined; the JSON says
    how many and what each measured. (Timed on plain torch here: the child processes need no
    compiled kernels.)"""
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    path = tmp_path / "bench.json"
    argv = ["bench", "--shapes", "7x3", "--repeats", "2", "--passes", "fwd", "eval"]
    assert cli_main([*argv, "--processes", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "process 1 of 2" in out and "process 2 of 2" in out
    assert "then over 2 processes" in out
    data = json.loads(path.read_text())
    assert data["processes"] == 2 and len(data["process_targets"]) == 2
    assert data["passes"] == ["fwd", "eval"] and data["cases"][0]["name"] == "7x3"
    assert "eval no shape slower than torch" in data["process_targets"][1]
    for bad in (["--processes", "0"], ["--processes", "2", "--from-json", str(path)]):
        assert cli_main([*argv, *bad]) == 2
        assert "--processes" in capsys.readouterr().err


def test_cold_sweeps_the_caches_before_every_timed_call(tmp_path, capsys, monkeypatch):
    """--cold: a sweep comes before each timed call, the copy's included, and none inside a
    timed call; the results say so (JSON, table), and the default asks for no sweep (which
    allocates and reads nothing: the next test). (Plain torch: no compiled kernels needed.)"""
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    log: list[str] = []
    real_sweeper, real_timed = bench._cache_sweeper, bench._timed

    def sweeper(cold: bool):
        inner = real_sweeper(cold)

        def sweep() -> None:
            inner()
            log.append("sweep" if cold else "no sweep")

        return sweep

    def timed(f):
        log.append("timed")
        return real_timed(f)

    monkeypatch.setattr(bench, "_cache_sweeper", sweeper)
    monkeypatch.setattr(bench, "_timed", timed)
    path = tmp_path / "cold.json"
    argv = ["bench", "--shapes", "7x3", "--repeats", "3", "--warmup", "0", "--passes", "fwd"]
    assert cli_main([*argv, "--cold", "--json", str(path)]) == 0
    # per round: the copy, then the three contenders' forward, each after its own sweep
    assert log == ["sweep", "timed"] * (3 * (1 + 3))
    table = capsys.readouterr().out
    assert "- cold: the caches were swept before every timed call" in table
    data = json.loads(path.read_text())
    assert data["cold"] is True
    log.clear()
    data = bench.run(["7x3"], repeats=2, warmup=0, passes=["fwd"])
    assert data["cold"] is False and "- cold:" not in bench.format_table(data)
    assert log == ["no sweep", "timed"] * (2 * (1 + 3))  # the default's sweeper: a no-op
    # results of the two kinds do not combine, and --from-json measures nothing
    with pytest.raises(ValueError, match="--cold"):
        bench.combine([json.loads(path.read_text()), data])
    assert cli_main(["bench", "--from-json", str(path), "--cold"]) == 2
    assert "--cold" in capsys.readouterr().err


def test_the_cold_sweep_reads_twice_the_last_level_cache(monkeypatch):
    """The sweep's buffer: twice the cache size the kernels read, at least 64 MiB."""
    from batchnorm import kernels

    seen: list[int] = []
    real_ones = torch.ones

    def ones(n, *a, **k):
        seen.append(int(n) * 4)
        return real_ones(n, *a, **k)

    monkeypatch.setattr(bench.torch, "ones", ones)
    for llc, expected in ((32 << 20, 64 << 20), (48 << 20, 96 << 20), (0, 64 << 20)):
        monkeypatch.setattr(kernels, "LLC_BYTES", llc)
        bench._cache_sweeper(True)()
        assert seen[-1] == expected
    seen.clear()
    bench._cache_sweeper(False)()
    assert seen == []


def test_processes_pass_cold_on() -> None:
    args = argparse.Namespace(
        repeats=3, warmup=1, dtype="float32", passes=["fwd"], shapes=None, threads=None, cold=True
    )
    assert bench._child_arguments(args)[-1] == "--cold"
    args.cold = False
    assert "--cold" not in bench._child_arguments(args)


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"warmup": -1}, "warmup must be >= 0, got -1"),
        ({"dtype": torch.int32}, "dtype must be one of torch.float32, torch.float64, "),
        ({"dtype": "float32"}, "dtype must be one of"),
    ],
)
def test_the_python_entry_refuses_what_the_cli_refuses(kwargs: dict, says: str) -> None:
    """bench.run took warmup=-1 and gave torch's bare errors for a dtype that is no float
    dtype (randn on int32) or a dtype's name."""
    with pytest.raises(ValueError, match=f"^bench: {says}"):
        bench.run(["7x3"], repeats=1, **kwargs)


def test_empty_folder_like_or_shared_output_paths_are_refused(tmp_path, capsys):
    """An empty path (an unset shell variable) read as "not given": the run measured, exited 0
    and saved nothing; a --plot naming the --json or --from-json file replaced the
    measurements with the figure."""
    saved = tmp_path / "saved"
    saved.write_text(Path("docs/bench.json").read_text())
    fast = ["--shapes", "7x3", "--repeats", "2", "--passes", "fwd"]
    for argv, says in (
        (["bench", *fast, "--json", ""], "--json is empty"),
        (["bench", *fast, "--plot", ""], "--plot is empty"),
        (["bench", "--from-json", ""], "--from-json is empty"),
        (["bench-network", "--networks", "mlp", "--json", ""], "--json is empty"),
        (["bench", *fast, "--json", str(tmp_path / "out") + "/"], "ends in a folder separator"),
        (
            ["bench", *fast, "--json", str(tmp_path / "r"), "--plot", str(tmp_path / "r")],
            "is the file of --json",
        ),
        (["bench", "--from-json", str(saved), "--plot", str(saved)], "is the file of --from-json"),
    ):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert json.loads(saved.read_text())["cases"]  # untouched
    assert not (tmp_path / "r").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(machine="a string"),
        lambda d: d.update(summary="a string"),
        lambda d: d.update(targets=[1]),
        lambda d: d.update(cases=[1]),
    ],
    ids=["machine", "summary", "targets", "cases"],
)
def test_saved_results_with_fields_of_the_wrong_type_are_one_line(tmp_path, capsys, edit):
    # an AttributeError from a field of the wrong type went past the one-line refusal
    data = json.loads(Path("docs/bench.json").read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert cli_main(["bench", "--from-json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "no usable benchmark data" in err and "Traceback" not in err


def test_a_network_batch_beyond_the_memory_is_one_line(capsys):
    argv = ["bench-network", "--networks", "mlp", "--repeats", "1", "--warmup", "0"]
    assert cli_main([*argv, "--min-seconds", "0", "--batch", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert "need more memory than this machine has" in err and "--batch" in err
    assert "Traceback" not in err


def _drawn_plot(data, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The figure bench.plot saves, laid out as saved, and a renderer for it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from batchnorm.lab import plots

    seen = []
    orig = plots.save_figure

    def save(fig, path, dpi=120):  # type: ignore[no-untyped-def]
        seen.append(fig)
        return orig(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", save)
    bench.plot(data, tmp_path / "b.png")
    canvas = FigureCanvasAgg(seen[0])  # (a saved figure is closed: its canvas no longer draws)
    canvas.draw()
    return seen[0], canvas.get_renderer()


def test_plot_roofline_bars_start_at_1_and_the_target_spans_its_shapes(tmp_path, monkeypatch):
    """On the log panel bars started where the axis did (1.60 and 2.21 looked 1:5), and the
    1.6x target, defined for >= 4M values, was drawn over the small shapes too."""
    pytest.importorskip("matplotlib")
    data = bench.load("docs/bench.json")
    fig, _ = _drawn_plot(data, tmp_path, monkeypatch)
    bottom = fig.axes[1]
    bars = [p for p in bottom.patches if p.get_width() > 0]
    assert len(bars) == len(data["cases"]) * len(bench.timed_passes(data))
    assert all(b.get_y() == 1.0 for b in bars)
    tops = sorted(round(b.get_y() + b.get_height(), 6) for b in bars)
    want = sorted(
        round(c["ours_over_roofline"][p], 6)
        for c in data["cases"]
        for p in ("fwd", "fwd+bwd", "eval")
    )
    assert tops == want
    (target,) = [c for c in bottom.collections if c.get_label().startswith("1.6x")]
    spans = [(seg[0][0], seg[-1][0]) for seg in target.get_segments()]
    for x, case in enumerate(data["cases"]):
        covered = any(a <= x <= b for a, b in spans)
        assert covered == (case["numel"] >= bench.ROOFLINE_MIN_NUMEL), case["shape"]


def test_plot_keeps_the_affine_dashes_off_the_labels_and_says_busy(tmp_path, monkeypatch):
    """The reference's black dashes struck through the bars' value labels, and a run whose
    CPU other processes shared looked like any other."""
    pytest.importorskip("matplotlib")
    data = bench.load("docs/bench.json")
    data["machine"].update(busy=True, other_cpu_share=0.39)
    fig, renderer = _drawn_plot(data, tmp_path, monkeypatch)
    top = fig.axes[0]
    (dashes,) = [c for c in top.collections if c.get_label() == "per-channel affine, fwd+bwd"]
    if hasattr(dashes, "get_segments"):  # a dash per case, from end to end
        ends = [top.transData.transform(seg) for seg in dashes.get_segments()]
    else:  # markers: as wide as their size
        half = np.sqrt(dashes.get_sizes()[0]) / 2 * fig.dpi / 72
        ends = [
            [(x - half, y), (x + half, y)] for x, y in top.transData.transform(dashes.get_offsets())
        ]
    labels = [t.get_window_extent(renderer) for t in top.texts]
    assert len(labels) == len(data["cases"]) * 3
    for (x0, y), (x1, _) in ends:
        for box in labels:
            assert not (x0 <= box.x1 and box.x0 <= x1 and box.y0 - 1 <= y <= box.y1 + 1)
    assert "busy: other processes used 39% of the CPU" in fig._suptitle.get_text()
