"""Deployment tools on realistic models: fold / to_inference against the unfolded eval model
(float64), with layers registered under two names, masks and train/eval modes."""

from __future__ import annotations

import math
import re

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


@pytest.mark.parametrize("breakage", ["nan mean", "inf var", "negative var"])
@pytest.mark.parametrize("what", ["fold", "to_inference"])
def test_broken_running_statistics_are_refused_not_folded(breakage: str, what: str) -> None:
    # a checkpoint whose running statistics broke (torch.nn stores a NaN batch's statistics):
    # folded, NaN would be written into the convolution's weights and the model look deployed
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()).eval()
    bn = net[1]
    if breakage == "nan mean":
        bn.running_mean[[1, 4]] = float("nan")
        channels = "2 of 6 channels (1, 4)"
    elif breakage == "inf var":
        bn.running_var[5] = float("inf")
        channels = "1 of 6 channels (5)"
    else:
        bn.running_var.fill_(-1.0)
        channels = "6 of 6 channels (0, 1, 2, 3, 4, 5)"
    conv_before = net[0].weight.detach().clone()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        ValueError,
        match=rf"^{what}: layer '1' \(BatchNorm2d\).*{re.escape(channels)}.*batchnorm\.recalibrate",
    ):
        if what == "fold":
            batchnorm.fold(net, x, inplace=True)
        else:
            batchnorm.to_inference(net, inplace=True)
    assert isinstance(net[1], nn.BatchNorm2d) and torch.equal(net[0].weight, conv_before)
    # the remedy named: statistics computed again, after which the layer folds
    batchnorm.recalibrate(net, [torch.randn(8, 3, 8, 8) for _ in range(3)])
    folded, err = batchnorm.fold(net, x)
    assert isinstance(folded[1], nn.Identity) and torch.isfinite(folded[0].weight).all()
    assert err < 1e-5


def test_recalibrate_refuses_one_tensor_with_the_remedy() -> None:
    """Iterating a tensor yields its rows; the model then failed with a rank error."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(8, 3, 6, 6)
    with pytest.raises(TypeError, match=r"one tensor of shape \(8, 3, 6, 6\).*x\.split"):
        batchnorm.recalibrate(net, x)
    assert batchnorm.recalibrate(net, x.split(4)) == 8


def _eval_layers() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Every layer kind in eval mode with statistics, γ and β away from their defaults."""
    layers: list[tuple[str, nn.Module, tuple[int, ...]]] = [
        ("BatchNorm1d", batchnorm.BatchNorm1d(3), (4, 3)),
        ("BatchNorm1d (N, C, L)", batchnorm.BatchNorm1d(3), (4, 3, 6)),
        ("BatchNorm2d", batchnorm.BatchNorm2d(3), (4, 3, 5, 5)),
        ("BatchNorm2d 1x1", batchnorm.BatchNorm2d(3), (4, 3, 1, 1)),
        ("BatchNorm3d", batchnorm.BatchNorm3d(3), (2, 3, 2, 3, 4)),
        ("BatchNorm axis=-1", batchnorm.BatchNorm(3, axis=-1), (4, 5, 3)),
        ("FrozenBatchNorm2d", batchnorm.FrozenBatchNorm2d(3), (4, 3, 5, 5)),
        ("BatchRenorm2d", batchnorm.BatchRenorm2d(3), (4, 3, 5, 5)),
        ("GhostBatchNorm2d", batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 5, 5)),
        ("SyncBatchNorm", batchnorm.SyncBatchNorm(3), (4, 3, 5, 5)),
        ("InPlaceABN", batchnorm.InPlaceABN(3), (4, 3, 5, 5)),
    ]
    gen = torch.Generator().manual_seed(0)
    for _, m, _ in layers:
        with torch.no_grad():
            for name, b in m.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.rand(b.shape, generator=gen) * 2 - 1)
                elif name.endswith("running_var"):
                    b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            for p in m.parameters():
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        m.eval()
    return layers


def _other_batch(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(7, *shape[1:], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("strict", [False, True])
def test_exported_inference_is_torchs_batch_norm_node_for_any_batch(strict: bool) -> None:
    """torch.export records inference as torch.nn's layers do — one ``aten.batch_norm`` node,
    no element-wise chain — with the batch dimension free: the exported program gives the
    eager layer's output on a batch of another size."""
    for name, m, shape in _eval_layers():
        x = torch.randn(*shape)
        ep = torch.export.export(
            m, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=strict
        )
        ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert ops.count("aten.batch_norm.default") == 1, (name, ops)
        assert not any(op.startswith(("aten.mul", "aten.add", "aten.rsqrt")) for op in ops), (
            name,
            ops,
        )
        x7 = _other_batch(shape)
        torch.testing.assert_close(ep.module()(x7), m(x7), msg=name)


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_traced_inference_records_torchs_operator_and_takes_other_sizes() -> None:
    """torch.jit.trace (also the tracer of ``torch.onnx.export``) records ``aten::batch_norm``:
    the trace of a (4, 3, 1, 1) batch normalizes a (7, 3, 1, 1) one (the element-wise form
    recorded reshapes to the traced sizes and failed), channels_last stays channels_last, and
    half inputs with float32 statistics give the eager output. As for torch.nn's layers, no
    ``TracerWarning``: the input checks record nothing."""
    for name, m, shape in _eval_layers():
        traced = torch.jit.trace(m, torch.randn(*shape), check_trace=False)
        assert "aten::batch_norm" in str(traced.graph), name
        x7 = _other_batch(shape)
        torch.testing.assert_close(traced(x7), m(x7), msg=name)
    m = batchnorm.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    traced = torch.jit.trace(m, x, check_trace=False)
    y = traced(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, m(x))
    for dt in (torch.bfloat16, torch.float16):
        xh = torch.randn(2, 3, 4, 4).to(dt)
        traced = torch.jit.trace(m, xh, check_trace=False)
        assert traced(xh).dtype == dt
        torch.testing.assert_close(traced(xh), m(xh))


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_gives_batch_normalization_nodes_that_take_any_batch(dynamo: bool) -> None:
    """``torch.onnx.export`` of an evaluated model, with torch.export (the default, through
    onnxscript) and with the tracer: each layer is one ONNX ``BatchNormalization`` (after a
    conv, folded into it by the exporter, as for torch.nn), and the ONNX reference runtime
    gives the eager output on a batch of another size."""
    import io
    import warnings

    onnx = pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    conv_bn = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        conv_bn[1].running_var.uniform_(0.5, 2.0)
        conv_bn[1].running_mean.uniform_(-1.0, 1.0)
    cases = _eval_layers()
    cases.append(("Conv2d + BatchNorm2d + ReLU", conv_bn, (4, 3, 8, 8)))
    for name, m, shape in cases:
        x = torch.randn(*shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            if dynamo:
                batch = {0: torch.export.Dim("batch")}
                model = torch.onnx.export(m, (x,), dynamic_shapes=(batch,)).model_proto
            else:
                buf = io.BytesIO()
                torch.onnx.export(
                    m, (x,), buf, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}
                )
                model = onnx.load_from_string(buf.getvalue())
        ops = [n.op_type for n in model.graph.node]
        if name.startswith("Conv2d"):
            assert ops == ["Conv", "Relu"], ops  # folded into the convolution
        else:
            assert ops.count("BatchNormalization") == 1, (name, ops)
            assert not {"Mul", "Add", "Reshape", "Sqrt"} & set(ops), (name, ops)
        x7 = _other_batch(shape)
        (y,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x7.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), m(x7).detach(), msg=name)


@pytest.mark.parametrize("what", ["fold", "to_inference"])
def test_a_frozen_layer_with_broken_statistics_is_refused_too(what: str) -> None:
    # a FrozenBatchNorm is a fixed map in either mode, but its map from NaN statistics is NaN
    net = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.FrozenBatchNorm2d(4))
    with torch.no_grad():
        net[1].running_mean[1] = float("nan")
        net[1].running_var[2] = -1.0
    conv_before = net[0].weight.detach().clone()
    with pytest.raises(
        ValueError, match=rf"^{what}: layer '1' \(FrozenBatchNorm2d\).*2 of 4 channels \(1, 2\)"
    ):
        if what == "fold":
            batchnorm.fold(net, torch.randn(2, 3, 4, 4), inplace=True)
        else:
            batchnorm.to_inference(net, inplace=True)
    assert isinstance(net[1], batchnorm.FrozenBatchNorm2d)
    assert torch.equal(net[0].weight, conv_before)


def test_a_conv_on_unbatched_input_keeps_its_bn_unfolded() -> None:
    # Conv1d on (C, L) gives (C_out, L): the BN's axis 1 is then L, not the conv's channels,
    # and folding its statistics into the conv's output channels changes the model
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)).train()
    for _ in range(3):
        net(torch.randn(3, 4))
    net.eval()
    x = torch.randn(3, 4)
    deployed = batchnorm.to_inference(net, x)
    assert isinstance(deployed[1], batchnorm.FrozenBatchNorm)
    torch.testing.assert_close(deployed(x), net(x), rtol=1e-6, atol=1e-6)
    folded, err = batchnorm.fold(net, x)
    assert not isinstance(folded[1], nn.Identity) and err < 1e-6
    # batched input: the same pair folds
    deployed = batchnorm.to_inference(net, torch.randn(2, 3, 4))
    assert isinstance(deployed[1], nn.Identity)


@pytest.mark.parametrize("what", ["fold", "to_inference"])
def test_a_pair_whose_folded_weights_overflow_the_dtype_is_kept(what: str) -> None:
    # float16: γ/√(var + ε) = 300/√(1.1e-5) ≈ 9e4 > 65504, so the folded weight would be inf
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
    )
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].running_var.fill_(1e-6)
        net[1].weight.fill_(300.0)
    net = net.half().eval()
    x = (torch.randn(2, 3, 6, 6) * 1e-3).half()
    with pytest.warns(
        UserWarning, match=r"'0' → '1': the folded weight does not fit torch.float16"
    ):
        if what == "fold":
            out, err = batchnorm.fold(net, x)
            assert err < 1.0
        else:
            out = batchnorm.to_inference(net, x)
    assert bool(torch.isfinite(out[0].weight).all())
    assert not isinstance(out[1], nn.Identity)  # kept as the BN (fold) or its fixed map
    assert isinstance(out[3], nn.Identity)  # the pair that fits is folded
    assert bool(torch.isfinite(out(x)).all())


def test_a_float32_running_variance_of_exactly_minus_eps_is_refused() -> None:
    """−1e-5 in float32 is −9.99999975e-6: above −ε in float64, but 0 under the layer's own
    square root (an infinite output); the check adds ε in the buffer's dtype, as the layer."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[1].running_var[1] = -1e-5
    with pytest.raises(ValueError, match=r"below -eps in 1 of 4 channels \(1\)"):
        batchnorm.fold(net, torch.randn(2, 3, 3, 3))
    with torch.no_grad():
        net[1].running_var[1] = -0.99e-5  # above −ε in float32 too: foldable
    x = torch.randn(2, 3, 3, 3)
    _, err = batchnorm.fold(net, x)
    with torch.no_grad():
        assert math.isfinite(err) and err < 1e-5 * float(net(x).abs().max())  # (outputs ~1e3)
