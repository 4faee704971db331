"""The torch adapter of the fused Numba kernels: the ``"numba"`` backend of
:mod:`batchnorm.functional`.

Importing this module registers the backend; :func:`batchnorm.functional.get_backend` does that on
first need, so ``import batchnorm`` never imports Numba. The adapter is thin on purpose: tensors
become NumPy views (``Tensor.numpy()``, no copy), outputs are allocated with ``torch.empty`` and
filled in place by :mod:`batchnorm.kernels`, and per-channel results come back through
``torch.from_numpy`` (no copy). Canonical inputs are contiguous already; anything else is made
contiguous once.

Select it with ``backend="numba"`` (an argument of every function and module) or
``BATCHNORM_BACKEND=numba``; ``auto`` (the default) uses it for CPU float32/float64 tensors.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from batchnorm import _env, functional, native
from batchnorm import kernels as K

# a bad $NUMBA_NUM_THREADS: a one-line reason, not Numba's traceback from inside its import
_env.check_numba_threads()
import numba  # noqa: E402, F401  (ImportError here means "no kernels": functional falls back to torch)

__all__ = ["NumbaBackend"]

_DTYPES = (torch.float32, torch.float64)
# half inputs are computed in float32 (statistics in float32, as torch does), for users who
# force this backend; ``auto`` leaves them to the torch backend
_HALF = (torch.float16, torch.bfloat16)
_EMPTY: dict[torch.dtype, np.ndarray] = {
    torch.float32: np.empty(0, np.float32),
    torch.float64: np.empty(0, np.float64),
}


class _Outputs:
    """Output arrays, reused once the caller has dropped them.

    A training loop asks for the same big outputs every step; memory fresh from the operating
    system costs a page fault per 4 KiB the first time it is written — for a 25 MB activation
    more time than the kernel's own pass. Arrays of at least :data:`REUSE_ABOVE` bytes are kept
    here per shape and dtype (at most ``max_bytes`` in all; the shapes used least recently go
    first) and handed out again when nothing but this cache refers to them any more (their
    reference count says so: the tensor made by ``torch.from_numpy`` holds a reference for as
    long as it, or any view of it, lives) — of several free ones, the one handed out last.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._by_key: OrderedDict[tuple[tuple[int, ...], np.dtype[Any]], list[np.ndarray]] = (
            OrderedDict()
        )
        self._bytes = 0
        # the autograd engine may run a backward while another thread runs a forward
        self._lock = threading.Lock()

    def empty_like(self, a: np.ndarray) -> np.ndarray:
        if a.nbytes < REUSE_ABOVE:
            return np.empty_like(a)
        if a.nbytes > self.max_bytes:  # beyond the whole budget: not kept after its users
            return K.empty_aligned(a.shape, a.dtype)
        with self._lock:
            return self._reused(a)

    def _reused(self, a: np.ndarray) -> np.ndarray:
        key = (a.shape, a.dtype)
        arrays = self._by_key.get(key)
        if arrays is None:
            arrays = self._by_key[key] = []
        else:
            self._by_key.move_to_end(key)
            # the most recently handed out first: the likeliest still in the caches
            for i in range(len(arrays) - 1, -1, -1):
                b = arrays[i]
                # references: the list, ``b`` and getrefcount's argument — nobody else
                if sys.getrefcount(b) == 3:
                    arrays.append(arrays.pop(i))  # (the list's order: least recent first)
                    return b
        b = K.empty_aligned(a.shape, a.dtype)  # whole cache lines for the streaming stores
        arrays.append(b)
        self._bytes += b.nbytes
        while self._bytes > self.max_bytes and len(self._by_key) > 1:
            _, old = self._by_key.popitem(last=False)
            self._bytes -= sum(c.nbytes for c in old)
        while self._bytes > self.max_bytes and len(arrays) > 1:
            self._bytes -= arrays.pop(0).nbytes
        return b

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def clear(self) -> int:
        """Forget every array; return the bytes they took (memory still in use is freed by
        its users)."""
        with self._lock:
            held, self._bytes = self._bytes, 0
            self._by_key.clear()
        return held

    def set_budget(self, max_bytes: int) -> None:
        """Keep at most ``max_bytes`` from now on: the arrays used least recently go first."""
        with self._lock:
            self.max_bytes = max_bytes
            while self._bytes > max_bytes:
                key, arrays = next(iter(self._by_key.items()))
                self._bytes -= arrays.pop(0).nbytes
                if not arrays:
                    del self._by_key[key]


#: outputs at least this big are reused (smaller ones come from the allocator's own free lists)
REUSE_ABOVE = 1 << 20
_OUT = _Outputs(max_bytes=native.output_cache_budget())


def _vec(v: Tensor | None, dtype: torch.dtype, C: int) -> np.ndarray:
    """A per-channel tensor as a contiguous NumPy vector of ``dtype`` (empty for None); one of
    another shape holding C values (a ``(C, 1)`` weight, which ``torch.nn`` takes) flattened.
    The kernels read ``C`` values: one of another length raises (the layers refuse such
    tensors before the forward; this catches one replaced between forward and backward)."""
    if v is None:
        return _EMPTY[dtype]
    if v.numel() != C:
        raise functional.replaced_vector_error(v, C)
    # one cheap check per property: this runs on every call, (60, 100) batches included;
    # numpy(force=True) detaches in the same call
    if v.dtype != dtype:
        v = v.to(dtype)
    if v.dim() != 1:
        v = v.reshape(-1)
    if not v.is_contiguous():
        v = v.contiguous()
    return v.numpy(force=True)


def _arr(t: Tensor) -> np.ndarray:
    """A NumPy view of ``t`` (copied once if it is not contiguous: never read through strides)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy(force=True)


def _train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training forward on NumPy views: ``(y, mean, var, invstd)`` as arrays."""
    xa = _arr(x)
    ya = _OUT.empty_like(xa)
    _, mean, var, invstd = K._forward_train(
        xa,
        _vec(weight, x.dtype, xa.shape[1]),
        _vec(bias, x.dtype, xa.shape[1]),
        float(eps),
        ya,
        K._threads(xa.size, None),
        K._stream(xa, None, ya, tensors=2),
    )
    return ya, mean, var, invstd


def _updatable(running: functional.RunningStats, C: int) -> bool:
    """Whether the kernels can update these running buffers of ``C`` channels in place through
    NumPy views (they write ``C`` values of each)."""
    rm, rv, _, _, nbt, _ = running
    return (
        rm.numel() == C
        and rv.numel() == C
        and rm.dtype in _DTYPES
        and rv.dtype in _DTYPES
        and rm.is_cpu
        and rv.is_cpu
        and rm.is_contiguous()
        and rv.is_contiguous()
        and rm.dim() == 1
        and rv.dim() == 1
        and not (rm.requires_grad or rv.requires_grad)
        and (nbt is None or (nbt.dtype == torch.int64 and nbt.is_cpu and nbt.numel() == 1))
    )


class NumbaBackend:
    """Fused Numba kernels for CPU tensors of shape ``(N, C, L)`` or ``(M, C)``.

    Implements :class:`batchnorm.functional.Backend`: float32/float64 natively (statistics
    accumulated in float64, returned in the input's dtype); float16/bfloat16 through a float32
    copy (statistics returned in float32).
    """

    name = "numba"

    def supports(self, x: Tensor) -> bool:
        return x.is_cpu and (x.dtype in _DTYPES or x.dtype in _HALF)

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if x.dtype in _HALF:
            y32, m32, v32, i32 = self.forward_train(x.float(), weight, bias, eps)
            return y32.to(x.dtype), m32, v32, i32
        ya, mean, var, invstd = _train(x, weight, bias, eps)
        return (
            torch.from_numpy(ya),
            torch.from_numpy(mean),
            torch.from_numpy(var),
            torch.from_numpy(invstd),
        )

    def forward_train_update(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: functional.RunningStats,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        if x.dtype in _HALF or not _updatable(running, x.shape[1]):
            y, mean, var, invstd = self.forward_train(x, weight, bias, eps)
            return y, mean, var, invstd, functional.blend_running(running, mean, var)
        ya, ma, va, ia = _train(x, weight, bias, eps)
        nbt = running.num_batches_tracked
        updated = K._running_update(
            running.mean.numpy(),
            running.var.numpy(),
            ma,
            va,
            running.momentum,
            running.alpha,
            K._NO_COUNTER if nbt is None else nbt.numpy().reshape(1),
        )
        return (
            torch.from_numpy(ya),
            torch.from_numpy(ma),
            torch.from_numpy(va),
            torch.from_numpy(ia),
            updated,
        )

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if x.dtype in _HALF:
            dx32, dw32, db32 = self.backward(dy.float(), x.float(), mean, invstd, weight, needs)
            return (None if dx32 is None else dx32.to(x.dtype)), dw32, db32
        xa = _arr(x)
        dya = _arr(dy if dy.dtype == x.dtype else dy.to(x.dtype))
        dxa = _OUT.empty_like(xa) if needs[0] else None
        T = K._threads(xa.size, None)
        _, dw, db = K._backward(
            dya,
            xa,
            _vec(mean, x.dtype, xa.shape[1]),
            _vec(invstd, x.dtype, xa.shape[1]),
            _vec(weight, x.dtype, xa.shape[1]),
            dxa,
            T,
            K._stream(xa, None, dxa, tensors=3),
        )
        return (
            (None if dxa is None else torch.from_numpy(dxa)),
            torch.from_numpy(dw),
            torch.from_numpy(db),
        )

    def backward_eval(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        eps: float,
        need_dx: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        if x.dtype in _HALF:
            dx32, s1, s0 = self.backward_eval(
                dy.float(), x.float(), mean, var, weight, eps, need_dx
            )
            return (None if dx32 is None else dx32.to(x.dtype)), s1, s0
        xa = _arr(x)
        dya = _arr(dy if dy.dtype == x.dtype else dy.to(x.dtype))
        dxa = _OUT.empty_like(xa) if need_dx else None
        dt = x.dtype
        T = K._threads(xa.size, None)
        _, sdyx, sdy = K._backward_eval(
            dya,
            xa,
            _vec(mean, dt, xa.shape[1]),
            _vec(var, dt, xa.shape[1]),
            _vec(weight, dt, xa.shape[1]),
            float(eps),
            dxa,
            T,
            K._stream(xa, None, dxa, tensors=3),
        )
        dx = None if dxa is None else torch.from_numpy(dxa)
        return dx, torch.from_numpy(sdyx), torch.from_numpy(sdy)

    def train_node(
        self,
        x: Tensor,
        axis: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: functional.RunningStats | None,
    ) -> tuple[Tensor, Tensor, bool] | None:
        # (half inputs: the node would run torch's operator, the "aten" backend's path)
        ext = None if x.dtype in _HALF else native.load()  # None: turned off or not buildable
        if ext is None:
            return None
        T = K._threads(x.numel(), None)
        if running is None:
            return ext.train(x, axis, weight, bias, None, None, None, T, eps, 0.0, 0.0)  # type: ignore[no-any-return]
        rm, rv, momentum, alpha, nbt, _ = running
        return ext.train(x, axis, weight, bias, rm, rv, nbt, T, eps, momentum, alpha)  # type: ignore[no-any-return]

    def eval_node(
        self,
        x: Tensor,
        axis: int,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor | None:
        ext = None if x.dtype in _HALF else native.load()  # (half: see train_node)
        if ext is None:
            return None
        return ext.evaluate(x, axis, mean, var, weight, bias, K._threads(x.numel(), None), eps)  # type: ignore[no-any-return]

    def forward_eval(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        if x.dtype in _HALF:
            return self.forward_eval(x.float(), mean, var, weight, bias, eps).to(x.dtype)
        xa = _arr(x)
        ya = _OUT.empty_like(xa)
        dt = x.dtype
        K._forward_eval_stats(
            xa,
            _vec(mean, dt, xa.shape[1]),
            _vec(var, dt, xa.shape[1]),
            _vec(weight, dt, xa.shape[1]),
            _vec(bias, dt, xa.shape[1]),
            float(eps),
            ya,
            K._threads(xa.size, None),
            K._stream(xa, None, ya, tensors=2),
        )
        return torch.from_numpy(ya)


functional.register_backend("numba", NumbaBackend)
