"""The module shells as drop-ins for torch.nn.BatchNorm1d/2d/3d, the any-axis BatchNorm, the
conventions, checkpoint interop, conversion and the error messages."""

import collections
import copy
import inspect
import io
import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import batchnorm
from batchnorm import functional as F
from batchnorm import reference as ref

PAIRS = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (16, 6)),
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (8, 6, 5)),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 3)),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 6, 3, 4, 2)),
]

VARIANTS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
]


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("kwargs", VARIANTS)
def test_drop_in_equivalence_over_training_and_eval(ours_cls, torch_cls, shape, kwargs) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    ours = ours_cls(6, dtype=torch.float64, **kwargs)
    theirs = torch_cls(6, dtype=torch.float64, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, name) == getattr(theirs, name)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1) if kwargs.get("affine", True) else None
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1) if kwargs.get("affine", True) else None
    for step in range(4):
        x = torch.randn(shape, dtype=torch.float64) * (step + 1) + step
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        torch.testing.assert_close(yo, yt, rtol=1e-10, atol=1e-10)
        w = torch.randn(shape, dtype=torch.float64)
        (yo * w).sum().backward()
        (yt * w).sum().backward()
        torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-9, atol=1e-10)
        if opt_o is not None and opt_t is not None:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-10)
            opt_o.step(), opt_t.step()
            opt_o.zero_grad(), opt_t.zero_grad()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-10, atol=1e-12)
    ours.eval(), theirs.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_checkpoints_load_both_ways(ours_cls, torch_cls, shape) -> None:  # type: ignore[no-untyped-def]
    theirs = torch_cls(6)
    theirs(torch.randn(shape) * 3 + 1)
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    ours = ours_cls(6)
    ours.load_state_dict(torch.load(buf))
    assert int(ours.num_batches_tracked) == 1
    ours(torch.randn(shape))
    back = torch_cls(6)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    # checkpoints from before num_batches_tracked existed still load
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    old_meta = type(theirs.state_dict())(old)
    old_meta._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    ours_cls(6).load_state_dict(old_meta)


def test_channels_last_stays_channels_last_and_matches() -> None:
    x = torch.randn(4, 8, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    ours, theirs = batchnorm.BatchNorm2d(8), nn.BatchNorm2d(8)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, theirs(x))
    y.sum().backward()
    assert x.grad is not None


def test_any_axis_matches_permuted_torch() -> None:
    x = torch.randn(6, 7, 5, dtype=torch.float64)
    ours = batchnorm.BatchNorm(5, axis=-1, dtype=torch.float64)
    theirs = nn.BatchNorm1d(5, dtype=torch.float64)
    y = ours(x)
    y_t = theirs(x.permute(0, 2, 1)).permute(0, 2, 1)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    rank5 = batchnorm.BatchNorm(3, axis=2, dtype=torch.float64)
    z = torch.randn(2, 4, 3, 2, 5, dtype=torch.float64)
    y5, _, _, _ = ref.batch_norm_forward(z.numpy(), axis=2)
    np.testing.assert_allclose(rank5(z).detach().numpy(), y5, rtol=1e-10, atol=1e-10)


def test_cumulative_average_equals_plain_mean_of_batch_statistics() -> None:
    bn = batchnorm.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    xs = [torch.randn(10, 3, dtype=torch.float64) * (i + 1) + i for i in range(5)]
    for x in xs:
        bn(x)
    means = torch.stack([x.mean(0) for x in xs])
    uvars = torch.stack([x.var(0, unbiased=True) for x in xs])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, uvars.mean(0))
    assert int(bn.num_batches_tracked) == 5


def test_ema_identity_over_steps() -> None:
    bn = batchnorm.BatchNorm1d(4, momentum=0.2, dtype=torch.float64)
    rm, rv = np.zeros(4), np.ones(4)
    for i in range(6):
        x = torch.randn(9, 4, dtype=torch.float64) + i
        bn(x)
        mean, var = ref.batch_stats(x.numpy())
        rm, rv = ref.running_stats_update(rm, rv, mean, var, 9, 0.2)
    np.testing.assert_allclose(bn.running_mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), rv, rtol=1e-12)


def test_keras_convention_path() -> None:
    bn = batchnorm.BatchNorm.from_keras(
        4, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=False
    )
    assert bn.momentum == pytest.approx(0.01) and bn.eps == 1e-3
    assert bn.weight is None and bn.bias is not None and not bn.unbiased_running_var
    x = torch.randn(12, 4, dtype=torch.float32)
    bn(x)
    # Keras: moving = 0.99·moving + 0.01·batch, biased variance
    torch.testing.assert_close(bn.running_var, 0.99 + 0.01 * x.var(0, unbiased=False))
    torch.testing.assert_close(bn.running_mean, 0.01 * x.mean(0))
    # Keras' momentum is a number: None (PyTorch's cumulative average) is refused with the way
    with pytest.raises(TypeError, match=r"^BatchNorm.from_keras: .*got None.*momentum=None\)"):
        batchnorm.BatchNorm.from_keras(4, momentum=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^BatchNorm.from_keras: momentum must be a number"):
        batchnorm.BatchNorm.from_keras(4, momentum="0.9")  # type: ignore[arg-type]


def test_nonfinite_input_skips_update_and_counter() -> None:
    bn = batchnorm.BatchNorm1d(3)
    bn(torch.randn(8, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bad = torch.randn(8, 3)
    bad[0, 0] = float("nan")
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning):
        bn(bad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    strict = batchnorm.BatchNorm1d(3, nonfinite="raise")
    with pytest.raises(batchnorm.NonFiniteStatisticsError, match=r"BatchNorm1d\(3\)"):
        strict(bad)


@pytest.mark.parametrize(
    "path",
    ["numba", "numba-python", "torch", "float64", "half", "bfloat16", "script", "trace"],
)
def test_a_broken_channel_in_loaded_statistics_does_not_freeze_the_others(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a checkpoint with NaN in one channel's running statistics (torch.nn stores them): as in
    # torch.nn, that channel stays NaN and the others keep learning from finite batches, with
    # no warning blaming the input
    dtype = {"float64": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}.get(
        path, torch.float32
    )
    backend = "torch" if path in ("torch", "half", "bfloat16") else "auto"
    if path.startswith("numba"):
        backend = "numba"
    if path == "numba-python":
        monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    theirs = nn.BatchNorm2d(4).to(dtype)
    broken = {**theirs.state_dict()}
    broken["running_mean"] = torch.tensor([float("nan"), 0.0, 0.0, 0.0], dtype=dtype)
    broken["running_var"] = torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=dtype)
    theirs.load_state_dict(broken)
    ours = batchnorm.BatchNorm2d(4, backend=backend, nonfinite="raise").to(dtype)
    ours.load_state_dict(broken)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 4, 3, 3, generator=g) * 3 + 2).to(dtype) for _ in range(3)]
    layer: nn.Module = ours
    if path == "script":
        layer = torch.jit.script(ours)
    elif path == "trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            layer = torch.jit.trace(ours, batches[0], check_trace=False)
        layer.load_state_dict(broken)  # undo the step tracing ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in batches:
            theirs(b)
            layer(b)
    state = layer.state_dict()
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(state[name], getattr(theirs, name), equal_nan=True)
    assert int(state["num_batches_tracked"]) == 3
    assert bool(torch.isfinite(state["running_mean"][1:]).all())
    assert bool(torch.isfinite(state["running_var"][[0, 2, 3]]).all())


def test_module_error_messages() -> None:
    with pytest.raises(
        batchnorm.BatchNormInputError,
        match=r"BatchNorm2d\(8\): expected 4D input \(N, C, H, W\), got 3D.*BatchNorm1d",
    ):
        batchnorm.BatchNorm2d(8)(torch.randn(2, 8, 5))
    with pytest.raises(
        batchnorm.BatchNormInputError,
        match=r"BatchNorm1d\(5\): expected 5 channels along axis 1.*axis=-1",
    ):
        batchnorm.BatchNorm1d(5)(torch.randn(4, 3, 5))
    with pytest.raises(
        batchnorm.BatchNormInputError,
        match=r"BatchNorm1d\(5\): expected more than 1 value per channel.*\.eval\(\)",
    ):
        batchnorm.BatchNorm1d(5)(torch.randn(1, 5))
    with pytest.raises(batchnorm.BatchNormInputError, match="floating-point"):
        batchnorm.BatchNorm1d(5)(torch.ones(4, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(5\): momentum must be a finite number"):
        batchnorm.BatchNorm1d(5, momentum=float("nan"))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(5\): eps must be >= 0.*1e-5"):
        batchnorm.BatchNorm1d(5, eps=-1e-5)
    with pytest.raises(ValueError, match=r"BatchNorm1d: num_features must be a positive integer"):
        batchnorm.BatchNorm1d(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="axis 1"):
        batchnorm.BatchNorm2d(5, axis=-1)
    # eval mode accepts a single sample, as torch.nn does
    bn = batchnorm.BatchNorm1d(5).eval()
    assert bn(torch.randn(1, 5)).shape == (1, 5)
    # ... unless the layer has no running statistics: then the remedy is not .eval()
    with pytest.raises(batchnorm.BatchNormInputError, match="keeps no running statistics") as e:
        batchnorm.BatchNorm1d(5, track_running_stats=False).eval()(torch.randn(1, 5))
    assert ".eval()" not in str(e.value) and "(1, 5)" in str(e.value)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: batchnorm.BatchNorm2d(3, **kw),
        lambda **kw: batchnorm.BatchNorm(3, axis=-1, **kw),
        lambda **kw: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2, **kw),
        lambda **kw: batchnorm.BatchRenorm2d(3, **kw),
        lambda **kw: batchnorm.FrozenBatchNorm2d(3, **kw),
    ],
    ids=["BatchNorm2d", "BatchNorm", "GhostBatchNorm2d", "BatchRenorm2d", "FrozenBatchNorm2d"],
)
def test_a_device_mismatch_names_the_layer_the_devices_and_a_remedy(make, training: bool) -> None:
    # input and layer on different devices (meta stands in for an accelerator on this CPU-only
    # suite): torch's own words name neither the layer nor a remedy
    bn = make().train(training)
    name = bn.layer_name()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(batchnorm.BatchNormInputError) as e:
        bn(torch.randn(4, 3, 2, 3, device="meta"))
    message = str(e.value)
    assert message.startswith(f"{name}: the input of shape (4, 3, 2, 3) is on meta")
    assert "running_var on cpu" in message and "model.to(x.device)" in message
    assert isinstance(e.value.__cause__, RuntimeError)  # torch's error kept as the cause
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a layer built on the meta device and never materialized, given real input
    lazy = make(device="meta").train(training)
    with pytest.raises(batchnorm.BatchNormInputError) as e:
        lazy(torch.randn(4, 3, 2, 3))
    message = str(e.value)
    assert message.startswith(f"{name}: ") and "on the meta device" in message
    assert "(4, 3, 2, 3) on cpu" in message and "model.to_empty(device='cpu')" in message
    # the remedy it names works: materialized and reset, the layer is a freshly built one
    assert "reset_parameters()" in message
    lazy.to_empty(device="cpu").reset_parameters()
    fresh = make().train(training)
    for k, v in fresh.state_dict().items():
        assert torch.equal(lazy.state_dict()[k], v), k
    x = torch.randn(4, 3, 2, 3)
    torch.testing.assert_close(lazy(x), fresh(x))


def test_a_failure_on_one_device_keeps_torchs_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # the device check only renames device mismatches: another failure inside torch reaches
    # the caller as it was raised
    bn = batchnorm.BatchNorm2d(3)
    error = RuntimeError("out of memory")

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(batchnorm.functional, "batch_norm_step", fail)
    with pytest.raises(RuntimeError) as e:
        bn(torch.randn(4, 3, 2, 2))
    assert e.value is error
    assert (
        batchnorm.functional.device_error(error, torch.randn(2, 3), {"weight": bn.weight}) is None
    )


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("what", "bad"),
    [
        ("weight", torch.ones(2)),
        ("bias", torch.zeros(4)),
        ("running_mean", torch.zeros(2)),
        ("running_var", torch.ones(1)),
        ("running_mean", torch.zeros(3, dtype=torch.int64)),
    ],
)
def test_a_swapped_per_channel_tensor_of_another_length_is_refused_by_name(
    what: str, bad: Tensor, training: bool, backend: str
) -> None:
    # the kernels read and write C values of each per-channel tensor: a shorter one (model
    # surgery that changed the weight but not the running buffers) must be refused, not read
    # or written past its end; torch.nn refuses it too
    bn = batchnorm.BatchNorm2d(3, backend=backend).train(training)
    if what in ("weight", "bias"):
        setattr(bn, what, nn.Parameter(bad.clone(), requires_grad=bad.is_floating_point()))
    else:
        setattr(bn, what, bad.clone())
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(batchnorm.BatchNormInputError) as e:
        bn(torch.randn(4, 3, 2, 2))
    message = str(e.value)
    assert message.startswith(f"BatchNorm2d(3): {what} ")
    assert "floating point" in message if not bad.is_floating_point() else "3 values" in message
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError):  # torch.nn's layer refuses it as well
        ref = nn.BatchNorm2d(3).train(training)
        setattr(ref, what, getattr(bn, what))
        ref(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("what", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.InPlaceABN(3),
        lambda: batchnorm.BatchRenorm2d(3),
        lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4),
        lambda: batchnorm.SyncBatchNorm(3),
        lambda: batchnorm.FrozenBatchNorm2d(3),
        lambda: batchnorm.BatchNorm(3, axis=-1),
    ],
    ids=["InPlaceABN", "BatchRenorm2d", "GhostBatchNorm2d", "SyncBatchNorm", "Frozen", "axis-1"],
)
def test_every_layer_refuses_a_per_channel_tensor_of_another_length_by_name(
    make, what: str, training: bool
) -> None:
    # the variants' own training paths (renorm's r and d, InPlaceABN's function, which writes
    # over its input) check as BatchNorm's do, before anything is read or written
    bn = make().train(training)
    short = torch.ones(2)
    if isinstance(getattr(bn, what), nn.Parameter):
        setattr(bn, what, nn.Parameter(short))
    else:
        setattr(bn, what, short)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 2, 2, 3) if getattr(bn, "axis", 1) == -1 else torch.randn(8, 3, 2, 2)
    kept = x.clone()
    with pytest.raises(batchnorm.BatchNormInputError) as e:
        bn(x)
    assert str(e.value).startswith(f"{bn.layer_name()}: {what} has shape (2,)")
    assert torch.equal(x, kept)  # InPlaceABN's input not written over
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("training", [True, False])
def test_per_channel_tensors_of_any_shape_holding_c_values_work_as_in_torch_nn(
    training: bool,
) -> None:
    # torch.nn takes a weight of shape (C, 1): so do the layers, on every backend
    w, b = torch.randn(3), torch.randn(3)
    x = torch.randn(4, 3, 2, 2)
    for make in (nn.BatchNorm2d, lambda c: batchnorm.BatchNorm2d(c, backend="torch")):
        ours, ref = batchnorm.BatchNorm2d(3), make(3)
        for m in (ours, ref):
            m.train(training)
            m.weight = nn.Parameter(w.reshape(3, 1).clone())
            m.bias = nn.Parameter(b.clone())
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        ref.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)


def test_the_readme_error_examples_are_what_the_layers_say() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("Errors name the layer, the shape and a remedy", 1)[1]
    block = section.split("```", 2)[1]
    shown = [line for line in block.splitlines() if line.strip()]
    swapped = batchnorm.BatchNorm2d(8)
    swapped.weight = nn.Parameter(torch.ones(6))
    calls = [
        lambda: batchnorm.BatchNorm2d(8)(torch.randn(2, 8, 5)),
        lambda: batchnorm.BatchNorm1d(5)(torch.randn(4, 3, 5)),
        lambda: batchnorm.BatchNorm2d(8)(torch.randn(2, 3, 5, 5)),
        lambda: batchnorm.BatchNorm1d(5)(torch.randn(1, 5)),
        lambda: batchnorm.BatchNorm1d(5)(torch.ones(4, 5, dtype=torch.int32)),
        lambda: swapped(torch.randn(2, 8, 5, 5)),
        lambda: batchnorm.BatchNorm2d(8, device="meta")(torch.randn(2, 8, 5, 5)),
    ]
    said = []
    for call in calls:
        with pytest.raises(batchnorm.BatchNormInputError) as e:
            call()
        said.append(str(e.value))
    assert shown == said


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5, bias=False), nn.BatchNorm1d(5)),
    )


def test_convert_model_both_ways_keeps_state_and_mode() -> None:
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(6, 3, 6, 6)
    net(x)
    net[3].eval()  # mixed modes survive the conversion
    ref_out = net(x)
    ref_state = {k: v.clone() for k, v in net.state_dict().items()}
    converted = batchnorm.convert_model(net)
    assert (
        type(converted[1]) is batchnorm.BatchNorm2d
        and type(converted[3][2]) is batchnorm.BatchNorm1d
    )
    assert converted[1].training and not converted[3][2].training
    for k, v in converted.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    torch.testing.assert_close(converted(x), ref_out)
    back = batchnorm.convert_model(converted, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back[3][2]) is nn.BatchNorm1d
    keras_like = nn.Sequential(batchnorm.BatchNorm.from_keras(4))
    with pytest.raises(ValueError, match="cannot become a torch.nn layer"):
        batchnorm.convert_model(keras_like, to="torch")


_LAYER_CLASSES = [
    getattr(batchnorm, n)
    for n in batchnorm.__all__
    if isinstance(getattr(batchnorm, n), type)
    and issubclass(getattr(batchnorm, n), nn.Module)
    and "num_features" in inspect.signature(getattr(batchnorm, n)).parameters
]


@pytest.mark.parametrize("cls", _LAYER_CLASSES, ids=lambda c: c.__name__)
def test_every_layer_states_the_arguments_it_takes(cls: type[nn.Module]) -> None:
    """No ``*args, **kwargs`` in what ``inspect.signature`` shows: every argument named, each
    accepted by the constructor, and ``torch.nn.utils.skip_init`` (which looks for
    ``device``) builds the layer as it builds torch.nn's."""
    from torch.nn.utils import skip_init

    params = inspect.signature(cls).parameters
    kinds = {p.kind for p in params.values()}
    assert not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    required = {k: v for k, v in {"virtual_batch_size": 2}.items() if k in params}
    for name, p in params.items():
        if name == "num_features":
            continue
        value = required[name] if p.default is inspect.Parameter.empty else p.default
        cls(4, **{**required, name: value})  # type: ignore[call-arg]
    layer = skip_init(cls, 4, **required)
    assert layer.running_mean.shape == (4,) and not layer.running_mean.is_meta  # type: ignore[union-attr]


@pytest.mark.parametrize("convert", ["ours", "torch", "sync"])
def test_an_optimizer_built_before_the_conversion_still_trains_the_layer(convert: str) -> None:
    """As torch.nn.SyncBatchNorm.convert_sync_batchnorm: the converted layer holds the very
    parameter and buffer objects of the old one, so an optimizer (or anything else) holding
    them keeps working — a copy would leave γ and β untrained, silently."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    if convert == "torch":
        net = batchnorm.convert_model(net)
    old, old_type = [*net[1].parameters(), *net[1].buffers()], type(net[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    if convert == "sync":
        net = batchnorm.convert_sync_batchnorm(net)
    else:
        net = batchnorm.convert_model(net, to=convert)  # type: ignore[arg-type]
    assert type(net[1]) is not old_type
    assert all(a is b for a, b in zip([*net[1].parameters(), *net[1].buffers()], old, strict=True))
    net(torch.randn(4, 3, 6, 6)).square().sum().backward()
    opt.step()
    assert not torch.equal(net[1].weight, torch.ones(4))
    assert not torch.equal(net[1].bias, torch.zeros(4))


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"center": True, "scale": False}, "β without γ"),
        ({"unbiased_running_var": False}, "a biased running variance"),
    ],
)
def test_convert_model_to_torch_refuses_what_torch_nn_cannot_hold_in_batchnorm2d_too(
    options: dict, problem: str
) -> None:
    """BatchNorm1d/2d/3d skipped the checks the generic layer gets: β without γ failed inside
    load_state_dict, a biased running variance was silently lost. Nothing is converted."""
    net = nn.Sequential(batchnorm.BatchNorm2d(4), batchnorm.BatchNorm2d(4, **options))
    with pytest.raises(ValueError, match=rf"layer '1' \(BatchNorm2d\(4\)\).*{problem}"):
        batchnorm.convert_model(net, to="torch")
    assert [type(m) for m in net] == [batchnorm.BatchNorm2d, batchnorm.BatchNorm2d]


def test_convert_model_keeps_freezing_sharing_and_dtype() -> None:
    """A frozen layer stays frozen (and unfreeze still restores γ/β's gradients), a layer
    registered under two names stays one layer, and affine=False layers keep their dtype."""
    from batchnorm.variants import is_frozen

    torch.manual_seed(0)
    for to in ("ours", "torch"):
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        for _ in range(3):
            net(torch.randn(16, 3))
        if to == "torch":
            net = batchnorm.convert_model(net)
        batchnorm.freeze(net, affine=True)
        batchnorm.convert_model(net, to=to)  # type: ignore[arg-type]
        before = net[1].running_mean.clone()
        net.train()
        net(torch.randn(16, 3))
        assert is_frozen(net[1]) and torch.equal(net[1].running_mean, before)
        batchnorm.unfreeze(net)
        assert net[1].weight.requires_grad and net[1].bias.requires_grad and net[1].training

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.seq = nn.Sequential(nn.Identity(), self.bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.seq(x) + self.bn(2 * x)

    m = batchnorm.convert_model(Shared())
    assert m.seq[1] is m.bn and type(m.bn) is batchnorm.BatchNorm2d
    assert len(list(m.parameters())) == 2

    bn = nn.BatchNorm1d(4)  # listed twice in one container
    for to in ("ours", "torch"):
        twice = batchnorm.convert_model(nn.Sequential(bn, nn.ReLU(), bn), to=to)  # type: ignore[arg-type]
        assert twice[0] is twice[2]
        assert isinstance(twice[0], batchnorm.BatchNorm1d if to == "ours" else nn.BatchNorm1d)
        bn = twice[0]

    for dt in (torch.float64, torch.float16):
        b = nn.BatchNorm2d(3, affine=False).to(dt)
        ours = batchnorm.convert_model(nn.Sequential(b))[0]
        assert ours.running_mean.dtype == dt and ours.running_var.dtype == dt
        back = batchnorm.convert_model(nn.Sequential(ours), to="torch")[0]
        assert back.running_var.dtype == dt


def test_placements_from_the_readme_train() -> None:
    torch.manual_seed(0)
    before = nn.Sequential(
        nn.Linear(20, 32, bias=False), batchnorm.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2)
    )
    after = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), batchnorm.BatchNorm1d(32), nn.Linear(32, 2))
    x = torch.randn(256, 20)
    y = (x[:, 0] + x[:, 1] > 0).long()
    for net in (before, after):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        net.eval()
        acc = (net(x).argmax(1) == y).float().mean().item()
        assert acc > 0.9


def test_half_precision_module_and_no_warnings_in_normal_use() -> None:
    bn = batchnorm.BatchNorm2d(4)
    x = (torch.randn(4, 4, 3, 3) * 5 + 1e3).half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = bn(x)
    assert y.dtype == torch.float16
    v = y.float().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(v, torch.ones(4), atol=2e-2, rtol=0)


def test_torch_bias_false_spelling_is_supported() -> None:
    import inspect

    if "bias" not in inspect.signature(nn.BatchNorm1d.__init__).parameters:
        pytest.skip("this torch.nn has no bias= argument")
    theirs = nn.BatchNorm1d(4, bias=False)  # type: ignore[call-arg]
    ours = batchnorm.BatchNorm1d(4, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(8, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    net = batchnorm.convert_model(nn.Sequential(theirs))
    assert type(net[0]) is batchnorm.BatchNorm1d and net[0].bias is None
    back = batchnorm.convert_model(net, to="torch")
    assert type(back[0]) is nn.BatchNorm1d and back[0].bias is None


def test_tracking_switched_off_after_construction_leaves_buffers_alone() -> None:
    ours, theirs = batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    x = torch.randn(16, 3) * 2 + 1
    for bn in (ours, theirs):
        bn.track_running_stats = False  # as torch.nn: training then uses and updates nothing
        y = bn(x)
        assert torch.equal(bn.running_mean, torch.zeros(3))
        assert torch.equal(bn.running_var, torch.ones(3))
        assert int(bn.num_batches_tracked) == 0
        torch.testing.assert_close(
            y, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
        )


@pytest.mark.parametrize("backend", [None, "numba", "torch"])
def test_jit_trace_in_train_and_eval_mode_matches_torch(backend) -> None:  # type: ignore[no-untyped-def]
    """torch.jit.trace (with its own check that two runs give one graph) records torch
    operations: the traced layer normalizes new inputs, updates its running statistics and
    gives gradients as torch.nn does, and still refuses a non-finite batch."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    for training in (True, False):
        ours = batchnorm.BatchNorm2d(4, backend=backend).train(training)
        ref = torch.nn.BatchNorm2d(4).train(training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks
            traced = torch.jit.trace(ours, x)
        ours.load_state_dict(ref.state_dict())  # undo the trace runs' updates
        x2 = (torch.randn(8, 4, 5, 5) * 3 + 1).requires_grad_(True)
        x3 = x2.detach().clone().requires_grad_(True)
        y, y_ref = traced(x2), ref(x3)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x2.grad, x3.grad)
        if training:
            before = ours.running_var.clone()
            bad = torch.randn(8, 4, 5, 5)
            bad[0, 1, 0, 0] = float("nan")
            traced(bad)
            torch.testing.assert_close(ours.running_var, before)  # refused inside the graph
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_a_traced_layer_keeps_its_buffers_out_of_autograd(backend) -> None:  # type: ignore[no-untyped-def]
    """torch.jit.trace does not record ``torch.no_grad()``: the running-statistics update
    replayed by a trace must not give the buffers a history (one more step's graph kept
    alive per step), and a saved and reloaded trace must still train — as torch.nn's."""
    import io
    import warnings

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, backend=backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks
        traced = torch.jit.trace(net, torch.randn(2, 3, 8, 8), check_trace=False)
    for _ in range(3):
        traced(torch.randn(2, 3, 8, 8)).sum().backward()
    bn = getattr(traced, "1")
    for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked):
        assert not buf.requires_grad and buf.grad_fn is None
    saved = io.BytesIO()
    torch.jit.save(traced, saved)
    saved.seek(0)
    loaded = torch.jit.load(saved)
    before = getattr(loaded, "1").running_mean.clone()
    loaded(torch.randn(2, 3, 8, 8)).sum().backward()
    assert not torch.equal(getattr(loaded, "1").running_mean, before)


def test_empty_batch_gives_an_empty_output_and_changes_nothing() -> None:
    """As torch.nn: an empty batch is an empty output (train and eval); the running statistics
    and the counter stay as they were (torch.nn counts the empty batch)."""
    for cls, shape in ((batchnorm.BatchNorm1d, (0, 5)), (batchnorm.BatchNorm2d, (0, 5, 3, 3))):
        ours, ref = cls(5), getattr(torch.nn, cls.__name__)(5)
        for training in (True, False):
            ours.train(training)
            ref.train(training)
            x = torch.randn(*shape, requires_grad=True)
            y = ours(x)
            assert y.shape == ref(x).shape == shape and y.dtype == x.dtype
            y.sum().backward()
            assert x.grad is not None and x.grad.shape == shape
        assert torch.equal(ours.running_mean, torch.zeros(5))
        assert torch.equal(ours.running_var, torch.ones(5))
        assert int(ours.num_batches_tracked) == 0


def test_generic_batchnorm_to_torch_takes_its_class_from_the_input_rank() -> None:
    """Our BatchNorm (axis 1) works on any rank, each torch.nn class on one: the class comes
    from the rank an example input shows; without one the conversion is refused (it used to
    give BatchNorm2d, which failed at the next forward on 2-D input)."""
    torch.manual_seed(0)
    for shape, cls in (
        ((16, 5), nn.BatchNorm1d),
        ((4, 5, 7), nn.BatchNorm1d),
        ((2, 5, 3, 3), nn.BatchNorm2d),
        ((2, 5, 2, 3, 3), nn.BatchNorm3d),
    ):
        net = nn.Sequential(batchnorm.BatchNorm(5), nn.ReLU())
        x = torch.randn(shape) * 2 + 1
        net(x)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(ValueError, match=r"'0'.*any input rank.*example_input"):
            batchnorm.convert_model(net, to="torch")
        back = batchnorm.convert_model(net, to="torch", example_input=x)
        assert type(back[0]) is cls and back[0].training
        for k, v in back.state_dict().items():
            assert torch.equal(v, state[k]), k  # the example run changed nothing
        back(x)  # the converted model runs on the model's input


# -- drop-in behaviour of torch.nn: inplace, transforms, fake/meta, FX, ... -----------------------------


def _inplace_case(case: str, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, dict]:  # type: ignore[type-arg]
    """An input and the layer's dtype/options for one path through the autograd Function."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 3)
    if case == "native_off":
        monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    if case == "transposed":  # neither contiguous nor channels_last: copied once
        x = torch.randn(4, 3, 5, 6).transpose(1, 3)
    return x, {
        "half": {"dtype": torch.float16},
        "bfloat16": {"dtype": torch.bfloat16},
        "backend_torch": {"backend": "torch"},
    }.get(case, {})


@pytest.mark.parametrize(
    "case",
    ["half", "bfloat16", "autocast", "backend_torch", "native_off", "transposed", "mixed_dtype"],
)
def test_inplace_op_on_the_output_in_training_matches_torch(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conv-BN-ReLU(inplace=True): the output of every path may be modified in place (it used
    to be a view made inside the autograd Function), and the gradients are torch.nn's."""
    x0, opts = _inplace_case(case, monkeypatch)
    dtype = opts.get("dtype", torch.float32)
    conv = nn.Conv2d(6, 6, 1)
    grads = []
    for bn in (batchnorm.BatchNorm2d(6, **opts), nn.BatchNorm2d(6, dtype=dtype)):
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
            bn.bias.copy_(torch.linspace(-0.5, 0.5, 6))
        x = x0.to(dtype).requires_grad_(True)
        inp = x.bfloat16() if case == "mixed_dtype" else x  # input dtype ≠ parameter dtype
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            if case == "autocast":  # a conv before the layer gives it bf16 (ResNet's pattern)
                inp = conv(inp)
            y = nn.ReLU(inplace=True)(bn(inp))
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(g.to(y.dtype))
        assert bn.weight.grad is not None and bn.bias.grad is not None
        grads.append((y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_var.clone()))
    low = dtype != torch.float32 or case in ("autocast", "mixed_dtype")
    tol = {"rtol": 2e-2, "atol": 5e-2} if low else {"rtol": 1e-4, "atol": 1e-5}
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours.float(), theirs.float(), **tol)


def test_empty_batch_keeps_weight_and_bias_in_the_graph() -> None:
    """An empty batch gives zero gradients to γ and β, as torch.nn does (they used to get None,
    which DDP reports as unused parameters at the next step); the output stays empty."""
    for training, scripted, input_grad in itertools.product(
        (True, False), (False, True), (True, False)
    ):
        ours, ref = batchnorm.BatchNorm2d(4), nn.BatchNorm2d(4)
        ours.train(training)
        ref.train(training)
        # a detector's frame without boxes: the input itself needs no gradient
        x = torch.randn(0, 4, 3, 3, requires_grad=input_grad)
        for bn in (torch.jit.script(ours) if scripted else ours, ref):
            y = bn(x)
            assert y.shape == (0, 4, 3, 3)
            y.sum().backward()
        for p, q in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            assert p.grad is not None and q.grad is not None
            assert torch.equal(p.grad, q.grad) and torch.equal(p.grad, torch.zeros(4))
    # the functional form, as torch.nn.functional.batch_norm
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    y = F.batch_norm(torch.randn(0, 3, 4), torch.zeros(3), torch.ones(3), w, b, training=True)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))


def test_scripted_skip_of_a_single_value_keeps_gamma_in_the_graph() -> None:
    bn = batchnorm.BatchNorm(3, small_batch="skip")
    for layer in (bn, torch.jit.script(bn)):
        bn.zero_grad()
        layer(torch.randn(1, 3, 1, requires_grad=True)).sum().backward()
        assert torch.equal(bn.weight.grad, torch.zeros(3))
        assert torch.equal(bn.bias.grad, torch.ones(3))


def test_running_buffers_set_to_none_use_batch_statistics_as_torch() -> None:
    """track_running_stats=True with running_mean = running_var = None: batch statistics in
    training and eval, the batches still counted (it used to fail on a bare assert)."""
    torch.manual_seed(0)
    ours, ref = batchnorm.BatchNorm2d(4), nn.BatchNorm2d(4)
    for bn in (ours, ref):
        bn.running_mean = None
        bn.running_var = None
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x = torch.randn(8, 4, 5, 5)
        torch.testing.assert_close(ours(x), ref(x))
    assert ours.num_batches_tracked is not None and ref.num_batches_tracked is not None
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_old_checkpoint_keeps_the_layers_own_counter() -> None:
    """A checkpoint from before num_batches_tracked (metadata version < 2) leaves the layer's
    counter as it is (torch 2.13); with momentum=None a reset would let the next batch
    overwrite the running statistics."""
    src = nn.BatchNorm1d(3)
    state = collections.OrderedDict(
        (k, v) for k, v in src.state_dict().items() if k != "num_batches_tracked"
    )
    state._metadata = collections.OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    ours, ref = batchnorm.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    for bn in (ours, ref):
        for _ in range(5):
            bn(torch.randn(16, 3))
        bn.load_state_dict(state)
    assert ours.num_batches_tracked is not None
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5  # type: ignore[arg-type]
    fresh = batchnorm.BatchNorm1d(3, device="meta")
    fresh.load_state_dict(state, assign=True)  # no counter with values: 0, as torch
    assert int(fresh.num_batches_tracked) == 0  # type: ignore[arg-type]


def test_constructor_accepts_what_torch_accepts_and_repr_matches() -> None:
    """NumPy integer channel counts, eps=0 and momentum > 1 are accepted as torch.nn accepts
    them (the last two with a warning); the repr shows torch 2.13's ``bias=``."""
    bn = batchnorm.BatchNorm1d(np.int64(4))  # type: ignore[arg-type]
    assert bn.num_features == 4 and type(bn.num_features) is int
    assert bn(torch.randn(8, 4)).shape == (8, 4)
    with pytest.warns(UserWarning, match=r"BatchNorm1d\(4\): eps=0 .*NaN"):
        assert batchnorm.BatchNorm1d(4, eps=0.0).eps == nn.BatchNorm1d(4, eps=0.0).eps == 0.0
    with pytest.warns(UserWarning, match=r"BatchNorm1d\(4\): momentum=1.5 is outside \[0, 1\]"):
        assert batchnorm.BatchNorm1d(4, momentum=1.5).momentum == 1.5
    for kw in ({}, {"bias": False}, {"affine": False}, {"track_running_stats": False}):
        assert repr(batchnorm.BatchNorm1d(4, **kw)) == repr(nn.BatchNorm1d(4, **kw))  # type: ignore[arg-type]
    assert "scale=False" in repr(batchnorm.BatchNorm(4, scale=False))


def test_fx_symbolic_trace_keeps_the_layer_a_leaf() -> None:
    """torch.fx.symbolic_trace records our layers as call_module nodes, as it does torch.nn's
    (it used to trace into them and fail on the shape checks); the traced module gives the same
    outputs and running statistics in training and eval, and follows .eval()."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU())
    ref = copy.deepcopy(net)
    gm = torch.fx.symbolic_trace(net)
    assert [n.op for n in gm.graph.nodes].count("call_module") == 3
    for training in (True, False):
        gm.train(training)
        ref.train(training)
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(gm(x), ref(x))
    bn = gm.get_submodule("1")
    assert isinstance(bn, batchnorm.BatchNorm2d)
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean)
    # what to_inference leaves, a FrozenBatchNorm, is a leaf too (with a mask argument as well)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.FrozenBatchNorm2d(4), nn.ReLU())
    gm = torch.fx.symbolic_trace(frozen)
    assert [n.op for n in gm.graph.nodes].count("call_module") == 3
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(gm(x), frozen(x))


def test_meta_device_training_forward_propagates_shapes() -> None:
    """Training on the meta device gives torch.nn's shape and device (no value is read)."""
    for shape in ((8, 4), (8, 4, 5, 5)):
        ours = batchnorm.BatchNorm(4, device="meta")
        y = ours(torch.empty(shape, device="meta", requires_grad=True))
        assert y.shape == shape and y.device.type == "meta"
        y.sum().backward()
        assert ours.weight is not None and ours.weight.grad is not None
        assert ours.weight.grad.device.type == "meta"


@pytest.mark.parametrize("native_on", [True, False])
def test_fake_tensor_mode_propagates_shapes_without_reading_memory(
    native_on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under FakeTensorMode (torch.compile's shape propagation) training and eval under
    no_grad give torch.nn's shapes; the kernels never see a fake tensor (it used to segfault)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not native_on:
        monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    for training in (True, False):
        ours, ref = batchnorm.BatchNorm2d(4).train(training), nn.BatchNorm2d(4).train(training)
        before = ours.running_mean.clone()  # type: ignore[union-attr]
        shapes = []
        for bn in (ours, ref):
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                shapes.append(tuple(bn(torch.empty(8, 4, 5, 5)).shape))
        with FakeTensorMode(allow_non_fake_inputs=True):
            shapes.append(tuple(ours(torch.empty(8, 4, 5, 5)).shape))  # with a graph
        assert shapes == [(8, 4, 5, 5)] * 3
        assert torch.equal(ours.running_mean, before)  # type: ignore[arg-type]


def test_vmap_ensemble_in_eval_mode_equals_the_loop() -> None:
    """torch.func's ensembling recipe: stacked parameters and buffers, one plain input for all
    members (batched weights used to reach the kernels)."""
    from torch.func import functional_call, stack_module_state, vmap

    models = [batchnorm.BatchNorm1d(3).eval() for _ in range(4)]
    for i, m in enumerate(models):
        with torch.no_grad():
            m.weight.fill_(i + 1.0)  # type: ignore[union-attr]
            m.running_mean.fill_(0.5 * i)  # type: ignore[union-attr]
            m.running_var.fill_(1.0 + i)  # type: ignore[union-attr]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 3)

    def member(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:  # type: ignore[type-arg]
        return functional_call(base, (p, b), (x,))  # type: ignore[no-any-return]

    with torch.no_grad():
        ys = vmap(member, in_dims=(0, 0, None))(params, buffers, x)
        torch.testing.assert_close(ys, torch.stack([m(x) for m in models]))
    ys = vmap(member, in_dims=(0, 0, None))(params, buffers, x)  # with a graph
    torch.testing.assert_close(ys, torch.stack([m(x) for m in models]).detach())


@pytest.mark.parametrize("path", ["native", "native_off", "backend_torch"])
def test_batched_gradients_match_torch(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) in training: the
    batched dy goes to the torch-operations backward (the kernels cannot read it)."""
    if path == "native_off":
        monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    torch.manual_seed(0)
    x0 = torch.randn(6, 3, dtype=torch.float64)
    kw = {"backend": "torch"} if path == "backend_torch" else {}
    results = []
    for bn in (batchnorm.BatchNorm1d(3, dtype=torch.float64, **kw), nn.BatchNorm1d(3).double()):
        x = x0.clone().requires_grad_(True)
        y = bn(x)
        (jx,) = torch.autograd.grad(
            y, x, torch.eye(18, dtype=torch.float64).view(18, 6, 3), is_grads_batched=True
        )
        jac = torch.autograd.functional.jacobian(bn, x0, vectorize=True)
        results.append((jx, jac))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d"])
def test_forward_mode_ad_in_training_matches_torch(cls: str) -> None:
    """Forward-mode AD (``forward_ad.dual_level``) differentiates torch operations only: such
    calls take plain torch without the autograd Function; tangents and the running update
    equal torch.nn's."""
    import torch.autograd.forward_ad as fwAD

    shape = (8, 4) if cls == "BatchNorm1d" else (8, 4, 5, 5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    ours, theirs = getattr(batchnorm, cls)(4).double(), getattr(nn, cls)(4).double()
    outs = []
    for bn in (ours, theirs):
        with fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(bn(fwAD.make_dual(x, t)))
        outs.append((primal.detach(), tangent.detach()))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 1


def test_torch_compile_fullgraph_matches_torch() -> None:
    """Under torch.compile our layers are torch operations (no kernel call, no value read in
    Python), so ``fullgraph=True`` compiles them, as it does torch.nn's; outputs, gradients
    and running statistics equal torch.nn's over two training steps and in eval mode."""
    import warnings

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 4, 5, 5, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    ours, theirs = batchnorm.BatchNorm2d(4).double(), nn.BatchNorm2d(4).double()
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compiler's own notes
        compiled = torch.compile(ours, fullgraph=True, backend="eager")
        for x in xs:
            xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            yo, yt = compiled(xo), theirs(xt)
            torch.testing.assert_close(yo, yt)
            (yo * yo).sum().backward()
            (yt * yt).sum().backward()
            torch.testing.assert_close(xo.grad, xt.grad)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == 2
        ours.eval()
        theirs.eval()
        torch.testing.assert_close(compiled(xs[0]), theirs(xs[0]))


def test_channel_mismatch_is_caught_as_torch_nn_errors_are_and_gives_a_remedy() -> None:
    bn = batchnorm.BatchNorm2d(8)
    with pytest.raises(RuntimeError, match=r"BatchNorm2d\(8\).*\(2, 3, 5, 5\), got 3\. Build the"):
        bn(torch.randn(2, 3, 5, 5))  # torch.nn raises RuntimeError here
    with pytest.raises(ValueError, match=r"move them there \(x.movedim\(-1, 1\)\) or use"):
        bn(torch.randn(2, 3, 5, 8))


@pytest.mark.parametrize(
    "layer,any_axis",
    [
        (batchnorm.BatchNorm1d(5), batchnorm.BatchNorm),
        (batchnorm.FrozenBatchNorm1d(5), batchnorm.FrozenBatchNorm),
        (batchnorm.GhostBatchNorm1d(5, virtual_batch_size=2), batchnorm.GhostBatchNorm),
        (batchnorm.BatchRenorm1d(5), batchnorm.BatchRenorm),
    ],
)
def test_the_channel_axis_hint_suggests_what_the_layer_takes(
    layer: nn.Module, any_axis: type
) -> None:
    # a layer with channels fixed at axis 1 refuses axis=-1, so the hint points to moving the
    # channels or to the class that takes any axis — which does take the suggestion
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"Axis -1 has size 5") as info:
        layer(x)
    message = str(info.value)
    assert "did you mean" not in message
    assert "x.movedim(-1, 1)" in message
    assert f"batchnorm.{any_axis.__name__}(5, axis=-1)" in message
    layer(x.movedim(-1, 1))
    kwargs = {"virtual_batch_size": 2} if any_axis is batchnorm.GhostBatchNorm else {}
    assert any_axis(5, axis=-1, **kwargs)(x).shape == x.shape
    # the layer of any axis is told to pick the axis; the batch axis is never suggested
    with pytest.raises(ValueError, match=r"did you mean axis=-1\?"):
        any_axis(5, **kwargs)(x)
    with pytest.raises(ValueError, match=r"Build the layer with 3 channels") as info:
        type(layer)(8, **kwargs)(torch.randn(8, 3))
    assert "axis=0" not in str(info.value)


def test_eps_zero_gives_nan_for_a_constant_channel_on_every_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """eps=0 (accepted, with a warning, as torch.nn accepts it): a constant channel's
    1/√(0 + 0) is inf, so that channel is NaN and the others are exact, on the kernels, the
    compiled node and plain torch alike (a division by zero in the kernels left the whole
    output unwritten)."""
    import warnings

    import numpy as np

    from batchnorm import kernels

    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    expected = torch.tensor([[0.0, -1.2247449], [0.0, 0.0], [0.0, 1.2247449]])
    for env in ({}, {"BATCHNORM_NATIVE": "0"}, {"BATCHNORM_BACKEND": "torch"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = batchnorm.BatchNorm1d(2, eps=0)(x)
        assert torch.isnan(y[:, 0]).all(), env
        torch.testing.assert_close(y[:, 1], expected[:, 1])
    y_np, _, var, invstd = kernels.forward_train(x.numpy(), eps=0.0)
    assert np.isnan(y_np[:, 0]).all() and np.isinf(invstd[0]) and var[0] == 0
    np.testing.assert_allclose(y_np[:, 1], expected[:, 1].numpy(), rtol=1e-6)
    scale, _ = kernels.inference_affine(np.zeros(1), np.zeros(1), eps=0.0)
    assert np.isinf(scale[0])


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_torch_func_transforms_match_torch_nn(ours_cls, torch_cls, shape) -> None:  # type: ignore[no-untyped-def]
    """torch.func.grad, jacrev and per-sample gradients (vmap of grad) through a layer with
    batch statistics and no running buffers (the meta-learning recipe), and in eval mode:
    the values of torch.nn's layer."""
    torch.manual_seed(5)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    for kwargs, training in (({"track_running_stats": False}, True), ({}, False)):
        ours = ours_cls(6, dtype=torch.float64, **kwargs).train(training)
        theirs = torch_cls(6, dtype=torch.float64, **kwargs).train(training)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            ours.bias.uniform_(-1.0, 1.0)
            if not training:
                ours.running_mean.uniform_(-1.0, 1.0)
                ours.running_var.uniform_(0.5, 2.0)
        theirs.load_state_dict(ours.state_dict())
        results = []
        for m in (ours, theirs):
            p = {k: v.detach() for k, v in m.named_parameters()}

            def loss(p, xx, m=m):  # type: ignore[no-untyped-def]
                return torch.func.functional_call(m, p, (xx,)).pow(3).sum()

            gp, gx = torch.func.grad(loss, argnums=(0, 1))(p, x)
            jac = torch.func.jacrev(lambda xx, m=m, p=p: torch.func.functional_call(m, p, (xx,)))(
                x[:2]
            )
            pairs = x.unsqueeze(1).repeat(1, 2, *([1] * (x.dim() - 1)))  # two samples per group
            per_group = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p, pairs)
            results.append([gp["weight"], gp["bias"], gx, jac, per_group["weight"]])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "make", [lambda: batchnorm.BatchNorm1d(3), lambda: batchnorm.BatchRenorm1d(3)]
)
def test_vmap_of_a_layer_updating_unbatched_buffers_says_why_and_keeps_them(make) -> None:  # type: ignore[no-untyped-def]
    """torch.nn refuses it naming the running statistics; torch's words for ours were about an
    in-place operation and a bug report. The named error, the remedies it names working."""
    x = torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        torch.func.vmap(nn.BatchNorm1d(3))(x)
    m = make()
    with pytest.raises(batchnorm.BatchNormInputError, match=r"1d\(3\): under torch.func.vmap"):
        torch.func.vmap(m)(x)
    assert torch.equal(m.running_mean, torch.zeros(3)) and int(m.num_batches_tracked) == 0
    per_example = torch.stack([nn.functional.batch_norm(xi, None, None, training=True) for xi in x])
    torch.testing.assert_close(torch.func.vmap(m.eval())(x), x / (1 + 1e-5) ** 0.5)
    fresh = make()
    torch.func.replace_all_batch_norm_modules_(fresh)
    if isinstance(fresh, batchnorm.BatchRenorm1d):  # renorm needs its running statistics
        with pytest.raises(batchnorm.BatchNormInputError, match="were set to None"):
            torch.func.vmap(fresh)(x)
        with pytest.raises(ValueError, match="needs track_running_stats=True"):
            batchnorm.BatchRenorm1d(3, 1e-5, 0.1, True, False)  # given positionally too
    else:
        torch.testing.assert_close(torch.func.vmap(fresh)(x), per_example)


def test_torch_func_grad_with_running_buffers_fails_as_torch_nn_and_keeps_them() -> None:
    """Training with running buffers mutates captured tensors, which torch.func refuses for
    torch.nn's layer too; the buffers stay untouched."""
    x = torch.randn(8, 3)
    for m in (batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3)):
        p = dict(m.named_parameters())
        with pytest.raises(RuntimeError, match="captured"):
            torch.func.grad(lambda p, m=m: torch.func.functional_call(m, p, (x,)).sum())(p)
        assert torch.equal(m.running_mean, torch.zeros(3))
        assert torch.equal(m.running_var, torch.ones(3))
    # ours says so by name, with the ways out (torch's words name an aten operation)
    ours = batchnorm.BatchNorm1d(3)
    with pytest.raises(
        batchnorm.BatchNormInputError, match=r"^BatchNorm1d\(3\): inside a torch.func transform"
    ):
        torch.func.grad(lambda x: ours(x).pow(3).sum())(x)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap"])
def test_the_functional_form_names_running_buffers_a_transform_cannot_update(
    transform: str,
) -> None:
    """The functional form raised torch's words (under vmap: "please file a bug report");
    now the error the layers give, the buffers untouched and the named way out working."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3) if transform == "vmap" else torch.randn(6, 3)
    rm, rv = torch.zeros(3), torch.ones(3)

    def f(x: torch.Tensor, rm: torch.Tensor | None = rm, rv: torch.Tensor | None = rv):
        return F.batch_norm(x, rm, rv, training=True).pow(3).sum(-1)

    wrap = {
        "grad": lambda g: torch.func.grad(lambda x: g(x).sum()),
        "jacrev": torch.func.jacrev,
        "vmap": torch.func.vmap,
    }[transform]
    expected = "under torch.func.vmap" if transform == "vmap" else "inside a torch.func transform"
    with pytest.raises(batchnorm.BatchNormInputError, match=rf"^batch_norm: {expected}"):
        wrap(f)(x)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    wrap(lambda x: f(x, None, None))(x)  # without running statistics, as the message says


@pytest.mark.parametrize("how", ["compile", "export"])
def test_nonfinite_raise_raises_from_a_compiled_or_exported_graph(how: str) -> None:
    # Python cannot raise from inside a graph: the graph asserts that the update kept every
    # value finite, with the eager error's message; nothing is written
    torch._dynamo.reset()
    bn = batchnorm.BatchNorm2d(4, nonfinite="raise")
    x = torch.randn(6, 4, 3, 3)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    if how == "compile":
        run = torch.compile(bn, fullgraph=True, backend="eager")
        run(x)
    else:
        run = torch.export.export(bn, (x,)).module()
        bn = run  # the exported module holds its own buffers
        run(x)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"BatchNorm2d\(4\): the batch statistics are not"):
        run(bad)
    assert torch.is_grad_enabled()  # the error leaves the caller's autograd as it was
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the default policy skips the batch in the graph, as a trace does
    warn = batchnorm.BatchNorm2d(4)
    compiled = torch.compile(warn, fullgraph=True, backend="eager")
    compiled(x)
    compiled(bad)
    assert int(warn.num_batches_tracked) == 1 and bool(torch.isfinite(warn.running_var).all())


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNorm2d(4),
        lambda: batchnorm.BatchRenorm2d(4),
        lambda: batchnorm.GhostBatchNorm2d(4, virtual_batch_size=3),
        lambda: batchnorm.FrozenBatchNorm2d(4),
        lambda: batchnorm.InPlaceABN(4),
        lambda: batchnorm.SyncBatchNorm(4),
    ],
    ids=["bn", "renorm", "ghost", "frozen", "inplace-abn", "sync"],
)
@pytest.mark.parametrize("training", [True, False])
def test_a_negative_eps_set_after_construction_is_named(make, training: bool) -> None:  # type: ignore[no-untyped-def]
    # torch.nn refuses it in its forward; unchecked, every output would be NaN
    layer = make().train(training)
    layer.eps = -1.0
    x = torch.randn(6, 4, 3, 3)
    with pytest.raises(
        ValueError, match=r"\(4\): eps must be >= 0 \(it is added to the variance\)"
    ):
        layer(x)


def test_the_functions_refuse_a_negative_eps() -> None:
    from batchnorm import functional as F

    x, rm, rv = torch.randn(6, 4), torch.zeros(4), torch.ones(4)
    calls = [
        lambda: F.batch_norm(x, rm, rv, training=True, eps=-1.0),
        lambda: F.batch_norm(x, rm, rv, training=False, eps=-1.0),
        lambda: F.batch_norm_train(x, eps=-1.0),
        lambda: F.batch_norm_step(x, rm, rv, eps=-1.0),
        lambda: F.batch_norm_eval(x, rm, rv, eps=-1.0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"eps must be >= 0"):
            call()
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False])
def test_one_running_buffer_set_to_none_is_named(missing: str, training: bool) -> None:
    # torch.nn refuses it (ValueError in training, RuntimeError in eval); both set to None is
    # batch statistics always, as torch.nn
    layer = batchnorm.BatchNorm2d(4).train(training)
    setattr(layer, missing, None)
    x = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match=rf"BatchNorm2d\(4\): {missing} is None but"):
        layer(x)
    with pytest.raises(RuntimeError, match=rf"{missing} is None"):
        layer(x)
    other = "running_var" if missing == "running_mean" else "running_mean"
    setattr(layer, other, None)
    torch.testing.assert_close(layer(x), nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize(
    "backend,dtype,native",
    [
        ("auto", torch.float32, True),
        ("numba", torch.float64, True),
        ("numba", torch.float32, False),
        ("torch", torch.float32, True),
        ("auto", torch.bfloat16, True),
        ("auto", torch.bfloat16, False),
        ("auto", "bfloat16-input", True),
        ("auto", "bfloat16-input", False),
    ],
)
def test_an_eval_output_s_gradient_uses_the_statistics_it_was_computed_with(
    backend: str, dtype: Any, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an eval-mode output, then a training step of the same layer (which updates the running
    # buffers in place), then the backward of that output: its gradient is that of the function
    # that computed it (torch.nn's operator reads the buffers at backward time instead)
    if not native:
        monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    torch.manual_seed(0)
    # "bfloat16-input": bfloat16 inputs into a float32 layer (mixed precision)
    mixed = dtype == "bfloat16-input"
    dtype = torch.bfloat16 if mixed else dtype
    layer = batchnorm.BatchNorm2d(4, backend=backend).to(torch.float32 if mixed else dtype)
    for _ in range(2):
        layer(torch.randn(8, 4, 3, 3, dtype=dtype) * 2 + 1)
    frozen = copy.deepcopy(layer).eval()  # the statistics the eval output is computed with
    x = (torch.randn(8, 4, 3, 3) * 2 + 1).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    layer.eval()
    y = layer(x)
    layer.train()
    layer(torch.randn(8, 4, 3, 3, dtype=dtype) * 5 - 3)  # moves the running statistics
    y.float().pow(2).sum().backward()
    frozen(x_ref).float().pow(2).sum().backward()
    assert not torch.equal(frozen.running_var, layer.running_var)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    for p, q in zip(layer.parameters(), frozen.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol)


def test_outputs_are_laid_out_as_torch_nn_s_for_views_of_any_strides() -> None:
    # torch.nn's output takes the input's suggested memory format: a slice of a channels_last
    # tensor's channels, or a strided step over it, comes out channels_last; other views
    # contiguous. Eager and scripted layers, training and eval, against torch.nn itself.
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(150):
        nd = int(rng.choice([4, 5]))
        base = torch.randn(*[int(rng.choice([2, 3, 4, 6])) for _ in range(nd)])
        view = base.permute(*[int(i) for i in rng.permutation(nd)])
        view = view[tuple(slice(None, None, int(rng.choice([1, 1, 2]))) for _ in range(nd))]
        if view.shape[0] < 2 or view.is_contiguous():
            continue
        c = view.shape[1]
        theirs = (nn.BatchNorm2d if nd == 4 else nn.BatchNorm3d)(c)
        ours = (batchnorm.BatchNorm2d if nd == 4 else batchnorm.BatchNorm3d)(c)
        scripted = torch.jit.script(
            (batchnorm.BatchNorm2d if nd == 4 else batchnorm.BatchNorm3d)(c)
        )
        for training in (True, False):
            want = theirs.train(training)(view)
            for layer in (ours, scripted):
                got = layer.train(training)(view)
                # the layout (a size-1 axis's stride means nothing: such tensors are both)
                fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
                layout = [
                    (t.is_contiguous(), t.is_contiguous(memory_format=fmt)) for t in (got, want)
                ]
                assert layout[0] == layout[1], (view.shape, view.stride(), training)
                torch.testing.assert_close(got, want)
        cases += 1
    assert cases > 50


def test_every_public_warning_and_error_class_is_exported_at_the_top() -> None:
    """``except batchnorm.SyncBatchNormError`` must work for every class a user may catch or
    filter: each public Warning/Exception subclass defined in the library's modules."""
    import importlib
    import pkgutil

    missing = []
    for info in pkgutil.walk_packages(batchnorm.__path__, "batchnorm."):
        if ".lab" in info.name or info.name.endswith(("keras", "cli")):
            continue  # the lab's and the Keras layer's errors belong to them
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, Exception)
                and obj.__module__ == info.name
                and not name.startswith("_")
                and getattr(batchnorm, name, None) is not obj
            ):
                missing.append(f"{info.name}.{name}")
    assert missing == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["default", "torch", "numba", "masked", "cumulative"])
def test_momentum_one_makes_the_running_mean_the_batch_mean(how: str, dtype: torch.dtype) -> None:
    """The blend was running + m·(batch − running) in the buffers' float32, which at m = 1 kept
    a rounding of the old value (2e-5 to 7e-5 off at an old 5000); torch.nn's
    (1 − m)·running + m·batch gives the batch mean."""
    torch.manual_seed(0)
    x = (torch.rand(8, 2) * 0.05).to(dtype)
    backend = how if how in ("torch", "numba") else None
    momentum = None if how == "cumulative" else 1.0  # the first batch's factor is 1/(0 + 1)
    m = (batchnorm.BatchNorm if how == "masked" else batchnorm.BatchNorm1d)(
        2, momentum=momentum, backend=backend
    )
    m.running_mean.fill_(-5000.0)
    mask = torch.ones(8, dtype=torch.bool) if how == "masked" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x) if mask is None else m(x, mask=mask)
    want = x.double().mean(0).float()
    torch.testing.assert_close(m.running_mean, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("reset", ["reset_running_stats", "reset_parameters"])
def test_resetting_statistics_a_layer_never_had_names_the_layer(reset: str) -> None:
    """A bare AssertionError (an AttributeError under python -O; torch.nn's too) before."""
    m = batchnorm.BatchNorm2d(4, track_running_stats=False)
    m.track_running_stats = True
    with pytest.raises(RuntimeError, match=r"^BatchNorm2d\(4\): track_running_stats is True but"):
        getattr(m, reset)()
    m.track_running_stats = False
    getattr(m, reset)()  # the remedy the message gives


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNorm2d(4),
        lambda: batchnorm.BatchRenorm2d(4),
        lambda: batchnorm.GhostBatchNorm2d(4, virtual_batch_size=3),
        lambda: batchnorm.InPlaceABN(4),
    ],
    ids=["bn", "renorm", "ghost", "inplace-abn"],
)
def test_a_changing_momentum_compiles_with_fullgraph_and_dynamic_shapes(make) -> None:  # type: ignore[no-untyped-def]
    # the momentum check's math.isfinite could not be traced on a symbolic momentum
    # (dynamic=True from the first call; a schedule's third value otherwise): fullgraph failed
    import warnings

    ref = make()
    for dynamic in (None, True):
        torch._dynamo.reset()
        layer = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the compiler's own notes
            compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend="eager")
            for step, momentum in enumerate((0.1, 0.2, 0.3, 0.4)):
                x = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(step))
                layer.momentum = ref.momentum = momentum
                torch.testing.assert_close(compiled(x), ref(x))
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        torch.testing.assert_close(layer.running_var, ref.running_var)
        ref.load_state_dict(make().state_dict())
    layer = batchnorm.BatchNorm2d(4)
    layer.momentum = float("nan")
    with pytest.raises(batchnorm.BatchNormInputError, match="momentum must be a finite number"):
        layer(torch.randn(6, 4, 3, 3))  # eager still refuses a NaN set after construction


@pytest.mark.parametrize("how", ["compile", "export"])
def test_a_nonfinite_batch_is_not_blended_into_a_graph_s_nan_channel(how: str) -> None:
    # a NaN channel in the running statistics (a broken checkpoint) let a NaN batch through
    # the graph's check: the other channels took its statistics and the batch was counted
    torch._dynamo.reset()
    bn = batchnorm.BatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean[0] = bn.running_var[0] = float("nan")
    x = torch.randn(6, 2, 3)
    x[0, 0, 0] = float("nan")
    if how == "compile":
        run = torch.compile(bn, fullgraph=True, backend="eager")
    else:
        run = torch.export.export(bn, (torch.randn(6, 2, 3),)).module()
        bn = run  # the exported module holds its own buffers
    run(x)
    assert bn.running_mean[1] == 0 and bn.running_var[1] == 1
    assert int(bn.num_batches_tracked) == 0


def test_a_compiled_network_is_compiled_once_in_a_fresh_process() -> None:
    # the first traced call filled the environment reader's cache, and the graph's guard on
    # that cache failed at the second call: the whole network compiled twice
    script = (
        "import torch, batchnorm\n"
        "from torch._dynamo.utils import counters\n"
        "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4))\n"
        "c = torch.compile(net, backend='eager')\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "for _ in range(3):\n"
        "    c(x)\n"
        "print(counters['stats']['unique_graphs'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "1"


def test_a_backend_variable_naming_no_backend_is_refused_under_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch._dynamo.reset()
    monkeypatch.setenv("BATCHNORM_BACKEND", "bogus")
    compiled = torch.compile(batchnorm.BatchNorm2d(3), backend="eager")
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): \$BATCHNORM_BACKEND='bogus'"):
        compiled(torch.randn(4, 3, 2, 2))
    # and one that does not take the input (torch's operator backend, half inputs only)
    torch._dynamo.reset()
    monkeypatch.setenv("BATCHNORM_BACKEND", "aten")
    compiled = torch.compile(batchnorm.BatchNorm2d(3), backend="eager")
    with pytest.raises(ValueError, match=r"backend 'aten' does not support torch.float32"):
        compiled(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize(
    "make",
    [lambda: batchnorm.BatchNorm1d(3), lambda: batchnorm.BatchRenorm1d(3)],
    ids=["bn", "renorm"],
)
def test_an_exported_training_program_given_a_batch_of_one_leaves_its_statistics(make) -> None:  # type: ignore[no-untyped-def]
    # the graph assumes a dynamic batch of 2 or more; at 1 its unbiased factor m/(m − 1) was
    # Python arithmetic: a bare ZeroDivisionError. Now an infinite factor, refused as a
    # non-finite update: the output is β, the running statistics and the counter stay
    from torch.export import Dim

    layer = make()
    program = torch.export.export(layer, (torch.randn(4, 3),), dynamic_shapes=({0: Dim("batch")},))
    run = program.module()
    before = {k: v.clone() for k, v in run.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning from building the factor
        y = run(torch.randn(1, 3))
    torch.testing.assert_close(y, torch.zeros(1, 3))  # β
    for k, v in run.state_dict().items():
        assert torch.equal(v, before[k]), k
    run(torch.randn(5, 3))  # a real batch still updates
    assert int(run.state_dict()["num_batches_tracked"]) == 1
