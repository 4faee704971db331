"""The networks the lab trains, all normalizing with this package's BN layers.

* :class:`MLP` — fully-connected layers with BN before or after the activation (or none),
  a choice of activation, dropout and Gaussian init scale. The paper's MNIST network
  (Sec. 4.1) is ``MLP(784, (100, 100, 100), 10, activation="sigmoid", bn="before")``.
* :class:`SmallCNN` — two or more 3×3 conv blocks with 2×2 max-pooling and a linear head, for
  28×28 (MNIST-shaped) and 8×8 (digits) inputs.

Each hidden block is a named ``nn.Sequential`` (``linear``/``conv``, ``bn``, ``act``,
``drop``), so a layer can be addressed by name, e.g. ``"hidden.2.act"`` is the last sigmoid of
the paper's network and a forward pre-hook on it sees that sigmoid's input.

Example::

    >>> import torch
    >>> from batchnorm.lab.models import MLP
    >>> net = MLP(64, (32, 32), 10, activation="sigmoid", bn="before", init_std=0.1)
    >>> net(torch.randn(5, 1, 8, 8)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from batchnorm.nn import BatchNorm1d, BatchNorm2d

__all__ = ["MLP", "SmallCNN", "make_activation", "BNPlacement", "ACTIVATIONS"]

BNPlacement = Literal["none", "before", "after"]
ACTIVATIONS = ("sigmoid", "relu", "tanh", "identity")


def make_activation(name: str) -> nn.Module:
    """``sigmoid``, ``relu``, ``tanh`` or ``identity``."""
    table: dict[str, type[nn.Module]] = {
        "sigmoid": nn.Sigmoid,
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "identity": nn.Identity,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return table[name]()


def _check_bn(bn: str) -> None:
    if bn not in ("none", "before", "after"):
        raise ValueError(f"bn placement must be 'none', 'before' or 'after', got {bn!r}")


def _init(module: nn.Module, init_std: float | None) -> None:
    """Gaussian N(0, init_std²) weights and zero biases for linear/conv layers (``None`` keeps
    torch's default init)."""
    if init_std is None:
        return
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs.

    Each hidden block is ``linear → [bn] → act → [bn] → [dropout]`` with BN placed per ``bn``:
    ``"before"`` the nonlinearity (the paper's choice, Sec. 3.2: BN of ``Wu``; the linear bias is
    dropped because BN's β replaces it), ``"after"`` it, or ``"none"``.

    Args:
        in_features: input size (the input is flattened from dim 1).
        hidden: widths of the hidden layers. num_classes: output size.
        activation: ``sigmoid``, ``relu``, ``tanh`` or ``identity``.
        bn: BN placement. dropout: dropout probability after each hidden block.
        init_std: Gaussian init scale of the weights (``None``: torch's default).
        bn_momentum, bn_eps: passed to :class:`batchnorm.BatchNorm1d`.

    Shape: ``(N, *)`` with ``prod(*) == in_features`` → ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        *,
        activation: str = "sigmoid",
        bn: BNPlacement = "none",
        dropout: float = 0.0,
        init_std: float | None = None,
        bn_momentum: float | None = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_bn(bn)
        self.bn_placement = bn
        blocks = []
        d = in_features
        for width in hidden:
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            parts["linear"] = nn.Linear(d, width, bias=bn != "before")
            if bn == "before":
                parts["bn"] = BatchNorm1d(width, eps=bn_eps, momentum=bn_momentum)
            parts["act"] = make_activation(activation)
            if bn == "after":
                parts["bn"] = BatchNorm1d(width, eps=bn_eps, momentum=bn_momentum)
            if dropout > 0:
                parts["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(parts))
            d = width
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList(blocks)
        self.out = nn.Linear(d, num_classes)
        _init(self, init_std)

    @property
    def activations(self) -> list[nn.Module]:
        """The activation module of each hidden block (hook these to see their inputs)."""
        return [b.get_submodule("act") for b in self.hidden]

    def forward(self, x: Tensor) -> Tensor:
        h = self.flatten(x)  # (N, in_features)
        for block in self.hidden:
            h = block(h)
        out: Tensor = self.out(h)
        return out


class SmallCNN(nn.Module):
    """A small convolutional network: blocks of ``conv3×3 → [bn] → act → [bn] → maxpool2×2``,
    then ``flatten → [dropout] → linear``.

    Args:
        in_shape: ``(C, H, W)``, e.g. ``(1, 28, 28)`` or ``(1, 8, 8)``.
        num_classes: output size. channels: conv widths, one block each (each halves H and W;
        a block is skipped from pooling once the map is 2×2 or smaller).
        activation, bn, dropout, init_std: as in :class:`MLP` (BN is :class:`BatchNorm2d`).

    Shape: ``(N, C, H, W)`` → ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        *,
        activation: str = "relu",
        bn: BNPlacement = "none",
        dropout: float = 0.0,
        init_std: float | None = None,
        bn_momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        _check_bn(bn)
        if len(in_shape) != 3:
            raise ValueError(f"SmallCNN: in_shape must be (C, H, W), got {tuple(in_shape)}")
        c, h, w = in_shape
        blocks = []
        for width in channels:
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            parts["conv"] = nn.Conv2d(c, width, 3, padding=1, bias=bn != "before")
            if bn == "before":
                parts["bn"] = BatchNorm2d(width, momentum=bn_momentum)
            parts["act"] = make_activation(activation)
            if bn == "after":
                parts["bn"] = BatchNorm2d(width, momentum=bn_momentum)
            if min(h, w) > 2:
                parts["pool"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
            blocks.append(nn.Sequential(parts))
            c = width
        self.features = nn.ModuleList(blocks)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(c * h * w, num_classes)
        _init(self, init_std)

    @property
    def activations(self) -> list[nn.Module]:
        return [b.get_submodule("act") for b in self.features]

    def forward(self, x: Tensor) -> Tensor:
        for block in self.features:
            x = block(x)  # (N, C_k, H_k, W_k)
        out: Tensor = self.out(self.drop(self.flatten(x)))
        return out
