"""The lab as its users meet it: the command line's errors for bad settings, damaged run
folders and failed downloads — one line naming what was wrong and the remedy, no traceback,
no half-written files."""

import hashlib
import http.server
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from batchnorm.cli import main as cli_main
from batchnorm.lab import data, registry, results
from batchnorm.lab.config import BaseConfig, ConfigError, make_config
from batchnorm.lab.data import DatasetCorruptError, DatasetNotFoundError
from batchnorm.lab.results import Claim, DamagedRunFile, Results, RunContext, RunDir

# --------------------------------------------------------------------------------------------
# a toy experiment: parts, metrics rows, a series and a figure read from them


@dataclass
class UsageToyConfig(BaseConfig):
    steps: int = 3


CALLS = {"n": 0}


def _toy_run(cfg: UsageToyConfig, ctx: RunContext) -> Results:
    ds = ctx.load_dataset("synthetic")

    def one(seed: int) -> dict:
        CALLS["n"] += 1
        return {"acc": [0.1 * (seed + 1) * s for s in range(cfg.steps)]}

    rows = []
    finals = []
    for seed in cfg.seed_list():
        part = ctx.cached(f"seed{seed}", lambda seed=seed: one(seed))
        rows += [{"arm": "a", "seed": seed, "step": s, "acc": a} for s, a in enumerate(part["acc"])]
        finals.append(part["acc"][-1])
    m = results.mean_std(finals)
    claim = Claim("toy", "toy claim", m["mean"] > 0.1, {"acc": m})
    return Results(
        rows, {"dataset": ds.info(), "claims": [claim]}, {"curve": [r["acc"] for r in rows]}
    )


def _toy_figures(run, out):
    assert run.series["curve"] == [r["acc"] for r in run.rows]  # reads what was saved
    return []


@pytest.fixture
def toy():
    registry.register("usage-toy", config=UsageToyConfig, figures=_toy_figures)(_toy_run)
    CALLS["n"] = 0
    yield "usage-toy"
    registry._REGISTRY.pop("usage-toy", None)


# settings that used to pass validation and then failed inside torch (an optimizer, a layer)
# with a traceback, or were silently misread (a negative count slicing off the end)
BAD_SETTINGS = [
    ("dropout", "lr=-1", "lr must be positive"),
    ("dropout", "momentum=-1", "momentum must be >= 0"),
    ("dropout", "hidden=32,0,32", "hidden must list"),
    ("dropout", "n_train_eval=-1", "n_train_eval must be >= 0"),
    ("ics", "widths=0", "widths must list"),
    ("ics", "widths=-1", "widths must list"),
    ("ics", "dln_samples=-1", "dln_samples=-1 is fewer than batch_size"),
    ("initialization", "hidden=0", "hidden must list"),
    ("initialization", "lr=-1", "lr must be positive"),
    ("learning-rate", "channels=0", "channels must list"),
    ("learning-rate", "val_fraction=0", "val_fraction must be in"),
    ("learning-rate", "val_fraction=-1", "val_fraction must be in"),
    ("learning-rate", "halvings=-1", "halvings must be >= 0"),
    ("learning-rate", "weight_decay=-0.1", "weight_decay must be >= 0"),
    ("noisy-bn", "widths=0", "widths must list"),
    ("noisy-bn", "final_window=0", "final_window must be >= 1"),
    ("noisy-bn", "final_window=-1", "final_window must be >= 1"),
    ("noisy-bn", "lr=0", "lr must be positive"),
    ("recalibration", "channels=0", "channels must list"),
    ("recalibration", "bn_momentum=-1", r"bn_momentum must be in \[0, 1\]"),
    ("recalibration", "bn_momentum=2", r"bn_momentum must be in \[0, 1\]"),
    ("small-batch", "gn_groups=0", "gn_groups must be >= 1"),
    ("small-batch", "gn_groups=3", "gn_groups=3 does not divide"),
    ("small-batch", "channels=-1", "channels must list"),
    ("small-batch", "renorm_r_max=0", "renorm_r_max must be >= 1"),
    ("small-batch", "renorm_d_max=-1", "renorm_d_max must be >= 0"),
    ("small-batch", "bn_momentum=1.5", r"bn_momentum must be in \[0, 1\]"),
    ("small-batch", "lr=-1", "lr must be positive"),
    ("smoothness", "widths=0", "widths must list"),
    ("sync-bn", "channels=0", "channels must list"),
    ("sync-bn", "hidden=-1", "hidden must list"),
    ("sync-bn", "n_train=-1", "n_train and n_eval must be >= 0"),
    # no probe within the run: claims judged on no measurement ("not supported", all None)
    ("ics", "probe_every=1000", "probe_every=1000 is more than steps"),
    ("smoothness", "probe_every=1000", "probe_every=1000 is more than steps"),
    ("noisy-bn", "probe_every=1000", "probe_every=1000 is more than steps"),
    # a count below 1: a division by zero in the window check, or advice to lower it further
    ("ics", "probe_every=0", "probe_every.* must be >= 1"),
    ("smoothness", "probe_every=-1", "probe_every and steps must be >= 1"),
    ("noisy-bn", "probe_every=0", "probe_every and steps must be >= 1"),
    ("noisy-bn", "eval_every=0", "final_window, steps and eval_every must be >= 1"),
    ("noisy-bn", "eval_every=-1", "final_window, steps and eval_every must be >= 1"),
    ("dropout", "eval_every=0", "eval_every.* must be >= 1"),
    ("initialization", "eval_every=0", "eval_every.* must be >= 1"),
    ("small-batch", "eval_every=0", "eval_every.* must be >= 1"),
    # the field given is the one named, with its value
    ("paper-mnist", "eval_every=0", "eval_every must be >= 1, got 0"),
    ("learning-rate", "sweep_steps=0", "sweep_steps must be >= 1, got 0"),
    ("dropout", "final_window=0", "final_window must be >= 1, got 0"),
    # an activation the network builder does not know: a traceback at the first build, mid-run
    ("initialization", "activation=foo", "unknown activation 'foo'"),
    ("paper-mnist", "activation=foo", "unknown activation 'foo'"),
    ("placement", "activations=relu,foo", "unknown activation 'foo'"),
    # BN's averaged curve starts after the `faster` budget: that claim could never be supported
    ("paper-mnist", "steps=100", "the `faster` claim could never be supported"),
    # the probe goes through BN with its own batch statistics (a traceback after the sweep)
    ("paper-mnist", "probe_size=1", "probe_size must be >= 2"),
    # a final-accuracy window reaching back to step 0 averaged in the untrained network
    ("dropout", "final_window=50", "final_window=50 is more than the"),
    ("initialization", "final_window=50", "final_window=50 is more than the"),
    ("noisy-bn", "final_window=50", "final_window=50 is more than the"),
    ("small-batch", "final_window=50", "final_window=50 is more than the"),
]


@pytest.mark.parametrize(("name", "setting", "message"), BAD_SETTINGS)
@pytest.mark.parametrize("quick", [True, False])
def test_out_of_range_settings_are_config_errors(name, setting, message, quick):
    cls = registry.get(name).config_cls
    with pytest.raises(ConfigError, match=message):
        make_config(cls, quick=quick, sets=[setting])


@pytest.mark.parametrize(
    ("name", "setting", "message"),
    [BAD_SETTINGS[0], BAD_SETTINGS[6], BAD_SETTINGS[22], BAD_SETTINGS[-1]],
)
def test_cli_refuses_bad_settings_in_one_line_before_creating_the_folder(
    name, setting, message, tmp_path, capsys
):
    out = tmp_path / "run"
    code = cli_main(["lab", "run", name, "--quick", "--out", str(out), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ")
    assert re.search(message, err)
    assert not out.exists()


def test_default_and_quick_configs_of_every_experiment_are_valid():
    exps = list(registry.all_experiments())
    names = {exp.name for exp in exps}
    assert {"paper-mnist", "placement", "learning-rate", "noisy-bn", "small-batch"} <= names
    for exp in exps:
        full = make_config(exp.config_cls)
        quick = make_config(exp.config_cls, quick=True)
        assert full.quick is False and quick.quick is True, exp.name
        # --quick is the smaller run: each of its overrides is applied
        for key, value in exp.config_cls.QUICK.items():
            assert getattr(quick, key) == value, (exp.name, key)


# --------------------------------------------------------------------------------------------
# a finished run whose files were damaged afterwards


def _cut_mid_line(text: str) -> str:
    return text[: text.rindex("\n", 0, len(text) - 1) + 5]


def _drop_last_row(text: str) -> str:
    return "".join(text.splitlines(keepends=True)[:-1])


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("metrics.csv", _cut_mid_line),
        ("metrics.csv", _drop_last_row),  # still valid CSV: only the digest tells
        ("metrics.csv", None),  # deleted
        ("series.json", lambda t: t[: len(t) // 2]),
        ("series.json", lambda t: t.replace("0.", "9.", 1)),
        # a hand-edited verdict: still a valid summary, only its own digest tells
        ("summary.json", lambda t: t.replace('"verdict": true', '"verdict": false', 1)),
    ],
)
def test_a_finished_run_with_a_damaged_file_is_rebuilt_from_its_parts(
    toy, tmp_path, capsys, name, damage
):
    out = tmp_path / "run"
    args = ["lab", "run", toy, "--seeds", "2", "--out", str(out)]
    assert cli_main(args) == 0
    good = {n: (out / n).read_bytes() for n in ("metrics.csv", "series.json", "summary.json")}
    assert CALLS["n"] == 2
    if damage is None:
        (out / name).unlink()
    else:
        (out / name).write_text(damage((out / name).read_text()))
    assert not RunDir(out).complete
    capsys.readouterr()
    assert cli_main(args) == 0
    std = capsys.readouterr()
    assert "Traceback" not in std.err
    assert f"{name} is" in std.out and "rebuilding the run's files from its parts" in std.out
    assert CALLS["n"] == 2  # nothing trained again
    for n in ("metrics.csv", "series.json"):
        assert (out / n).read_bytes() == good[n]
    again = json.loads((out / "summary.json").read_text())
    assert again["claims"] == json.loads(good["summary.json"])["claims"]
    assert RunDir(out).complete


def test_load_run_names_the_damaged_file(toy, tmp_path):
    out = tmp_path / "run"
    registry.run_experiment(toy, out, seeds=2, log=lambda m: None)
    metrics = (out / "metrics.csv").read_text()
    (out / "metrics.csv").write_text(_cut_mid_line(metrics))
    with pytest.raises(DamagedRunFile, match=r"metrics\.csv: damaged, line \d+"):
        results.load_run(out)
    (out / "metrics.csv").write_text(metrics)
    (out / "series.json").write_text('{"curve": [')
    with pytest.raises(DamagedRunFile, match=r"series\.json: damaged, not readable as JSON"):
        results.load_run(out)


# --------------------------------------------------------------------------------------------
# downloads, from a local HTTP server on 127.0.0.1


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a file named in ``short`` is sent with a Content-Length larger than
    what follows (a connection that drops mid-file)."""

    short: dict[str, int] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        how, _, rest = self.path.lstrip("/").partition("/")
        if how in ("chunkcut", "badstatus", "drip"):  # /HOW/<folder>/<file>: a broken answer
            self._broken(how, (Path(self.directory) / rest).read_bytes())
            return
        if name in self.short:
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: self.short[name]])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def _broken(self, how: str, body: bytes) -> None:
        self.close_connection = True
        if how == "badstatus":  # not HTTP at all
            self.wfile.write(b"HELLO THERE\r\n\r\n")
            return
        self.send_response(200)
        if how == "chunkcut":  # a chunk announced whole, half of it sent, then closed
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(body):x}\r\n".encode() + body[: len(body) // 2])
            return
        self.send_header("Content-Length", str(len(body)))  # drip: 20 bytes per 0.05 s
        self.end_headers()
        try:
            for i in range(0, len(body), 20):
                self.wfile.write(body[i : i + 20])
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up
            pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    short: dict[str, int] = {}
    handler_cls = type("H", (_Handler,), {"short": short})

    def handler(*a, **k):
        return handler_cls(*a, directory=str(root), **k)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", short
    httpd.shutdown()
    httpd.server_close()


def _serve_set(folder: Path) -> dict[str, str]:
    """The four files of a small IDX set, gzipped, in ``folder``; returns their MD5s."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 20, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    sums = {}
    for stem, arr in arrays.items():
        p = folder / f"{stem}.gz"
        data.write_idx(p, arr)
        sums[p.name] = hashlib.md5(p.read_bytes()).hexdigest()
    return sums


def test_download_into_an_unwritable_folder_names_that_folder(isolated, server):
    root, url, _ = server
    sums = _serve_set(root / "m")
    blocker = isolated / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetNotFoundError, match=f"cannot download mnist into {blocker}/mnist"):
        data.download_dataset("mnist", blocker / "mnist", urls=[url + "/m/"], md5=sums)
    assert blocker.read_text() == "not a folder"


def test_cli_download_into_an_unwritable_cache_is_one_line_naming_the_cache(
    isolated, monkeypatch, capsys
):
    cache = isolated / "cache-file"
    cache.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # the cache cannot be created
    out = isolated / "run"
    argv = ["lab", "run", "placement", "--quick", "--dataset", "mnist", "--download"]
    assert cli_main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"cannot download mnist into {cache}/batchnorm/mnist" in err
    assert "XDG_CACHE_HOME" in err and "--data-dir" in err
    assert "run's files" not in err  # the run folder was not the problem


def test_a_download_cut_short_says_so_and_leaves_no_file(isolated, server):
    root, url, short = server
    sums = _serve_set(root / "m")
    name = "train-images-idx3-ubyte.gz"
    size = (root / "m" / name).stat().st_size
    short[name] = size // 2  # the connection drops halfway through this file
    dest = isolated / "dl"
    with pytest.raises(DatasetNotFoundError) as e:
        data.download_dataset("mnist", dest, urls=[url + "/m/"], md5=sums)
    msg = str(e.value)
    assert f"stopped after {size // 2} of {size} bytes" in msg and "run the command again" in msg
    assert "checksum" not in msg  # the file was cut, not wrong
    assert not isinstance(e.value, DatasetCorruptError)
    assert not (dest / name).exists()
    assert not [p for p in dest.iterdir() if p.name.endswith(".part")]
    # the next attempt, on a connection that holds, completes the set
    short.clear()
    data.download_dataset("mnist", dest, urls=[url + "/m/"], md5=sums)
    assert data.load_dataset("mnist", dest).x_train.shape == (20, 1, 28, 28)


@pytest.mark.parametrize("how", ["chunkcut", "badstatus"])
def test_a_malformed_answer_is_reported_and_the_next_mirror_tried(isolated, server, how):
    """A chunked body cut mid-chunk or an answer that is not HTTP raises http.client's own
    errors, which are not OSErrors: reported like any failed mirror, the next one tried."""
    root, url, _ = server
    sums = _serve_set(root / "m")
    dest = isolated / "dl"
    data.download_dataset("mnist", dest, urls=[f"{url}/{how}/m/", url + "/m/"], md5=sums)
    assert data.load_dataset("mnist", dest).x_train.shape == (20, 1, 28, 28)
    says = {"chunkcut": "IncompleteRead", "badstatus": "BadStatusLine: HELLO THERE"}[how]
    with pytest.raises(DatasetNotFoundError, match=f"failed:\n  {url}/{how}/m/.*: {says}"):
        data.download_dataset("mnist", isolated / "dl2", urls=[f"{url}/{how}/m/"], md5=sums)
    assert not [p for p in (isolated / "dl2").iterdir() if p.name.endswith(".part")]


def test_a_transfer_that_only_trickles_is_given_up(isolated, server):
    """Each read returns within the timeout, so only the rate over a window ends it."""
    root, url, _ = server
    sums = _serve_set(root / "m")
    dest = isolated / "dl"
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError, match=r"the transfer slowed to \d+ bytes/s"):
        data.download_dataset("mnist", dest, urls=[url + "/drip/m/"], md5=sums, timeout=0.5)
    assert time.monotonic() - start < 10
    assert not [p for p in dest.iterdir() if p.name.endswith(".part")]


def test_temporary_files_of_killed_downloads_are_removed_once_abandoned(isolated, server):
    """A download killed by SIGTERM cannot clean up; the next one removes its temporary file
    once nothing has written to it for an hour, and leaves a recent one (another process's)."""
    root, url, _ = server
    sums = _serve_set(root / "m")
    dest = isolated / "dl"
    dest.mkdir()
    old = dest / ".train-images-idx3-ubyte.gz.k1ll3d.part"
    recent = dest / ".t10k-images-idx3-ubyte.gz.4ct1v3.part"
    for p in (old, recent):
        p.write_bytes(b"partial")
    stale = time.time() - data.ABANDONED_PART_AGE - 60
    os.utime(old, (stale, stale))
    data.download_dataset("mnist", dest, urls=[url + "/m/"], md5=sums)
    assert not old.exists() and recent.exists()
    assert {p.name for p in dest.iterdir() if not p.name.startswith(".")} == set(sums)


def test_temporary_files_of_killed_runs_are_removed_once_abandoned(toy, tmp_path):
    from batchnorm.lab import results

    out = tmp_path / "run"
    args = ["lab", "run", toy, "--seeds", "2", "--out", str(out)]
    assert cli_main(args) == 0
    stale = time.time() - results.ABANDONED_TMP_AGE - 60
    old = [out / ".metrics.csv.k1ll3d.tmp", out / "parts" / ".seed-0.json.k1ll3d.tmp"]
    recent = out / ".series.json.4ct1v3.tmp"
    for p in [*old, recent]:
        p.write_bytes(b"partial")
    for p in old:
        os.utime(p, (stale, stale))
    assert cli_main(args) == 0
    assert not any(p.exists() for p in old) and recent.exists()


def test_download_404_and_tampered_file_are_clear_and_leave_no_file(isolated, server):
    root, url, _ = server
    sums = _serve_set(root / "m")
    dest = isolated / "dl"
    with pytest.raises(
        DatasetNotFoundError, match=r"/gone/train-images-idx3-ubyte.gz: HTTP Error 404"
    ):
        data.download_dataset("mnist", dest, urls=[url + "/gone/"], md5=sums)
    (root / "m" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not the published file")
    with pytest.raises(DatasetCorruptError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        data.download_dataset("mnist", dest, urls=[url + "/m/"], md5=sums)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        set(sums) - {"t10k-labels-idx1-ubyte.gz"}
    )


# --------------------------------------------------------------------------------------------
# progress bars


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_progress_bar_is_cleared_when_training_stops_early(error, capsys, monkeypatch):
    import torch
    from torch import nn

    from batchnorm.lab import train

    monkeypatch.delenv("BATCHNORM_PROGRESS", raising=False)  # the tests' default turns bars off
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))

    def stop(info):
        if info.step == 250:
            raise error

    try:
        train.train(
            model, opt, x, y, steps=1000, batch_size=8, callbacks=[stop], progress=True, desc="t"
        )
    except error:
        # read while the exception is being handled, as the command line prints its message
        err = capsys.readouterr().err
    else:
        raise AssertionError("training did not stop")
    assert "0/1000" in err  # the bar was drawn, on stderr
    # ... and its line cleared, so that the message printed next starts on a clean line
    assert err.rstrip(" ").endswith("\r"), repr(err[-80:])
    assert "/1000" not in err.rsplit("\r", 2)[-2]


# --------------------------------------------------------------------------------------------
# damaged dataset files: the message's remedy works when followed


def _damage_truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:500])


def _damage_header(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:6])


def _damage_magic(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(b"\x08\x03" + raw[2:])


def _damage_empty_set(p: Path) -> None:
    # a valid header of 0 images (and the labels file likewise)
    data.write_idx(p, np.zeros((0, 28, 28), dtype=np.uint8))
    data.write_idx(p.parent / "train-labels-idx1-ubyte", np.zeros(0, dtype=np.uint8))


@pytest.mark.parametrize(
    "damage", [_damage_truncate, _damage_header, _damage_magic, _damage_empty_set]
)
def test_a_damaged_idx_file_message_names_it_and_its_remedy_works(isolated, server, damage):
    root, url, _ = server
    sums = _serve_set(root / "m")
    # the set as --download leaves it in the user cache, then damaged (decompressed files)
    cache = isolated / "cache" / "batchnorm" / "mnist"
    data.download_dataset("mnist", cache, urls=[url + "/m/"], md5=sums)
    for gz in list(cache.glob("*.gz")):
        (cache / gz.stem).write_bytes(data._read_raw(gz))
        gz.unlink()
    bad = cache / "train-images-idx3-ubyte"
    damage(bad)
    with pytest.raises(DatasetCorruptError) as e:
        data.load_dataset("mnist", download=True)  # --download alone does not replace it
    msg = str(e.value)
    assert str(bad) in msg and re.search(r"delete (it|them) and fetch (it|them) again", msg)
    # the remedy, as written: delete, then --download
    for p in cache.iterdir():
        if p.name in msg:
            p.unlink()
    data.download_dataset("mnist", cache, urls=[url + "/m/"], md5=sums)  # what --download does
    assert data.load_dataset("mnist").x_train.shape == (20, 1, 28, 28)


@pytest.mark.parametrize("name", ["placement", "all"])
def test_an_empty_out_is_refused_not_taken_for_the_current_folder(
    name, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # an empty current folder would have taken the run's files
    assert cli_main(["lab", "run", name, "--quick", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "--out is empty" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# batchnorm.analysis on models it cannot measure


@pytest.mark.parametrize("frozen", [False, True])
def test_internal_covariate_shift_without_a_measurable_layer_says_so(frozen):
    import torch
    from torch import nn

    import batchnorm

    if frozen:  # every Linear frozen: fine-tuning only the BN layers
        model = nn.Sequential(nn.Linear(4, 8), batchnorm.BatchNorm1d(8), nn.Linear(8, 2))
        for m in (model[0], model[2]):
            m.requires_grad_(False)
    else:  # no Linear/Conv at all
        model = nn.Sequential(batchnorm.BatchNorm1d(4), nn.Tanh())
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out[:, :2], y)

    with pytest.raises(ValueError, match=r"Sequential has no nn\.Linear/nn\.ConvNd layer") as e:
        batchnorm.internal_covariate_shift(model, loss_fn, batch, update=0.1)
    assert "pass layers=[...]" in str(e.value)


# --------------------------------------------------------------------------------------------
# lab run all, interrupted on its first pass


def test_lab_run_all_interrupted_before_its_report_resumes(toy, tmp_path, capsys, monkeypatch):
    from batchnorm.lab import cli as lab_cli

    # two experiments only, the second registered for this test alone
    monkeypatch.setattr(registry, "_REGISTRY", {"usage-toy": registry._REGISTRY["usage-toy"]})
    monkeypatch.setattr(registry, "_BROKEN", {})
    registry.register("usage-toy-2", config=UsageToyConfig, figures=_toy_figures)(_toy_run)
    real = lab_cli._run_one

    def stopped_in_the_second(name, *args, **kwargs):
        if name == "usage-toy-2":
            raise KeyboardInterrupt  # Ctrl-C while the second experiment runs
        return real(name, *args, **kwargs)

    root = tmp_path / "all"
    argv = ["lab", "run", "all", "--quick", "--out", str(root)]
    monkeypatch.setattr(lab_cli, "_run_one", stopped_in_the_second)
    assert cli_main(argv) == 130
    assert "the same command resumes from them" in capsys.readouterr().err
    assert (root / "usage-toy" / "summary.json").is_file() and not (root / "report.md").exists()
    (root / ".report.md.x1y2.tmp").write_text("# batchnorm lab")  # a write cut short by a kill
    # ... and the same command does resume
    monkeypatch.setattr(lab_cli, "_run_one", real)
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert CALLS["n"] == 2  # usage-toy's run reused; usage-toy-2 computed now
    report = (root / "report.md").read_text()
    assert "usage-toy-2" in report and "Claims (2 of 2 supported)" in report
    # a folder of other files is still refused
    other = tmp_path / "other"
    (other / "usage-toy").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    assert cli_main(["lab", "run", "all", "--quick", "--out", str(other)]) == 2
    assert "holds no report of 'lab run all'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Ctrl-C in a terminal during sync-bn: SIGINT reaches the whole process group


def _sigint_as_a_shell_leaves_it() -> None:
    """In the child, before it runs: SIGINT with its default action and not blocked, as a
    shell starts a job. A child inherits both from the process that starts it, and a test
    worker that ran other tests before may have either changed; the command under test must
    see Ctrl-C as a terminal delivers it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_during_sync_bn_stops_at_once_in_one_line(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sync"
    cmd = [sys.executable, "-m", "batchnorm.cli", "lab", "run", "sync-bn", "--quick"]
    cmd += ["--dataset", "digits", "--out", str(out), "--set", "steps=100000"]
    cmd += ["--set", "group_timeout=200"]  # replicas left behind would hold the exit this long
    env = {**os.environ, "BATCHNORM_PROGRESS": "0"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=_sigint_as_a_shell_leaves_it,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the first group of replicas is training
            if "2 replicas" in line:
                break
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert took < 30, f"took {took:.0f} s to stop"
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"interrupted: the finished parts in {out} are kept; the same command resumes from them"
    ]
    # no replica outlives the run (the fork server and resource tracker leave with it)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        left = subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)], capture_output=True)
        raise AssertionError(f"processes left: {left.stdout.decode()}")


def test_ctrl_c_in_doctor_is_a_note_not_a_traceback(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "model.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))\n"
    )
    (tmp_path / "slow.py").write_text(
        "import sys, time, torch\n"
        "def batches():\n"
        "    print('reading', file=sys.stderr, flush=True)\n"
        "    while True:\n"
        "        time.sleep(0.2)\n"
        "        yield torch.randn(16, 4)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    cmd = [sys.executable, "-m", "batchnorm.cli", "doctor", "model.py:make"]
    cmd += ["--data", "slow:batches", "--num-batches", "1000"]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_a_shell_leaves_it,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the doctor is reading the data
            if "reading" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip() == "batchnorm doctor: interrupted"


# --------------------------------------------------------------------------------------------
# ActivationRecorder on a layer whose tensor has no such axis


@pytest.mark.parametrize("axis", [2, 3, -3])
def test_recorder_axis_beyond_the_tensor_names_the_layer_and_shape(axis):
    import torch
    from torch import nn

    import batchnorm

    net = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid())
    rec = batchnorm.ActivationRecorder(net, ["1"], axis=axis)
    with rec, pytest.raises(ValueError, match=rf"axis={axis} but layer '1' records a 2-D tensor"):
        net(torch.randn(8, 4))
    ok = batchnorm.ActivationRecorder(net, ["1"], axis=-1)  # the last axis: the 3 units
    with ok:
        net(torch.randn(8, 4))
    assert ok.history("1")[1].shape == (1, 3, 3)


@pytest.mark.parametrize("finished", [True, False])
def test_a_config_json_that_is_not_text_is_a_one_line_refusal(toy, tmp_path, capsys, finished):
    out = tmp_path / "run"
    if finished:
        registry.run_experiment(toy, out, log=lambda m: None)
    else:
        out.mkdir()
    (out / "config.json").write_bytes(b"\xff\xfe\x00 damaged")
    before = sorted(p.name for p in out.iterdir())
    code = cli_main(["lab", "run", toy, "--out", str(out)])
    err = capsys.readouterr().err
    # with results there or not: refused, nothing touched (whose file it is cannot be known)
    assert code == 2 and "Traceback" not in err
    assert "is not a lab run's config" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "config.json").read_bytes() == b"\xff\xfe\x00 damaged"


@pytest.mark.parametrize(
    "content", ['{"port": 8080}', "my notes", '{"experiment": "x", "config": {}, "more": 1}']
)
def test_a_folder_holding_someone_elses_config_json_is_not_taken_over(toy, tmp_path, content):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text(content)
    with pytest.raises(results.RunDirConflict, match="not a lab run's config"):
        registry.run_experiment(toy, out, log=lambda m: None)
    assert (out / "config.json").read_text() == content
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_lab_run_all_into_a_folder_it_cannot_create_stops_before_running(
    toy, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(registry, "_REGISTRY", {"usage-toy": registry._REGISTRY["usage-toy"]})
    monkeypatch.setattr(registry, "_BROKEN", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    root = blocker / "all"  # cannot be created: its parent is a file
    assert cli_main(["lab", "run", "all", "--quick", "--out", str(root)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"cannot create the folder {root}" in err and "nothing was run" in err
    assert CALLS["n"] == 0


@pytest.mark.parametrize("with_config", [False, True])
def test_a_run_killed_in_its_first_write_does_not_block_the_folder(
    toy, tmp_path, capsys, with_config
):
    out = tmp_path / "run"
    out.mkdir()
    # what a kill during the atomic write of config.json (or of a first part) leaves
    (out / ".config.json.k3j2.tmp").write_text('{"experiment": "usage-to')
    if with_config:  # config of other settings, nothing computed: taken over
        (out / "config.json").write_text(json.dumps({"experiment": toy, "config": {"steps": 9}}))
    assert cli_main(["lab", "run", toy, "--out", str(out)]) == 0, capsys.readouterr().err
    assert RunDir(out).complete


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_output_on_a_terminal_without_utf8_is_printed_not_a_traceback(encoding, monkeypatch):
    import io
    import sys

    from batchnorm._console import say

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding)
    monkeypatch.setattr(sys, "stdout", stream)
    say("dataset: digits — chosen by --dataset auto; 0.91 ± 0.01")
    stream.flush()
    text = raw.getvalue().decode(encoding)
    assert text.startswith("dataset: digits ? chosen by --dataset auto; 0.91 ")
    assert text.endswith(" 0.01\n")


@pytest.mark.parametrize("argv", [["--help"], ["lab", "run", "--help"], ["doctor", "--help"]])
def test_help_prints_on_an_ascii_terminal(argv):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm.cli", *argv], capture_output=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"usage: batchnorm")


def test_a_replica_sees_its_runner_gone_also_before_it_is_collected():
    """sync-bn's replicas end when the process running the experiment is gone; an exited
    process not yet collected by its parent (a zombie) counts as gone."""
    import os
    import subprocess
    import sys
    import time

    from batchnorm.lab.experiments.sync_bn import _alive

    assert _alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _alive(child.pid)
    finally:
        child.kill()
    deadline = time.monotonic() + 10
    while _alive(child.pid) and time.monotonic() < deadline:  # killed, not yet collected
        time.sleep(0.05)
    assert not _alive(child.pid)
    assert child.poll() is not None  # collected only now
    assert not _alive(child.pid)
