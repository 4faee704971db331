"""C-callable entries to the loops (Numba ``cfunc``), for compiled callers.

Each entry takes raw pointers and sizes, views them as arrays (``numba.carray``: no copy) and
runs the same loops, with the same choice of loop and work split, as
:func:`batchnorm.kernels._forward_train`, :func:`batchnorm.kernels._backward` and
:func:`batchnorm.kernels._forward_eval_stats`, on ``T`` threads (``T == 1``: the serial
builds; the caller chooses T with :func:`batchnorm.kernels._threads`, as the array API does),
with streaming stores where :func:`batchnorm.kernels._stream` would choose them.
``L == 0`` means the rows × channels layout ``(N, C)``; otherwise ``(N, C, L)``. Vectors of
length 0 (a null pointer) mean "absent" (no weight, no bias, no running buffers, no
counter), as the empty arrays of the array API do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import carray, cfunc
from numba import types as nb

from batchnorm import kernels as K
from batchnorm.kernels._loops import _renamed, kernel

__all__ = ["addresses"]

_mc_split = numba.njit(K._mc_split)
_fused = numba.njit(K._fused)
_whole_rows = numba.njit(K._whole_rows)
_stream_for = numba.njit(K._stream_for)


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
_RUNNING = kernel("running_update", False)


@numba.njit(inline="always")
def _stream(x):  # type: ignore[no-untyped-def]
    """Streaming stores for an output like ``x``: the array API's choice (``kernels._stream``)."""
    return _stream_for(x.size * x.itemsize, x.shape[-1], x.ndim, x.itemsize)


# the backward's mean tolerance (see ``kernels._MEAN_TOL``), by itemsize
_TOL4 = K._MEAN_TOL[np.dtype(np.float32)]
_TOL8 = K._MEAN_TOL[np.dtype(np.float64)]


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _fwd_mc(x, w, b, eps, y, mean, var, invstd, T):  # type: ignore[no-untyped-def]
    stream = _stream(x)
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], T, x.itemsize)
    if T > 1:
        _MC_FWD_P(x, w, b, eps, nrb, ncb, tw, stream, y, mean, var, invstd)
    else:
        _MC_FWD(x, w, b, eps, nrb, ncb, tw, stream, y, mean, var, invstd)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _fwd_ncl(x, w, b, eps, y, mean, var, invstd, T):  # type: ignore[no-untyped-def]
    stream = _stream(x)
    N, C, L = x.shape
    if _fused(N, C, L, T):
        if T > 1:
            _FUSED_FWD_P(x, w, b, eps, stream, y, mean, var, invstd)
        else:
            _FUSED_FWD(x, w, b, eps, stream, y, mean, var, invstd)
    elif T > 1:
        _NCL_FWD_P(x, w, b, eps, T, _whole_rows(L), stream, y, mean, var, invstd)
    else:
        _NCL_FWD(x, w, b, eps, 1, _whole_rows(L), stream, y, mean, var, invstd)


def _fwd(
    xp, N, C, L, wp, nw, bp, nb_, eps, yp, mp, vp, ip, rmp, rvp, nrun, nbtp, nnbt, mom, alpha, T
):  # type: ignore[no-untyped-def]
    w = carray(wp, (nw,))
    b = carray(bp, (nb_,))
    mean = carray(mp, (C,))
    var = carray(vp, (C,))
    invstd = carray(ip, (C,))
    if L == 0:
        _fwd_mc(carray(xp, (N, C)), w, b, eps, carray(yp, (N, C)), mean, var, invstd, T)
    else:
        s3 = (N, C, L)
        _fwd_ncl(carray(xp, s3), w, b, eps, carray(yp, s3), mean, var, invstd, T)
    if nrun == 0:
        return 0
    rm = carray(rmp, (nrun,))
    rv = carray(rvp, (nrun,))
    ok = _RUNNING(mean, var, rm, rv, mom, alpha, carray(nbtp, (nnbt,)))
    return 1 if ok else 0


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _bwd_mc(dy, x, mean, invstd, w, need, dx, dw, db, T):  # type: ignore[no-untyped-def]
    stream = _stream(x)
    tol = _TOL4 if x.itemsize == 4 else _TOL8
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], T, x.itemsize)
    if T > 1:
        _MC_BWD_P(dy, x, mean, invstd, w, tol, nrb, ncb, tw, stream, need, dx, dw, db)
    else:
        _MC_BWD(dy, x, mean, invstd, w, tol, nrb, ncb, tw, stream, need, dx, dw, db)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _bwd_ncl(dy, x, mean, invstd, w, need, dx, dw, db, T):  # type: ignore[no-untyped-def]
    stream = _stream(x)
    tol = _TOL4 if x.itemsize == 4 else _TOL8
    N, C, L = x.shape
    if _fused(N, C, L, T):
        if T > 1:
            _FUSED_BWD_P(dy, x, mean, invstd, w, tol, stream, need, dx, dw, db)
        else:
            _FUSED_BWD(dy, x, mean, invstd, w, tol, stream, need, dx, dw, db)
    elif T > 1:
        _NCL_BWD_P(dy, x, mean, invstd, w, tol, T, _whole_rows(L), stream, need, dx, dw, db)
    else:
        _NCL_BWD(dy, x, mean, invstd, w, tol, 1, _whole_rows(L), stream, need, dx, dw, db)


def _bwd(dyp, xp, N, C, L, mp, ip, wp, nw, need_dx, dxp, dwp, dbp, T):  # type: ignore[no-untyped-def]
    mean = carray(mp, (C,))
    invstd = carray(ip, (C,))
    w = carray(wp, (nw,))
    dw = carray(dwp, (C,))
    db = carray(dbp, (C,))
    need = need_dx != 0
    if L == 0:
        s2 = (N, C)
        dy, x, dx = carray(dyp, s2), carray(xp, s2), carray(dxp, s2)
        _bwd_mc(dy, x, mean, invstd, w, need, dx, dw, db, T)
    else:
        s3 = (N, C, L)
        dy3, x3, dx3 = carray(dyp, s3), carray(xp, s3), carray(dxp, s3)
        _bwd_ncl(dy3, x3, mean, invstd, w, need, dx3, dw, db, T)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _eval_mc(x, rm, rv, w, b, eps, y, T):  # type: ignore[no-untyped-def]
    stream = _stream(x)
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], T, x.itemsize)
    if T > 1:
        _MC_EVAL_P(x, rm, rv, w, b, eps, True, nrb, ncb, tw, stream, y)
    else:
        _MC_EVAL(x, rm, rv, w, b, eps, True, nrb, ncb, tw, stream, y)


@numba.njit  # not cached itself: compiled into the cached entries (see _stamp)
def _eval_ncl(x, rm, rv, w, b, eps, y, T):  # type: ignore[no-untyped-def]
    stream = _stream(x)
    whole = _whole_rows(x.shape[2])
    if T > 1:
        _NCL_EVAL_P(x, rm, rv, w, b, eps, True, T, whole, stream, y)
    else:
        _NCL_EVAL(x, rm, rv, w, b, eps, True, 1, whole, stream, y)


def _eval(xp, N, C, L, rmp, rvp, wp, nw, bp, nb_, eps, yp, T):  # type: ignore[no-untyped-def]
    rm = carray(rmp, (C,))
    rv = carray(rvp, (C,))
    w = carray(wp, (nw,))
    b = carray(bp, (nb_,))
    if L == 0:
        _eval_mc(carray(xp, (N, C)), rm, rv, w, b, eps, carray(yp, (N, C)), T)
    else:
        s3 = (N, C, L)
        _eval_ncl(carray(xp, s3), rm, rv, w, b, eps, carray(yp, s3), T)


def _build(dtype: Any) -> tuple[Any, Any, Any]:
    """The three entries for one float dtype (compiled on first use; cached on disk)."""
    p = nb.CPointer(dtype)
    i64, f64 = nb.int64, nb.float64
    fwd = nb.int32(
        p, i64, i64, i64, p, i64, p, i64, f64, p, p, p, p, p, p, i64, nb.CPointer(i64), i64,
        f64, f64, i64,
    )  # fmt: skip
    bwd = nb.void(p, p, i64, i64, i64, p, p, p, i64, nb.int32, p, p, p, i64)
    ev = nb.void(p, i64, i64, i64, p, p, p, i64, p, i64, f64, p, i64)
    tag = "_" + _stamp()
    return (
        cfunc(fwd, cache=True)(_renamed(_fwd, tag)),
        cfunc(bwd, cache=True)(_renamed(_bwd, tag)),
        cfunc(ev, cache=True)(_renamed(_eval, tag)),
    )


def _stamp() -> str:
    """A digest of the sources compiled into the entries. Numba's disk cache checks only the
    file of the function it caches, not the loops that function calls from other files: the
    entries are cached under names carrying this digest, so that a changed loop is compiled
    anew instead of an old build being loaded."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("_loops.py", "__init__.py", "_entries.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


_BUILT: list[int] = []


def addresses() -> list[int]:
    """The entries' addresses: forward, backward, inference for float32, then for float64."""
    if not _BUILT:
        # the entries link the multi-threaded loops: the threading layer must be up before
        # they are compiled or loaded from the cache (its symbols are resolved then)
        K.num_threads()
        for dtype in (nb.float32, nb.float64):
            _BUILT.extend(f.address for f in _build(dtype))
    return _BUILT
