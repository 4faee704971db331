"""The Numba loops behind :mod:`batchnorm.kernels` (NumPy arrays only; no torch, nothing of ours).

Two canonical layouts, both C-contiguous:

* ``(N, C, L)`` — channels first. Work unit: a channel, or a block of one channel's N·L values
  when there are too few channels to keep every thread busy. Loop order: n, then the contiguous
  l run, so every read streams.
* ``(M, C)`` — rows × channels. Work unit: a block of rows (or of channels when M is tiny); the
  inner loop runs along the contiguous channels and updates per-channel partial sums.

Numerics (the same in every kernel):

* statistics are shifted sums accumulated in float64: Σ(x − k) and Σ(x − k)² with the shift k a
  value of the channel (its first one), so cancellation is bounded by m·ε₆₄ and the blocks of a
  channel, sharing k, merge by plain addition;
* the element passes subtract the mean rounded to the input's dtype (``mh``; exact by Sterbenz for
  values near it) and fold the rounding ``mean − mh`` into the shift, so float32 outputs keep
  float32 accuracy even when |mean| ≫ std;
* ``fastmath`` is limited to ``reassoc``/``contract``: reductions may vectorize, but NaN and inf
  propagate (a non-finite input must give non-finite statistics, which the running-statistics
  update then refuses).

Memory passes (float32, forward + backward): forward reads x twice and writes y once, backward
reads x and dy twice and writes dx once; with one channel per work unit the second read of a
channel comes from the core's cache when the channel fits, leaving the compulsory 8 + 12 bytes.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import prange

# reductions may be reordered (vectorized, FMA-contracted); no nnan/ninf: NaN must propagate
_FASTMATH = {"reassoc", "contract"}


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _finalize_stats(
    s1: float, s2: float, m: int, k: float, eps: float, g: float, bb: float, mh: float
) -> tuple[float, float, float, float, float]:
    """From shifted sums: ``(mean, var, invstd, scale, shift)``, scale = γ·invstd and the shift
    for ``(x − mh)·scale + shift`` with the rounding of ``mh`` folded in (float64)."""
    mean = k + s1 / m
    var = (s2 - s1 * (s1 / m)) / m
    if var < 0.0:  # rounding only; NaN stays NaN (NaN < 0 is False)
        var = 0.0
    invstd = 1.0 / math.sqrt(var + eps)
    scale = g * invstd
    shift = bb - (mean - mh) * scale
    return mean, var, invstd, scale, shift


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _backward_coefs(
    sdy: float, sdyx: float, sx: float, m: int, mh: float, inv: float, g: float, tol: float
) -> tuple[float, float, float, float, float]:
    """From Σdy, Σdy·(x − mh), Σ(x − mh): ``(dγ, dβ, A, B, D)`` with dx = A·dy + B·(x − mh) + D.

    When the given mean ``mh`` is the batch mean rounded to the dtype (the offset Σ(x − mh)/m is
    within ``tol``·|mh|), the rounding is corrected, so float32 keeps float32 accuracy even when
    |mean| ≫ std; any other given mean is used as it is.
    """
    corr = sx / m
    if abs(corr) > tol * abs(mh):
        corr = 0.0
    sdyx_c = sdyx - corr * sdy  # Σ dy·(x − μ), μ = mh + corr
    dwc = sdyx_c * inv
    k = g * inv / m
    bcoef = -k * dwc * inv
    return dwc, sdy, g * inv, bcoef, -k * sdy - bcoef * corr


@numba.njit(inline="always", cache=True)
def _block_range(j0: int, j1: int, n: int, L: int) -> tuple[int, int]:
    """The l-range ``[lo, hi)`` of row ``n`` inside the flat channel range ``[j0, j1)``."""
    lo = j0 - n * L
    if lo < 0:
        lo = 0
    hi = j1 - n * L
    if hi > L:
        hi = L
    return lo, hi


# ------------------------------------------------------------------------------------------
# (N, C, L)


def ncl_forward_train(x, w, b, eps, nblk, y, mean_out, var_out, invstd_out):  # type: ignore[no-untyped-def]
    """Training forward on ``x (N, C, L)``; ``nblk`` blocks per channel (1: fused per channel)."""
    N, C, L = x.shape
    m = N * L
    has_w = w.shape[0] > 0
    has_b = b.shape[0] > 0
    mh_arr = np.empty(C, dtype=x.dtype)
    sc_arr = np.empty(C, dtype=x.dtype)
    sh_arr = np.empty(C, dtype=x.dtype)
    if nblk == 1:
        # one channel per work unit: statistics, then the element pass while it is cached
        for c in prange(C):
            k = np.float64(x[0, c, 0])
            s1 = 0.0
            s2 = 0.0
            for n in range(N):
                xr = x[n, c]
                for l in range(L):
                    d = np.float64(xr[l]) - k
                    s1 += d
                    s2 += d * d
            g = np.float64(w[c]) if has_w else 1.0
            bb = np.float64(b[c]) if has_b else 0.0
            mh_arr[c] = k + s1 / m  # the mean rounded to the dtype (stores cast)
            mh = mh_arr[c]
            mean, var, invstd, sc, sh = _finalize_stats(s1, s2, m, k, eps, g, bb, np.float64(mh))
            mean_out[c] = mean
            var_out[c] = var
            invstd_out[c] = invstd
            sc_arr[c] = sc
            sh_arr[c] = sh
            scf = sc_arr[c]
            shf = sh_arr[c]
            for n in range(N):
                xr = x[n, c]
                yr = y[n, c]
                for l in range(L):
                    yr[l] = (xr[l] - mh) * scf + shf
        return
    # few channels: blocks of each channel's flat range n·L + l, partial sums merged per channel
    J = N * L
    ntask = C * nblk
    part = np.empty((2, ntask))
    for t in prange(ntask):
        c = t // nblk
        bi = t % nblk
        j0 = bi * J // nblk
        j1 = (bi + 1) * J // nblk
        k = np.float64(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        if j1 > j0:
            for n in range(j0 // L, (j1 - 1) // L + 1):
                lo, hi = _block_range(j0, j1, n, L)
                xr = x[n, c, lo:hi]  # 0-based loops vectorize (no negative-index fix-ups)
                for l in range(hi - lo):
                    d = np.float64(xr[l]) - k
                    s1 += d
                    s2 += d * d
        part[0, t] = s1
        part[1, t] = s2
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for bi in range(nblk):
            s1 += part[0, c * nblk + bi]
            s2 += part[1, c * nblk + bi]
        k = np.float64(x[0, c, 0])
        g = np.float64(w[c]) if has_w else 1.0
        bb = np.float64(b[c]) if has_b else 0.0
        mh_arr[c] = k + s1 / m
        mean, var, invstd, sc, sh = _finalize_stats(s1, s2, m, k, eps, g, bb, np.float64(mh_arr[c]))
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
        sc_arr[c] = sc
        sh_arr[c] = sh
    for t in prange(ntask):
        c = t // nblk
        bi = t % nblk
        j0 = bi * J // nblk
        j1 = (bi + 1) * J // nblk
        mh = mh_arr[c]
        scf = sc_arr[c]
        shf = sh_arr[c]
        if j1 > j0:
            for n in range(j0 // L, (j1 - 1) // L + 1):
                lo, hi = _block_range(j0, j1, n, L)
                xr = x[n, c, lo:hi]
                yr = y[n, c, lo:hi]
                for l in range(hi - lo):
                    yr[l] = (xr[l] - mh) * scf + shf


def ncl_backward(dy, x, mean, invstd, w, tol, nblk, need_dx, dx, dw_out, db_out):  # type: ignore[no-untyped-def]
    """Backward on ``(N, C, L)``: Σdy and Σdy·x̂ per channel fused with the dx pass.

    dx = γ·invstd/m · (m·dy − Σdy − x̂·Σdy·x̂) = A·dy + B·(x − μ) + D per channel.
    """
    N, C, L = x.shape
    m = N * L
    has_w = w.shape[0] > 0
    a_arr = np.empty(C, dtype=x.dtype)
    b_arr = np.empty(C, dtype=x.dtype)
    d_arr = np.empty(C, dtype=x.dtype)
    if nblk == 1:
        for c in prange(C):
            mh = mean[c]
            sdy = 0.0
            sdyx = 0.0
            sx = 0.0
            for n in range(N):
                xr = x[n, c]
                dr = dy[n, c]
                for l in range(L):
                    g_ = np.float64(dr[l])
                    xd = np.float64(xr[l] - mh)
                    sdy += g_
                    sdyx += g_ * xd
                    sx += xd
            g = np.float64(w[c]) if has_w else 1.0
            dwc, dbc, ac, bc, dc = _backward_coefs(
                sdy, sdyx, sx, m, np.float64(mh), np.float64(invstd[c]), g, tol
            )
            db_out[c] = dbc
            dw_out[c] = dwc
            if need_dx:
                a_arr[c] = ac
                b_arr[c] = bc
                d_arr[c] = dc
                af = a_arr[c]
                bf = b_arr[c]
                df = d_arr[c]
                for n in range(N):
                    xr = x[n, c]
                    dr = dy[n, c]
                    dxr = dx[n, c]
                    for l in range(L):
                        dxr[l] = dr[l] * af + (xr[l] - mh) * bf + df
        return
    J = N * L
    ntask = C * nblk
    part = np.empty((3, ntask))
    for t in prange(ntask):
        c = t // nblk
        bi = t % nblk
        j0 = bi * J // nblk
        j1 = (bi + 1) * J // nblk
        mh = mean[c]
        sdy = 0.0
        sdyx = 0.0
        sx = 0.0
        if j1 > j0:
            for n in range(j0 // L, (j1 - 1) // L + 1):
                lo, hi = _block_range(j0, j1, n, L)
                xr = x[n, c, lo:hi]
                dr = dy[n, c, lo:hi]
                for l in range(hi - lo):
                    g_ = np.float64(dr[l])
                    xd = np.float64(xr[l] - mh)
                    sdy += g_
                    sdyx += g_ * xd
                    sx += xd
        part[0, t] = sdy
        part[1, t] = sdyx
        part[2, t] = sx
    for c in range(C):
        sdy = 0.0
        sdyx = 0.0
        sx = 0.0
        for bi in range(nblk):
            sdy += part[0, c * nblk + bi]
            sdyx += part[1, c * nblk + bi]
            sx += part[2, c * nblk + bi]
        g = np.float64(w[c]) if has_w else 1.0
        dwc, dbc, ac, bc, dc = _backward_coefs(
            sdy, sdyx, sx, m, np.float64(mean[c]), np.float64(invstd[c]), g, tol
        )
        db_out[c] = dbc
        dw_out[c] = dwc
        a_arr[c] = ac
        b_arr[c] = bc
        d_arr[c] = dc
    if not need_dx:
        return
    for t in prange(ntask):
        c = t // nblk
        bi = t % nblk
        j0 = bi * J // nblk
        j1 = (bi + 1) * J // nblk
        mh = mean[c]
        af = a_arr[c]
        bf = b_arr[c]
        df = d_arr[c]
        if j1 > j0:
            for n in range(j0 // L, (j1 - 1) // L + 1):
                lo, hi = _block_range(j0, j1, n, L)
                xr = x[n, c, lo:hi]
                dr = dy[n, c, lo:hi]
                dxr = dx[n, c, lo:hi]
                for l in range(hi - lo):
                    dxr[l] = dr[l] * af + (xr[l] - mh) * bf + df


def ncl_forward_eval(x, scale, shift, y):  # type: ignore[no-untyped-def]
    """Inference on ``(N, C, L)``: one pass, y = x·scale + shift, rows (n, c) split over threads."""
    N, C, L = x.shape
    for r in prange(N * C):
        n = r // C
        c = r % C
        sc = scale[c]
        sh = shift[c]
        xr = x[n, c]
        yr = y[n, c]
        for l in range(L):
            yr[l] = xr[l] * sc + sh


# ------------------------------------------------------------------------------------------
# (M, C)


def mc_forward_train(x, w, b, eps, nrb, ncb, y, mean_out, var_out, invstd_out):  # type: ignore[no-untyped-def]
    """Training forward on ``x (M, C)``: ``nrb × ncb`` blocks of rows × channels.

    Each task streams its rows, updating per-channel partial shifted sums (inner loop along the
    contiguous channels); partials merge per channel; the element pass reuses the same split, so
    with ``ncb == 1`` and one row block per thread each thread re-reads the rows it just summed.
    """
    M, C = x.shape
    has_w = w.shape[0] > 0
    has_b = b.shape[0] > 0
    kk = np.empty(C)
    for c in range(C):
        kk[c] = np.float64(x[0, c])
    part = np.zeros((2, nrb, C))
    ntask = nrb * ncb
    for t in prange(ntask):
        rb = t // ncb
        cb = t % ncb
        r0 = rb * M // nrb
        r1 = (rb + 1) * M // nrb
        c0 = cb * C // ncb
        c1 = (cb + 1) * C // ncb
        # channel slices: 0-based loops vectorize (no negative-index fix-ups)
        p1 = part[0, rb, c0:c1]
        p2 = part[1, rb, c0:c1]
        kv = kk[c0:c1]
        # 4 rows per sweep: the partial sums are loaded and stored once per 4 values
        i = r0
        while i + 4 <= r1:
            x0 = x[i, c0:c1]
            x1 = x[i + 1, c0:c1]
            x2 = x[i + 2, c0:c1]
            x3 = x[i + 3, c0:c1]
            for c in range(c1 - c0):
                k = kv[c]
                d0 = np.float64(x0[c]) - k
                d1 = np.float64(x1[c]) - k
                d2 = np.float64(x2[c]) - k
                d3 = np.float64(x3[c]) - k
                p1[c] += (d0 + d1) + (d2 + d3)
                p2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            i += 4
        while i < r1:
            xr = x[i, c0:c1]
            for c in range(c1 - c0):
                d = np.float64(xr[c]) - kv[c]
                p1[c] += d
                p2[c] += d * d
            i += 1
    mh_arr = np.empty(C, dtype=x.dtype)
    sc_arr = np.empty(C, dtype=x.dtype)
    sh_arr = np.empty(C, dtype=x.dtype)
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for rb in range(nrb):
            s1 += part[0, rb, c]
            s2 += part[1, rb, c]
        g = np.float64(w[c]) if has_w else 1.0
        bb = np.float64(b[c]) if has_b else 0.0
        mh_arr[c] = kk[c] + s1 / M
        mean, var, invstd, sc, sh = _finalize_stats(
            s1, s2, M, kk[c], eps, g, bb, np.float64(mh_arr[c])
        )
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
        sc_arr[c] = sc
        sh_arr[c] = sh
    for t in prange(ntask):
        rb = t // ncb
        cb = t % ncb
        r0 = rb * M // nrb
        r1 = (rb + 1) * M // nrb
        c0 = cb * C // ncb
        c1 = (cb + 1) * C // ncb
        mv = mh_arr[c0:c1]
        sv = sc_arr[c0:c1]
        hv = sh_arr[c0:c1]
        for i in range(r0, r1):
            xr = x[i, c0:c1]
            yr = y[i, c0:c1]
            for c in range(c1 - c0):
                yr[c] = (xr[c] - mv[c]) * sv[c] + hv[c]


def mc_backward(dy, x, mean, invstd, w, tol, nrb, ncb, need_dx, dx, dw_out, db_out):  # type: ignore[no-untyped-def]
    """Backward on ``(M, C)``: partial Σdy, Σdy·(x − μ) per row block, merged, then the dx pass."""
    M, C = x.shape
    has_w = w.shape[0] > 0
    part = np.zeros((3, nrb, C))
    ntask = nrb * ncb
    for t in prange(ntask):
        rb = t // ncb
        cb = t % ncb
        r0 = rb * M // nrb
        r1 = (rb + 1) * M // nrb
        c0 = cb * C // ncb
        c1 = (cb + 1) * C // ncb
        p1 = part[0, rb, c0:c1]
        p2 = part[1, rb, c0:c1]
        p3 = part[2, rb, c0:c1]
        mv = mean[c0:c1]
        i = r0
        while i + 4 <= r1:  # 4 rows per sweep, as in the forward
            x0 = x[i, c0:c1]
            x1 = x[i + 1, c0:c1]
            x2 = x[i + 2, c0:c1]
            x3 = x[i + 3, c0:c1]
            g0r = dy[i, c0:c1]
            g1r = dy[i + 1, c0:c1]
            g2r = dy[i + 2, c0:c1]
            g3r = dy[i + 3, c0:c1]
            for c in range(c1 - c0):
                # the 4-term sums in the input dtype, then float64: no cancellation happens
                # here (x − μ is centred), and converting once per 4 values keeps the loop
                # memory-bound for float32
                mc = mv[c]
                e0 = x0[c] - mc
                e1 = x1[c] - mc
                e2 = x2[c] - mc
                e3 = x3[c] - mc
                g0 = g0r[c]
                g1 = g1r[c]
                g2 = g2r[c]
                g3 = g3r[c]
                p1[c] += np.float64((g0 + g1) + (g2 + g3))
                p2[c] += np.float64((g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3))
                p3[c] += np.float64((e0 + e1) + (e2 + e3))
            i += 4
        while i < r1:
            xr = x[i, c0:c1]
            dr = dy[i, c0:c1]
            for c in range(c1 - c0):
                g_ = np.float64(dr[c])
                xd = np.float64(xr[c] - mv[c])
                p1[c] += g_
                p2[c] += g_ * xd
                p3[c] += xd
            i += 1
    a_arr = np.empty(C, dtype=x.dtype)
    b_arr = np.empty(C, dtype=x.dtype)
    d_arr = np.empty(C, dtype=x.dtype)
    for c in range(C):
        sdy = 0.0
        sdyx = 0.0
        sx = 0.0
        for rb in range(nrb):
            sdy += part[0, rb, c]
            sdyx += part[1, rb, c]
            sx += part[2, rb, c]
        g = np.float64(w[c]) if has_w else 1.0
        dwc, dbc, ac, bc, dc = _backward_coefs(
            sdy, sdyx, sx, M, np.float64(mean[c]), np.float64(invstd[c]), g, tol
        )
        db_out[c] = dbc
        dw_out[c] = dwc
        a_arr[c] = ac
        b_arr[c] = bc
        d_arr[c] = dc
    if not need_dx:
        return
    for t in prange(ntask):
        rb = t // ncb
        cb = t % ncb
        r0 = rb * M // nrb
        r1 = (rb + 1) * M // nrb
        c0 = cb * C // ncb
        c1 = (cb + 1) * C // ncb
        mv = mean[c0:c1]
        av = a_arr[c0:c1]
        bv = b_arr[c0:c1]
        dv = d_arr[c0:c1]
        for i in range(r0, r1):
            xr = x[i, c0:c1]
            dr = dy[i, c0:c1]
            dxr = dx[i, c0:c1]
            for c in range(c1 - c0):
                dxr[c] = dr[c] * av[c] + (xr[c] - mv[c]) * bv[c] + dv[c]


def mc_forward_eval(x, scale, shift, nrb, y):  # type: ignore[no-untyped-def]
    """Inference on ``(M, C)``: one pass over ``nrb`` row blocks, y = x·scale + shift."""
    M, C = x.shape
    for rb in prange(nrb):
        r0 = rb * M // nrb
        r1 = (rb + 1) * M // nrb
        for i in range(r0, r1):
            xr = x[i]
            yr = y[i]
            for c in range(C):
                yr[c] = xr[c] * scale[c] + shift[c]


# ------------------------------------------------------------------------------------------
# compiled variants, built on first use

_KERNELS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        ncl_forward_train,
        ncl_backward,
        ncl_forward_eval,
        mc_forward_train,
        mc_backward,
        mc_forward_eval,
    )
}
_COMPILED: dict[tuple[str, bool], Any] = {}


def _renamed(f: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``f`` under another qualified name: Numba's disk cache is keyed by name, so the
    serial and parallel builds of one loop need distinct names."""
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__module__ = f.__module__
    return g


def kernel(name: str, parallel: bool) -> Any:
    """The Numba dispatcher of loop ``name``: multi-threaded (``parallel``) or single-threaded."""
    key = (name, parallel)
    disp = _COMPILED.get(key)
    if disp is None:
        f = _KERNELS[name]
        if parallel:
            disp = numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, nogil=True)(f)
        else:
            disp = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)(_renamed(f, "_serial"))
        _COMPILED[key] = disp
    return disp
