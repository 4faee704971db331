"""Conversion between ``torch.nn``'s batch-norm layers and ours (and, in :mod:`batchnorm.keras`
users' terms, between conventions).

``convert_model(model)`` swaps every ``torch.nn.BatchNorm1d/2d/3d`` for ours, keeping its state
(parameters, running statistics, ``num_batches_tracked``), its mode (train/eval) and its device
and dtype; ``convert_model(model, to="torch")`` swaps back.
"""

from __future__ import annotations

import inspect
from typing import Literal

from torch import nn

from batchnorm.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase

__all__ = ["convert_model"]

_TO_OURS: dict[type[nn.Module], type[_BatchNormBase]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
}


_TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


def _bias_kwarg(has_gamma: bool, has_beta: bool) -> dict[str, bool]:
    """torch.nn >= 2.13 takes ``bias=False`` for γ without β; older versions have no such arg."""
    return {"bias": has_beta} if (_TORCH_HAS_BIAS_ARG and has_gamma) else {}


def _torch_class_for(m: _BatchNormBase, name: str) -> type[nn.modules.batchnorm._BatchNorm]:
    if type(m) in _TO_TORCH:
        return _TO_TORCH[type(m)]
    problems = []
    if m.axis != 1:
        problems.append(f"axis={m.axis} (torch.nn normalizes axis 1)")
    if m.center and not m.scale:
        problems.append("β without γ (torch.nn has no such layer)")
    if m.scale and not m.center and not _TORCH_HAS_BIAS_ARG:
        problems.append("γ without β (this torch version has no bias=False)")
    if not m.unbiased_running_var:
        problems.append("a biased running variance (torch.nn stores the unbiased one)")
    if type(m) is not BatchNorm:
        problems.append(f"{type(m).__name__} has no torch.nn counterpart")
    if problems:
        raise ValueError(
            f"convert_model: layer {name!r} ({m.layer_name()}) cannot become a torch.nn layer: "
            + "; ".join(problems)
            + ". Keep our layer for it, or rebuild it with BatchNorm1d/2d/3d."
        )
    return nn.BatchNorm2d  # rank unknown: BatchNorm2d's state is the same; refine by use


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    tensors = [*src.parameters(recurse=False), *src.buffers(recurse=False)]
    if tensors:
        dst = dst.to(device=tensors[0].device)
    dst.load_state_dict(src.state_dict())
    for name, t in src.named_parameters(recurse=False):
        getattr(dst, name).requires_grad_(t.requires_grad)
    dst.train(src.training)
    return dst


def _convert_one(m: nn.Module, to: str, name: str) -> nn.Module | None:
    if to == "ours" and type(m) in _TO_OURS:
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        new: nn.Module = _TO_OURS[type(m)](
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
            dtype=(m.weight.dtype if m.weight is not None else None),
            bias=m.bias is not None or not m.affine,
        )
        return _copy_state(m, new)
    if to == "torch" and isinstance(m, _BatchNormBase):
        cls = _torch_class_for(m, name)
        new = cls(
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.scale,
            track_running_stats=m.track_running_stats,
            dtype=(m.weight.dtype if m.weight is not None else None),
            **_bias_kwarg(m.scale, m.center),
        )
        return _copy_state(m, new)
    return None


def convert_model(model: nn.Module, to: Literal["ours", "torch"] = "ours") -> nn.Module:
    """Replace every batch-norm layer of ``model`` in place with the other implementation and
    return the model (a bare batch-norm layer is returned converted).

    Example::

        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> net = batchnorm.convert_model(net)
        >>> type(net[1]).__name__
        'BatchNorm1d'
    """
    if to not in ("ours", "torch"):
        raise ValueError(f"convert_model: to must be 'ours' or 'torch', got {to!r}")
    top = _convert_one(model, to, "")
    if top is not None:
        return top
    for name, child in list(model.named_modules()):
        for cname, c in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            new = _convert_one(c, to, full)
            if new is not None:
                setattr(child, cname, new)
    return model
