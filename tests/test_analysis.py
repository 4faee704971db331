"""Tests of batchnorm.analysis against closed-form answers and brute-force recomputations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.analysis import (
    TimeVaryingNoise,
    activation_statistics,
    bn_statistics_mismatch,
    distribution_drift,
    internal_covariate_shift,
    loss_landscape,
)

# closed-form and hand-computed comparisons need float64 (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


class _Quadratic(nn.Module):
    """θ itself is the output; the loss ½θᵀHθ − bᵀθ is closed over by the loss function."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta


def _quadratic_loss(h: torch.Tensor, b: torch.Tensor):
    def loss(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return 0.5 * out @ h @ out - b @ out

    return loss


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eig = torch.linspace(0.5, 5.0, n)
    return q @ torch.diag(eig) @ q.T


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


# ------------------------------------------------------------------------------------------
# loss landscape


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_landscape_quadratic_closed_form(seed: int) -> None:
    n = 6
    h = _spd(n, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    b = torch.randn(n, generator=gen)
    theta = torch.randn(n, generator=gen)
    model = _Quadratic(theta)
    etas = [0.01, 0.05, 0.1, 0.3]
    probe = loss_landscape(model, _quadratic_loss(h, b), (torch.zeros(1), torch.zeros(1)), etas)

    g = h @ theta - b
    loss0 = float(0.5 * theta @ h @ theta - b @ theta)
    hg = h @ g
    expected_losses = [loss0 - e * float(g @ g) + 0.5 * e**2 * float(g @ hg) for e in etas]
    np.testing.assert_allclose(probe.loss0, loss0, rtol=1e-12)
    np.testing.assert_allclose(probe.losses, expected_losses, rtol=1e-10)
    np.testing.assert_allclose(
        probe.grad_distances, [e * float(hg.norm()) for e in etas], rtol=1e-10
    )
    np.testing.assert_allclose(probe.betas, float(hg.norm() / g.norm()), rtol=1e-10)
    np.testing.assert_allclose(
        probe.loss_variation, max(expected_losses) - min(expected_losses), rtol=1e-9
    )
    # β along g is a Rayleigh-like quotient: never above the top eigenvalue
    assert probe.beta_smoothness <= float(torch.linalg.eigvalsh(h).max()) + 1e-9


def test_landscape_beta_is_eigenvalue_along_eigenvector() -> None:
    n = 5
    h = _spd(n, 7)
    evals, evecs = torch.linalg.eigh(h)
    b = torch.zeros(n)
    # θ = v_k makes g = Hθ = λ_k v_k an eigenvector: β must equal λ_k
    for k in (0, n - 1):
        probe = loss_landscape(
            _Quadratic(evecs[:, k]), _quadratic_loss(h, b), (torch.zeros(1), torch.zeros(1)), [0.1]
        )
        assert probe.beta_smoothness == pytest.approx(float(evals[k]), rel=1e-10)


def test_landscape_linear_regression_hessian() -> None:
    # L(W) = 1/(2N) ‖X Wᵀ − Y‖²: H·G = G·(XᵀX/N) for the gradient matrix G
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, generator=gen)
    y = torch.randn(32, 3, generator=gen)
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=gen))
    w = model.weight.detach().clone()
    grad = (x @ w.T - y).T @ x / 32
    hg = grad @ (x.T @ x / 32)
    probe = loss_landscape(model, _mse, (x, y), [0.02, 0.2])
    np.testing.assert_allclose(probe.grad_distances, [0.02 * hg.norm(), 0.2 * hg.norm()], 1e-10)
    assert probe.beta_smoothness == pytest.approx(float(hg.norm() / grad.norm()), rel=1e-10)
    assert torch.equal(model.weight, w)


def test_landscape_leaves_bn_model_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), batchnorm.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    )
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    before = _state(model)
    p1 = loss_landscape(model, nn.functional.cross_entropy, batch, [0.1, 1.0])
    _assert_same_state(model, before)
    assert model.training
    # dropout masks are replayed inside a probe, so a tiny step changes the gradient only a little
    p2 = loss_landscape(model, nn.functional.cross_entropy, batch, [1e-6])
    assert p2.grad_distances[0] < 1e-3 * p1.grad_norm
    assert np.all(np.isfinite(p1.losses))


def test_landscape_rejects_bad_arguments() -> None:
    model = nn.Linear(2, 1)
    batch = (torch.randn(4, 2), torch.randn(4, 1))
    with pytest.raises(ValueError, match="step_sizes"):
        loss_landscape(model, _mse, batch, [0.0, 0.1])
    with pytest.raises(ValueError, match="positive finite numbers"):
        loss_landscape(model, _mse, batch, [0.1, float("inf")])  # NaN losses and β otherwise
    with pytest.raises(ValueError, match="no parameters span the direction"):
        loss_landscape(model, _mse, batch, [0.1], params=[])
    with pytest.raises(ValueError, match="unknown parameters"):
        loss_landscape(model, _mse, batch, [0.1], params=["nope"])
    with pytest.raises(ValueError, match="scalar"):
        loss_landscape(model, lambda o, t: (o - t) ** 2, batch, [0.1])
    with pytest.raises(TypeError, match="pair"):
        loss_landscape(model, _mse, torch.randn(4, 2), [0.1])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# internal covariate shift


def test_ics_single_layer_is_zero() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batch = (torch.randn(8, 4), torch.randn(8, 3))
    (shift,) = internal_covariate_shift(model, _mse, batch, 0.5)
    assert shift.layer == ""
    assert shift.l2 == 0.0 and shift.cosine == pytest.approx(1.0)
    assert shift.grad_norm > 0


def test_ics_two_layer_linear_closed_form() -> None:
    # f(x) = W2 W1 x, L = 1/(2N) ‖f − y‖²; G1 = W2ᵀ R X / N, G2 = R (W1 X)ᵀ / N (R = residuals)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, generator=gen)  # columns are samples
    y = torch.randn(2, 16, generator=gen)
    w1 = torch.randn(3, 4, generator=gen)
    w2 = torch.randn(2, 3, generator=gen)
    lr = 0.05
    r = w2 @ w1 @ x - y
    g1 = w2.T @ r @ x.T / 16
    g2 = r @ (w1 @ x).T / 16
    w1n = w1 - lr * g1
    g2p = (w2 @ w1n @ x - y) @ (w1n @ x).T / 16

    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[1].weight.copy_(w2)
    shifts = internal_covariate_shift(model, _mse, (x.T, y.T), lr)
    assert [s.layer for s in shifts] == ["0", "1"]
    assert shifts[0].l2 == 0.0
    assert shifts[1].grad_norm == pytest.approx(float(g2.norm()), rel=1e-12)
    assert shifts[1].l2 == pytest.approx(float((g2 - g2p).norm()), rel=1e-10)
    cos = float((g2 * g2p).sum() / (g2.norm() * g2p.norm()))
    assert shifts[1].cosine == pytest.approx(cos, rel=1e-10)
    assert shifts[1].relative_l2 == pytest.approx(float((g2 - g2p).norm() / g2.norm()), rel=1e-10)

    # an optimizer factory: plain SGD gives the same W'; Adam's first step is lr·g/(|g|+ε)
    sgd = internal_covariate_shift(model, _mse, (x.T, y.T), lambda p: torch.optim.SGD(p, lr=lr))
    assert sgd[1].l2 == pytest.approx(shifts[1].l2, rel=1e-12)
    adam = internal_covariate_shift(
        model, _mse, (x.T, y.T), lambda p: torch.optim.Adam(p, lr=lr, eps=1e-8)
    )
    w1a = w1 - lr * g1 / (g1.abs() + 1e-8)
    g2a = (w2 @ w1a @ x - y) @ (w1a @ x).T / 16
    assert adam[1].l2 == pytest.approx(float((g2 - g2a).norm()), rel=1e-6)


def _brute_force_ics(model: nn.Module, loss_fn, batch, lr: float, layer_names: list[str]):
    """Recompute Def. 2.1 by hand with deep copies (no dropout: forward is deterministic)."""
    x, y = batch
    base = copy.deepcopy(model)
    base.zero_grad()
    loss_fn(base(x), y).backward()
    grads = {k: p.grad.detach().clone() for k, p in base.named_parameters()}
    names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
    out = []
    for name in layer_names:
        m = copy.deepcopy(model)
        earlier = names[: names.index(name)]
        with torch.no_grad():
            for n in earlier:
                for pn, p in m.get_submodule(n).named_parameters(recurse=False):
                    p.sub_(lr * grads[f"{n}.{pn}"])
        m.zero_grad()
        loss_fn(m(x), y).backward()
        gp = m.get_submodule(name).weight.grad
        g = grads[f"{name}.weight"]
        out.append(float((g - gp).norm()))
    return out


@pytest.mark.parametrize("bn", [False, True])
def test_ics_matches_brute_force_with_bn(bn: bool) -> None:
    torch.manual_seed(1)
    norm = (lambda c: batchnorm.BatchNorm1d(c)) if bn else (lambda c: nn.Identity())
    model = nn.Sequential(
        nn.Linear(6, 10), norm(10), nn.Tanh(), nn.Linear(10, 10), norm(10), nn.Tanh(),
        nn.Linear(10, 3),
    )  # fmt: skip
    batch = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    before = _state(model)
    shifts = internal_covariate_shift(model, nn.functional.cross_entropy, batch, 0.3)
    _assert_same_state(model, before)
    names = [s.layer for s in shifts]
    assert names == ["0", "3", "6"]
    expected = _brute_force_ics(model, nn.functional.cross_entropy, batch, 0.3, names)
    np.testing.assert_allclose([s.l2 for s in shifts], expected, rtol=1e-8, atol=1e-14)
    assert shifts[0].l2 == 0.0 and shifts[2].l2 > 0


def test_ics_with_dropout_replays_masks_and_checks_layers() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2))
    batch = (torch.randn(8, 5), torch.randint(0, 2, (8,)))
    shifts = internal_covariate_shift(model, nn.functional.cross_entropy, batch, 0.1)
    # same dropout mask in both passes: the first layer sees no shift at all
    assert shifts[0].l2 == 0.0
    only = internal_covariate_shift(model, nn.functional.cross_entropy, batch, 0.1, layers=["3"])
    assert [s.layer for s in only] == ["3"]
    with pytest.raises(ValueError, match="choose among"):
        internal_covariate_shift(model, nn.functional.cross_entropy, batch, 0.1, layers=["9"])
    model[3].weight.requires_grad_(False)  # a frozen layer has no gradient to compare
    with pytest.raises(ValueError, match="no trainable 'weight'"):
        internal_covariate_shift(model, nn.functional.cross_entropy, batch, 0.1, layers=["3"])
    # unmeasured frozen weights are fine: they are simply not updated
    shifts = internal_covariate_shift(model, nn.functional.cross_entropy, batch, 0.1)
    assert [s.layer for s in shifts] == ["0"]


def test_ics_on_conv_bn_model_with_our_layers() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), batchnorm.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), batchnorm.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    batch = (torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))
    before = _state(model)
    shifts = internal_covariate_shift(model, nn.functional.cross_entropy, batch, 0.1)
    _assert_same_state(model, before)
    assert [s.layer for s in shifts] == ["0", "3", "7"]
    assert all(np.isfinite([s.l2, s.cosine]).all() for s in shifts)
    assert all(-1.0 - 1e-9 <= s.cosine <= 1.0 + 1e-9 for s in shifts)


@pytest.mark.parametrize(
    "update", [0.1, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)], ids=["lr", "factory"]
)
def test_every_measurement_keeps_the_models_grads(update) -> None:
    # a pending opt.step() after a measurement must still see the user's gradients
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), batchnorm.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    model[3].bias.grad = None  # None-ness is kept too
    saved = {k: p.grad for k, p in model.named_parameters()}
    values = {k: g.clone() for k, g in saved.items() if g is not None}

    def check() -> None:
        for k, p in model.named_parameters():
            g = saved[k]
            if g is None:
                assert p.grad is None, k
            else:
                assert p.grad is g and torch.equal(g, values[k]), k

    internal_covariate_shift(model, nn.functional.cross_entropy, batch, update)
    check()
    loss_landscape(model, nn.functional.cross_entropy, batch, [0.1])
    check()
    activation_statistics(model, batch[0])
    bn_statistics_mismatch(model, batch[0])
    check()
    fresh = nn.Sequential(nn.Linear(6, 3))  # never backpropagated: grads stay None
    internal_covariate_shift(fresh, nn.functional.cross_entropy, batch, update)
    assert all(p.grad is None for p in fresh.parameters())


# ------------------------------------------------------------------------------------------
# activation statistics, drift, train/eval mismatch


def test_activation_statistics_match_numpy() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(50, 3, 4, generator=gen)  # (N, C, L)
    model = nn.Sequential(nn.Identity())
    stats = activation_statistics(model, x, layers=["0"], levels=(0.1, 0.5, 0.9))
    u = x.numpy().transpose(1, 0, 2).reshape(3, -1)
    np.testing.assert_allclose(stats["0"].mean, u.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats["0"].std, u.std(axis=1), rtol=1e-12)
    np.testing.assert_allclose(
        stats["0"].quantiles, np.quantile(u, [0.1, 0.5, 0.9], axis=1), rtol=1e-12
    )
    with pytest.raises(ValueError, match="no modules named"):
        activation_statistics(model, x, layers=["1"])


def test_activation_statistics_units_on_a_bn_layers_axis() -> None:
    # (N, T, C) with BatchNorm(C, axis=-1): the units are the 4 channels, not the 10 steps
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 4), batchnorm.BatchNorm(4, axis=-1))
    x = torch.randn(8, 10, 6)
    with torch.no_grad():
        out = model(x).numpy()  # train mode, as activation_statistics runs it
    u = out.reshape(-1, 4).T  # (C, N·T)
    for stats in (activation_statistics(model, x), activation_statistics(model, x, ["1"])):
        assert stats["1"].mean.shape == (4,)
        np.testing.assert_allclose(stats["1"].mean, u.mean(axis=1), atol=1e-12)
        np.testing.assert_allclose(stats["1"].std, u.std(axis=1), rtol=1e-10)
        np.testing.assert_allclose(
            stats["1"].quantiles, np.quantile(u, stats["1"].levels, axis=1), rtol=1e-10
        )
    # other layers keep axis 1: the Linear's output (8, 10, 4) has 10 units there
    assert activation_statistics(model, x, ["0"])["0"].mean.shape == (10,)


def test_activation_statistics_layer_the_forward_never_calls() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.bn = batchnorm.BatchNorm1d(3)
            self.unused = nn.Linear(4, 3)
            self.unused_bn = batchnorm.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x))

    model, x = TwoHeads(), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"\['unused'\] were not called by the model's forward"):
        activation_statistics(model, x, layers=["a", "unused"])
    # by default, BN layers the forward skips are left out (as bn_statistics_mismatch does)
    assert list(activation_statistics(model, x)) == ["bn"]


def test_distribution_drift_of_known_shift_and_scale() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(200, 4, generator=gen)
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
        layer.bias.zero_()
    model = nn.Sequential(layer)
    a = activation_statistics(model, x)
    with torch.no_grad():
        layer.bias.fill_(0.7)  # every unit moves by exactly 0.7; spread unchanged
    b = activation_statistics(model, x)
    d = distribution_drift(a, b)["0"]
    assert d["mean_shift"] == pytest.approx(0.7, rel=1e-12)
    assert d["log_std_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert d["quantile_shift"] == pytest.approx(0.7, rel=1e-12)
    np.testing.assert_allclose(d["normalized_mean_shift"], np.mean(0.7 / a["0"].std), rtol=1e-12)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # spread doubles
    c = activation_statistics(model, x)
    assert distribution_drift(b, c)["0"]["log_std_ratio"] == pytest.approx(np.log(2), rel=1e-12)


def test_bn_mismatch_closed_form_and_dropout_variance_shift() -> None:
    torch.manual_seed(8)
    # momentum 1: running stats = the last batch, with the unbiased variance m/(m-1)·σ²_B
    bn = batchnorm.BatchNorm1d(3, momentum=1.0)
    model = nn.Sequential(bn)
    x = torch.randn(20, 3) * 2 + 1
    model(x)
    before = _state(model)
    mm = bn_statistics_mismatch(model, x)["0"]
    _assert_same_state(model, before)
    assert model.training  # mode restored
    var_b = x.var(dim=0, unbiased=False)
    expected = float((var_b / (x.var(dim=0, unbiased=True) + bn.eps)).mean())
    assert mm["var_ratio"] == pytest.approx(expected, rel=1e-9)
    assert mm["mean_shift"] == pytest.approx(0.0, abs=1e-12)

    # dropout(p) before BN: training variance of zero-mean unit input is 1/(1−p) → ratio ≈ 1−p
    for p in (0.2, 0.5):
        model = nn.Sequential(nn.Dropout(p), nn.BatchNorm1d(4, momentum=None))
        data = torch.randn(4096, 4)
        for chunk in data.split(512):
            model(chunk)
        ratio = bn_statistics_mismatch(model, torch.randn(4096, 4))["1"]["var_ratio"]
        assert ratio == pytest.approx(1 - p, abs=0.05)


# ------------------------------------------------------------------------------------------
# injected noise


def test_time_varying_noise_distribution() -> None:
    torch.manual_seed(9)
    noise = TimeVaryingNoise()
    n, c = 4000, 6
    zeros = noise(torch.zeros(n, c, 2))
    # a = 0: output is m ~ U(μ ± 0.1) with μ ∈ [−0.5, 0.5]: each unit's spread is 0.2 wide
    m = zeros[:, :, 0]
    assert torch.equal(zeros[:, :, 0], zeros[:, :, 1])  # one draw per sample and unit
    assert float(m.abs().max()) <= 0.6
    width = m.max(dim=0).values - m.min(dim=0).values
    assert torch.all(width <= 0.2 + 1e-12) and torch.all(width > 0.19)
    # a = 1: output is s + m with s ~ N(σ, 0.1), σ ∈ [1, 1.25]: mean in [0.5, 1.75], std ≈ 0.1·√(1+1/3)
    ones = noise(torch.ones(n, c))
    assert torch.all((ones.mean(0) > 0.45) & (ones.mean(0) < 1.8))
    expected_std = (0.1**2 + 0.2**2 / 12) ** 0.5
    np.testing.assert_allclose(ones.std(0).numpy(), expected_std, rtol=0.1)
    # the distribution changes at every step
    again = noise(torch.zeros(n, c, 2))
    assert not torch.allclose(again.mean(0), zeros.mean(0), atol=0.05)
    noise.eval()
    x = torch.randn(3, c)
    assert torch.equal(noise(x), x)


def test_time_varying_noise_channels_last_and_errors() -> None:
    torch.manual_seed(10)
    noise = TimeVaryingNoise(axis=-1, mean_range=0.0, mean_jitter=0.0, scale_jitter=0.0)
    x = torch.randn(5, 2, 2, 3)
    y = noise(x)
    # no shift, one scale per channel in [1, 1.25] shared by all samples and positions
    ratio = (y / x).reshape(-1, 3)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert torch.all((ratio[0] >= 1.0) & (ratio[0] <= 1.25))
    with pytest.raises(ValueError, match="scale_low"):
        TimeVaryingNoise(scale_low=2.0, scale_high=1.0)
    with pytest.raises(ValueError, match="expected input"):
        TimeVaryingNoise()(torch.randn(5))


def test_a_nan_batch_is_refused_not_measured_as_zeros() -> None:
    """From a NaN loss every measure is NaN, and the comparisons behind the cosine and β read
    NaN as zero: a clear error instead of a cosine of 0 and a β-smoothness of 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    x[0, 0] = float("nan")
    ce = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="internal_covariate_shift: the loss .* not finite"):
        batchnorm.internal_covariate_shift(net, ce, (x, y), 0.1)
    with pytest.raises(ValueError, match="loss_landscape: the loss .* not finite"):
        batchnorm.loss_landscape(net, ce, (x, y), [0.1, 0.2])


def test_measurements_differentiate_inside_no_grad_and_refuse_inference_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    ce = nn.functional.cross_entropy
    want = batchnorm.internal_covariate_shift(net, ce, batch, 0.1)
    with torch.no_grad():  # e.g. inside an evaluation loop
        assert batchnorm.internal_covariate_shift(net, ce, batch, 0.1) == want
        probe = batchnorm.loss_landscape(net, ce, batch, [0.1])
    assert probe.grad_norm == batchnorm.loss_landscape(net, ce, batch, [0.1]).grad_norm
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside inference_mode"):
        batchnorm.loss_landscape(net, ce, batch, [0.1])


def test_drift_from_a_layer_without_spread_is_nan_not_no_change() -> None:
    net = nn.Sequential(nn.Linear(3, 4))
    before = batchnorm.activation_statistics(net, torch.ones(16, 3))  # constant: σ = 0
    after = batchnorm.activation_statistics(net, torch.randn(16, 3))
    drift = batchnorm.distribution_drift(before, after)["0"]
    assert math.isnan(drift["normalized_mean_shift"]) and math.isnan(drift["log_std_ratio"])
    assert drift["mean_shift"] > 0
    same = batchnorm.distribution_drift(after, after)["0"]
    assert same["normalized_mean_shift"] == 0.0 and same["log_std_ratio"] == 0.0


def test_activation_statistics_pools_repeated_calls_and_takes_tuple_outputs() -> None:
    torch.manual_seed(0)
    a = nn.Linear(4, 4)
    net = nn.Sequential(a, nn.ReLU(), a)  # one layer called twice per forward
    x = torch.randn(64, 4)
    stats = batchnorm.activation_statistics(net, x, layers=["0"])["0"]
    with torch.no_grad():
        both = torch.cat([a(x), a(torch.relu(a(x)))])
    np.testing.assert_allclose(stats.mean, both.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, both.std(0, unbiased=False).numpy(), rtol=1e-5)
    lstm = nn.Sequential(nn.LSTM(3, 5, batch_first=True))
    assert batchnorm.activation_statistics(lstm, torch.randn(4, 2, 3), ["0"])["0"].mean.shape == (
        2,
    )
    bare = batchnorm.activation_statistics(nn.BatchNorm1d(3), torch.randn(8, 3))
    assert list(bare) == [""] and bare[""].mean.shape == (3,)  # as a bare Linear gives ""


def test_activation_statistics_of_a_float64_layer_followed_by_an_in_place_op() -> None:
    # the layer's float64 output was kept as it is and reduced after the forward, when the
    # in-place ReLU after it (torchvision's ResNets) had rewritten it: ReLU's statistics
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 6), batchnorm.BatchNorm1d(6), nn.ReLU(inplace=True), nn.Linear(6, 2)
    ).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    stats = activation_statistics(net, x, layers=["1"])["1"]
    with torch.no_grad():
        ref = net[1](net[0](x))  # train mode: the same batch statistics
    np.testing.assert_allclose(stats.mean, ref.mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(
        stats.quantiles[0], torch.quantile(ref, 0.05, dim=0).numpy(), atol=1e-12
    )
    assert (stats.quantiles[0] < 0).all()  # ReLU's would be 0


def test_drift_between_statistics_at_other_levels_is_refused() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6))
    x = torch.randn(32, 4)
    median = activation_statistics(net, x, layers=["1"], levels=(0.5,))
    five = activation_statistics(net, x, layers=["1"])
    with pytest.raises(ValueError, match=r"layer '1' was measured at quantile levels \[0.5\]"):
        distribution_drift(median, five)
    assert distribution_drift(five, five)["1"]["quantile_shift"] == 0.0


def test_ics_skips_what_it_cannot_measure_and_names_what_it_refuses() -> None:
    # an unused head (no gradient: autograd failed on it) and a weight_norm layer (its weight
    # is computed: the call was refused as a whole) are left out by default
    class UnusedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(4, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    x = torch.randn(6, 4)
    shifts = internal_covariate_shift(
        UnusedHead(), nn.functional.mse_loss, (x, torch.zeros(6, 3)), 0.1
    )
    assert [s.layer for s in shifts] == ["a"]
    with pytest.raises(ValueError, match=r"layers \['head'\] are not called by the forward"):
        internal_covariate_shift(
            UnusedHead(), nn.functional.mse_loss, (x, torch.zeros(6, 3)), 0.1, layers=["head"]
        )
    normed = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 3)
    )
    batch = (x, torch.randint(0, 3, (6,)))
    assert [
        s.layer for s in internal_covariate_shift(normed, nn.functional.cross_entropy, batch, 0.1)
    ] == ["2"]
    with pytest.raises(TypeError, match="layers must be a list of module names"):
        internal_covariate_shift(normed, nn.functional.cross_entropy, batch, 0.1, layers="2")  # type: ignore[arg-type]
    for bad in (None, "0.1", True):
        with pytest.raises(TypeError, match="update must be a learning rate"):
            internal_covariate_shift(normed, nn.functional.cross_entropy, batch, bad)  # type: ignore[arg-type]
    # an update that overflows G' (float32 here): its angle is NaN, not 0 ("orthogonal")
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).float()
    batch32 = (x.float(), batch[1])
    last = internal_covariate_shift(net, nn.functional.cross_entropy, batch32, 1e60)[-1]
    assert math.isnan(last.cosine)


def test_statistics_functions_refuse_inputs_they_cannot_measure() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match="layers must be a list of module names"):
        activation_statistics(net, torch.randn(8, 4), layers="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gave no values"):
        activation_statistics(net.eval(), torch.randn(0, 4))
    with pytest.raises(ValueError, match="levels must be in"):
        activation_statistics(net, torch.randn(8, 4), levels=[math.nan])
    batch = (torch.randn(4, 2), torch.randn(4, 1))
    with pytest.raises(TypeError, match="step_sizes must be a list"):
        loss_landscape(nn.Linear(2, 1), _mse, batch, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"params names \['weight'\] more than once"):
        loss_landscape(nn.Linear(2, 1), _mse, batch, [0.1], params=["weight", "weight"])


def test_bn_mismatch_refuses_a_batch_without_a_variance() -> None:
    # NaN from an empty batch, var_ratio 0 from a batch of one (read as a huge variance shift)
    net = nn.Sequential(nn.Linear(6, 8), batchnorm.BatchNorm1d(8), nn.ReLU())
    with pytest.raises(ValueError, match=r"'1' gave no values .*at least two samples$"):
        bn_statistics_mismatch(net, torch.randn(0, 6))
    with pytest.raises(ValueError, match=r"'1' got one value per channel \(a batch of one"):
        bn_statistics_mismatch(net, torch.randn(1, 6))
    conv = nn.Sequential(nn.BatchNorm1d(2))  # one sample of two positions: two values
    x = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    assert bn_statistics_mismatch(conv, x)["0"]["var_ratio"] == pytest.approx(2.5 / (1 + 1e-5))


@pytest.mark.parametrize("one", [0.5, np.float64(0.5), np.array(0.5), torch.tensor(0.5)], ids=repr)
def test_one_level_in_any_scalar_form_is_refused_with_the_list_to_pass(one) -> None:
    net = nn.Sequential(nn.Linear(6, 8), batchnorm.BatchNorm1d(8))
    with pytest.raises(TypeError, match=r"levels must be a list.*; pass levels=\[0\.5\]$"):
        activation_statistics(net, torch.randn(4, 6), levels=one)
    with pytest.raises(TypeError, match=r"quantiles must be a list.*; pass quantiles=\[0\.5\]$"):
        batchnorm.ActivationRecorder(net, ["1"], quantiles=one)


def test_a_model_with_uninitialized_lazy_layers_is_refused_by_name() -> None:
    lazy = nn.Sequential(nn.Linear(4, 6), nn.LazyBatchNorm1d(), nn.LazyLinear(3))
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    ce = nn.functional.cross_entropy
    for where, call in [
        ("internal_covariate_shift", lambda: internal_covariate_shift(lazy, ce, batch, 0.1)),
        ("loss_landscape", lambda: loss_landscape(lazy, ce, batch, [0.1])),
        ("activation_statistics", lambda: activation_statistics(lazy, batch[0])),
        ("bn_statistics_mismatch", lambda: bn_statistics_mismatch(lazy, batch[0])),
    ]:
        with pytest.raises(TypeError, match=rf"^{where}: .*lazy modules \(1, 2\); run one forward"):
            call()


def test_activation_quantiles_beyond_torch_s_limit_of_values() -> None:
    # torch.quantile takes at most 2**24 values; more (a batch of 256 at 256×256) are computed
    # by NumPy, the same linear interpolation
    from batchnorm.recorder import quantiles

    x = torch.randn(1, (1 << 24) + 8, dtype=torch.float64)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    big = quantiles(x, q, dim=1)
    want = np.quantile(x.numpy(), q.numpy(), axis=1)
    np.testing.assert_allclose(big.numpy(), want, rtol=0, atol=0)
    small = x[:, :1000]
    torch.testing.assert_close(quantiles(small, q, dim=1), torch.quantile(small, q, dim=1))


def test_measurement_arguments_are_refused_by_name_before_any_pass() -> None:
    import math

    from batchnorm.analysis import TimeVaryingNoise

    class Keyed(nn.Module):  # a model taking a dict of inputs
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.lin(inputs["x"])

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6), nn.Linear(6, 3))
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    ce = nn.functional.cross_entropy
    refusals = [
        (lambda: batchnorm.internal_covariate_shift(net, ce, batch, math.nan), "must be finite"),
        (lambda: batchnorm.internal_covariate_shift(net, ce, batch, math.inf), "must be finite"),
        (
            lambda: batchnorm.internal_covariate_shift(net, lambda o, y: 1.0, batch, 0.1),
            "scalar tensor",
        ),
        (
            lambda: batchnorm.internal_covariate_shift(net, ce, batch, lambda p: None),
            "must return an optimizer",
        ),
        (lambda: batchnorm.loss_landscape(net, ce, batch, [0.1], params="0.weight"), "string"),
        (
            lambda: batchnorm.activation_statistics(net, batch[0], layers=["1", "1"]),
            "more than once",
        ),
        (
            lambda: batchnorm.activation_statistics(net, batch[0], levels=0.5),
            "pass levels=\\[0.5\\]",
        ),
        (lambda: batchnorm.ActivationRecorder(net, ["1"], quantiles=0.5), "pass quantiles="),
        (lambda: batchnorm.ActivationRecorder(net, ["1"], max_samples=2.5), "max_samples"),
        (lambda: batchnorm.ActivationRecorder(net, ["1"], axis="1"), "axis must be an int"),
        (lambda: batchnorm.ActivationRecorder(net, {"a": 3}), "map names to modules"),
        (lambda: TimeVaryingNoise(scale_jitter=math.nan), "finite"),
        (lambda: TimeVaryingNoise(mean_range=math.inf), "finite"),
        (lambda: TimeVaryingNoise(axis=5)(torch.randn(4, 3)), "axis=5 is not a channel axis"),
        (lambda: batchnorm.activation_statistics(Keyed(), {"x": torch.randn(0, 4)}), "empty"),
    ]
    for call, says in refusals:
        with pytest.raises((TypeError, ValueError), match=says):
            call()
    # one step size as a 0-d array is one step size
    probe = batchnorm.loss_landscape(net, ce, batch, torch.tensor(0.1))
    assert probe.losses.shape == (1,)
    meta = copy.deepcopy(net).to("meta")
    for measure in (
        lambda: batchnorm.internal_covariate_shift(meta, ce, batch, 0.1),
        lambda: batchnorm.loss_landscape(meta, ce, batch, [0.1]),
        lambda: batchnorm.activation_statistics(meta, batch[0]),
        lambda: batchnorm.bn_statistics_mismatch(meta, batch[0]),
    ):
        with pytest.raises(ValueError, match="on the meta device.*to_empty"):
            measure()
