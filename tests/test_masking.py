"""Masked batch normalization (statistics over the valid positions of padded sequences) and the
small-batch policy, against the float64 reference on the valid values, BN on the packed valid
values, and gradcheck."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import functional as F
from batchnorm import reference as ref


def _padded(n: int = 5, c: int = 3, length: int = 7, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64) * 2 + 1
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    lengths[0] = length  # at least one full row
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (N, L)
    return x, mask


def _valid_ref(x: torch.Tensor, mask: torch.Tensor, axis: int):  # type: ignore[no-untyped-def]
    """Reference statistics over the valid values only (NumPy float64)."""
    xn = np.moveaxis(x.detach().numpy(), axis, -1)  # (..., C)
    valid = xn[mask.numpy()]  # (M, C)
    return ref.batch_stats(valid, axis=1), valid.shape[0]


@pytest.mark.parametrize(
    "shape,axis,mask_shape",
    [((5, 3, 7), 1, (5, 7)), ((5, 7, 3), -1, (5, 7)), ((4, 3, 5, 6), 1, (4, 5, 6))],
)
def test_masked_forward_matches_reference_on_valid_values(shape, axis, mask_shape) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64) * 3 - 2
    mask = torch.rand(mask_shape) < 0.6
    mask.view(-1)[:2] = True
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    y, mean, var, count = F.batch_norm_train(x, w, b, 1e-5, axis=axis, mask=mask)
    (rmean, rvar), m = _valid_ref(x, mask, axis)
    assert count == m
    np.testing.assert_allclose(mean.numpy(), rmean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), rvar, rtol=1e-12, atol=1e-12)
    # every position (padding too) is normalized with the valid statistics
    want, _ = ref.normalize(x.numpy(), rmean, rvar, w.numpy(), b.numpy(), 1e-5, axis)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-10, atol=1e-10)


def test_masked_equals_bn_on_packed_valid_values_forward_and_backward() -> None:
    x, mask = _padded()
    x.requires_grad_(True)
    ours = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    packed_bn = nn.BatchNorm1d(3, dtype=torch.float64)
    packed_bn.load_state_dict(ours.state_dict())
    y = ours(x, mask=mask)
    packed_x = x.detach().transpose(1, 2)[mask].clone().requires_grad_(True)  # (M, C)
    packed_y = packed_bn(packed_x)
    torch.testing.assert_close(y.transpose(1, 2)[mask], packed_y, rtol=1e-12, atol=1e-12)
    # a loss on the valid positions only: the gradients are those of BN on the packed values
    g = torch.randn_like(packed_y)
    (y.transpose(1, 2)[mask] * g).sum().backward()
    (packed_y * g).sum().backward()
    torch.testing.assert_close(x.grad.transpose(1, 2)[mask], packed_x.grad, rtol=1e-10, atol=1e-12)
    assert bool((x.grad.transpose(1, 2)[~mask] == 0).all())
    torch.testing.assert_close(ours.weight.grad, packed_bn.weight.grad)
    torch.testing.assert_close(ours.bias.grad, packed_bn.bias.grad)
    # the running statistics come from the valid values only (unbiased with the valid count)
    torch.testing.assert_close(ours.running_mean, packed_bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, packed_bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 1


def test_masked_gradcheck_and_gradgradcheck() -> None:
    x, mask = _padded(n=3, length=4, seed=3)
    x.requires_grad_(True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):  # type: ignore[no-untyped-def]
        return F.batch_norm_train(x, w, b, 1e-3, mask=mask)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_padding_values_never_reach_statistics_or_valid_outputs() -> None:
    x, mask = _padded(seed=5)
    bn1, bn2 = (
        batchnorm.BatchNorm1d(3, dtype=torch.float64),
        batchnorm.BatchNorm1d(3, dtype=torch.float64),
    )
    y1 = bn1(x, mask=mask)
    x2 = x.clone()
    x2.transpose(1, 2)[~mask] = float("nan")  # garbage (even NaN) in the padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-finite warning: the statistics stay finite
        y2 = bn2(x2, mask=mask)
    torch.testing.assert_close(y1.transpose(1, 2)[mask], y2.transpose(1, 2)[mask])
    torch.testing.assert_close(bn1.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn1.running_var, bn2.running_var)
    assert bool(torch.isfinite(bn2.running_var).all())


def test_all_true_mask_equals_unmasked_and_eval_ignores_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    full = torch.ones(6, 5, dtype=torch.bool)
    a, b = (
        batchnorm.BatchNorm1d(3, dtype=torch.float64),
        batchnorm.BatchNorm1d(3, dtype=torch.float64),
    )
    torch.testing.assert_close(a(x, mask=full), b(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)
    a.eval(), b.eval()
    some = torch.rand(6, 5) < 0.5
    torch.testing.assert_close(a(x, mask=some), b(x))
    # the functional form
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, training=True, mask=full)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))


def test_mask_channel_axis_size_one_is_accepted() -> None:
    x, mask = _padded()
    y1 = F.batch_norm_train(x, mask=mask)[0]
    y2 = F.batch_norm_train(x, mask=mask[:, None, :])[0]
    torch.testing.assert_close(y1, y2)


def test_mask_errors_name_layer_shape_and_remedy() -> None:
    x, mask = _padded()
    bn = batchnorm.BatchNorm1d(3)
    with pytest.raises(batchnorm.BatchNormInputError, match=r"BatchNorm1d\(3\).*boolean.*bool\(\)"):
        bn(x.float(), mask=mask.float())
    with pytest.raises(batchnorm.BatchNormInputError, match=r"BatchNorm1d\(3\).*\(5, 7\).*lengths"):
        bn(x.float(), mask=mask[:, :5])
    few = torch.zeros_like(mask)
    few[0, 0] = True
    with pytest.raises(batchnorm.BatchNormInputError, match=r"1 valid value.*at least 2"):
        bn(x.float(), mask=few)
    renorm_free = batchnorm.InPlaceABN(3)
    with pytest.raises(batchnorm.BatchNormInputError, match="mask"):
        renorm_free(x.float(), mask=mask)


# --- small-batch policy ----------------------------------------------------------------------


def test_single_value_policy_running_uses_running_statistics_without_update() -> None:
    bn = batchnorm.BatchNorm1d(4, small_batch="running", dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    before = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(1, 4, dtype=torch.float64)
    y = bn(x)
    want = ref.batch_norm_inference(
        x.numpy(),
        before[0].numpy(),
        before[1].numpy(),
        bn.weight.detach().numpy(),
        bn.bias.detach().numpy(),
        bn.eps,
    )
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == 0
    assert bn.training  # still a training step for everything else


def test_single_value_policy_skip_is_the_limit_of_batch_statistics() -> None:
    bn = batchnorm.BatchNorm2d(3, small_batch="skip", dtype=torch.float64)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    # μ_B = x and σ²_B = 0: x̂ = 0, so y = β — torch.nn's formula in the limit
    torch.testing.assert_close(y.flatten(), bn.bias.detach())
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # BN's dx at m = 1 is exactly zero
    torch.testing.assert_close(bn.bias.grad, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(bn.weight.grad, torch.zeros(3, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_var, torch.ones(3, dtype=torch.float64))


def test_single_value_default_still_raises_and_bad_policy_is_rejected() -> None:
    with pytest.raises(batchnorm.BatchNormInputError, match="more than 1 value per channel"):
        batchnorm.BatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="small_batch must be"):
        batchnorm.BatchNorm1d(4, small_batch="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="track_running_stats=True"):
        batchnorm.BatchNorm1d(4, small_batch="running", track_running_stats=False)


def test_small_count_warns_once_per_layer() -> None:
    bn = batchnorm.BatchNorm1d(4)
    with pytest.warns(batchnorm.SmallBatchWarning, match=r"BatchNorm1d\(4\).*only 3 values"):
        bn(torch.randn(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(torch.randn(3, 4))  # once per layer
        batchnorm.BatchNorm1d(4)(torch.randn(32, 4))  # a normal batch: no warning
        batchnorm.BatchNorm2d(4)(torch.randn(2, 4, 3, 3))  # 18 values per channel: fine


def test_non_finite_padding_does_not_reach_the_valid_gradients() -> None:
    """NaN or inf in the padding: the valid positions' gradients are those of BN on the
    packed valid values (a 0·NaN in a product's backward made every one of them NaN); the
    padded outputs keep the non-finite value."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        x, mask = _padded(seed=7)
        x.transpose(1, 2)[~mask] = bad
        x.requires_grad_(True)
        ours = batchnorm.BatchNorm1d(3, dtype=torch.float64)
        packed_bn = nn.BatchNorm1d(3, dtype=torch.float64)
        y = ours(x, mask=mask)
        packed_x = x.detach().transpose(1, 2)[mask].clone().requires_grad_(True)
        packed_y = packed_bn(packed_x)
        g = torch.randn_like(packed_y)
        (y.transpose(1, 2)[mask] * g).sum().backward()
        (packed_y * g).sum().backward()
        torch.testing.assert_close(x.grad.transpose(1, 2)[mask], packed_x.grad)
        torch.testing.assert_close(ours.weight.grad, packed_bn.weight.grad)
        pad_out = y.detach().transpose(1, 2)[~mask]
        assert bool((pad_out.isnan() if bad != bad else pad_out == bad).all())


@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_mask_that_is_not_a_tensor_asks_for_a_boolean_tensor(kind: str) -> None:
    x, mask = _padded()
    bad = mask.numpy() if kind == "numpy" else mask.tolist()
    bn = batchnorm.BatchNorm1d(3)
    with pytest.raises(batchnorm.BatchNormInputError) as info:
        bn(x.float(), mask=bad)
    msg = str(info.value)
    assert "BatchNorm1d(3)" in msg and "boolean torch.Tensor" in msg
    assert ("numpy.ndarray of dtype bool" if kind == "numpy" else "got a list") in msg
    assert "torch.as_tensor" in msg
    with pytest.raises(batchnorm.BatchNormInputError, match="boolean torch.Tensor"):
        F.check_mask(x, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", [None, "torch"])
def test_masked_statistics_keep_the_unmasked_paths_accuracy(backend) -> None:  # type: ignore[no-untyped-def]
    """A mean of 1e6 (float32's last digit is 0.06) and a spread of 1e20 (a float32 variance
    of 1e40 overflows): an all-True mask gives the kernels' unmasked result, and a real mask
    the exact one over its valid positions, whatever backend is asked for (the masked
    statistics are torch operations, in float64; the unmasked plain-torch path keeps float32
    statistics, as torch.nn does)."""
    g = torch.Generator().manual_seed(0)
    for x in (
        (1e6 + torch.randn(8, 3, 64, dtype=torch.float64, generator=g)).float(),
        torch.randn(4, 3, 6, generator=g) * 1e20,
    ):
        n, c, length = x.shape
        bn = batchnorm.BatchNorm1d(c, affine=False, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 1e40 variance does not fit the buffers
            plain = bn(x)
            every = bn(x, mask=torch.ones(n, length, dtype=torch.bool))
        if backend is None:
            torch.testing.assert_close(every, plain, rtol=1e-6, atol=1e-6)
        mask = torch.rand(n, length, generator=g) < 0.6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = batchnorm.BatchNorm1d(c, affine=False, backend=backend)(x, mask=mask)
        x64, m = x.double(), mask[:, None, :].expand_as(x)
        valid = [x64[:, k][m[:, k]] for k in range(c)]
        mean = torch.stack([v.mean() for v in valid]).view(1, c, 1)
        var = torch.stack([v.var(unbiased=False) for v in valid]).view(1, c, 1)
        exact = (x64 - mean) / torch.sqrt(var + 1e-5)
        torch.testing.assert_close(y.double(), exact, rtol=0, atol=1e-6)


def test_the_output_keeps_the_inputs_layout_whatever_the_masks() -> None:
    """Elementwise results take their layout from every operand: a mask built as a transposed
    view must not make a contiguous input's output non-contiguous (nor drop channels_last)."""
    x = torch.randn(4, 7, 3)
    mask = (torch.arange(7)[:, None] < torch.tensor([7, 5, 3, 2])[None, :]).t()
    y = batchnorm.BatchNorm(3, axis=-1)(x, mask=mask)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, batchnorm.BatchNorm(3, axis=-1)(x, mask=mask.contiguous()))
    x4 = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    m4 = (torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0)) > 0.3).transpose(1, 2)
    y4 = batchnorm.BatchNorm2d(3)(x4, mask=m4)
    assert y4.stride() == x4.stride()
    y4.sum().backward()  # still differentiable
    assert x4.grad is not None


def test_masks_propagate_shapes_on_meta_and_fake_tensors_and_a_meta_mask_is_named() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = batchnorm.BatchNorm1d(3).to("meta")
    x = torch.randn(4, 3, 5, device="meta")
    assert meta(x, mask=torch.ones(4, 5, dtype=torch.bool, device="meta")).shape == (4, 3, 5)
    bn = batchnorm.BatchNorm1d(3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = bn(torch.randn(4, 3, 5), mask=torch.ones(4, 5, dtype=torch.bool))
        assert y.shape == (4, 3, 5)
    assert torch.equal(bn.running_mean, torch.zeros(3))
    with pytest.raises(batchnorm.BatchNormInputError, match=r"BatchNorm1d\(3\): the mask .* meta"):
        bn(torch.randn(4, 3, 5), mask=torch.ones(4, 5, dtype=torch.bool, device="meta"))


def test_a_compiled_layer_takes_masks_as_the_eager_layer_does() -> None:
    # the valid count is data, so the compiled layer breaks its graph to read it (fullgraph=True
    # cannot take a mask); outputs, gradients and running statistics are the eager layer's
    torch._dynamo.reset()
    x, mask = _padded()
    eager = batchnorm.BatchNorm1d(3).double()
    compiled_bn = batchnorm.BatchNorm1d(3).double()
    compiled = torch.compile(compiled_bn, backend="eager")
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe, mask=mask), compiled(xc, mask=mask)
        torch.testing.assert_close(yc, ye)
        (ye * x).sum().backward()
        (yc * x).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(compiled_bn.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_bn.running_var, eager.running_var)
    assert int(compiled_bn.num_batches_tracked) == 2
