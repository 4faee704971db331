"""The fused kernels against the NumPy float64 reference, and the torch adapter against the
plain-torch backend: odd shapes, both layouts, both dtypes, threads on and off, stress inputs."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batchnorm import functional as F
from batchnorm import kernels as K
from batchnorm import reference as R

pytest.importorskip("numba")

K_CHUNK = 2048  # batchnorm.kernels._loops.CHUNK, without importing Numba at collection

# relative tolerance (to the largest reference magnitude) per dtype
TOL = {np.float32: 2e-5, np.float64: 1e-11}

# (N, C, L) channels-first and (M, C) rows × channels; chosen to hit every work split:
# C=1, L=1, N=2, primes, C not divisible by the thread count (blocked channels), huge C, tiny M
NCL_SHAPES = [
    (2, 1, 5),
    (3, 7, 1),
    (13, 5, 11),
    (2, 3, 17),
    (5, 1, 1000),
    (4, 2, 3),
    (7, 64, 3),
    (3, 4, 600),  # long rows, channels spread evenly: a channel per task
    (2, 17, 2111),  # long rows, C not a multiple of the threads
    (5, 3, 31),  # the longest short rows, few samples: row by row (kernels._short)
    (121, 3, 31),  # ... samples enough (N ≥ L²/8): (N, C·L) for the (M, C) loops
    (16, 5, 11),  # the fewest samples that take the view for rows of 11
    (3, 5, 32),  # the shortest rows the (N, C, L) loops take, pieces of whole rows
    (4, 1, 97),  # one channel of rows of a prime length
    (5, 3, 49),  # 7×7 rows: the element loops run on into the next row (kernels._loops._OVERRUN)
    (3, 1, 81),  # overrun rows of one channel
    (512, 3, 4),  # short rows of few channels: (N, C·L) taken 8 rows at a time (kernels._widen)
]
# (M, C) work in row blocks of 128 rows and tiles of 2048 (float32) / 1024 (float64) channels:
# ragged blocks, several tiles with a partial last one
MC_SHAPES = [(2, 1), (7, 13), (2, 5003), (1000, 1), (101, 3), (3, 2), (300, 37), (37, 2500)]
# few channels: several rows taken as one (kernels._widen)
MC_SHAPES += [(4096, 32), (1024, 3)]


def _close(
    got: np.ndarray, want: np.ndarray, dtype: type, scale: float = 1.0, mag: float = 0.0
) -> None:
    """``got`` matches ``want`` to the dtype's tolerance relative to want's magnitude (or to
    ``mag``, the magnitude of the terms summed, when larger)."""
    ref = max(float(np.max(np.abs(want))), mag) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    assert err <= TOL[dtype] * scale * max(ref, 1.0), (err, ref)


def _data(shape: tuple[int, ...], dtype: type, seed: int = 0, loc: float = 0.0, std: float = 1.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (loc + std * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, dy, w, b


def _check_all(x, dy, w, b, dtype, parallel, eps=1e-5, scale=1.0, stream=None):  # type: ignore[no-untyped-def]
    y, mean, var, invstd = K.forward_train(x, w, b, eps, parallel=parallel, stream=stream)
    y_ref, _, mean_ref, var_ref = R.batch_norm_forward(x, w, b, eps)
    assert y.dtype == x.dtype and y.shape == x.shape and mean.dtype == x.dtype
    _close(y, y_ref, dtype, scale)
    _close(mean, mean_ref, dtype, scale)
    _close(var, var_ref, dtype, scale)
    _close(invstd, 1 / np.sqrt(var_ref + eps), dtype, scale)
    dx, dw, db = K.backward(dy, x, mean, invstd, w, parallel=parallel, stream=stream)
    dx_ref, dw_ref, db_ref = R.batch_norm_backward(dy, x, w, eps)
    assert dx is not None
    _close(dx, dx_ref, dtype, scale)
    _close(dw, dw_ref, dtype, scale)
    _close(db, db_ref, dtype, scale)
    sc, sh = R.inference_affine(mean_ref, var_ref * 1.5 + 0.1, w, b, eps)
    y_eval = K.forward_eval(x, sc, sh, parallel=parallel, stream=stream)
    # the contract is one multiply-add x·scale + shift: its rounding is relative to |x·scale|
    mag = float(np.max(np.abs(x.astype(np.float64)))) * float(np.max(np.abs(sc)))
    y_ref = R.batch_norm_inference(x, mean_ref, var_ref * 1.5 + 0.1, w, b, eps)
    _close(y_eval, y_ref, dtype, mag=mag)
    # the backward of inference: dx = dy·scale and Σdy·(x − μ), Σdy in one pass
    pm = mean_ref.astype(dtype) + dtype(0.25)  # a population mean other than the batch's
    pv = (var_ref * 1.5 + 0.1).astype(dtype)
    dxe, sdyx, sdy = K.backward_eval(dy, x, pm, pv, w, eps, parallel=parallel, stream=stream)
    axes = (0,) if x.ndim == 2 else (0, 2)
    view = (1, -1) if x.ndim == 2 else (1, -1, 1)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    sc64 = 1.0 / np.sqrt(pv.astype(np.float64) + eps)
    if w is not None:
        sc64 = sc64 * w.astype(np.float64)
    assert dxe is not None and dxe.dtype == x.dtype and sdyx.dtype == np.float64
    _close(dxe, dy64 * sc64.reshape(view), dtype)
    centered = x64 - pm.astype(np.float64).reshape(view)
    _close(sdyx, (dy64 * centered).sum(axes), dtype, mag=float(np.abs(dy64 * centered).sum()))
    _close(sdy, dy64.sum(axes), dtype, mag=float(np.abs(dy64).sum()))
    none, sdyx2, sdy2 = K.backward_eval(
        dy, x, pm, pv, w, eps, need_dx=False, parallel=parallel, stream=stream
    )
    assert none is None
    np.testing.assert_allclose(sdyx2, sdyx, rtol=1e-12, atol=1e-12 * float(np.abs(sdyx).max()))
    np.testing.assert_allclose(sdy2, sdy, rtol=1e-12, atol=1e-12 * float(np.abs(sdy).max()))


@pytest.mark.parametrize("stream", [False, True], ids=["stores", "streaming"])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", NCL_SHAPES + MC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, parallel, stream):  # type: ignore[no-untyped-def]
    x, dy, w, b = _data(shape, dtype, seed=sum(shape))
    _check_all(x, dy, w, b, dtype, parallel, stream=stream)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1, 3, 7, 15])
@pytest.mark.parametrize(
    "shape", [(3, 2, 2 * K_CHUNK + 37), (2, 1, 67), (5, 7, 130), (7, 5, 49), (41, 70)], ids=str
)
def test_streaming_stores_at_every_alignment(shape, offset, dtype):  # type: ignore[no-untyped-def]
    """Streaming stores write whole 64-byte lines: outputs starting anywhere inside a line, rows
    longer than a chunk, and ragged ends must give exactly the plain stores' values."""
    x, dy, w, b = _data(shape, dtype, seed=offset)
    n = int(np.prod(shape))
    raw = np.zeros(n + offset + 16, dtype)
    out = raw[offset : offset + n].reshape(shape)
    y, mean, _, invstd = K.forward_train(x, w, b, out=out, stream=True, parallel=True)
    y_plain, *_ = K.forward_train(x, w, b, stream=False, parallel=True)
    np.testing.assert_array_equal(y, y_plain)
    assert not raw[:offset].any() and not raw[offset + n :].any()  # nothing outside is touched
    for par in (False, True):  # one piece, and pieces that split rows
        dx, *_ = K.backward(dy, x, mean, invstd, w, out=out, stream=True, parallel=par)
        dx_plain = K.backward(dy, x, mean, invstd, w, stream=False, parallel=par)[0]
        np.testing.assert_array_equal(dx, dx_plain)
        sc, sh = np.full(shape[1], 1.5, dtype), np.full(shape[1], -0.5, dtype)
        ye = K.forward_eval(x, sc, sh, out=out, stream=True, parallel=par)
        np.testing.assert_array_equal(ye, K.forward_eval(x, sc, sh, stream=False, parallel=par))
        assert not raw[:offset].any() and not raw[offset + n :].any()
        de, *_ = K.backward_eval(dy, x, mean, sc, w, out=out, stream=True, parallel=par)
        de_plain = K.backward_eval(dy, x, mean, sc, w, stream=False, parallel=par)[0]
        np.testing.assert_array_equal(de, de_plain)
        assert not raw[:offset].any() and not raw[offset + n :].any()


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
def test_rows_by_channels_sums_both_sweeps(parallel):  # type: ignore[no-untyped-def]
    """``(M, C)`` inputs below ``MC_QUAD_BELOW`` bytes are summed four rows per sweep, larger
    ones a row per sweep: both sides of the threshold (a row count that is no multiple of 4,
    so the leftover rows of each block take the one-row loop) match the reference, and a
    non-finite value inside a four-row sweep still reaches the statistics."""
    from batchnorm.kernels._loops import MC_QUAD_BELOW

    rows = MC_QUAD_BELOW // (4 * 64)
    for M in (rows - 3, rows + 5):
        x, dy, w, b = _data((M, 64), np.float32, seed=M, loc=3.0)
        _check_all(x, dy, w, b, np.float32, parallel)
    x, _, _, _ = _data((131, 6), np.float32, seed=1)
    x[2, 4] = np.nan
    _, mean, var, _ = K.forward_train(x, parallel=parallel)
    assert np.isnan(mean[4]) and np.isnan(var[4])
    assert np.all(np.isfinite(np.delete(mean, 4))) and np.all(np.isfinite(np.delete(var, 4)))


def test_rows_of_few_channels_are_taken_several_at_a_time() -> None:
    """Rows × channels views with short rows run the loops on ``R`` rows as one (the vectors
    repeated): R is the largest power of two that keeps the rows within WIDE_ROW_BYTES,
    divides the rows and leaves WIDE_MIN_ROWS of them; the shapes the reference tests use
    for it do take it, and the compiled node's path (channels_last modules) matches torch.nn."""
    assert K._widen(65536, 32, 4) == K.WIDE_ROW_BYTES // (32 * 4)
    assert K._widen(65536, 32, 8) == K.WIDE_ROW_BYTES // (32 * 8)
    assert K._widen(4095, 32, 4) == 1  # odd: no row count divides
    assert K._widen(96, 2, 4) == 1  # 2 rows as one would leave 48 < WIDE_MIN_ROWS
    assert K._widen(1 << 20, K.WIDE_ROW_BYTES // 4, 4) == 1  # rows long enough
    assert K._widen(768, 3, 4) == 8  # 16 rows as one would leave 48 < WIDE_MIN_ROWS
    # outputs stored normally take rows of up to PLAIN_WIDE_ROW_BYTES, EVAL_WIDE_ROW_BYTES in
    # inference
    assert K._widen(65536, 32, 4, False) == K.PLAIN_WIDE_ROW_BYTES // (32 * 4)
    assert K._widen(65536, 32, 4, False, True) == K.EVAL_WIDE_ROW_BYTES // (32 * 4)
    assert K._widen(6272, 128, 4, False, True) == 8 and K._widen(6272, 128, 4, False) == 4
    assert K._widen(6272, 128, 4) == 1 and K._widen(6272, 128, 4, True, True) == 1
    assert K._widen(1 << 20, K.EVAL_WIDE_ROW_BYTES // 4, 4, False, True) == 1
    x = np.empty((6272, 128), np.float32)
    wide = K._rows_view(x, 2, stream=False, inference=True)
    assert wide is not None and wide[2] == 8 and wide[0].shape == (784, 1024)
    wide = K._rows_view(x, 2, stream=False)
    assert wide is not None and wide[2] == 4 and wide[0].shape == (1568, 512)
    for shape, reps in (((4096, 32), 4), ((1024, 3), 16), ((512, 3, 4), 8), ((4096, 5), 16)):
        rows = K._rows_view(np.empty(shape, np.float32), 2)
        assert rows is not None and rows[2] == reps, (shape, rows and rows[2])
        width = shape[1] * (shape[2] if len(shape) == 3 else 1)
        assert rows[0].shape == (shape[0] // reps, reps * width)
    torch.manual_seed(0)
    for shape in ((64, 3, 8, 8), (32, 32, 8, 8)):  # rows of 3 and 32 channels
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(memory_format=torch.channels_last)
        ours = F.batch_norm_train(x.requires_grad_(), None, None, 1e-5, backend="numba")[0]
        x_ref = x.detach().clone().requires_grad_()
        ref = torch.nn.functional.batch_norm(x_ref, None, None, training=True)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(ref)
        (dx,) = torch.autograd.grad(ours, x, g)
        (dx_ref,) = torch.autograd.grad(ref, x_ref, g)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
        rm, rv = torch.rand(shape[1], dtype=x.dtype), torch.rand(shape[1], dtype=x.dtype) + 0.5
        y_eval = F.batch_norm_eval(x.detach(), rm, rv, backend="numba")
        ref_eval = torch.nn.functional.batch_norm(x.detach(), rm, rv, training=False)
        torch.testing.assert_close(y_eval, ref_eval, rtol=1e-10, atol=1e-10)


def test_short_rows_take_the_rows_view_when_there_are_samples_enough() -> None:
    """``(N, C, L)`` with rows shorter than SHORT_ROWS runs the ``(M, C)`` loops on ``(N, C·L)``
    once N ≥ L² / SHORT_N_DIVISOR (the view's cost per column against the row loop's cost per
    row); fewer samples, and rows of SHORT_ROWS or more, stay ``(N, C, L)``."""
    assert K.SHORT_N_DIVISOR == 8
    for N, L, view in ((1, 1, True), (2, 4, True), (1, 4, False), (32, 16, True),
                       (31, 16, False), (16, 11, True), (15, 11, False),
                       (121, 31, True), (120, 31, False), (1 << 20, K.SHORT_ROWS, False)):  # fmt: skip
        assert K._short(N, L) == view, (N, L)
        rows = K._rows_view(np.empty((N, 3, L), np.float32), 1)
        assert (rows is not None) == view, (N, L)
        if view:
            assert rows is not None and rows[1] == L and rows[0].size == N * 3 * L
    # the compiled entries decide with the same helper
    from batchnorm.kernels import _entries

    assert _entries._short.py_func is K._short


def test_streaming_policy_by_size_and_layout():  # type: ignore[no-untyped-def]
    """Which outputs are streamed when nothing forces it (np.empty touches no pages)."""
    big = K.STREAM_ABOVE // 4  # float32 values in STREAM_ABOVE bytes
    mc = np.empty((big // 64, 64), np.float32)  # rows of whole 64-byte lines
    assert K._stream(mc, None) and not K._stream(mc, False)
    odd = np.empty((big // 100 + 1, 100), np.float32)  # 400-byte rows: partial lines
    assert not K._stream(odd, None) and K._stream(odd, True)
    assert K._stream(np.empty((big // 600 + 1, 600), np.float32), None)  # long rows
    small = np.empty((big // 64 - 1, 64), np.float32)
    assert not K._stream(small, None) and K._stream(small, True)
    long_rows = np.empty((big // (4 * K.FUSED_ROWS), 4, K.FUSED_ROWS), np.float32)
    assert K._stream(long_rows, None)
    short_rows = np.empty((big // 196 + 1, 1, 196), np.float32)
    assert not K._stream(short_rows, None)
    # rows shorter than SHORT_ROWS are written as the (N, C·L) rows the (M, C) loops see
    grouped = np.empty((big // (16 * 4) + 1, 16, 4), np.float32)  # 256-byte rows of (N, C·L)
    assert K._stream(grouped, None)
    assert not K._stream(np.empty((big // 15 + 1, 5, 3), np.float32), None)  # 60-byte rows
    # the output's start: rows of whole lines in an output 16 bytes into a line (where
    # np.empty_like puts a large array) are partial lines at both ends, so they are not
    # streamed; long rows are, wherever they start
    for x in (mc, grouped, np.empty((big // 600 + 1, 600), np.float32)):
        on = K.empty_aligned(x.shape, x.dtype)
        off = K.empty_aligned((x.size + 16,), x.dtype)[4 : 4 + x.size].reshape(x.shape)
        assert K._stream(x, None, on) == K._stream(x, None)
        assert K._stream(x, None, off) == (x.shape[-1] >= K.FUSED_ROWS)
        assert K._stream(x, True, off) and not K._stream(x, False, on)


def test_outputs_whose_pass_fits_half_the_cache_are_stored_normally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above STREAM_ABOVE, an output of the (M, C) loops is stored normally while the arrays
    its pass reads and writes (2 forward, 3 backward) fill at most half of the last-level
    cache; channels-first long rows stream by size alone."""
    monkeypatch.setattr(K, "LLC_BYTES", 48 << 20)  # half: 24 MiB
    for nbytes, fwd_kept, bwd_kept in (
        (K.STREAM_ABOVE, True, True),
        (8 << 20, True, True),
        ((8 << 20) + 8192, True, False),
        (12 << 20, True, False),
        ((12 << 20) + 8192, False, False),
    ):
        n = nbytes // 4
        mc = np.empty((n // 64, 64), np.float32)  # rows of whole lines: streamed by size
        ncl = np.empty((n // (2 * 1024), 2, 1024), np.float32)  # long rows: streamed by size
        grouped = np.empty((n // (16 * 4), 16, 4), np.float32)  # the (M, C) loops' view
        assert mc.nbytes == ncl.nbytes == grouped.nbytes == nbytes
        for x in (mc, grouped):
            assert K._stream(x, None)  # no pass named: by size
            assert K._stream(x, None, tensors=2) != fwd_kept, (x.shape, nbytes)
            assert K._stream(x, None, tensors=3) != bwd_kept, (x.shape, nbytes)
            assert K._stream(x, True, tensors=2)  # forced stays forced
        assert K._stream(ncl, None, tensors=2) and K._stream(ncl, None, tensors=3)
    # an unknown cache size keeps the STREAM_ABOVE rule for every pass
    monkeypatch.setattr(K, "LLC_BYTES", 0)
    x = np.empty((K.STREAM_ABOVE // 256, 64), np.float32)
    assert K._stream(x, None, tensors=2)
    # below STREAM_ABOVE nothing streams, whatever the cache
    small = np.empty(((K.STREAM_ABOVE - 256) // 256, 64), np.float32)
    assert not K._stream(small, None) and not K._stream(small, None, tensors=2)


@pytest.mark.parametrize("shape", [(16384, 64), (4096, 64, 4)], ids=str)
def test_outputs_kept_in_the_cache_match_the_reference(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 4 MiB with a 32 MiB cache every pass of the (M, C) loops stores normally (rows
    widened as for outputs in the cache) where they streamed before: the same results."""
    monkeypatch.setattr(K, "LLC_BYTES", 32 << 20)
    x, dy, w, b = _data(shape, np.float32, seed=3)
    assert x.nbytes == K.STREAM_ABOVE
    assert not K._stream(x, None, tensors=2) and not K._stream(x, None, tensors=3)
    assert K._stream(x, None)  # streamed by size alone
    _check_all(x, dy, w, b, np.float32, True)


def test_modules_at_the_cache_boundary_match_torch() -> None:
    """Through the compiled node (its entries froze this machine's LLC_BYTES): a 4 MiB
    channels_last activation and a 12 MiB one, kept in the cache or streamed as the machine
    decides, give torch.nn's outputs and gradients."""
    import batchnorm

    for shape in ((16, 64, 32, 32), (48, 64, 32, 32)):
        g = torch.Generator().manual_seed(sum(shape))
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        ours = batchnorm.BatchNorm2d(64, backend="numba")
        theirs = torch.nn.BatchNorm2d(64)
        outs = []
        for m in (ours, theirs):
            xg = x.clone().requires_grad_(True)
            y = m(xg)
            y.backward(dy)
            m.eval()
            with torch.no_grad():
                ye = m(x)
            outs.append((y.detach(), xg.grad, m.weight.grad, m.bias.grad, ye))
        for a, t in zip(*outs, strict=True):
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4)


def test_last_level_cache_size_from_sysfs(tmp_path: Path) -> None:
    """The highest-level data or unified cache of cpu0; 0 when sysfs has none."""
    for name, kind, level, size in (
        ("index0", "Data", 1, "48K"),
        ("index1", "Instruction", 1, "32K"),
        ("index2", "Unified", 2, "1024K"),
        ("index3", "Unified", 3, "32768K"),
        ("other", "Unified", 9, "1G"),  # not a cache index
    ):
        d = tmp_path / name
        d.mkdir()
        (d / "type").write_text(kind + "\n")
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(size + "\n")
    assert K._llc_bytes(str(tmp_path)) == 32 << 20
    (tmp_path / "index3" / "size").write_text("2M\n")
    assert K._llc_bytes(str(tmp_path)) == 2 << 20
    (tmp_path / "index3" / "size").write_text("unreadable\n")
    assert K._llc_bytes(str(tmp_path)) == 1 << 20  # the level-2 cache then
    assert K._llc_bytes(str(tmp_path / "missing")) == 0


def test_compiled_entries_choose_streaming_as_the_array_api() -> None:
    """The entries the compiled node calls pick streaming stores by the same rule, output
    start included."""
    from batchnorm.kernels import _entries

    big = K.STREAM_ABOVE // 4
    shapes = [(big // 64, 64), (big // 100 + 1, 100), (big // 600 + 1, 600), (big // 64 - 1, 64)]
    shapes += [(big // (16 * 4) + 1, 64), (big // (4 * K.FUSED_ROWS), 4, K.FUSED_ROWS)]
    # rows of 8 channels (32 bytes: partial lines) are taken 16 at a time: whole lines
    shapes += [(big // 8, 8)]
    # forward and backward arrays that fill half the cache, and just more (where it is known)
    for part in (K.LLC_BYTES // 16, K.LLC_BYTES // 24):  # float32 values
        if part // 64 > big // 64:
            shapes += [(part // 64, 64), (part // 64 + 1, 64), (part // 1024, 2, 512)]
    assert K._stream(np.empty((big // 8, 8), np.float32), None)
    for shape in shapes:
        x = np.empty(shape, np.float32)
        for off in (0, 4, 16):
            raw = K.empty_aligned((x.size + 16,), x.dtype)
            y = raw[off : off + x.size].reshape(shape)
            # the entries choose on the view the loops run on (_entries._wide: R rows as one)
            rows = K._rows_view(x, 1)
            xw = x if rows is None or x.ndim == 3 else rows[0]
            yw = y.reshape(xw.shape)
            assert _entries._stream(xw, yw) == K._stream(x, None, y), (shape, off)
            # outputs the cache may keep (the entries froze LLC_BYTES)
            for t in (2, 3):
                kept = K._stream(x, None, y, tensors=t)
                assert _entries._stream(xw, yw, t if x.ndim == 2 else 0) == kept, (shape, off, t)


def test_outputs_start_on_a_cache_line():  # type: ignore[no-untyped-def]
    """Outputs the kernels allocate (and the empty_aligned helper) start a 64-byte line."""
    for shape, dtype in (((5,), np.float32), ((12345, 7), np.float64), ((3, 4, 5), np.float32)):
        a = K.empty_aligned(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.__array_interface__["data"][0] % K.LINE_BYTES == 0
    x = np.random.default_rng(0).standard_normal((40, 3, 9)).astype(np.float32)
    y, *_ = K.forward_train(x)
    assert y.__array_interface__["data"][0] % K.LINE_BYTES == 0


def test_float32_overflowing_squares_are_summed_in_float64():  # type: ignore[no-untyped-def]
    """Values near float32's range square to inf in float32: those segments are summed again in
    float64, so the statistics stay finite wherever float64 can hold them."""
    rng = np.random.default_rng(5)
    for shape in ((4, 3, 50), (64, 3)):
        x = (rng.standard_normal(shape) * 1e25).astype(np.float32)
        _, mean, var, invstd = K.forward_train(x)
        _, var_ref = R.batch_stats(x)
        assert np.all(np.isfinite(invstd)) and np.all(invstd > 0)
        np.testing.assert_allclose(1 / invstd.astype(np.float64) ** 2, var_ref, rtol=1e-5)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("shape", [(5, 3, 49), (4, 2, 81), (40, 3)])
def test_outputs_in_place_of_an_input(shape, parallel):  # type: ignore[no-untyped-def]
    """An output given as an input's own memory (``out=x``, ``out=dy``; the backward's also
    streamed, as the compiled node's dx over dy is) gets the values it would get elsewhere:
    the element loops that run on into the next row
    (kernels._loops._OVERRUN) must not, or that row's head is read after it was written."""
    x, dy, w, b = _data(shape, np.float32, seed=3, loc=2.0)
    y, mean, var, invstd = K.forward_train(x, w, b, parallel=parallel)
    dx, _, _ = K.backward(dy, x, mean, invstd, w, parallel=parallel)
    sc, sh = R.inference_affine(mean, var, w, b, 1e-5)
    sc, sh = sc.astype(np.float32), sh.astype(np.float32)
    ye = K.forward_eval(x, sc, sh, parallel=parallel)
    xi = x.copy()
    got, *_ = K.forward_train(xi, w, b, out=xi, parallel=parallel)
    assert got is xi
    np.testing.assert_array_equal(xi, y)
    for alias, stream in itertools.product(("dy", "x"), (None, True)):
        xi, dyi = x.copy(), dy.copy()
        target = dyi if alias == "dy" else xi
        K.backward(dyi, xi, mean, invstd, w, out=target, parallel=parallel, stream=stream)
        np.testing.assert_array_equal(target, dx)
    for stream in (None, True):  # True: the streamed loops (short (N, C, L) rows row by row)
        xi = x.copy()
        K.forward_eval(xi, sc, sh, out=xi, parallel=parallel, stream=stream)
        np.testing.assert_array_equal(xi, ye)


def test_outputs_overlapping_an_input_in_part_are_refused() -> None:
    """An ``out`` one value along from ``x`` (or ``dy``, or over a per-channel vector) would
    have values overwritten before they are read — the results came back with inf in them.
    Each call refuses it, naming the input, and writes nothing."""
    rng = np.random.default_rng(11)
    shape = (60, 100)
    n = 6000
    buf = rng.standard_normal(n + 1).astype(np.float32)
    x, shifted = buf[:n].reshape(shape), buf[1:].reshape(shape)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = np.ones(100, np.float32)
    _, mean, var, invstd = K.forward_train(x.copy())
    before = buf.copy()
    calls = [
        lambda o: K.forward_train(x, out=o),
        lambda o: K.forward_eval(x, w, w, out=o),
        lambda o: K.backward(dy, x, mean, invstd, out=o),
        lambda o: K.backward_eval(dy, x, mean, var, out=o),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"out overlaps x \(float32 \(60, 100\)\) in part"):
            call(shifted)
    np.testing.assert_array_equal(buf, before)
    gbuf = np.concatenate([dy.ravel(), [0.0]]).astype(np.float32)
    with pytest.raises(ValueError, match="out overlaps dy"):
        K.backward(gbuf[:n].reshape(shape), x, mean, invstd, out=gbuf[1:].reshape(shape))
    # an output whose memory holds a per-channel vector the call reads
    o = np.empty(shape, np.float32)
    with pytest.raises(ValueError, match="out overlaps scale"):
        K.forward_eval(x, o[0], w, out=o)
    with pytest.raises(ValueError, match="out overlaps mean"):
        K.backward(dy, x, o[1], invstd, out=o)
    # the whole memory of an input is still a legal out (in place)
    xi = x.copy()
    y, *_ = K.forward_train(xi, out=xi)
    assert y is xi and np.all(np.isfinite(xi))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("shape", [(5, 3, 49), (3, 1, 50), (7, 4, 127), (9, 5, 128)])
def test_row_pairs_sum_each_row_on_its_own(shape, parallel):  # type: ignore[no-untyped-def]
    """Whole rows shorter than ``PAIR_BELOW`` are summed two per sweep: a pair whose other row
    overflows float32 (its channel's squares summed again in float64) leaves this row's sums
    alone; an odd number of rows per thread, one channel (both rows of a pair in it) and the
    row lengths on both sides of the threshold all match the float64 statistics."""
    from batchnorm.kernels._loops import PAIR_BELOW

    assert shape[2] < PAIR_BELOW or shape[2] == PAIR_BELOW
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * 2.0 + 3.0
    x[:, 0] *= 1e25  # float32 squares overflow in channel 0 only
    x = x.astype(np.float32)
    _, mean, var, invstd = K.forward_train(x, parallel=parallel)
    mean_ref, var_ref = R.batch_stats(x)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5)
    # channel 0's variance is beyond float32 (var is inf there); its 1/√(σ² + ε) is not
    np.testing.assert_allclose(1 / invstd.astype(np.float64) ** 2, var_ref, rtol=1e-5)
    np.testing.assert_allclose(var[1:], var_ref[1:], rtol=1e-5)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "loc,std",
    [(1e4, 1.0), (1.0, 1e-3), (-3e3, 1e-1), (0.0, 1e15)],
    ids=["offset1e4", "tiny-std", "neg-offset", "huge"],
)
@pytest.mark.parametrize(
    "shape",
    [(8, 3, 257), (700, 3, 6), (4099, 5), (4096, 5)],
    ids=["NCL", "NCL-short", "MC", "MC-widened"],
)
def test_stress_inputs(shape, loc, std, dtype, parallel):  # type: ignore[no-untyped-def]
    """|mean| ≫ std and extreme magnitudes: the naive E[x²] − E[x]² would lose every digit."""
    x, dy, w, b = _data(shape, dtype, seed=1, loc=loc, std=std)
    # with |mean|/std = r, x − mean keeps r·ε fewer digits in any dtype (the reference's own
    # two-pass float64 result included): the tolerance grows with r
    scale = max(1.0, abs(loc) / std / 1e3)
    _check_all(x, dy, w, b, dtype, parallel, scale=scale)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("std", [1e20, 1e25, 1e30])
@pytest.mark.parametrize(
    "shape",
    [(8, 3, 57), (60, 4, 9), (3, 4, 600), (601, 5)],
    ids=["NCL", "NCL-short", "fused", "MC"],
)
def test_float32_backward_keeps_the_xhat_term_at_huge_spreads(shape, std, parallel):  # type: ignore[no-untyped-def]
    """dx of a float32 input with a spread of 1e20 and beyond is of the size of 1/spread: the
    x̂ term's coefficient invstd²·Σdy·x̂/m is then below float32's range unless invstd is
    factored out. Checked relative to dx's own magnitude (the stress test's absolute floor of
    1 would accept any dx this small)."""
    x, dy, w, _ = _data(shape, np.float32, seed=4, std=std)
    _, mean, _, invstd = K.forward_train(x, w, None)
    dx, dw, _ = K.backward(dy, x, mean, invstd, w, parallel=parallel)
    dx_ref, dw_ref, _ = R.batch_norm_backward(dy, x, w)
    assert dx is not None
    err = np.max(np.abs(dx.astype(np.float64) - dx_ref)) / np.max(np.abs(dx_ref))
    assert err < 1e-5, err
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(dw_ref)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_naive_moments_would_fail(dtype):  # type: ignore[no-untyped-def]
    """The offset stress input really is hard: E[x²] − E[x]² in the dtype is badly wrong there,
    while the kernel's variance matches the reference."""
    x = (1e4 + np.random.default_rng(3).standard_normal((64, 2, 50))).astype(dtype)
    if dtype is np.float64:
        x = x + 1e8  # push float64 into the same trouble
    naive = (x * x).mean(axis=(0, 2)) - x.mean(axis=(0, 2)) ** 2
    _, var_ref = R.batch_stats(x)
    assert np.max(np.abs(naive - var_ref) / var_ref) > 1e-2
    _, _, var, _ = K.forward_train(x)
    _close(var, var_ref, dtype)


@pytest.mark.parametrize("shape", [(6, 4, 40), (6, 4, 9), (33, 4)], ids=["NCL", "NCL-short", "MC"])
def test_constant_channel_and_no_affine(shape):  # type: ignore[no-untyped-def]
    x, dy, _, _ = _data(shape, np.float64)
    x[:, 1] = 2.5  # zero variance: y = β, finite gradients
    _check_all(x, dy, None, None, np.float64, None)
    y, mean, var, invstd = K.forward_train(x, None, None, 1e-3)
    assert var[1] == 0.0 and np.all(np.isfinite(y)) and np.allclose(y[:, 1], 0.0)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("shape", [(5, 3, 40), (5, 3, 7), (40, 3)], ids=["NCL", "NCL-short", "MC"])
def test_nonfinite_input_gives_nonfinite_stats(shape, parallel):  # type: ignore[no-untyped-def]
    """NaN/inf must reach the statistics (the running update then refuses the batch)."""
    x, dy, _, _ = _data(shape, np.float32)
    x[1, 0] = np.nan
    x[2, 2] = np.inf
    _, mean, var, _ = K.forward_train(x, parallel=parallel)
    assert np.isnan(mean[0]) and np.isnan(var[0])
    assert not np.isfinite(var[2])
    assert np.isfinite(mean[1]) and np.isfinite(var[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_views_are_not_misread(dtype):  # type: ignore[no-untyped-def]
    base, dy, w, b = _data((6, 8, 10), dtype)
    for view in (base[:, ::2], base.transpose(2, 1, 0), base[::-1, :, 1:8]):
        C = view.shape[1]
        y, *_ = K.forward_train(view, w[:C], b[:C])
        _close(y, R.batch_norm_forward(view, w[:C], b[:C])[0], dtype)
        g = np.ascontiguousarray(np.flip(view, 0))
        dx, *_ = K.backward(g[:, :, :], view, *K.forward_train(view)[1:4:2], w[:C])
        assert dx is not None
        _close(dx, R.batch_norm_backward(g, view, w[:C])[0], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 4, 5, 2), (4, 2, 1, 1)])
def test_inputs_of_any_rank_keep_their_shape(shape, dtype):  # type: ignore[no-untyped-def]
    """``(N, C, H, W)`` and ``(N, C, D, H, W)`` arrays, contiguous or not, are taken as the
    ``(N, C, L)`` they are in memory; every output comes back in the input's shape, ``out``
    is given in it, and the values are the reference's."""
    x, dy, w, b = _data(shape, dtype, seed=4, loc=3.0)
    C = shape[1]
    for xv, g in ((x, dy), (np.flip(x, 0), np.flip(dy, -1))):  # views with negative strides
        y, mean, var, invstd = K.forward_train(xv, w, b)
        y_ref, *_ = R.batch_norm_forward(xv, w, b)
        assert y.shape == shape
        _close(y, y_ref, dtype)
        dx, dw, db = K.backward(g, xv, mean, invstd, w)
        dx_ref, dw_ref, db_ref = R.batch_norm_backward(g, xv, w)
        assert dx is not None and dx.shape == shape
        _close(dx, dx_ref, dtype)
        _close(dw, dw_ref, dtype, mag=float(np.sum(np.abs(g))) / C)
        sc, sh = (a.astype(dtype) for a in R.inference_affine(mean, var, w, b))
        ye = K.forward_eval(xv, sc, sh)
        assert ye.shape == shape
        per_channel = (1, C) + (1,) * (len(shape) - 2)
        _close(ye, xv * sc.reshape(per_channel) + sh.reshape(per_channel), dtype)
        dxe, s1, s0 = K.backward_eval(g, xv, mean, var, w)
        assert dxe is not None and dxe.shape == shape
        sums = g.astype(np.float64).sum(axis=(0, *range(2, len(shape))))
        _close(s0, sums, dtype, mag=float(np.abs(g).sum()) / C)
    out = np.full_like(x, np.nan)
    got, *_ = K.forward_train(x, w, b, out=out)
    assert got is out and np.all(np.isfinite(out))
    got = K.forward_eval(x, w, b, out=out)
    assert got is out
    with pytest.raises(
        ValueError, match=rf"out must be a C-contiguous .* shape \({shape[0]}, {C}, "
    ):
        K.forward_train(x, out=np.empty((shape[0], C, x[0, 0].size), dtype))
    with pytest.raises(ValueError, match=r"dy \(.*\) must match x"):
        K.backward(dy.reshape(shape[0], C, -1), x, mean, invstd)


def test_backward_reductions_only_and_out():  # type: ignore[no-untyped-def]
    x, dy, w, b = _data((9, 4, 6), np.float32)
    _, mean, _, invstd = K.forward_train(x, w, b)
    dx, dw, db = K.backward(dy, x, mean, invstd, w, need_dx=False)
    _, dw_ref, db_ref = R.batch_norm_backward(dy, x, w)
    assert dx is None
    _close(dw, dw_ref, np.float32)
    _close(db, db_ref, np.float32)
    out = np.full_like(x, np.nan)
    y, *_ = K.forward_train(x, w, b, out=out)
    assert y is out and np.all(np.isfinite(out))


def test_bad_arguments_are_named():  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="float32/float64"):
        K.forward_train(np.zeros((4, 3), np.int64))
    with pytest.raises(
        TypeError, match=r"\(M, C\) or \(N, C, \.\.\.\), got ndarray float32 \(5,\)"
    ):
        K.forward_train(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        K.forward_train(np.zeros((4, 3)), np.ones(4))
    with pytest.raises(ValueError, match="out must be"):
        K.forward_train(np.zeros((4, 3)), out=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="dy"):
        K.backward(np.zeros((4, 3)), np.zeros((5, 3)), np.zeros(3), np.ones(3))


def test_each_entry_point_names_itself_in_its_argument_errors() -> None:
    """The checks the entry points share name the function that was called, not the package."""
    x = np.zeros((4, 3), np.float32)
    v3, v4 = np.ones(3, np.float32), np.ones(4, np.float32)
    calls = {
        "forward_train": lambda: K.forward_train(x, v4),
        "backward": lambda: K.backward(x, x, v3, v4),
        "forward_eval": lambda: K.forward_eval(x, v3, v4),
        "backward_eval": lambda: K.backward_eval(x, x, v3, v4),
        "inference_affine": lambda: K.inference_affine(v3, v4),
        "running_update": lambda: K.running_update(v3.copy(), v3.copy(), v3, v4, 0.1),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^batchnorm\.kernels\.{name}: \w+ must have shape"):
            call()
    with pytest.raises(TypeError, match=r"^batchnorm\.kernels\.running_update: momentum"):
        K.running_update(v3.copy(), v3.copy(), v3, v3, None)  # type: ignore[arg-type]


# ---- the torch adapter -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((6, 5), None),
        ((4, 3, 7), None),
        ((3, 4, 5, 6), None),
        ((3, 4, 5, 6), "cl"),
        ((2, 3, 2, 4, 5), None),
        # above SERIAL_BELOW: threads, and each of the kernels' work splits through the adapter
        ((4096, 24), None),  # (M, C) row blocks
        ((8, 32, 16, 16), "cl"),  # (M, C) from channels_last
        ((2, 8, 4, 1024), None),  # (N, C, L) a channel per task (long rows, C % threads == 0)
        ((64, 16, 7, 7), None),  # (N, C, L) pieces of whole short rows
        ((3, 5, 4096), None),  # (N, C, L) long rows cut between threads (odd C)
    ],
    ids=["2d", "3d", "4d", "4d-cl", "5d", "2d-mc", "4d-cl-mc", "4d-fused", "4d-rows", "3d-cut"],
)
def test_numba_backend_matches_torch_backend(shape, layout, dtype):  # type: ignore[no-untyped-def]
    """Forward, running statistics, gradients and eval: backend='numba' vs backend='torch'
    (small shapes on one thread; large ones on every split the kernels use with threads)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 3
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    C = shape[1]
    outs = {}
    for be in ("torch", "numba"):
        w = torch.linspace(0.5, 1.5, C, dtype=dtype, requires_grad=True)
        b = torch.linspace(-1, 1, C, dtype=dtype, requires_grad=True)
        rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
        xg = x.clone().requires_grad_(True)
        y = F.batch_norm(xg, rm, rv, w, b, training=True, momentum=0.3, backend=be)
        y.backward(dy)
        ye = F.batch_norm(x, rm, rv, w, b, training=False, backend=be)
        outs[be] = (y.detach(), xg.grad, w.grad, b.grad, rm, rv, ye, y.stride())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for a, t in zip(outs["numba"][:7], outs["torch"][:7]):
        torch.testing.assert_close(a, t, **tol)
    assert outs["numba"][7] == outs["torch"][7]  # same memory layout as the input


def test_backend_selection_and_env(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)  # also when the suite runs forced
    x = torch.randn(4, 3)
    assert F.get_backend(x).name == "numba"  # auto: kernels for CPU float32
    assert F.get_backend(x.half()).name == "aten"  # torch's fused operator
    assert F.get_backend(x, "torch").name == "torch"
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    assert F.get_backend(x).name == "torch"
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    assert F.get_backend(x).name == "numba"
    assert F.get_backend(x.half()).name == "numba"  # forced: computed through float32
    # any rank: callers hand the kernels the canonical view
    assert F.get_backend(torch.zeros(2, 3, 4, 5), "numba").name == "numba"
    with pytest.raises(ValueError, match="does not support"):
        F.get_backend(torch.zeros(2, 3, dtype=torch.int64), "numba")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forced_numba_backend_on_half_inputs(dtype):  # type: ignore[no-untyped-def]
    """Half inputs: the float32 computation on the same rounded values is the oracle."""
    x = (torch.randn(16, 4, 9) * 5 + 100).to(dtype).requires_grad_(True)
    dy = torch.randn(16, 4, 9).to(dtype)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    y, mean, var, _ = F.batch_norm_train(x, w, b, backend="numba")
    y.backward(dy)
    assert y.dtype == dtype and x.grad is not None and x.grad.dtype == dtype
    assert mean.dtype == torch.float32
    x32 = x.detach().float().requires_grad_(True)
    y32, mean32, _, _ = F.batch_norm_train(x32, w, b, backend="torch")
    y32.backward(dy.float())
    torch.testing.assert_close(mean, mean32)
    torch.testing.assert_close(y.float(), y32.to(dtype).float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(x.grad.float(), x32.grad.to(dtype).float(), atol=3e-2, rtol=3e-2)
    ye = F.batch_norm_eval(x.detach(), mean, var, w, b, backend="numba")
    assert ye.dtype == dtype


def test_gradcheck_through_numba_backend():  # type: ignore[no-untyped-def]
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):  # type: ignore[no-untyped-def]
        return F.batch_norm_train(x, w, b, backend="numba")[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_runs_after_parent_used_threads():
    """A parallel region in a fork()ed child of a process that used the thread pool would be
    terminated by the OpenMP runtime; the kernels switch such children to one thread."""
    x = np.random.default_rng(0).standard_normal((512, 70)).astype(np.float32)
    y_parent = K.forward_train(x, parallel=True)[0]
    pid = os.fork()
    if pid == 0:  # child: must not touch pytest; report through the exit code only
        try:
            y = K.forward_train(x, parallel=True)[0]
            # one thread sums in other blocks than two: float32 rounding apart (y is O(1))
            os._exit(0 if np.allclose(y, y_parent, rtol=1e-5, atol=1e-5) else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


_FORK_AFTER_START = """
import os, sys
import numpy as np, torch
import batchnorm
from batchnorm import kernels as K
if sys.argv[1] == "count":
    K.num_threads()  # only asks: the threading layer starts, no parallel region runs
else:
    with torch.no_grad():
        batchnorm.BatchNorm2d(16).eval()(torch.randn(2, 16, 4, 4))  # a serial call, node path
x = np.random.default_rng(0).standard_normal((4096, 70)).astype(np.float32)
pid = os.fork()
if pid == 0:
    try:
        y = K.forward_train(x, parallel=True)[0]
        os._exit(0 if np.isfinite(y).all() else 3)
    except BaseException:
        os._exit(4)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("parent", ["count", "serial-layer-call"])
def test_forked_child_runs_after_parent_only_started_the_threads(parent: str) -> None:
    """The OpenMP runtime terminates a forked child that starts a parallel region once its
    parent started the threading layer, whether or not the parent ran a parallel region: asking
    for the thread count (as the compiled node's entries do before a serial call) starts it."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _FORK_AFTER_START, parent],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and r.stdout.strip() == "0", (r.stdout, r.stderr[-2000:])


@settings(max_examples=40, deadline=None)
@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 13)),
        st.tuples(st.integers(2, 40), st.integers(1, 40)),
    ).filter(lambda s: int(np.prod(s)) // s[1] >= 2),
    parallel=st.booleans(),
    stream=st.booleans(),
    seed=st.integers(0, 2**16),
    loc=st.sampled_from([0.0, 3.0, -1e3]),
    scale=st.sampled_from([1e-2, 1.0, 1e3]),
)
# two rows near −1000: the reference's own x − μ_B lost digits there (see test_reference)
@example(shape=(2, 8), parallel=False, stream=False, seed=0, loc=-1e3, scale=1.0)
def test_properties_any_shape(shape, parallel, stream, seed, loc, scale):  # type: ignore[no-untyped-def]
    """Any shape and split: equal to the reference; y has per-channel mean β; Σdx = 0 per
    channel (BN's output does not change when a channel is shifted)."""
    x, dy, w, b = _data(shape, np.float64, seed=seed, loc=loc, std=scale)
    y, mean, var, invstd = K.forward_train(x, w, b, parallel=parallel, stream=stream)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    np.testing.assert_allclose(y.mean(axis=axes), b, atol=1e-9 * max(1.0, abs(loc) / scale))
    dx, dw, db = K.backward(dy, x, mean, invstd, w, parallel=parallel, stream=stream)
    assert dx is not None
    np.testing.assert_allclose(dx.sum(axis=axes), 0.0, atol=1e-8 * float(np.abs(dx).max() + 1))
    _check_all(
        x, dy, w, b, np.float64, parallel, scale=max(1.0, abs(loc) / scale / 1e3), stream=stream
    )


# row lengths and channel counts on both sides of the rules that pick a loop: SHORT_ROWS (32),
# the overrun step (32) and its half, FUSED_ROWS (512), CHUNK (2048), tiles of 2048 float32
# channels, rows of few channels taken several at a time (kernels._widen)
_RULE_L = [1, 2, 4, 15, 31, 32, 33, 48, 49, 196, 511, 512, 513, 2049]
_RULE_C = [1, 2, 3, 8, 64, 100, 2047, 2049]
_RULE_VALUES = 300_000  # at most this many values: a few milliseconds of reference each


@st.composite
def _rule_shapes(draw: st.DrawFn) -> tuple[int, ...]:
    """``(N, C, L)`` or ``(M, C)`` with L and C from the rules' boundaries and the batch drawn
    within :data:`_RULE_VALUES` (the thread rule, SERIAL_BELOW, falls inside it)."""
    C = draw(st.sampled_from(_RULE_C))
    if draw(st.booleans()):
        L = draw(st.sampled_from(_RULE_L))
        return (draw(st.integers(2, max(2, min(64, _RULE_VALUES // (C * L))))), C, L)
    return (draw(st.integers(2, max(2, min(3000, _RULE_VALUES // C)))), C)


@settings(max_examples=40, deadline=None)
@given(
    shape=_rule_shapes(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_the_loop_each_size_rule_picks_matches_the_reference(shape, dtype, seed):  # type: ignore[no-untyped-def]
    """Threads and the work split left to the size rules (the other tests of the array API
    force them or pick their shapes): any shape near a rule's boundary gives the reference's
    forward, backward, inference and inference backward. (Streaming, from 4 MiB, stays off at
    these sizes; the streamed loops are forced on in test_matches_reference and the
    property test above.)"""
    x, dy, w, b = _data(shape, dtype, seed=seed, loc=2.0, std=0.5)
    _check_all(x, dy, w, b, dtype, None, stream=None)


def test_output_arrays_are_reused_only_once_dropped():  # type: ignore[no-untyped-def]
    """Big outputs come back from a cache, but never while a tensor (or a view of it) lives."""
    from batchnorm import backend_numba as B

    B._OUT.clear()
    be = B.NumbaBackend()
    x = torch.randn(64, 8, 1024)  # 2 MiB: above REUSE_ABOVE
    assert x.numel() * 4 >= B.REUSE_ABOVE
    y1, *_ = be.forward_train(x, None, None, 1e-5)
    assert y1.data_ptr() % K.LINE_BYTES == 0  # whole cache lines for the streaming stores
    kept = y1.clone()
    y2, *_ = be.forward_train(x * 2 + 1, None, None, 1e-5)
    assert y2.data_ptr() != y1.data_ptr()
    view = y2[:, :1]
    ptr2 = y2.data_ptr()
    del y2
    y3, *_ = be.forward_train(x - 3, None, None, 1e-5)
    assert y3.data_ptr() not in (ptr2, y1.data_ptr())  # a view still holds y2's memory
    del view
    y4 = be.forward_eval(x, torch.zeros(8), torch.ones(8) - 1e-5, None, None, 1e-5)
    assert y4.data_ptr() == ptr2  # dropped: reused
    torch.testing.assert_close(y4, x)
    torch.testing.assert_close(y1, kept)  # live outputs were never written over
    small, *_ = be.forward_train(torch.randn(4, 8, 16), None, None, 1e-5)
    assert len(B._OUT) == 3  # small outputs are not cached
    B._OUT.clear()


def test_output_cache_keeps_the_shapes_used_last_within_its_budget():  # type: ignore[no-untyped-def]
    from batchnorm import backend_numba as B

    cache = B._Outputs(max_bytes=5 << 20)
    a = np.empty((512, 1024), np.float32)  # 2 MiB
    b = np.empty((1024, 512), np.float32)  # 2 MiB, another shape
    first = cache.empty_like(a)
    ptr = first.ctypes.data
    del first
    assert cache.empty_like(a).ctypes.data == ptr  # dropped: handed out again
    cache.empty_like(b)
    cache.empty_like(a)  # a is used again: b is now the least recent shape
    c = np.empty((256, 2048), np.float32)
    cache.empty_like(c)  # over the budget: b's arrays go first
    assert len(cache) == 2 and cache._bytes <= cache.max_bytes
    assert cache.empty_like(a).ctypes.data == ptr
    held = [cache.empty_like(c) for _ in range(3)]  # one shape over budget: its oldest go
    assert cache._bytes <= cache.max_bytes and all(h.shape == c.shape for h in held)


def test_output_cache_hands_out_the_free_array_used_last():  # type: ignore[no-untyped-def]
    """Of several free arrays of a shape, the one handed out most recently (likeliest still in
    the processor's caches) — and that one then counts as the most recent."""
    from batchnorm import backend_numba as B

    cache = B._Outputs(max_bytes=64 << 20)
    a = np.empty((512, 1024), np.float32)  # 2 MiB
    first, second, third = (cache.empty_like(a) for _ in range(3))
    ptrs = [t.ctypes.data for t in (first, second, third)]
    assert len(set(ptrs)) == 3
    del first, third
    got = cache.empty_like(a)
    assert got.ctypes.data == ptrs[2]  # the third, the last handed out
    again = cache.empty_like(a)  # the other free one (the first)
    assert again.ctypes.data == ptrs[0]
    del got, again, second
    assert cache.empty_like(a).ctypes.data == ptrs[0]  # handed out last of the three
    assert len(cache) == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_inference_affine_matches_reference(dtype: type, affine: bool) -> None:
    rng = np.random.default_rng(3)
    mean = rng.normal(2.0, 3.0, 37).astype(dtype)
    var = rng.uniform(0.0, 4.0, 37).astype(dtype)
    w = rng.uniform(0.5, 1.5, 37).astype(dtype) if affine else None
    b = rng.standard_normal(37).astype(dtype) if affine else None
    sc, sh = K.inference_affine(mean, var, w, b, eps=1e-3)
    sc_ref, sh_ref = R.inference_affine(mean, var, w, b, eps=1e-3)
    assert sc.dtype == sh.dtype == np.dtype(dtype)
    _close(sc, sc_ref, dtype)
    _close(sh, sh_ref, dtype)
    with pytest.raises(ValueError, match=r"var must have shape \(37,\)"):
        K.inference_affine(mean, var[:5])


@pytest.mark.parametrize("buf_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("unbiased", [True, False])
def test_running_update_matches_reference(buf_dtype: type, unbiased: bool) -> None:
    g = np.random.default_rng(3)
    C, m, momentum = 7, 12, 0.3
    rm0 = g.normal(size=C).astype(buf_dtype)
    rv0 = g.uniform(0.5, 2.0, size=C).astype(buf_dtype)
    mean = g.normal(size=C).astype(np.float32)
    var = g.uniform(0.1, 3.0, size=C).astype(np.float32)
    want_m, want_v = R.running_stats_update(
        rm0.astype(np.float64), rv0.astype(np.float64), mean, var, m, momentum, unbiased=unbiased
    )
    rm, rv, nbt = rm0.copy(), rv0.copy(), np.zeros((), np.int64)
    alpha = momentum * m / (m - 1) if unbiased else momentum
    assert K.running_update(rm, rv, mean, var, momentum, alpha, nbt)
    tol = TOL[buf_dtype]
    np.testing.assert_allclose(rm, want_m, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, want_v, rtol=tol, atol=tol)
    assert int(nbt) == 1
    # a non-finite batch changes nothing, the counter included
    for bad in (np.nan, np.inf):
        v_bad = var.copy()
        v_bad[C - 1] = bad
        before = rm.copy(), rv.copy()
        assert not K.running_update(rm, rv, mean, v_bad, momentum, alpha, nbt)
        assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1]) and int(nbt) == 1


def test_running_update_refuses_what_it_cannot_update_in_place() -> None:
    v = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="running_mean must be a contiguous float32/float64"):
        K.running_update(np.zeros(3, np.int64), v.copy(), v, v, 0.1)
    with pytest.raises(TypeError, match="running_var"):
        K.running_update(v.copy(), np.ones(6, np.float32)[::2], v, v, 0.1)
    with pytest.raises(ValueError, match=r"must both have shape \(C,\)"):
        K.running_update(v.copy(), np.ones(4, np.float32), v, v, 0.1)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        K.running_update(v.copy(), v.copy(), np.ones(2), v, 0.1)
    with pytest.raises(ValueError, match="one int64 value"):
        K.running_update(v.copy(), v.copy(), v, v, 0.1, num_batches_tracked=np.zeros(2, np.int64))


def test_arguments_that_are_not_numbers_are_named() -> None:
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"weight must be a \(3,\) array of numbers, got str"):
        K.forward_train(x, "abc")
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match=r"momentum must be a number, got None.*1/\(n \+ 1\)"):
        K.running_update(rm, rv, np.ones(3), np.ones(3), None)  # type: ignore[arg-type]
    assert np.all(rm == 0)


def test_running_update_refuses_buffers_that_share_memory() -> None:
    """The two buffers as one array (or overlapping), or a buffer given as the other one's
    batch statistic: a value would be read after it was written. Refused, nothing changed; a
    batch statistic that is the same buffer's own memory stays legal (it blends to itself)."""
    m, v = np.full(3, 2.0), np.full(3, 3.0)
    cases = [
        (lambda rm, rv: (rm, rm, m, v), "running_mean and running_var"),
        (lambda rm, rv: (rm, rv, m, rm), "running_mean and var"),
        (lambda rm, rv: (rm, rv, rv, v), "running_var and mean"),
    ]
    for dtype in (np.float64, np.float32):  # float32 statistics are read through copies
        for make, names in cases:
            rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
            with pytest.raises(ValueError, match=f"{names} share memory"):
                K.running_update(*make(rm, rv), 0.1)
            assert np.all(rm == 0) and np.all(rv == 1)
    buf = np.zeros(4)
    rm, rv = buf[:3], buf[1:]  # overlapping in part
    with pytest.raises(ValueError, match="running_mean and running_var share memory"):
        K.running_update(rm, rv, m, v, 0.1)
    rm, rv = np.zeros(3), np.ones(3)
    assert K.running_update(rm, rv, rm, rv, 0.1)  # each buffer its own statistic
    np.testing.assert_allclose(rm, 0.0)
    np.testing.assert_allclose(rv, 1.0)


def test_num_threads_follows_numba_setting() -> None:
    import numba

    before = numba.get_num_threads()
    try:
        for n in (1, before):
            numba.set_num_threads(n)
            assert K.num_threads() == n == numba.get_num_threads()
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("switch", ["BATCHNORM_BACKEND", "BATCHNORM_NATIVE"])
def test_core_suite_passes_on_the_other_backend(switch: str) -> None:
    """The core tests run here on the backend this process selects (the kernels, by default,
    small inputs through the compiled node); run them once more in a fresh process with the
    other backend forced, and once with the node turned off (the autograd Function path)."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    if switch == "BATCHNORM_BACKEND":
        current = os.environ.get("BATCHNORM_BACKEND", "auto")
        other = "numba" if current == "torch" else "torch"
    else:
        other = "1" if os.environ.get("BATCHNORM_NATIVE") == "0" else "0"
    env = {**os.environ, switch: other}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [str(here / "test_functional.py"), str(here / "test_modules.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{switch}={other}:\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


@pytest.mark.parametrize("fast", [True, False], ids=["environ-dict", "environ-get"])
def test_environment_switches_are_read_at_every_call(monkeypatch, fast):  # type: ignore[no-untyped-def]
    """batchnorm._env.get reads os.environ as it is now, through its dictionary or (where
    that is not there) os.environ.get — set, changed, unset, and non-ASCII values."""
    from batchnorm import _env

    monkeypatch.setattr(_env, "_FAST", fast and _env._FAST)
    monkeypatch.delenv("BATCHNORM_PROBE", raising=False)
    assert _env.get("BATCHNORM_PROBE") is None
    monkeypatch.setenv("BATCHNORM_PROBE", "0")
    assert _env.get("BATCHNORM_PROBE") == "0"
    monkeypatch.setenv("BATCHNORM_PROBE", "numba é")
    assert _env.get("BATCHNORM_PROBE") == "numba é"
    monkeypatch.delenv("BATCHNORM_PROBE")
    assert _env.get("BATCHNORM_PROBE") is None


def test_inference_under_torch_func_transforms_uses_torch_operations(monkeypatch):  # type: ignore[no-untyped-def]
    """vmap and grad wrap tensors without memory of their own: the default backend hands them
    to plain torch operations (the kernels and the compiled node would raise), so inference
    works under the transforms and matches torch.nn."""
    import batchnorm

    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    ours, theirs = batchnorm.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2.0)
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 5, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))

    def loss(m):  # type: ignore[no-untyped-def]
        return lambda t: m(t).pow(2).sum()

    torch.testing.assert_close(
        torch.func.grad(loss(ours))(x[0]), torch.func.grad(loss(theirs))(x[0])
    )


def test_read_only_outputs_and_buffers_are_refused_before_compiling(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_compile(name: str, parallel: bool) -> None:
        raise AssertionError(f"kernel {name} requested for an argument error")

    monkeypatch.setattr(K, "_kernel", no_compile)
    x = np.random.default_rng(0).random((8, 3))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        K.forward_train(x, out=ro)
    with pytest.raises(ValueError, match="out is read-only"):
        K.backward(x, x, np.zeros(3), np.ones(3), out=ro)
    with pytest.raises(ValueError, match="out is read-only"):
        K.forward_eval(x, np.ones(3), np.zeros(3), out=ro)
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        K.forward_train(x, out=[0.0] * 24)  # type: ignore[arg-type]
    v = np.ones(3)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bufs = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
        bufs["num_batches_tracked"] = np.zeros((), np.int64)
        bufs[name].flags.writeable = False
        with pytest.raises(ValueError, match=f"{name} is read-only"):
            K.running_update(
                bufs["running_mean"],
                bufs["running_var"],
                v,
                v,
                0.1,
                num_batches_tracked=bufs["num_batches_tracked"],
            )


def test_empty_inputs_say_what_is_missing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(K, "_kernel", None)  # nothing may be compiled
    with pytest.raises(ValueError, match=r"\(0, 3\) has no values per channel"):
        K.forward_train(np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"\(0, 3\) has no values per channel"):
        K.backward(np.ones((0, 3)), np.ones((0, 3)), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"\(2, 3, 0\) has no values per channel"):
        K.backward(np.ones((2, 3, 0)), np.ones((2, 3, 0)), np.zeros(3), np.ones(3))
    for shape in [(4, 0), (2, 0, 5)]:
        with pytest.raises(ValueError, match=r"has no channels \(C = 0"):
            K.forward_train(np.ones(shape))
        with pytest.raises(ValueError, match=r"has no channels \(C = 0"):
            K.backward(np.ones(shape), np.ones(shape), np.zeros(0), np.ones(0))
    # inference needs no statistics: an empty input of any shape gives its empty output (short
    # rows of no channels divided by C = 0 in the loops)
    for shape in [(4, 0), (2, 0, 5), (2, 0, 3, 3), (0, 0, 5), (0, 3), (0, 3, 5)]:
        c = shape[1]
        y = K.forward_eval(
            np.ones(shape, np.float32), np.ones(c, np.float32), np.zeros(c, np.float32)
        )
        assert y.shape == shape and y.dtype == np.float32


def test_running_update_counter_must_be_an_array() -> None:
    v = np.ones(3)
    with pytest.raises(TypeError, match="num_batches_tracked must be a one-element int64 NumPy"):
        K.running_update(np.zeros(3), np.ones(3), v, v, 0.1, None, 3)  # type: ignore[arg-type]


def test_empty_aligned_refuses_negative_dimensions() -> None:
    for shape in [(-1, 4), (4, -1), (-8,)]:
        with pytest.raises(ValueError, match="negative dimensions are not allowed"):
            K.empty_aligned(shape, np.float32)
    a = K.empty_aligned((0, 4), np.float64)
    assert a.shape == (0, 4) and a.dtype == np.float64


def test_inference_affine_refuses_0d_statistics() -> None:
    one = np.ones(1)
    with pytest.raises(
        TypeError, match=r"mean must be a 1-D float32/float64 array, got float64 \(\)"
    ):
        K.inference_affine(np.float64(0.0), one)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mean must be a 1-D"):
        K.inference_affine(np.array(0.0), one)
    for k in range(3):
        args: list[object] = [np.zeros(1), one, one, one]
        args[k + 1] = np.array(1.0)
        with pytest.raises(ValueError, match=r"must have shape \(1,\), got \(\)"):
            K.inference_affine(*args)  # type: ignore[arg-type]


def test_a_first_call_slow_to_load_its_loop_is_announced_once() -> None:
    """Each loop takes seconds to compile on a machine's first call: past NOTICE_AFTER a line
    on stderr names it (NOTICE_AFTER = 0 here, so that loading from the disk cache, which
    takes a moment too, is announced); later calls and already loaded loops say nothing."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from batchnorm import kernels as K\n"
        "K.NOTICE_AFTER = 0.0\n"
        "x = np.random.default_rng(0).normal(size=(4, 3, K.SHORT_ROWS))\n"
        "for _ in range(3):\n"
        "    y, mean, var, invstd = K.forward_train(x, parallel=False)\n"
        "    K.backward(np.ones_like(x), x, mean, invstd, parallel=False)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    notices = [line for line in r.stderr.splitlines() if line.startswith("batchnorm: compiling")]
    assert notices == [
        "batchnorm: compiling the single-threaded loop ncl_forward_train (once per machine, "
        "several seconds; cached on disk next to the package)",
        "batchnorm: compiling the single-threaded loop ncl_backward (once per machine, "
        "several seconds; cached on disk next to the package)",
    ], r.stderr[-2000:]


def test_the_compile_notice_names_numba_s_cache_directory_when_one_is_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    monkeypatch.setattr(K, "NOTICE_AFTER", 0.0)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/srv/numba-cache")
    K._compiling("loop x", "seconds")
    time.sleep(0.5)
    err = capsys.readouterr().err
    assert "(once per machine, seconds; cached on disk in /srv/numba-cache)" in err, err


def test_a_notice_during_a_progress_bar_gets_a_line_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compile notice that fires while a training run draws its progress bar (the lab's
    first run on a fresh machine): on a terminal the bar's line is cleared before the notice,
    instead of the notice running on from the bar's half-line; off a terminal (logs, pipes)
    the line is plain."""
    import io
    import sys

    from batchnorm import kernels as K

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    before = K.NOTICE_AFTER
    K.NOTICE_AFTER = 0.0
    try:
        for stream, start in ((Terminal(), "\r\x1b[K"), (io.StringIO(), "")):
            stream.write("steps:  30%|###       | 3/10")  # a bar's line, no newline yet
            monkeypatch.setattr(sys, "stderr", stream)
            notice = K._compiling("multi-threaded loop demo", "several seconds")
            notice.join(5)
            text = stream.getvalue()
            line = "batchnorm: compiling the multi-threaded loop demo (once per machine"
            assert text.startswith("steps:  30%|###       | 3/10" + start + line), repr(text)
            assert text.endswith("next to the package)\n")
    finally:
        K.NOTICE_AFTER = before


@pytest.mark.parametrize("shape", [(3, 2, 9), (3, 2, 700), (40, 3)], ids=["NCL", "long", "MC"])
def test_inference_backward_with_non_finite_values(shape):  # type: ignore[no-untyped-def]
    """An inf in x reaches Σdy·(x − μ) of its channel only; dx = dy·scale stays finite
    everywhere (it does not depend on x), and float32 sums near float32's range are taken again
    in float64 instead of overflowing."""
    x, dy, w, _ = _data(shape, np.float32, seed=3)
    x[1, 1] = np.inf
    m, v = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    dx, sdyx, sdy = K.backward_eval(dy, x, m, v, w)
    assert dx is not None and np.isfinite(dx).all()
    assert not np.isfinite(sdyx[1]) and np.isfinite(np.delete(sdyx, 1)).all()
    assert np.isfinite(sdy).all()
    big = np.full(shape, 3e38, np.float32)
    _, sdyx_big, _ = K.backward_eval(np.ones_like(big), big, m, v, w)
    count = big.size // shape[1]
    np.testing.assert_allclose(sdyx_big, 3e38 * count, rtol=1e-6)


def test_the_kernels_python_path_refuses_vectors_of_another_length() -> None:
    """The adapter hands the kernels C values of each per-channel tensor: one of another
    length (a weight replaced through ``.data`` between a forward and its backward, which no
    layer check sees) raises instead of being read past its end; running buffers of another
    length are never updated in place by the kernels."""
    from batchnorm import functional as F
    from batchnorm.backend_numba import NumbaBackend

    be = NumbaBackend()
    x, dy = torch.randn(8, 3, 5), torch.randn(8, 3, 5)
    w, short = torch.ones(3), torch.ones(2)
    _, mean, var, invstd = be.forward_train(x, w, None, 1e-5)
    for call in (
        lambda: be.forward_train(x, short, None, 1e-5),
        lambda: be.forward_train(x, w, short, 1e-5),
        lambda: be.backward(dy, x, mean, invstd, short, (True, True, True)),
        lambda: be.backward(dy, x, mean, short, w, (True, False, False)),
        lambda: be.forward_eval(x, mean, var, short, None, 1e-5),
        lambda: be.backward_eval(dy, x, mean, short, w, 1e-5, True),
    ):
        with pytest.raises(F.BatchNormInputError, match=r"shape \(2,\) was given for 3 channels"):
            call()
    rm, rv = torch.zeros(2), torch.ones(2)
    running = F.RunningStats(rm, rv, 0.1, 0.1, None)
    with pytest.raises(ValueError, match="could not be broadcast"):  # NumPy's, not the kernels'
        be.forward_train_update(x, w, None, 1e-5, running)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("length", [1, 6])
def test_a_weight_replaced_inside_a_step_is_named_on_the_default_path(
    training: bool, length: int
) -> None:
    """The compiled node hands a weight it cannot take to Python's torch-operation backward,
    which would broadcast a (1,) weight silently (and fail on others with torch's words)."""
    from batchnorm import BatchNorm2d
    from batchnorm import functional as F

    bn = BatchNorm2d(4).train(training)
    y = bn(torch.randn(4, 4, 3, 3, requires_grad=True))
    bn.weight.data = torch.ones(length)
    with pytest.raises(F.BatchNormInputError, match=rf"shape \({length},\) was given for 4"):
        y.sum().backward()


def test_required_vectors_given_as_none_are_refused_not_read_past_their_end() -> None:
    """Only γ and β may be None (an empty array the loops read as absent); a required vector
    given as None was that empty array too, read C values past its end: garbage outputs and
    running buffers."""
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    y, mean, var, invstd = K.forward_train(x)
    rm, rv = np.zeros(3), np.ones(3)
    calls = {
        "scale": lambda: K.forward_eval(x, None, np.zeros(3)),
        "shift": lambda: K.forward_eval(x, np.ones(3), None),
        "invstd": lambda: K.backward(dy, x, mean, None),
        "mean": lambda: K.backward(dy, x, None, invstd),
        "var": lambda: K.backward_eval(dy, x, mean, None),
        "var ": lambda: K.inference_affine(mean, None),
        "mean ": lambda: K.running_update(rm, rv, None, var, 0.1),
    }
    for what, call in calls.items():
        with pytest.raises(TypeError, match=f"{what.strip()} is required"):
            call()
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))
    with pytest.raises(ValueError, match=r"must both have shape \(C,\)"):
        K.running_update(np.zeros(()), np.ones(()), np.zeros(()), np.ones(()), 0.1)


def test_an_output_not_aligned_to_its_item_size_is_refused() -> None:
    """The streaming stores fault on a misaligned address (a segmentation fault, whatever the
    size with stream=True)."""
    x = np.random.default_rng(0).normal(size=(4, 2, 64))
    raw = np.empty(x.nbytes + 8, np.uint8)
    out = raw[4 : 4 + x.nbytes].view(np.float64).reshape(x.shape)
    assert out.flags.c_contiguous and not out.flags.aligned
    for stream in (True, None, False):
        with pytest.raises(ValueError, match="must start at a multiple of its item size"):
            K.forward_eval(x, np.ones(2), np.zeros(2), out=out, stream=stream)


@pytest.mark.parametrize("shape", [(8, 4), (4, 3, 40), (2, 3, 600)])
def test_a_read_only_input_without_dx(shape) -> None:  # type: ignore[no-untyped-def]
    """need_dx=False handed x to the loops as the unused dx buffer: a read-only x could not be
    compiled as one (a Numba TypingError)."""
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    dy = np.ones_like(x)
    _, mean, var, invstd = K.forward_train(x)
    want = K.backward(dy, x, mean, invstd)[1:]
    want_eval = K.backward_eval(dy, x, mean, var)[1:]
    x.flags.writeable = False
    got = K.backward(dy, x, mean, invstd, need_dx=False)
    got_eval = K.backward_eval(dy, x, mean, var, need_dx=False)
    assert got[0] is None and got_eval[0] is None
    for a, b in zip((*got[1:], *got_eval[1:]), (*want, *want_eval), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_the_threaded_fused_forward_keeps_float32_accuracy_at_large_offsets() -> None:
    # a channel per task (rows of 512 and more, C a multiple of the threads): Numba's parallel
    # build read the float32-rounded mean back unrounded, so the rounding's correction was lost
    x = (1e8 + np.random.default_rng(6).normal(0, 100, (8, 8, 1000))).astype(np.float32)
    y_ref = R.batch_norm_forward(x)[0]
    for parallel in (False, True):
        y = K.forward_train(x, parallel=parallel)[0]
        assert np.abs(y - y_ref).max() < 1e-5, parallel


@pytest.mark.parametrize("shape", [(64, 4, 4096), (8, 8, 1000), (4096, 4, 16), (262144, 4)])
def test_one_outlier_at_a_channel_s_first_value_costs_no_float32_digits(shape) -> None:  # type: ignore[no-untyped-def]
    # the shifted sums' shift was the channel's first value: 1e4 there among unit normals made
    # the float32 sums cancel (variance off by 1e-3, y by 0.7)
    x = np.random.default_rng(10).normal(0, 1, shape).astype(np.float32)
    first = (0, slice(None), 0) if len(shape) == 3 else (0, slice(None))
    x[first] = 1e4
    y_ref, _, _, var_ref = R.batch_norm_forward(x)
    y, _, var, _ = K.forward_train(x)
    assert np.abs(var / var_ref - 1).max() < 1e-5
    others = np.ones(shape, bool)
    others[first] = False
    assert np.abs(y - y_ref)[others].max() < 1e-5


def test_arguments_the_kernels_cannot_read_are_refused_by_name() -> None:
    """A masked array (its mask would be ignored, or Numba would fail inside its dispatcher
    depending on what was compiled before), a non-native byte order, scalar arguments that are
    not numbers, an out= for a dx not computed, an entry address out of range."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3))
    masked = np.ma.masked_array(x.copy())
    masked[0, 0] = np.ma.masked
    K.forward_train(x)  # compiled: a masked array must be refused anyway
    with pytest.raises(TypeError, match=r"^batchnorm\.kernels\.forward_train: x is a masked"):
        K.forward_train(masked)
    with pytest.raises(TypeError, match=r"non-native byte order >f4; .*astype\(np\.float32\)"):
        K.forward_train(x.astype(">f4"))
    _, mean, var, invstd = K.forward_train(x)
    for call, what in (
        (lambda: K.forward_train(x, eps="a"), "forward_train: eps"),
        (lambda: K.forward_train(x, eps=None), "forward_train: eps"),
        (
            lambda: K.backward_eval(x, x, mean, var, eps=np.array([1e-5, 1e-5])),
            "backward_eval: eps",
        ),
        (lambda: K.inference_affine(mean, var, eps=None), "inference_affine: eps"),
        (
            lambda: K.running_update(np.zeros(3), np.ones(3), mean, var, 0.1, "x"),
            "running_update: alpha",
        ),
    ):
        with pytest.raises(TypeError, match=rf"^batchnorm\.kernels\.{what} must be a number"):
            call()
    for call in (
        lambda: K.backward(x, x, mean, invstd, need_dx=False, out=np.empty_like(x)),
        lambda: K.backward_eval(x, x, mean, var, need_dx=False, out=np.empty_like(x)),
    ):
        with pytest.raises(ValueError, match="need_dx=False does not compute"):
            call()
    from batchnorm.kernels import _entries

    for key in ((2, 0, 0), (0, 2, 0), (0, 0, 4), (-1, 0, 0)):
        with pytest.raises(ValueError, match=r"^batchnorm\.kernels\.address: "):
            _entries.address(*key)


def test_output_cache_does_not_keep_an_array_beyond_its_whole_budget():  # type: ignore[no-untyped-def]
    """An output larger than the budget was cached (the eviction stops at one entry) and held
    after its users were gone, for the life of the process."""
    from batchnorm import backend_numba as B

    cache = B._Outputs(max_bytes=5 << 20)
    small = cache.empty_like(np.empty((512, 1024), np.float32))  # 2 MiB: kept
    big = cache.empty_like(np.empty((2048, 1024), np.float32))  # 8 MiB: over the budget
    assert big.shape == (2048, 1024) and big.ctypes.data % 64 == 0
    assert len(cache) == 1 and cache._bytes == small.nbytes


def test_a_negative_or_nan_eps_is_refused_by_name() -> None:
    # a negative eps made √(var + ε) NaN wherever the variance is below |ε|, silently
    x = np.random.default_rng(0).normal(size=(64, 3))
    mean, var = x.mean(0), x.var(0)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
            K.forward_train(x, eps=eps)
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
            K.inference_affine(mean, var, eps=eps)
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
            K.backward_eval(np.ones_like(x), x, mean, var, eps=eps)


def test_parallel_takes_true_false_or_none_only() -> None:
    # parallel=0 ran threaded: only `is False` turned threads off
    x = np.random.default_rng(1).normal(size=(16, 3))
    with pytest.raises(TypeError, match=r"parallel must be True, False or None .*got 0"):
        K.forward_train(x, parallel=0)  # type: ignore[arg-type]


def test_a_non_contiguous_out_is_named_as_such() -> None:
    x = np.ones((16, 6), np.float32)
    with pytest.raises(ValueError, match=r"not C-contiguous \(strides"):
        K.forward_train(x, out=np.asfortranarray(np.empty((16, 6), np.float32)))


def test_the_backward_of_inference_takes_an_empty_batch_as_its_forward_does() -> None:
    x = np.ones((0, 3))
    assert K.forward_eval(x, np.ones(3), np.zeros(3)).shape == (0, 3)
    dx, s1, s0 = K.backward_eval(x, x, np.zeros(3), np.ones(3))
    assert dx is not None and dx.shape == (0, 3)
    assert np.array_equal(s1, np.zeros(3)) and np.array_equal(s0, np.zeros(3))
