"""batchnorm.keras.BatchNormalization as a drop-in for keras.layers.BatchNormalization inside
models: fit/predict/evaluate, frozen layers, dtype policies, weight order, error messages (the
torch backend; KERAS_BACKEND=torch is set in conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")

from batchnorm.functional import NonFiniteStatisticsWarning  # noqa: E402
from batchnorm.keras import BatchNormalization  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="these tests run with KERAS_BACKEND=torch"
)

KerasBN = keras.layers.BatchNormalization


@pytest.fixture
def float32_policy_after() -> Iterator[None]:
    """Restore the global dtype policy a test changes."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def _model(cls: Any, shape: tuple[int, ...], axis: int = -1, **kwargs: Any) -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape),
            cls(axis=axis, momentum=0.8, **kwargs),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def _fit_both(shape: tuple[int, ...], axis: int = -1, **kwargs: Any) -> tuple[Any, Any, Any]:
    """Our model and Keras' with the same initial weights, after two epochs of four steps."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((32, *shape)) * 2 + 1).astype("float32")
    y = rng.standard_normal((32, 2)).astype("float32")
    ours, ref = _model(BatchNormalization, shape, axis, **kwargs), _model(KerasBN, shape, axis)
    ref.set_weights(ours.get_weights())
    for model in (ours, ref):
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
    return ours, ref, x


def _assert_weights_equal(a: list[Any], b: list[Any], tol: float) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# inside models: fit, predict, evaluate, model(x, training=True)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((6,), -1), ((5, 4), -1), ((3, 5), 1), ((4, 4, 3), -1), ((3, 4, 4), 1), ((2, 3, 3, 3), 1)],
)
def test_fit_predict_evaluate_match_keras(shape: tuple[int, ...], axis: int) -> None:
    ours, ref, x = _fit_both(shape, axis)
    _assert_weights_equal(ours.get_weights(), ref.get_weights(), 1e-5)
    bn = ours.layers[0]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)  # fit moved the moving statistics
    np.testing.assert_allclose(
        ours.predict(x, verbose=0), ref.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    y = np.zeros((len(x), 2), "float32")
    assert ours.evaluate(x, y, verbose=0) == pytest.approx(ref.evaluate(x, y, verbose=0), 1e-5)
    before = [w.copy() for w in bn.get_weights()]
    _assert_weights_equal([ours(x, training=True).detach()], [ref(x, training=True).detach()], 1e-5)
    # model(x, training=True) updates the moving statistics, as Keras' layer does
    assert not np.allclose(bn.get_weights()[2], before[2])
    _assert_weights_equal(ours.get_weights(), ref.get_weights(), 1e-5)


def test_weights_order_count_and_set_weights_across_layers() -> None:
    for kwargs in ({}, {"center": False}, {"scale": False}):
        ours, ref = BatchNormalization(**kwargs), KerasBN(**kwargs)
        ours.build((4, 3))
        ref.build((4, 3))
        assert [w.name for w in ours.weights] == [w.name for w in ref.weights]
        assert ours.count_params() == ref.count_params()
        values = [np.arange(3, dtype="float32") + i for i in range(len(ref.weights))]
        ours.set_weights(values)
        ref.set_weights(ours.get_weights())
        _assert_weights_equal(ref.get_weights(), values, 0)


# ---------------------------------------------------------------------------------------------
# frozen layers: trainable=False means inference mode, also inside fit


@pytest.mark.parametrize("how", ["layer_after_build", "outer_model", "after_compile"])
def test_frozen_layer_runs_in_inference_mode_inside_fit(how: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 5)) * 2 + 3).astype("float32")
    y = rng.standard_normal((16, 5)).astype("float32")
    states, outputs = [], []
    for cls in (BatchNormalization, KerasBN):
        keras.utils.set_random_seed(0)
        inner = keras.Sequential([keras.Input((5,)), cls(momentum=0.5)])
        model = keras.Sequential([keras.Input((5,)), inner, keras.layers.Dense(5)])
        bn = inner.layers[0]
        if how == "layer_after_build":
            bn.trainable = False
        elif how == "outer_model":
            inner.trainable = False
        model.compile(optimizer="sgd", loss="mse")
        if how == "after_compile":
            bn.trainable = False
        before = [w.copy() for w in bn.get_weights()]
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        _assert_weights_equal(bn.get_weights(), before, 0)  # nothing moved
        states.append(bn.get_weights())
        outputs.append(model(x, training=True).detach().numpy())
    _assert_weights_equal(states[0], states[1], 0)
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# dtype policies


@pytest.mark.parametrize(
    "policy", ["mixed_float16", "mixed_bfloat16", "float16", "bfloat16", "float64"]
)
def test_dtype_policies_as_keras(policy: str, float32_policy_after: None) -> None:
    keras.mixed_precision.set_global_policy(policy)
    ours, ref = BatchNormalization(momentum=0.5), KerasBN(momentum=0.5)
    x = torch.tensor(np.random.default_rng(2).standard_normal((16, 4)) * 3 + 2)
    for layer in (ours, ref):
        layer.build(x.shape)
    y_ours, y_ref = ours(x, training=True), ref(x, training=True)
    assert y_ours.dtype == y_ref.dtype
    assert [v.dtype for v in ours.weights] == [v.dtype for v in ref.weights]
    tol = {"float16": 2e-3, "bfloat16": 2e-2}.get(policy, 1e-5)
    np.testing.assert_allclose(
        y_ours.detach().float().numpy(), y_ref.detach().float().numpy(), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_variables_moving_stats_rounded_once_as_keras(dtype: str) -> None:
    # Keras blends the moving statistics in float32 and rounds once into the half-precision
    # variables; a blend in half precision rounds twice and lands an ulp off in places
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((64, 32)) * 3 + 7, dtype=getattr(torch, dtype))
    ours, ref = BatchNormalization(momentum=0.9, dtype=dtype), KerasBN(momentum=0.9, dtype=dtype)
    for layer in (ours, ref):
        layer.build(x.shape)
    weights = [rng.uniform(0.5, 1.5, w.shape) for w in ref.get_weights()]
    for layer in (ours, ref):
        layer.set_weights(weights)
    for _ in range(3):
        ours(x, training=True)
        ref(x, training=True)
        _assert_weights_equal(
            [np.asarray(w, "float64") for w in ours.get_weights()],
            [np.asarray(w, "float64") for w in ref.get_weights()],
            0,
        )


def test_half_variables_refuse_a_variance_beyond_their_range() -> None:
    # a float16 moving variance cannot hold 1e6: the batch is refused, not stored as inf
    layer = BatchNormalization(momentum=0.0, dtype="float16")
    x = torch.tensor([[0.0], [2000.0]], dtype=torch.float16)
    layer.build(x.shape)
    before = [w.copy() for w in layer.get_weights()]
    with pytest.warns(NonFiniteStatisticsWarning):
        layer(x, training=True)
    _assert_weights_equal(layer.get_weights(), before, 0)
    layer(torch.tensor([[0.0], [2.0]], dtype=torch.float16), training=True)  # in range: stored
    np.testing.assert_allclose(np.asarray(layer.get_weights()[2:], "float64"), [[1.0], [1.0]])


# ---------------------------------------------------------------------------------------------
# errors name the layer, the shape and a remedy


def test_unknown_channel_count_error_names_layer_shape_and_remedy() -> None:
    with pytest.raises(ValueError, match=r"BatchNormalization\('bn_a'\).*\(None, None\).*keras"):
        keras.Sequential([keras.Input((None,)), BatchNormalization(name="bn_a")])
    with pytest.raises(
        ValueError, match=r"\(axis=1\) of the input shape \(None, None, 4\) has unknown size"
    ):
        BatchNormalization(axis=1).build((None, None, 4))


def test_wrong_channel_count_error_names_layer_shape_and_remedy() -> None:
    layer = BatchNormalization(name="bn_b")
    layer(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"'bn_b', 5 channels, axis=-1\).*\(4, 6\).*check the"):
        layer(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"'bn_b'.*ndim=2.*own BatchNormalization layer"):
        layer(torch.randn(4, 2, 5))
    # a channels_first model built with the channels_last default is caught at the next input
    model = keras.Sequential([keras.Input((3, 8, 8)), BatchNormalization()])
    with pytest.raises(ValueError, match=r"8 channels, axis=-1.*1 for channels_first"):
        model(torch.randn(2, 3, 8, 5))
