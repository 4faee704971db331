"""C-callable entries to the single-threaded loops (Numba ``cfunc``), for compiled callers.

Each entry takes raw pointers and sizes, views them as arrays (``numba.carray``: no copy) and
runs the same loops, with the same choice of loop, as :func:`batchnorm.kernels._forward_train`,
:func:`batchnorm.kernels._backward` and :func:`batchnorm.kernels._forward_eval_stats` on one
thread. ``L == 0`` means the rows × channels layout ``(N, C)``; otherwise ``(N, C, L)``.
Vectors of length 0 (a null pointer) mean "absent" (no weight, no bias, no running buffers,
no counter), as the empty arrays of the array API do.

Only the kernels' thread count of one is offered here: the entries serve inputs below
:data:`batchnorm.kernels.SERIAL_BELOW` elements, where the cost around a kernel call decides.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import carray, cfunc
from numba import types as nb

from batchnorm import kernels as K
from batchnorm.kernels._loops import kernel

__all__ = ["addresses"]

_mc_split = numba.njit(K._mc_split)
_fused = numba.njit(K._fused)
_whole_rows = numba.njit(K._whole_rows)

_MC_FWD = kernel("mc_forward_train", False)
_NCL_FWD = kernel("ncl_forward_train", False)
_NCL_FWD_FUSED = kernel("ncl_forward_train_fused", False)
_MC_BWD = kernel("mc_backward", False)
_NCL_BWD = kernel("ncl_backward", False)
_NCL_BWD_FUSED = kernel("ncl_backward_fused", False)
_MC_EVAL = kernel("mc_forward_eval", False)
_NCL_EVAL = kernel("ncl_forward_eval", False)
_RUNNING = kernel("running_update", False)


# the backward's mean tolerance (see ``kernels._MEAN_TOL``), by itemsize
_TOL4 = K._MEAN_TOL[np.dtype(np.float32)]
_TOL8 = K._MEAN_TOL[np.dtype(np.float64)]


@numba.njit(cache=True)
def _fwd_mc(x, w, b, eps, y, mean, var, invstd):  # type: ignore[no-untyped-def]
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], 1, x.itemsize)
    _MC_FWD(x, w, b, eps, nrb, ncb, tw, False, y, mean, var, invstd)


@numba.njit(cache=True)
def _fwd_ncl(x, w, b, eps, y, mean, var, invstd):  # type: ignore[no-untyped-def]
    N, C, L = x.shape
    if _fused(N, C, L, 1):
        _NCL_FWD_FUSED(x, w, b, eps, False, y, mean, var, invstd)
    else:
        _NCL_FWD(x, w, b, eps, 1, _whole_rows(L), False, y, mean, var, invstd)


def _fwd(xp, N, C, L, wp, nw, bp, nb_, eps, yp, mp, vp, ip, rmp, rvp, nrun, nbtp, nnbt, mom, alpha):  # type: ignore[no-untyped-def]  # noqa: E501
    w = carray(wp, (nw,))
    b = carray(bp, (nb_,))
    mean = carray(mp, (C,))
    var = carray(vp, (C,))
    invstd = carray(ip, (C,))
    if L == 0:
        _fwd_mc(carray(xp, (N, C)), w, b, eps, carray(yp, (N, C)), mean, var, invstd)
    else:
        _fwd_ncl(carray(xp, (N, C, L)), w, b, eps, carray(yp, (N, C, L)), mean, var, invstd)
    if nrun == 0:
        return 0
    rm = carray(rmp, (nrun,))
    rv = carray(rvp, (nrun,))
    ok = _RUNNING(mean, var, rm, rv, mom, alpha, carray(nbtp, (nnbt,)))
    return 1 if ok else 0


@numba.njit(cache=True)
def _bwd_mc(dy, x, mean, invstd, w, need, dx, dw, db):  # type: ignore[no-untyped-def]
    tol = _TOL4 if x.itemsize == 4 else _TOL8
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], 1, x.itemsize)
    _MC_BWD(dy, x, mean, invstd, w, tol, nrb, ncb, tw, False, need, dx, dw, db)


@numba.njit(cache=True)
def _bwd_ncl(dy, x, mean, invstd, w, need, dx, dw, db):  # type: ignore[no-untyped-def]
    tol = _TOL4 if x.itemsize == 4 else _TOL8
    N, C, L = x.shape
    if _fused(N, C, L, 1):
        _NCL_BWD_FUSED(dy, x, mean, invstd, w, tol, False, need, dx, dw, db)
    else:
        _NCL_BWD(dy, x, mean, invstd, w, tol, 1, _whole_rows(L), False, need, dx, dw, db)


def _bwd(dyp, xp, N, C, L, mp, ip, wp, nw, need_dx, dxp, dwp, dbp):  # type: ignore[no-untyped-def]
    mean = carray(mp, (C,))
    invstd = carray(ip, (C,))
    w = carray(wp, (nw,))
    dw = carray(dwp, (C,))
    db = carray(dbp, (C,))
    need = need_dx != 0
    if L == 0:
        s2 = (N, C)
        _bwd_mc(carray(dyp, s2), carray(xp, s2), mean, invstd, w, need, carray(dxp, s2), dw, db)
    else:
        s3 = (N, C, L)
        _bwd_ncl(carray(dyp, s3), carray(xp, s3), mean, invstd, w, need, carray(dxp, s3), dw, db)


@numba.njit(cache=True)
def _eval_mc(x, rm, rv, w, b, eps, y):  # type: ignore[no-untyped-def]
    nrb, ncb, tw = _mc_split(x.shape[0], x.shape[1], 1, x.itemsize)
    _MC_EVAL(x, rm, rv, w, b, eps, True, nrb, ncb, tw, False, y)


@numba.njit(cache=True)
def _eval_ncl(x, rm, rv, w, b, eps, y):  # type: ignore[no-untyped-def]
    _NCL_EVAL(x, rm, rv, w, b, eps, True, 1, _whole_rows(x.shape[2]), False, y)


def _eval(xp, N, C, L, rmp, rvp, wp, nw, bp, nb_, eps, yp):  # type: ignore[no-untyped-def]
    rm = carray(rmp, (C,))
    rv = carray(rvp, (C,))
    w = carray(wp, (nw,))
    b = carray(bp, (nb_,))
    if L == 0:
        _eval_mc(carray(xp, (N, C)), rm, rv, w, b, eps, carray(yp, (N, C)))
    else:
        _eval_ncl(carray(xp, (N, C, L)), rm, rv, w, b, eps, carray(yp, (N, C, L)))


def _build(dtype: Any) -> tuple[Any, Any, Any]:
    """The three entries for one float dtype (compiled on first use; cached on disk)."""
    p = nb.CPointer(dtype)
    i64, f64 = nb.int64, nb.float64
    fwd = nb.int32(
        p, i64, i64, i64, p, i64, p, i64, f64, p, p, p, p, p, p, i64, nb.CPointer(i64), i64,
        f64, f64,
    )  # fmt: skip
    bwd = nb.void(p, p, i64, i64, i64, p, p, p, i64, nb.int32, p, p, p)
    ev = nb.void(p, i64, i64, i64, p, p, p, i64, p, i64, f64, p)
    return (
        cfunc(fwd, cache=True)(_fwd),
        cfunc(bwd, cache=True)(_bwd),
        cfunc(ev, cache=True)(_eval),
    )


_BUILT: list[int] = []


def addresses() -> list[int]:
    """The entries' addresses: forward, backward, inference for float32, then for float64."""
    if not _BUILT:
        for dtype in (nb.float32, nb.float64):
            _BUILT.extend(f.address for f in _build(dtype))
    return _BUILT
