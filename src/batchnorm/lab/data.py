"""Datasets for the lab: MNIST and Fashion-MNIST from IDX files, scikit-learn's 8×8 digits
(bundled, always available offline) and a synthetic generator for tests.

Names accepted by ``--dataset`` (:data:`DATASET_NAMES`):

* ``auto`` — the first IDX set found in the places below, in their order (MNIST's folder before
  Fashion-MNIST's within each place), else ``digits``. The choice is printed by the CLI and
  written into every result (``Dataset.name``): never a silent substitution.
* ``mnist`` / ``fashion-mnist`` — the four IDX files (gzipped or not) looked up, in this order, in
  ``data_dir`` (``--data-dir``; the files directly in it or in ``data_dir/<name>/``),
  ``$BATCHNORM_DATA_DIR`` (same two forms), the user cache ``$XDG_CACHE_HOME/batchnorm/<name>/``
  (default ``~/.cache/batchnorm/<name>/``, where ``--download`` stores them) and
  ``/usr/share/datasets/<name>/`` (Debian's ``dataset-fashion-mnist`` installs there). A
  ``data_dir`` or ``$BATCHNORM_DATA_DIR`` that is not a folder, or cannot be entered, is an
  error, not skipped.

Both datasets use the same file names, so the files found are identified by content: the MD5 of
each file (and of its decompressed content) is compared with the published ones
(:data:`IDX_SOURCES`). Files of the other dataset than the one requested are refused
(:class:`DatasetMismatchError`). Files matching no published checksum (your own IDX files) are
loaded under the requested name; under ``auto`` they are named by their folder
(``…/mnist/``, ``…/fashion-mnist/``) or else reported as :data:`UNIDENTIFIED`.
* ``digits`` — scikit-learn's 1,797 8×8 digits, split 80/20 (stratified, fixed seed).
* ``synthetic`` — Gaussian class clusters shaped like 8×8 images; for tests.

Every image set is returned as a :class:`Dataset` of float32 tensors in ``(N, C, H, W)`` with
pixel values scaled to [0, 1] and int64 labels (IDX images: uint8 pixels divided by 255, or
floats already in [0, 1]; other pixel types, and labels that are not non-negative integers,
are refused with :class:`DatasetCorruptError`).

Example::

    >>> from batchnorm.lab import data
    >>> ds = data.load_dataset("synthetic", seed=0)
    >>> ds.x_train.shape[1:], ds.num_classes
    (torch.Size([1, 8, 8]), 10)
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import math
import os
import socket
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from batchnorm._console import say
from batchnorm.lab.results import remove_abandoned, usual_mode

__all__ = [
    "DATASET_NAMES",
    "IDX_SOURCES",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetCorruptError",
    "DatasetMismatchError",
    "UNIDENTIFIED",
    "identify_idx_files",
    "read_idx",
    "write_idx",
    "find_idx_files",
    "download_dataset",
    "load_dataset",
    "search_dirs",
]

DATASET_NAMES = ("auto", "mnist", "fashion-mnist", "digits", "synthetic")

# The four files of an IDX dataset, by role.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxSource:
    """Where a dataset is published, the MD5 of each published ``.gz`` file (``md5``) and of its
    decompressed content (``raw_md5``, keyed by the name without ``.gz``)."""

    urls: tuple[str, ...]
    md5: dict[str, str]
    homepage: str
    raw_md5: dict[str, str] = field(default_factory=dict)


# Canonical locations and the checksums published with them (the same ones torchvision uses).
IDX_SOURCES: dict[str, IdxSource] = {
    "mnist": IdxSource(
        urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        homepage="http://yann.lecun.com/exdb/mnist/",
        raw_md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
    ),
    "fashion-mnist": IdxSource(
        urls=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        raw_md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
    ),
}

SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
ENV_DATA_DIR = "BATCHNORM_DATA_DIR"

# ``Dataset.name`` under ``--dataset auto`` for IDX files that match no published checksum and do
# not sit in a folder named after a dataset: what they are is not known, so no name is claimed.
UNIDENTIFIED = "unidentified IDX files"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found; the message lists where they were looked for and how
    to get them."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but cannot be read as IDX (truncated, wrong magic, mismatched
    sizes) or a download does not match its published checksum."""


class DatasetMismatchError(DatasetNotFoundError):
    """The files found for the requested dataset are, by their published checksums, those of the
    other dataset (MNIST and Fashion-MNIST share the file names)."""


@dataclass(frozen=True)
class Dataset:
    """An image classification dataset held as tensors.

    Attributes:
        name: the dataset actually used (``mnist``, ``fashion-mnist``, ``digits``, ``synthetic``,
            or :data:`UNIDENTIFIED` for unknown IDX files under ``auto``).
        x_train, x_test: float32 ``(N, C, H, W)`` in [0, 1]. y_train, y_test: int64 ``(N,)``.
        num_classes: number of labels. source: where the data came from (files or generator).
        split: ``"test"`` for the official held-out set, ``"validation"`` for a split carved
        from the training set by :meth:`validation_split`.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    source: str
    split: str = "test"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one example."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_features(self) -> int:
        """``C·H·W``: the input size of an MLP on flattened images."""
        return int(np.prod(self.input_shape))

    def info(self) -> dict[str, Any]:
        """What goes into every result file: name, source, sizes, split."""
        return {
            "name": self.name,
            "source": self.source,
            "train_size": int(self.x_train.shape[0]),
            "heldout_size": int(self.x_test.shape[0]),
            "heldout_split": self.split,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            **self.extra,
        }

    def validation_split(self, fraction: float = 1 / 6, seed: int = 0) -> Dataset:
        """A dataset whose held-out set is a random ``fraction`` of this training set and whose
        training set is the rest — for choosing hyperparameters without touching the test set."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
        n = self.x_train.shape[0]
        n_val = max(1, int(round(n * fraction)))
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        val, tr = perm[:n_val], perm[n_val:]
        return replace(
            self,
            x_train=self.x_train[tr],
            y_train=self.y_train[tr],
            x_test=self.x_train[val],
            y_test=self.y_train[val],
            split="validation",
        )

    def fingerprint(self) -> str:
        """SHA-256 of the four tensors' shapes and values: equal exactly when the examples,
        labels and split are (a resumed run checks it against the data its parts used)."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            a = np.ascontiguousarray(t.detach().cpu().numpy())
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train`` / ``test`` examples (smoke runs)."""
        return replace(
            self,
            x_train=self.x_train[:train],
            y_train=self.y_train[:train],
            x_test=self.x_test[:test],
            y_test=self.y_test[:test],
        )


# --------------------------------------------------------------------------------------------
# IDX files

_IDX_DTYPES: dict[int, tuple[type, str]] = {
    0x08: (np.uint8, ">u1"),
    0x09: (np.int8, ">i1"),
    0x0B: (np.int16, ">i2"),
    0x0C: (np.int32, ">i4"),
    0x0D: (np.float32, ">f4"),
    0x0E: (np.float64, ">f8"),
}


def _open(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw): a big-endian header ``0x00 0x00 dtype ndim``, ``ndim``
    uint32 sizes, then the data. Raises :class:`DatasetCorruptError` naming the file and the
    problem."""
    p = Path(path)
    return _parse_idx(p, _read_raw(p))


def _read_raw(p: Path) -> bytes:
    """The content of ``p``, decompressed if it is a ``.gz``."""
    try:
        with _open(p) as f:
            raw: bytes = f.read()
    except PermissionError as e:
        raise DatasetCorruptError(
            f"{p}: cannot read ({e.strerror or e}); make it readable (chmod a+r {p})"
        ) from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetCorruptError(f"{p}: cannot read ({e}); {_remedy(p)}") from e
    return raw


def _remedy(p: Path, it: str = "it") -> str:
    """What to do about the damaged file ``p`` (``it="them"``: the files of its set), by where
    it is: ``--download`` replaces only this program's downloads in the user cache, never a
    file of yours or of the system."""
    path = Path(os.path.abspath(p))
    cache = Path(os.path.abspath(_cache_root()))
    if path.is_relative_to(cache):
        return f"delete {it} and fetch {it} again (--download)"
    fetch = f"leave --data-dir and ${ENV_DATA_DIR} out and use --download (fetches into {cache})"
    if path.is_relative_to(Path(os.path.abspath(SYSTEM_DATA_ROOT))):
        return (
            f"{'it belongs' if it == 'it' else 'they belong'} to the system: reinstall the package that installed it (Fashion-MNIST: "
            "apt-get install --reinstall dataset-fashion-mnist), or put intact files in a "
            "folder and pass --data-dir FOLDER"
        )
    return f"replace {it} with {'an intact copy' if it == 'it' else 'intact copies'}, or {fetch}"


#: the most classes a labels file may name: every class is an output of the classifiers
MAX_CLASSES = 1 << 16
#: the most dimensions an IDX header may declare (NumPy's limit)
MAX_IDX_DIMS = 64


def _parse_idx(p: Path, raw: bytes) -> np.ndarray:
    if raw[:2] == b"\x1f\x8b":
        raise DatasetCorruptError(
            f"{p}: a gzip-compressed file without the .gz suffix; rename it to {p.name}.gz "
            "(or decompress it: gunzip -c)"
        )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetCorruptError(
            f"{p}: not an IDX file (bad magic {raw[:4].hex() or 'empty'}); {_remedy(p)}"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]][1])
    ndim = raw[3]
    if ndim > MAX_IDX_DIMS:
        raise DatasetCorruptError(
            f"{p}: IDX header declares {ndim} dimensions (at most {MAX_IDX_DIMS} can be read); "
            f"the file is corrupt — {_remedy(p)}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{p}: truncated IDX header; {_remedy(p)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: sizes of 2**32 must not wrap
    if len(raw) - header != expected:
        raise DatasetCorruptError(
            f"{p}: IDX header says shape {dims} ({expected} data bytes) but the file has "
            f"{len(raw) - header}; the file is truncated or corrupt — {_remedy(p)}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if the name ends in ``.gz``); used by tests and
    to cache data sets."""
    p = Path(path)
    arr = np.asarray(array)
    code = next((c for c, (t, _) in _IDX_DTYPES.items() if np.dtype(t) == arr.dtype), None)
    if code is None:
        raise ValueError(f"write_idx: unsupported dtype {arr.dtype}")
    big = arr.astype(_IDX_DTYPES[code][1])
    payload = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += big.tobytes()
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "wb") as f:
        f.write(payload)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchnorm"


def _places(
    names: Sequence[str], data_dir: str | os.PathLike[str] | None = None
) -> list[list[Path]]:
    """The places looked in, in order, each a list of folders: ``data_dir`` and
    ``$BATCHNORM_DATA_DIR`` (the folder itself, then its ``<name>/`` subfolders), the user
    cache and the system folder (their ``<name>/`` subfolders). Within a place the folders
    follow ``names``."""
    places: list[list[Path]] = []
    for root in (data_dir, os.environ.get(ENV_DATA_DIR) or None):
        if root is not None:
            places.append([Path(root), *(Path(root) / n for n in names)])
    places.append([_cache_root() / n for n in names])
    places.append([SYSTEM_DATA_ROOT / n for n in names])
    return places


def search_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories looked in for dataset ``name``, in order."""
    return [d for place in _places((name,), data_dir) for d in place]


def _candidates(directory: Path, stem: str) -> list[Path]:
    # "train-images-idx3-ubyte" is also distributed as "train-images.idx3-ubyte"
    dotted = stem.replace("-idx", ".idx")
    return [directory / f"{s}{ext}" for s in (stem, dotted) for ext in (".gz", "")]


def _is_file(p: Path) -> bool:
    """``p.is_file()``, False where a folder on the way cannot be entered (permission denied),
    where ``Path.is_file`` raises: such a folder holds no set this program can read (the
    message that no set was found names it)."""
    try:
        return p.is_file()
    except OSError:
        return False


def _unenterable(d: Path) -> bool:
    """Whether ``d`` is a folder whose entries cannot be listed or reached (not said of the
    folders below one)."""
    try:
        if not d.is_dir():
            return False
    except OSError:  # a folder above it cannot be entered: that one is named
        return False
    try:
        with os.scandir(d) as entries:
            next(entries, None)
    except OSError:
        return True
    return False


def _complete_set(d: Path) -> dict[str, Path] | None:
    """The four IDX files in ``d``, or ``None`` if it lacks any."""
    found: dict[str, Path] = {}
    for role, stem in IDX_FILES.items():
        hit = next((c for c in _candidates(d, stem) if _is_file(c)), None)
        if hit is None:
            return None
        found[role] = hit
    return found


def _complete_sets(dirs: Sequence[Path]) -> list[dict[str, Path]]:
    """The complete sets in ``dirs``, in order, each folder once."""
    sets, seen = [], set()
    for d in dirs:
        if d not in seen and (found := _complete_set(d)) is not None:
            sets.append(found)
        seen.add(d)
    return sets


def find_idx_files(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> dict[str, Path] | None:
    """The four IDX files of ``name`` from the first directory holding all four, or ``None``."""
    return next(iter(_complete_sets(search_dirs(name, data_dir))), None)


def _check_given_dirs(data_dir: str | os.PathLike[str] | None) -> None:
    """A folder the user named (``--data-dir``, ``$BATCHNORM_DATA_DIR``) must exist and be
    readable: one that is not is a typo or a permission to fix, not a reason to quietly use
    data from somewhere else."""
    env = os.environ.get(ENV_DATA_DIR) or None
    for folder, what, fix, way_out in (
        (
            data_dir,
            f"--data-dir {data_dir}",
            "pass the folder that holds the IDX files",
            "leave --data-dir out to use the usual places",
        ),
        (
            env,
            f"${ENV_DATA_DIR} is {env}, which",
            "set it to the folder that holds the IDX files",
            "unset it to use the usual places",
        ),
    ):
        if folder is None:
            continue
        if not Path(folder).is_dir():
            state = "is not a folder" if Path(folder).exists() else "does not exist"
            raise DatasetNotFoundError(f"{what} {state}; {fix}, or {way_out}")
        if _unenterable(Path(folder)):
            raise DatasetNotFoundError(
                f"{what} cannot be entered (permission denied); make it readable (chmod a+rx "
                f"{folder}), or {way_out}"
            )


def _check_given_sets(names: tuple[str, ...], data_dir: str | os.PathLike[str] | None) -> None:
    """A folder the user named that holds some but not all of the four IDX files is refused,
    naming the missing ones, unless a complete set is found in the user's folders anyway: an
    incomplete copy is not a reason to quietly use data from somewhere else either."""
    env = os.environ.get(ENV_DATA_DIR) or None
    roots = [(Path(r), w) for r, w in ((data_dir, "--data-dir"), (env, f"${ENV_DATA_DIR}")) if r]
    if not roots:
        return
    dirs = [(d, what) for root, what in roots for d in [root] + [root / n for n in names]]
    partial = []
    for d, what in dirs:
        missing = [
            stem
            for stem in IDX_FILES.values()
            if not any(_is_file(c) for c in _candidates(d, stem))
        ]
        if 0 < len(missing) < len(IDX_FILES):
            partial.append((d, what, missing))
    if not partial:
        return
    found = [find_idx_files(n, data_dir) for n in names]
    used = next((f["train_images"].parent for f in found if f is not None), None)
    if used is not None and any(used == d for d, _ in dirs):
        return
    d, what, missing = partial[0]
    raise DatasetNotFoundError(
        f"{what}: {d} holds {len(IDX_FILES) - len(missing)} of the {len(IDX_FILES)} IDX files; "
        f"missing: {', '.join(missing)} (or its .gz). Put all four files there, or leave "
        f"{what} out to use the usual places"
    )


def _known_md5() -> dict[str, tuple[str, str]]:
    """MD5 -> (dataset, role) for every published file, gzipped and decompressed."""
    known: dict[str, tuple[str, str]] = {}
    for dataset, src in IDX_SOURCES.items():
        for role, stem in IDX_FILES.items():
            for digest in (src.md5.get(f"{stem}.gz"), src.raw_md5.get(stem)):
                if digest:
                    known[digest] = (dataset, role)
    return known


def _read_set(files: dict[str, Path]) -> tuple[dict[str, np.ndarray], str | None]:
    """The arrays of the four files and the dataset whose published checksums they match
    (``None``: no file matches). Files of two datasets mixed, or a published file under another
    role's name, raise :class:`DatasetCorruptError`."""
    known = _known_md5()
    arrays: dict[str, np.ndarray] = {}
    matched: dict[str, str] = {}
    for role, p in files.items():
        raw = _read_raw(p)
        digests = [hashlib.md5(raw).hexdigest()] + ([_md5(p)] if p.suffix == ".gz" else [])
        hit = next((known[d] for d in digests if d in known), None)
        if hit is not None:
            dataset, its_role = hit
            if its_role != role:
                raise DatasetCorruptError(
                    f"{p}: this is {dataset}'s {IDX_FILES[its_role]} file (by its MD5), not "
                    f"{IDX_FILES[role]}; give the files their original names"
                )
            matched[role] = dataset
        arrays[role] = _parse_idx(p, raw)
    datasets = sorted(set(matched.values()))
    if len(datasets) > 1:
        which = ", ".join(f"{files[r].name} is {d}" for r, d in matched.items())
        raise DatasetCorruptError(
            f"{files['train_images'].parent}: the IDX files mix datasets ({which}); keep the "
            "four files of one dataset together in a folder"
        )
    unmatched = [p for role, p in files.items() if role not in matched]
    if datasets and unmatched:
        # every file of a published set has a published checksum: one that matches none next
        # to files that match is damaged or altered (an uncompressed file has no CRC to fail)
        p = unmatched[0]
        raise DatasetCorruptError(
            f"{p}: the other files here are {datasets[0]}'s published files (by their MD5s), "
            f"but this one matches none of {datasets[0]}'s published checksums: it is damaged "
            f"or altered; {_remedy(p)}"
        )
    return arrays, (datasets[0] if datasets else None)


def identify_idx_files(files: dict[str, Path]) -> str | None:
    """``mnist`` / ``fashion-mnist`` when the files (as :func:`find_idx_files` returns them)
    match that dataset's published MD5s (of the ``.gz`` files or of their content), else
    ``None``. Reads every file."""
    return _read_set(files)[1]


def _how_to_get(name: str, data_dir: str | os.PathLike[str] | None) -> str:
    looked = "\n".join(
        f"  {d}"
        + (" (cannot be entered: permission denied; chmod a+rx it)" if _unenterable(d) else "")
        for d in search_dirs(name, data_dir)
    )
    files = ", ".join(f"{s}.gz" for s in IDX_FILES.values())
    return (
        f"dataset {name!r} not found: looked for {files} (gzipped or not) in\n{looked}\n"
        f"To get it:\n  - batchnorm lab run ... --dataset {name} --download "
        f"(fetches into {_cache_root() / name}, checksums verified)\n" + _other_ways(name)
    )


def _other_ways(name: str, first: str = "or ") -> str:
    """The remedies that need no download by this program, one ``  - `` line each; ``first``
    leads the line after the Debian one."""
    debian = (
        "  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist\n"
        if name == "fashion-mnist"
        else ""
    )
    return (
        f"{debian}  - {'or ' if debian else first}download the four files from "
        f"{IDX_SOURCES[name].homepage} into a folder and pass --data-dir FOLDER (or set "
        f"{ENV_DATA_DIR})\n"
        "  - or use --dataset digits (bundled with scikit-learn, works offline)"
    )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: a transfer slower than this (bytes per second, over any ``timeout`` seconds) is given up
MIN_DOWNLOAD_RATE = 1024
#: a temporary download file untouched for this long (seconds) belongs to no running download
ABANDONED_PART_AGE = 3600.0


def _copy_response(r: Any, f: Any, timeout: float) -> None:
    """Copy the body of ``r`` into ``f``. The socket timeout bounds each read; this also gives
    up a transfer that keeps trickling (fewer than :data:`MIN_DOWNLOAD_RATE` bytes per second
    over ``timeout`` seconds), which no per-read timeout ever ends."""
    window_start, window_bytes = time.monotonic(), 0
    read = getattr(r, "read1", r.read)  # read1: what has arrived, not a full block's wait
    while block := read(1 << 16):
        f.write(block)
        window_bytes += len(block)
        elapsed = time.monotonic() - window_start
        if elapsed >= timeout:
            if window_bytes < MIN_DOWNLOAD_RATE * elapsed:
                raise TimeoutError(
                    f"the transfer slowed to {window_bytes / elapsed:.0f} bytes/s (under "
                    f"{MIN_DOWNLOAD_RATE} for {elapsed:.0f} s); run the command again later"
                )
            window_start, window_bytes = time.monotonic(), 0


def _urlopen(url: str, timeout: float) -> Any:
    """``urllib.request.urlopen(url, timeout=timeout)``, with the answer's status line and
    headers due within ``timeout`` seconds in all: the socket timeout bounds each read only,
    so a server sending its headers a byte at a time would hold the download for ever (and
    :func:`_copy_response`'s rate check starts with the body). Past the deadline the
    connection's socket is shut down and :class:`TimeoutError` raised."""
    sockets: list[socket.socket] = []
    lock, state = threading.Lock(), {"open": True, "expired": False}

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            sockets.append(self.sock)

    class SecureConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            sockets.append(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(Connection, req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(SecureConnection, req, context=self._context)  # type: ignore[attr-defined]

    def expire() -> None:
        with lock:
            if not state["open"]:
                return
            state["expired"] = True
            for sock in sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        return urllib.request.build_opener(Handler, SecureHandler).open(url, timeout=timeout)
    except (OSError, http.client.HTTPException):
        if state["expired"]:
            raise TimeoutError(
                f"no complete answer (status line and headers) within {timeout:g} s"
            ) from None
        raise
    finally:
        with lock:
            state["open"] = False
        timer.cancel()


#: errors of writing into the cache folder, not of the transfer
_LOCAL_ERRNOS = frozenset(
    getattr(errno, n)
    for n in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EISDIR", "ENOTDIR")
    if hasattr(errno, n)
)


def _local_write_error(e: BaseException) -> bool:
    """Whether ``e`` came from writing the download into its folder (a full or read-only disk,
    a folder in the file's place), not from a mirror (URLError, a timeout, a reset)."""
    return (
        isinstance(e, OSError)
        and not isinstance(e, urllib.error.URLError)
        and e.errno in _LOCAL_ERRNOS
    )


def download_dataset(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    urls: Sequence[str] | None = None,
    md5: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch the four ``.gz`` files of ``name`` (``mnist`` or ``fashion-mnist``) into ``dest``
    (default: the user cache), verifying each against its published MD5; files already present
    with the right checksum are kept. ``urls``/``md5`` override the canonical mirrors and
    checksums (tests serve generated files from a local server). Returns ``dest``.

    Each file is written to a temporary name and renamed only after its checksum matches, so an
    interrupted download never leaves a file that looks complete."""
    if name not in IDX_SOURCES:
        raise ValueError(f"download: no download for {name!r}; choose one of {list(IDX_SOURCES)}")
    src = IDX_SOURCES[name]
    bases = list(urls) if urls is not None else list(src.urls)
    sums = dict(md5) if md5 is not None else src.md5
    out = Path(dest) if dest is not None else _cache_root() / name

    def unwritable(e: OSError) -> DatasetNotFoundError:
        # the folder downloaded into, not the run's: say which, and the ways around it
        return DatasetNotFoundError(
            f"cannot download {name} into {out}: "
            + (f"{e.filename}: " if getattr(e, "filename", None) else "")
            + f"{e.strerror or e}; "
            + ("set XDG_CACHE_HOME to a folder you can write to, " if dest is None else "")
            + "or download the four files yourself and pass --data-dir FOLDER"
        )

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(e) from None
    # downloads killed before they could clean up (a SIGTERM, a power cut); a running one
    # writes at least every `timeout` seconds
    remove_abandoned(out, ".*.part", ABANDONED_PART_AGE)
    failed: list[str] = []  # mirrors that failed a file: tried last for the files after it
    for fname, want in sums.items():
        target = out / fname
        if target.is_file() and _md5(target) == want:
            continue
        errors: list[str] = []
        for base in sorted(bases, key=lambda b: b in failed):
            url = base.rstrip("/") + "/" + fname
            try:
                fd, tmp_name = tempfile.mkstemp(dir=out, prefix=f".{fname}.", suffix=".part")
            except OSError as e:
                raise unwritable(e) from None
            tmp = Path(tmp_name)
            problem = None
            try:
                usual_mode(fd)
                with os.fdopen(fd, "wb") as f, _urlopen(url, timeout) as r:
                    _copy_response(r, f, timeout)
                    size, length = f.tell(), r.headers.get("Content-Length", "")
                got = _md5(tmp)
                if length.isdigit() and size < int(length):
                    # a dropped connection ends the read quietly: not a wrong file, a cut one
                    problem = (
                        f"{url}: the transfer stopped after {size} of {length} bytes "
                        "(connection closed); run the command again"
                    )
                elif got != want:
                    problem = f"{url}: checksum mismatch (md5 {got}, expected {want})"
                else:
                    os.replace(tmp, target)
            except (OSError, http.client.HTTPException) as e:
                if _local_write_error(e):
                    # the cache folder's fault (full, read-only, a folder in the file's place):
                    # every mirror would fail the same way
                    raise unwritable(e) from None  # type: ignore[arg-type]
                # HTTPException: a malformed answer (a cut chunked body, a bad status line) —
                # not an OSError, and no reason not to try the next mirror
                kind = f"{type(e).__name__}: " if isinstance(e, http.client.HTTPException) else ""
                if isinstance(e, http.client.IncompleteRead):
                    kind = "the connection closed in the middle of the answer: "
                # one line: a malformed status line carries its line break into the error
                problem = f"{url}: {kind}" + " ".join(str(e).split())
            finally:
                tmp.unlink(missing_ok=True)
            if problem is None:
                break
            errors.append(problem)
            if base not in failed:
                failed.append(base)
            last = len(errors) == len(bases)
            say(f"download: {problem}{'' if last else '; trying the next mirror'}", err=True)
        else:
            mismatch = any("checksum" in e for e in errors)
            cls = DatasetCorruptError if mismatch else DatasetNotFoundError
            raise cls(
                f"download of {name} failed:\n  "
                + "\n  ".join(errors)
                + "\nWithout the download:\n"
                + _other_ways(name, first="")
            )
    return out


def _find_auto(data_dir: str | os.PathLike[str] | None) -> dict[str, Path] | None:
    """The IDX files ``auto`` takes: the first complete set in the places looked in, in their
    order (a folder the user named before the cache), MNIST's folder before Fashion-MNIST's
    within each place."""
    dirs = [d for place in _places(tuple(IDX_SOURCES), data_dir) for d in place]
    return next(iter(_complete_sets(dirs)), None)


def _idx_name(requested: str, folder: Path, identified: str | None) -> str:
    """The name to report for IDX files in ``folder``, never a guess: what their checksums say,
    else the requested name, else (``auto``) the folder's name if it is a dataset's, else
    :data:`UNIDENTIFIED`. Files of another dataset than the requested one are refused."""
    if requested != "auto":
        if identified is not None and identified != requested:
            raise DatasetMismatchError(
                f"--dataset {requested}: the IDX files in {folder} are {identified} (their MD5s "
                f"match the published {identified} files), not {requested}; use --dataset "
                f"{identified} (or auto), or point --data-dir / ${ENV_DATA_DIR} at a folder "
                f"holding the {requested} files"
            )
        return requested
    if identified is not None:
        return identified
    return folder.name if folder.name in IDX_SOURCES else UNIDENTIFIED


def _load_idx(requested: str, data_dir: str | os.PathLike[str] | None) -> Dataset:
    if requested == "auto":
        found = _find_auto(data_dir)
        if found is None:
            raise DatasetNotFoundError(_how_to_get("mnist", data_dir))
        files = found
        arrays, identified = _read_set(files)
        name = _idx_name(requested, files["train_images"].parent, identified)
    else:
        sets = _complete_sets(search_dirs(requested, data_dir))
        if not sets:
            raise DatasetNotFoundError(_how_to_get(requested, data_dir))
        # a folder holding the other dataset (MNIST flat in DIR) does not hide the requested
        # one further on (DIR/fashion-mnist/); with none, the first refusal is the answer
        mismatch: DatasetMismatchError | None = None
        for files in sets:
            arrays, identified = _read_set(files)
            try:
                name = _idx_name(requested, files["train_images"].parent, identified)
                break
            except DatasetMismatchError as e:
                mismatch = mismatch or e
        else:
            assert mismatch is not None
            raise mismatch
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or xi.shape[0] != yi.shape[0]:
            raise DatasetCorruptError(
                f"{name}: {files[f'{split}_images']} has shape {xi.shape} and "
                f"{files[f'{split}_labels']} has shape {yi.shape}; expected (N, H, W) images and "
                "(N,) labels of the same N — the files are mismatched or corrupt"
            )
        if xi.shape[0] == 0:
            raise DatasetCorruptError(
                f"{name}: {files[f'{split}_images']} and {files[f'{split}_labels']} hold 0 "
                f"examples; the files are empty or corrupt — {_remedy(files[f'{split}_images'], 'them')}"
            )
    train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_hw != test_hw:
        raise DatasetCorruptError(
            f"{name}: the training images ({files['train_images']}) are {train_hw[0]}x"
            f"{train_hw[1]} but the test images ({files['test_images']}) are {test_hw[0]}x"
            f"{test_hw[1]}; the files are mismatched — keep the four files of one dataset "
            "together in a folder"
        )

    for split in ("train", "test"):
        _check_content(name, files, split, arrays[f"{split}_images"], arrays[f"{split}_labels"])

    def images(a: np.ndarray) -> Tensor:
        # (N, H, W) -> (N, 1, H, W) float32 in [0, 1]: uint8 pixels scaled, floats already so
        x = a.astype(np.float32)
        return torch.from_numpy(x / 255.0 if a.dtype == np.uint8 else x).unsqueeze(1)

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    y_train, y_test = labels(arrays["train_labels"]), labels(arrays["test_labels"])
    largest = max(int(y.max()) for y in (y_train, y_test) if y.numel())
    return Dataset(
        name=name,
        x_train=images(arrays["train_images"]),
        y_train=y_train,
        x_test=images(arrays["test_images"]),
        y_test=y_test,
        # a class seen only in the test split still needs its output (never the right answer)
        num_classes=max(largest + 1, 10),
        source=str(files["train_images"].parent),
        extra={"identified": identified is not None},
    )


def _check_content(
    name: str, files: dict[str, Path], split: str, xi: np.ndarray, yi: np.ndarray
) -> None:
    """Refuse IDX content the lab cannot use as it is: images of no pixels, pixels that are
    neither uint8 (0..255, scaled to [0, 1]) nor floats in [0, 1], labels that are not
    non-negative integers."""
    img, lab = files[f"{split}_images"], files[f"{split}_labels"]
    if xi.shape[1] == 0 or xi.shape[2] == 0:
        raise DatasetCorruptError(
            f"{name}: {img} holds {xi.shape[1]}x{xi.shape[2]} images (no pixels); the file is "
            "corrupt or not an image set"
        )
    if np.issubdtype(xi.dtype, np.floating):
        lo, hi = float(xi.min()), float(xi.max())
        if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
            raise DatasetCorruptError(
                f"{name}: {img} holds {xi.dtype} pixels from {lo:g} to {hi:g}; floating-point "
                "pixels must lie in [0, 1] — rescale them, or write the images as uint8 (0..255)"
            )
    elif xi.dtype != np.uint8:
        raise DatasetCorruptError(
            f"{name}: {img} holds {xi.dtype} pixels, whose range the lab cannot know; write "
            "the images as uint8 (0..255) or as floats in [0, 1]"
        )
    if not np.issubdtype(yi.dtype, np.integer):
        raise DatasetCorruptError(
            f"{name}: {lab} holds {yi.dtype} labels; class labels must be integers 0..K-1"
        )
    if yi.size and int(yi.min()) < 0:
        raise DatasetCorruptError(
            f"{name}: {lab} holds negative labels (the smallest is {int(yi.min())}); class "
            "labels must be integers 0..K-1"
        )
    if yi.size and int(yi.max()) >= MAX_CLASSES:
        raise DatasetCorruptError(
            f"{name}: {lab} holds a label of {int(yi.max())}: the classifier would need that "
            f"many outputs; class labels must be integers 0..K-1 with K <= {MAX_CLASSES}"
        )


def _load_digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # pixel values are 0..16
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(xtr),
        y_train=torch.from_numpy(ytr),
        x_test=torch.from_numpy(xte),
        y_test=torch.from_numpy(yte),
        num_classes=10,
        source="sklearn.datasets.load_digits (1797 8x8 images, stratified 80/20 split)",
    )


def synthetic(
    n_train: int = 2000,
    n_test: int = 500,
    num_classes: int = 10,
    shape: tuple[int, int, int] = (1, 8, 8),
    noise: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """Gaussian clusters around random class prototypes, squashed to [0, 1] — learnable but not
    trivially (``noise`` sets the overlap). Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    protos = torch.randn(num_classes, d, generator=g)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = protos[y] + noise * torch.randn(n, d, generator=g)
        return torch.sigmoid(x).reshape(n, *shape), y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, num_classes, f"synthetic(seed={seed})")


def resolve_name(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The dataset ``name`` stands for: ``auto`` becomes mnist, fashion-mnist (the IDX files
    found first, named as :func:`load_dataset` names them — reads them to check their
    checksums) or digits."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if name != "auto":
        return name
    files = _find_auto(data_dir)
    if files is None:
        return "digits"
    return _idx_name("auto", files["train_images"].parent, identify_idx_files(files))


def _refresh_cache(name: str, data_dir: str | os.PathLike[str] | None) -> None:
    """With ``--download``: when the files that would be loaded are this program's downloads
    in the user cache, fetch again the ones whose checksum no longer matches (an interrupted
    copy, a damaged disk) instead of failing on them. Files anywhere else are the user's and
    are left alone."""
    found = find_idx_files(name, data_dir)
    if found is None:
        return
    cache = _cache_root() / name
    published = IDX_SOURCES[name].md5
    if all(p.parent == cache and p.name in published for p in found.values()):
        download_dataset(name)  # keeps the files whose checksum matches


def load_dataset(
    name: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by ``--dataset`` name (see the module docstring for the lookup order).

    ``download=True`` fetches MNIST / Fashion-MNIST into the user cache first when they are not
    found (for ``auto``: MNIST), and fetches again downloaded files in the cache whose checksum
    no longer matches. Raises :class:`DatasetNotFoundError` saying where the files were
    looked for and how to get them (also for a ``data_dir`` or ``$BATCHNORM_DATA_DIR`` that is not
    a folder), :class:`DatasetMismatchError` when the files found are the other dataset's,
    :class:`DatasetCorruptError` for unreadable or inconsistent files."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if name == "auto" or name in IDX_SOURCES:
        _check_given_dirs(data_dir)
        _check_given_sets(("mnist", "fashion-mnist") if name == "auto" else (name,), data_dir)
    if name == "auto" and download and find_idx_files("mnist", data_dir) is None:
        download_dataset("mnist")
    elif name == "auto" and download:
        _refresh_cache("mnist", data_dir)
    if name == "auto":
        ds = _load_idx(name, data_dir) if _find_auto(data_dir) else _load_digits(seed=0)
    elif name in IDX_SOURCES:
        if download and find_idx_files(name, data_dir) is None:
            download_dataset(name)
        elif download:
            _refresh_cache(name, data_dir)
        ds = _load_idx(name, data_dir)
    elif name == "digits":
        ds = _load_digits(seed=0)
    else:
        ds = synthetic(seed=seed)
    if name == "auto":
        ds = replace(ds, extra={**ds.extra, "requested": "auto"})
    return ds
