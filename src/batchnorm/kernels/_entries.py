"""C-callable entries to the loops (Numba ``cfunc``), for compiled callers.

Each entry takes raw pointers and sizes, views them as arrays (``numba.carray``: no copy) and
runs the same loops, with the same choice of loop and work split, as
:func:`batchnorm.kernels._forward_train`, :func:`batchnorm.kernels._backward`,
:func:`batchnorm.kernels._forward_eval_stats` and :func:`batchnorm.kernels._backward_eval`
(short channels-first rows on the rows × channels loops, as :func:`batchnorm.kernels._rows_view`
chooses), on ``T`` threads (``T == 1``: the serial
builds; the caller chooses T with :func:`batchnorm.kernels._threads`, as the array API does),
with streaming stores where :func:`batchnorm.kernels._stream` would choose them.
One entry per pass (training forward, backward, inference, backward of inference), layout
(rows × channels
``(N, C)``, where ``L`` is 0, or ``(N, C, L)``) and dtype, each compiled the first time it is
asked for (:func:`address`): a float32 convolutional network compiles the ``(N, C, L)``
training entries at its first step and the inference entry at its first evaluation, nothing
for float64 or rows × channels (each loop takes several seconds to compile, all sixteen entries
together minutes). Vectors of length 0 (a null pointer) mean "absent" (no weight, no bias, no
running buffers, no counter), as the empty arrays of the array API do.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import carray, cfunc
from numba import types as nb

from batchnorm import kernels as K
from batchnorm.kernels._loops import _address, _renamed, kernel

__all__ = ["TUNABLES", "address", "built"]

_mc_split = numba.njit(K._mc_split)
_fused = numba.njit(K._fused)
_whole_rows = numba.njit(K._whole_rows)
_short = numba.njit(K._short)
_stream_for = numba.njit(K._stream_for)
_widen = numba.njit(K._widen)


def _pair(name: str) -> tuple[Any, Any]:
    return kernel(name, False), kernel(name, True)


_MC_FWD, _MC_FWD_P = _pair("mc_forward_train")
_NCL_FWD, _NCL_FWD_P = _pair("ncl_forward_train")
_FUSED_FWD, _FUSED_FWD_P = _pair("ncl_forward_train_fused")
_MC_BWD, _MC_BWD_P = _pair("mc_backward")
_NCL_BWD, _NCL_BWD_P = _pair("ncl_backward")
_FUSED_BWD, _FUSED_BWD_P = _pair("ncl_backward_fused")
_MC_EVAL, _MC_EVAL_P = _pair("mc_forward_eval")
_NCL_EVAL, _NCL_EVAL_P = _pair("ncl_forward_eval")
_MC_BEVAL, _MC_BEVAL_P = _pair("mc_backward_eval")
_NCL_BEVAL, _NCL_BEVAL_P = _pair("ncl_backward_eval")
_RUNNING = kernel("running_update", False)
_AFFINE = kernel("inference_affine", False)


@numba.njit(inline="always")
def _one(L):  # type: ignore[no-untyped-def]
    """1 as a value, not a constant (``L`` is 0 in the rows × channels entries). The entries
    hand the loops no constants — ``max(T, 1)`` for the serial builds' thread count, ``T >= 0``
    for "statistics given" — because a constant argument makes Numba compile a specialization
    of the loop of its own (the array API's build is not reused: the eight float32 entries
    took 102–111 s to compile after that API's loops, 57–59 s without), and LLVM may compile it
    slower (with the constant True, the ``(N, C, L)`` inference entry ran 14–17 % slower than
    the loop called from Python on rows of 3136, paired medians)."""
    return max(L, 1)


@numba.njit(inline="always")
def _stream(x, y, tensors=0):  # type: ignore[no-untyped-def]
    """Streaming stores for the output ``y`` like ``x``: the array API's choice
    (``kernels._stream``; ``tensors``: the pass's arrays of x's size when the cache may keep
    its output, see ``kernels._stream_for``)."""
    aligned = _address(y) % K.LINE_BYTES == 0
    return _stream_for(x.size * x.itemsize, x.shape[-1], x.ndim, x.itemsize, aligned, tensors)


# the backward's mean tolerance (see ``kernels._MEAN_TOL``), by itemsize
_TOL4 = K._MEAN_TOL[np.dtype(np.float32)]
_TOL8 = K._MEAN_TOL[np.dtype(np.float64)]


@numba.njit(inline="always")
def _wide(x, y, inference=False, tensors=0):  # type: ignore[no-untyped-def]
    """``(R, shape, stream)``: ``R`` rows of the rows × columns view ``x`` taken as one, the
    view's shape so, and whether the output ``y`` is streamed (``kernels._rows_view``: decided
    on the view of WIDE_ROW_BYTES; an output stored normally takes longer rows; ``tensors``:
    as ``_stream``)."""
    M, W = x.shape
    R = _widen(M, W, x.itemsize)
    s2 = (M // R, R * W)
    stream = _stream(x.reshape(s2), y.reshape(s2), tensors)
    if not stream:
        R = _widen(M, W, x.itemsize, False, inference)
        s2 = (M // R, R * W)
    return R, s2, stream


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _fwd_mc(x, G, w, b, eps, y, mean, var, invstd, T):  # type: ignore[no-untyped-def]
    R, s2, stream = _wide(x, y, False, 2)
    x = x.reshape(s2)
    y = y.reshape(s2)
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], T, x.itemsize)
    if T > 1:
        _MC_FWD_P(x, G, R, w, b, eps, nrb, ncb, tw, stream, y, mean, var, invstd)
    else:
        _MC_FWD(x, G, R, w, b, eps, nrb, ncb, tw, stream, y, mean, var, invstd)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _fwd_ncl(x, w, b, eps, y, mean, var, invstd, T):  # type: ignore[no-untyped-def]
    stream = _stream(x, y)
    N, C, L = x.shape
    if _short(N, L):  # the (M, C) loops on (N, C·L), as kernels._rows_view
        s2 = (N, C * L)
        _fwd_mc(x.reshape(s2), L, w, b, eps, y.reshape(s2), mean, var, invstd, T)
    elif _fused(N, C, L, T):
        if T > 1:
            _FUSED_FWD_P(x, w, b, eps, stream, y, mean, var, invstd)
        else:
            _FUSED_FWD(x, w, b, eps, stream, y, mean, var, invstd)
    elif T > 1:
        _NCL_FWD_P(x, w, b, eps, T, _whole_rows(L), stream, y, mean, var, invstd)
    else:
        _NCL_FWD(x, w, b, eps, max(T, 1), _whole_rows(L), stream, y, mean, var, invstd)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _vectors(nw, wp, nb_, bp, C, mp, vp, ip):  # type: ignore[no-untyped-def]
    return (
        carray(wp, (nw,)), carray(bp, (nb_,)),
        carray(mp, (C,)), carray(vp, (C,)), carray(ip, (C,)),
    )  # fmt: skip


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _update(mean, var, rmp, rvp, nrun, nbtp, nnbt, mom, alpha):  # type: ignore[no-untyped-def]
    """The running-statistics update after a training forward: 1 when the buffers were
    updated (0: none asked for, or a non-finite batch refused)."""
    if nrun == 0:
        return 0
    rm = carray(rmp, (nrun,))
    rv = carray(rvp, (nrun,))
    ok = _RUNNING(mean, var, rm, rv, mom, alpha, carray(nbtp, (nnbt,)))
    return 1 if ok else 0


def _fwd_rows(
    xp, N, C, L, wp, nw, bp, nb_, eps, yp, mp, vp, ip, rmp, rvp, nrun, nbtp, nnbt, mom, alpha, T
):  # type: ignore[no-untyped-def]
    w, b, mean, var, invstd = _vectors(nw, wp, nb_, bp, C, mp, vp, ip)
    _fwd_mc(carray(xp, (N, C)), _one(L), w, b, eps, carray(yp, (N, C)), mean, var, invstd, T)
    return _update(mean, var, rmp, rvp, nrun, nbtp, nnbt, mom, alpha)


def _fwd_channels(
    xp, N, C, L, wp, nw, bp, nb_, eps, yp, mp, vp, ip, rmp, rvp, nrun, nbtp, nnbt, mom, alpha, T
):  # type: ignore[no-untyped-def]
    w, b, mean, var, invstd = _vectors(nw, wp, nb_, bp, C, mp, vp, ip)
    s3 = (N, C, L)
    _fwd_ncl(carray(xp, s3), w, b, eps, carray(yp, s3), mean, var, invstd, T)
    return _update(mean, var, rmp, rvp, nrun, nbtp, nnbt, mom, alpha)


@numba.njit(inline="always")
def _wide_over(x, dy, dx, need):  # type: ignore[no-untyped-def]
    """:func:`_wide` for a backward's dx, and whether dx goes over dy (``need`` 2: the node
    offers dy's memory, nothing else holding it): where dx is streamed there. Stored
    normally, a loop whose output is its input's memory loses its vector code (LLVM's overlap
    check falls back to scalars: 2.5× the time on 16384 × 64); streamed, each piece goes
    through the thread's buffer, and dx lands in the lines the layer above has just written
    instead of a buffer that must first come in from memory."""
    if need == 2:
        R, s2, stream = _wide(x, dy, False, 3)
        if stream:
            return R, s2, stream, True
    R, s2, stream = _wide(x, dx, False, 3)
    return R, s2, stream, False


@numba.njit(inline="always")
def _stream_over(x, dy, dx, need):  # type: ignore[no-untyped-def]
    """:func:`_wide_over` for channels-first long rows: ``(stream, over dy)``."""
    if need == 2 and _stream(x, dy):
        return True, True
    return _stream(x, dx), False


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _bwd_mc(dy, x, G, mean, invstd, w, need, dx, dw, db, T):  # type: ignore[no-untyped-def]
    R, s2, stream, over = _wide_over(x, dy, dx, need)
    if over:
        dx = dy
    x = x.reshape(s2)
    dy = dy.reshape(s2)
    dx = dx.reshape(s2)
    tol = _TOL4 if x.itemsize == 4 else _TOL8
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], T, x.itemsize)
    want = need != 0
    if T > 1:
        _MC_BWD_P(dy, x, G, R, mean, invstd, w, tol, nrb, ncb, tw, stream, want, dx, dw, db)
    else:
        _MC_BWD(dy, x, G, R, mean, invstd, w, tol, nrb, ncb, tw, stream, want, dx, dw, db)
    return np.int32(1 if over else 0)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _bwd_ncl(dy, x, mean, invstd, w, need, dx, dw, db, T):  # type: ignore[no-untyped-def]
    tol = _TOL4 if x.itemsize == 4 else _TOL8
    N, C, L = x.shape
    if _short(N, L):  # the (M, C) loops on (N, C·L), as kernels._rows_view
        s2 = (N, C * L)
        return _bwd_mc(
            dy.reshape(s2), x.reshape(s2), L, mean, invstd, w, need, dx.reshape(s2), dw, db, T
        )
    stream, over = _stream_over(x, dy, dx, need)
    if over:
        dx = dy
    want = need != 0
    if _fused(N, C, L, T):
        if T > 1:
            _FUSED_BWD_P(dy, x, mean, invstd, w, tol, stream, want, dx, dw, db)
        else:
            _FUSED_BWD(dy, x, mean, invstd, w, tol, stream, want, dx, dw, db)
    elif T > 1:
        _NCL_BWD_P(dy, x, mean, invstd, w, tol, T, _whole_rows(L), stream, want, dx, dw, db)
    else:
        _NCL_BWD(dy, x, mean, invstd, w, tol, max(T, 1), _whole_rows(L), stream, want, dx, dw, db)
    return np.int32(1 if over else 0)


def _bwd_rows(dyp, xp, N, C, L, mp, ip, wp, nw, need_dx, dxp, dwp, dbp, T):  # type: ignore[no-untyped-def]
    s2 = (N, C)
    return _bwd_mc(
        carray(dyp, s2), carray(xp, s2), _one(L), carray(mp, (C,)), carray(ip, (C,)),
        carray(wp, (nw,)),
        need_dx, carray(dxp, s2), carray(dwp, (C,)), carray(dbp, (C,)), T,
    )  # fmt: skip


def _bwd_channels(dyp, xp, N, C, L, mp, ip, wp, nw, need_dx, dxp, dwp, dbp, T):  # type: ignore[no-untyped-def]
    s3 = (N, C, L)
    return _bwd_ncl(
        carray(dyp, s3), carray(xp, s3), carray(mp, (C,)), carray(ip, (C,)), carray(wp, (nw,)),
        need_dx, carray(dxp, s3), carray(dwp, (C,)), carray(dbp, (C,)), T,
    )  # fmt: skip


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _eval_mc(x, G, rm, rv, w, b, eps, y, T):  # type: ignore[no-untyped-def]
    R, s2, stream = _wide(x, y, True, 2)
    x = x.reshape(s2)
    y = y.reshape(s2)
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], T, x.itemsize)
    stats = T >= 0  # True, as a value (see _one)
    if T > 1:
        _MC_EVAL_P(x, G, R, rm, rv, w, b, eps, stats, nrb, ncb, tw, stream, y)
    else:
        _MC_EVAL(x, G, R, rm, rv, w, b, eps, stats, nrb, ncb, tw, stream, y)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _eval_ncl(x, rm, rv, w, b, eps, y, T):  # type: ignore[no-untyped-def]
    N, C, L = x.shape
    if _short(N, L):  # the (M, C) loops on (N, C·L), as kernels._rows_view
        s2 = (N, C * L)
        _eval_mc(x.reshape(s2), L, rm, rv, w, b, eps, y.reshape(s2), T)
        return
    stream = _stream(x, y)
    whole = _whole_rows(L)
    stats = T >= 0  # True, as a value (see _one)
    if T > 1:
        _NCL_EVAL_P(x, rm, rv, w, b, eps, stats, T, whole, stream, y)
    else:
        _NCL_EVAL(x, rm, rv, w, b, eps, stats, max(T, 1), whole, stream, y)


def _eval_rows(xp, N, C, L, rmp, rvp, wp, nw, bp, nb_, eps, yp, T):  # type: ignore[no-untyped-def]
    _eval_mc(
        carray(xp, (N, C)), _one(L), carray(rmp, (C,)), carray(rvp, (C,)), carray(wp, (nw,)),
        carray(bp, (nb_,)), eps, carray(yp, (N, C)), T,
    )  # fmt: skip


def _eval_channels(xp, N, C, L, rmp, rvp, wp, nw, bp, nb_, eps, yp, T):  # type: ignore[no-untyped-def]
    s3 = (N, C, L)
    _eval_ncl(
        carray(xp, s3), carray(rmp, (C,)), carray(rvp, (C,)), carray(wp, (nw,)),
        carray(bp, (nb_,)), eps, carray(yp, s3), T,
    )  # fmt: skip


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _beval_mc(dy, x, G, mean, var, w, eps, need, dx, sums, T):  # type: ignore[no-untyped-def]
    scale = np.empty(mean.shape[0], x.dtype)
    shift = np.empty(mean.shape[0], x.dtype)
    _AFFINE(mean, var, w, w[:0], eps, scale, shift)
    # (also without dx, as the array API takes it)
    R, s2, stream, over = _wide_over(x, dy, dx, need)
    if over:
        dx = dy
    x = x.reshape(s2)
    dy = dy.reshape(s2)
    dx = dx.reshape(s2)
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], T, x.itemsize)
    want = need != 0
    if T > 1:
        _MC_BEVAL_P(dy, x, G, R, mean, scale, nrb, ncb, tw, stream, want, dx, sums)
    else:
        _MC_BEVAL(dy, x, G, R, mean, scale, nrb, ncb, tw, stream, want, dx, sums)
    return np.int32(1 if over else 0)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _beval_ncl(dy, x, mean, var, w, eps, need, dx, sums, T):  # type: ignore[no-untyped-def]
    N, C, L = x.shape
    if _short(N, L):  # the (M, C) loops on (N, C·L), as kernels._rows_view
        s2 = (N, C * L)
        return _beval_mc(
            dy.reshape(s2), x.reshape(s2), L, mean, var, w, eps, need, dx.reshape(s2), sums, T
        )
    scale = np.empty(C, x.dtype)
    shift = np.empty(C, x.dtype)
    _AFFINE(mean, var, w, w[:0], eps, scale, shift)
    stream, over = _stream_over(x, dy, dx, need)  # (also without dx, as the array API)
    if over:
        dx = dy
    whole = _whole_rows(L)
    want = need != 0
    if T > 1:
        _NCL_BEVAL_P(dy, x, mean, scale, T, whole, stream, want, dx, sums)
    else:
        _NCL_BEVAL(dy, x, mean, scale, max(T, 1), whole, stream, want, dx, sums)
    return np.int32(1 if over else 0)


def _beval_rows(dyp, xp, N, C, L, mp, vp, wp, nw, eps, need_dx, dxp, sp, T):  # type: ignore[no-untyped-def]
    s2 = (N, C)
    return _beval_mc(
        carray(dyp, s2), carray(xp, s2), _one(L), carray(mp, (C,)), carray(vp, (C,)),
        carray(wp, (nw,)), eps, need_dx, carray(dxp, s2), carray(sp, (2, C)), T,
    )  # fmt: skip


def _beval_channels(dyp, xp, N, C, L, mp, vp, wp, nw, eps, need_dx, dxp, sp, T):  # type: ignore[no-untyped-def]
    s3 = (N, C, L)
    return _beval_ncl(
        carray(dyp, s3), carray(xp, s3), carray(mp, (C,)), carray(vp, (C,)), carray(wp, (nw,)),
        eps, need_dx, carray(dxp, s3), carray(sp, (2, C)), T,
    )  # fmt: skip


#: the entries, by layout (0: rows × channels, 1: ``(N, C, L)``) and pass (0: training forward,
#: 1: backward, 2: inference, 3: backward of inference) — the indices ``address`` takes, as
#: ``native.cpp`` passes them
_ENTRIES = (
    (_fwd_rows, _bwd_rows, _eval_rows, _beval_rows),
    (_fwd_channels, _bwd_channels, _eval_channels, _beval_channels),
)
_DTYPES = (nb.float32, nb.float64)
_WHAT = (
    ("float32", "float64"),
    ("rows × channels", "(N, C, L)"),
    ("training", "backward", "inference", "inference backward"),
)


def _signature(dtype: Any, pass_: int) -> Any:
    p = nb.CPointer(dtype)
    i64, f64 = nb.int64, nb.float64
    if pass_ == 0:
        return nb.int32(
            p, i64, i64, i64, p, i64, p, i64, f64, p, p, p, p, p, p, i64, nb.CPointer(i64), i64,
            f64, f64, i64,
        )  # fmt: skip
    # the backwards: need_dx 0 no dx, 1 into dx, 2 into dx or over dy (see _wide_over), which
    # they return (1: dx went over dy)
    if pass_ == 1:
        return nb.int32(p, p, i64, i64, i64, p, p, p, i64, nb.int32, p, p, p, i64)
    if pass_ == 3:  # sums: (2, C) float64, Σdy·(x − mean) then Σdy, added to
        return nb.int32(p, p, i64, i64, i64, p, p, p, i64, f64, nb.int32, p, nb.CPointer(f64), i64)
    return nb.void(p, i64, i64, i64, p, p, p, i64, p, i64, f64, p, i64)


#: the settings of :mod:`batchnorm.kernels` that the compiled helpers above read (``_fused``,
#: ``_short``, ``_whole_rows``, ``_stream_for``, ``_mc_split``, ``_widen``). Numba freezes a
#: global's value into the code it compiles, so a process's entries follow the values in force
#: at its first call of :func:`address` (change them before the first call through the
#: compiled node; the array API reads them at every call), and the entries' digest
#: (:func:`_stamp`) includes them.
TUNABLES = (
    "FUSED_ROWS",
    "LINE_BYTES",
    "SHORT_N_DIVISOR",
    "SHORT_ROWS",
    "STREAM_ABOVE",
    "LLC_BYTES",
    "TILE_BYTES",
    "WIDE_MIN_ROWS",
    "WIDE_ROW_BYTES",
    "PLAIN_WIDE_ROW_BYTES",
    "EVAL_WIDE_ROW_BYTES",
)


def _stamp() -> str:
    """A digest of the sources compiled into the entries and of the :data:`TUNABLES`' values.
    Numba's disk cache checks only the file of the function it caches, not the loops that
    function calls from other files, nor the values of the globals it froze: the entries are
    cached under names carrying this digest, so that a changed loop is compiled anew instead
    of an old build being loaded, and an entry compiled while a setting was changed (say
    ``kernels.SHORT_ROWS = 0`` for a measurement) is not loaded by later processes that
    keep the default."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("_loops.py", "__init__.py", "_entries.py"):
        h.update((here / name).read_bytes())
    h.update(repr([(n, getattr(K, n)) for n in TUNABLES]).encode())
    return h.hexdigest()[:16]


#: this process's digest, taken when its first entry is compiled or loaded
_process_stamp = functools.cache(_stamp)


_BUILT: dict[tuple[int, int, int], Any] = {}
_LOCK = threading.Lock()


def _what(dtype: int, layout: int, pass_: int) -> str:
    return f"{_WHAT[2][pass_]} kernels for {_WHAT[0][dtype]} {_WHAT[1][layout]} inputs"


def address(dtype: int, layout: int, pass_: int) -> int:
    """The address of one entry — ``dtype`` 0 float32, 1 float64; ``layout`` 0 rows ×
    channels, 1 ``(N, C, L)``; ``pass_`` 0 training forward, 1 backward, 2 inference, 3 the
    backward of inference —
    compiled (or loaded from Numba's disk cache) the first time it is asked for: a process
    compiles only what its inputs need. A notice goes to stderr when that takes longer than
    :data:`batchnorm.kernels.NOTICE_AFTER` seconds."""
    for what, value, top in (("dtype", dtype, 1), ("layout", layout, 1), ("pass_", pass_, 3)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            raise ValueError(
                f"batchnorm.kernels.address: {what} must be an int from 0 to {top}, got {value!r}"
            )
    key = (dtype, layout, pass_)
    with _LOCK:
        f: Any = _BUILT.get(key)
        if f is None:
            # the entries link the multi-threaded loops: the threading layer must be up before
            # they are compiled or loaded from the cache (its symbols are resolved then)
            K.num_threads()
            notice = K._compiling(_what(*key), "tens of seconds")
            try:
                body = _renamed(_ENTRIES[layout][pass_], "_" + _process_stamp())
                f = cfunc(_signature(_DTYPES[dtype], pass_), cache=True)(body)
            except Exception as e:
                raise RuntimeError(
                    f"batchnorm: the {_what(*key)} could not be compiled "
                    f"({type(e).__name__}: {str(e)[:300]}); BATCHNORM_NATIVE=0 and "
                    "BATCHNORM_BACKEND=torch avoid the compiled paths"
                ) from e
            finally:
                notice.cancel()
            _BUILT[key] = f
    return int(f.address)


def built() -> list[tuple[int, int, int]]:
    """The ``(dtype, layout, pass)`` of the entries this process has compiled or loaded."""
    return sorted(_BUILT)
