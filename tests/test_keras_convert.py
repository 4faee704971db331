"""Moving batch-norm state between Keras and PyTorch (batchnorm.convert.keras_to_torch /
torch_to_keras): the converted layer computes what the source computed, the conventions are
translated, and mismatches are refused with a clear message."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

keras = pytest.importorskip("keras")

import batchnorm  # noqa: E402
from batchnorm import reference  # noqa: E402
from batchnorm.convert import ConversionReport, keras_to_torch, torch_to_keras  # noqa: E402
from batchnorm.keras import BatchNormalization  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="these tests run with KERAS_BACKEND=torch"
)

KERAS_BN = [keras.layers.BatchNormalization, BatchNormalization]


def _keras_bn(cls: Any, c: int, rank: int = 2, seed: int = 0, **kwargs: Any) -> Any:
    """A built Keras BN layer with a random, non-default state."""
    layer = cls(**kwargs)
    shape = [None] + [3] * (rank - 2) + [c] if kwargs.get("axis", -1) == -1 else [None, c, 3, 3]
    layer.build(tuple(shape[:rank]))
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [
            rng.uniform(0.5, 2.0, w.shape).astype("float32")
            * (1 if i % 2 == 0 else rng.choice([-1, 1]))
            for i, w in enumerate(layer.get_weights())
        ]
    )
    if layer.moving_variance is not None:  # variances must stay positive
        layer.moving_variance.assign(np.abs(layer.moving_variance.numpy()) + 0.1)
    return layer


def _np(t: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64)


@pytest.mark.parametrize("cls", KERAS_BN)
def test_layer_keras_to_torch_nn_same_function(cls: Any) -> None:
    k = _keras_bn(cls, 6, momentum=0.95)
    t = nn.BatchNorm1d(6)
    report = keras_to_torch(k, t)
    assert isinstance(report, ConversionReport) and len(report.layers) == 1
    assert t.eps == pytest.approx(1e-3) and t.momentum == pytest.approx(0.05)
    x = np.random.default_rng(1).standard_normal((20, 6)).astype("float32") * 3
    t.eval()
    with torch.no_grad():
        y_t = t(torch.tensor(x)).numpy()
    np.testing.assert_allclose(y_t, _np(k(x, training=False)), atol=1e-5)
    t.train()
    with torch.no_grad():
        y_t = t(torch.tensor(x)).numpy()
    np.testing.assert_allclose(y_t, _np(k(x, training=True)), atol=1e-5)
    # the report's own measurement agrees
    assert report.max_abs_diff < 1e-5
    assert k.name in str(report) and "eps 0.001->0.001" in str(report)


def test_layer_torch_to_keras_same_function() -> None:
    t = nn.BatchNorm2d(4, momentum=0.2)
    with torch.no_grad():
        t.weight.uniform_(0.5, 2)
        t.bias.uniform_(-1, 1)
        t.running_mean.uniform_(-2, 2)
        t.running_var.uniform_(0.5, 3)
    k = keras.layers.BatchNormalization()
    k.build((None, 5, 5, 4))  # channels_last twin of the NCHW torch layer
    report = torch_to_keras(t, k)
    assert k.epsilon == pytest.approx(1e-5) and k.momentum == pytest.approx(0.8)
    x = np.random.default_rng(2).standard_normal((3, 4, 5, 5)).astype("float32") * 2
    t.eval()
    with torch.no_grad():
        y_t = t(torch.tensor(x)).numpy()
    y_k = _np(k(x.transpose(0, 2, 3, 1), training=False)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y_t, y_k, atol=1e-5)
    assert report.max_abs_diff < 1e-5
    # the translated epsilon is part of the saved config
    assert keras.layers.BatchNormalization.from_config(k.get_config()).epsilon == pytest.approx(
        1e-5
    )


def _dense_keras(seed: int, bn: Any, **bn_kwargs: Any) -> Any:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8),
            bn(**bn_kwargs),
            keras.layers.Activation("relu"),
            keras.layers.Dense(3),
            bn(**bn_kwargs),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _dense_torch() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3)
    )


def _copy_dense(model: Any, net: nn.Sequential) -> None:
    """Dense kernels (in, out) -> Linear weights (out, in): the user's part of a conversion."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    linear = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for d, lin in zip(dense, linear):
            kernel, bias = d.get_weights()
            lin.weight.copy_(torch.tensor(kernel.T))
            lin.bias.copy_(torch.tensor(bias))


@pytest.mark.parametrize("cls", KERAS_BN)
def test_trained_dense_model_roundtrip(cls: Any) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 5)) * 4 + 2).astype("float32")
    model = _dense_keras(0, cls, momentum=0.5)
    model.fit(x, rng.standard_normal((64, 3)).astype("float32"), epochs=2, batch_size=16, verbose=0)
    net = _dense_torch()
    _copy_dense(model, net)
    report = keras_to_torch(model, net)
    assert [c.target for c in report.layers] == ["1", "4"]
    net.eval()
    with torch.no_grad():
        y_t = net(torch.tensor(x)).numpy()
    y_k = model.predict(x, verbose=0)
    np.testing.assert_allclose(y_t, y_k, rtol=1e-5, atol=1e-5)
    # and back into a fresh Keras model with other conventions
    back = _dense_keras(1, keras.layers.BatchNormalization, epsilon=0.1, momentum=0.3)
    for d_back, d in zip(back.layers, model.layers):  # Dense weights; BN state comes from net
        if isinstance(d, keras.layers.Dense):
            d_back.set_weights(d.get_weights())
    torch_to_keras(net, back)
    np.testing.assert_allclose(back.predict(x, verbose=0), y_k, rtol=1e-5, atol=1e-5)
    assert [b.momentum for b in back.layers if isinstance(b, keras.layers.BatchNormalization)] == [
        pytest.approx(0.5)
    ] * 2


def test_conv_channels_last_to_nchw_model() -> None:
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.Conv2D(5, 3), BatchNormalization(momentum=0.6)]
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 6, 6, 2)) * 2 + 1).astype("float32")
    model.fit(
        x, rng.standard_normal((16, 4, 4, 5)).astype("float32"), epochs=1, batch_size=8, verbose=0
    )
    net = nn.Sequential(nn.Conv2d(2, 5, 3), batchnorm.BatchNorm2d(5))
    kernel, bias = model.layers[0].get_weights()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(kernel.transpose(3, 2, 0, 1)))  # HWIO -> OIHW
        net[0].bias.copy_(torch.tensor(bias))
    keras_to_torch(model, net)
    net.eval()
    with torch.no_grad():
        y_t = net(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    y_k = model.predict(x, verbose=0).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y_t, y_k, rtol=1e-4, atol=1e-5)


def test_continued_training_follows_translated_momentum() -> None:
    """After conversion both sides keep training alike: the momentum is translated, and our
    layer with Keras' (biased) variance convention tracks Keras' moving statistics exactly."""
    k = _keras_bn(keras.layers.BatchNormalization, 4, momentum=0.8)
    ours = batchnorm.BatchNorm(4, axis=-1, unbiased_running_var=False)
    tnn = nn.BatchNorm1d(4)
    keras_to_torch(k, ours)
    keras_to_torch(k, tnn)
    rm, rv = (tnn.running_mean.double().numpy(), tnn.running_var.double().numpy())
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = (rng.standard_normal((10, 4)) * 2 + 1).astype("float32")
        k(x, training=True)
        ours.train()(torch.tensor(x))
        tnn.train()(torch.tensor(x))
        mean, var = reference.batch_stats(x, axis=-1)
        rm, rv = reference.running_stats_update(rm, rv, mean, var, 10, 0.2, unbiased=True)
    np.testing.assert_allclose(ours.running_mean.numpy(), k.moving_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.running_var.numpy(), k.moving_variance.numpy(), atol=1e-6)
    # torch.nn keeps its own (unbiased) convention from the converted starting point
    np.testing.assert_allclose(tnn.running_mean.numpy(), rm, atol=1e-6)
    np.testing.assert_allclose(tnn.running_var.numpy(), rv, atol=1e-6)


def test_bessel_count_translates_the_variance_estimate() -> None:
    k = _keras_bn(keras.layers.BatchNormalization, 3)
    mv = k.moving_variance.numpy().astype(np.float64)
    t = nn.BatchNorm1d(3)
    report = keras_to_torch(k, t, bessel_count=16)
    np.testing.assert_allclose(t.running_var.numpy(), mv * 16 / 15, rtol=1e-6)
    assert "m=16" in report.layers[0].variance
    # the inference output changes by that factor, and the report says so
    assert report.layers[0].max_abs_diff_eval > 1e-4
    # our layer storing the biased estimate needs no rescaling
    ours = batchnorm.BatchNorm(3, axis=-1, unbiased_running_var=False)
    keras_to_torch(k, ours, bessel_count=16)
    np.testing.assert_allclose(ours.running_var.numpy(), mv, rtol=1e-6)
    # and back: unbiased -> biased
    k2 = _keras_bn(keras.layers.BatchNormalization, 3, seed=9)
    torch_to_keras(t, k2, bessel_count=16)
    np.testing.assert_allclose(k2.moving_variance.numpy(), mv, rtol=1e-5)
    with pytest.raises(ValueError, match="bessel_count"):
        keras_to_torch(k, t, bessel_count=1)


def test_bessel_count_takes_numpy_integers_and_probe_size_is_checked() -> None:
    k = _keras_bn(keras.layers.BatchNormalization, 3)
    mv = k.moving_variance.numpy().astype(np.float64)
    t = nn.BatchNorm1d(3)
    keras_to_torch(k, t, bessel_count=np.prod((4, 4)))  # m = N·L computed with NumPy
    np.testing.assert_allclose(t.running_var.numpy(), mv * 16 / 15, rtol=1e-6)
    for bad in (1, 0, -1, 2.5, True):
        for convert, args in ((keras_to_torch, (k, t)), (torch_to_keras, (t, k))):
            name = convert.__name__
            with pytest.raises(ValueError, match=rf"^{name}: probe_size .* at least 2 .*; got"):
                convert(*args, probe_size=bad)  # type: ignore[operator]
    before = t.running_var.clone()
    with pytest.raises(ValueError, match="bessel_count"):
        keras_to_torch(k, t, bessel_count=np.float64(16.0))  # type: ignore[arg-type]
    assert torch.equal(t.running_var, before)


@pytest.mark.parametrize("keras_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_layers_convert_both_ways(keras_dtype: str, torch_dtype: torch.dtype) -> None:
    k = _keras_bn(keras.layers.BatchNormalization, 4, dtype=keras_dtype)
    t = nn.BatchNorm1d(4).to(torch_dtype)
    report = keras_to_torch(k, t)
    for name, attr in (("gamma", "weight"), ("beta", "bias")):
        want = np.asarray(getattr(k, name).numpy(), dtype=np.float64)
        got = getattr(t, attr).detach().double().numpy()
        np.testing.assert_allclose(got, want, rtol=2**-7)  # bfloat16's 8 bits of precision
    assert report.max_abs_diff < 0.1
    k2 = _keras_bn(keras.layers.BatchNormalization, 4, seed=5, dtype=keras_dtype)
    torch_to_keras(t, k2)
    np.testing.assert_allclose(
        np.asarray(k2.moving_mean.numpy(), dtype=np.float64),
        t.running_mean.double().numpy(),
        rtol=2**-7,
    )


def test_eps_keep_absorbs_the_difference_into_the_variance() -> None:
    k = _keras_bn(keras.layers.BatchNormalization, 5)
    mv = k.moving_variance.numpy().astype(np.float64)
    t = nn.BatchNorm1d(5)
    report = keras_to_torch(k, t, eps="keep", momentum="keep")
    assert t.eps == 1e-5 and t.momentum == 0.1
    np.testing.assert_allclose(t.running_var.numpy(), mv + 1e-3 - 1e-5, rtol=1e-6)
    c = report.layers[0]
    assert c.max_abs_diff_eval < 1e-5  # inference unchanged ...
    assert c.max_abs_diff_train > c.max_abs_diff_eval  # ... training sees the other ε
    # the reverse would need a negative variance here
    t2 = nn.BatchNorm1d(5)
    with torch.no_grad():
        t2.running_var.fill_(1e-4)
    with pytest.raises(ValueError, match="eps='copy'"):
        torch_to_keras(t2, k, eps="keep")


def test_torch_cumulative_momentum_keeps_keras_momentum() -> None:
    t = nn.BatchNorm1d(3, momentum=None)
    k = _keras_bn(keras.layers.BatchNormalization, 3, momentum=0.9)
    report = torch_to_keras(t, k)
    assert k.momentum == pytest.approx(0.9) and report.layers[0].momentum == (None, 0.9)


def test_affine_and_center_scale_combinations() -> None:
    # Keras without beta -> torch bias 0; torch without affine accepts only neutral γ/β
    k = _keras_bn(keras.layers.BatchNormalization, 4, center=False)
    t = nn.BatchNorm1d(4)
    assert keras_to_torch(k, t).max_abs_diff < 1e-5
    assert float(t.bias.detach().abs().max()) == 0.0
    plain = nn.BatchNorm1d(4, affine=False)
    with pytest.raises(ValueError, match="affine=True"):
        keras_to_torch(k, plain)
    k_plain = _keras_bn(keras.layers.BatchNormalization, 4, center=False, scale=False)
    assert keras_to_torch(k_plain, plain).max_abs_diff < 1e-5
    with pytest.raises(ValueError, match="scale=True"):
        torch_to_keras(t, k_plain)


def test_mismatches_are_refused_with_a_clear_message() -> None:
    k = _keras_bn(keras.layers.BatchNormalization, 6)
    with pytest.raises(ValueError, match=r"6 channels in Keras .* but 5 in torch"):
        keras_to_torch(k, nn.BatchNorm1d(5))
    k4 = keras.layers.BatchNormalization()
    k4.build((None, 3, 3, 6))
    with pytest.raises(ValueError, match="4D inputs, the torch module takes 2D or 3D"):
        keras_to_torch(k4, nn.BatchNorm1d(6))
    k_axis = keras.layers.BatchNormalization(axis=2)
    k_axis.build((None, 3, 6, 4))  # normalizes the width axis of NHWC
    with pytest.raises(ValueError, match="axis 2"):
        keras_to_torch(k_axis, nn.BatchNorm2d(6))
    assert keras_to_torch(k_axis, batchnorm.BatchNorm(6, axis=2)).max_abs_diff < 1e-5
    with pytest.raises(ValueError, match="not built"):
        keras_to_torch(keras.layers.BatchNormalization(), nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="track_running_stats"):
        keras_to_torch(k, nn.BatchNorm1d(6, track_running_stats=False))
    model = _dense_keras(0, keras.layers.BatchNormalization)
    with pytest.raises(ValueError, match=r"2 BatchNormalization layer\(s\).*1 batch-norm"):
        keras_to_torch(model, nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)))
    with pytest.raises(ValueError, match="eps must be"):
        keras_to_torch(k, nn.BatchNorm1d(6), eps="same")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Keras layer or model"):
        keras_to_torch(nn.BatchNorm1d(6), nn.BatchNorm1d(6))


def test_explicit_pairs_by_name() -> None:
    model = _dense_keras(0, keras.layers.BatchNormalization, momentum=0.7)
    bn_names = [b.name for b in model.layers if isinstance(b, keras.layers.BatchNormalization)]
    net = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(8))  # another order
    report = keras_to_torch(model, net, pairs={bn_names[0]: "1", bn_names[1]: "0"})
    assert [(c.source, c.target) for c in report.layers] == [(bn_names[0], "1"), (bn_names[1], "0")]
    np.testing.assert_allclose(net[1].running_mean.numpy(), model.layers[1].moving_mean.numpy())
    with pytest.raises(ValueError, match="no torch batch-norm module named 'x'"):
        keras_to_torch(model, net, pairs={bn_names[0]: "x"})


# ---------------------------------------------------------------------------------------------
# batch renormalization, failures and ε = 0

HAS_RENORM = "renorm" in inspect.signature(keras.layers.BatchNormalization).parameters


def _variables(layer: Any) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy(), copy=True) for v in layer.variables}


def _assert_same_variables(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


def _torch_tensors(m: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*m.parameters(), *m.buffers()]]


def _assert_same_tensors(before: list[torch.Tensor], m: nn.Module) -> None:
    after = _torch_tensors(m)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", KERAS_BN)
def test_probe_leaves_the_keras_source_untouched(cls: Any) -> None:
    kwargs = {"renorm": True, "renorm_momentum": 0.5} if HAS_RENORM else {}
    k = _keras_bn(cls, 4, **kwargs)
    for name in ("moving_stddev", "renorm_stddev"):  # positive, as Keras keeps them
        if hasattr(k, name):
            getattr(k, name).assign(np.abs(getattr(k, name).numpy()) + 0.1)
    before = _variables(k)
    t = nn.BatchNorm1d(4)
    report = keras_to_torch(k, t)
    _assert_same_variables(before, _variables(k))
    x = np.random.default_rng(4).standard_normal((6, 4)).astype("float32")
    t.eval()
    with torch.no_grad():
        y_t = t(torch.tensor(x)).numpy()
    np.testing.assert_allclose(y_t, _np(k(x, training=False)), atol=1e-5)
    assert report.layers[0].max_abs_diff_eval < 1e-5
    if HAS_RENORM:
        assert "batch renormalization" in str(report)


@pytest.mark.skipif(not HAS_RENORM, reason="this Keras has no batch renormalization")
@pytest.mark.parametrize("cls", KERAS_BN)
def test_torch_to_keras_renorm_layer_keeps_the_variance_when_training(cls: Any) -> None:
    t = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        t.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        t.running_var.fill_(100.0)
    k = cls(renorm=True, momentum=0.9)
    k.build((None, 4))
    report = torch_to_keras(t, k)
    std = np.sqrt(100.0 + k.epsilon)
    for name in ("moving_stddev", "renorm_stddev"):
        np.testing.assert_allclose(getattr(k, name).numpy(), std, rtol=1e-6)
    np.testing.assert_allclose(k.renorm_mean.numpy(), t.running_mean.numpy())
    np.testing.assert_allclose(k.moving_variance.numpy(), 100.0)
    assert report.layers[0].max_abs_diff_eval < 1e-4 and "renorm" in str(report)
    # Keras' renorm update derives the moving variance from moving_stddev: it stays near 100
    x = np.random.default_rng(0).standard_normal((64, 4)).astype("float32") * 10
    k(x, training=True)
    batch_std = np.sqrt(x.var(axis=0) + k.epsilon)
    expected = (0.9 * std + 0.1 * batch_std) ** 2 - k.epsilon
    np.testing.assert_allclose(k.moving_variance.numpy(), expected, rtol=1e-4)


def test_failed_probe_restores_every_target(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchnorm.convert as bc

    real = bc._output_diffs
    calls = []

    def failing(*args: Any, **kwargs: Any) -> tuple[float, float]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("probe failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(bc, "_output_diffs", failing)
    model = _dense_keras(0, BatchNormalization, momentum=0.7)
    model.fit(np.ones((8, 5), "float32"), np.zeros((8, 3), "float32"), epochs=1, verbose=0)
    net = _dense_torch()
    k_before, t_before = _variables(model), _torch_tensors(net)
    eps_mom = [(m.eps, m.momentum) for m in net if isinstance(m, nn.BatchNorm1d)]
    with pytest.raises(RuntimeError, match="probe failed"):
        keras_to_torch(model, net)
    _assert_same_tensors(t_before, net)
    assert [(m.eps, m.momentum) for m in net if isinstance(m, nn.BatchNorm1d)] == eps_mom
    _assert_same_variables(k_before, _variables(model))

    calls.clear()
    k_config = [(b.epsilon, b.momentum) for b in model.layers if hasattr(b, "epsilon")]
    with pytest.raises(RuntimeError, match="probe failed"):
        torch_to_keras(net, model)
    _assert_same_variables(k_before, _variables(model))
    assert [(b.epsilon, b.momentum) for b in model.layers if hasattr(b, "epsilon")] == k_config
    _assert_same_tensors(t_before, net)


def test_a_later_pair_that_cannot_be_translated_writes_nothing() -> None:
    model = _dense_keras(0, keras.layers.BatchNormalization)
    second = [b for b in model.layers if isinstance(b, keras.layers.BatchNormalization)][1]
    second.moving_variance.assign(np.full(3, 1e-6, "float32"))  # + 1e-3 − 0.1 < 0
    net = _dense_torch()
    for m in net:
        if isinstance(m, nn.BatchNorm1d):
            m.eps = 0.1
    t_before = _torch_tensors(net)
    with pytest.raises(ValueError, match="eps='keep'"):
        keras_to_torch(model, net, eps="keep")
    _assert_same_tensors(t_before, net)


def test_eps_zero_converts_both_ways() -> None:
    # torch.nn runs eps=0 in inference only: the training-mode difference is not measured
    t = nn.BatchNorm1d(3, eps=0.0).eval()
    with torch.no_grad():
        t.running_mean.fill_(7.0)
        t.running_var.fill_(4.0)
    k = BatchNormalization()
    k.build((None, 3))
    report = torch_to_keras(t, k)
    assert k.epsilon == 0.0
    np.testing.assert_array_equal(k.moving_mean.numpy(), 7.0)
    np.testing.assert_array_equal(k.moving_variance.numpy(), 4.0)
    layer = report.layers[0]
    assert layer.max_abs_diff_eval < 1e-6 and np.isnan(layer.max_abs_diff_train)
    assert report.max_abs_diff == layer.max_abs_diff_eval
    assert "train n/a" in str(report) and "eps=0" in str(report)

    src = _keras_bn(keras.layers.BatchNormalization, 3, epsilon=0.0)
    before = _variables(src)
    tt = nn.BatchNorm1d(3)
    report = keras_to_torch(src, tt)
    _assert_same_variables(before, _variables(src))
    assert tt.eps == 0.0 and report.layers[0].max_abs_diff_eval < 1e-5
    ours = batchnorm.BatchNorm1d(3)  # ours trains with eps=0: both modes are measured
    report = keras_to_torch(src, ours)
    assert ours.eps == 0.0 and report.max_abs_diff < 1e-5
    assert not np.isnan(report.layers[0].max_abs_diff_train)


def test_statistics_a_half_layer_cannot_hold_are_refused_before_writing() -> None:
    # a running variance of 1e5 stored into float16 is inf: inference would give NaN
    t = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        t.running_var.copy_(torch.tensor([1.0, 1e5, 4.0]))
    k = BatchNormalization(dtype="float16")
    k.build((None, 3))
    k_before = _state_np(k)
    with pytest.raises(
        ValueError,
        match=r"running_var of torch module .* does not fit the "
        r"float16 of Keras layer .* 1 channel\(s\) \[1\]",
    ):
        torch_to_keras(t, k)
    assert all(np.array_equal(a, b) for a, b in zip(_state_np(k), k_before))
    # the other way: a Keras moving variance of 1e5 into a .half() torch module
    k32 = _keras_bn(BatchNormalization, 3)
    k32.moving_variance.assign(np.array([1.0, 1e5, 4.0], "float32"))
    th = nn.BatchNorm1d(3).half().eval()
    t_before = _torch_tensors(th)
    with pytest.raises(
        ValueError,
        match=r"moving_variance of Keras layer .* does not fit the "
        r"float16 of torch module",
    ):
        keras_to_torch(k32, th)
    _assert_same_tensors(t_before, th)
    # values within range convert: 1e3 is a float16
    k32.moving_variance.assign(np.array([1.0, 1e3, 4.0], "float32"))
    keras_to_torch(k32, th)
    assert torch.isfinite(th.running_var).all() and float(th.running_var[1]) == 1000.0


def _state_np(layer: Any) -> list[np.ndarray]:
    return [np.asarray(w).copy() for w in layer.get_weights()]


def test_a_frozen_side_is_measured_as_it_trains_and_noted() -> None:
    """A Keras layer with trainable=False normalizes with its moving statistics also in
    training; a torch module that is not frozen does not: the report measures that difference
    and says why, and a frozen torch module matches it."""
    k = _keras_bn(keras.layers.BatchNormalization, 4, seed=3)
    k.trainable = False
    t = nn.BatchNorm1d(4)
    row = keras_to_torch(k, t).layers[0]
    assert row.max_abs_diff_train > 0.1 and any("trainable=False" in n for n in row.notes)
    batchnorm.freeze(t)
    row = keras_to_torch(k, t).layers[0]
    assert row.max_abs_diff_train < 1e-5 and row.notes == ()

    k2 = _keras_bn(keras.layers.BatchNormalization, 4, seed=4)
    row = torch_to_keras(t, k2).layers[0]
    assert row.max_abs_diff_train > 0.1 and any("layer.trainable = False" in n for n in row.notes)
    k2.trainable = False
    row = torch_to_keras(t, k2).layers[0]
    assert row.max_abs_diff_train < 1e-5 and row.notes == ()


def test_a_frozen_batchnorm_converts_both_ways_without_a_momentum() -> None:
    """FrozenBatchNorm holds γ, β and the statistics as buffers: it converts to and from a
    Keras layer like any BN (the fixed map equal in eval mode, and in training mode once the
    Keras layer is frozen too); having no momentum, Keras' is kept and it gets none."""
    k = _keras_bn(keras.layers.BatchNormalization, 4, seed=6)
    frozen = batchnorm.FrozenBatchNorm1d(4)
    report = keras_to_torch(k, frozen)
    row = report.layers[0]
    assert row.max_abs_diff_eval < 1e-5 and row.momentum == (k.momentum, None)
    assert any("FrozenBatchNorm" in n for n in row.notes)  # trainable Keras layer: noted
    assert not hasattr(frozen, "momentum")
    np.testing.assert_allclose(frozen.running_var.numpy(), k.moving_variance.numpy())
    np.testing.assert_allclose(frozen.weight.numpy(), k.gamma.numpy())
    k.trainable = False
    assert keras_to_torch(k, frozen).layers[0].max_abs_diff_train < 1e-5

    k2 = _keras_bn(keras.layers.BatchNormalization, 4, seed=7, momentum=0.9)
    k2.trainable = False
    row = torch_to_keras(frozen, k2).layers[0]
    assert row.max_abs_diff_eval < 1e-5 and row.max_abs_diff_train < 1e-5
    assert k2.momentum == 0.9 and row.momentum == (None, 0.9)
    np.testing.assert_allclose(k2.moving_mean.numpy(), frozen.running_mean.numpy())
    k4 = _keras_bn(keras.layers.BatchNormalization, 4, rank=4)
    with pytest.raises(ValueError, match=r"normalizes 4D inputs.*takes 2D or 3D"):
        keras_to_torch(k4, frozen)


def test_swapped_arguments_and_a_lazy_module_are_refused_with_the_way_out() -> None:
    k = _keras_bn(keras.layers.BatchNormalization, 4)
    t = nn.BatchNorm1d(4)
    with pytest.raises(TypeError, match=r"^keras_to_torch: the source must be a Keras .*swap"):
        keras_to_torch(t, k)
    with pytest.raises(TypeError, match=r"^torch_to_keras: the target must be a Keras .*swap"):
        torch_to_keras(k, t)
    with pytest.raises(
        TypeError, match=r"^torch_to_keras: the source must be a torch.nn.Module, got ndarray\.$"
    ):
        torch_to_keras(np.zeros(4), k)
    with pytest.raises(ValueError, match=r"lazy and has not seen an input yet.*Run the model once"):
        keras_to_torch(k, nn.LazyBatchNorm1d())


def test_variant_targets_say_why_their_outputs_differ() -> None:
    k = _keras_bn(keras.layers.BatchNormalization, 4, seed=5)
    ghost = batchnorm.GhostBatchNorm1d(4, virtual_batch_size=8)
    assert any("virtual batches of 8" in n for n in keras_to_torch(k, ghost).layers[0].notes)
    abn = batchnorm.InPlaceABN(4)
    assert any("leaky_relu" in n for n in keras_to_torch(k, abn).layers[0].notes)


def test_subclasses_get_the_rank_check_and_negative_eps_is_refused_by_name() -> None:
    class MyBN2d(nn.BatchNorm2d):
        pass

    k2 = _keras_bn(keras.layers.BatchNormalization, 8)  # built on 2-D input
    for target in (MyBN2d(8), batchnorm.BatchRenorm2d(8)):
        with pytest.raises(ValueError, match=r"^keras_to_torch: .* normalizes 2D inputs"):
            keras_to_torch(k2, target)
    k4 = _keras_bn(keras.layers.BatchNormalization, 8, rank=4)
    with pytest.raises(ValueError, match=r"normalizes 4D inputs.*takes 2D or 3D"):
        keras_to_torch(k4, batchnorm.GhostBatchNorm1d(8, virtual_batch_size=4))

    k_neg = keras.layers.BatchNormalization(epsilon=-1e-4)
    k_neg.build((None, 4))
    with pytest.raises(ValueError, match=r"^keras_to_torch: the source's eps is -0.0001"):
        keras_to_torch(k_neg, nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"^torch_to_keras: the source's eps is -0.0001"):
        torch_to_keras(nn.BatchNorm1d(4, eps=-1e-4), _keras_bn(keras.layers.BatchNormalization, 4))
    # with eps="keep" the target's ε counts too: the layer named is the target
    keras_ok = _keras_bn(keras.layers.BatchNormalization, 4, name="keras_ok")
    with pytest.raises(ValueError, match=r"the target's eps is -0.0001, in module 'BatchNorm1d'"):
        keras_to_torch(keras_ok, nn.BatchNorm1d(4, eps=-1e-4), eps="keep")
    k_neg2 = keras.layers.BatchNormalization(epsilon=-1e-4, name="keras_neg")
    k_neg2.build((None, 4))
    with pytest.raises(ValueError, match=r"the target's eps is -0.0001, in layer 'keras_neg'"):
        torch_to_keras(nn.BatchNorm1d(4), k_neg2, eps="keep")
