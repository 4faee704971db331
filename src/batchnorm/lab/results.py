"""Run folders, atomic writes, resume-or-refuse, the :class:`Claim` type and the summary schema.

A run folder (``--out``, default ``runs/<experiment>[-quick]``) holds:

* ``config.json`` — the experiment name and its full config (written first);
* ``parts/*.json`` — finished units of work (one training run each) saved by
  :meth:`RunContext.cached`; an interrupted run resumes from them;
* ``metrics.csv`` — one row per evaluation point (``arm``, ``seed``, ``step``, … columns);
* ``series.json`` — extra arrays the figures need (e.g. recorded percentiles);
* ``summary.json`` — written last of these, so its presence means the run completed;
* figures (``*.png``), ``report.md`` and ``report.html`` — rendered from the files above after
  them (a re-run re-renders any that are missing).

Every file is written to a temporary file in the same folder and renamed with
:func:`os.replace`, so a reader never sees half a file.

Summary schema (``SUMMARY_SCHEMA``): ``{"schema", "experiment", "status": "complete",
"dataset": {name, source, sizes…}, "config", "seeds", "arms": {arm: {...}}, "claims": [Claim…],
"runtime_s", "finished", "files": {"metrics.csv": sha256, "series.json": sha256}, "summary_sha256"}``
plus anything experiment-specific (``summary_sha256``: the digest of the rest of the summary). A
re-run trusts a finished run only if those files and the summary still have the recorded digests
(:meth:`RunDir.damaged`); otherwise it rebuilds them from ``parts/``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Claim",
    "Results",
    "RunData",
    "RunDir",
    "RunContext",
    "RunDirConflict",
    "DamagedRunFile",
    "SUMMARY_SCHEMA",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "mean_std",
    "load_run",
]

SUMMARY_SCHEMA = 1
T = TypeVar("T")


class RunDirConflict(RuntimeError):
    """The ``--out`` folder cannot take this run: it holds a run of another experiment or
    config, or files of no run, or it is a file or cannot be created."""


# --------------------------------------------------------------------------------------------
# atomic writes


_MODE: list[int] = []


def usual_mode(fd: int) -> None:
    """Give a file made by ``tempfile.mkstemp`` (0600) the mode of a file made by ``open``
    (0666 less the umask), so results and reports are as readable as the user's other files."""
    if not _MODE:
        mask = os.umask(0)
        os.umask(mask)
        _MODE.append(0o666 & ~mask)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, _MODE[0])


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync, then ``os.replace``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        usual_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj: Any) -> Any:
    # NaN/inf are not JSON: store them as null (a diverged arm's loss, for instance)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):
        # NumPy arrays and scalars, torch tensors: nested lists, or a number for a 0-d one (a
        # one-element array stays a list: .item() would make it a number)
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # other scalars that only have .item()
        return _jsonable(obj.item())
    if isinstance(obj, Claim):
        return _jsonable(obj.to_dict())
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "min", "max", "n", "values"}`` over seeds (population std; ``None``
    values — diverged runs — are excluded from the statistics but kept in ``values``)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": values}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    return {
        "mean": m,
        "std": sd,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": list(values),
    }


# --------------------------------------------------------------------------------------------
# claims and results


@dataclass
class Claim:
    """A claim from the literature tested by an experiment.

    ``verdict`` must be computed from ``measured`` by the experiment (a comparison of numbers it
    measured), never typed in; ``details`` says how.

    Attributes:
        id: short identifier (``bn-faster``). statement: the claim in words.
        verdict: whether the measurements support it. measured: the numbers behind the verdict.
        source: where the claim comes from (``Ioffe & Szegedy 2015, Sec. 4.1, Fig. 1a``).
        seeds: the seeds measured. details: the rule that turned numbers into the verdict.
    """

    id: str
    statement: str
    verdict: bool
    measured: dict[str, Any]
    source: str = ""
    seeds: list[int] = field(default_factory=list)
    details: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, bool):
            # numpy/torch booleans are accepted but stored as bool
            self.verdict = bool(self.verdict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Claim:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Results:
    """What an experiment's ``run`` returns: data only, nothing plotted or written.

    Attributes:
        rows: metrics, one dict per evaluation point (saved as ``metrics.csv``).
        summary: must hold ``"dataset"`` (``Dataset.info()``), ``"claims"`` (list of
            :class:`Claim`) and should hold ``"arms"`` (per-arm final/best accuracy).
        series: extra JSON-able data for the figures (saved as ``series.json``).
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    series: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunData:
    """A finished run loaded back from its folder: what figures and reports read."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    series: dict[str, Any]

    @property
    def claims(self) -> list[Claim]:
        return [Claim.from_dict(c) for c in self.summary.get("claims", [])]

    def select(self, **where: Any) -> list[dict[str, Any]]:
        """Metric rows whose columns equal the given values."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in where.items())]


def _parse_cell(text: str) -> Any:
    if text == "":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text in ("True", "False"):
        return text == "True"
    return text


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


class DamagedRunFile(ValueError):
    """A file of a run folder that cannot be read back (truncated, edited, not JSON or CSV)."""


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedRunFile(f"{path}: damaged, not readable as JSON ({e})") from None


def _load_rows(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = []
            for r in reader:
                # a row with fewer or more cells than the header (a cut-off last line)
                if None in r or None in r.values():
                    raise DamagedRunFile(
                        f"{path}: damaged, line {reader.line_num} does not have the header's "
                        f"{len(reader.fieldnames or [])} columns"
                    )
                rows.append({k: _parse_cell(v) for k, v in r.items()})
    except (UnicodeDecodeError, csv.Error) as e:
        raise DamagedRunFile(f"{path}: damaged, not readable as CSV ({e})") from None
    return rows


def _content_digest(obj: Any) -> str:
    """SHA-256 of a JSON value's canonical text (sorted keys): the same after a round trip
    through a file, whatever its indentation."""
    text = json.dumps(obj, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (the summary records those of the files it completes)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Load a completed run folder (raises ``FileNotFoundError`` if it has no summary,
    :class:`DamagedRunFile` naming the file if one cannot be read back)."""
    p = Path(path)
    summary_path = p / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{p}: no summary.json — the run did not complete")
    config = _load_json(p / "config.json")
    summary = _load_json(summary_path)
    rows = _load_rows(p / "metrics.csv") if (p / "metrics.csv").is_file() else []
    series = _load_json(p / "series.json") if (p / "series.json").is_file() else {}
    return RunData(p, config, summary, rows, series)


# --------------------------------------------------------------------------------------------
# run folders

#: key prefix of the part recording the data a run found (not a result: see ``_nothing_computed``)
DATASET_PART = "dataset-"


def _is_run_config(obj: Any) -> bool:
    """What :meth:`RunDir.prepare` writes: ``{"experiment": name, "config": {...}}``."""
    return (
        isinstance(obj, dict)
        and set(obj) == {"experiment", "config"}
        and isinstance(obj["experiment"], str)
        and isinstance(obj["config"], dict)
    )


def part_path(folder: Path, key: str) -> Path:
    """``folder/parts/<key>.json``; a key with characters unsafe in file names gets them
    replaced and a hash of the key appended, so that two keys never share a file."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
    if safe != key:
        safe += "-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
    return folder / "parts" / f"{safe}.json"


def _read_part(path: Path, key: str, code: str | None) -> tuple[Any, str | None]:
    """``(value, None)`` if ``path`` holds a reusable part of ``key`` computed by ``code``, else
    ``(None, why)`` (``""`` when there is no part at all)."""
    if not path.is_file():
        return None, ""
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "is unreadable (damaged file)"
    if not isinstance(part, dict) or "value" not in part:
        return None, "is not in the part format"
    if part.get("key") != key:
        return None, f"holds the part {part.get('key')!r}"
    if part.get("code") != code:
        return None, "was computed by other code (the lab, the library, torch or NumPy changed)"
    return part["value"], None


def remove_abandoned(folder: Path, pattern: str, age: float) -> None:
    """Delete the temporary files matching ``pattern`` in ``folder`` that a killed process left
    behind: those not written to for ``age`` seconds (a live writer touches them sooner)."""
    now = time.time()
    for entry in folder.glob(pattern):
        try:
            if entry.is_file() and now - entry.stat().st_mtime > age:
                entry.unlink()
        except OSError:
            pass  # another process removed it first, or it is not ours to remove


# a temporary file of a run's atomic writes untouched this long was left by a killed run
ABANDONED_TMP_AGE = 3600.0


def _temporary(entry: Path) -> bool:
    """A temporary file of an atomic write (``.<name>.<random>.tmp``) left by a killed run."""
    return entry.is_file() and entry.name.startswith(".") and entry.name.endswith(".tmp")


class RunDir:
    """A run folder: creation, resume-or-refuse, atomic writes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def complete(self) -> bool:
        """A readable ``summary.json`` marking a finished run whose files are as the run wrote
        them (a damaged one is not trusted: the run is computed again from its parts and its
        files rewritten)."""
        return self.damaged() is None

    def damaged(self) -> str | None:
        """Why the folder does not hold a finished run that can be read back (``None``: it
        does): no summary, a summary that is unreadable or not marked complete, or a
        ``metrics.csv`` / ``series.json`` missing, changed since the summary recorded its
        digest, or unreadable."""
        try:
            summary = json.loads((self.path / "summary.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{self.path / 'summary.json'} is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"{self.path / 'summary.json'} is damaged"
        if not isinstance(summary, dict) or summary.get("status") != "complete":
            return f"{self.path / 'summary.json'} does not mark a finished run"
        recorded = summary.pop("summary_sha256", None)
        if recorded is not None and recorded != _content_digest(summary):
            return (
                f"{self.path / 'summary.json'} is damaged (its content changed after the run "
                "wrote it)"
            )
        files = summary.get("files")
        for name, digest in (files if isinstance(files, dict) else {}).items():
            try:
                same = file_digest(self.path / name) == digest
            except OSError:
                return f"{self.path / name} is missing"
            if not same:
                return f"{self.path / name} is damaged (it changed after the run wrote it)"
        try:
            load_run(self.path)
        except (OSError, ValueError) as e:
            return str(e)
        return None

    def prepare(self, experiment: str, config: dict[str, Any]) -> str:
        """Claim the folder for ``experiment`` with ``config``: returns ``"new"``, ``"resume"``
        (same experiment and config, unfinished: finished parts are reused) or ``"complete"``
        (same config, already finished). Raises :class:`RunDirConflict` if the folder holds a
        different run, so results of two configs never mix."""
        want = {"experiment": experiment, "config": config}
        cfg_path = self.path / "config.json"
        if cfg_path.is_file():
            try:
                have = json.loads(cfg_path.read_text(encoding="utf-8"))
            except ValueError:  # not JSON, or not even text (UnicodeDecodeError)
                have = None
            if not _is_run_config(have):
                raise RunDirConflict(
                    f"{cfg_path} is not a lab run's config (it must be a JSON object with "
                    '"experiment" and "config"); the folder was not touched. Choose '
                    "another --out."
                )
            if have != json.loads(json.dumps(_jsonable(want))) and self._nothing_computed():
                # a run that failed before its first result (a bad setting, a missing
                # dataset): nothing to protect, and the corrected command must not be refused;
                # the data that run found is no record of the new one's
                if (self.path / "parts").is_dir():
                    for record in (self.path / "parts").iterdir():
                        record.unlink()
                atomic_write_json(cfg_path, want)
                return "new"
            if have != json.loads(json.dumps(_jsonable(want))):
                diff = self._diff(have, want)
                raise RunDirConflict(
                    f"{self.path} already holds a different run ({diff}); it was not touched. "
                    "Choose another --out, or delete that folder to start over."
                )
            for folder in (self.path, self.path / "parts"):
                if folder.is_dir():
                    remove_abandoned(folder, ".*.tmp", ABANDONED_TMP_AGE)
            return "complete" if self.complete else "resume"
        if self.path.exists() and not self.path.is_dir():
            raise RunDirConflict(f"{self.path} is a file, not a folder. Choose another --out.")
        if self.path.exists() and any(not _temporary(e) for e in self.path.iterdir()):
            raise RunDirConflict(
                f"{self.path} exists, is not empty and has no config.json: not a run folder. "
                "Choose another --out."
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cfg_path, want)
        except OSError as e:
            raise RunDirConflict(
                f"cannot create the run folder {self.path}: {e.strerror or e}. "
                "Choose another --out (a folder you can write to)."
            ) from e
        return "new"

    def _nothing_computed(self) -> bool:
        """The folder holds a config.json and nothing else (a ``parts/`` holding at most the
        record of the data found, which a run writes before its first result)."""
        for entry in self.path.iterdir():
            if entry.name == "config.json" or _temporary(entry):
                continue
            if entry.name == "parts" and entry.is_dir():
                # (a temporary file of an interrupted write is ".<name>.<random>.tmp")
                if all(f.name.lstrip(".").startswith(DATASET_PART) for f in entry.iterdir()):
                    continue
            return False
        return True

    @staticmethod
    def _diff(have: dict[str, Any], want: dict[str, Any]) -> str:
        if have.get("experiment") != want["experiment"]:
            return f"experiment {have.get('experiment')!r}, not {want['experiment']!r}"
        a, b = have.get("config", {}), json.loads(json.dumps(_jsonable(want["config"])))
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "config differs in " + ", ".join(
            f"{k}: {a.get(k)!r} there vs {b.get(k)!r} now" for k in keys
        )

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_json(self.path / name, obj)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        atomic_write_text(self.path / name, text)
        return self.path / name

    def write_rows(self, name: str, rows: Sequence[dict[str, Any]]) -> Path:
        return self.write_text(name, rows_to_csv([_jsonable(r) for r in rows]))

    def save_results(
        self,
        experiment: str,
        config: dict[str, Any],
        results: Results,
        runtime_s: float,
    ) -> Path:
        """Write metrics and series, then the summary (last: its presence marks completion)."""
        summary = dict(results.summary)
        for key in ("dataset", "claims"):
            if key not in summary:
                raise ValueError(f"{experiment}: run() returned a summary without {key!r}")
        claims = [c if isinstance(c, Claim) else Claim.from_dict(c) for c in summary["claims"]]
        first, count = int(config.get("seed", 0)), int(config.get("seeds", 1))
        seeds = summary.pop("seeds", list(range(first, first + count)))
        for c in claims:
            if not c.seeds:
                c.seeds = list(seeds)
        written = [self.write_rows("metrics.csv", results.rows)]
        written.append(self.write_json("series.json", results.series))
        full = {
            "schema": SUMMARY_SCHEMA,
            "experiment": experiment,
            "status": "complete",
            "dataset": summary.pop("dataset"),
            "config": config,
            "seeds": list(seeds),
            "arms": summary.pop("arms", {}),
            "claims": [c.to_dict() for c in claims],
            "runtime_s": round(runtime_s, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        summary.pop("claims")
        full.update(summary)
        # what a re-run checks before it trusts them (see ``damaged``); set last, so that no
        # experiment's own key of that name can stand in for it
        full["files"] = {p.name: file_digest(p) for p in written}
        # and its own content's, so that a hand-edited verdict is not trusted either
        full = _jsonable(full)
        full["summary_sha256"] = _content_digest(full)
        return self.write_json("summary.json", full)


class RunContext:
    """What ``run(config, ctx)`` gets besides its config: logging, data loading, and
    :meth:`cached` — finished units of work survive an interruption and are reused on resume.

    ``ctx.progress`` tells the training loop whether to show a progress bar; ``code``
    fingerprints the code computing the run (:func:`batchnorm.lab.registry.code_fingerprint`):
    saved parts are reused only under the same one."""

    def __init__(
        self,
        run_dir: RunDir | None = None,
        *,
        log: Callable[[str], None] | None = None,
        progress: bool | None = None,
        code: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.code = code
        self._log = log or (lambda msg: None)
        self.progress = progress
        self.datasets: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        self._log(msg)

    def cached(self, key: str, fn: Callable[[], T]) -> T:
        """``fn()``'s JSON-able result, saved under ``parts/<key>.json`` with ``key`` and the
        fingerprint of the code that computed it (``code``); loaded instead of recomputed when
        a part of that key and code exists (a resumed run). A part that is unreadable, holds
        another key (two keys that map to one file name) or was computed by other code (an
        edit of the lab or the library, another torch or NumPy) is recomputed and replaced, so
        a run never mixes results of two versions of the code."""
        if self.run_dir is None:
            return fn()
        path = part_path(self.run_dir.path, key)
        saved, why = _read_part(path, key, self.code)
        if why is None:
            data: T = saved
            return data
        if why:
            self.log(f"  part {key!r} {why}; computing it again")
        value = fn()
        atomic_write_json(path, {"key": key, "code": self.code, "value": value})
        loaded: T = json.loads(path.read_text())["value"]  # same types on first run and resume
        return loaded

    def load_dataset(self, name: str, data_dir: str | None = None, download: bool = False) -> Any:
        """Load (once per run) and log the dataset actually used."""
        from batchnorm.lab.data import load_dataset

        key = f"{name}|{data_dir}|{download}"
        if key not in self.datasets:
            ds = load_dataset(name, data_dir, download=download)
            self.log(
                f"dataset: {ds.name} ({ds.source}; {ds.x_train.shape[0]} train / "
                f"{ds.x_test.shape[0]} held-out)"
                + (" — chosen by --dataset auto" if name == "auto" else "")
            )
            # the config names what was asked for ("auto", a folder); a resumed run must go on
            # with the data its saved parts were computed on
            found = {
                "name": ds.name,
                "source": str(ds.source),
                "train": list(ds.x_train.shape),
                "test": list(ds.x_test.shape),
                "sha256": ds.fingerprint(),  # files of the same shapes, other content
            }
            first = self.cached(f"{DATASET_PART}{key}", lambda: found)
            if any(first.get(k, v) != v for k, v in found.items()):  # (records before sha256)
                raise RunDirConflict(
                    f"the saved parts of this run were computed on {_data_seen(first)}, but "
                    f"--dataset {name} now finds {_data_seen(found, first)}; the folder was "
                    "not changed. Make the same data available again, or choose another --out "
                    "to start over."
                )
            self.datasets[key] = ds
        return self.datasets[key]


def _data_seen(record: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """``name (source, N train)`` of a dataset record; against an earlier record of the same
    name, source and sizes, what differs is the content."""
    text = f"{record['name']} ({record['source']}, {record['train'][0]} train"
    same_look = before is not None and all(
        before.get(k) == record[k] for k in ("name", "source", "train", "test")
    )
    if same_look:
        text += ", the same sizes but other values: the files were replaced"
    return text + ")"


def iter_claims(runs: Iterable[RunData]) -> Iterable[tuple[RunData, Claim]]:
    for r in runs:
        for c in r.claims:
            yield r, c
