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

import numba  # noqa: F401  (ImportError here means "no kernels": functional falls back to torch)
import numpy as np
import torch
from torch import Tensor

from batchnorm import functional
from batchnorm import kernels as K

__all__ = ["NumbaBackend"]

_DTYPES = (torch.float32, torch.float64)
# half inputs are computed in float32 (statistics in float32, as torch does), for users who
# force this backend; ``auto`` leaves them to the torch backend
_HALF = (torch.float16, torch.bfloat16)
_EMPTY: dict[torch.dtype, np.ndarray] = {
    torch.float32: np.empty(0, np.float32),
    torch.float64: np.empty(0, np.float64),
}


def _vec(v: Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """A per-channel tensor as a contiguous NumPy vector of ``dtype`` (empty for None)."""
    if v is None:
        return _EMPTY[dtype]
    # one cheap check per property: this runs on every call, (60, 100) batches included
    if v.requires_grad:
        v = v.detach()
    if v.dtype != dtype:
        v = v.to(dtype)
    if not v.is_contiguous():
        v = v.contiguous()
    return v.numpy()


def _arr(t: Tensor) -> np.ndarray:
    """A NumPy view of ``t`` (copied once if it is not contiguous: never read through strides)."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


class NumbaBackend:
    """Fused Numba kernels for CPU tensors of shape ``(N, C, L)`` or ``(M, C)``.

    Implements :class:`batchnorm.functional.Backend`: float32/float64 natively (statistics
    accumulated in float64, returned in the input's dtype); float16/bfloat16 through a float32
    copy (statistics returned in float32).
    """

    name = "numba"

    def supports(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and (x.dtype in _DTYPES or x.dtype in _HALF)
            and (x.dim() in (2, 3))
        )

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if x.dtype in _HALF:
            y32, m32, v32, i32 = self.forward_train(x.float(), weight, bias, eps)
            return y32.to(x.dtype), m32, v32, i32
        xa = _arr(x)
        y = torch.empty(xa.shape, dtype=x.dtype)
        T = K._threads(xa.size, None)
        _, mean, var, invstd = K._forward_train(
            xa, _vec(weight, x.dtype), _vec(bias, x.dtype), float(eps), y.numpy(), T
        )
        return y, torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(invstd)

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
        dx = torch.empty(xa.shape, dtype=x.dtype) if needs[0] else None
        T = K._threads(xa.size, None)
        _, dw, db = K._backward(
            dya,
            xa,
            _vec(mean, x.dtype),
            _vec(invstd, x.dtype),
            _vec(weight, x.dtype),
            None if dx is None else dx.numpy(),
            T,
        )
        return dx, torch.from_numpy(dw), torch.from_numpy(db)

    def forward_eval(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if x.dtype in _HALF:
            return self.forward_eval(x.float(), scale, shift).to(x.dtype)
        xa = _arr(x)
        y = torch.empty(xa.shape, dtype=x.dtype)
        K._forward_eval(
            xa, _vec(scale, x.dtype), _vec(shift, x.dtype), y.numpy(), K._threads(xa.size, None)
        )
        return y


functional.register_backend("numba", NumbaBackend)
