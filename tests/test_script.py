"""``torch.jit.script`` of the drop-in layers: the scripted layer against torch.nn's (scripted
and eager), against our eager layer, its gradients, its running statistics, save/load, the
errors, and the subclasses it refuses."""

import io
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.functional import NonFiniteStatisticsWarning

# torch 2.13 marks torch.jit.script/save/load deprecated; their users are who these tests serve
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

PAIRS = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (16, 6)),
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (8, 6, 5)),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 3)),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 6, 3, 4, 2)),
]

# layers that compute differently from the scripted path: refused by torch.jit.script
REFUSED = [
    lambda: batchnorm.BatchRenorm2d(4),
    lambda: batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2),
    lambda: batchnorm.SyncBatchNorm(4),
    lambda: batchnorm.InPlaceABN(4),
]

OPTIONS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
]


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("kwargs", OPTIONS)
def test_scripted_layer_matches_torch_nn_over_training_and_eval(  # type: ignore[no-untyped-def]
    ours_cls, torch_cls, shape, kwargs
) -> None:
    torch.manual_seed(0)
    ours = torch.jit.script(ours_cls(6, dtype=torch.float64, **kwargs))
    theirs = torch_cls(6, dtype=torch.float64, **kwargs)
    if theirs.weight is not None:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
                m.bias.copy_(torch.linspace(-1.0, 1.0, 6, dtype=torch.float64))
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * (step + 1) + step).requires_grad_(True)
        xt = x.detach().clone().requires_grad_(True)
        y, yt = ours(x), theirs(xt)
        torch.testing.assert_close(y, yt, rtol=1e-10, atol=1e-10)
        dy = torch.randn_like(y)
        y.backward(dy)
        yt.backward(dy)
        assert x.grad is not None and xt.grad is not None
        torch.testing.assert_close(x.grad, xt.grad, rtol=1e-9, atol=1e-10)
        if theirs.weight is not None:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-9, atol=1e-10)
        for name, buf in theirs.named_buffers():
            torch.testing.assert_close(getattr(ours, name), buf, rtol=1e-12, atol=1e-12)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_scripted_layer_matches_our_eager_layer_with_keras_conventions() -> None:
    torch.manual_seed(1)
    eager = batchnorm.BatchNorm.from_keras(5, axis=-1)  # biased running variance, eps 1e-3
    scripted = torch.jit.script(batchnorm.BatchNorm.from_keras(5, axis=-1))
    for _ in range(3):
        x = torch.randn(7, 3, 5) * 2 + 3
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scripted.running_var, eager.running_var, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scripted.running_mean, eager.running_mean, rtol=1e-6, atol=1e-7)
    eager.eval()
    scripted.eval()
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(scripted(x), eager(x), rtol=1e-5, atol=1e-5)


def test_scripted_layer_gradcheck_and_bfloat16() -> None:
    m = torch.jit.script(batchnorm.BatchNorm2d(3, dtype=torch.float64))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    h = torch.jit.script(batchnorm.BatchNorm2d(3, dtype=torch.bfloat16))
    xb = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    y = h(xb)
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(h.running_var).all() and h.running_var.dtype == torch.bfloat16


def test_model_with_our_layers_scripts_saves_and_loads() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU())
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ref.load_state_dict(net.state_dict())
    scripted = torch.jit.script(net)
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(scripted(x), ref(x), rtol=1e-5, atol=1e-6)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    loaded.eval()
    ref.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-6)
    assert set(loaded.state_dict()) == set(ref.state_dict())


def test_scripted_layer_never_writes_nonfinite_statistics() -> None:
    m = torch.jit.script(batchnorm.BatchNorm1d(3))
    x = torch.randn(8, 3)
    x[0, 1] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(x)
    assert any("not finite" in str(w.message) for w in caught)
    assert torch.equal(m.running_mean, torch.zeros(3))
    assert torch.equal(m.running_var, torch.ones(3))
    assert int(m.num_batches_tracked) == 0
    strict = torch.jit.script(batchnorm.BatchNorm1d(3, nonfinite="raise"))
    with pytest.raises(Exception, match="not finite"):
        strict(x)
    assert torch.equal(strict.running_var, torch.ones(3))
    # the eager warning class is what eager layers issue (the scripted one is a UserWarning)
    assert issubclass(NonFiniteStatisticsWarning, RuntimeWarning)


def test_scripted_layer_errors_name_the_layer_and_the_shape() -> None:
    m = torch.jit.script(batchnorm.BatchNorm2d(4))
    with pytest.raises(Exception, match=r"BatchNorm2d\(4\).*channels.*\[2, 3, 5, 5\]"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(Exception, match=r"BatchNorm2d\(4\).*rank 4 to 4.*3D"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(Exception, match=r"more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))
    skip = torch.jit.script(batchnorm.BatchNorm2d(4, small_batch="skip"))
    with torch.no_grad():
        skip.bias.fill_(0.25)
    torch.testing.assert_close(skip(torch.randn(1, 4, 1, 1)), torch.full((1, 4, 1, 1), 0.25))
    assert int(skip.num_batches_tracked) == 0


@pytest.mark.parametrize("layer", REFUSED)
def test_subclasses_that_compute_differently_are_refused(layer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=r"torch\.jit\.script supports batchnorm\.BatchNorm"):
        torch.jit.script(nn.Sequential(nn.Identity(), layer()))


def test_eager_layer_is_unchanged_by_scripting_a_copy() -> None:
    m = batchnorm.BatchNorm2d(3)
    torch.jit.script(m)
    x = torch.randn(4, 3, 2, 2)
    y = m(x)
    torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize(
    "cls,shape", [(batchnorm.FrozenBatchNorm2d, (3, 4, 5, 5)), (batchnorm.FrozenBatchNorm, (6, 4))]
)
def test_frozen_batchnorm_scripts_like_torch_nn_in_eval(cls, shape) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(4)
    bn(torch.randn(shape) * 2 + 1)  # running statistics away from 0 and 1
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    bn.eval()
    frozen = torch.jit.script(cls.from_batchnorm(bn))
    frozen.train()  # frozen: training mode changes nothing
    x = torch.randn(shape)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match=r"FrozenBatchNorm.*\(4\).*channels"):
        frozen(torch.randn(shape[0], 3, *shape[2:]))


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled code of this test's layers forgotten afterwards: every layer class shares the
    base forward's code object, and its compilations would count against the recompile limit
    of later tests that compile with fullgraph=True."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("layer", REFUSED)
@pytest.mark.parametrize("training", [True, False])
def test_refused_subclasses_trace_and_compile(layer, training: bool) -> None:  # type: ignore[no-untyped-def]
    """What the refusal recommends works: traced and compiled, each layer gives its eager
    output and running statistics in train and eval mode."""
    torch.manual_seed(4)
    x = torch.randn(4, 4, 3, 3) * 2 + 1
    once, twice, traced_src, compiled_src = layer(), layer(), layer(), layer()
    for m in (once, twice, traced_src, compiled_src):
        m.train(training)
    traced = torch.jit.trace(traced_src, (x,), check_trace=False)  # tracing runs it once
    compiled = torch.compile(compiled_src, backend="eager")
    twice(x)
    torch.testing.assert_close(traced(x), twice(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(x), once(x), rtol=1e-5, atol=1e-5)
    for name, buf in once.named_buffers():
        torch.testing.assert_close(getattr(compiled_src, name), buf, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            getattr(traced_src, name), getattr(twice, name), rtol=1e-6, atol=1e-6
        )
