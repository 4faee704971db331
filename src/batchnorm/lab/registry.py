"""The experiment registry — how to add an experiment to the lab.

Adding an experiment is adding one file ``src/batchnorm/lab/experiments/<name>.py``; no shared
file is edited. Importing this module imports every module of :mod:`batchnorm.lab.experiments`
(``pkgutil``), and each registers itself::

    from dataclasses import dataclass
    from pathlib import Path
    from batchnorm.lab.config import BaseConfig
    from batchnorm.lab.registry import register
    from batchnorm.lab.results import Claim, Results, RunContext, RunData

    @dataclass
    class MyConfig(BaseConfig):          # dataset, data_dir, seeds, seed, quick, threads, …
        steps: int = 5000
        lr: float = 0.1
        QUICK = {"steps": 200}           # what --quick changes (a ClassVar of BaseConfig)

    def figures(run: RunData, out: Path) -> list[Path]:
        # reads only saved data (run.rows, run.series, run.summary); never trains
        ...

    @register("my-exp", config=MyConfig, figures=figures,
              source="Ioffe & Szegedy 2015, Sec. 4.2", description="one line for `lab list`")
    def run(cfg: MyConfig, ctx: RunContext) -> Results:
        ds = ctx.load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
        ...                               # train with batchnorm.lab.train.train(...)
        return Results(rows=[...], summary={"dataset": ds.info(), "arms": {...},
                                             "claims": [Claim(...)]}, series={...})

The pieces: :mod:`~batchnorm.lab.config` (typed configs, ``--set`` conversion),
:mod:`~batchnorm.lab.data` (datasets), :mod:`~batchnorm.lab.models` (MLP, small CNN),
:mod:`~batchnorm.lab.train` (the one training loop, step callbacks, divergence detection,
steps-to-target), :mod:`~batchnorm.lab.results` (run folders, ``Claim``, ``Results``,
``ctx.cached`` for resumable units of work), :mod:`~batchnorm.lab.plots` (figure primitives:
mean ± spread curves, grouped points with error bars, percentile bands),
:mod:`~batchnorm.lab.report` (Markdown + HTML reports, the combined report of ``lab run all``).

``run`` only computes: the framework writes ``config.json``, ``metrics.csv``, ``series.json``,
``summary.json`` (atomically), then calls ``figures`` on the reloaded run folder, then writes the
report. A module that fails to import is listed by ``lab list`` as broken with its error, and
does not stop the other experiments from working.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import pkgutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchnorm.lab.config import BaseConfig
from batchnorm.lab.results import Results, RunContext, RunData

__all__ = [
    "Experiment",
    "register",
    "get",
    "names",
    "all_experiments",
    "broken",
    "discover",
    "run_experiment",
    "code_fingerprint",
    "UnknownExperiment",
]

FiguresFn = Callable[[RunData, Path], list[Path]]
RunFn = Callable[[Any, RunContext], Results]


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its name, typed config class, ``run`` and ``figures``."""

    name: str
    config_cls: type[BaseConfig]
    run: RunFn
    figures: FiguresFn | None
    description: str
    source: str
    module: str


_REGISTRY: dict[str, Experiment] = {}
_BROKEN: dict[str, str] = {}


class UnknownExperiment(KeyError):
    """No experiment is registered under that name (the message lists the known ones)."""


def register(
    name: str,
    *,
    config: type[BaseConfig],
    description: str = "",
    source: str = "",
    figures: FiguresFn | None = None,
) -> Callable[[RunFn], RunFn]:
    """Decorator registering ``run(config, ctx) -> Results`` as experiment ``name``."""
    if not (isinstance(config, type) and issubclass(config, BaseConfig)):
        raise TypeError(f"register({name!r}): config must be a BaseConfig dataclass subclass")

    def deco(fn: RunFn) -> RunFn:
        old = _REGISTRY.get(name)
        if old is not None and old.module != fn.__module__:
            raise ValueError(
                f"experiment {name!r} is registered twice: by {old.module} and {fn.__module__}"
            )
        _REGISTRY[name] = Experiment(
            name,
            config,
            fn,
            figures,
            description or (fn.__doc__ or "").strip(),
            source,
            fn.__module__,
        )
        return fn

    return deco


def discover() -> None:
    """Import every module in :mod:`batchnorm.lab.experiments` (idempotent)."""
    import batchnorm.lab.experiments as pkg

    for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        if info.name in _BROKEN:
            continue
        try:
            importlib.import_module(info.name)
        except Exception:  # one broken file must not take the whole lab down
            _BROKEN[info.name] = traceback.format_exc(limit=3)


def get(name: str) -> Experiment:
    """The experiment registered as ``name``; ``KeyError`` listing the known names."""
    discover()
    if name not in _REGISTRY:
        hint = f" (broken modules: {', '.join(_BROKEN)})" if _BROKEN else ""
        raise UnknownExperiment(f"unknown experiment {name!r}; known: {', '.join(names())}{hint}")
    return _REGISTRY[name]


def names() -> list[str]:
    discover()
    return sorted(_REGISTRY)


def all_experiments() -> list[Experiment]:
    return [_REGISTRY[n] for n in names()]


def broken() -> dict[str, str]:
    """Experiment modules that failed to import, with their tracebacks."""
    discover()
    return dict(_BROKEN)


# package files that only present saved results (or run other experiments): editing them
# leaves every saved part valid
_PRESENTATION = {
    "cli.py",
    "_console.py",
    "bench.py",
    "bench_network.py",
    "keras.py",
    "lab/cli.py",
    "lab/plots.py",
    "lab/report.py",
    "lab/registry.py",
}


@functools.lru_cache(maxsize=256)
def _source_digest(path: str, mtime_ns: int, size: int) -> str:
    # Python's parsed tree, so that comments and formatting do not count as a change (other
    # sources, the C++ node's, as they are)
    text = Path(path).read_text(encoding="utf-8")
    tree = text
    if path.endswith(".py"):
        try:
            tree = ast.dump(ast.parse(text))
        except SyntaxError:
            pass
    return hashlib.sha256(tree.encode("utf-8")).hexdigest()


def code_fingerprint(module: str) -> str:
    """A short hash of the code that computes the results of the experiment defined in
    ``module``: that module, every module (and the C++ source) of the ``batchnorm`` package except
    the ones that only present results and the other experiments, and the torch and NumPy
    versions. A saved part
    is reused only under the same fingerprint (see :meth:`RunContext.cached
    <batchnorm.lab.results.RunContext.cached>`)."""
    import numpy
    import torch

    root, files = _fingerprinted(module)
    h = hashlib.sha256(f"torch {torch.__version__}; numpy {numpy.__version__}".encode())
    for f in files:
        st = f.stat()
        name = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        h.update(f"\n{name} {_source_digest(str(f), st.st_mtime_ns, st.st_size)}".encode())
    return h.hexdigest()[:16]


def _fingerprinted(module: str) -> tuple[Path, list[Path]]:
    """The package's folder and the source files :func:`code_fingerprint` hashes."""
    import batchnorm

    root = Path(batchnorm.__file__).resolve().parent
    mod = sys.modules.get(module)
    own = Path(mod.__file__).resolve() if mod is not None and mod.__file__ else None
    files = []
    # the C++ of the compiled training node computes too (the layers train through it)
    sources = [*root.rglob("*.py"), *root.rglob("*.cpp")]
    for f in sorted(sources):
        rel = f.relative_to(root).as_posix()
        if rel in _PRESENTATION:
            continue
        if rel.startswith("lab/experiments/") and not f.name.startswith("_") and f != own:
            continue
        files.append(f)
    if own is not None and own not in files:
        files.append(own)
    return root, files


def run_experiment(
    name: str,
    out: str | Path | None = None,
    *,
    quick: bool = False,
    sets: Any = (),
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
    command: str | None = None,
    **values: Any,
) -> Path:
    """Run experiment ``name`` into the folder ``out`` (default ``runs/<name>[-quick]``) and
    write its results, figures and report; returns the folder.

    ``values`` are typed config fields (``seeds=3``, ``dataset="digits"``; ``None`` = not given),
    ``sets`` are ``key=value`` strings converted to the fields' types. A folder holding the same
    config resumes (finished parts saved by the same code, see :func:`code_fingerprint`, are
    reused, others recomputed; a finished run only gets its figures and report re-rendered);
    a folder holding another run raises :class:`~batchnorm.lab.results.RunDirConflict` and is
    left untouched."""
    import time

    from batchnorm.lab.config import config_to_dict, make_config
    from batchnorm.lab.report import write_report
    from batchnorm.lab.results import RunDir, load_run

    say = log or print
    exp = get(name)
    cfg = make_config(exp.config_cls, quick=quick, sets=sets, **values)
    cfg_dict = config_to_dict(cfg)
    path = Path(out) if out is not None else Path("runs") / (name + ("-quick" if quick else ""))
    rd = RunDir(path)
    state = rd.prepare(name, cfg_dict)
    if state == "complete":
        say(f"{name}: {path} already holds this finished run; re-rendering figures and report")
    else:
        if state == "resume" and (path / "summary.json").exists():
            say(f"{name}: {rd.damaged()}; rebuilding the run's files from its parts")
        elif state == "resume":
            say(f"{name}: resuming the unfinished run in {path}")
        ctx = RunContext(rd, log=say, progress=progress, code=code_fingerprint(exp.module))
        t0 = time.perf_counter()
        results = exp.run(cfg, ctx)
        results.summary.setdefault("description", exp.description)
        results.summary.setdefault("source", exp.source)
        if command:
            results.summary.setdefault("command", command)
        rd.save_results(name, cfg_dict, results, time.perf_counter() - t0)
    run = load_run(path)
    figures = exp.figures(run, path) if exp.figures is not None else []
    write_report(run, figures)
    return path


# importing the registry finds every experiment (see the module docstring)
discover()
