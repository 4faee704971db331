"""InPlaceABN against BatchNorm followed by the activation (float64, 1e-10), and the memory it
holds for backward measured with saved_tensors_hooks."""

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.inplace_abn import saved_tensor_bytes

ACTS = [
    ("leaky_relu", 0.01, lambda: nn.LeakyReLU(0.01)),
    ("leaky_relu", 0.3, lambda: nn.LeakyReLU(0.3)),
    ("elu", 1.0, lambda: nn.ELU(1.0)),
    ("elu", 0.5, lambda: nn.ELU(0.5)),
    ("identity", None, lambda: nn.Identity()),
]


def _pair(c: int, act: str, param, make_act, **kw):  # type: ignore[no-untyped-def]
    iabn = batchnorm.InPlaceABN(
        c, activation=act, activation_param=param, dtype=torch.float64, **kw
    )
    bn = batchnorm.BatchNorm(c, dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if iabn.weight is not None:
            w = torch.rand(c, generator=g) + 0.5
            w[0] = -w[0]  # a negative γ must work too
            iabn.weight.copy_(w)
            iabn.bias.copy_(torch.randn(c, generator=g))
    bn.load_state_dict(iabn.state_dict())
    return iabn, nn.Sequential(bn, make_act())


@pytest.mark.parametrize("act,param,make_act", ACTS)
@pytest.mark.parametrize(
    "shape,kw",
    [((16, 4), {}), ((4, 4, 5, 3), {}), ((3, 5, 4), {"axis": -1}), ((4, 4, 6), {"affine": False})],
)
def test_outputs_and_gradients_equal_bn_plus_activation(act, param, make_act, shape, kw) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    iabn, ref = _pair(4, act, param, make_act, **kw)
    x1 = (torch.randn(*shape, dtype=torch.float64) * 2 + 0.3).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(*shape, dtype=torch.float64)
    y1, y2 = iabn(x1), ref(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-10)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-10)
    if iabn.weight is not None:
        torch.testing.assert_close(iabn.weight.grad, ref[0].weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(iabn.bias.grad, ref[0].bias.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(iabn.running_mean, ref[0].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iabn.running_var, ref[0].running_var, rtol=1e-12, atol=1e-12)
    iabn.eval(), ref.eval()
    torch.testing.assert_close(iabn(x1), ref(x2), rtol=1e-12, atol=1e-12)


def test_channels_last_and_float32_with_each_backend() -> None:
    torch.manual_seed(2)
    backends = ["torch"]
    try:
        batchnorm.functional.get_backend(torch.zeros(2, 2), "numba")
        backends.append("numba")
    except (ImportError, ValueError):
        pass
    for backend in backends:
        iabn = batchnorm.InPlaceABN(6, backend=backend)
        bn = batchnorm.BatchNorm2d(6)
        x1 = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last).requires_grad_(True)
        x2 = x1.detach().clone().requires_grad_(True)
        y1, y2 = iabn(x1), nn.functional.leaky_relu(bn(x2), 0.01)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)


def _blocks(norm: str, n_blocks: int = 8, width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
    for i in range(n_blocks):
        if norm == "iabn":
            layers.append(
                batchnorm.InPlaceABN(width, activation="leaky_relu", activation_param=0.01)
            )
        else:
            layers += [nn.BatchNorm2d(width), nn.LeakyReLU(0.01)]
        if i < n_blocks - 1:
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=False))
    return nn.Sequential(*layers)


def test_memory_held_for_backward_is_at_most_055_of_bn_plus_activation() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    base, fused = _blocks("bn"), _blocks("iabn")
    convs = [m for m in fused if isinstance(m, nn.Conv2d)]
    for src, dst in zip([m for m in base if isinstance(m, nn.Conv2d)], convs, strict=True):
        dst.load_state_dict(src.state_dict())
    b_base = saved_tensor_bytes(lambda: base(x).sum())
    b_fused = saved_tensor_bytes(lambda: fused(x).sum())
    ratio = b_fused / b_base
    assert ratio <= 0.55, (b_fused, b_base, ratio)
    # and the same network computes the same thing
    torch.testing.assert_close(fused(x), base(x), rtol=1e-4, atol=1e-4)


def test_saved_tensor_bytes_counts_a_storage_once() -> None:
    x = torch.randn(10, 10, requires_grad=True)
    one = saved_tensor_bytes(lambda: (x * x).sum())  # x saved twice by one op
    assert one == x.numel() * 4
    two = saved_tensor_bytes(lambda: (x.exp() * x).sum())  # x, exp(x) (saved by exp and mul)
    assert two == 2 * x.numel() * 4


def test_errors_name_the_layer() -> None:
    with pytest.raises(ValueError, match=r"InPlaceABN\(4\): activation must be one of"):
        batchnorm.InPlaceABN(4, activation="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation_param must be > 0"):
        batchnorm.InPlaceABN(4, activation="leaky_relu", activation_param=0.0)
    layer = batchnorm.InPlaceABN(4)
    with torch.no_grad():
        layer.weight[2] = 0.0
    with pytest.raises(
        batchnorm.BatchNormInputError, match=r"InPlaceABN\(4\): γ is 0 in channel\(s\) \[2\]"
    ):
        layer(torch.randn(8, 4))
