"""BatchNorm1d/2d/3d used the way training code uses torch.nn's layers, held to torch.nn's
values and gradients on each path: the compiled node, the autograd Function (native off) and
plain torch operations."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

import batchnorm

PATHS = ["native", "function", "torch"]


def _path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "function":
        monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    elif path == "torch":
        monkeypatch.setenv("BATCHNORM_BACKEND", "torch")


def _pair(
    ours_cls: type[nn.Module], torch_cls: type[nn.Module], c: int
) -> tuple[nn.Module, nn.Module]:
    """Our layer and torch.nn's with the same (non-trivial) parameters and buffers."""
    ours, theirs = ours_cls(c), torch_cls(c)
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 1.5, c))
        ours.bias.copy_(torch.linspace(-0.5, 0.5, c))
        ours.running_mean.copy_(torch.linspace(-1.0, 1.0, c))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


# a pack hook that returns the saved input in another memory layout: offloading and compression
# hooks commonly save a .contiguous() copy
_HOOKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: (
        t.to(memory_format=torch.channels_last) if t.dim() == 4 else t.clone()
    ),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "case",
    [
        ("2d", "channels_last", "contiguous"),
        ("3d", "channels_last_3d", "contiguous"),
        ("2d", "contiguous", "channels_last"),
        ("1d", "contiguous", "contiguous"),
    ],
)
def test_saved_tensor_hooks_that_change_the_layout_keep_torch_gradients(
    path: str, case: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.autograd.graph.saved_tensors_hooks may give the saved input back in another
    layout (a channels_last input packed as a contiguous copy): the backward reads the layout
    it gets back (it used to walk it with the forward's layout: wrong gradients on the compiled
    node, a Numba typing error on the autograd Function)."""
    rank, layout, hook = case
    _path(path, monkeypatch)
    shapes = {"1d": (6, 3, 7), "2d": (4, 3, 5, 5), "3d": (2, 3, 2, 4, 4)}
    classes = {
        "1d": (batchnorm.BatchNorm1d, nn.BatchNorm1d),
        "2d": (batchnorm.BatchNorm2d, nn.BatchNorm2d),
        "3d": (batchnorm.BatchNorm3d, nn.BatchNorm3d),
    }
    formats = {
        "contiguous": torch.contiguous_format,
        "channels_last": torch.channels_last,
        "channels_last_3d": torch.channels_last_3d,
    }
    torch.manual_seed(0)
    x0 = (torch.randn(shapes[rank]) * 2 + 1).contiguous(memory_format=formats[layout])
    g = torch.randn(shapes[rank])
    results = []
    for bn in _pair(*classes[rank], 3):
        x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(_HOOKS[hook], lambda t: t):
            y = bn(x)
        (y * g).sum().backward()
        results.append((y.detach(), x.grad, bn.weight.grad, bn.bias.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_warnings_of_a_layer_name_the_line_that_called_it() -> None:
    """The warnings a layer issues while training (a small batch, a non-finite batch, on the
    compiled node, the masked path and through nn.Sequential) and at construction name the
    user's line, as torch's own warnings do: they used to name torch's Module.__call__ or this
    package's own files, which ``-W`` filters by module and the printed location then missed."""
    torch.manual_seed(0)
    bad = torch.randn(8, 3)
    bad[0, 0] = float("nan")
    calls: list[Callable[[], object]] = [
        lambda: batchnorm.BatchNorm1d(3)(torch.randn(3, 3)),  # SmallBatchWarning
        lambda: batchnorm.BatchNorm1d(3)(bad),
        lambda: nn.Sequential(nn.Identity(), batchnorm.BatchNorm1d(3))(bad),
        lambda: batchnorm.BatchNorm(3)(bad, mask=torch.ones(8, dtype=torch.bool)),
        lambda: batchnorm.BatchNorm2d(3)(torch.full((64, 3, 32, 32), float("nan"))),
        lambda: batchnorm.functional.batch_norm(bad, torch.zeros(3), torch.ones(3), training=True),
        lambda: batchnorm.BatchNorm(3, eps=0),
        lambda: batchnorm.BatchNorm2d(3, momentum=2.0),
    ]
    for call in calls:
        with pytest.warns(Warning) as rec:
            call()
        assert [w.filename for w in rec] == [__file__] * len(rec), [str(w.message) for w in rec]
