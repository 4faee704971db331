"""The compiled autograd node of the ``"numba"`` backend.

At the paper's (60, 100) batch the kernels take a few microseconds; the rest of a training
step is the path around them — the Python ``autograd.Function`` and its Python backward, the
NumPy views of every tensor, the checks and the canonical view. On large inputs that path
costs 100–200 µs when the caches are cold after a large pass, about what torch's own layer
spends in all. This module runs the training step (statistics, output, running update,
graph), its backward, inference, and inference with gradients (eval mode in a graph) in C++
(``native.cpp``, built with
``torch.utils.cpp_extension`` on first use and cached by torch), taking the input in any
layout that :func:`batchnorm.functional.canonical_layout` views without a copy and calling
the same Numba loops, single- or multi-threaded, through C entries
(:mod:`batchnorm.kernels._entries`). Large outputs are reused from a cache of its own once
dropped, as the Function path's are. A graph of the backward (``create_graph=True``) is
recomputed in Python with torch operations, as the ``autograd.Function`` does. Half-precision
inputs (the ``"aten"`` backend) go through the same calls to torch's own operator, which
autograd records, with the running update in C++ (the Python path around that operator cost
more than the operator itself at small sizes).

It is used automatically when it builds (a C++ compiler and ``ninja`` are needed, once per
machine); ``BATCHNORM_NATIVE=0`` turns it off (the ``autograd.Function`` path then serves
every call), and a failed build falls back to that path with one warning. :func:`load`
builds it now, e.g. before timing; its kernel entries are compiled as the first calls need
them, or all at once by ``batchnorm compile`` (:func:`compile_entries`, and
:func:`compile_loops` for the Function path).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchnorm import _env
from batchnorm._console import say

__all__ = [
    "load",
    "loaded",
    "enabled",
    "compile_entries",
    "compile_loops",
    "output_cache_budget",
    "set_output_cache_budget",
    "release_output_caches",
]

_SOURCE = Path(__file__).with_name("native.cpp")
#: the compiler's flags; no contraction into fused multiply-adds: the running blend of half
#: inputs rounds as NumPy's does (see native.cpp's blend)
_CFLAGS = ("-O2", "-ffp-contract=off")


def _name() -> str:
    """The extension's name in torch's build cache (``~/.cache/torch_extensions``), which is
    keyed by name alone: one per source file, its contents and the flags it is built with, so
    that two checkouts or versions do not rebuild each other's build, silently, at every first
    call, and a change of flags is built anew."""
    import hashlib

    h = hashlib.sha256(str(_SOURCE.resolve()).encode())
    h.update(_SOURCE.read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    return f"batchnorm_native_{h.hexdigest()[:12]}"


_state: dict[str, Any] = {"ext": None, "tried": False, "budget": None}


def enabled() -> bool:
    """Whether the node may be used: ``BATCHNORM_NATIVE`` is not ``0``/``false``/``no``/``off``
    (trimmed, any case; read at every call, like ``BATCHNORM_BACKEND``); a value that is none
    of those nor ``1``/``true``/``yes``/``on`` is a :class:`ValueError` naming it."""
    return _env.switch("BATCHNORM_NATIVE")


def loaded() -> Any | None:
    """The extension if it is already built and loaded and not turned off, else None (never
    builds: :func:`load` does)."""
    return _state["ext"] if enabled() else None


def _built(cpp_extension: Any, name: str) -> bool:
    """Whether torch's extension cache already holds a build (then loading takes a second)."""
    try:
        where = Path(cpp_extension._get_build_directory(name, False))
    except Exception:
        return False
    return (where / f"{name}.so").exists()


#: seconds after which a build lock in torch's extension cache is taken for one that a killed
#: build left behind (a build takes about a minute)
STALE_LOCK_AFTER = 300.0


def _stale_lock(cpp_extension: Any, name: str) -> Path | None:
    """The lock file of torch's extension cache for this build if it is older than
    :data:`STALE_LOCK_AFTER`: torch waits for that file without limit, and a build killed by
    SIGKILL, SIGTERM or the out-of-memory killer never removes it. A younger lock, another
    process's build under way, is waited for until it goes (then None) or grows old."""
    try:
        lock = Path(cpp_extension._get_build_directory(name, False)) / "lock"
    except Exception:
        return None
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return None  # no lock: no build under way
        if age > STALE_LOCK_AFTER:
            return lock
        time.sleep(0.5)


def load() -> Any | None:
    """The built extension (building it on the first call), or None when it is turned off or
    cannot be built (then with one warning that says why)."""
    if not enabled():
        return None
    if _state["tried"]:
        return _state["ext"]
    budget = output_cache_budget()  # (a refused $BATCHNORM_OUTPUT_CACHE_MB is no build failure)
    _state["tried"] = True
    try:
        from torch.utils import cpp_extension

        from batchnorm import functional
        from batchnorm.kernels import _entries

        name = _name()
        if not _built(cpp_extension, name):
            from batchnorm.kernels import notify

            stale = _stale_lock(cpp_extension, name)
            if stale is not None:
                raise RuntimeError(
                    f"a build lock older than {STALE_LOCK_AFTER:g} s is left in {stale}, by a "
                    "build that was killed (torch would wait for it without end); delete that "
                    "file to build the node"
                )

            notify(
                "batchnorm: building the compiled autograd node (once, about a minute; "
                "BATCHNORM_NATIVE=0 skips it)"
            )
        ext = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=list(_CFLAGS),
            verbose=False,
        )
        from batchnorm import backend_numba

        ext.set_kernels(
            _entries.address,
            functional.graph_backward,
            functional.graph_backward_eval,
            backend_numba.REUSE_ABOVE,
            budget,
        )
    except Exception as e:  # no compiler, no headers, a failed build: the Python path serves
        warnings.warn(
            f"batchnorm: the native autograd node could not be built ({type(e).__name__}: "
            f"{str(e)[:300]}); the Python autograd path serves instead (tens of microseconds "
            "slower per call). Set BATCHNORM_NATIVE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _state["ext"] = ext
    return ext


# ------------------------------------------------------------------------------------------
# the output caches (this node's and the Function path's, backend_numba._OUT)


def output_cache_budget() -> int:
    """The output caches' budget in bytes: what :func:`set_output_cache_budget` set last, else
    ``$BATCHNORM_OUTPUT_CACHE_MB`` MiB (512 when it is not set)."""
    budget: int | None = _state["budget"]
    return _env.output_cache_bytes() if budget is None else budget


def set_output_cache_budget(max_bytes: int) -> None:
    """Let each of the two output caches keep at most ``max_bytes`` of reusable output buffers
    (the compiled node's and the Python path's; 512 MiB each by default, or
    ``$BATCHNORM_OUTPUT_CACHE_MB`` MiB; 0 keeps none). Buffers over the new budget are
    forgotten at once, those used least recently first. Outputs of 1 MiB and more are reused
    once nothing else refers to them, which spares a training loop the page faults of fresh
    memory at every step; a smaller budget trades that time for memory, e.g. for batches of
    many different sizes, whose outputs reuse cannot share.

    Example::

        >>> import batchnorm
        >>> batchnorm.set_output_cache_budget(64 << 20)
        >>> batchnorm.output_cache_budget() == 64 << 20
        True
        >>> batchnorm.set_output_cache_budget(512 << 20)
    """
    limit = _env.MAX_OUTPUT_CACHE_BYTES
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 <= max_bytes <= limit:
        raise ValueError(
            "set_output_cache_budget: max_bytes is the bytes each output cache may keep, a "
            f"whole number from 0 to {limit} (1 TiB; 0 keeps no output; e.g. 256 << 20 for "
            f"256 MiB), got {max_bytes!r}"
        )
    _state["budget"] = max_bytes
    numba_path = sys.modules.get("batchnorm.backend_numba")
    if numba_path is not None:
        numba_path._OUT.set_budget(max_bytes)
    if _state["ext"] is not None:
        _state["ext"].set_output_budget(max_bytes)


def release_output_caches() -> int:
    """Forget every output buffer the two output caches keep for reuse, and return the bytes
    they held. The caches belong to the process, not to a model: after ``del model`` they still
    hold the last outputs' memory (up to the budget, :func:`set_output_cache_budget`) until
    this is called or other outputs take their place. A buffer a live tensor still views is
    freed when that tensor goes.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchNorm2d(8)
        >>> _ = bn(torch.randn(64, 8, 32, 32))  # a 2 MiB output: kept for reuse once dropped
        >>> batchnorm.release_output_caches() >= 2 << 20
        True
        >>> batchnorm.release_output_caches()
        0
    """
    released = 0
    numba_path = sys.modules.get("batchnorm.backend_numba")
    if numba_path is not None:
        released += numba_path._OUT.clear()
    if _state["ext"] is not None:
        released += int(_state["ext"].release_outputs())
    return released


# ------------------------------------------------------------------------------------------
# `batchnorm compile`: compile ahead of the first call (e.g. while building an image)

#: the command's names for the entries' indices (see ``kernels._entries.address``)
DTYPES = {"float32": 0, "float64": 1}
LAYOUTS = {"rows": 0, "channels": 1}  # rows × channels (2-D, channels_last); (N, C, L)
PASSES = {"train": 0, "backward": 1, "eval": 2, "eval-backward": 3}


def compile_entries(
    dtypes: Sequence[str] = tuple(DTYPES),
    layouts: Sequence[str] = tuple(LAYOUTS),
    passes: Sequence[str] = tuple(PASSES),
    progress: bool = True,
) -> list[tuple[str, float]]:
    """Compile (or load from the disk cache) the node's kernel entries now instead of at the
    first calls that need them: each of ``dtypes`` × ``layouts`` × ``passes`` (names as in
    :data:`DTYPES`, :data:`LAYOUTS`, :data:`PASSES`). Builds the node first. Returns
    ``(entry, seconds)`` per entry; raises RuntimeError when the node is turned off or cannot
    be built."""
    from tqdm.auto import tqdm

    from batchnorm.kernels import _entries

    if load() is None:
        why = "turned off (BATCHNORM_NATIVE=0)" if not enabled() else "not built here (see above)"
        raise RuntimeError(f"the compiled node is {why}")
    keys = [(DTYPES[d], LAYOUTS[lay], PASSES[p]) for d in dtypes for lay in layouts for p in passes]
    done = []
    for key in tqdm(keys, desc="compiling", disable=not progress, file=sys.stderr, leave=False):
        t0 = time.perf_counter()
        _entries.address(*key)
        done.append((_entries._what(*key), time.perf_counter() - t0))
    return done


def compile_loops(dtypes: Sequence[str] = tuple(DTYPES), progress: bool = True) -> list[str]:
    """Compile (or load) every loop of the array API — the path of ``BATCHNORM_NATIVE=0``, of
    half inputs with ``backend="numba"`` and of ``batchnorm.kernels`` itself — single- and
    multi-threaded, for ``dtypes``. Returns the loops' names."""
    import numpy as np
    from tqdm.auto import tqdm

    from batchnorm import kernels as K

    # (N, C, L) with rows the (N, C, L) loops take in whole-row pieces, with long rows (a
    # channel per task), and rows × channels (also the path of rows shorter than SHORT_ROWS)
    shapes = [(2, 3, K.SHORT_ROWS), (2, 2, K.FUSED_ROWS), (8, 3)]
    work = [(np.dtype(d), s, par) for d in dtypes for s in shapes for par in (False, True)]
    for dt, shape, par in tqdm(
        work, desc="compiling", disable=not progress, file=sys.stderr, leave=False
    ):
        x = np.linspace(-1.0, 1.0, int(np.prod(shape)), dtype=dt).reshape(shape)
        y, mean, var, invstd = K.forward_train(x, parallel=par)
        K.backward(np.ones_like(x), x, mean, invstd, parallel=par)
        scale, shift = K.inference_affine(mean, var)
        K.forward_eval(x, scale, shift, parallel=par)
        K.backward_eval(np.ones_like(x), x, mean, var, parallel=par)
        K.running_update(np.zeros_like(mean), np.ones_like(var), mean, var, 0.1)
    return sorted(f"{n} ({'multi' if p else 'single'}-threaded)" for n, p in K._DISPATCHERS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="default: both"
    )
    parser.add_argument(
        "--layout",
        nargs="+",
        choices=list(LAYOUTS),
        default=list(LAYOUTS),
        help="rows: 2-D, channels_last and axis=-1 inputs; channels: (N, C, ...) inputs "
        "(default: both)",
    )
    parser.add_argument(
        "--pass",
        dest="passes",
        nargs="+",
        choices=list(PASSES),
        default=list(PASSES),
        help="default: all four (eval-backward: inference with gradients)",
    )
    parser.add_argument(
        "--function-path",
        action="store_true",
        help="also the loops of the Python autograd path (BATCHNORM_NATIVE=0, forced numba)",
    )


def main(args: argparse.Namespace) -> int:
    """``batchnorm compile``: what a first training step would otherwise compile, now."""
    from batchnorm import kernels as K

    progress = sys.stderr.isatty()
    code = 0
    notice_after, K.NOTICE_AFTER = K.NOTICE_AFTER, None  # each line below says it instead
    try:
        try:
            for what, seconds in compile_entries(args.dtype, args.layout, args.passes, progress):
                say(f"{what}: ready ({seconds:.1f} s)")  # (a closed pipe: no traceback)
        except RuntimeError as e:
            say(f"batchnorm compile: {e}; the Function path's loops serve instead", err=True)
            args.function_path = True
            code = 1 if enabled() else 0
        if args.function_path:
            t0 = time.perf_counter()
            loops = compile_loops(args.dtype, progress)
            seconds = time.perf_counter() - t0
            say(f"{len(loops)} loops of the Function path: ready ({seconds:.1f} s)")
    finally:
        K.NOTICE_AFTER = notice_after
    return code
