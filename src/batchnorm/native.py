"""The compiled autograd node of the ``"numba"`` backend.

At the paper's (60, 100) batch the kernels take a few microseconds; the rest of a training
step is the path around them — the Python ``autograd.Function`` and its Python backward, the
NumPy views of every tensor, the checks and the canonical view. On large inputs that path
costs 100–200 µs when the caches are cold after a large pass, about what torch's own layer
spends in all. This module runs the training step (statistics, output, running update,
graph), its backward and inference in C++ (``native.cpp``, built with
``torch.utils.cpp_extension`` on first use and cached by torch), taking the input in any
layout that :func:`batchnorm.functional.canonical_layout` views without a copy and calling
the same Numba loops, single- or multi-threaded, through C entries
(:mod:`batchnorm.kernels._entries`). Large outputs are reused from a cache of its own once
dropped, as the Function path's are. A graph of the backward (``create_graph=True``) is
recomputed in Python with torch operations, as the ``autograd.Function`` does.

It is used automatically when it builds (a C++ compiler and ``ninja`` are needed, once per
machine); ``BATCHNORM_NATIVE=0`` turns it off (the ``autograd.Function`` path then serves
every call), and a failed build falls back to that path with one warning. :func:`load`
builds it now, e.g. before timing.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from batchnorm import _env

__all__ = ["load", "loaded", "enabled"]

_SOURCE = Path(__file__).with_name("native.cpp")


def _name() -> str:
    """The extension's name in torch's build cache (``~/.cache/torch_extensions``), which is
    keyed by name alone: one per source file and its contents, so that two checkouts or
    versions do not rebuild each other's build, silently, at every first call."""
    import hashlib

    h = hashlib.sha256(str(_SOURCE.resolve()).encode())
    h.update(_SOURCE.read_bytes())
    return f"batchnorm_native_{h.hexdigest()[:12]}"


_state: dict[str, Any] = {"ext": None, "tried": False}


def enabled() -> bool:
    """Whether the node may be used: ``BATCHNORM_NATIVE`` is not ``0`` (read at every call,
    like ``BATCHNORM_BACKEND``)."""
    return _env.get("BATCHNORM_NATIVE") != "0"


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


def load() -> Any | None:
    """The built extension (building it on the first call), or None when it is turned off or
    cannot be built (then with one warning that says why)."""
    if not enabled():
        return None
    if _state["tried"]:
        return _state["ext"]
    _state["tried"] = True
    try:
        from torch.utils import cpp_extension

        from batchnorm import functional
        from batchnorm.kernels import _entries

        name = _name()
        if not _built(cpp_extension, name):
            print(
                "batchnorm: building the compiled autograd node (once, about a minute; "
                "BATCHNORM_NATIVE=0 skips it)",
                file=sys.stderr,
            )
        ext = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O2"],
            verbose=False,
        )
        from batchnorm import backend_numba

        ext.set_kernels(
            _entries.address,
            functional.graph_backward,
            backend_numba.REUSE_ABOVE,
            backend_numba._OUT.max_bytes,
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
