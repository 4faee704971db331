"""``batchnorm bench-network``: the three variants compute what they should, the table and JSON
report the medians they measured (no speed asserted)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

from batchnorm import bench_network as bn_net
from batchnorm.cli import main as cli_main
from batchnorm.diagnostics import is_batchnorm

pytest.importorskip("numba")


def _bn_layers(m: nn.Module) -> list[nn.Module]:
    return [c for c in m.modules() if is_batchnorm(c)]


def test_variants_share_weights_and_differ_only_in_the_bn_layers():
    models = bn_net._variants(bn_net.NETWORKS["cnn"])
    ours, theirs, none = models["ours"], models["torch"], models["no BN"]
    assert all(type(b).__module__.startswith("batchnorm") for b in _bn_layers(ours))
    assert all(type(b).__module__.startswith("torch") for b in _bn_layers(theirs))
    assert len(_bn_layers(ours)) == len(_bn_layers(theirs)) == 4 and not _bn_layers(none)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_run_reports_its_medians_and_the_same_loss(tmp_path):
    path = tmp_path / "net.json"
    data = bn_net.run(
        ["mlp", "cnn@cl"], repeats=3, warmup=1, batch=6, json_path=path, min_seconds=0
    )
    # standard JSON: NaN (nothing compiled) written as null, read back as NaN
    strict = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict["networks"][0]["ours_over_compiled"] is None
    assert repr(bn_net.load(path)) == repr(data)
    mlp, cnn = data["networks"]
    assert mlp["bn_inputs"] == [[6, 100]] * 3
    assert cnn["layout"] == "channels_last"
    assert cnn["bn_inputs"] == [[6, 32, 32, 32], [6, 64, 16, 16], [6, 128, 8, 8], [6, 256, 4, 4]]
    for r in (mlp, cnn):
        assert r["batch"] == 6 and r["repeats"] == 3
        assert r["loss_gap"] < 1e-4  # torch's and ours compute the same function
        s = r["step_s"]
        assert set(s) == set(bn_net.VARIANTS) and min(s.values()) > 0
        assert all(r["step_min_s"][k] <= s[k] for k in s)
        assert math.isclose(r["ours_over_torch"], s["ours"] / s["torch"])
        for k in ("torch", "ours"):
            assert math.isclose(r["bn_s"][k], s[k] - s["no BN"])
        assert set(r["bn_own_s"]) == {"torch", "ours"} and min(r["bn_own_s"].values()) > 0
    table = bn_net.format_table(data)
    assert table.count("\n| mlp | 6 | contiguous | 3 |") == 1
    assert "BN inputs 6x32x32x32, 6x64x16x16" in table


def test_inference_mode_times_eval_forwards_that_change_nothing(monkeypatch, tmp_path, capsys):
    """``mode="eval"``: every variant in eval mode, a forward under no_grad per step — the
    weights and the running statistics are the same after the run as before it, and the
    first outputs of torch's and ours agree (eval mode: the running statistics)."""
    made: list[tuple[dict[str, nn.Module], dict[str, dict[str, torch.Tensor]]]] = []
    variants = bn_net._variants

    def keep(net: bn_net.Network, compile: bool = False) -> dict[str, nn.Module]:
        models = variants(net, compile)
        for m in _bn_layers(models["ours"]):
            with torch.no_grad():  # running statistics that differ from the defaults
                m.running_mean.uniform_(-0.5, 0.5)  # type: ignore[operator]
                m.running_var.uniform_(0.5, 2.0)  # type: ignore[operator]
        for a, b in zip(_bn_layers(models["ours"]), _bn_layers(models["torch"]), strict=True):
            b.load_state_dict(a.state_dict())
        before = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in models.items()}
        made.append((models, before))
        return models

    monkeypatch.setattr(bn_net, "_variants", keep)
    data = bn_net.run(["mlp", "cnn"], repeats=3, warmup=1, batch=6, min_seconds=0, mode="eval")
    assert data["mode"] == "eval"
    for r in data["networks"]:
        assert r["mode"] == "eval" and r["loss_gap"] < 1e-4 and r["repeats"] == 3
    assert len(made) == 2
    for models, before in made:
        for k, m in models.items():
            assert not m.training
            for n, t in m.state_dict().items():
                assert torch.equal(t, before[k][n]), (k, n)
    assert "- timed: inference" in bn_net.format_table(data)
    out = tmp_path / "eval.json"
    args = ["bench-network", "--networks", "mlp", "--repeats", "2", "--batch", "4"]
    assert cli_main([*args, "--min-seconds", "0", "--mode", "eval", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mode"] == "eval"
    assert "- timed: inference" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mode must be one of train, eval"):
        bn_net.run(["mlp"], mode="test")


def test_cli_json_plot_and_from_json(tmp_path, capsys):
    out, png = tmp_path / "r" / "net.json", tmp_path / "net.png"
    args = ["bench-network", "--networks", "mlp", "--repeats", "2", "--batch", "4"]
    args += ["--min-seconds", "0"]
    assert cli_main([*args, "--json", str(out), "--plot", str(png)]) == 0
    first = capsys.readouterr().out
    assert "| mlp | 4 |" in first and png.stat().st_size > 0
    png.unlink()
    assert cli_main(["bench-network", "--from-json", str(out), "--plot", str(png)]) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[:3] == [ln for ln in first.splitlines() if ln.startswith("|")][:3]
    assert png.stat().st_size > 0
    # measuring options with --from-json would be ignored: refused, naming them
    for extra in (
        ["--mode", "eval"],
        ["--repeats", "7"],
        ["--min-seconds", "3"],
        ["--batch", "5"],
        ["--mode", "train"],  # the default value, given all the same
    ):
        assert cli_main(["bench-network", "--from-json", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--from-json measures nothing, so {extra[0]} do not apply" in err


def test_inference_takes_a_batch_of_one_and_the_plot_draws_no_negative_bar(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    # eval mode normalizes with the running statistics: one sample is ordinary inference
    data = bn_net.run(["mlp"], batch=1, mode="eval", repeats=1, warmup=0, min_seconds=0)
    assert data["networks"][0]["batch"] == 1
    with pytest.raises(ValueError, match="batch must be >= 2 \\(batch statistics\\) in train"):
        bn_net.run(["mlp"], batch=1)
    # a step timed below the no-BN step (the README's cnn@cl inference run has ours at 11.1 ms
    # against no BN's 7.4 and torch's 15.1; here ours below no BN): no bar of negative height
    import matplotlib.axes

    heights: list[tuple[float, float]] = []
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):  # type: ignore[no-untyped-def]
        heights.append((float(height), float(kwargs.get("bottom") or 0.0)))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    data["networks"][0]["step_s"].update({"no BN": 7.4e-3, "torch": 15.1e-3, "ours": 6.9e-3})
    bn_net.plot(data, tmp_path / "p.png")
    assert heights and all(h >= 0 for h, _ in heights)
    tops = [h + b for h, b in heights]
    assert max(tops) == pytest.approx(15.1) and min(abs(t - 6.9) for t in tops) < 1e-9


def test_bad_requests_say_what_to_do(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown network.*choose from mlp"):
        bn_net.run(["resnet"])
    with pytest.raises(ValueError, match="batch must be >= 2"):
        bn_net.run(["mlp"], batch=1)  # (in train mode, the default)
    with pytest.raises(ValueError, match="repeats"):
        bn_net.run(["mlp"], repeats=0)
    with pytest.raises(ValueError, match="^bench-network: warmup must be >= 0, got -1"):
        bn_net.run(["mlp"], warmup=-1)  # the CLI refused it, the function took it
    assert cli_main(["bench-network", "--networks", "mlp", "--batch", "1"]) == 2
    assert capsys.readouterr().err.startswith("batchnorm bench-network: batch must be >= 2")
    assert cli_main(["bench-network", "--networks", "mlp", "--threads", "0"]) == 2
    assert capsys.readouterr().err.startswith("batchnorm bench-network: --threads must be in 1..")
    assert cli_main(["bench-network", "--networks", "mlp", "--warmup", "-2"]) == 2
    assert capsys.readouterr().err.startswith("batchnorm bench-network: --warmup must be >= 0")
    bad = tmp_path / "x.json"
    bad.write_text('{"cases": []}')
    assert cli_main(["bench-network", "--from-json", str(bad)]) == 2
    assert "no 'networks' list" in capsys.readouterr().err
    assert cli_main(["bench-network", "--json", str(tmp_path)]) == 2  # a directory
    assert "it is a directory" in capsys.readouterr().err
    for bad_seconds in ("inf", "-1", "nan"):
        assert cli_main(["bench-network", "--networks", "mlp", "--min-seconds", bad_seconds]) == 2
        assert "--min-seconds must be finite and >= 0" in capsys.readouterr().err


def test_networks_that_compute_different_functions_are_not_timed(monkeypatch, capsys):
    """The first-loss check acts: a torch twin that differs from ours (weights scaled here)
    stops the run before anything is timed."""
    from batchnorm import convert

    real = convert.convert_model

    def differing(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(model, *args, **kwargs)
        if kwargs.get("to") == "torch" or (args and args[0] == "torch"):
            with torch.no_grad():
                for p in out.parameters():
                    p.mul_(3)
        return out

    monkeypatch.setattr(convert, "convert_model", differing)
    with pytest.raises(ValueError, match="do not compute the same function.*nothing was timed"):
        bn_net.run(["mlp"], repeats=1, warmup=0, batch=6, min_seconds=0)
    args = ["bench-network", "--networks", "mlp", "--repeats", "1", "--min-seconds", "0"]
    assert cli_main(args) == 2
    assert "do not compute the same function" in capsys.readouterr().err


def test_short_steps_are_repeated_for_min_seconds():
    assert bn_net.repeats_for(2, 0.05, 0.001) == 50
    assert bn_net.repeats_for(2, 0.05, 0.03) == 2  # long steps: the requested count
    assert bn_net.repeats_for(7, 0.0, 0.001) == 7
    assert bn_net.repeats_for(2, 100.0, 1e-6) == bn_net.MAX_REPEATS
    assert bn_net.repeats_for(2, 1.0, 0.0) == bn_net.MAX_REPEATS  # a clock too coarse to see
    (r,) = bn_net.run(["mlp"], repeats=2, warmup=1, batch=4, min_seconds=0.05)["networks"]
    # the count follows from the probe step however loaded the machine is
    assert r["probe_s"] > 0 and r["repeats"] == bn_net.repeats_for(2, 0.05, r["probe_s"])
    assert len(r["step_s"]) == len(bn_net.VARIANTS)
    with pytest.raises(ValueError, match="min_seconds"):
        bn_net.run(["mlp"], min_seconds=-1)


def test_one_slow_probe_step_does_not_set_the_repeats() -> None:
    """A step descheduled once (50 ms among 1 ms steps) cut a run of ~700 steps to ~20."""
    delays = iter([0.05, 0.001, 0.001, 0.001, 0.001])
    step_s = bn_net.probe(lambda: time.sleep(next(delays)))
    assert step_s < 0.01
    assert bn_net.repeats_for(21, 0.7, step_s) > 60


def test_compiled_variant_is_torchs_network_compiled_and_reported(tmp_path, capsys):
    """``compile=True`` adds torch.nn's network under torch.compile: same weights, the same
    first loss as torch.nn's, its median in the results, the table and the plot."""
    models = bn_net._variants(bn_net.NETWORKS["mlp"], compile=True)
    assert list(models) == [*bn_net.VARIANTS, bn_net.COMPILED]
    compiled = models[bn_net.COMPILED]
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    inner = compiled._orig_mod
    assert inner is not models["torch"]  # a copy: its own optimizer state and statistics
    for (k1, v1), (k2, v2) in zip(
        inner.state_dict().items(), models["torch"].state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    data = bn_net.run(["mlp"], repeats=2, warmup=1, batch=6, min_seconds=0, compile=True)
    assert data["compiled"] is True
    (r,) = data["networks"]
    assert r["compiled_loss_gap"] < 1e-4
    s = r["step_s"]
    assert set(s) == {*bn_net.VARIANTS, bn_net.COMPILED} and min(s.values()) > 0
    assert math.isclose(r["ours_over_compiled"], s["ours"] / s[bn_net.COMPILED])
    table = bn_net.format_table(data)
    assert "| torch compiled step ms | ours/torch compiled |" in table
    assert f" {s[bn_net.COMPILED] * 1e3:.2f} | {r['ours_over_compiled']:.2f} |" in table
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.json"
    out.write_text(json.dumps(data))
    png = tmp_path / "c.png"
    assert cli_main(["bench-network", "--from-json", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    assert cli_main(["bench-network", "--from-json", str(out), "--compile"]) == 2
    assert "--compile do not apply" in capsys.readouterr().err
    plain = bn_net.run(["mlp"], repeats=2, warmup=0, batch=6, min_seconds=0)
    assert plain["compiled"] is False and "compiled" not in bn_net.format_table(plain)
    assert math.isnan(plain["networks"][0]["ours_over_compiled"])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_own_time_sums_the_layers_forwards_and_their_backward_nodes(mode):
    """The profiled time of the BN layers: their forward scopes, and in training the nodes
    that made their outputs (torch's NativeBatchNormBackward0, our compiled node) — not the
    linear layers around them; a model whose step is nothing but its BN layer spends about
    all of the profiled time in it."""
    import batchnorm

    torch.manual_seed(0)
    x = torch.randn(256, 512)
    for bn in (nn.BatchNorm1d(512), batchnorm.BatchNorm1d(512, backend="numba")):
        model = nn.Sequential(nn.Linear(512, 512), bn, nn.Linear(512, 10)).train(mode == "train")

        def step(model: nn.Module = model) -> None:
            if mode == "eval":
                with torch.no_grad():
                    model(x)
            else:
                model(x).sum().backward()

        step()
        own, keys = bn_net.bn_own_time(model, step, n=3)
        assert own > 0
        assert bn_net._FORWARD_SCOPE in keys
        backward = keys - {bn_net._FORWARD_SCOPE}
        if mode == "eval":
            assert not backward
        else:
            (node,) = backward
            theirs = type(bn).__module__.startswith("torch")
            assert ("NativeBatchNorm" in node) if theirs else ("CppNode" in node)
            assert "Addmm" not in node
        assert not any(h for h in bn._forward_hooks.values()) and not bn._forward_pre_hooks
        alone = nn.Sequential(bn)
        alone.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            own_alone, _ = bn_net.bn_own_time(alone, lambda m=alone: m(x), n=3)
            wall = (time.perf_counter() - t0) / 3
        assert 0 < own_alone <= wall


def test_results_saved_before_the_profiled_steps_still_print():
    """docs/bench_network.json holds no ``bn_own_s``: its rows print a dash there."""
    from pathlib import Path

    data = bn_net.load(Path(__file__).parent.parent / "docs" / "bench_network.json")
    assert all("bn_own_s" not in r for r in data["networks"])
    rows = [line for line in bn_net.format_table(data).splitlines() if line.startswith("| mlp")]
    assert rows and rows[0].endswith("| — | — |")


def test_plot_explains_both_bn_colours_and_gives_the_steps_timed(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The legend's "BN layers" showed torch's blue only (ours are red), and the title said
    "medians of 41 steps or more" of a run that timed 892 steps of the MLP."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from batchnorm.lab import plots

    seen = []
    orig = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: seen.append(fig) or orig(fig, path))
    data = bn_net.load("docs/bench_network.json")
    bn_net.plot(data, tmp_path / "n.png")
    fig = seen[0]
    (legend,) = fig.legends
    shown = {
        to_hex(h.get_facecolor()): t.get_text()
        for h, t in zip(legend.legend_handles, legend.get_texts())
    }
    for i, who in enumerate(("torch", "ours")):
        # the BN segment of each bar, and a legend entry of its colour saying whose it is
        colour = plots.color_for(who, i)
        assert colour in shown and "BN" in shown[colour], shown
    assert "torch" in shown[plots.color_for("torch", 0)]
    assert "batchnorm" in shown[plots.color_for("ours", 1)]
    titles = [a.get_title() for a in fig.axes]
    for a, r in zip(titles, data["networks"]):
        assert f"median of {r['repeats']} steps" in a
    assert "or more" not in fig._suptitle.get_text()
