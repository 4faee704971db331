"""batchnorm.keras.BatchNormalization against Keras' own layer (the oracle), with the torch backend
(KERAS_BACKEND=torch is set in conftest.py)."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")

import batchnorm.keras as bk  # noqa: E402
from batchnorm import reference  # noqa: E402
from batchnorm.functional import NonFiniteStatisticsError, NonFiniteStatisticsWarning  # noqa: E402
from batchnorm.keras import BatchNormalization  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="these tests run with KERAS_BACKEND=torch"
)

ROOT = Path(__file__).resolve().parents[1]

# (input shape, axis): dense, conv channels_last, conv channels_first, sequence
LAYOUTS = [((16, 6), -1), ((8, 5, 5, 3), -1), ((8, 3, 5, 5), 1), ((4, 7, 6), -1)]


def _pair(shape: tuple[int, ...], axis: int, seed: int = 0, **kwargs: Any) -> tuple[Any, Any]:
    """Our layer and Keras' layer, built, with the same random (non-default) weights."""
    ours = BatchNormalization(axis=axis, **kwargs)
    ref = keras.layers.BatchNormalization(axis=axis, **kwargs)
    ours.build(shape)
    ref.build(shape)
    rng = np.random.default_rng(seed)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in ref.get_weights()]
    ref.set_weights(weights)
    ours.set_weights(weights)
    return ours, ref


def _forward_backward(
    layer: Any, x: np.ndarray, upstream: np.ndarray, training: bool | None, mask: Any = None
) -> list[np.ndarray]:
    """Output, input gradient and parameter gradients of sum(y * upstream)."""
    for v in layer.trainable_variables:
        v.value.grad = None
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt, training=training, mask=mask)
    (y * torch.tensor(upstream)).sum().backward()
    grads = [v.value.grad for v in layer.trainable_variables]
    assert xt.grad is not None and all(g is not None for g in grads)
    return [y.detach().numpy(), xt.grad.numpy(), *[g.numpy() for g in grads]]


def _assert_close(a: list[np.ndarray], b: list[np.ndarray], tol: float = 2e-5) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


def _state(layer: Any) -> list[np.ndarray]:
    return [np.asarray(w) for w in layer.get_weights()]


# ---------------------------------------------------------------------------------------------
# equivalence with keras.layers.BatchNormalization


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_matches_keras_outputs_gradients_moving_stats(
    shape: tuple[int, ...], axis: int, training: bool
) -> None:
    ours, ref = _pair(shape, axis, momentum=0.9)
    rng = np.random.default_rng(1)
    for _step in range(3):  # several steps: the moving statistics compound
        x = (rng.standard_normal(shape) * 3 + 2).astype("float32")
        up = rng.standard_normal(shape).astype("float32")
        _assert_close(
            _forward_backward(ours, x, up, training), _forward_backward(ref, x, up, training)
        )
        _assert_close(_state(ours), _state(ref))
    if training:  # the moving statistics moved (the comparison above was not vacuous)
        assert not np.allclose(_state(ours)[2], _pair(shape, axis)[0].get_weights()[2])


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple),
    axis_pick=st.integers(0, 1),
    momentum=st.floats(0.0, 1.0),
    epsilon=st.floats(1e-5, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference_any_shape_axis_momentum(
    shape: tuple[int, ...], axis_pick: int, momentum: float, epsilon: float, seed: int
) -> None:
    # the float64 NumPy reference is the oracle here: Keras' own layer computes the variance as
    # E[x²] − E[x]², which in float32 loses most digits when |mean| ≫ spread (hypothesis finds
    # such inputs at once), so it cannot serve as an oracle over arbitrary data
    axis = [-1, 1][axis_pick] if len(shape) > 2 else -1
    shape = (shape[0] + 1, *shape[1:])  # at least 2 samples
    layer, _ = _pair(shape, axis, seed=seed, momentum=momentum, epsilon=epsilon)
    gamma, beta, mm, mv = _state(layer)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype("float32")
    up = rng.standard_normal(shape).astype("float32")
    out = _forward_backward(layer, x, up, True)
    eps = layer.epsilon
    y, _, mean, var = reference.batch_norm_forward(x, gamma, beta, eps, axis=axis)
    dx, dgamma, dbeta = reference.batch_norm_backward(up, x, gamma, eps, axis=axis)
    scale = float(np.abs(dx).max()) + 1.0
    _assert_close(out[:1], [y], 1e-4)
    np.testing.assert_allclose(out[1], dx, rtol=1e-3, atol=1e-4 * scale)
    _assert_close(out[2:], [dgamma, dbeta], 1e-3)
    count = reference.channel_count(shape, axis)
    rm, rv = reference.running_stats_update(mm, mv, mean, var, count, 1 - momentum, unbiased=False)
    _assert_close(_state(layer)[2:], [rm, rv], 1e-5)


@pytest.mark.parametrize(("center", "scale"), [(False, True), (True, False), (False, False)])
def test_matches_keras_without_center_or_scale(center: bool, scale: bool) -> None:
    shape = (8, 4, 4, 3)
    ours, ref = _pair(shape, -1, center=center, scale=scale, epsilon=1e-2)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype("float32")
    up = rng.standard_normal(shape).astype("float32")
    for training in (True, False):
        _assert_close(
            _forward_backward(ours, x, up, training), _forward_backward(ref, x, up, training)
        )
        _assert_close(_state(ours), _state(ref))


def test_trainable_false_means_inference_mode() -> None:
    shape = (16, 5)
    ours, ref = _pair(shape, -1)
    ours.trainable = False
    ref.trainable = False
    before = _state(ours)
    x = np.random.default_rng(3).standard_normal(shape).astype("float32") + 4
    y_ours = ours(torch.tensor(x), training=True)
    y_ref = ref(torch.tensor(x), training=True)
    np.testing.assert_allclose(y_ours.detach().numpy(), y_ref.detach().numpy(), atol=2e-5)
    # inference mode: the output is not batch-normalized and the state did not move
    assert abs(float(y_ours.mean())) > 0.5
    _assert_close(_state(ours), before, tol=0)


def test_mask_matches_keras() -> None:
    shape = (6, 9, 4)
    ours, ref = _pair(shape, -1, momentum=0.8)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype("float32") * 2
    mask = torch.tensor(rng.random(shape[:2]) > 0.4)
    up = rng.standard_normal(shape).astype("float32")
    _assert_close(
        _forward_backward(ours, x, up, True, mask), _forward_backward(ref, x, up, True, mask)
    )
    _assert_close(_state(ours), _state(ref))
    with pytest.raises(ValueError, match="one dimension less"):
        ours(torch.tensor(x), training=True, mask=torch.ones(shape, dtype=torch.bool))


def test_mask_from_a_masking_layer_matches_keras() -> None:
    # a model whose Masking layer hands the mask to the BN layer (padded time steps)
    x = np.random.default_rng(9).standard_normal((6, 8, 3)).astype("float32") + 2
    x[:, 5:] = 0.0  # padding: excluded from the statistics
    outs, states = [], []
    for cls in (BatchNormalization, keras.layers.BatchNormalization):
        model = keras.Sequential(
            [keras.Input((8, 3)), keras.layers.Masking(0.0), cls(momentum=0.5)]
        )
        outs.append(model(x, training=True).detach().numpy())
        states.append(_state(model.layers[-1]))
    _assert_close(outs[:1], outs[1:])
    _assert_close(states[0], states[1])
    # the padding did not enter the statistics
    np.testing.assert_allclose(states[0][2], 0.5 * x[:, :5].mean(axis=(0, 1)), rtol=1e-5)


def test_batch_of_one_matches_keras() -> None:
    # Keras allows a single value per channel in training (σ² = 0, output β)
    ours, ref = _pair((1, 5), -1)
    x = np.random.default_rng(5).standard_normal((1, 5)).astype("float32")
    up = np.ones((1, 5), "float32")
    _assert_close(_forward_backward(ours, x, up, True), _forward_backward(ref, x, up, True))
    _assert_close(_state(ours), _state(ref))


def test_float64_matches_reference_and_keras() -> None:
    # float64 is checked against the NumPy reference: Keras' own layer computes the variance as
    # E[x²] − E[x]², which loses about half the float64 digits, so it is only a loose oracle here
    shape = (10, 3, 3, 4)
    ours, ref = _pair(shape, -1, dtype="float64", momentum=0.7)
    gamma, beta, mm, mv = _state(ours)
    x = np.random.default_rng(6).standard_normal(shape) * 5 + 3
    up = np.random.default_rng(7).standard_normal(shape)
    out = _forward_backward(ours, x, up, True)
    assert out[0].dtype == np.float64
    y, _, mean, var = reference.batch_norm_forward(x, gamma, beta, 1e-3, axis=-1)
    dx, dgamma, dbeta = reference.batch_norm_backward(up, x, gamma, 1e-3, axis=-1)
    _assert_close(out, [y, dx, dgamma, dbeta], tol=1e-12)
    rm, rv = reference.running_stats_update(mm, mv, mean, var, 360, 0.3, unbiased=False)
    _assert_close(_state(ours)[2:], [rm, rv], tol=1e-12)
    _assert_close(out, _forward_backward(ref, x, up, True), tol=1e-5)
    _assert_close(_state(ours), _state(ref), tol=1e-5)


# ---------------------------------------------------------------------------------------------
# our core is used; the fallback when it cannot be


def test_runs_on_the_functional_core(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"train": 0, "eval": 0}
    real_train, real_eval = bk.F.batch_norm_train, bk.F.batch_norm_eval

    def train(*a: Any, **k: Any) -> Any:
        calls["train"] += 1
        return real_train(*a, **k)

    def eval_(*a: Any, **k: Any) -> Any:
        calls["eval"] += 1
        return real_eval(*a, **k)

    monkeypatch.setattr(bk.F, "batch_norm_train", train)
    monkeypatch.setattr(bk.F, "batch_norm_eval", eval_)
    layer = BatchNormalization()
    x = torch.randn(8, 3)
    layer(x, training=True)
    layer(x, training=False)
    assert calls == {"train": 1, "eval": 1}


def test_other_keras_backend_falls_back_to_keras_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bk, "_keras_backend", lambda: "jax")
    monkeypatch.setattr(bk, "_WARNED_BACKEND", False)

    def fail(*a: Any, **k: Any) -> Any:
        raise AssertionError("the core must not run on a non-torch Keras backend")

    monkeypatch.setattr(bk.F, "batch_norm_train", fail)
    monkeypatch.setattr(bk.F, "batch_norm_eval", fail)
    with pytest.warns(UserWarning, match="'jax'"):
        ours = BatchNormalization(axis=-1)
    assert not bk.uses_batchnorm_core()
    ref = keras.layers.BatchNormalization()
    x = np.random.default_rng(7).standard_normal((8, 3)).astype("float32")
    for layer in (ours, ref):
        layer.build(x.shape)
    y_ours, y_ref = ours(x, training=True), ref(x, training=True)
    np.testing.assert_allclose(np.asarray(y_ours.detach()), np.asarray(y_ref.detach()), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# arguments, non-finite batches, serialization


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="momentum must be a finite number"):
        BatchNormalization(momentum=float("nan"))
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        BatchNormalization(epsilon=-1e-3)
    with pytest.raises(ValueError, match="nonfinite"):
        BatchNormalization(nonfinite="ignore")  # type: ignore[arg-type]
    # as Keras: TensorFlow only; named, with the torch-side remedy
    with pytest.raises(
        ValueError, match=r"^BatchNormalization\(bn_s\): synchronized=True .*SyncBatchNorm"
    ):
        BatchNormalization(synchronized=True, name="bn_s")
    for axis in ([1, 2], True, 1.5):
        with pytest.raises(TypeError, match="axis must be one integer"):
            BatchNormalization(axis=axis)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"axis=3 is out of range for inputs of rank 3"):
        BatchNormalization(axis=3)(torch.randn(4, 5, 6), training=True)


def test_numpy_integer_axis_as_keras() -> None:
    x = np.random.default_rng(0).standard_normal((8, 3, 4)).astype("float32")
    for axis in (np.int64(1), np.int32(-1)):
        ours, ref = _pair(x.shape, axis)  # type: ignore[arg-type]
        assert ours.axis == ref.axis and type(ours.axis) is int
        assert ours.get_config()["axis"] == ref.get_config()["axis"]
        _assert_close(
            _forward_backward(ours, x, np.ones_like(x), True),
            _forward_backward(ref, x, np.ones_like(x), True),
        )


def test_epsilon_zero_as_keras() -> None:
    x = np.random.default_rng(1).standard_normal((16, 5)).astype("float32")
    up = np.random.default_rng(2).standard_normal(x.shape).astype("float32")
    for training in (True, False):
        ours, ref = _pair(x.shape, -1, epsilon=0.0)
        assert ours.epsilon == 0.0
        _assert_close(
            _forward_backward(ours, x, up, training), _forward_backward(ref, x, up, training)
        )
        _assert_close(_state(ours), _state(ref))


def test_momentum_outside_unit_interval_warns_and_follows_keras() -> None:
    x = np.random.default_rng(3).standard_normal((16, 4)).astype("float32")
    with pytest.warns(UserWarning, match=r"momentum=1.01 is outside \[0, 1\]"):
        ours, ref = _pair(x.shape, -1, momentum=1.01)
    assert ours.momentum == ref.momentum == 1.01
    ours(x, training=True)
    ref(x, training=True)
    _assert_close(_state(ours), _state(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchNormalization(momentum=1.0)
        BatchNormalization(momentum=0)


def test_positional_arguments_in_keras_order() -> None:
    ours = list(inspect.signature(BatchNormalization).parameters)
    theirs = [
        n
        for n, p in inspect.signature(keras.layers.BatchNormalization).parameters.items()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert ours[: len(theirs)] == theirs
    if "renorm" in theirs:
        args = (-1, 0.9, 1e-2, True, True, "zeros", "ones", "zeros", "ones", None, None)
        args += (None, None, True, {"rmax": 2.0}, 0.5)
        layer = BatchNormalization(*args)
        ref = keras.layers.BatchNormalization(*args)
        assert (layer.renorm, layer.renorm_clipping, layer.renorm_momentum) == (
            True,
            {"rmax": 2.0},
            0.5,
        )
        config = layer.get_config()
        for key, value in ref.get_config().items():
            if key != "name":
                assert config[key] == value, key


def test_empty_batch_is_an_empty_output_without_warnings() -> None:
    layer = BatchNormalization()
    layer(torch.randn(8, 3), training=True)
    before = _state(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(torch.zeros(0, 3), training=True)
    assert tuple(y.shape) == (0, 3)
    _assert_close(_state(layer), before, tol=0)


def test_nonfinite_batch_never_reaches_moving_stats() -> None:
    layer = BatchNormalization()
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    layer.build(x.shape)
    before = _state(layer)
    with pytest.warns(NonFiniteStatisticsWarning):
        layer(x, training=True)
    _assert_close(_state(layer), before, tol=0)
    strict = BatchNormalization(nonfinite="raise")
    with pytest.raises(NonFiniteStatisticsError):
        strict(x, training=True)


def test_renorm_keeps_the_nonfinite_policy() -> None:
    # Keras' renorm step is Keras' own; a NaN batch would have written NaN into moving_mean,
    # moving_variance and moving_stddev, whatever nonfinite said
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    layer = BatchNormalization(renorm=True)
    layer.build(x.shape)
    layer(torch.randn(8, 3), training=True)  # a finite step first: its update is kept
    before = _state(layer)
    with pytest.warns(NonFiniteStatisticsWarning) as caught:
        layer(x, training=True)
    assert caught[0].filename == __file__  # the user's line, not Keras' call machinery
    _assert_close(_state(layer), before, tol=0)
    assert all(np.isfinite(w).all() for w in _state(layer))
    strict = BatchNormalization(renorm=True, nonfinite="raise")
    strict.build(x.shape)
    before = _state(strict)
    with pytest.raises(NonFiniteStatisticsError):
        strict(x, training=True)
    _assert_close(_state(strict), before, tol=0)
    with warnings.catch_warnings():  # inference and finite batches: no check fires
        warnings.simplefilter("error")
        strict(x, training=False)
        strict(torch.randn(8, 3), training=True)


def test_nonfinite_warnings_name_the_line_that_called_the_layer() -> None:
    x = torch.randn(8, 3)
    x[0, 0] = float("inf")
    layer = BatchNormalization()
    with pytest.warns(NonFiniteStatisticsWarning) as caught:
        layer(x, training=True)
    assert caught[0].filename == __file__, caught[0].filename


def test_rank_one_input_trains_as_one_value_per_channel() -> None:
    # no batch axis: every channel holds one value (σ²_B = 0, output β exactly)
    layer = BatchNormalization(center=True)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    layer.build(x.shape)
    layer.beta.assign(np.full(5, 0.25, "float32"))
    y = layer(x, training=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), np.full(5, 0.25, "float32"))
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.01 * x.numpy(), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), np.full(5, 0.99), rtol=1e-6)


def test_a_mask_that_does_not_fit_the_inputs_is_named() -> None:
    layer = BatchNormalization(name="bn_mask")
    x = torch.randn(4, 6, 3)
    for training in (True, False):
        with pytest.raises(ValueError, match=r"bn_mask.*a mask of shape \(4, 5\) does not fit"):
            layer(x, training=training, mask=torch.ones(4, 5, dtype=torch.bool))
    layer(x, training=True, mask=torch.ones(4, 1, dtype=torch.bool))  # broadcasts, as Keras


def test_config_roundtrip() -> None:
    layer = BatchNormalization(
        axis=1,
        momentum=0.8,
        epsilon=1e-4,
        center=False,
        gamma_initializer="random_uniform",
        gamma_regularizer=keras.regularizers.L2(1e-3),
        beta_constraint=keras.constraints.NonNeg(),
        compute_backend="torch",
        nonfinite="raise",
        name="bn_a",
    )
    config = layer.get_config()
    clone = BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert (clone.axis, clone.momentum, clone.epsilon, clone.center) == (1, 0.8, 1e-4, False)
    assert (clone.compute_backend, clone.nonfinite) == ("torch", "raise")
    # the same keys as Keras' layer, plus ours: a Keras config loads into our layer
    ref_config = keras.layers.BatchNormalization().get_config()
    assert set(config) - set(ref_config) == {"compute_backend", "nonfinite"}
    ref_config.pop("name")
    assert isinstance(BatchNormalization.from_config(ref_config), keras.layers.BatchNormalization)


def test_save_and_load_keras_file(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5),
            BatchNormalization(momentum=0.5, nonfinite="raise"),
            keras.layers.Activation("tanh"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(8).standard_normal((32, 6)).astype("float32") + 1
    model.fit(x, np.zeros((32, 5), "float32"), epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    bn = loaded.layers[1]
    assert type(bn) is BatchNormalization and bn.nonfinite == "raise"
    _assert_close(_state(bn), _state(model.layers[1]), tol=0)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


def test_import_batchnorm_does_not_import_keras() -> None:
    code = "import sys, batchnorm; sys.exit('keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---------------------------------------------------------------------------------------------
# the classic examples: our layer trains as well as Keras' own on the same data and seed


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"_example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread() -> Any:
    # keras' per-step overhead dominates these tiny models; one intra-op thread per test worker
    # avoids oversubscribing the cores under pytest -n
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["keras_dense", "keras_cnn"])
def test_classic_example_trains_like_keras(name: str, one_thread: None) -> None:
    example = _example(name)
    config = example.Config.quick()
    ours = example.run(config, layer="batchnorm")
    ref = example.run(config, layer="keras")
    # both learned (well above the chance level) ...
    assert ours["val_accuracy"] > example.CHANCE + 0.2, ours
    assert ref["val_accuracy"] > example.CHANCE + 0.2, ref
    # ... and alike: same data, seed and dropout masks, and the two layers agree to float32
    # rounding, so the runs differ by rounding amplified through training only; a gap of more
    # than TOLERANCE (a few validation samples at the quick size) means different behaviour.
    assert abs(ours["val_accuracy"] - ref["val_accuracy"]) <= example.TOLERANCE, (ours, ref)
    assert abs(ours["loss"] - ref["loss"]) <= 0.1 * ref["loss"] + 1e-3, (ours, ref)


def test_cnn_example_falls_back_to_digits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    example = _example("keras_cnn")
    monkeypatch.setattr(example, "FASHION_MNIST", tmp_path / "absent")
    x, y, x_test, y_test, source = example.load_data(example.Config.quick())
    assert "digits" in source
    assert x.shape == (640, 28, 28, 1) and x_test.shape == (300, 28, 28, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    # the 8×8 digit sits upsampled in the middle: the 2-pixel border is empty
    assert x[:, :2].max() == 0.0 and x[:, 2:26, 2:26].max() > 0.5


def test_momenta_and_epsilon_must_be_numbers_and_renorm_momentum_finite() -> None:
    with pytest.raises(TypeError, match=r"momentum must be a number, got None \(PyTorch's"):
        BatchNormalization(momentum=None)  # type: ignore[arg-type]
    for kwargs in ({"epsilon": None}, {"momentum": "0.9"}, {"renorm_momentum": [0.9]}):
        with pytest.raises(TypeError, match=rf"{next(iter(kwargs))} must be a number"):
            BatchNormalization(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="renorm_momentum must be a finite number"):
        BatchNormalization(renorm=True, renorm_momentum=float("nan"))
    with pytest.warns(UserWarning, match=r"renorm_momentum=1.5 is outside \[0, 1\]"):
        BatchNormalization(renorm=True, renorm_momentum=1.5)


@pytest.mark.parametrize("training", [False, True])
def test_errors_from_every_path_name_the_layer(training: bool) -> None:
    layer = BatchNormalization(name="my_bn")
    layer.build((4, 3))
    layer.epsilon = -1e-3
    x = torch.ones(4, 3)
    with pytest.raises(ValueError, match=r"my_bn.*eps must be >= 0"):
        layer(x, training=training, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"my_bn.*eps must be >= 0"):
        layer(x, training=training)
