"""Fused CPU kernels for batch normalization (Numba; NumPy arrays in and out, no torch).

Four entry points, on the two canonical layouts of :func:`batchnorm.functional.canonical_layout`
— ``(N, C, L)`` channels-first and ``(M, C)`` rows × channels — for float32 and float64 (rows
shorter than :data:`SHORT_ROWS` run the rows × channels loops on the view ``(N, C·L)``; an
``(N, C, H, W)`` or ``(N, C, D, H, W)`` array is taken as the ``(N, C, L)`` it is in memory,
and its outputs come back in its shape):

* :func:`forward_train` — per-channel mean and biased variance (shifted sums accumulated in
  float64) fused with ``y = γ·(x − μ)/√(σ² + ε) + β``; returns ``(y, mean, var, invstd)``,
  what the backward and the running-statistics update need;
* :func:`backward` — the per-channel reductions ``Σdy`` and ``Σdy·x̂`` fused with
  ``dx = γ·invstd/m · (m·dy − Σdy − x̂·Σdy·x̂)``; returns ``(dx, dγ, dβ)``;
* :func:`forward_eval` — inference, one pass: ``y = x·scale + shift``;
* :func:`backward_eval` — the backward of inference, one pass: ``dx = dy·γ/√(var + ε)`` with
  ``Σdy·(x − mean)`` and ``Σdy`` in the same sweep.

and two per-channel helpers: :func:`inference_affine` (``scale``, ``shift`` from population
statistics) and :func:`running_update` (the moving averages, refusing a non-finite batch).

The loops compile on first use, once per signature, and are cached on disk (``cache=True``);
importing this package compiles nothing. Work is split over Numba's threads
(``numba.get_num_threads()``) so that every thread is busy also with one channel or a handful of
rows; inputs below :data:`SERIAL_BELOW` elements run single-threaded, because starting the
threads would cost more than the work.

Example::

    >>> import numpy as np
    >>> from batchnorm import kernels, reference
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 4, 10)).astype(np.float32)
    >>> y, mean, var, invstd = kernels.forward_train(x)
    >>> bool(np.allclose(y, reference.batch_norm_forward(x)[0], atol=1e-5))
    True
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from batchnorm import _env

__all__ = [
    "forward_train",
    "backward",
    "forward_eval",
    "backward_eval",
    "inference_affine",
    "running_update",
    "SERIAL_BELOW",
    "SHORT_N_DIVISOR",
    "SHORT_ROWS",
    "LINE_BYTES",
    "STREAM_ABOVE",
    "LLC_BYTES",
    "empty_aligned",
    "num_threads",
]

#: inputs with fewer elements than this run on one thread (thread start-up dominates below)
SERIAL_BELOW = 1 << 15
#: outputs of at least this many bytes are written with non-temporal (streaming) stores: the
#: line goes to memory without being read first, and the inputs a second pass re-reads stay in
#: the cache. Smaller outputs are stored normally, so that the next layer finds them there.
STREAM_ABOVE = 4 << 20


def _llc_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The size in bytes of the last-level cache of the first CPU, from Linux's sysfs (its
    highest-level data or unified cache); 0 where it cannot be read."""
    best = (0, 0)
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return 0
    for name in names:
        if not name.startswith("index"):
            continue
        d = os.path.join(cache_dir, name)
        try:
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip().upper()
        except (OSError, ValueError):
            continue
        if kind not in ("Data", "Unified") or not size:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        try:
            n = int(size.rstrip("KMG")) * unit
        except ValueError:
            continue
        best = max(best, (level, n))
    return best[1]


#: bytes of the last-level cache (:func:`_llc_bytes`; 0: unknown). An output is stored normally,
#: however large against :data:`STREAM_ABOVE`, when the arrays its pass reads and writes fill
#: at most half of it (:func:`_stream_for`): the next call finds them in the cache
LLC_BYTES = _llc_bytes()
#: bytes of a cache line: outputs start on a line boundary, so that rows of whole lines are
#: written by streaming stores alone (NumPy's large arrays start 16 bytes into a page)
LINE_BYTES = 64

Array = NDArray[Any]

_EMPTY: dict[np.dtype[Any], Array] = {
    np.dtype(np.float32): np.empty(0, np.float32),
    np.dtype(np.float64): np.empty(0, np.float64),
}
# a given mean within this relative distance of the batch mean is taken as its rounding (backward)
_MEAN_TOL = {np.dtype(np.float32): 4.0 * 2.0**-23, np.dtype(np.float64): 4.0 * 2.0**-52}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def num_threads() -> int:
    """The number of threads the kernels split work over (Numba's setting, which
    ``numba.set_num_threads`` may change at any time)."""
    read = _NUM_THREADS.get("read")
    if read is None:
        _env.check_numba_threads()
        import numba
        from numba.np.ufunc import parallel

        numba.get_num_threads()  # starts the threading layer
        # a forked child of a process whose OpenMP layer started is terminated when it starts
        # a parallel region, whether or not this process ran one (the compiled node's entries
        # ask for the count before their first, maybe serial, call)
        _state["parallel_used"] = True
        # the layer's own reader: numba.get_num_threads() takes two locks on every call, which
        # cost ~30 us when the caches are cold after a large pass
        read = _NUM_THREADS["read"] = getattr(parallel, "_get_num_threads", numba.get_num_threads)
    return int(read())


_NUM_THREADS: dict[str, Any] = {}


_DISPATCHERS: dict[tuple[str, bool], Any] = {}
# Numba's OpenMP thread pool does not survive fork(): a child that starts a parallel region
# after its parent did is terminated. Such children (e.g. multiprocessing workers) run the
# single-threaded builds instead.
_state = {"parallel_used": False, "serial_only": False}


def _after_fork_in_child() -> None:
    _state["serial_only"] = _state["parallel_used"]


os.register_at_fork(after_in_child=_after_fork_in_child)


#: seconds a first call may take to load compiled loops before a notice on stderr says that
#: they are being compiled (each loop takes seconds; cached on disk afterwards); None: no notice
NOTICE_AFTER: float | None = 2.0


def notify(line: str) -> None:
    """Print ``line`` on stderr on a line of its own: on a terminal the line a progress bar may
    be drawing is cleared first (carriage return, erase to the end of the line), so that the
    notice does not run on from the bar's half-line; the bar draws itself again below it at
    its next update. Plain print elsewhere. (Written directly, not through tqdm's lock: the
    notice comes from a timer thread, and tqdm's lock is a multiprocessing lock.)"""
    stream = sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        tty = False
    print(("\r\x1b[K" if tty else "") + line, file=stream, flush=True)


def _compiling(what: str, how_long: str) -> threading.Timer:
    """A started timer that prints, after :data:`NOTICE_AFTER` seconds, that ``what`` is being
    compiled; cancel it once the compiled code is there."""
    where = _env.get("NUMBA_CACHE_DIR")
    line = f"batchnorm: compiling the {what} (once per machine, {how_long}; cached on disk " + (
        f"in {where})" if where and where.strip() else "next to the package)"
    )
    after = NOTICE_AFTER
    notice = threading.Timer(after or 0.0, lambda: notify(line))
    notice.daemon = True
    if after is not None:
        notice.start()
    return notice


def _announced(disp: Any, name: str, parallel: bool) -> Any:
    """``disp`` for a first call, which compiles or loads it, with a notice if that is slow."""

    def first(*args: Any) -> Any:
        threads = "multi-threaded" if parallel else "single-threaded"
        notice = _compiling(f"{threads} loop {name}", "several seconds")
        try:
            return disp(*args)
        finally:
            notice.cancel()

    return first


def _kernel(name: str, parallel: bool) -> Any:
    disp = _DISPATCHERS.get((name, parallel))
    if disp is None:
        _env.check_numba_threads()
        from batchnorm.kernels._loops import kernel  # imports Numba: only when first needed

        disp = _DISPATCHERS[(name, parallel)] = kernel(name, parallel)
    if parallel:
        _state["parallel_used"] = True
    if not disp.overloads:  # nothing compiled or loaded yet in this process
        return _announced(disp, name, parallel)
    return disp


def _threads(size: int, parallel: bool | None) -> int:
    if parallel is not None and type(parallel) is not bool:
        # (0 is not False here: it ran threaded, though parallel "forces threads on/off")
        raise TypeError(
            f"batchnorm.kernels: parallel must be True, False or None (by size), got {parallel!r}"
        )
    if parallel is False or (parallel is None and size < SERIAL_BELOW) or _state["serial_only"]:
        return 1
    T = num_threads()
    if T > 1:
        _state["parallel_used"] = True  # also for callers that run the loops through C entries
    return T


#: rows at least this long let ``(N, C, L)`` work a channel at a time (its second pass then
#: reads from the core's cache); shorter rows are walked in memory order
FUSED_ROWS = 512


def _fused(N: int, C: int, L: int, T: int) -> bool:
    """A channel per task on ``(N, C, L)``: long rows, and channels that spread evenly."""
    return L >= FUSED_ROWS and (T == 1 or C % T == 0 or C >= 8 * T)


#: rows shorter than this on ``(N, C, L)`` run the ``(M, C)`` loops on the view ``(N, C·L)``,
#: each channel's ``L`` columns side by side: long contiguous rows instead of a loop and a
#: scalar tail per few values (see :func:`_rows_view`)
SHORT_ROWS = 32
#: ... when the batch has at least L² / SHORT_N_DIVISOR samples: the view's loops pay a fixed
#: cost per column (C·L partial sums, their merge per channel, per-column copies of the channel
#: vectors), the ``(N, C, L)`` loops a cost per row of L values, so few samples of many short
#: rows go faster row by row. Forward + backward through the modules, ours/torch (two runs of
#: 41 repeats; on the view / row by row): 16×128×4×4 1.17 / 1.05, 32×128×4×4 0.87–0.94 /
#: 0.91–0.93, 64×128×4×4 0.61–0.73 / 0.79–0.80, 32×64×5×5 0.94–0.95 / 0.90–0.92,
#: 64×64×5×5 0.71–0.74 / 0.76–0.78, 64×256×5×5 0.56–0.58 / 0.41–0.54, 8×128×3×3 1.05–1.07 /
#: 1.11–1.12: the break-even near N = L²/8
SHORT_N_DIVISOR = 8


def _short(N: int, L: int) -> bool:
    """Whether ``(N, C, L)`` runs the ``(M, C)`` loops on the view ``(N, C·L)``."""
    return L < SHORT_ROWS and N * SHORT_N_DIVISOR >= L * L


#: rows of the ``(M, C)`` loops shorter than this many bytes are taken several at a time
#: (:func:`_widen`): every row costs the loops a fixed amount of work besides its values, which
#: on rows of a few channels was most of the time. Kernel calls on 65536 × 32 float32 (2
#: threads, interleaved medians of 61, caches warm): forward 0.57 → 0.33 ms, backward 0.81 →
#: 0.42, inference 0.39 → 0.21 four rows at a time. Rows of 1 KiB measured the same in the
#: cache, but with the caches flushed the backward of 100352 × 64 took 2.07–2.09 ms so
#: against 1.92–1.94 at 512 bytes or a row at a time.
WIDE_ROW_BYTES = 512
#: ... and up to this many bytes when the pass's output is stored normally (not streamed: inputs
#: under STREAM_ABOVE, rows of partial lines), where the 1 KiB slowdown above does not show.
#: Kernel calls, 2 threads, medians of 41, rows of 512 bytes / 2 KiB / 4 KiB, caches warm and
#: after a 48 MB sweep: 6272 × 128 forward 95 / 79 / 83 µs (cold 260 / 226 / 236), backward
#: 137 / 117 / 127 (380 / 318 / 331); 12544 × 64 forward 112 / 88 / 94 (281 / 233 / 263),
#: backward 151 / 126 / 143 (393 / 323 / 354); 16384 × 32 forward 82 / 67 / 71, backward
#: 110 / 96 / 103
PLAIN_WIDE_ROW_BYTES = 2048
#: ... and this many for the inference pass stored normally: with the input in memory, rows of
#: 512 bytes left the loop waiting on it. Rows of 512 bytes / 2 KiB / 4 KiB after a 48 MB sweep:
#: 6272 × 128 158 / 129 / 118 µs (hot 48 / 52 / 49), 12544 × 64 177 / 134 / 123 (58 / 54 / 51),
#: 4096 × 64 89 / 78 / 80. Streamed outputs keep WIDE_ROW_BYTES (4 KiB there: 100352 × 64 cold
#: 606 / 601, 8192 × 256 205 / 262, 12544 × 256 300 / 330)
EVAL_WIDE_ROW_BYTES = 4096
#: ... as long as at least this many of the longer rows remain
WIDE_MIN_ROWS = 64


def _widen(M: int, W: int, itemsize: int, stream: bool = True, inference: bool = False) -> int:
    """``R``: how many consecutive rows of a rows × columns view ``(M, W)`` the ``(M, C)``
    loops take as one row of ``R·W`` columns (the per-channel vectors repeated ``R`` times) —
    the largest power of two with ``R·W·itemsize`` within :data:`WIDE_ROW_BYTES` (a streamed
    output; also the view on which streaming is decided), :data:`PLAIN_WIDE_ROW_BYTES` (an
    output stored normally) or :data:`EVAL_WIDE_ROW_BYTES` (the same in an ``inference`` pass)
    that divides ``M`` and leaves at least :data:`WIDE_MIN_ROWS` rows; 1 for rows long enough."""
    limit = WIDE_ROW_BYTES
    if not stream:
        limit = EVAL_WIDE_ROW_BYTES if inference else PLAIN_WIDE_ROW_BYTES
    R = 1
    while 2 * R * W * itemsize <= limit and M % (2 * R) == 0 and M // (2 * R) >= WIDE_MIN_ROWS:
        R *= 2
    return R


def _rows_view(
    x: Array, T: int, stream: bool = True, inference: bool = False
) -> tuple[Array, int, int, tuple[int, int, int]] | None:
    """``(view, G, R, split)``: the rows × columns view the ``(M, C)`` loops take, with ``G``
    columns per channel — ``x`` itself and 1 for a 2-D input, ``(N, C·L)`` and ``L`` for
    ``(N, C, L)`` with short rows — and ``R`` of its rows taken as one (:func:`_widen`, for a
    pass whose output is streamed or not, inference or not), and its work split over ``T``
    threads (:func:`_mc_split`); None for long rows (the ``(N, C, L)`` loops)."""
    if x.ndim == 2:
        x2, G = x, 1
    elif _short(x.shape[0], x.shape[2]):
        N, C, L = x.shape
        x2, G = x.reshape(N, C * L), L
    else:
        return None
    M, W = x2.shape
    R = _widen(M, W, x.itemsize, stream, inference)
    if R > 1:
        x2 = x2.reshape(M // R, R * W)
    return x2, G, R, _mc_split(x2.shape[0], x2.shape[1], T, x.itemsize)


def _whole_rows(L: int) -> bool:
    """Pieces of whole rows on ``(N, C, L)`` for short rows: the row loop then knows each row's
    bounds (no partial rows at the cuts; a thread gets at most one row more than another)."""
    return L < FUSED_ROWS


def _stream(x: Array, stream: bool | None, out: Array | None = None, *, tensors: int = 0) -> bool:
    """Streaming stores for the output like ``x``: big outputs written in long runs, unless the
    cache may keep the output of the ``(M, C)`` loops: ``tensors`` is the number of arrays of
    x's size the pass reads and writes (2 for a forward pass, 3 for a backward; 0: streamed by
    size alone; see :func:`_stream_for`). Short
    rows that do not fill whole 64-byte lines interleave too many partial lines for the
    write-combining buffers; on ``(M, C)`` a thread's block of rows is one run when each row
    is whole lines and the output ``out`` starts on a line (as :func:`empty_aligned` and
    torch's allocations do; ``None``: assumed to). Rows of whole lines in an output that
    starts off a line — ``np.empty_like`` of a large array starts 16 bytes into one — are
    each a partial line at both ends, and streamed they took 2.6–3.6× the time of plain
    stores (100352 × 64 float32)."""
    if stream is not None:
        return bool(stream)
    aligned = out is None or _address(out) % LINE_BYTES == 0
    rows = _rows_view(x, 1)  # the rows the loops run on: (N, C·L), R rows as one, ...
    if rows is None:  # channels-first long rows: by size (see _stream_for)
        return _stream_for(x.nbytes, x.shape[2], 3, x.itemsize, aligned)
    return _stream_for(x.nbytes, rows[0].shape[1], 2, x.itemsize, aligned, tensors)


def _stream_for(
    nbytes: int, run: int, ndim: int, itemsize: int, aligned: bool, tensors: int = 0
) -> bool:
    """:func:`_stream`'s choice from the sizes: ``run`` is the last axis (the row length of
    ``(N, C, L)``, the channels of ``(M, C)``); ``aligned``: the output starts on a line;
    ``tensors``: the pass's arrays of this size, whose output is stored normally while they
    fill at most half of the last-level cache (:data:`LLC_BYTES`): the next call, and the next
    layer, find it there, where a streamed output has gone to memory. Through the modules, one
    process alternating the choices with torch's module (medians of 96, 32 MiB L3), rows ×
    channels of 4–8 MiB: forward 0.67–0.91 and inference 0.62–0.89 of the streamed time, the
    backward at 4 MiB 0.91–0.98 (forward + backward) and the inference backward 0.83–0.86;
    the ``cnn@cl`` network's training step 23.9 → 21.0 ms (medians of six runs). Not kept:
    forward outputs of 11–12.8 MB (mixed at 11–11.5 MB, 0.88–1.08; 1.05–1.11 in every pass at
    12.8 MB), the backward's dx at 8 MiB (1.01–1.10: its second pass re-reads x and dy), and
    channels-first long rows (callers pass no ``tensors``): their inference at 8 MiB measured
    0.58–0.80 alone, but the ``cnn`` network's inference, whose first BN output is such, went
    19.5 → 20.6 ms (the same in two earlier rounds; checked again, the suite's 8 MiB inference
    1.69–1.72 → 1.14–1.23 of torch's time while ``cnn``'s ours/torch went 1.07 → 1.10: the
    output's buffer is cold in a network, so a plain store first reads each line in), and the
    fused training loops, which re-read a channel from the core's own cache, were slower
    stored normally (y at 8 MiB 1.05–1.13, dx at 4 MiB 1.01–1.06)."""
    if nbytes < STREAM_ABOVE or 0 < 2 * tensors * nbytes <= LLC_BYTES:
        return False
    return run >= FUSED_ROWS or (ndim == 2 and aligned and (run * itemsize) % LINE_BYTES == 0)


#: bytes of a channel tile on ``(M, C)``: a task's block sums stay in the core's cache
TILE_BYTES = 8192


def _mc_split(M: int, C: int, T: int, itemsize: int) -> tuple[int, int, int]:
    """Row blocks × channel tiles on ``(M, C)``: ``(nrb, ncb, tile width)``. One row block per
    thread when there are rows enough (each thread then re-reads the rows it summed); for tiny
    batches the tiles are narrowed so that every thread gets some."""
    tw = TILE_BYTES // itemsize
    nrb = 1
    if T > 1 and M >= 4 * T:
        nrb = T
    elif T > 1:
        tw = min(tw, max(16, (-(-C // T) + 15) // 16 * 16))
    return nrb, -(-C // tw), tw


def _scalar(value: Any, what: str) -> float:
    """A number argument (``eps``, ``alpha``) as a float, or a ``TypeError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"batchnorm.kernels: {what} must be a number, got {value!r}")
    return float(value)


def _eps(value: Any) -> float:
    """``eps`` as a float: a number (:func:`_scalar`), finite and >= 0 — a negative one made
    √(var + ε) NaN wherever the variance is below |ε|, silently — else a ``ValueError``."""
    eps = _scalar(value, "eps")
    if not 0.0 <= eps < math.inf:
        raise ValueError(
            f"batchnorm.kernels: eps must be a finite number >= 0 (it is added to the "
            f"variance), got {value!r}"
        )
    return eps


def _as_input(x: Array, what: str) -> tuple[Array, tuple[int, ...]]:
    """``(array, shape)``: ``x`` C-contiguous as the loops take it — ``(M, C)``, ``(N, C, L)``,
    or ``(N, C, d1, d2, ...)`` viewed as ``(N, C, d1·d2·...)`` — and ``x``'s own shape, which
    the outputs get back."""
    if isinstance(x, np.ma.MaskedArray):
        # the loops read the data under the mask: every value, masked or not
        raise TypeError(
            f"batchnorm.kernels: {what} is a masked array, whose mask the kernels cannot honour; "
            "pass x.filled(...) or np.asarray(x) for every value, or use batchnorm.BatchNorm's "
            "forward(x, mask=...) for statistics over the valid positions only"
        )
    if isinstance(x, np.ndarray) and x.dtype.kind == "f" and not x.dtype.isnative:
        raise TypeError(
            f"batchnorm.kernels: {what} has the non-native byte order {x.dtype.str}; convert it "
            f"first, e.g. x.astype(np.{x.dtype.newbyteorder('=').name})"
        )
    if not isinstance(x, np.ndarray) or x.dtype not in _FLOATS or x.ndim < 2:
        raise TypeError(
            f"batchnorm.kernels: {what} must be a float32/float64 NumPy array of shape (M, C) or "
            f"(N, C, ...), got {type(x).__name__} "
            f"{getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}"
        )
    shape = tuple(x.shape)
    # a copy, once, rather than reading through foreign strides
    x = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    if x.ndim > 3:
        x = x.reshape(shape[0], shape[1], math.prod(shape[2:]))
    return x, shape


def _shaped(y: Array, out: Array | None, shape: tuple[int, ...]) -> Array:
    """An output computed in the loops' shape, handed back in the input's (``out`` itself when
    it was given)."""
    if out is not None:
        return out
    return y if y.shape == shape else y.reshape(shape)


def _check_sizes(x: Array, what: str = "x", shape: tuple[int, ...] | None = None) -> None:
    """Refuse an input with no channels or no values per channel (nothing to take statistics
    over), before anything is compiled; ``shape``: the input's own, for the message."""
    shape = x.shape if shape is None else shape
    if x.shape[1] == 0:
        raise ValueError(
            f"batchnorm.kernels: {what} of shape {shape} has no channels (C = 0 at axis 1)"
        )
    if x.size == 0:
        raise ValueError(f"batchnorm.kernels: {what} of shape {shape} has no values per channel")


def _check_writeable(a: Array, what: str) -> None:
    if not a.flags.writeable:
        raise ValueError(
            f"batchnorm.kernels: {what} is read-only (flags.writeable is False) and cannot be "
            "written in place; pass a writeable array, e.g. a copy"
        )


def _channel_vec(
    v: Array | None, C: int, dtype: np.dtype[Any], what: str, optional: bool = False
) -> Array:
    """``v`` as a contiguous ``(C,)`` array of ``dtype``; None only where ``optional`` (γ, β:
    an empty array, which the loops read as absent — a required vector given as None would be
    read past its end)."""
    if v is None:
        if not optional:
            raise TypeError(f"batchnorm.kernels: {what} is required (a ({C},) array), got None")
        return _EMPTY[dtype]
    try:
        a = np.asarray(v, dtype=dtype)  # not ascontiguousarray: it would make a 0-d array 1-D
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"batchnorm.kernels: {what} must be a ({C},) array of numbers, got "
            f"{type(v).__name__} ({e})"
        ) from None
    if a.shape != (C,):
        raise ValueError(f"batchnorm.kernels: {what} must have shape ({C},), got {a.shape}")
    return np.ascontiguousarray(a)


def empty_aligned(shape: tuple[int, ...], dtype: Any) -> Array:
    """An uninitialized C-contiguous array whose first element starts a 64-byte cache line."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if any(int(d) < 0 for d in dims):
        raise ValueError(
            f"batchnorm.kernels.empty_aligned: negative dimensions are not allowed, got {dims}"
        )
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(nbytes + LINE_BYTES, np.uint8)
    start = -_address(raw) % LINE_BYTES
    return raw[start : start + nbytes].view(dt).reshape(shape)


def _out(
    out: Array | None,
    like: Array,
    reads: dict[str, Array] | None = None,
    shape: tuple[int, ...] | None = None,
) -> Array:
    """The output array in ``like``'s shape: ``out`` checked against the input's ``shape``
    (default ``like``'s) and viewed so, or a fresh line-aligned one. ``reads`` names the
    arrays the call reads (``like`` among them): ``out`` may be one of them exactly — each
    value is read before its own place is written — but not overlap one in part, where a
    value would be overwritten before it is read."""
    if out is None:
        return empty_aligned(like.shape, like.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"batchnorm.kernels: out must be a NumPy array or None, got {type(out).__name__}"
        )
    shape = like.shape if shape is None else shape
    if out.shape != shape or out.dtype != like.dtype or not out.flags.c_contiguous:
        layout = "" if out.flags.c_contiguous else f", not C-contiguous (strides {out.strides})"
        raise ValueError(
            f"batchnorm.kernels: out must be a C-contiguous {like.dtype} array of shape "
            f"{shape}, got {out.dtype} {out.shape}{layout}; pass "
            "batchnorm.kernels.empty_aligned(shape, dtype), or None for a fresh output"
        )
    if not out.flags.aligned:  # (the streaming stores fault on a misaligned address)
        raise ValueError(
            f"batchnorm.kernels: out must start at a multiple of its item size "
            f"({like.dtype.itemsize} bytes), got address {_address(out)}; pass "
            "batchnorm.kernels.empty_aligned(shape, dtype), or None for a fresh output"
        )
    _check_writeable(out, "out")
    out = out.reshape(like.shape)  # a view: out is C-contiguous
    for name, a in (reads or {}).items():
        if _overlaps_in_part(out, a):
            raise ValueError(
                f"batchnorm.kernels: out overlaps {name} ({a.dtype} {a.shape}) in part, so "
                f"values of {name} would be overwritten before they are read; pass {name} "
                "itself as out (in place) or an array of its own"
            )
    return out


def _unused_dx(x: Array) -> Array:
    """The dx buffer the loops take when ``need_dx`` is False (never written): ``x`` itself, or
    for a read-only ``x``, which Numba cannot type as one, an unfilled array of its shape whose
    pages are never touched."""
    return x if x.flags.writeable else np.empty_like(x)


def _overlaps_in_part(out: Array, a: Array) -> bool:
    """Whether ``out`` shares memory with ``a`` other than as the same C-contiguous array of
    the same size (both are C-contiguous or 1-D here, so NumPy's bounds test is exact)."""
    if not np.may_share_memory(out, a):
        return False
    same = a.flags.c_contiguous and a.nbytes == out.nbytes
    return not (same and _address(a) == _address(out))


def _address(a: Array) -> int:
    return int(a.__array_interface__["data"][0])


_F = TypeVar("_F", bound=Callable[..., Any])
_PREFIX = "batchnorm.kernels: "


def _named(fn: _F) -> _F:
    """``fn`` with its argument errors naming it: the checks it shares with the other entry
    points say ``batchnorm.kernels:``, which becomes ``batchnorm.kernels.<fn>:``."""
    where = f"batchnorm.kernels.{fn.__name__}: "

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError) as e:
            if e.args and isinstance(e.args[0], str) and e.args[0].startswith(_PREFIX):
                e.args = (where + e.args[0][len(_PREFIX) :], *e.args[1:])
            raise

    return checked  # type: ignore[return-value]


@_named
def forward_train(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    *,
    out: Array | None = None,
    parallel: bool | None = None,
    stream: bool | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Algorithm 1 (Ioffe & Szegedy 2015) on ``x`` of shape ``(M, C)`` or ``(N, C, ...)``
    (``(N, C, H, W)`` is taken as the ``(N, C, H·W)`` it is in memory).

    Returns ``(y, mean, var, invstd)``: ``y`` like ``x``; the per-channel mean, biased variance
    and ``1/√(var + ε)`` in ``x``'s dtype. ``weight``/``bias`` (γ/β, shape ``(C,)``) may be None.
    ``out`` receives ``y`` if given; ``parallel`` forces threads on/off and ``stream``
    non-temporal stores of the output on/off (None: by size, see :data:`STREAM_ABOVE`).
    """
    x, shape = _as_input(x, "x")
    _check_sizes(x, shape=shape)
    C = x.shape[1]
    w = _channel_vec(weight, C, x.dtype, "weight", optional=True)
    b = _channel_vec(bias, C, x.dtype, "bias", optional=True)
    y = _out(out, x, {"x": x, "weight": w, "bias": b}, shape)
    T = _threads(x.size, parallel)
    s = _stream(x, stream, y, tensors=2)
    _, mean, var, invstd = _forward_train(x, w, b, _eps(eps), y, T, s)
    return _shaped(y, out, shape), mean, var, invstd


def _forward_train(
    x: Array, w: Array, b: Array, eps: float, y: Array, T: int, stream: bool = False
) -> tuple[Array, Array, Array, Array]:
    """:func:`forward_train` on checked arrays (``w``/``b`` empty when absent)."""
    C = x.shape[1]
    mean = np.empty(C, x.dtype)
    var = np.empty(C, x.dtype)
    invstd = np.empty(C, x.dtype)
    par = T > 1
    rows = _rows_view(x, T, stream)
    if rows is not None:
        x2, G, R, split = rows
        y2 = y.reshape(x2.shape)
        args = (x2, G, R, w, b, eps, *split, stream, y2, mean, var, invstd)
        _kernel("mc_forward_train", par)(*args)
    elif _fused(x.shape[0], C, x.shape[2], T):
        _kernel("ncl_forward_train_fused", par)(x, w, b, eps, stream, y, mean, var, invstd)
    else:
        whole = _whole_rows(x.shape[2])
        _kernel("ncl_forward_train", par)(x, w, b, eps, T, whole, stream, y, mean, var, invstd)
    return y, mean, var, invstd


def _grad_inputs(dy: Array, x: Array, empty: bool = False) -> tuple[Array, Array, tuple[int, ...]]:
    """``dy`` and ``x`` checked and made C-contiguous in the loops' shape (the same shape and
    dtype, sizes the kernels take; ``empty``: a batch of no values too), and ``x``'s own
    shape."""
    x, shape = _as_input(x, "x")
    dy, dy_shape = _as_input(dy, "dy")
    if dy_shape != shape or dy.dtype != x.dtype:
        raise ValueError(
            f"batchnorm.kernels: dy ({dy.dtype} {dy_shape}) must match x ({x.dtype} {shape})"
        )
    if not (empty and x.size == 0 and x.shape[1] > 0):
        _check_sizes(x, shape=shape)
    return dy, x, shape


@_named
def backward(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    weight: Array | None = None,
    *,
    need_dx: bool = True,
    out: Array | None = None,
    parallel: bool | None = None,
    stream: bool | None = None,
) -> tuple[Array | None, Array, Array]:
    """Gradients of Algorithm 1 given the forward's ``mean`` and ``invstd``.

    ``dγ = Σ dy·x̂``, ``dβ = Σ dy`` and ``dx = γ·invstd/m · (m·dy − dβ − x̂·dγ)`` with
    ``x̂ = (x − mean)·invstd`` and m the values per channel. Returns ``(dx, dγ, dβ)`` (``dx`` is
    None when ``need_dx`` is False: the reductions alone, one pass). ``out``, ``parallel`` and
    ``stream`` as in :func:`forward_train`.
    """
    dy, x, shape = _grad_inputs(dy, x)
    C = x.shape[1]
    mean = _channel_vec(mean, C, x.dtype, "mean")
    invstd = _channel_vec(invstd, C, x.dtype, "invstd")
    w = _channel_vec(weight, C, x.dtype, "weight", optional=True)
    reads = {"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": w}
    if out is not None and not need_dx:
        raise ValueError(
            "batchnorm.kernels: out= receives dx, which need_dx=False does not compute; "
            "pass one or the other"
        )
    dx = _out(out, x, reads, shape) if need_dx else None
    T = _threads(x.size, parallel)
    _, dw, db = _backward(dy, x, mean, invstd, w, dx, T, _stream(x, stream, dx, tensors=3))
    return (None if dx is None else _shaped(dx, out, shape)), dw, db


def _backward(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    w: Array,
    dx: Array | None,
    T: int,
    stream: bool = False,
) -> tuple[Array | None, Array, Array]:
    """:func:`backward` on checked arrays; ``dx`` None skips the element pass."""
    C = x.shape[1]
    dw = np.empty(C, x.dtype)
    db = np.empty(C, x.dtype)
    need_dx = dx is not None
    buf = dx if dx is not None else _unused_dx(x)
    par = T > 1
    tol = _MEAN_TOL[x.dtype]
    rows = _rows_view(x, T, stream)
    if rows is not None:
        x2, G, R, split = rows
        outs2 = (stream, need_dx, buf.reshape(x2.shape), dw, db)
        dy2 = dy.reshape(x2.shape)
        _kernel("mc_backward", par)(dy2, x2, G, R, mean, invstd, w, tol, *split, *outs2)
        return dx, dw, db
    outs: tuple[Any, ...] = (stream, need_dx, buf, dw, db)
    if _fused(x.shape[0], C, x.shape[2], T):
        _kernel("ncl_backward_fused", par)(dy, x, mean, invstd, w, tol, *outs)
    else:
        whole = _whole_rows(x.shape[2])
        _kernel("ncl_backward", par)(dy, x, mean, invstd, w, tol, T, whole, *outs)
    return dx, dw, db


@_named
def forward_eval(
    x: Array,
    scale: Array,
    shift: Array,
    *,
    out: Array | None = None,
    parallel: bool | None = None,
    stream: bool | None = None,
) -> Array:
    """Batch normalization at inference (Algorithm 2): ``y = x·scale + shift`` per channel, with
    ``scale = γ/√(Var[x] + ε)`` and ``shift = β − scale·E[x]`` (see
    :func:`batchnorm.reference.inference_affine`). One read of x, one write of y."""
    x, shape = _as_input(x, "x")
    C = x.shape[1]
    sc = _channel_vec(scale, C, x.dtype, "scale")
    sh = _channel_vec(shift, C, x.dtype, "shift")
    T = _threads(x.size, parallel)
    E = _EMPTY[x.dtype]
    y = _out(out, x, {"x": x, "scale": sc, "shift": sh}, shape)
    if x.size:  # (an empty batch, or no channels: nothing to compute, as for every shape)
        _eval(x, sc, sh, E, E, 0.0, False, y, T, _stream(x, stream, y, tensors=2))
    return _shaped(y, out, shape)


def _forward_eval_stats(
    x: Array,
    mean: Array,
    var: Array,
    w: Array,
    b: Array,
    eps: float,
    y: Array,
    T: int,
    stream: bool = False,
) -> Array:
    """Inference from the population statistics (vectors of x's dtype; ``w``/``b`` empty when
    absent): :func:`inference_affine` and :func:`forward_eval` in one compiled call."""
    return _eval(x, mean, var, w, b, eps, True, y, T, stream)


def _eval(
    x: Array,
    p0: Array,
    p1: Array,
    w: Array,
    b: Array,
    eps: float,
    stats: bool,
    y: Array,
    T: int,
    stream: bool,
) -> Array:
    rows = _rows_view(x, T, stream, inference=True)
    if rows is None:
        whole = _whole_rows(x.shape[2])
        _kernel("ncl_forward_eval", T > 1)(x, p0, p1, w, b, eps, stats, T, whole, stream, y)
    else:
        x2, G, R, split = rows
        y2 = y.reshape(x2.shape)
        args = (x2, G, R, p0, p1, w, b, eps, stats, *split, stream, y2)
        _kernel("mc_forward_eval", T > 1)(*args)
    return y


@_named
def backward_eval(
    dy: Array,
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None = None,
    eps: float = 1e-5,
    *,
    need_dx: bool = True,
    out: Array | None = None,
    parallel: bool | None = None,
    stream: bool | None = None,
) -> tuple[Array | None, Array, Array]:
    """Gradients of inference (Algorithm 2) with the population ``mean`` and ``var``:
    ``dx = dy·γ/√(var + ε)`` and, per channel, ``Σ dy·(x − mean)`` and ``Σ dy`` in float64 (so
    ``dγ = Σ dy·(x − mean)/√(var + ε)``, ``dβ = Σ dy``). One pass: dx needs no sum, so each
    stretch is summed and written while it is in the cache. Returns ``(dx, Σdy·(x − mean),
    Σdy)`` (``dx`` None when ``need_dx`` is False); ``out``, ``parallel`` and ``stream`` as in
    :func:`forward_train`."""
    # inference takes no batch statistics: an empty batch has an empty dx and zero sums, as
    # its forward (forward_eval) has an empty output
    dy, x, shape = _grad_inputs(dy, x, empty=True)
    C = x.shape[1]
    m = _channel_vec(mean, C, x.dtype, "mean")
    v = _channel_vec(var, C, x.dtype, "var")
    w = _channel_vec(weight, C, x.dtype, "weight", optional=True)
    eps = _eps(eps)
    if x.size == 0:
        dx0 = _out(out, x, None, shape) if need_dx else None
        zeros = np.zeros(C, np.float64)
        return (None if dx0 is None else _shaped(dx0, out, shape)), zeros, zeros.copy()
    reads = {"dy": dy, "x": x, "mean": m, "var": v, "weight": w}
    if out is not None and not need_dx:
        raise ValueError(
            "batchnorm.kernels: out= receives dx, which need_dx=False does not compute; "
            "pass one or the other"
        )
    dx = _out(out, x, reads, shape) if need_dx else None
    T = _threads(x.size, parallel)
    s = _stream(x, stream, dx, tensors=3)
    _, s1, s0 = _backward_eval(dy, x, m, v, w, eps, dx, T, s)
    return (None if dx is None else _shaped(dx, out, shape)), s1, s0


def _backward_eval(
    dy: Array,
    x: Array,
    mean: Array,
    var: Array,
    w: Array,
    eps: float,
    dx: Array | None,
    T: int,
    stream: bool = False,
) -> tuple[Array | None, Array, Array]:
    """:func:`backward_eval` on checked arrays; ``dx`` None skips writing it."""
    C = x.shape[1]
    scale = np.empty(C, x.dtype)
    shift = np.empty(C, x.dtype)
    _kernel("inference_affine", False)(mean, var, w, _EMPTY[x.dtype], eps, scale, shift)
    sums = np.zeros((2, C))
    need_dx = dx is not None
    buf = dx if dx is not None else _unused_dx(x)
    par = T > 1
    # streaming as asked for, also without dx: the loops' sums then do not depend on need_dx
    rows = _rows_view(x, T, stream)
    if rows is not None:
        x2, G, R, split = rows
        _kernel("mc_backward_eval", par)(
            dy.reshape(x2.shape), x2, G, R, mean, scale, *split, stream, need_dx,
            buf.reshape(x2.shape), sums,
        )  # fmt: skip
    else:
        whole = _whole_rows(x.shape[2])
        _kernel("ncl_backward_eval", par)(dy, x, mean, scale, T, whole, stream, need_dx, buf, sums)
    return dx, sums[0], sums[1]


@_named
def inference_affine(
    mean: Array,
    var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
) -> tuple[Array, Array]:
    """The per-channel ``(scale, shift)`` of :func:`forward_eval` from population statistics:
    ``scale = γ/√(var + ε)``, ``shift = β − scale·mean``, computed in float64 and returned in
    ``mean``'s dtype (float32 or float64)."""
    m = np.asarray(mean)  # not ascontiguousarray: it would make a 0-d array 1-D
    if m.dtype not in _FLOATS or m.ndim != 1:
        raise TypeError(
            f"batchnorm.kernels: mean must be a 1-D float32/float64 array, got {m.dtype} {m.shape}"
        )
    m = np.ascontiguousarray(m)
    C = m.shape[0]
    v = _channel_vec(var, C, m.dtype, "var")
    w = _channel_vec(weight, C, m.dtype, "weight", optional=True)
    b = _channel_vec(bias, C, m.dtype, "bias", optional=True)
    scale = np.empty_like(m)
    shift = np.empty_like(m)
    _kernel("inference_affine", False)(m, v, w, b, _eps(eps), scale, shift)
    return scale, shift


_NO_COUNTER = np.empty(0, np.int64)


@_named
def running_update(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    momentum: float,
    alpha: float | None = None,
    num_batches_tracked: Array | None = None,
) -> bool:
    """Blend a batch's statistics into running buffers, in place, in PyTorch's convention:
    ``running_mean += momentum·(mean − running_mean)`` and
    ``running_var = (1 − momentum)·running_var + alpha·var`` (computed in float64). ``alpha``
    is the weight of the batch variance: ``momentum·m/(m − 1)`` stores the unbiased variance of
    a batch of m values per channel, ``momentum`` (the default) the biased one.
    ``num_batches_tracked`` (int64, one element), if given, is incremented.

    Returns False and changes nothing when ``var`` is not finite or a new value does not fit
    the buffers' dtype — a non-finite value never reaches the running statistics.
    """
    rm, rv = running_mean, running_var
    for name, a in (("running_mean", rm), ("running_var", rv)):
        if not isinstance(a, np.ndarray) or a.dtype not in _FLOATS or not a.flags.c_contiguous:
            raise TypeError(
                f"batchnorm.kernels: {name} must be a contiguous float32/float64 array updated in "
                f"place, got {type(a).__name__} {getattr(a, 'dtype', '')}"
            )
        _check_writeable(a, name)
    C = rm.shape[0] if rm.ndim == 1 else -1
    if rm.shape != (C,) or rv.shape != (C,):
        raise ValueError(
            f"batchnorm.kernels: running_mean {rm.shape} and running_var {rv.shape} must both "
            "have shape (C,)"
        )
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.number)):
        raise TypeError(
            f"batchnorm.kernels: momentum must be a number, got {momentum!r}; "
            "for torch's momentum=None (a cumulative average) pass 1/(n + 1) for the n-th batch "
            "counted from 0"
        )
    m = _channel_vec(mean, C, np.dtype(np.float64), "mean")
    v = _channel_vec(var, C, np.dtype(np.float64), "var")
    # each buffer is written while the others are read, channel by channel (the statistics as
    # given: float32 ones are read through float64 copies, but the call is the same mistake)
    for (na, a), (nb, b) in (
        (("running_mean", rm), ("running_var", rv)),
        (("running_mean", rm), ("var", v)),
        (("running_var", rv), ("mean", m)),
        (("running_mean", rm), ("var", var)),
        (("running_var", rv), ("mean", mean)),
    ):
        if isinstance(b, np.ndarray) and np.may_share_memory(a, b):
            raise ValueError(
                f"batchnorm.kernels: {na} and {nb} share memory, so one would be read after the "
                f"other was written; pass arrays of their own (e.g. {nb}.copy())"
            )
    nbt = _NO_COUNTER
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, np.ndarray):
            raise TypeError(
                "batchnorm.kernels: num_batches_tracked must be a one-element int64 NumPy array "
                "(it is incremented in place), got "
                f"{type(num_batches_tracked).__name__}; e.g. np.zeros((), np.int64)"
            )
        if num_batches_tracked.dtype != np.int64 or num_batches_tracked.size != 1:
            raise ValueError(
                "batchnorm.kernels: num_batches_tracked must be one int64 value, got "
                f"{num_batches_tracked.dtype} of shape {num_batches_tracked.shape}; e.g. "
                "np.zeros((), np.int64)"
            )
        _check_writeable(num_batches_tracked, "num_batches_tracked")
        nbt = num_batches_tracked.reshape(1)
    weight = momentum if alpha is None else _scalar(alpha, "alpha")
    return _running_update(rm, rv, m, v, float(momentum), float(weight), nbt)


def _running_update(
    rm: Array, rv: Array, mean: Array, var: Array, momentum: float, alpha: float, nbt: Array
) -> bool:
    """:func:`running_update` on checked arrays (``nbt`` empty: no counter)."""
    return bool(_kernel("running_update", False)(mean, var, rm, rv, momentum, alpha, nbt))
