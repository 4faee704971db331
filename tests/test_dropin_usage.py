"""BatchNorm1d/2d/3d used the way training code uses torch.nn's layers, held to torch.nn's
values and gradients on each path: the compiled node, the autograd Function (native off) and
plain torch operations."""

import copy
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


class _Block(nn.Module):
    """conv → BN → ReLU → conv → BN, plus the residual, then ReLU (ResNet's basic block)."""

    def __init__(self, c: int, bn: type[nn.Module]) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = bn(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = bn(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + x)


def _resnet(bn: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn(8),
        nn.ReLU(inplace=True),
        _Block(8, bn),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resnet_style_training_matches_torch(
    path: str, channels_last: bool, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few optimizer steps (with gradient accumulation over two micro-batches) of a small
    residual CNN, in float64: parameters, running statistics and num_batches_tracked end
    where torch.nn's do, and so does the eval output."""
    _path(path, monkeypatch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    ours = _resnet(batchnorm.BatchNorm2d).double().to(memory_format=fmt)
    theirs = _resnet(nn.BatchNorm2d).double().to(memory_format=fmt)
    theirs.load_state_dict(ours.state_dict())

    def make(params):  # type: ignore[no-untyped-def]
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    opts = [make(ours.parameters()), make(theirs.parameters())]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _ in range(2):
            x = torch.randn(6, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1
            x = x.contiguous(memory_format=fmt)
            target = torch.randint(0, 4, (6,), generator=gen)
            for model in (ours, theirs):
                (nn.functional.cross_entropy(model(x), target) / 2).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for (key, v), w in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-10, msg=key)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_inference_mode_and_no_grad_match_torch(
    path: str, training: bool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torch.inference_mode and torch.no_grad, in train mode (recalibration) and eval
    mode: torch.nn's output (an inference tensor under inference_mode), running statistics
    and counter; small inputs and inputs the kernels take in several threads."""
    _path(path, monkeypatch)
    for shape in [(8, 3), (48, 3, 48, 48)]:
        cls = (batchnorm.BatchNorm1d, nn.BatchNorm1d) if len(shape) == 2 else None
        ours, theirs = _pair(*(cls or (batchnorm.BatchNorm2d, nn.BatchNorm2d)), 3)
        ours.train(training), theirs.train(training)
        x = torch.randn(shape) * 2 + 1
        ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
        with ctx():
            y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.is_inference() == y_theirs.is_inference()
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-5)
        for key, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], v, rtol=1e-5, atol=1e-6, msg=key)


def _outcome(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | Exception:
    try:
        return layer(x)  # type: ignore[no-any-return]
    except RuntimeError as e:
        return e


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("name", "track"),
    [
        ("BatchNorm2d", True),
        ("BatchNorm2d", False),
        ("GhostBatchNorm2d", True),
        ("GhostBatchNorm2d", False),
        ("BatchRenorm2d", True),  # (renorm needs its running statistics)
    ],
)
def test_a_model_made_under_inference_mode_and_called_outside_it_behaves_as_torch_nn(
    path: str, name: str, track: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model built (or loaded) under torch.inference_mode() and called outside it with
    gradients on, as from a thread-pool worker (the mode is per-thread): where every tensor of
    the call is an inference tensor, torch.nn records no graph and neither do we; a
    training-mode update of inference buffers is refused, as torch.nn refuses it, by name."""
    _path(path, monkeypatch)
    cls = getattr(batchnorm, name)
    extra = {"virtual_batch_size": 4} if name.startswith("Ghost") else {}

    def ours_cls(c: int, track_running_stats: bool) -> nn.Module:
        return cls(c, track_running_stats=track_running_stats, **extra)  # type: ignore[no-any-return]

    for x_made_inside in (True, False):
        for training in (True, False):
            with torch.inference_mode():
                ours = ours_cls(3, track_running_stats=track)
                theirs = nn.BatchNorm2d(3, track_running_stats=track)
                x = torch.randn(4, 3, 8, 8) * 2 + 1
            if not x_made_inside:
                x = x.clone()
            ours.train(training), theirs.train(training)
            got, want = _outcome(ours, x), _outcome(theirs, x)
            case = f"x made inside: {x_made_inside}, training: {training}"
            if isinstance(want, Exception) and "Inplace update" in str(want):
                assert isinstance(got, batchnorm.BatchNormInputError), case
                assert str(got).startswith(f"{name}(3"), case
                assert "torch.inference_mode()" in str(got), case
            elif isinstance(want, Exception):
                # torch.nn cannot save an inference tensor for its graph; a path of ours that
                # saves none may answer, with torch.nn's values
                if isinstance(got, torch.Tensor):
                    with torch.no_grad():
                        torch.testing.assert_close(got, theirs(x), rtol=1e-4, atol=1e-5)
            else:
                assert isinstance(got, torch.Tensor), f"{case}: {got}"
                assert got.requires_grad == want.requires_grad, case
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=case)
    # under inference_mode itself the same buffers are updated, as torch.nn's are
    with torch.inference_mode():
        ours, theirs = ours_cls(3, track_running_stats=track), nn.BatchNorm2d(3)
        x = torch.randn(4, 3, 8, 8) + 1
        ours(x), theirs(x)
    if track:
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches_torch(
    path: str, reentrant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.utils.checkpoint in both modes: gradients as torch.nn's, and the recomputation
    updates the running statistics a second time, as torch.nn's layer does."""
    _path(path, monkeypatch)
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 6, 6)
    results = []
    for bn_cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn_cls(4), nn.ReLU())
        x = x0.clone().requires_grad_()
        y = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=reentrant)
        y.square().sum().backward()
        bn = net[1]
        results.append((x.grad, bn.weight.grad, net[0].weight.grad, bn.running_var))
        assert int(bn.num_batches_tracked) == 2
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_double_backward_matches_torch(
    path: str, training: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.autograd.grad(create_graph=True) through a conv-BN net (a WGAN-GP style penalty
    on the input gradient), channels_last, then backward into every parameter."""
    _path(path, monkeypatch)
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    results = []
    for bn_cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), bn_cls(4), nn.Tanh()).double().train(training)
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        g.square().sum().backward()
        results.append((g, x.grad, net[0].weight.grad, net[1].weight.grad, net[1].bias.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


class _Tagged(torch.Tensor):
    """A tensor subclass that keeps its class through torch operations (as fastai's
    TensorBase does)."""


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(8, 3), (48, 3, 48, 48)])
def test_tensor_subclass_input_keeps_its_class_as_in_torch(
    path: str, training: bool, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subclass input gives an output of that class, as torch.nn's layer gives (the kernels
    and the compiled node returned a plain tensor in training, so the class changed with
    train/eval), with torch.nn's values, gradients and running statistics."""
    _path(path, monkeypatch)
    classes = (
        (batchnorm.BatchNorm1d, nn.BatchNorm1d)
        if len(shape) == 2
        else (batchnorm.BatchNorm2d, nn.BatchNorm2d)
    )
    torch.manual_seed(0)
    x0 = torch.randn(shape) * 2 + 1
    results = []
    for bn in _pair(*classes, 3):
        bn.train(training)
        x = x0.clone().as_subclass(_Tagged).requires_grad_()
        y = bn(x)
        assert type(y) is _Tagged
        (y * y).sum().backward()
        results.append((y.as_subclass(torch.Tensor).detach(), x.grad, bn.weight.grad))
        results[-1] += tuple(bn.state_dict().values())
    for ours, theirs in zip(*results):
        torch.testing.assert_close(
            torch.as_tensor(ours).as_subclass(torch.Tensor),
            torch.as_tensor(theirs).as_subclass(torch.Tensor),
            rtol=1e-4,
            atol=1e-4,
        )


def test_torch_finds_our_fixed_rank_layers_by_class() -> None:
    """BatchNorm1d/2d/3d derive from torch.nn's classes: code that finds BN layers with
    isinstance (freezing BN, weight-decay groups, torch's own tools) finds ours; the any-axis
    BatchNorm and our SyncBatchNorm are not torch.nn classes (torch's layers are axis 1)."""
    pairs = [
        (batchnorm.BatchNorm1d(3), nn.BatchNorm1d),
        (batchnorm.BatchNorm2d(3), nn.BatchNorm2d),
        (batchnorm.BatchNorm3d(3), nn.BatchNorm3d),
        (batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2), nn.BatchNorm2d),
        (batchnorm.BatchRenorm1d(3), nn.BatchNorm1d),
    ]
    for layer, cls in pairs:
        assert isinstance(layer, cls) and isinstance(layer, nn.modules.batchnorm._BatchNorm)
        # one set of parameters and buffers: torch.nn's constructor does not run
        assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
        assert list(layer.state_dict()) == [
            "weight", "bias", "running_mean", "running_var", "num_batches_tracked"
        ]  # fmt: skip
    for other in (batchnorm.BatchNorm(3, axis=-1), batchnorm.SyncBatchNorm(3)):
        assert not isinstance(other, nn.modules.batchnorm._BatchNorm)
    # the usual "freeze every BN layer" loop reaches ours
    net = nn.Sequential(nn.Conv2d(1, 3, 1), batchnorm.BatchNorm2d(3)).train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    before = net[1].running_mean.clone()
    net(torch.randn(4, 1, 5, 5) + 3)
    assert torch.equal(net[1].running_mean, before)
    # torch.func's helper for vmap: no running statistics, batch statistics in eval too
    ours = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4))
    theirs = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    theirs.load_state_dict(ours.state_dict())
    for m in (ours, theirs):
        torch.func.replace_all_batch_norm_modules_(m)
        m.eval()
    assert ours[1].running_mean is None and not ours[1].track_running_stats
    x = torch.randn(5, 8, 3)
    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))


def test_swa_update_bn_recomputes_our_layers_and_recalibrate_is_its_counterpart() -> None:
    """torch's update_bn finds BN layers by class: it resets and recomputes our
    BatchNorm1d/2d/3d exactly as torch.nn's (cumulative average, momentum restored); the
    any-axis BatchNorm and SyncBatchNorm it does not find (not torch.nn classes) — recalibrate
    takes every kind."""

    def model(cls: Callable[[int], nn.Module]) -> nn.Sequential:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 4), cls(4))

    torch.manual_seed(0)
    batches = [torch.randn(16, 3) + 2 for _ in range(3)]
    with torch.no_grad():
        h = model(nn.BatchNorm1d)[0](torch.cat(batches))
    theirs, ours = model(nn.BatchNorm1d), model(batchnorm.BatchNorm1d)
    with torch.no_grad():
        ours[1].running_mean.fill_(9.0)  # reset first, as torch's are
    for m in (theirs, ours):
        torch.optim.swa_utils.update_bn(batches, m)
    torch.testing.assert_close(theirs[1].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    for key, value in theirs[1].state_dict().items():
        torch.testing.assert_close(ours[1].state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert ours[1].momentum == 0.1 and int(ours[1].num_batches_tracked) == 3
    # the any-axis layer: a model without torch.nn's classes gets no pass at all
    anyaxis = model(lambda c: batchnorm.BatchNorm(c, axis=-1))
    torch.optim.swa_utils.update_bn(batches, anyaxis)
    assert torch.equal(anyaxis[1].running_mean, torch.zeros(4))
    assert int(anyaxis[1].num_batches_tracked) == 0
    # beside one of torch.nn's: its passes are three ordinary training steps for it
    # (momentum 0.1 from zero)
    mixed = nn.Sequential(model(lambda c: batchnorm.BatchNorm(c, axis=-1)), nn.BatchNorm1d(4))
    torch.optim.swa_utils.update_bn(batches, mixed)
    ema = torch.zeros(4)
    for hb in h.split(16):
        ema = 0.9 * ema + 0.1 * hb.mean(0)
    torch.testing.assert_close(mixed[0][1].running_mean, ema, rtol=1e-4, atol=1e-5)
    batchnorm.recalibrate(anyaxis, batches)
    torch.testing.assert_close(anyaxis[1].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(anyaxis[1].running_var, h.var(0), rtol=1e-4, atol=1e-5)
    # our SyncBatchNorm (any axis too) is not found either; recalibrate takes it
    synced = model(batchnorm.SyncBatchNorm)
    torch.optim.swa_utils.update_bn(batches, synced)
    assert torch.equal(synced[1].running_mean, torch.zeros(4))
    batchnorm.recalibrate(synced, batches)
    torch.testing.assert_close(synced[1].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(synced[1].running_var, h.var(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("train", [True, False])
def test_outputs_are_laid_out_as_torch_nn_lays_them_out(
    path: str, train: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a sequence model's `bn(h.transpose(1, 2))` followed by a view: torch.nn's output of a 3-D
    # input is contiguous whatever the input's strides; channels_last 4-D/5-D stays so
    _path(path, monkeypatch)
    g = torch.Generator().manual_seed(0)
    cases = [
        (batchnorm.BatchNorm1d, nn.BatchNorm1d, torch.randn(4, 6, 5, generator=g).transpose(1, 2)),
        (batchnorm.BatchNorm1d, nn.BatchNorm1d, torch.randn(5, 4, generator=g).t()),
        (
            batchnorm.BatchNorm2d,
            nn.BatchNorm2d,
            torch.randn(2, 4, 3, 5, generator=g).permute(0, 3, 1, 2),
        ),
        (
            batchnorm.BatchNorm2d,
            nn.BatchNorm2d,
            torch.randn(2, 3, 4, 5, generator=g).permute(0, 3, 2, 1),
        ),
        (
            batchnorm.BatchNorm3d,
            nn.BatchNorm3d,
            torch.randn(2, 5, 3, 3, 4, generator=g).to(memory_format=torch.channels_last_3d),
        ),
    ]
    for ours_cls, torch_cls, x in cases:
        ours, theirs = _pair(ours_cls, torch_cls, x.shape[1])
        ours.train(train), theirs.train(train)
        for scripted in (False, True):
            layer = torch.jit.script(ours) if scripted else ours
            xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
            yo, yt = layer(xo), theirs(xt)
            assert yo.stride() == yt.stride(), (ours_cls.__name__, x.stride(), scripted)
            dy = torch.randn(yt.shape, generator=g)
            yo.backward(dy), yt.backward(dy)
            torch.testing.assert_close(yo, yt, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(xo.grad, xt.grad, atol=1e-5, rtol=1e-5)
    # the any-axis layer keeps the input's layout, as documented
    x = torch.randn(4, 6, 5, generator=g).transpose(1, 2)
    assert batchnorm.BatchNorm(5).train(train)(x).stride() == x.stride()


def test_vmap_over_an_eval_layer_with_a_channels_last_input() -> None:
    # the layout check asked the transform's wrapper about channels_last, which vmap refuses
    torch.manual_seed(0)
    ours, theirs = _pair(batchnorm.BatchNorm2d, nn.BatchNorm2d, 4)
    ours.eval(), theirs.eval()
    x = torch.randn(5, 2, 4, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    got = torch.func.vmap(ours)(x)
    torch.testing.assert_close(got, torch.func.vmap(theirs)(x))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: batchnorm.BatchNorm(4, axis=-1), (2, 3, 4)),
        (lambda: batchnorm.BatchNorm1d(4), (2, 4, 1)),
    ],
)
def test_a_training_trace_takes_other_batch_sizes(make: Callable[[], nn.Module], shape) -> None:  # type: ignore[no-untyped-def]
    # the canonical view reshaped to the traced batch's product, a constant of the trace
    torch.manual_seed(0)
    layer, eager = make(), make()
    traced = torch.jit.trace(layer, torch.randn(shape), check_trace=False)
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(6, *shape[1:])
    torch.testing.assert_close(traced(x), eager(x))
    torch.testing.assert_close(layer.running_mean, eager.running_mean)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: batchnorm.BatchNorm(4, axis=-1, track_running_stats=False), (2, 3, 4)),
        (lambda: batchnorm.BatchNorm1d(4, track_running_stats=False), (2, 4, 1)),
        (lambda: batchnorm.BatchNorm(4, axis=-1), (2, 3, 4)),
    ],
)
def test_an_eval_export_with_a_dynamic_batch(make: Callable[[], nn.Module], shape) -> None:  # type: ignore[no-untyped-def]
    # a batch-size constant in the graph (the canonical view's reshape, the small-batch
    # warning's comparison) made torch.export refuse a dynamic batch; and the any-axis layer's
    # recorded output came back transposed, unlike eager's
    torch.manual_seed(0)
    layer = make().eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(layer, (torch.randn(shape),), dynamic_shapes=({0: batch},))
    x = torch.randn(6, *shape[1:])
    got, want = exported.module()(x), layer(x)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride() == x.stride()
    assert torch.jit.trace(layer, torch.randn(shape))(x).stride() == x.stride()


def test_a_scripted_half_layer_blends_before_rounding() -> None:
    # the batch variance (69984) was rounded to float16 (inf) before the blend, and the
    # finite batch refused
    layer = batchnorm.BatchNorm1d(2).half()
    ref = nn.BatchNorm1d(2).half()
    scripted = torch.jit.script(layer)
    x = torch.tensor([[-264.0, 1.0], [264.0, 2.0], [-264.0, 1.0], [264.0, 2.0]]).half()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scripted(x)
    ref(x)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert int(layer.num_batches_tracked) == 1


def test_inductor_follows_the_cumulative_average_of_momentum_none() -> None:
    # inductor kept the first 1/n given as a Python float (add's alpha, lerp's weight) for
    # every later step: running statistics off by up to 3 from the third step on
    import warnings

    torch.manual_seed(0)
    ours, ref = batchnorm.BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, momentum=None)
    compiled = torch.compile(ours, backend="inductor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            x = torch.randn(4, 4, 3, 3) * 2 + 1
            with torch.no_grad():
                compiled(x)
                ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)


def test_exact_type_fusers_take_our_layers_after_convert_model() -> None:
    # torch.ao's fuser looks layers up by exact class: it refuses ours, and takes the model
    # once convert_model has given it torch.nn's classes (the same statistics)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU())
    net(torch.randn(8, 3, 6, 6))
    net.eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(copy.deepcopy(net), [["0", "1", "2"]])
    fused = torch.ao.quantization.fuse_modules(
        batchnorm.convert_model(copy.deepcopy(net), to="torch"), [["0", "1", "2"]]
    )
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNorm2d(8),
        lambda: batchnorm.BatchRenorm2d(8),
        lambda: batchnorm.GhostBatchNorm2d(8, virtual_batch_size=2),
        lambda: batchnorm.InPlaceABN(8),
    ],
    ids=["bn", "renorm", "ghost", "inplace-abn"],
)
def test_a_training_mode_export_saves_and_loads_as_torch_nns_does(
    make: Callable[[], nn.Module],
) -> None:
    """The running-statistics update ran under no_grad, which torch.export records as a node
    its serializer cannot save (dynamic batch) or load (static batch)."""
    import io

    torch.manual_seed(0)
    x = torch.randn(4, 8, 3, 3) * 2 + 1
    eager, exported_layer = make().train(), make().train()
    # a dynamic batch, except for ghost batches, whose count follows from the batch size
    ghost = isinstance(eager, batchnorm.GhostBatchNorm2d)
    dynamic = None if ghost else ({0: torch.export.Dim("batch", min=2, max=64)},)
    program = torch.export.export(exported_layer, (x,), dynamic_shapes=dynamic)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    torch.testing.assert_close(loaded(x), eager(x))
    for name, want in eager.named_buffers():
        torch.testing.assert_close(dict(loaded.named_buffers())[name], want)
