"""Deployment tools on realistic models: fold / to_inference against the unfolded eval model
(float64), with layers registered under two names, masks and train/eval modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


def _with_statistics(model: nn.Module, *shape: int) -> nn.Module:
    """Train-mode passes in float64 so every BN has running statistics; returns it in eval."""
    model.double().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape, dtype=torch.float64))
    return model.eval()


class _Block(nn.Module):
    """A torchvision-style basic block: conv-bn-relu, depthwise conv-bn, downsample, add."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=cout, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def test_fold_resnet_block_matches_the_eval_model_in_float64() -> None:
    torch.manual_seed(0)
    net = _with_statistics(
        nn.Sequential(_Block(3, 8, 2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.BatchNorm1d(5)),
        6,
        3,
        8,
        8,
    )
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    folded, err = batchnorm.fold(net, x)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-12)
    assert err < 1e-12
    bn_types = (nn.modules.batchnorm._BatchNorm, batchnorm.BatchNorm)
    assert not [n for n, m in folded.named_modules() if isinstance(m, bn_types)]


class _Aliased(nn.Module):
    """The conv is registered as ``a`` and as ``b``; forward calls it by the second name."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.b(x))


def test_fold_replaces_a_layer_under_every_name_it_is_registered_under() -> None:
    torch.manual_seed(0)
    net = _with_statistics(_Aliased(), 4, 3, 8, 8)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
    for folded in (batchnorm.fold(net, x)[0], batchnorm.to_inference(net, x)):
        assert folded.a is folded.b  # still one layer
        assert isinstance(folded.bn, nn.Identity)
        with torch.no_grad():
            assert torch.allclose(folded(x), expected, atol=1e-12)


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.bn = batchnorm.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x), mask=mask)


def test_a_bn_called_with_a_mask_keyword_stays_a_layer_that_takes_it() -> None:
    torch.manual_seed(0)
    net = _Masked().double()
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, 5:] = False
    with torch.no_grad():
        net(torch.randn(4, 3, 7, dtype=torch.float64), mask)
    net.eval()
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x, mask)
    deployed = batchnorm.to_inference(net)
    assert isinstance(deployed.bn, batchnorm.FrozenBatchNorm)
    with torch.no_grad():
        assert torch.allclose(deployed(x, mask), expected, atol=1e-12)


def test_fold_and_to_inference_keep_every_module_in_the_model_s_mode() -> None:
    torch.manual_seed(0)
    net = _with_statistics(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten()
        ),
        4,
        3,
        6,
        6,
    )
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, _ = batchnorm.fold(net, x)
    deployed = batchnorm.to_inference(net, x)
    assert isinstance(deployed.get_submodule("3"), batchnorm.FrozenBatchNorm)
    for model in (net, folded, deployed):
        assert [n for n, m in model.named_modules() if m.training] == []
    bn = _with_statistics(nn.BatchNorm1d(3), 4, 3)
    assert not batchnorm.to_inference(bn).training


def test_recalibrate_refuses_one_tensor_with_the_remedy() -> None:
    """Iterating a tensor yields its rows; the model then failed with a rank error."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(8, 3, 6, 6)
    with pytest.raises(TypeError, match=r"one tensor of shape \(8, 3, 6, 6\).*x\.split"):
        batchnorm.recalibrate(net, x)
    assert batchnorm.recalibrate(net, x.split(4)) == 8
