"""The Numba loops behind :mod:`batchnorm.kernels` (NumPy arrays only; no torch, nothing of ours).

Two canonical layouts, both C-contiguous:

* ``(N, C, L)`` — channels first. Long rows (``*_fused``): a channel per task, its statistics
  then its element pass while the channel is still in the core's cache. Short rows, or channels
  that do not spread evenly over the threads: every pass walks memory in order — the tensor
  is cut into one contiguous piece per thread, rows ``(n, c)`` are visited in address order,
  and the statistics pass keeps per-thread partial sums per channel. Short rows (fewer than
  512 values) are cut into pieces of whole rows, so the row loop knows each row's bounds
  (5–33 % faster than cutting inside rows); long rows into equal pieces of the flat range.
  Streaming reads, even work for any C, N or L. Rows shorter than ``SHORT_ROWS`` (see
  :mod:`batchnorm.kernels`) go to the ``(M, C)`` loops instead, on the view ``(N, C·L)`` with
  ``G = L`` columns per channel.
* ``(M, C·G·R)`` — rows × channels, ``G`` columns per channel (1 for 2-D inputs,
  ``channels_last`` and ``axis=-1``; ``L`` for short channels-first rows), the ``C`` channels
  ``R`` times in a row (``R`` consecutive rows of a rows × channels input with few channels,
  seen as one: see :func:`batchnorm.kernels._widen`; else 1): partial sums are kept per column
  and added up per channel, per-channel vectors are spread over the columns. Work
  unit: a block of rows (one per thread) × a tile of at most
  8 KiB of channels (narrower tiles when M is tiny); the inner loop runs along the
  contiguous channels of one row at a time and updates per-channel block sums (one row per
  sweep keeps each thread's reads a single sequential stream, which the hardware prefetcher
  follows; several rows per sweep measured 30 % slower on large inputs). Inputs that fit in
  the cache (below :data:`MC_QUAD_BELOW` bytes) are summed four rows per sweep: a load and a
  store of the block sums per four values instead of per value. Larger inputs whose tile rows
  are short (at most :data:`MC_PREFETCH_RUN` bytes) prefetch :data:`MC_PREFETCH_ROWS` rows
  ahead in every pass.

Numerics (the same in every kernel):

* statistics are shifted sums: Σ(x − k) and Σ(x − k)² with the shift k a value of the channel
  (its first one). On ``(N, C, L)`` each row segment of at most :data:`CHUNK` values is summed
  in the input's dtype (vectorized along the row), the segment sums are accumulated in float64;
  a segment whose sum is not finite (float32 overflow of the squares near float32's range, or a
  NaN/inf input) is summed again in float64, so overflow never reaches the result and
  non-finite inputs still do. On ``(M, C)`` the same holds per channel for blocks of
  :data:`MC_ROWS` rows (vectorized across channels);
* the element passes subtract the mean rounded to the input's dtype (``mh``; exact by Sterbenz for
  values near it) and fold the rounding ``mean − mh`` into the shift, so float32 outputs keep
  float32 accuracy even when |mean| ≫ std;
* ``fastmath`` is limited to ``reassoc``/``contract``: reductions may vectorize, but NaN and inf
  propagate (a non-finite input must give non-finite statistics, which the running-statistics
  update then refuses).

Memory traffic: forward reads x twice and writes y, backward reads x and dy twice and writes dx
(the second reads come from cache in the fused kernels when a channel fits). Outputs larger
than the caches (``stream=True``) are written with non-temporal stores (a 64-byte line at a
time, from a small per-thread buffer): the line goes to memory without being read into the
cache first, which saves a third of a copy's traffic.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic, overload

# reductions may be reordered (vectorized, FMA-contracted); no nnan/ninf: NaN must propagate
_FASTMATH = {"reassoc", "contract"}

#: values per row segment summed in the input's dtype before the float64 accumulation; also the
#: size of the per-thread output buffer of the streaming stores
CHUNK = 2048

_LINE = 64  # bytes of a cache line: the unit of a non-temporal store


# ------------------------------------------------------------------------------------------
# non-temporal stores (LLVM IR: Numba has no vector types)


def _data_ptr(context: Any, builder: Any, arrty: Any, arr: Any) -> Any:
    return cgutils.create_struct_proxy(arrty)(context, builder, value=arr).data


def _nt_line_typer(typingctx, dst, di, src, si):  # type: ignore[no-untyped-def]
    """``dst[di : di + W] = src[si : si + W]`` (W values = 64 bytes) as one non-temporal store;
    ``dst[di]`` must be 64-byte aligned."""
    sig = nbtypes.void(dst, di, src, si)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d, di_, s, si_ = args
        lty = context.get_value_type(signature.args[0].dtype)
        size = context.get_abi_sizeof(lty)
        vty = ir.VectorType(lty, _LINE // size)
        sp = builder.gep(_data_ptr(context, builder, signature.args[2], s), [si_])
        dp = builder.gep(_data_ptr(context, builder, signature.args[0], d), [di_])
        v = builder.load(builder.bitcast(sp, vty.as_pointer()), align=size)
        st = builder.store(v, builder.bitcast(dp, vty.as_pointer()), align=_LINE)
        one = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        st.set_metadata("nontemporal", one)

    return sig, codegen


_nt_line: Any = intrinsic(_nt_line_typer)


def _misalign_typer(typingctx, arr, i):  # type: ignore[no-untyped-def]
    """The address of ``arr[i]`` modulo 64 bytes."""
    sig = nbtypes.intp(arr, i)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        p = builder.gep(_data_ptr(context, builder, signature.args[0], args[0]), [args[1]])
        addr = builder.ptrtoint(p, ir.IntType(64))
        return builder.and_(addr, ir.Constant(ir.IntType(64), _LINE - 1))

    return sig, codegen


_misalign: Any = intrinsic(_misalign_typer)


def _address_typer(typingctx, arr):  # type: ignore[no-untyped-def]
    """The address of ``arr``'s first value."""
    sig = nbtypes.intp(arr)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        p = _data_ptr(context, builder, signature.args[0], args[0])
        return builder.ptrtoint(p, ir.IntType(64))

    return sig, codegen


_address: Any = intrinsic(_address_typer)


@numba.njit(inline="always", cache=True)
def _overlap(a, b):  # type: ignore[no-untyped-def]
    """Whether the memory of the contiguous arrays ``a`` and ``b`` overlaps (an output given as
    its own input)."""
    pa = _address(a)
    pb = _address(b)
    return pa < pb + b.size * b.itemsize and pb < pa + a.size * a.itemsize


def _fence_typer(typingctx):  # type: ignore[no-untyped-def]
    """Order this thread's non-temporal stores before anything it does next."""
    sig = nbtypes.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")  # x86: mfence, which also orders non-temporal stores

    return sig, codegen


_fence: Any = intrinsic(_fence_typer)


def _prefetch_typer(typingctx, arr, i):  # type: ignore[no-untyped-def]
    """Ask for the line holding ``arr.flat[i]`` (C-contiguous ``arr``) to be brought into the cache (a hint: no fault, no
    effect on results; LLVM's ``prefetch`` for a read, kept in every cache level)."""
    sig = nbtypes.void(arr, i)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        p = builder.gep(_data_ptr(context, builder, signature.args[0], args[0]), [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read (0), highest locality (3), data cache (1)
        consts = [ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
        builder.call(fn, [builder.bitcast(p, i8p), *consts])

    return sig, codegen


_prefetch: Any = intrinsic(_prefetch_typer)


@numba.njit(inline="always", cache=True)
def _prefetch_row(a, r, c0, c1):  # type: ignore[no-untyped-def]
    """Prefetch the lines of row ``r`` of the 2-D ``a`` over columns ``[c0, c1)``."""
    step = _LINE // a.itemsize
    base = r * a.shape[1]
    j = c0
    while j < c1:
        _prefetch(a, base + j)
        j += step


@numba.njit(inline="always", cache=True)
def _stream_out(dst, lo, buf, n):  # type: ignore[no-untyped-def]
    """``dst[lo : lo + n] = buf[:n]``: whole aligned lines as non-temporal stores, the ragged
    ends as plain stores."""
    size = dst.itemsize
    w = _LINE // size
    mis = _misalign(dst, lo)
    head = 0 if mis == 0 else (_LINE - mis) // size
    if head > n:
        head = n
    for i in range(head):
        dst[lo + i] = buf[i]
    i = head
    while i + w <= n:
        _nt_line(dst, lo + i, buf, i)
        i += w
    for j in range(i, n):
        dst[lo + j] = buf[j]


# ------------------------------------------------------------------------------------------
# shared pieces


@numba.njit(inline="always", cache=True)
def _rsqrt(v: float) -> float:
    """``1/√v`` in float64 with IEEE's answer for ``v = 0`` (``inf``; a zero variance with
    ``eps = 0``): Numba's Python error model would raise instead, and a raise inside the C
    entries is swallowed, leaving the outputs unwritten."""
    r = math.sqrt(v)
    return math.inf if r == 0.0 else 1.0 / r


def _rounded_as(v: float, like: Any) -> Any:
    """``v`` rounded to the dtype of the scalar ``like`` (float32 or float64)."""
    return type(like)(v)


@overload(_rounded_as, inline="always")
def _rounded_as_compiled(v, like):  # type: ignore[no-untyped-def]
    # an explicit conversion: a value stored into a float32 array and read back in the same
    # prange iteration comes back unrounded from Numba's parallel build (the stored float64)
    if isinstance(like, nbtypes.Float) and like.bitwidth == 32:
        return lambda v, like: np.float32(v)
    return lambda v, like: np.float64(v)


@numba.njit(inline="always", cache=True)
def _median3(a: Any, b: Any, c: Any) -> Any:
    """The middle one of three values: a channel's shift, from its first, middle and last value,
    so that one value far from the others (an outlier where the first value is taken) cannot
    put the shift far from the mean — the float32 shifted sums would then cancel."""
    if a > b:
        a, b = b, a
    if b > c:
        b = c
    return a if a > b else b


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
    invstd = _rsqrt(var + eps)
    scale = g * invstd
    shift = bb - (mean - mh) * scale
    return mean, var, invstd, scale, shift


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _backward_coefs(
    sdy: float, sdyx: float, sx: float, m: int, mh: float, inv: float, g: float, tol: float
) -> tuple[float, float, float, float, float]:
    """From Σdy, Σdy·(x − mh), Σ(x − mh): ``(dγ, dβ, A, B, D)`` with
    dx = (dy + (x − mh)·B + D)·A.

    A = γ·invstd is factored out of the x̂ term: B = −dγ·invstd/m is of the size of
    1/(x − mh), while A·B is of the size of invstd²/(x − mh), which leaves float32's range
    (below 1e-38) for spreads from about 1e20 on and took the x̂ term of dx with it.

    When the given mean ``mh`` is the batch mean rounded to the dtype (the offset Σ(x − mh)/m is
    within ``tol``·|mh|), the rounding is corrected, so float32 keeps float32 accuracy even when
    |mean| ≫ std; any other given mean is used as it is.
    """
    corr = sx / m
    if abs(corr) > tol * abs(mh):
        corr = 0.0
    sdyx_c = sdyx - corr * sdy  # Σ dy·(x − μ), μ = mh + corr
    dwc = sdyx_c * inv
    bcoef = -dwc * inv / m
    return dwc, sdy, g * inv, bcoef, -sdy / m - bcoef * corr


# _PER_CHANNEL: the per-channel finishing loops below first add up the pieces' partial sums
# (one vector loop per sum) and read γ and β from float64 vectors (ones and zeros when the
# layer has none), so that the loop computing the coefficients loads nothing conditionally and
# vectorizes, divisions and square roots included. With the pieces summed inside it and
# `w[c] if has_w else 1.0` it ran scalar, a fixed cost of every call on wide layers: forward
# 23.0-23.9 µs for 4096 channels, 8.2 after; backward 15.6 µs, 4.7-4.9 after; results identical
# (the functions called from Python, medians of 2001).


@numba.njit(inline="always", cache=True)
def _per_channel(v, C, default):  # type: ignore[no-untyped-def]
    """A per-channel vector ``v`` in float64, or ``C`` copies of ``default`` when ``v`` is empty
    (no γ or β)."""
    if v.shape[0] == 0:
        return np.full(C, default, dtype=np.float64)
    return v.astype(np.float64)


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _merged(part):  # type: ignore[no-untyped-def]
    """The partial sums ``part (pieces, K, C)`` added up over the pieces: ``(K, C)``, float64."""
    out = part[0].copy()
    K, C = out.shape
    for t in range(1, part.shape[0]):
        for j in range(K):
            o = out[j]
            p = part[t, j]
            for c in range(C):
                o[c] += p[c]
    return out


@numba.njit(cache=True, fastmath=_FASTMATH)
def _finish_forward(part, kd, m, w, b, eps, mean_out, var_out, invstd_out, like):  # type: ignore[no-untyped-def]
    """Merge the partial shifted sums ``part (pieces, 2, C)`` per channel, write mean, var and
    invstd, and return ``(mh, scale, shift)`` in ``like``'s dtype for the element pass (see
    _PER_CHANNEL)."""
    C = part.shape[2]
    s = _merged(part)
    s1 = s[0]
    s2 = s[1]
    g = _per_channel(w, C, 1.0)
    bb = _per_channel(b, C, 0.0)
    mh_arr = np.empty(C, dtype=like.dtype)
    sc_arr = np.empty(C, dtype=like.dtype)
    sh_arr = np.empty(C, dtype=like.dtype)
    for c in range(C):
        k = np.float64(kd[c])
        mh_arr[c] = k + s1[c] / m  # the mean rounded to the dtype (stores cast)
        mean, var, invstd, sc, sh = _finalize_stats(
            s1[c], s2[c], m, k, eps, g[c], bb[c], np.float64(mh_arr[c])
        )
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
        sc_arr[c] = sc
        sh_arr[c] = sh
    return mh_arr, sc_arr, sh_arr


@numba.njit(cache=True, fastmath=_FASTMATH)
def _finish_backward(part, m, mean, invstd, w, tol, dw_out, db_out):  # type: ignore[no-untyped-def]
    """Merge the partial sums ``part (pieces, 3, C)`` (Σdy, Σdy·(x − μ), Σ(x − μ)) per channel,
    write dγ and dβ, and return the dx coefficients ``(A, B, D)`` in ``mean``'s dtype (see
    _PER_CHANNEL)."""
    C = part.shape[2]
    s = _merged(part)
    sdy = s[0]
    sdyx = s[1]
    sx = s[2]
    g = _per_channel(w, C, 1.0)
    a_arr = np.empty(C, dtype=mean.dtype)
    b_arr = np.empty(C, dtype=mean.dtype)
    d_arr = np.empty(C, dtype=mean.dtype)
    for c in range(C):
        dwc, dbc, ac, bc, dc = _backward_coefs(
            sdy[c], sdyx[c], sx[c], m, np.float64(mean[c]), np.float64(invstd[c]), g[c], tol
        )
        db_out[c] = dbc
        dw_out[c] = dwc
        a_arr[c] = ac
        b_arr[c] = bc
        d_arr[c] = dc
    return a_arr, b_arr, d_arr


@numba.njit(inline="always", cache=True)
def _piece(t: int, T: int, total: int) -> tuple[int, int]:
    """The flat range ``[j0, j1)`` of piece ``t`` of ``T`` equal pieces of ``total`` values."""
    return t * total // T, (t + 1) * total // T


@numba.njit(inline="always", cache=True)
def _first_row(j0: int, L: int, C: int) -> tuple[int, int, int]:
    """The row holding flat index ``j0`` of an ``(N, C, L)`` tensor, and its ``(n, c)``."""
    r0 = j0 // L
    n = r0 // C
    return r0, n, r0 - n * C


@numba.njit(inline="always", cache=True)
def _next_row(n: int, c: int, C: int) -> tuple[int, int]:
    """The row after ``(n, c)`` in address order (no division per row)."""
    c += 1
    if c == C:
        return n + 1, 0
    return n, c


@numba.njit(inline="always", cache=True)
def _next_channel(c: int, C: int) -> int:
    """The channel of the row after a row of channel ``c``."""
    c += 1
    return 0 if c == C else c


@numba.njit(inline="always", cache=True)
def _row_span(j0: int, j1: int, r: int, L: int) -> tuple[int, int]:
    """The part ``[lo, hi)`` of row ``r`` (length L) inside the flat range ``[j0, j1)``."""
    lo = j0 - r * L
    if lo < 0:
        lo = 0
    hi = j1 - r * L
    if hi > L:
        hi = L
    return lo, hi


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _segment_shifted_sums(seg, n, k, zero):  # type: ignore[no-untyped-def]
    """Σ(x − k) and Σ(x − k)² over ``seg[:n]`` (n ≤ :data:`CHUNK`) summed in x's dtype and
    returned in float64; a non-finite sum is taken again in float64."""
    p = zero
    q = zero
    for i in range(n):
        d = seg[i] - k
        p += d
        q += d * d
    if math.isfinite(q) and math.isfinite(p):
        return np.float64(p), np.float64(q)
    k64 = np.float64(k)
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        d64 = np.float64(seg[i]) - k64
        s1 += d64
        s2 += d64 * d64
    return s1, s2


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _shifted_sums(xr, lo, hi, k, zero):  # type: ignore[no-untyped-def]
    """Σ(x − k) and Σ(x − k)² over ``xr[lo:hi]`` in float64, from segments of :data:`CHUNK`
    values summed in x's dtype (a non-finite segment is summed again in float64).

    The segment's loops live in their own function: with the float64 fallback written inside
    this loop, LLVM left short rows 2.3–3.5× slower (49 values: 36 ns a row against 11 ns)."""
    s1 = 0.0
    s2 = 0.0
    a = lo
    while a < hi:
        e = min(a + CHUNK, hi)
        # 0-based loops vectorize (no negative-index fix-ups)
        t1, t2 = _segment_shifted_sums(xr[a:e], e - a, k, zero)
        s1 += t1
        s2 += t2
        a = e
    return s1, s2


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _segment_grad_sums(gs, xs, n, mh, zero):  # type: ignore[no-untyped-def]
    """Σdy, Σdy·(x − mh) and Σ(x − mh) over ``[:n]`` (n ≤ :data:`CHUNK`) summed in the dtype
    and returned in float64; non-finite sums are taken again in float64."""
    p = zero
    q = zero
    u = zero
    for i in range(n):
        g_ = gs[i]
        xd = xs[i] - mh
        p += g_
        q += g_ * xd
        u += xd
    if math.isfinite(p) and math.isfinite(q) and math.isfinite(u):
        return np.float64(p), np.float64(q), np.float64(u)
    mh64 = np.float64(mh)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        g64 = np.float64(gs[i])
        xd64 = np.float64(xs[i]) - mh64
        s0 += g64
        s1 += g64 * xd64
        s2 += xd64
    return s0, s1, s2


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _grad_sums(dr, xr, lo, hi, mh, zero):  # type: ignore[no-untyped-def]
    """Σdy, Σdy·(x − mh) and Σ(x − mh) over ``[lo, hi)`` of one row, in float64 from segments
    summed in the dtype (non-finite segments again in float64)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    a = lo
    while a < hi:
        e = min(a + CHUNK, hi)
        t0, t1, t2 = _segment_grad_sums(dr[a:e], xr[a:e], e - a, mh, zero)
        s0 += t0
        s1 += t1
        s2 += t2
        a = e
    return s0, s1, s2


# _ROW_PAIRS: the statistics sums of short whole rows of (N, C, L) take two rows per sweep.
# One row per sweep, LLVM vectorizes a row's sums 32 values per step and leaves the rest to a
# scalar loop with a dependency chain per sum: a bare loop over rows of 49 values (7×7) spent
# 13-21 ns a row against 6.7-10 ns for two rows side by side (single-threaded, in the cache;
# 0.5-1.0× for row lengths 32-484). In the forward kernel (interleaved calls, medians of 201):
# 0.86-0.93× on rows of 49, 0.91-0.97× on 36-100, 0.98-1.07× on 196 (hence the limit). The
# gradient sums, three per row, measured 1.0-1.14× in the backward kernel: one row per sweep.

#: whole rows shorter than this take the statistics sums two rows per sweep (see _ROW_PAIRS)
PAIR_BELOW = 128


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _pair_shifted_sums(xa, xb, n, ka, kb, zero):  # type: ignore[no-untyped-def]
    """:func:`_shifted_sums` of two whole rows of ``n`` (≤ :data:`CHUNK`) values in one sweep:
    ``(Σ(xa − ka), Σ(xa − ka)², Σ(xb − kb), Σ(xb − kb)²)`` in float64 (summed in the dtype;
    rows with a non-finite sum are summed again one by one)."""
    p = zero
    q = zero
    u = zero
    v = zero
    for i in range(n):
        d = xa[i] - ka
        e = xb[i] - kb
        p += d
        q += d * d
        u += e
        v += e * e
    if ((p + q) + (u + v)) * zero == 0:  # NaN unless all four are finite
        return np.float64(p), np.float64(q), np.float64(u), np.float64(v)
    a1, a2 = _shifted_sums(xa, 0, n, ka, zero)
    b1, b2 = _shifted_sums(xb, 0, n, kb, zero)
    return a1, a2, b1, b2


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _rows_shifted_sums(xr, r0, r1, C, kd, p1, p2, zero):  # type: ignore[no-untyped-def]
    """Add the shifted sums of whole rows ``[r0, r1)`` of ``xr (N·C, L)`` to ``p1``/``p2``
    (float64, per channel), two rows per sweep (see _ROW_PAIRS)."""
    L = xr.shape[1]
    c = r0 % C
    r = r0
    while L < PAIR_BELOW and r + 1 < r1:
        c2 = _next_channel(c, C)
        a1, a2, b1, b2 = _pair_shifted_sums(xr[r], xr[r + 1], L, kd[c], kd[c2], zero)
        p1[c] += a1
        p2[c] += a2
        p1[c2] += b1
        p2[c2] += b2
        c = _next_channel(c2, C)
        r += 2
    while r < r1:
        s1, s2 = _shifted_sums(xr[r], 0, L, kd[c], zero)
        p1[c] += s1
        p2[c] += s2
        c = _next_channel(c, C)
        r += 1


# _ROW_LOOPS: the element passes come in two loops, plain stores and streamed through a
# buffer, each in a function of its own, and the whole-row loops of (N, C, L) call the plain one
# directly, choosing outside the row loop: with the choice made per row (both loops inlined
# into the row loop), the single-threaded inference loop took 2.4x the time on rows of 49
# values and 1.6x on rows of 196 (283 → 117 µs and 200 → 123 µs on 16×512×49 and 16×256×196,
# in the cache), the multi-threaded one 1.1x.


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _affine_plain(yr, xr, lo, hi, mu, sc, sh):  # type: ignore[no-untyped-def]
    xs = xr[lo:hi]
    ys = yr[lo:hi]
    for i in range(hi - lo):
        ys[i] = (xs[i] - mu) * sc + sh


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _affine_streamed(yr, xr, lo, hi, mu, sc, sh, buf):  # type: ignore[no-untyped-def]
    a = lo
    while a < hi:
        e = min(a + CHUNK, hi)
        xs = xr[a:e]
        for i in range(e - a):
            buf[i] = (xs[i] - mu) * sc + sh
        _stream_out(yr, a, buf, e - a)
        a = e


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _affine_span(yr, xr, lo, hi, mu, sc, sh, stream, buf):  # type: ignore[no-untyped-def]
    """``y = (x − mu)·sc + sh`` over ``[lo, hi)`` of one row (streamed through ``buf``)."""
    if stream:
        _affine_streamed(yr, xr, lo, hi, mu, sc, sh, buf)
    else:
        _affine_plain(yr, xr, lo, hi, mu, sc, sh)


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _dx_plain(dxr, dr, xr, lo, hi, mh, af, bf, df):  # type: ignore[no-untyped-def]
    xs = xr[lo:hi]
    gs = dr[lo:hi]
    os_ = dxr[lo:hi]
    for i in range(hi - lo):
        os_[i] = (gs[i] + (xs[i] - mh) * bf + df) * af


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _dx_streamed(dxr, dr, xr, lo, hi, mh, af, bf, df, buf):  # type: ignore[no-untyped-def]
    a = lo
    while a < hi:
        e = min(a + CHUNK, hi)
        xs = xr[a:e]
        gs = dr[a:e]
        for i in range(e - a):
            buf[i] = (gs[i] + (xs[i] - mh) * bf + df) * af
        _stream_out(dxr, a, buf, e - a)
        a = e


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _dx_span(dxr, dr, xr, lo, hi, mh, af, bf, df, stream, buf):  # type: ignore[no-untyped-def]
    """``dx = (dy + (x − mh)·B + D)·A`` over ``[lo, hi)`` of one row (streamed through ``buf``)."""
    if stream:
        _dx_streamed(dxr, dr, xr, lo, hi, mh, af, bf, df, buf)
    else:
        _dx_plain(dxr, dr, xr, lo, hi, mh, af, bf, df)


# _OVERRUN: the element passes over whole rows of (N, C, L) run each row's loop on to the next
# multiple of OVERRUN values, into the next row, which its own turn then writes again: LLVM's
# vector loop takes 32 float32 values a step and leaves the rest of a row to scalar code (17
# of 49 values on a 7×7 row). A thread's last row stops at its end (the next row may be
# another thread's, already written), and an output that is its own input (in place) is never
# overrun (the next row's head would be read after it was written). Rows whose rest is at most
# half a step are not overrun:
# kernel calls (interleaved, medians of 201) on rows of 49: forward 0.93-0.97×, backward
# 0.91-0.96×, inference 0.87-0.93×; on rows of 196 (a rest of 4) overrun measured 0.98-1.04×.

#: the element loops' step (AVX2, float32: 8 lanes × 4), to which whole rows are overrun
OVERRUN = 32


@numba.njit(inline="always", cache=True)
def _overrun(L):  # type: ignore[no-untyped-def]
    """The values an element loop runs over on a whole row of ``L`` that is not a thread's
    last (see _OVERRUN)."""
    if L % OVERRUN <= OVERRUN // 2:
        return L
    return (L + OVERRUN - 1) // OVERRUN * OVERRUN


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _affine_rows(yr, xr, r0, r1, C, mu, sc, sh):  # type: ignore[no-untyped-def]
    """``y = (x − mu[c])·sc[c] + sh[c]`` over whole rows ``[r0, r1)`` of ``(N·C, L)``, each row
    but the last overrun into the next (:func:`_overrun`) unless ``y`` is ``x``'s memory."""
    L = xr.shape[1]
    xf = xr.reshape(-1)
    yf = yr.reshape(-1)
    n = L if _overlap(yf, xf) else _overrun(L)
    c = r0 % C
    for r in range(r0, r1 - 1):
        _affine_plain(yf, xf, r * L, r * L + n, mu[c], sc[c], sh[c])
        c = _next_channel(c, C)
    if r1 > r0:
        r = r1 - 1
        _affine_plain(yf, xf, r * L, r * L + L, mu[c], sc[c], sh[c])


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _dx_rows(dxr, dyr, xr, r0, r1, C, mean, af, bf, df):  # type: ignore[no-untyped-def]
    """``dx = (dy + (x − mean[c])·bf[c] + df[c])·af[c]`` over whole rows ``[r0, r1)`` of
    ``(N·C, L)``, overrun as :func:`_affine_rows` unless ``dx`` is the memory of ``dy`` or ``x``."""
    L = xr.shape[1]
    xf = xr.reshape(-1)
    gf = dyr.reshape(-1)
    of = dxr.reshape(-1)
    n = L if _overlap(of, gf) or _overlap(of, xf) else _overrun(L)
    c = r0 % C
    for r in range(r0, r1 - 1):
        _dx_plain(of, gf, xf, r * L, r * L + n, mean[c], af[c], bf[c], df[c])
        c = _next_channel(c, C)
    if r1 > r0:
        r = r1 - 1
        _dx_plain(of, gf, xf, r * L, r * L + L, mean[c], af[c], bf[c], df[c])


# ------------------------------------------------------------------------------------------
# (N, C, L)


def ncl_forward_train(x, w, b, eps, T, whole, stream, y, mean_out, var_out, invstd_out):  # type: ignore[no-untyped-def]
    """Training forward on ``x (N, C, L)`` split into ``T`` contiguous pieces of memory (of
    whole rows when ``whole``)."""
    N, C, L = x.shape
    m = N * L
    R = N * C
    total = R * L
    zero = np.zeros(1, dtype=x.dtype)[0]
    kd = np.empty(C, dtype=x.dtype)  # the shift of each channel: see _median3
    for c in range(C):
        kd[c] = _median3(x[0, c, 0], x[N // 2, c, L // 2], x[N - 1, c, L - 1])
    part = np.zeros((T, 2, C))
    xr = x.reshape(R, L)
    yr = y.reshape(R, L)
    for t in prange(T):
        j0, j1 = _piece(t, T, total)
        p1 = part[t, 0]
        p2 = part[t, 1]
        if whole:  # the row loop with the row's bounds known to the compiler
            r0, r1 = _piece(t, T, R)
            _rows_shifted_sums(xr, r0, r1, C, kd, p1, p2, zero)
        elif j1 > j0:
            r0, n, c = _first_row(j0, L, C)
            for r in range(r0, (j1 - 1) // L + 1):  # rows in address order: (n, c) stepped
                lo, hi = _row_span(j0, j1, r, L)
                s1, s2 = _shifted_sums(x[n, c], lo, hi, kd[c], zero)
                p1[c] += s1
                p2[c] += s2
                n, c = _next_row(n, c, C)
    mh_arr, sc_arr, sh_arr = _finish_forward(
        part, kd, m, w, b, eps, mean_out, var_out, invstd_out, x
    )
    for t in prange(T):
        j0, j1 = _piece(t, T, total)
        buf = np.empty(CHUNK if stream else 0, dtype=x.dtype)
        if whole and not stream:  # the plain loop chosen outside the row loop (see _ROW_LOOPS)
            r0, r1 = _piece(t, T, R)
            _affine_rows(yr, xr, r0, r1, C, mh_arr, sc_arr, sh_arr)
        elif j1 > j0:
            r0, n, c = _first_row(j0, L, C)
            for r in range(r0, (j1 - 1) // L + 1):  # rows in address order: (n, c) stepped
                lo, hi = _row_span(j0, j1, r, L)
                _affine_span(y[n, c], x[n, c], lo, hi, mh_arr[c], sc_arr[c], sh_arr[c], stream, buf)
                n, c = _next_row(n, c, C)
        if stream:
            _fence()


def ncl_backward(dy, x, mean, invstd, w, tol, T, whole, stream, need_dx, dx, dw_out, db_out):  # type: ignore[no-untyped-def]
    """Backward on ``(N, C, L)``: Σdy and Σdy·x̂ per channel, then the dx pass.

    dx = γ·invstd/m · (m·dy − Σdy − x̂·Σdy·x̂) = (dy + (x − μ)·B + D)·A per channel.
    """
    N, C, L = x.shape
    m = N * L
    R = N * C
    total = R * L
    zero = np.zeros(1, dtype=x.dtype)[0]
    part = np.zeros((T, 3, C))
    xr = x.reshape(R, L)
    dyr = dy.reshape(R, L)
    dxr = dx.reshape(R, L)
    for t in prange(T):
        j0, j1 = _piece(t, T, total)
        p0 = part[t, 0]
        p1 = part[t, 1]
        p2 = part[t, 2]
        if whole:
            r0, r1 = _piece(t, T, R)
            c = r0 % C
            for r in range(r0, r1):
                s0, s1, s2 = _grad_sums(dyr[r], xr[r], 0, L, mean[c], zero)
                p0[c] += s0
                p1[c] += s1
                p2[c] += s2
                c = _next_channel(c, C)
        elif j1 > j0:
            r0, n, c = _first_row(j0, L, C)
            for r in range(r0, (j1 - 1) // L + 1):  # rows in address order: (n, c) stepped
                lo, hi = _row_span(j0, j1, r, L)
                s0, s1, s2 = _grad_sums(dy[n, c], x[n, c], lo, hi, mean[c], zero)
                p0[c] += s0
                p1[c] += s1
                p2[c] += s2
                n, c = _next_row(n, c, C)
    a_arr, b_arr, d_arr = _finish_backward(part, m, mean, invstd, w, tol, dw_out, db_out)
    if not need_dx:
        return
    for t in prange(T):
        j0, j1 = _piece(t, T, total)
        buf = np.empty(CHUNK if stream else 0, dtype=x.dtype)
        if whole and not stream:  # (see _ROW_LOOPS)
            r0, r1 = _piece(t, T, R)
            _dx_rows(dxr, dyr, xr, r0, r1, C, mean, a_arr, b_arr, d_arr)
        elif j1 > j0:
            r0, n, c = _first_row(j0, L, C)
            for r in range(r0, (j1 - 1) // L + 1):  # rows in address order: (n, c) stepped
                lo, hi = _row_span(j0, j1, r, L)
                _dx_span(
                    dx[n, c],
                    dy[n, c],
                    x[n, c],
                    lo,
                    hi,
                    mean[c],
                    a_arr[c],
                    b_arr[c],
                    d_arr[c],
                    stream,
                    buf,
                )
                n, c = _next_row(n, c, C)
        if stream:
            _fence()


def ncl_forward_train_fused(x, w, b, eps, stream, y, mean_out, var_out, invstd_out):  # type: ignore[no-untyped-def]
    """Training forward on ``x (N, C, L)``, a channel per task: its statistics, then its
    element pass while the channel is still in the core's cache (long rows, many channels)."""
    N, C, L = x.shape
    m = N * L
    has_w = w.shape[0] > 0
    has_b = b.shape[0] > 0
    zero = np.zeros(1, dtype=x.dtype)[0]
    mh_arr = np.empty(C, dtype=x.dtype)
    sc_arr = np.empty(C, dtype=x.dtype)
    sh_arr = np.empty(C, dtype=x.dtype)
    for c in prange(C):
        kd = _median3(x[0, c, 0], x[N // 2, c, L // 2], x[N - 1, c, L - 1])
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            a1, a2 = _shifted_sums(x[n, c], 0, L, kd, zero)
            s1 += a1
            s2 += a2
        k = np.float64(kd)
        g = np.float64(w[c]) if has_w else 1.0
        bb = np.float64(b[c]) if has_b else 0.0
        mh = _rounded_as(k + s1 / m, zero)  # the mean in the dtype, for the element pass
        mh_arr[c] = mh
        mean, var, invstd, sc, sh = _finalize_stats(s1, s2, m, k, eps, g, bb, np.float64(mh))
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
        sc_arr[c] = sc
        sh_arr[c] = sh
        buf = np.empty(CHUNK if stream else 0, dtype=x.dtype)
        for n in range(N):
            _affine_span(y[n, c], x[n, c], 0, L, mh_arr[c], sc_arr[c], sh_arr[c], stream, buf)
        if stream:
            _fence()


def ncl_backward_fused(dy, x, mean, invstd, w, tol, stream, need_dx, dx, dw_out, db_out):  # type: ignore[no-untyped-def]
    """Backward on ``(N, C, L)``, a channel per task: its sums, then its dx pass from cache."""
    N, C, L = x.shape
    m = N * L
    has_w = w.shape[0] > 0
    zero = np.zeros(1, dtype=x.dtype)[0]
    a_arr = np.empty(C, dtype=x.dtype)
    b_arr = np.empty(C, dtype=x.dtype)
    d_arr = np.empty(C, dtype=x.dtype)
    for c in prange(C):
        sdy = 0.0
        sdyx = 0.0
        sx = 0.0
        for n in range(N):
            s0, s1, s2 = _grad_sums(dy[n, c], x[n, c], 0, L, mean[c], zero)
            sdy += s0
            sdyx += s1
            sx += s2
        g = np.float64(w[c]) if has_w else 1.0
        dwc, dbc, ac, bc, dc = _backward_coefs(
            sdy, sdyx, sx, m, np.float64(mean[c]), np.float64(invstd[c]), g, tol
        )
        db_out[c] = dbc
        dw_out[c] = dwc
        a_arr[c] = ac
        b_arr[c] = bc
        d_arr[c] = dc
        if need_dx:
            buf = np.empty(CHUNK if stream else 0, dtype=x.dtype)
            for n in range(N):
                _dx_span(
                    dx[n, c],
                    dy[n, c],
                    x[n, c],
                    0,
                    L,
                    mean[c],
                    a_arr[c],
                    b_arr[c],
                    d_arr[c],
                    stream,
                    buf,
                )
            if stream:
                _fence()


@numba.njit(inline="always", cache=True)
def _affine_into(mean, var, w, b, eps, scale_out, shift_out):  # type: ignore[no-untyped-def]
    """Algorithm 2's affine map per channel, in float64, stored in the outputs' dtype:
    ``scale = γ/√(var + ε)``, ``shift = β − scale·mean`` (γ, β empty: 1, 0)."""
    has_w = w.shape[0] > 0
    has_b = b.shape[0] > 0
    for c in range(mean.shape[0]):
        sc = _rsqrt(np.float64(var[c]) + eps)
        if has_w:
            sc *= np.float64(w[c])
        sh = -sc * np.float64(mean[c])
        if has_b:
            sh += np.float64(b[c])
        scale_out[c] = sc
        shift_out[c] = sh


@numba.njit(inline="always", cache=True)
def _eval_coefs(p0, p1, w, b, eps, stats):  # type: ignore[no-untyped-def]
    """``(scale, shift)``: computed from the population ``mean = p0``, ``var = p1`` when
    ``stats``, else ``p0`` and ``p1`` themselves."""
    if not stats:
        return p0, p1
    scale = np.empty_like(p0)
    shift = np.empty_like(p0)
    _affine_into(p0, p1, w, b, eps, scale, shift)
    return scale, shift


def ncl_forward_eval(x, p0, p1, w, b, eps, stats, T, whole, stream, y):  # type: ignore[no-untyped-def]
    """Inference on ``(N, C, L)``: one pass, y = x·scale + shift, in ``T`` pieces of memory
    (``scale``, ``shift`` from :func:`_eval_coefs`)."""
    scale, shift = _eval_coefs(p0, p1, w, b, eps, stats)
    N, C, L = x.shape
    R = N * C
    total = R * L
    zero = np.zeros(1, dtype=x.dtype)[0]
    xr = x.reshape(R, L)
    yr = y.reshape(R, L)
    for t in prange(T):
        j0, j1 = _piece(t, T, total)
        buf = np.empty(CHUNK if stream else 0, dtype=x.dtype)
        if whole and not stream:  # (see _ROW_LOOPS)
            r0, r1 = _piece(t, T, R)
            _affine_rows(yr, xr, r0, r1, C, np.zeros(C, dtype=x.dtype), scale, shift)
        elif j1 > j0:
            r0, n, c = _first_row(j0, L, C)
            for r in range(r0, (j1 - 1) // L + 1):  # rows in address order: (n, c) stepped
                lo, hi = _row_span(j0, j1, r, L)
                _affine_span(y[n, c], x[n, c], lo, hi, zero, scale[c], shift[c], stream, buf)
                n, c = _next_row(n, c, C)
        if stream:
            _fence()


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _eval_grad_span(dxr, dr, xr, lo, hi, m, sc, zero, need_dx, stream, buf):  # type: ignore[no-untyped-def]
    """Σdy and Σdy·(x − m) over ``[lo, hi)`` of one row, and ``dx = dy·sc`` there: segment by
    segment of :data:`CHUNK` values, each written while it is in the core's cache."""
    s0 = 0.0
    s1 = 0.0
    a = lo
    while a < hi:
        e = min(a + CHUNK, hi)
        t0, t1, _ = _grad_sums(dr, xr, a, e, m, zero)
        s0 += t0
        s1 += t1
        if need_dx:
            _affine_span(dxr, dr, a, e, zero, sc, zero, stream, buf)
        a = e
    return s0, s1


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _eval_grad_row(dxs, ds, xs, n, m, sc, zero, need_dx):  # type: ignore[no-untyped-def]
    """Σdy and Σdy·(x − m) over a whole short row ``[:n]`` (n < FUSED_ROWS ≤ CHUNK) summed in
    the dtype — again through :func:`_segment_grad_sums` when not finite — and ``dx = dy·sc``
    written in the same sweep when ``need_dx``. (Through :func:`_grad_sums` and a second loop
    for dx, the kernel took 29.8 µs on 8×512×20 with 2 threads, 19.9 in one sweep.)"""
    p = zero
    q = zero
    if need_dx:
        for i in range(n):
            g = ds[i]
            p += g
            q += g * (xs[i] - m)
            dxs[i] = g * sc
    else:
        for i in range(n):
            g = ds[i]
            p += g
            q += g * (xs[i] - m)
    if math.isfinite(p) and math.isfinite(q):
        return np.float64(p), np.float64(q)
    s0, s1, _ = _segment_grad_sums(ds, xs, n, m, zero)  # (rare) again, in float64 where needed
    return s0, s1


def ncl_backward_eval(dy, x, mean, scale, T, whole, stream, need_dx, dx, sums_out):  # type: ignore[no-untyped-def]
    """Backward of inference on ``(N, C, L)`` in one pass: ``dx = dy·scale`` and the per-channel
    Σdy·(x − mean), Σdy added to ``sums_out (2, C)`` (float64). Nothing waits on the sums, so
    each segment is summed and its dx written while it is in the core's cache."""
    N, C, L = x.shape
    R = N * C
    total = R * L
    zero = np.zeros(1, dtype=x.dtype)[0]
    part = np.zeros((T, 2, C))
    xr = x.reshape(R, L)
    dyr = dy.reshape(R, L)
    dxr = dx.reshape(R, L)
    for t in prange(T):
        p0 = part[t, 0]
        p1 = part[t, 1]
        buf = np.empty(CHUNK if stream else 0, dtype=x.dtype)
        if whole and not stream:  # (see _ROW_LOOPS)
            r0, r1 = _piece(t, T, R)
            c = r0 % C
            for r in range(r0, r1):
                s0, s1 = _eval_grad_row(dxr[r], dyr[r], xr[r], L, mean[c], scale[c], zero, need_dx)
                p0[c] += s0
                p1[c] += s1
                c = _next_channel(c, C)
        elif whole:  # streaming dx: the same whole-row pieces, so the sums add up alike
            r0, r1 = _piece(t, T, R)
            c = r0 % C
            for r in range(r0, r1):
                s0, s1 = _eval_grad_span(
                    dxr[r], dyr[r], xr[r], 0, L, mean[c], scale[c], zero, need_dx, stream, buf
                )
                p0[c] += s0
                p1[c] += s1
                c = _next_channel(c, C)
        else:
            j0, j1 = _piece(t, T, total)
            if j1 > j0:
                r0, n, c = _first_row(j0, L, C)
                for r in range(r0, (j1 - 1) // L + 1):  # rows in address order: (n, c) stepped
                    lo, hi = _row_span(j0, j1, r, L)
                    s0, s1 = _eval_grad_span(
                        dxr[r], dyr[r], xr[r], lo, hi, mean[c], scale[c], zero, need_dx, stream,
                        buf,
                    )  # fmt: skip
                    p0[c] += s0
                    p1[c] += s1
                    n, c = _next_row(n, c, C)
        if stream and need_dx:
            _fence()
    for c in range(C):
        for t in range(T):
            sums_out[0, c] += part[t, 1, c]
            sums_out[1, c] += part[t, 0, c]


# ------------------------------------------------------------------------------------------
# (M, C)

#: rows per block on ``(M, C)``: a block's sums are taken in the input's dtype (vectorized
#: across the contiguous channels), then added to the float64 partial sums
MC_ROWS = 128
#: inputs of fewer bytes than this are summed four rows per sweep on ``(M, C)``: the block
#: sums of a channel are then loaded and stored once per four values instead of per value
#: (the sum loops 1.2-2.3x faster while x is in the cache); larger inputs stream from memory
#: a row per sweep (one sequential read stream per thread, which the prefetcher follows;
#: four rows per sweep measured 1.2-1.6x slower there; with four rows prefetched ahead the
#: statistics pass ran 0.5-0.7x the time with x in the L3 and 0.84-0.97x from memory, the
#: gradient sums 1.2-1.5x slower, and the modules no faster: docs/kernels-log.md)
MC_QUAD_BELOW = 4 << 20
#: rows ahead of the one being read whose lines are prefetched on ``(M, C)`` inputs of at least
#: :data:`MC_QUAD_BELOW` bytes: the hardware prefetcher alone left the statistics pass of
#: ``channels_last`` activations reading memory 15-25 % slower (interleaved medians,
#: caches flushed: 32×64×56×56 1.34-1.49 → 1.16-1.25 ms, 64×256×14×14 0.69 → 0.63)
MC_PREFETCH_ROWS = 8
#: rows of a tile up to this many bytes get the prefetches (longer rows are long sequential
#: runs the hardware prefetcher follows; at 4 KiB the prefetches measured 5-8 % slower)
MC_PREFETCH_RUN = 1024


@numba.njit(cache=True)
def _spread(v, G, R):  # type: ignore[no-untyped-def]
    """A per-channel vector ``v (C,)`` as the per-column vector of a view ``(M, C·G·R)`` (each
    channel's ``G`` columns side by side, the ``C`` channels ``R`` times in a row): column
    ``j`` holds ``v[(j // G) % C]`` (``v`` itself for ``G == R == 1``)."""
    if G == 1 and R == 1:
        return v
    C = v.shape[0]
    out = np.empty(C * G * R, dtype=v.dtype)
    j = 0  # columns in order: a division per column cost more than the pass itself on few rows
    for _ in range(R):
        for c in range(C):
            vc = v[c]
            for g in range(G):
                out[j + g] = vc
            j += G
    return out


@numba.njit(cache=True)
def _gather(part, G, R):  # type: ignore[no-untyped-def]
    """Partial sums per column ``part (P, K, C·G·R)`` added up per channel: ``(P, K, C)``
    (``part`` itself for ``G == R == 1``)."""
    if G == 1 and R == 1:
        return part
    P, K, W = part.shape
    C = W // (G * R)
    out = np.zeros((P, K, C))
    for p in range(P):
        for k in range(K):
            j = 0  # as in _spread: columns in order, no division per column
            for _ in range(R):
                for c in range(C):
                    s = out[p, k, c]
                    for g in range(G):
                        s += part[p, k, j + g]
                    out[p, k, c] = s
                    j += G
    return out


@numba.njit(inline="always", cache=True)
def _prefetching(x, quad, c0, c1):  # type: ignore[no-untyped-def]
    """Whether a row-at-a-time loop over ``x (M, C)``, channels ``[c0, c1)``, prefetches
    rows ahead (:data:`MC_PREFETCH_ROWS`): inputs beyond the caches, short tile rows."""
    return not quad and (c1 - c0) * x.itemsize <= MC_PREFETCH_RUN


@numba.njit(inline="always", cache=True)
def _tile(t, nrb, ncb, tw, M, W):  # type: ignore[no-untyped-def]
    """Rows ``[r0, r1)`` and channels ``[c0, c1)`` of task ``t`` (``nrb`` row blocks ×
    ``ncb`` tiles of ``tw`` channels), and its row block."""
    rb = t // ncb
    cb = t % ncb
    r0, r1 = _piece(rb, nrb, M)
    c0 = cb * tw
    return rb, r0, r1, c0, min(c0 + tw, W)


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _add_block_sums(s1, s2, p1, p2, n, zero):  # type: ignore[no-untyped-def]
    """Add a block's sums ``s1``, ``s2`` (x's dtype) to the float64 partials ``p1``, ``p2``
    where both are finite; True when every channel's were (else the caller sums the others
    again in float64). One vectorized test per block: NaN unless all are finite (inf·0 =
    NaN)."""
    bad = zero
    for c in range(n):
        bad += (s1[c] + s2[c]) * zero
    if bad == 0:
        for c in range(n):
            p1[c] += np.float64(s1[c])
        for c in range(n):
            p2[c] += np.float64(s2[c])
        return True
    for c in range(n):
        if math.isfinite(s1[c]) and math.isfinite(s2[c]):
            p1[c] += np.float64(s1[c])
            p2[c] += np.float64(s2[c])
    return False


@numba.njit(inline="always", cache=True)
def _block_sums(x, n):  # type: ignore[no-untyped-def]
    """``(zero, s1, s2)``: x's dtype's zero and two block-sum vectors of ``n`` channels in it,
    for the block loops of :func:`_mc_shifted_sums` and :func:`_mc_eval_grad`."""
    return x.dtype.type(0), np.empty(n, x.dtype), np.empty(n, x.dtype)


@numba.njit(inline="always", cache=True)
def _clear(s1, s2, n):  # type: ignore[no-untyped-def]
    """Zero the first ``n`` entries of both block-sum vectors (a new block)."""
    for c in range(n):
        s1[c] = 0
        s2[c] = 0


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_shifted_sums(x, r0, r1, c0, c1, k, p1, p2):  # type: ignore[no-untyped-def]
    """Add Σ(x − k) and Σ(x − k)² over rows ``[r0, r1)`` to ``p1``/``p2`` (float64, one entry
    per channel of ``[c0, c1)``): blocks of :data:`MC_ROWS` rows summed in x's dtype, a row per
    sweep; a block whose sums are all finite is added with vector loops, else each channel whose
    block sum is not finite is summed again in float64."""
    n = c1 - c0
    kv = k[c0:c1]  # channel slices: 0-based loops vectorize (no negative-index fix-ups)
    zero, s1, s2 = _block_sums(x, n)
    quad = x.size * x.itemsize < MC_QUAD_BELOW
    pf = _prefetching(x, quad, c0, c1)
    i = r0
    while i < r1:
        e = min(i + MC_ROWS, r1)
        _clear(s1, s2, n)
        q = i
        if quad:
            while q + 4 <= e:
                xa = x[q, c0:c1]
                xb = x[q + 1, c0:c1]
                xc = x[q + 2, c0:c1]
                xd = x[q + 3, c0:c1]
                for c in range(n):
                    kc = kv[c]
                    d0 = xa[c] - kc
                    d1 = xb[c] - kc
                    d2 = xc[c] - kc
                    d3 = xd[c] - kc
                    s1[c] += (d0 + d1) + (d2 + d3)
                    s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                q += 4
        for r in range(q, e):
            if pf and r + MC_PREFETCH_ROWS < r1:
                _prefetch_row(x, r + MC_PREFETCH_ROWS, c0, c1)
            xs = x[r, c0:c1]
            for c in range(n):
                d = xs[c] - kv[c]
                s1[c] += d
                s2[c] += d * d
        if not _add_block_sums(s1, s2, p1, p2, n, zero):
            for c in range(n):
                if not (math.isfinite(s1[c]) and math.isfinite(s2[c])):
                    k64 = np.float64(kv[c])
                    for r in range(i, e):
                        d64 = np.float64(x[r, c0 + c]) - k64
                        p1[c] += d64
                        p2[c] += d64 * d64
        i = e


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_grad_sums(dy, x, r0, r1, c0, c1, mean, p1, p2, p3):  # type: ignore[no-untyped-def]
    """Add Σdy, Σdy·(x − mean) and Σ(x − mean) over rows ``[r0, r1)`` of channels ``[c0, c1)``
    to ``p1``, ``p2``, ``p3`` (float64), as :func:`_mc_shifted_sums` does."""
    n = c1 - c0
    mv = mean[c0:c1]
    zero = x.dtype.type(0)
    s1 = np.empty(n, x.dtype)
    s2 = np.empty(n, x.dtype)
    s3 = np.empty(n, x.dtype)
    quad = x.size * x.itemsize < MC_QUAD_BELOW
    pf = _prefetching(x, quad, c0, c1)
    i = r0
    while i < r1:
        e = min(i + MC_ROWS, r1)
        for c in range(n):
            s1[c] = 0
            s2[c] = 0
            s3[c] = 0
        q = i
        if quad:
            while q + 4 <= e:
                xa = x[q, c0:c1]
                xb = x[q + 1, c0:c1]
                xc = x[q + 2, c0:c1]
                xd = x[q + 3, c0:c1]
                ga = dy[q, c0:c1]
                gb = dy[q + 1, c0:c1]
                gc = dy[q + 2, c0:c1]
                gd = dy[q + 3, c0:c1]
                for c in range(n):
                    m = mv[c]
                    d0 = xa[c] - m
                    d1 = xb[c] - m
                    d2 = xc[c] - m
                    d3 = xd[c] - m
                    s1[c] += (ga[c] + gb[c]) + (gc[c] + gd[c])
                    s2[c] += (ga[c] * d0 + gb[c] * d1) + (gc[c] * d2 + gd[c] * d3)
                    s3[c] += (d0 + d1) + (d2 + d3)
                q += 4
        for r in range(q, e):
            if pf and r + MC_PREFETCH_ROWS < r1:
                _prefetch_row(x, r + MC_PREFETCH_ROWS, c0, c1)
                _prefetch_row(dy, r + MC_PREFETCH_ROWS, c0, c1)
            xs = x[r, c0:c1]
            gs = dy[r, c0:c1]
            for c in range(n):
                g = gs[c]
                d = xs[c] - mv[c]
                s1[c] += g
                s2[c] += g * d
                s3[c] += d
        bad = zero
        for c in range(n):
            bad += (s1[c] + s2[c] + s3[c]) * zero
        if bad == 0:
            for c in range(n):
                p1[c] += np.float64(s1[c])
            for c in range(n):
                p2[c] += np.float64(s2[c])
            for c in range(n):
                p3[c] += np.float64(s3[c])
            i = e
            continue
        for c in range(n):
            if math.isfinite(s1[c]) and math.isfinite(s2[c]) and math.isfinite(s3[c]):
                p1[c] += np.float64(s1[c])
                p2[c] += np.float64(s2[c])
                p3[c] += np.float64(s3[c])
            else:
                m64 = np.float64(mv[c])
                for r in range(i, e):
                    g64 = np.float64(dy[r, c0 + c])
                    d64 = np.float64(x[r, c0 + c]) - m64
                    p1[c] += g64
                    p2[c] += g64 * d64
                    p3[c] += d64
        i = e


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_eval_grad(dy, x, r0, r1, c0, c1, mean, scale, p1, p2, need_dx, dx):  # type: ignore[no-untyped-def]
    """Add Σdy and Σdy·(x − mean) over rows ``[r0, r1)`` of channels ``[c0, c1)`` to ``p1``,
    ``p2`` (float64), blocks of :data:`MC_ROWS` rows summed in the dtype as in
    :func:`_mc_grad_sums`, and write ``dx = dy·scale`` (plain stores) in the same sweep when
    ``need_dx``: the inference backward reads dy and x once. (Summing with
    :func:`_mc_grad_sums`, then writing dx from the block in cache, the kernel took 1.13–1.46×
    the time of a bare one-sweep loop interleaved with it, 1.10–1.36× so: 16384 × 32 to
    256 × 1024, 2 threads, in the cache.)"""
    n = c1 - c0
    mv = mean[c0:c1]
    sv = scale[c0:c1]
    zero, s1, s2 = _block_sums(x, n)
    i = r0
    while i < r1:
        e = min(i + MC_ROWS, r1)
        _clear(s1, s2, n)
        if need_dx:
            for r in range(i, e):
                xs = x[r, c0:c1]
                gs = dy[r, c0:c1]
                os_ = dx[r, c0:c1]
                for c in range(n):
                    g = gs[c]
                    s1[c] += g
                    s2[c] += g * (xs[c] - mv[c])
                    os_[c] = g * sv[c]
        else:
            for r in range(i, e):
                xs = x[r, c0:c1]
                gs = dy[r, c0:c1]
                for c in range(n):
                    g = gs[c]
                    s1[c] += g
                    s2[c] += g * (xs[c] - mv[c])
        if not _add_block_sums(s1, s2, p1, p2, n, zero):
            for c in range(n):
                if not (math.isfinite(s1[c]) and math.isfinite(s2[c])):
                    m64 = np.float64(mv[c])
                    for r in range(i, e):
                        g64 = np.float64(dy[r, c0 + c])
                        p1[c] += g64
                        p2[c] += g64 * (np.float64(x[r, c0 + c]) - m64)
        i = e


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_affine_centered(y, x, r0, r1, c0, c1, mu, sc, sh):  # type: ignore[no-untyped-def]
    mv = mu[c0:c1]
    sv = sc[c0:c1]
    hv = sh[c0:c1]
    for i in range(r0, r1):
        xs = x[i, c0:c1]
        ys = y[i, c0:c1]
        for c in range(c1 - c0):
            ys[c] = (xs[c] - mv[c]) * sv[c] + hv[c]


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_affine_scaled(y, x, r0, r1, c0, c1, sc, sh):  # type: ignore[no-untyped-def]
    sv = sc[c0:c1]
    hv = sh[c0:c1]
    for i in range(r0, r1):
        xs = x[i, c0:c1]
        ys = y[i, c0:c1]
        for c in range(c1 - c0):
            ys[c] = xs[c] * sv[c] + hv[c]


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_affine_streamed(y, x, r0, r1, c0, c1, mu, sc, sh):  # type: ignore[no-untyped-def]
    buf = np.empty(CHUNK, dtype=x.dtype)
    pf = _prefetching(x, False, c0, c1)
    for i in range(r0, r1):
        if pf and i + MC_PREFETCH_ROWS < r1:
            _prefetch_row(x, i + MC_PREFETCH_ROWS, c0, c1)
        a = c0
        while a < c1:
            e = min(a + CHUNK, c1)
            xs = x[i, a:e]
            mv = mu[a:e]
            sv = sc[a:e]
            hv = sh[a:e]
            for c in range(e - a):
                buf[c] = (xs[c] - mv[c]) * sv[c] + hv[c]
            _stream_out(y[i], a, buf, e - a)
            a = e
    _fence()


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_affine(y, x, r0, r1, c0, c1, mu, sc, sh, stream):  # type: ignore[no-untyped-def]
    """``y = (x − mu)·sc + sh`` (per-channel vectors) over rows ``[r0, r1)``, channels
    ``[c0, c1)``; streamed through a buffer when ``stream`` (``mu`` must then have the
    channels). Without streaming, an empty ``mu`` means ``y = x·sc + sh``: inference in the
    cache, one load fewer per value (0.70-0.98 of the time measured). Each loop is a function
    of its own (see :func:`_affine_span`)."""
    if stream:
        _mc_affine_streamed(y, x, r0, r1, c0, c1, mu, sc, sh)
    elif mu.shape[0] > 0:
        _mc_affine_centered(y, x, r0, r1, c0, c1, mu, sc, sh)
    else:
        _mc_affine_scaled(y, x, r0, r1, c0, c1, sc, sh)


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_dx_plain(dx, dy, x, r0, r1, c0, c1, mean, af, bf, df):  # type: ignore[no-untyped-def]
    mv = mean[c0:c1]
    av = af[c0:c1]
    bv = bf[c0:c1]
    dv = df[c0:c1]
    for i in range(r0, r1):
        xs = x[i, c0:c1]
        gs = dy[i, c0:c1]
        os_ = dx[i, c0:c1]
        for c in range(c1 - c0):
            os_[c] = (gs[c] + (xs[c] - mv[c]) * bv[c] + dv[c]) * av[c]


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_dx_streamed(dx, dy, x, r0, r1, c0, c1, mean, af, bf, df):  # type: ignore[no-untyped-def]
    buf = np.empty(CHUNK, dtype=x.dtype)
    pf = _prefetching(x, False, c0, c1)
    for i in range(r0, r1):
        if pf and i + MC_PREFETCH_ROWS < r1:
            _prefetch_row(x, i + MC_PREFETCH_ROWS, c0, c1)
            _prefetch_row(dy, i + MC_PREFETCH_ROWS, c0, c1)
        a = c0
        while a < c1:
            e = min(a + CHUNK, c1)
            xs = x[i, a:e]
            gs = dy[i, a:e]
            mv = mean[a:e]
            av = af[a:e]
            bv = bf[a:e]
            dv = df[a:e]
            for c in range(e - a):
                buf[c] = (gs[c] + (xs[c] - mv[c]) * bv[c] + dv[c]) * av[c]
            _stream_out(dx[i], a, buf, e - a)
            a = e
    _fence()


@numba.njit(inline="always", cache=True, fastmath=_FASTMATH)
def _mc_dx(dx, dy, x, r0, r1, c0, c1, mean, af, bf, df, stream):  # type: ignore[no-untyped-def]
    """``dx = (dy + (x − mean)·B + D)·A`` (per-channel vectors) over rows ``[r0, r1)``, channels
    ``[c0, c1)``; streamed through a buffer when ``stream``."""
    if stream:
        _mc_dx_streamed(dx, dy, x, r0, r1, c0, c1, mean, af, bf, df)
    else:
        _mc_dx_plain(dx, dy, x, r0, r1, c0, c1, mean, af, bf, df)


def mc_forward_train(x, G, R, w, b, eps, nrb, ncb, tw, stream, y, mean_out, var_out, invstd_out):  # type: ignore[no-untyped-def]
    """Training forward on ``x (M, C·G·R)``, ``G`` columns per channel (1 for rows × channels;
    ``L`` for ``(N, C, L)`` with short rows seen as ``(N, C·L)``), the channels ``R`` times in a
    row: ``nrb`` row blocks × ``ncb`` tiles of ``tw`` columns.

    Each task streams its tile of rows, adding to per-column partial shifted sums (the shift:
    see _median3); the partials merge per channel; the element pass reuses the same split.
    """
    M, W = x.shape
    C = W // (G * R)
    kc = np.empty(C, dtype=x.dtype)
    for c in range(C):
        # (see _median3; every copy of a channel takes the same shift: the sums add up)
        kc[c] = _median3(x[0, c * G], x[M // 2, c * G + G // 2], x[M - 1, c * G + G - 1])
    kk = _spread(kc, G, R)
    part = np.zeros((nrb, 2, W))
    for t in prange(nrb * ncb):
        rb, r0, r1, c0, c1 = _tile(t, nrb, ncb, tw, M, W)
        _mc_shifted_sums(x, r0, r1, c0, c1, kk, part[rb, 0, c0:c1], part[rb, 1, c0:c1])
    mh, sc, sh = _finish_forward(
        _gather(part, G, R), kc, M * G * R, w, b, eps, mean_out, var_out, invstd_out, x
    )
    mh, sc, sh = _spread(mh, G, R), _spread(sc, G, R), _spread(sh, G, R)
    for t in prange(nrb * ncb):
        rb, r0, r1, c0, c1 = _tile(t, nrb, ncb, tw, M, W)
        _mc_affine(y, x, r0, r1, c0, c1, mh, sc, sh, stream)


def mc_backward(
    dy, x, G, R, mean, invstd, w, tol, nrb, ncb, tw, stream, need_dx, dx, dw_out, db_out
):  # type: ignore[no-untyped-def]
    """Backward on ``(M, C·G·R)`` (as :func:`mc_forward_train`): partial Σdy, Σdy·(x − μ),
    Σ(x − μ) per row block and column, merged per channel, then the dx pass over the same
    split."""
    M, W = x.shape
    part = np.zeros((nrb, 3, W))
    mean_w = _spread(mean, G, R)
    for t in prange(nrb * ncb):
        rb, r0, r1, c0, c1 = _tile(t, nrb, ncb, tw, M, W)
        _mc_grad_sums(
            dy, x, r0, r1, c0, c1, mean_w,
            part[rb, 0, c0:c1], part[rb, 1, c0:c1], part[rb, 2, c0:c1],
        )  # fmt: skip
    a_arr, b_arr, d_arr = _finish_backward(
        _gather(part, G, R), M * G * R, mean, invstd, w, tol, dw_out, db_out
    )
    if not need_dx:
        return
    a_arr, b_arr, d_arr = _spread(a_arr, G, R), _spread(b_arr, G, R), _spread(d_arr, G, R)
    for t in prange(nrb * ncb):
        rb, r0, r1, c0, c1 = _tile(t, nrb, ncb, tw, M, W)
        _mc_dx(dx, dy, x, r0, r1, c0, c1, mean_w, a_arr, b_arr, d_arr, stream)


def mc_forward_eval(x, G, R, p0, p1, w, b, eps, stats, nrb, ncb, tw, stream, y):  # type: ignore[no-untyped-def]
    """Inference on ``(M, C·G·R)``: one pass, y = x·scale + shift (as
    :func:`ncl_forward_eval`)."""
    scale, shift = _eval_coefs(p0, p1, w, b, eps, stats)
    scale, shift = _spread(scale, G, R), _spread(shift, G, R)
    M, W = x.shape
    # no mean to subtract: an empty one where the loop can skip it (plain stores); the
    # streaming loop, bound by memory anyway, subtracts zeros (skipping it there measured
    # 2-2.6x slower single-threaded)
    mu = np.zeros(W if stream else 0, dtype=x.dtype)
    for t in prange(nrb * ncb):
        rb, r0, r1, c0, c1 = _tile(t, nrb, ncb, tw, M, W)
        _mc_affine(y, x, r0, r1, c0, c1, mu, scale, shift, stream)


def mc_backward_eval(dy, x, G, R, mean, scale, nrb, ncb, tw, stream, need_dx, dx, sums_out):  # type: ignore[no-untyped-def]
    """Backward of inference on ``(M, C·G·R)`` in one pass (as :func:`ncl_backward_eval`):
    with ``dx`` stored normally each row of a task's tile is summed and its ``dx = dy·scale``
    written in the same sweep (:func:`_mc_eval_grad`); streamed (``stream``: asked for, also
    without ``need_dx``, so that the sums do not depend on it), each block of :data:`MC_ROWS`
    rows is summed, then its dx streamed out while the block is in the core's cache."""
    M, W = x.shape
    part = np.zeros((nrb, 3, W))
    mean_w = _spread(mean, G, R)
    scale_w = _spread(scale, G, R)
    # the streamed block loop's zero shift and mean (see mc_forward_eval); unused otherwise
    shift = np.zeros(W if stream else 0, dtype=x.dtype)
    mu = np.zeros(W if stream else 0, dtype=x.dtype)
    for t in prange(nrb * ncb):
        rb, r0, r1, c0, c1 = _tile(t, nrb, ncb, tw, M, W)
        if not stream:
            p0 = part[rb, 0, c0:c1]
            p1 = part[rb, 1, c0:c1]
            _mc_eval_grad(dy, x, r0, r1, c0, c1, mean_w, scale_w, p0, p1, need_dx, dx)
            continue
        i = r0
        while i < r1:
            e = min(i + MC_ROWS, r1)
            _mc_grad_sums(
                dy, x, i, e, c0, c1, mean_w,
                part[rb, 0, c0:c1], part[rb, 1, c0:c1], part[rb, 2, c0:c1],
            )  # fmt: skip
            if need_dx:
                _mc_affine(dx, dy, i, e, c0, c1, mu, scale_w, shift, stream)
            i = e
    sums = _gather(part, G, R)
    for c in range(W // (G * R)):
        for rb in range(nrb):
            sums_out[0, c] += sums[rb, 1, c]
            sums_out[1, c] += sums[rb, 0, c]


def inference_affine(mean, var, w, b, eps, scale_out, shift_out):  # type: ignore[no-untyped-def]
    """Algorithm 2's per-channel ``(scale, shift)`` into the outputs (see :func:`_affine_into`)."""
    _affine_into(mean, var, w, b, eps, scale_out, shift_out)


def running_update(mean, var, rm, rv, momentum, alpha, nbt):  # type: ignore[no-untyped-def]
    """Blend a batch's ``mean``/``var`` into the running buffers ``rm``/``rv`` in place, in
    float64: ``rm += momentum·(mean − rm)``, ``rv = (1 − momentum)·rv + alpha·var``, and add one
    to ``nbt[0]`` (``nbt`` empty: no counter). Returns False, changing nothing, when ``var`` is
    not finite (it is whenever ``mean`` is not: inf − inf is NaN) or a new value does not fit
    the buffers' dtype; a buffer value that is not finite already (a broken checkpoint) stays
    so, as in torch.nn, without holding back the other channels."""
    C = var.shape[0]
    for c in range(C):
        if not math.isfinite(var[c]):
            return False
    # the new values in the buffers' dtype first: a finite variance beyond that dtype's range
    # (float32 squares near its limit) must not be stored as an inf running variance
    new_m = np.empty_like(rm)
    new_v = np.empty_like(rv)
    for c in range(C):
        r = np.float64(rm[c])
        new_m[c] = r + momentum * (np.float64(mean[c]) - r)
        new_v[c] = (1.0 - momentum) * np.float64(rv[c]) + alpha * np.float64(var[c])
        if (not math.isfinite(new_m[c]) and math.isfinite(rm[c])) or (
            not math.isfinite(new_v[c]) and math.isfinite(rv[c])
        ):
            return False
    for c in range(C):
        rm[c] = new_m[c]
        rv[c] = new_v[c]
    if nbt.shape[0] > 0:
        nbt[0] += 1
    return True


# ------------------------------------------------------------------------------------------
# compiled variants, built on first use

_KERNELS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        ncl_forward_train,
        ncl_forward_train_fused,
        ncl_backward,
        ncl_backward_fused,
        ncl_forward_eval,
        ncl_backward_eval,
        mc_forward_train,
        mc_backward,
        mc_forward_eval,
        mc_backward_eval,
        inference_affine,
        running_update,
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
