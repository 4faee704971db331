"""Datasets: IDX reading, lookup order, auto choice, download with checksums from a local
HTTP server, digits and synthetic data."""

import gzip
import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchnorm.lab import data
from batchnorm.lab.data import DatasetCorruptError, DatasetNotFoundError

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _write_set(folder: Path, n_train=30, n_test=10, seed=0, gz=True, hw=28) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, hw, hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, hw, hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    out = {}
    for stem, arr in arrays.items():
        p = folder / (stem + (".gz" if gz else ""))
        data.write_idx(p, arr)
        out[stem] = p
    return out


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) * 3 - 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / f"a.idx{suffix}"
    data.write_idx(p, arr)
    back = data.read_idx(p)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_header_is_the_published_format(tmp_path):
    # magic 0x00000803 then big-endian sizes, as in the MNIST description
    p = tmp_path / "x.idx"
    data.write_idx(p, np.zeros((2, 3, 4), dtype=np.uint8))
    raw = p.read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert raw[4:16] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")


def test_corrupt_files_raise_with_path_and_remedy(tmp_path):
    p = tmp_path / "t.idx"
    data.write_idx(p, np.zeros((5, 4), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-3])  # truncated
    with pytest.raises(DatasetCorruptError, match=r"t\.idx.*truncated.*--download"):
        data.read_idx(p)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(DatasetCorruptError, match="not an IDX file"):
        data.read_idx(bad)
    notgz = tmp_path / "n.idx.gz"
    notgz.write_bytes(b"plain bytes")
    with pytest.raises(DatasetCorruptError, match="cannot read"):
        data.read_idx(notgz)
    gz = tmp_path / "g.idx.gz"
    data.write_idx(gz, np.zeros((5, 4), dtype=np.uint8))
    unnamed = tmp_path / "train-images-idx3-ubyte"
    unnamed.write_bytes(gz.read_bytes())  # gzipped, without the suffix
    with pytest.raises(DatasetCorruptError, match=r"gzip-compressed .* rename it to .*ubyte\.gz"):
        data.read_idx(unnamed)


def test_corrupt_deflate_stream_raises_dataset_error(tmp_path):
    # a valid gzip header followed by a deflate block of the reserved type: zlib.error inside
    p = tmp_path / "z.idx.gz"
    p.write_bytes(gzip.compress(b"")[:10] + b"\xff" * 20)
    with pytest.raises(DatasetCorruptError, match=r"z\.idx\.gz: cannot read.*--download"):
        data.read_idx(p)


def test_lookup_order_data_dir_env_cache_system(isolated, monkeypatch):
    tmp = isolated
    _write_set(tmp / "system" / "mnist", seed=1)
    assert data.find_idx_files("mnist")["train_images"].parent == tmp / "system" / "mnist"
    _write_set(tmp / "cache" / "batchnorm" / "mnist", seed=2)
    assert "cache" in str(data.find_idx_files("mnist")["train_images"])
    _write_set(tmp / "env" / "mnist", seed=3)
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp / "env"))
    assert data.find_idx_files("mnist")["train_images"].parent == tmp / "env" / "mnist"
    _write_set(tmp / "flat", seed=4, gz=False)  # files directly in --data-dir, not gzipped
    assert data.find_idx_files("mnist", tmp / "flat")["train_images"].parent == tmp / "flat"
    ds = data.load_dataset("mnist", tmp / "flat")
    raw = data.read_idx(tmp / "flat" / "train-images-idx3-ubyte")
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_train.dtype == torch.float32
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), raw / 255.0, rtol=1e-6)
    assert ds.source == str(tmp / "flat")


def test_dotted_file_names_are_found(isolated):
    folder = isolated / "dotted"
    files = _write_set(folder)
    for stem, p in files.items():
        p.rename(folder / (stem.replace("-idx", ".idx") + ".gz"))
    assert data.find_idx_files("fashion-mnist", folder) is not None


def test_auto_prefers_mnist_then_fashion_then_digits(isolated):
    tmp = isolated
    assert data.resolve_name("auto") == "digits"
    ds = data.load_dataset("auto")
    assert ds.name == "digits" and ds.info()["requested"] == "auto"
    _write_set(tmp / "system" / "fashion-mnist")
    assert data.resolve_name("auto") == "fashion-mnist"
    _write_set(tmp / "cache" / "batchnorm" / "mnist")
    assert data.resolve_name("auto") == "mnist"


def test_missing_dataset_says_where_and_how(isolated):
    (isolated / "mine").mkdir()  # an existing folder without the files
    with pytest.raises(DatasetNotFoundError) as e:
        data.load_dataset("fashion-mnist", isolated / "mine")
    msg = str(e.value)
    assert str(isolated / "mine") in msg and str(isolated / "system" / "fashion-mnist") in msg
    assert "--download" in msg and "dataset-fashion-mnist" in msg and "--dataset digits" in msg
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar")


def test_mismatched_image_and_label_counts(isolated):
    folder = isolated / "mm"
    _write_set(folder)
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(DatasetCorruptError, match="mismatched"):
        data.load_dataset("mnist", folder)


def test_empty_sets_and_differing_image_shapes_are_corrupt(isolated):
    empty = isolated / "empty"
    _write_set(empty, n_train=0, n_test=0)
    with pytest.raises(DatasetCorruptError, match=r"train-images-idx3-ubyte.* 0 examples"):
        data.load_dataset("mnist", empty)
    shapes = isolated / "shapes"
    _write_set(shapes)
    data.write_idx(shapes / "t10k-images-idx3-ubyte.gz", np.zeros((10, 20, 20), dtype=np.uint8))
    with pytest.raises(DatasetCorruptError, match=r"are 28x28 .*t10k-images.* are 20x20"):
        data.load_dataset("mnist", shapes)


def test_a_header_whose_sizes_overflow_is_corrupt_not_a_crash(tmp_path):
    """(2**31)·(2**31)·4 wraps to 0 in int64: a header-only file must not pass as empty data."""
    p = tmp_path / "huge.idx"
    p.write_bytes(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2**31, 2**31, 4)))
    with pytest.raises(
        DatasetCorruptError, match=r"huge\.idx: IDX header says shape .* but the file"
    ):
        data.read_idx(p)


@pytest.mark.parametrize(
    "role, array, match",
    [
        ("train-labels-idx1-ubyte", np.full(30, -1, np.int8), "negative labels"),
        ("train-labels-idx1-ubyte", np.zeros(30, np.float32), "float32 labels"),
        ("t10k-images-idx3-ubyte", np.full((10, 28, 28), 4095, np.int16), "int16 pixels"),
        ("train-images-idx3-ubyte", np.full((30, 28, 28), 2.0, np.float32), "from 2 to 2"),
        ("train-images-idx3-ubyte", np.full((30, 28, 28), np.nan, np.float32), "from nan"),
        ("train-images-idx3-ubyte", np.zeros((30, 0, 0), np.uint8), "0x0 images"),
        # a classifier of 2**31 outputs: memory, not a message, would stop the run
        ("t10k-labels-idx1-ubyte", np.full(10, 2**31 - 1, np.int32), "label of 2147483647"),
    ],
)
def test_content_the_lab_cannot_use_is_refused_by_file(isolated, role, array, match):
    folder = isolated / "own"
    _write_set(folder)
    if array.shape[1:] == (0, 0):
        data.write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((10, 0, 0), np.uint8))
    data.write_idx(folder / f"{role}.gz", array)
    with pytest.raises(DatasetCorruptError, match=rf"{role}\.gz holds .*{re.escape(match)}"):
        data.load_dataset("mnist", folder)


def test_a_class_only_the_test_split_holds_gets_an_output(isolated):
    # the classifier's outputs come from both splits: a test label of 15 after training labels
    # 0..9 would otherwise fail the first evaluation with torch's IndexError
    folder = isolated / "own"
    _write_set(folder)
    data.write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10, 15, np.uint8))
    assert data.load_dataset("mnist", folder).num_classes == 16


def test_a_header_of_more_dimensions_than_numpy_reads_is_corrupt(tmp_path):
    p = tmp_path / "deep.idx"
    p.write_bytes(b"\x00\x00\x08\xff" + (1).to_bytes(4, "big") * 255 + b"\x07")
    with pytest.raises(DatasetCorruptError, match=r"deep\.idx: IDX header declares 255 dim"):
        data.read_idx(p)


def test_float_pixels_in_the_unit_interval_are_used_as_they_are(isolated):
    folder = isolated / "floats"
    _write_set(folder)
    pixels = np.random.default_rng(1).random((30, 28, 28)).astype(np.float32)
    data.write_idx(folder / "train-images-idx3-ubyte.gz", pixels)
    ds = data.load_dataset("mnist", folder)
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), pixels)


def test_the_fingerprint_follows_the_values_not_only_the_shapes():
    a, b = data.synthetic(seed=0), data.synthetic(seed=0)
    assert a.fingerprint() == b.fingerprint()
    assert replace(a, x_train=a.x_train + 1e-7).fingerprint() != a.fingerprint()
    assert replace(a, y_test=a.y_test.flip(0)).fingerprint() != a.fingerprint()
    assert a.validation_split().fingerprint() != a.fingerprint()


def _publish(monkeypatch, name: str, files: dict[str, Path], raw: bool = False) -> None:
    """Make ``files`` the published ones of ``name``: their .gz MD5s, or (raw) the MD5s of
    their decompressed content."""
    if raw:
        sums = {
            stem: hashlib.md5(gzip.decompress(p.read_bytes())).hexdigest()
            for stem, p in files.items()
        }
        new = replace(data.IDX_SOURCES[name], md5={}, raw_md5=sums)
    else:
        new = replace(data.IDX_SOURCES[name], md5={p.name: _md5(p) for p in files.values()})
    monkeypatch.setitem(data.IDX_SOURCES, name, new)


def test_files_in_a_flat_folder_are_named_by_their_checksums(isolated, monkeypatch):
    flat = isolated / "flat"  # same file names as MNIST: only the content tells them apart
    _publish(monkeypatch, "fashion-mnist", _write_set(flat, seed=5))
    ds = data.load_dataset("auto", flat)
    assert ds.name == "fashion-mnist" and ds.info()["identified"] is True
    assert ds.source == str(flat)
    assert data.resolve_name("auto", flat) == "fashion-mnist"
    assert data.load_dataset("fashion-mnist", flat).name == "fashion-mnist"
    monkeypatch.setenv(data.ENV_DATA_DIR, str(flat))  # the same through the environment
    assert data.load_dataset("auto").name == "fashion-mnist"
    # asking for the other dataset is refused, naming the folder and the remedy
    with pytest.raises(data.DatasetMismatchError) as e:
        data.load_dataset("mnist", flat)
    msg = str(e.value)
    assert "\n" not in msg and str(flat) in msg and "--dataset fashion-mnist" in msg
    assert isinstance(e.value, DatasetNotFoundError)  # the CLI reports it as a clean error


def test_recompressed_files_are_named_by_their_content(isolated, monkeypatch):
    # e.g. Debian's package recompresses the .gz files: only the content's MD5 still matches
    flat = isolated / "flat"
    _publish(monkeypatch, "mnist", _write_set(flat, seed=6), raw=True)
    assert data.load_dataset("auto", flat).name == "mnist"
    with pytest.raises(data.DatasetMismatchError, match="are mnist"):
        data.load_dataset("fashion-mnist", flat)
    for p in list(flat.iterdir()):  # and uncompressed
        p.with_suffix("").write_bytes(gzip.decompress(p.read_bytes()))
        p.unlink()
    files = data.find_idx_files("mnist", flat)
    assert files is not None and files["train_images"].suffix == ""
    assert data.identify_idx_files(files) == "mnist"


def test_unidentified_files_keep_the_requested_name_and_auto_says_so(isolated):
    flat = isolated / "flat"
    _write_set(flat, seed=7)  # matches no published checksum
    ds = data.load_dataset("fashion-mnist", flat)
    assert ds.name == "fashion-mnist" and ds.info()["identified"] is False
    assert data.load_dataset("mnist", flat).name == "mnist"
    auto = data.load_dataset("auto", flat)
    assert auto.name == data.UNIDENTIFIED == data.resolve_name("auto", flat)
    assert "unidentified" in auto.name and auto.source == str(flat)
    # in a folder named after a dataset, the folder's name is what auto reports
    _write_set(isolated / "mine" / "fashion-mnist", seed=8)
    assert data.load_dataset("auto", isolated / "mine").name == "fashion-mnist"


def test_files_of_two_datasets_or_renamed_published_files_are_refused(isolated, monkeypatch):
    a, b = _write_set(isolated / "a", seed=1), _write_set(isolated / "b", seed=2)
    _publish(monkeypatch, "mnist", a)
    _publish(monkeypatch, "fashion-mnist", b)
    mixed = isolated / "mixed"
    _write_set(mixed, seed=3)
    (mixed / "t10k-labels-idx1-ubyte.gz").write_bytes(a["t10k-labels-idx1-ubyte"].read_bytes())
    (mixed / "t10k-images-idx3-ubyte.gz").write_bytes(b["t10k-images-idx3-ubyte"].read_bytes())
    with pytest.raises(DatasetCorruptError, match=f"{mixed}: the IDX files mix datasets"):
        data.load_dataset("auto", mixed)
    swapped = isolated / "swapped"
    _write_set(swapped, seed=4)
    (swapped / "train-labels-idx1-ubyte.gz").write_bytes(a["t10k-labels-idx1-ubyte"].read_bytes())
    with pytest.raises(DatasetCorruptError, match="t10k-labels-idx1-ubyte file .*not train-lab"):
        data.load_dataset("mnist", swapped)


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_the_installed_fashion_mnist_is_identified():
    # Debian recompresses the .gz files: this checks the published content digests
    files = data.find_idx_files("fashion-mnist", SYSTEM_FASHION)
    assert files is not None and data.identify_idx_files(files) == "fashion-mnist"


def test_a_given_folder_that_does_not_exist_is_an_error(isolated, monkeypatch):
    _write_set(isolated / "system" / "fashion-mnist")  # what would be used instead
    typo = isolated / "does-not-exist"
    for name in ("auto", "mnist", "fashion-mnist"):
        with pytest.raises(DatasetNotFoundError, match=f"--data-dir {typo} does not exist"):
            data.load_dataset(name, typo)
    a_file = isolated / "a-file"
    a_file.write_text("x")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        data.load_dataset("auto", a_file)
    assert data.load_dataset("digits", typo).name == "digits"  # no folder is read for digits
    monkeypatch.setenv(data.ENV_DATA_DIR, str(typo))
    with pytest.raises(DatasetNotFoundError, match=f"{data.ENV_DATA_DIR} is {typo}, which does"):
        data.load_dataset("auto")


def test_a_given_folder_with_an_incomplete_set_is_an_error(isolated, monkeypatch):
    """Three of the four files in the folder the user named: refused with the missing file
    named, not replaced by another folder's set (or, under auto, by the digits)."""
    _write_set(isolated / "system" / "mnist")  # what would be used instead
    mine = isolated / "mine"
    files = _write_set(mine)
    files["t10k-labels-idx1-ubyte"].unlink()
    for name in ("auto", "mnist"):
        with pytest.raises(DatasetNotFoundError, match=r"holds 3 of the 4 .*t10k-labels-idx1"):
            data.load_dataset(name, mine)
    monkeypatch.setenv(data.ENV_DATA_DIR, str(mine))
    with pytest.raises(DatasetNotFoundError, match=rf"^\${data.ENV_DATA_DIR}: .*holds 3 of"):
        data.load_dataset("mnist")
    monkeypatch.delenv(data.ENV_DATA_DIR)
    # a complete set in the user's folder (here its mnist/ subfolder) is used as before
    _write_set(mine / "mnist", seed=1)
    assert data.load_dataset("mnist", mine).source.startswith(str(mine / "mnist"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*a, **k):
        return _Quiet(*a, directory=str(root), **k)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_download_verifies_checksums_and_falls_back_to_next_mirror(isolated, server):
    root, url = server
    files = _write_set(root / "good", n_train=12, n_test=6)
    sums = {p.name: _md5(p) for p in files.values()}
    dest = isolated / "dl"
    # first mirror has nothing (404), the second serves the files
    out = data.download_dataset("mnist", dest, urls=[url + "/missing/", url + "/good/"], md5=sums)
    assert out == dest
    assert {p.name for p in dest.iterdir()} == set(sums)
    assert all(_md5(dest / n) == s for n, s in sums.items())
    ds = data.load_dataset("mnist", dest)
    assert ds.x_train.shape[0] == 12 and ds.x_test.shape[0] == 6
    # already present and valid: nothing is fetched again (the server may even be gone)
    data.download_dataset("mnist", dest, urls=["http://127.0.0.1:9/"], md5=sums)


def test_a_failed_mirror_is_reported_and_tried_last_for_the_other_files(
    isolated, server, capsys, monkeypatch
):
    # a success on the second mirror said nothing of the first, and a mirror that had failed
    # was tried first again for every file (a hanging one: the timeout four times over)
    root, url = server
    files = _write_set(root / "good", n_train=6, n_test=4)
    sums = {p.name: _md5(p) for p in files.values()}
    asked: list[str] = []
    real_urlopen = data._urlopen

    def urlopen(u, *a, **k):  # type: ignore[no-untyped-def]
        asked.append(u)
        return real_urlopen(u, *a, **k)

    monkeypatch.setattr(data, "_urlopen", urlopen)
    data.download_dataset("mnist", isolated / "dl", urls=[url + "/gone/", url + "/good/"], md5=sums)
    err = capsys.readouterr().err
    assert f"download: {url}/gone/train-images-idx3-ubyte.gz: HTTP Error 404" in err
    assert "trying the next mirror" in err and len(err.strip().splitlines()) == 1
    assert sum("/gone/" in u for u in asked) == 1 and sum("/good/" in u for u in asked) == 4


def test_a_download_the_cache_cannot_hold_is_one_error_naming_the_folder(isolated, server):
    # a folder in the file's place (as a full or read-only disk): every mirror would fail the
    # same way, and each was blamed in turn, the file fetched again from every one
    root, url = server
    files = _write_set(root / "good", n_train=6, n_test=4)
    sums = {p.name: _md5(p) for p in files.values()}
    dest = isolated / "dl"
    (dest / "train-images-idx3-ubyte.gz").mkdir(parents=True)
    with pytest.raises(
        DatasetNotFoundError, match=rf"cannot download mnist into {dest}: .*Is a directory"
    ):
        data.download_dataset("mnist", dest, urls=[url + "/good/", url + "/good/"], md5=sums)


def test_download_rejects_a_checksum_mismatch(isolated, server):
    root, url = server
    files = _write_set(root / "f", n_train=5, n_test=5)
    sums = {p.name: _md5(p) for p in files.values()}
    name = "train-images-idx3-ubyte.gz"
    with gzip.open(root / "f" / name, "wb") as f:  # tampered content
        f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    dest = isolated / "dl"
    with pytest.raises(DatasetCorruptError, match="checksum mismatch"):
        data.download_dataset("fashion-mnist", dest, urls=[url + "/f/"], md5=sums)
    assert not (dest / name).exists()
    assert not [p for p in dest.iterdir() if p.name.endswith(".part")]


def test_download_reports_unreachable_mirrors(isolated, server):
    _, url = server
    with pytest.raises(DatasetNotFoundError, match="download of mnist failed") as e:
        data.download_dataset("mnist", isolated / "x", urls=[url + "/none/"], md5={"a.gz": "0"})
    # the same ways out as when the files are not found
    assert "--data-dir FOLDER" in str(e.value) and "--dataset digits" in str(e.value)
    with pytest.raises(ValueError, match="no download"):
        data.download_dataset("digits")


def test_canonical_sources_are_declared():
    for name in ("mnist", "fashion-mnist"):
        src = data.IDX_SOURCES[name]
        assert set(src.md5) == {s + ".gz" for s in data.IDX_FILES.values()}
        assert all(len(v) == 32 for v in src.md5.values())


def test_digits_split():
    ds = data.load_dataset("digits")
    assert ds.name == "digits" and ds.input_shape == (1, 8, 8) and ds.num_features == 64
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    # stratified: every class in both splits
    assert set(ds.y_test.tolist()) == set(range(10)) == set(ds.y_train.tolist())


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b, c = data.synthetic(seed=1), data.synthetic(seed=1), data.synthetic(seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (2000, 1, 8, 8) and a.num_classes == 10


def test_validation_split_is_carved_from_train_only():
    ds = data.synthetic(n_train=600, n_test=100)
    v = ds.validation_split(1 / 6, seed=0)
    assert v.split == "validation" and v.info()["heldout_split"] == "validation"
    assert v.x_train.shape[0] + v.x_test.shape[0] == 600
    rows = {tuple(r.tolist()) for r in ds.x_train.reshape(600, -1)}
    assert all(tuple(r.tolist()) in rows for r in v.x_test.reshape(v.x_test.shape[0], -1))
    train_rows = {tuple(r.tolist()) for r in v.x_train.reshape(v.x_train.shape[0], -1)}
    val_rows = {tuple(r.tolist()) for r in v.x_test.reshape(v.x_test.shape[0], -1)}
    assert not train_rows & val_rows
    with pytest.raises(ValueError):
        ds.validation_split(1.5)


@pytest.mark.parametrize("requested", ["mnist", "auto"])
def test_download_fetches_a_damaged_cached_file_again(isolated, server, monkeypatch, requested):
    """A download in the cache that was cut or damaged later: without --download the run
    says the file is corrupt; with --download the damaged file is fetched again (the intact
    ones are kept) and the run loads. The user's own files elsewhere are never replaced."""
    root, url = server
    files = _write_set(root / "good", n_train=12, n_test=6)
    _publish(monkeypatch, "mnist", files)
    monkeypatch.setitem(
        data.IDX_SOURCES, "mnist", replace(data.IDX_SOURCES["mnist"], urls=(url + "/good/",))
    )
    assert data.load_dataset(requested, download=True).x_train.shape[0] == 12
    cached = isolated / "cache" / "batchnorm" / "mnist"
    damaged = cached / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:40])  # cut short
    kept = cached / "t10k-labels-idx1-ubyte.gz"
    kept_mtime = kept.stat().st_mtime_ns
    with pytest.raises(DatasetCorruptError):
        data.load_dataset(requested)
    assert data.load_dataset(requested, download=True).x_train.shape[0] == 12
    assert _md5(damaged) == _md5(files["train-images-idx3-ubyte"])
    assert kept.stat().st_mtime_ns == kept_mtime  # intact: not fetched again
    # a damaged file of the user's own folder: reported, not overwritten
    mine = isolated / "mine"
    own = _write_set(mine, n_train=12, n_test=6)
    own_damaged = own["train-images-idx3-ubyte"]
    own_damaged.write_bytes(own_damaged.read_bytes()[:40])
    before = own_damaged.read_bytes()
    with pytest.raises(DatasetCorruptError):
        data.load_dataset(requested, mine, download=True)
    assert own_damaged.read_bytes() == before


def _raw_server(answer: Any) -> tuple[str, socket.socket]:
    """A server on 127.0.0.1 that calls ``answer(connection)`` for each connection, in a
    thread; returns its URL and its listening socket (close it to stop)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/", srv


def test_a_mirror_that_sends_its_headers_a_byte_at_a_time_is_given_up(isolated):
    # each byte arrived within the socket timeout, so only the body's rate check ever ended a
    # slow transfer: headers trickled for ever held the download
    def trickle(c: socket.socket) -> None:
        try:
            for b in b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 60000:
                c.sendall(bytes([b]))
                time.sleep(0.2)
        except OSError:
            pass
        finally:
            c.close()

    url, srv = _raw_server(trickle)
    start = time.monotonic()
    try:
        with pytest.raises(DatasetNotFoundError, match="no complete answer .* within 1 s"):
            data.download_dataset(
                "mnist", isolated / "dl", urls=[url], md5={"a.gz": "0"}, timeout=1
            )
    finally:
        srv.close()
    assert time.monotonic() - start < 10


def test_mirror_failures_are_one_line_each_and_the_last_promises_no_next_mirror(isolated, capsys):
    def malformed(c: socket.socket) -> None:
        with c:
            c.recv(65536)
            c.sendall(b"NOT HTTP AT ALL\r\n\r\n")

    bad, srv = _raw_server(malformed)
    reply_cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123"  # then closed

    def cut(c: socket.socket) -> None:
        with c:
            c.recv(65536)
            c.sendall(reply_cut)

    cut_url, srv2 = _raw_server(cut)
    try:
        with pytest.raises(DatasetNotFoundError) as e:
            data.download_dataset("mnist", isolated / "dl", urls=[bad, cut_url], md5={"a.gz": "0"})
    finally:
        srv.close()
        srv2.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("; trying the next mirror") and "NOT HTTP AT ALL" in lines[0]
    assert "the connection closed in the middle of the answer" in lines[1]
    assert not lines[1].endswith("; trying the next mirror")
    assert str(e.value).count("\n  http://") == 2


def test_a_published_set_with_one_file_matching_no_checksum_is_refused(isolated, monkeypatch):
    # an uncompressed file has no CRC: a flipped bit in a label was loaded as verified MNIST
    folder = isolated / "mine"
    files = _write_set(folder, seed=9, gz=False)
    gz = {stem: p.with_name(p.name + ".gz") for stem, p in files.items()}
    for stem, p in files.items():
        gz[stem].write_bytes(gzip.compress(p.read_bytes()))
    _publish(monkeypatch, "mnist", gz, raw=True)
    for p in gz.values():
        p.unlink()
    labels = files["t10k-labels-idx1-ubyte"]
    raw = bytearray(labels.read_bytes())
    raw[-1] ^= 1
    labels.write_bytes(bytes(raw))
    for name in ("auto", "mnist"):
        with pytest.raises(DatasetCorruptError) as e:
            data.load_dataset(name, folder)
        msg = str(e.value)
        assert msg.startswith(f"{labels}: the other files here are mnist's published files")
        assert "replace it with an intact copy" in msg


def test_the_remedy_for_a_damaged_file_fits_where_it_is(isolated, monkeypatch):
    # "--download" never replaces a file outside the cache: it was every file's remedy
    places = {
        "mine": (isolated / "mine", "replace it with an intact copy, or leave --data-dir"),
        "cache": (isolated / "cache" / "batchnorm" / "mnist", "delete it and fetch it again"),
        "system": (isolated / "system" / "mnist", "reinstall the package"),
    }
    for where, (folder, remedy) in places.items():
        files = _write_set(folder, seed=10)
        damaged = files["train-images-idx3-ubyte"]
        damaged.write_bytes(damaged.read_bytes()[:100])
        with pytest.raises(DatasetCorruptError, match=rf"^{re.escape(str(damaged))}: ") as e:
            data.load_dataset("mnist", folder if where == "mine" else None)
        assert remedy in str(e.value), (where, str(e.value))
        shutil.rmtree(folder)


def test_auto_takes_a_set_in_the_named_folder_before_the_cache(isolated, monkeypatch):
    # MNIST's lookup went through every place before Fashion-MNIST's: MNIST in the cache hid
    # the Fashion-MNIST in the folder the user named (DIR/fashion-mnist/)
    cache = _write_set(isolated / "cache" / "batchnorm" / "mnist", seed=11)
    mine = isolated / "mine"
    _write_set(mine / "fashion-mnist", seed=12)
    for given in ("argument", "environment"):
        if given == "environment":
            monkeypatch.setenv(data.ENV_DATA_DIR, str(mine))
        ds = data.load_dataset("auto", mine if given == "argument" else None)
        assert ds.name == "fashion-mnist" and ds.source == str(mine / "fashion-mnist")
        assert data.resolve_name("auto", mine) == "fashion-mnist"
    monkeypatch.delenv(data.ENV_DATA_DIR)
    # without a named folder, MNIST's folder comes before Fashion-MNIST's in each place
    _write_set(isolated / "cache" / "batchnorm" / "fashion-mnist", seed=13)
    assert data.load_dataset("auto").source == str(cache["train-images-idx3-ubyte"].parent)


def test_a_named_dataset_in_a_subfolder_is_found_past_the_other_one_lying_flat(
    isolated, monkeypatch
):
    folder = isolated / "mine"
    _publish(monkeypatch, "mnist", _write_set(folder, seed=14))
    _publish(monkeypatch, "fashion-mnist", _write_set(folder / "fashion-mnist", seed=15))
    ds = data.load_dataset("fashion-mnist", folder)
    assert ds.name == "fashion-mnist" and ds.source == str(folder / "fashion-mnist")
    assert data.load_dataset("mnist", folder).source == str(folder)
    shutil.rmtree(folder / "fashion-mnist")  # with none to find, the refusal stands
    with pytest.raises(data.DatasetMismatchError, match="are mnist"):
        data.load_dataset("fashion-mnist", folder)


_UNENTERABLE = r"""
import os, sys
from pathlib import Path
from batchnorm.lab import data
root = Path(sys.argv[1])
data.SYSTEM_DATA_ROOT = root / "system"
os.environ["XDG_CACHE_HOME"] = str(root / "cache")
print(data.load_dataset("auto").name)  # the cache's mnist/ cannot be entered: the digits
for args in (("mnist",), ("auto", root / "closed"), ("mnist", root / "unreadable")):
    try:
        data.load_dataset(*args)
    except (data.DatasetNotFoundError, data.DatasetCorruptError) as e:
        print(str(e).replace("\n", " | "))
"""


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv as root"
)
def test_folders_and_files_that_cannot_be_read_are_named_with_the_fix(tmp_path):
    # Path.is_file raises for a folder that cannot be entered: a bare PermissionError (from
    # the user cache, under auto too), which the command then blamed on the run's folder
    cache = tmp_path / "cache" / "batchnorm" / "mnist"
    _write_set(cache, seed=16)
    _write_set(tmp_path / "closed", seed=17)
    files = _write_set(tmp_path / "unreadable", seed=18)
    files["train-labels-idx1-ubyte"].chmod(0)
    for d in (cache, tmp_path / "closed"):
        d.chmod(0)
    script = tmp_path / "probe.py"
    script.write_text(_UNENTERABLE)
    # root reads anything: drop the capabilities that let it
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    command = [*(drop if os.geteuid() == 0 else []), sys.executable, str(script), str(tmp_path)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        for d in (cache, tmp_path / "closed"):
            d.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "digits"
    assert f"{cache} (cannot be entered: permission denied; chmod a+rx it)" in out[1]
    assert out[2] == (
        f"--data-dir {tmp_path / 'closed'} cannot be entered (permission denied); make it "
        f"readable (chmod a+rx {tmp_path / 'closed'}), or leave --data-dir out to use the "
        "usual places"
    )
    labels = files["train-labels-idx1-ubyte"]
    assert (
        out[3]
        == f"{labels}: cannot read (Permission denied); make it readable (chmod a+r {labels})"
    )
