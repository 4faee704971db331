"""InPlaceABN against BatchNorm followed by the activation (float64, 1e-10), and the memory it
holds for backward measured with saved_tensors_hooks."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import InPlaceABN
from batchnorm.functional import BatchNormInputError
from batchnorm.inplace_abn import InPlaceABNPrecisionWarning, saved_tensor_bytes

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
    for activation in ("leaky_relu", "elu"):
        for bad in (0.0, -1.0, math.inf, math.nan):
            # a zero or infinite slope (or ELU scale) cannot be inverted in backward
            with pytest.raises(ValueError, match="activation_param must be a finite number > 0"):
                batchnorm.InPlaceABN(4, activation=activation, activation_param=bad)  # type: ignore[arg-type]
    layer = batchnorm.InPlaceABN(4)
    with torch.no_grad():
        layer.weight[2] = 0.0
    with pytest.raises(
        batchnorm.BatchNormInputError, match=r"InPlaceABN\(4\): γ is 0 in channel\(s\) \[2\]"
    ):
        layer(torch.randn(8, 4))


def test_zero_gamma_without_a_graph_is_an_ordinary_forward() -> None:
    """Only backward divides by γ: under no_grad (recalibration, the doctor's probes) a zero γ
    normalizes as BatchNorm followed by the activation does, running statistics included."""
    torch.manual_seed(0)
    layer = batchnorm.InPlaceABN(4, activation="leaky_relu", activation_param=0.1)
    ref = batchnorm.BatchNorm1d(4)
    with torch.no_grad():
        for m in (layer, ref):
            m.weight.copy_(torch.tensor([1.0, 0.5, 0.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(16, 4) * 3 + 1
    with torch.no_grad():
        y = layer(x)
        want = torch.nn.functional.leaky_relu(ref(x), 0.1)
    torch.testing.assert_close(y, want)
    assert torch.allclose(y[:, 2], torch.full((16,), 0.3))  # act(β) where γ = 0
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    with pytest.raises(batchnorm.BatchNormInputError, match="γ is 0"):  # a graph: refused
        layer(x)


def _elu_grads(x: torch.Tensor, dy: torch.Tensor, beta: float = 0.0):  # type: ignore[no-untyped-def]
    """(InPlaceABN in x's dtype, BatchNorm + nn.ELU by autograd in float64): (dx, dγ, dβ) each."""
    out = []
    for fused in (True, False):
        dt = x.dtype if fused else torch.float64
        layer = (batchnorm.InPlaceABN(x.shape[1], activation="elu") if fused else
                 batchnorm.BatchNorm1d(x.shape[1])).to(dt)  # fmt: skip
        with torch.no_grad():
            layer.bias.fill_(beta)
        xi = x.detach().to(dt).requires_grad_(True)
        y = layer(xi) if fused else nn.functional.elu(layer(xi))
        y.backward(dy.to(dt))
        out.append((xi.grad.double(), layer.weight.grad.double(), layer.bias.grad.double()))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_saturated_elu_gives_finite_gradients() -> None:
    # one outlier per channel 0: x̂ ≈ −32, ELU gives exactly −1 in float32, log1p(−1) = −inf
    # (was: dγ[0] = NaN and NaN in all of channel 0's dx)
    torch.manual_seed(0)
    x, dy = torch.randn(1024, 4), torch.randn(1024, 4, dtype=torch.float64)
    x[0, 0] = -1000.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one saturated element per channel is exact: no warning
        (dx, dw, db), (rdx, rdw, rdb) = _elu_grads(x, dy)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert _rel(dw, rdw) < 1e-5 and _rel(db, rdb) < 1e-5
    assert _rel(dx, rdx) < 1e-5  # the saturated element's x̂ comes from Σ x̂ = 0
    # float64 saturates below about −37
    x64 = torch.randn(256, 4, dtype=torch.float64)
    with pytest.warns(InPlaceABNPrecisionWarning, match="ELU outputs of one channel"):
        (dx, dw, db), (rdx, rdw, rdb) = _elu_grads(x64, dy[:256], beta=-40.0)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    # the true gradients are ~e⁻⁴⁰·|dy|; InPlaceABN's are 0 up to that
    for a, b in ((dx, rdx), (dw, rdw), (db, rdb)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_several_saturated_elus_in_a_channel_warn_and_stay_exact_in_sum() -> None:
    torch.manual_seed(1)
    x, dy = torch.randn(4096, 4), torch.randn(4096, 4, dtype=torch.float64)
    x[:3, 0] = torch.tensor([-2000.0, -2200.0, -2500.0])  # x̂ ≈ −33, −36, −41: all saturated
    with pytest.warns(InPlaceABNPrecisionWarning, match=r"InPlaceABN\(4\): 3 ELU outputs"):
        (dx, dw, db), (rdx, rdw, rdb) = _elu_grads(x, dy)
    assert torch.isfinite(dx).all()
    assert _rel(dw, rdw) < 1e-5 and _rel(db, rdb) < 1e-5
    assert _rel(dx[3:], rdx[3:]) < 1e-5  # unsaturated elements: exact
    torch.testing.assert_close(dx[:3, 0].sum(), rdx[:3, 0].sum(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "act,param,expected", [("leaky_relu", 0.1, -0.2), ("elu", 1.0, -0.8646647167633873)]
)
def test_small_batch_skip_applies_the_activation(act: str, param: float, expected: float) -> None:
    layer = batchnorm.InPlaceABN(
        3, activation=act, activation_param=param, small_batch="skip", dtype=torch.float64
    )
    with torch.no_grad():
        layer.bias.fill_(-2.0)
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.full((1, 3), expected, dtype=torch.float64))
    y.sum().backward()
    slope = param if act == "leaky_relu" else expected + 1.0  # act'(β)
    torch.testing.assert_close(layer.bias.grad, torch.full((3,), slope, dtype=torch.float64))
    # "running" goes through _forward_eval: activated once, not twice
    running = batchnorm.InPlaceABN(
        3, activation=act, activation_param=param, small_batch="running", dtype=torch.float64
    )
    with torch.no_grad():
        running.bias.fill_(-2.0)
    z = torch.zeros(1, 3, dtype=torch.float64)
    torch.testing.assert_close(running(z), torch.full((1, 3), expected, dtype=torch.float64))


@pytest.mark.parametrize(
    "dtype,gamma,bound",
    [(torch.float32, 1e-6, "0.000345"), (torch.float64, 1e-8, "1.49e-08")],
)
def test_gamma_small_relative_to_beta_warns_once(dtype, gamma, bound) -> None:  # type: ignore[no-untyped-def]
    layer = batchnorm.InPlaceABN(4, dtype=dtype)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[1] = gamma
        layer.bias.fill_(1.0)
    x = torch.randn(64, 4, dtype=dtype)
    msg = rf"InPlaceABN\(4\): \|γ\| < √ε·\|β\| = {bound}·\|β\| .* in channel\(s\) \[1\]"
    with pytest.warns(InPlaceABNPrecisionWarning, match=msg):
        layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per layer
        ok = batchnorm.InPlaceABN(4, dtype=dtype)
        with torch.no_grad():
            ok.weight.fill_(1e-2)
            ok.bias.fill_(1.0)
        ok(x)  # |γ| = 0.01·|β| is above the bound


@pytest.mark.parametrize("dtype, alpha", [(torch.bfloat16, 0.3), (torch.float16, 0.7)])
def test_a_saturated_elu_in_half_precision_gives_no_nan(dtype: torch.dtype, alpha: float) -> None:
    """Rounding puts a saturated output a hair below −α in half precision (−0.30078 for α =
    0.3 in bfloat16): log1p(y/α) was NaN there, and the whole channel's gradients with it."""
    x = torch.tensor([[-4.0], [1.0], [1.0], [1.0], [1.0]], dtype=dtype)
    ours = batchnorm.InPlaceABN(1, activation="elu", activation_param=alpha).to(dtype)
    ref = nn.BatchNorm1d(1).to(dtype)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.fill_(8.0)  # the first pre-activation ≈ −16: saturated
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    # an upstream gradient that is not constant: with .sum() dx would be ~0 whatever is right
    g = torch.tensor([[1.0], [2.0], [-1.0], [3.0], [0.5]])
    (ours(x1).float() * g).sum().backward()
    (nn.functional.elu(ref(x2), alpha).float() * g).sum().backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(ours.weight.grad).all()
    torch.testing.assert_close(
        ours.weight.grad.float(), ref.weight.grad.float(), rtol=2e-2, atol=2e-2
    )
    # against float64 torch.nn, at the dtype's resolution of the largest gradient
    x64 = x.double().requires_grad_()
    ref64 = nn.BatchNorm1d(1).double()
    with torch.no_grad():
        ref64.weight.fill_(8.0)
    (nn.functional.elu(ref64(x64), alpha) * g.double()).sum().backward()
    want = x64.grad
    assert want.abs().max() > 1.0  # a gradient worth comparing
    tol = (2**-7 if dtype == torch.bfloat16 else 2**-10) * float(want.abs().max()) * 4
    torch.testing.assert_close(x1.grad.double(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("act, param", [("leaky_relu", 0.01), ("elu", 0.5)])
def test_the_derivative_at_a_pre_activation_of_zero_is_torchs(act: str, param: float) -> None:
    """A constant channel's x̂ is 0, and with β = 0 every element sits at z = 0, where torch's
    LeakyReLU takes the slope and its ELU α (the outputs agree; the gradients did not)."""
    activation = nn.LeakyReLU(param) if act == "leaky_relu" else nn.ELU(param)
    for x in (
        torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64),
        torch.full((4, 1), 3.0, dtype=torch.float64),  # a constant channel: all at z = 0
    ):
        ours = batchnorm.InPlaceABN(1, activation=act, activation_param=param).double()
        ref = nn.BatchNorm1d(1).double()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.linspace(-1, 2, x.shape[0], dtype=torch.float64)[:, None]
        (ours(x1) * g).sum().backward()
        (activation(ref(x2)) * g).sum().backward()
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)


def test_elu_outputs_near_saturation_are_warned_about() -> None:
    """Short of saturation log1p(y/α) keeps few of y's digits: in float64 at a pre-activation
    of −35 dx was off by 0.7 % without a word."""
    x = torch.linspace(-2.2, 2.2, 32, dtype=torch.float64)[:, None]
    ours = batchnorm.InPlaceABN(1, activation="elu").double()
    with torch.no_grad():
        ours.weight.fill_(21.0)
    x1 = x.clone().requires_grad_()
    y = ours(x1)
    assert not bool((y == -1).any())  # nothing saturated exactly
    with pytest.warns(batchnorm.InPlaceABNPrecisionWarning, match="within √ε of saturation"):
        y.sum().backward()
    mild = batchnorm.InPlaceABN(1, activation="elu").double()  # pre-activations within ±2
    with warnings.catch_warnings():
        warnings.simplefilter("error", batchnorm.InPlaceABNPrecisionWarning)
        mild(x.clone().requires_grad_()).sum().backward()


def test_masks_are_refused_in_eval_mode_too() -> None:
    m = batchnorm.InPlaceABN(3).eval()
    with pytest.raises(batchnorm.BatchNormInputError, match="masks are not supported"):
        m(torch.randn(4, 3, 5), mask=torch.ones(4, 5, dtype=torch.bool))


def test_training_under_graph_tools_and_without_values_matches_eager() -> None:
    """trace (saved and loaded), compile(fullgraph=True), export, the meta device and
    FakeTensorMode: BN followed by the activation in torch operations, the same function."""
    import io

    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    x = torch.randn(4, 3, 4, 4) * 2 + 1
    ref = batchnorm.InPlaceABN(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.uniform_(-1.0, 1.0)
    state = copy.deepcopy(ref.state_dict())
    want = ref(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = batchnorm.InPlaceABN(3)
        traced = torch.jit.trace(layer, (x,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded(x), want)
    compiled = batchnorm.InPlaceABN(3)
    compiled.load_state_dict(state)
    torch.testing.assert_close(torch.compile(compiled, fullgraph=True, backend="eager")(x), want)
    torch.testing.assert_close(compiled.running_var, ref.running_var)
    fresh = batchnorm.InPlaceABN(3)
    fresh.load_state_dict(state)
    exported = torch.export.export(fresh, (x,)).module()
    torch.testing.assert_close(exported(x), want)
    torch.testing.assert_close(exported.running_var, ref.running_var)
    y = batchnorm.InPlaceABN(3, device="meta")(torch.empty(4, 3, 4, 4, device="meta"))
    assert y.shape == x.shape and y.device.type == "meta"
    with FakeTensorMode():
        assert batchnorm.InPlaceABN(3)(torch.randn(4, 3, 4, 4)).shape == x.shape


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
def test_second_derivatives_are_refused_by_name_not_returned_as_none(activation: str) -> None:
    """The backward had torch's once_differentiable: a Hessian-vector product with
    allow_unused=True (gradgradcheck's way) came back None without a word."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    m = InPlaceABN(3, activation=activation).double()
    with pytest.raises(
        BatchNormInputError,
        match=r"^InPlaceABN\(3\): no second derivative.*"
        r"BatchNorm followed by the activation",
    ):
        torch.autograd.grad(m(x).pow(3).sum(), x, create_graph=True)
    # first derivatives as before, equal to BN followed by the activation
    (g,) = torch.autograd.grad(m(x).pow(3).sum(), x)
    act = {"leaky_relu": nn.LeakyReLU(0.01), "elu": nn.ELU(), "identity": nn.Identity()}
    ref = nn.Sequential(nn.BatchNorm1d(3), act[activation]).double()
    (g_ref,) = torch.autograd.grad(ref(x).pow(3).sum(), x)
    torch.testing.assert_close(g, g_ref)
