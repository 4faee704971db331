"""``batchnorm lab``: list and run the experiments.

    batchnorm lab list
    batchnorm lab run NAME [--quick] [--seeds K] [--dataset D] [--data-dir P] [--download]
                           [--out DIR] [--set key=value ...]
    batchnorm lab run all [--quick] ...      # every experiment + one combined report

Each run writes into its ``--out`` folder (default ``runs/NAME`` or ``runs/NAME-quick``):
``config.json``, ``metrics.csv``, ``series.json``, ``summary.json``, figures (PNG),
``report.md`` and ``report.html``. Re-running with the same ``--out`` and config resumes (or
only re-renders a finished run); another config there is refused.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from batchnorm._console import allocation_failure
from batchnorm._console import say as _say
from batchnorm.lab.data import DATASET_NAMES
from batchnorm.lab.report import COMBINED_TITLE

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="{list,run}")
    sub.add_parser("list", help="list the experiments")
    run = sub.add_parser(
        "run",
        help="run an experiment (or 'all')",
        description="Run an experiment and write its results, figures and report.",
    )
    # optional here so that a name after --set's values is found (see _name)
    run.add_argument("name", nargs="?", help="experiment name (see 'batchnorm lab list') or 'all'")
    run.add_argument("--quick", action="store_true", help="smoke size: well under a minute")
    run.add_argument("--seeds", type=int, default=None, help="number of seeds (mean +/- spread)")
    run.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        default=None,
        help="dataset (default auto: MNIST if found, else Fashion-MNIST, else digits)",
    )
    run.add_argument("--data-dir", default=None, help="folder holding the IDX files")
    run.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="fetch MNIST / Fashion-MNIST (checksums verified) if not found",
    )
    run.add_argument("--out", default=None, help="run folder (default runs/NAME[-quick])")
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable); unknown keys are errors",
    )


def _flat(sets: list[list[str]]) -> list[str]:
    return [s for group in sets for s in group]


def _name(args: argparse.Namespace) -> str | None:
    """The experiment name; ``--set k=v NAME`` leaves it among --set's values (``nargs='+'``),
    where it is the one item without ``=``."""
    if args.name is not None:
        return str(args.name)
    for group in reversed(args.sets):
        if group and "=" not in group[-1]:
            return group.pop()
    return None


def _cmd_list() -> int:
    from batchnorm.lab import registry

    for exp in registry.all_experiments():
        _say(f"{exp.name:24s} {exp.description}")
        if exp.source:
            _say(f"{'':24s} source: {exp.source}")
    for mod, err in registry.broken().items():
        last = err.strip().splitlines()[-1]
        _say(f"{mod} (broken: {last})", err=True)
    return 0


def _print_claims(path: Path) -> None:
    from batchnorm.lab.report import format_value
    from batchnorm.lab.results import load_run

    run = load_run(path)
    _say(f"dataset used: {run.summary['dataset'].get('name')}")
    for c in run.claims:
        mark = "SUPPORTED    " if c.verdict else "NOT SUPPORTED"
        _say(f"  [{mark}] {c.statement} — {format_value(c.measured)}")
    _say(f"report: {path / 'report.md'}")


def _run_one(name: str, args: argparse.Namespace, out: Any, command: str) -> Path:
    from batchnorm.lab import registry

    return registry.run_experiment(
        name,
        out,
        quick=args.quick,
        sets=_flat(args.sets),
        log=_say,
        command=command,
        seeds=args.seeds,
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
    )


def _file_error(e: OSError) -> bool:
    """Whether ``e`` is about files (a folder that cannot be written, a full disk), not another
    operating-system error such as a timeout or a broken connection."""
    import errno

    files = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError)
    if isinstance(e, (*files, NotADirectoryError)) or e.filename is not None:
        return True
    return e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _file_problem(e: OSError, where: str) -> str:
    """What went wrong with a file: the run's own files in ``where``, or, when the error names
    a file elsewhere (a data folder, a cache), that file."""
    import os
    from pathlib import Path

    name = e.filename
    if name is not None and not Path(os.path.abspath(name)).is_relative_to(os.path.abspath(where)):
        return f"{name}: {e.strerror or e}"
    return f"cannot write the run's files in {where}: {e.strerror or e}"


def _cmd_run(args: argparse.Namespace) -> int:
    from batchnorm.lab.config import ConfigError
    from batchnorm.lab.data import DatasetCorruptError, DatasetNotFoundError
    from batchnorm.lab.registry import UnknownExperiment
    from batchnorm.lab.results import RunDirConflict

    name = _name(args)
    if name is None:
        _say("batchnorm lab run: error: an experiment name (or 'all') is required", err=True)
        return 2
    args.name = name
    if args.out is not None and not args.out.strip():
        # Path("") is the current folder: an unset shell variable ("--out $OUT") would put the
        # run's files among whatever is there
        _say(
            "batchnorm lab run: error: --out is empty; give a folder, or leave --out out for "
            f"the default runs/{name}{'-quick' if args.quick else ''}",
            err=True,
        )
        return 2
    if args.data_dir is not None and not args.data_dir.strip():
        # as --out: Path("") is the current folder, searched first without a word
        _say(
            "batchnorm lab run: error: --data-dir is empty; give the folder holding the IDX "
            "files, or leave --data-dir out for the usual search",
            err=True,
        )
        return 2
    command = _command(args)
    # a KeyError from inside a run is a bug and keeps its traceback; only an unknown name is
    # the user's error
    expected = (
        ConfigError,
        DatasetNotFoundError,
        DatasetCorruptError,
        RunDirConflict,
        UnknownExperiment,
        TimeoutError,  # a process group slower than --set group_timeout (its message says so)
    )
    where = args.out or f"runs/{name}{'-quick' if args.quick else ''}"
    if name != "all":
        try:
            path = _run_one(name, args, args.out, command)
        except expected as e:
            msg = e.args[0] if isinstance(e, UnknownExperiment) and e.args else str(e)
            _say(f"error: {msg}", err=True)
            return 2
        except (RuntimeError, MemoryError) as e:  # --set sizes beyond the machine's memory
            too_big = allocation_failure(e)
            if too_big is None:
                raise
            _say(f"error: {too_big} (--set)", err=True)
            return 2
        except OSError as e:  # e.g. re-rendering a finished run in a read-only folder
            if not _file_error(e):
                raise  # not about the run's files: its traceback says where
            _say(f"error: {_file_problem(e, where)}", err=True)
            return 2
        except KeyboardInterrupt:
            _interrupted(where)
            return 130
        _print_claims(path)
        return 0
    return _cmd_run_all(args, command)


def _interrupted(where: str) -> None:
    _say(
        f"interrupted: the finished parts in {where} are kept; the same command resumes from them",
        err=True,
    )


def _all_root(root: Path) -> str | None:
    """Why ``root`` cannot hold the combined report of ``lab run all`` (None: it can): it must
    be new, empty, or a folder ``lab run all`` wrote before."""
    if not root.exists():
        return None
    if not root.is_dir():
        return f"{root} is a file, not a folder"
    if not any(root.iterdir()):
        return None
    report = root / "report.md"
    if report.is_file():
        with report.open(encoding="utf-8", errors="replace") as f:
            if f.readline().strip() == f"# {COMBINED_TITLE}":
                return None
    elif _only_run_folders(root):
        return None  # a first 'lab run all' interrupted before its report: resume it
    return f"{root} exists, is not empty and holds no report of 'lab run all'"


def _only_run_folders(root: Path) -> bool:
    """Every entry of ``root`` is the run folder of the experiment it is named after (or its
    still empty folder): what ``lab run all`` leaves when stopped before its report."""
    from batchnorm.lab import registry
    from batchnorm.lab.results import _load_json, _temporary

    names = set(registry.names())
    for entry in root.iterdir():
        if _temporary(entry):
            continue  # an atomic write of the report, cut short by a kill
        if not (entry.is_dir() and entry.name in names):
            return False
        if not any(entry.iterdir()):
            continue
        try:
            have = _load_json(entry / "config.json")
        except (OSError, ValueError):  # missing, or damaged (DamagedRunFile)
            return False
        if not (isinstance(have, dict) and have.get("experiment") == entry.name):
            return False
    return True


def report_figures(path: Path) -> list[Path]:
    """The figures a run folder's own report shows, in its order (the experiment's): a PNG
    left there by an earlier version of the experiment (another file name) is not one of
    them."""
    md = path / "report.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else ""
    shown = dict.fromkeys(re.findall(r"\]\(([^()/]+\.png)\)", text))  # first mention, once
    return [path / name for name in shown if (path / name).is_file()]


def _cmd_run_all(args: argparse.Namespace, command: str) -> int:
    from batchnorm.lab import registry
    from batchnorm.lab.report import write_combined_report
    from batchnorm.lab.results import RunData, load_run

    root = Path(args.out) if args.out else Path("runs") / ("all-quick" if args.quick else "all")
    refused = _settings_refused(args)
    if refused:  # a bad --set: one line per experiment it fails, before an hour of runs
        for line in refused:
            _say(f"error: {line}", err=True)
        _say("nothing was run", err=True)
        return 2
    why = _all_root(root)
    if why is not None:  # its files (a report.md of the user's) would be overwritten
        _say(f"error: {why}; nothing was run. Choose another --out.", err=True)
        return 2
    try:  # before an hour of experiments, not when writing their combined report
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _say(
            f"error: cannot create the folder {root}: {e.strerror or e}; nothing was run. "
            "Choose another --out (a folder you can write to).",
            err=True,
        )
        return 2
    done: list[tuple[RunData, list[Path]]] = []
    failures: list[tuple[str, str]] = []
    try:
        for name in registry.names():
            _say(f"== {name}")
            try:
                path = _run_one(name, args, root / name, command)
            except Exception as e:  # one failing experiment must not hide the others' results
                failures.append((name, f"{type(e).__name__}: {e}"))
                first = next((n for n, msg in failures[:-1] if msg == failures[-1][1]), None)
                if first is None:
                    _say(f"error: {name}: {type(e).__name__}: {e}", err=True)
                else:  # (a missing dataset: every experiment that reads it says the same)
                    _say(f"error: {name}: the same error as {first}", err=True)
                continue
            run = load_run(path)
            figs = report_figures(path)
            done.append((run, figs))
            _print_claims(path)
    except KeyboardInterrupt:
        _interrupted(str(root))
        return 130
    for mod, err in registry.broken().items():
        failures.append((mod, err.strip().splitlines()[-1]))
    if not done and (root / "report.md").is_file():
        _say(
            f"no experiment finished; the combined report in {root} was left as it was",
            err=True,
        )
        return 1
    settings = {
        "quick": args.quick,
        "seeds": args.seeds or "default",
        "dataset": args.dataset or "auto",
        "sets": " ".join(_flat(args.sets)) or "none",
    }
    try:
        md, _ = write_combined_report(root, done, failures, settings)
    except OSError as e:  # e.g. the disk filled up
        _say(f"error: cannot write the combined report in {root}: {e.strerror or e}", err=True)
        return 2
    _say(f"combined report: {md}")
    return 1 if failures else 0


def _settings_refused(args: argparse.Namespace) -> list[str]:
    """The settings of ``lab run all`` that an experiment's config refuses, one line per
    experiment (the same line once), built as each run will build its config."""
    from batchnorm.lab import registry
    from batchnorm.lab.config import ConfigError, make_config

    refused: dict[str, list[str]] = {}
    for name in registry.names():
        try:
            make_config(
                registry.get(name).config_cls,
                quick=args.quick,
                sets=_flat(args.sets),
                seeds=args.seeds,
                dataset=args.dataset,
                data_dir=args.data_dir,
                download=args.download,
            )
        except ConfigError as e:
            refused.setdefault(str(e), []).append(name)
    return [f"{', '.join(names)}: {msg}" for msg, names in refused.items()]


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (recorded in the summary and report)."""
    parts = ["batchnorm", "lab", "run", args.name]
    if args.quick:
        parts.append("--quick")
    for flag in ("seeds", "dataset", "data_dir", "out"):
        v = getattr(args, flag)
        if v is not None:
            parts += ["--" + flag.replace("_", "-"), str(v)]
    if args.download:
        parts.append("--download")
    for s in _flat(args.sets):
        parts += ["--set", s]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    if args.lab_command == "list":
        return _cmd_list()
    if args.lab_command == "run":
        return _cmd_run(args)
    print("usage: batchnorm lab {list,run} ...  (see batchnorm lab --help)", file=sys.stderr)
    return 2
