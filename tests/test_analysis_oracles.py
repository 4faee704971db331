"""Oracle tests of batchnorm.analysis: each quantity recomputed by hand with explicit autograd.

Santurkar et al. (2018) Def. 2.1 on models whose structure is not a plain chain of modules
(running statistics used in training mode, a parameter owned by a container, a module used
twice, weights tied between modules), the optimizer the shift is defined with, and the state
every measurement must leave behind.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.analysis import (
    activation_statistics,
    bn_statistics_mismatch,
    internal_covariate_shift,
    loss_landscape,
)

# closed-form and hand-computed comparisons need float64 (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")


CE = nn.functional.cross_entropy


def _grads(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """∇L of every (deduplicated) parameter, on a copy: the model itself is not touched."""
    m = copy.deepcopy(model)
    x, y = batch
    names, params = zip(*m.named_parameters())
    gs = torch.autograd.grad(CE(m(x), y), params)
    return dict(zip(names, gs))


def _by_hand(model: nn.Module, batch, lr: float, update: list[str], measured: str):
    """(‖G‖, ‖G − G'‖) with G' the gradient of ``measured`` after ``W ← W − lr·G`` for the
    parameters named in ``update`` only (names of ``model.named_parameters()``)."""
    g = _grads(model, batch)
    moved = copy.deepcopy(model)  # deepcopy keeps shared modules and tied weights shared
    with torch.no_grad():
        for k, p in moved.named_parameters():
            if k in update:
                p.sub_(lr * g[k])
    gp = _grads(moved, batch)[measured]
    return float(g[measured].norm()), float((g[measured] - gp).norm())


def _snapshot(model: nn.Module):
    return (
        {k: (p, p.detach().clone()) for k, p in model.named_parameters()},
        {k: b.detach().clone() for k, b in model.named_buffers()},
    )


def _assert_untouched(model: nn.Module, snap) -> None:
    params, buffers = snap
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for k, (obj, values) in params.items():
        assert now[k] is obj, f"{k} is no longer the same nn.Parameter object"
        assert isinstance(now[k], nn.Parameter), k
        assert torch.equal(now[k], values), k
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k


# ------------------------------------------------------------------------------------------
# internal covariate shift


def test_ics_uses_the_models_own_running_statistics() -> None:
    # batch renormalization normalizes with its running statistics in training mode, so G and
    # G' must be taken at the model's buffers, not after an extra forward pass updated them
    torch.manual_seed(0)

    def renorm() -> nn.Module:
        return batchnorm.BatchRenorm1d(8, momentum=0.5, warmup_steps=0, r_max_step=0, d_max_step=0)

    model = nn.Sequential(
        nn.Linear(5, 8), renorm(), nn.Tanh(), nn.Linear(8, 8), renorm(), nn.Tanh(), nn.Linear(8, 3)
    )
    for _ in range(3):  # running statistics far from this batch's
        model(3 * torch.randn(16, 5) + 1)
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    snap = _snapshot(model)
    shifts = internal_covariate_shift(model, CE, batch, 0.3)
    _assert_untouched(model, snap)
    params = [k for k, _ in model.named_parameters()]
    for s, first_after in zip(shifts, ["0.weight", "3.weight", "6.weight"]):
        update = params[: params.index(first_after)]
        gn, l2 = _by_hand(model, batch, 0.3, update, f"{s.layer}.weight")
        assert s.grad_norm == pytest.approx(gn, rel=1e-10)
        assert s.l2 == pytest.approx(l2, rel=1e-8, abs=1e-14)
    assert shifts[0].l2 == 0.0


class _ScaledInput(nn.Module):
    """A container owning a parameter it applies before calling its child (a learned gain)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(5))
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.gain)


def test_ics_container_parameter_used_first_precedes_its_child() -> None:
    torch.manual_seed(1)
    model = _ScaledInput()
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    (shift,) = internal_covariate_shift(model, CE, batch, 0.5)
    assert shift.layer == "fc"
    gn, l2 = _by_hand(model, batch, 0.5, ["gain"], "fc.weight")
    assert l2 > 1e-4  # the gain changes fc's input: a real shift
    assert shift.grad_norm == pytest.approx(gn, rel=1e-12)
    assert shift.l2 == pytest.approx(l2, rel=1e-10)


def _shared_module_model() -> nn.Sequential:
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 3))


def test_ics_and_landscape_with_a_module_used_twice() -> None:
    torch.manual_seed(2)
    model = _shared_module_model()
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model)
    shifts = internal_covariate_shift(model, CE, batch, 0.2)
    _assert_untouched(model, snap)
    # named_modules lists the shared module once, at its first use
    assert [s.layer for s in shifts] == ["0", "2", "5"]
    expected = {
        "0": _by_hand(model, batch, 0.2, [], "0.weight"),
        "2": _by_hand(model, batch, 0.2, ["0.weight", "0.bias"], "2.weight"),
        "5": _by_hand(model, batch, 0.2, ["0.weight", "0.bias", "2.weight", "2.bias"], "5.weight"),
    }
    for s in shifts:
        gn, l2 = expected[s.layer]
        assert s.grad_norm == pytest.approx(gn, rel=1e-10)
        assert s.l2 == pytest.approx(l2, rel=1e-8, abs=1e-14)

    probe = loss_landscape(model, CE, batch, [0.1, 0.4])
    _assert_untouched(model, snap)
    g = _grads(model, batch)
    assert probe.grad_norm == pytest.approx(
        float(torch.cat([v.reshape(-1) for v in g.values()]).norm()), rel=1e-12
    )
    # the optimizer still trains the model's parameters
    shared = model.get_submodule("4")
    assert isinstance(shared, nn.Linear)
    before = shared.weight.detach().clone()
    CE(model(batch[0]), batch[1]).backward()
    opt.step()
    assert not torch.equal(shared.weight, before)


def test_ics_with_weights_tied_between_modules() -> None:
    torch.manual_seed(3)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), a, nn.Tanh(), b, nn.Linear(4, 3))
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    snap = _snapshot(model)
    shifts = internal_covariate_shift(model, CE, batch, 0.2)
    _assert_untouched(model, snap)
    assert [s.layer for s in shifts] == ["0", "2", "4", "5"]
    by_layer = {s.layer: s for s in shifts}
    # layer 4's own weight is the tied "2.weight": it keeps W_i; layer 2's bias and layer 0 move
    gn, l2 = _by_hand(model, batch, 0.2, ["0.weight", "0.bias", "2.bias"], "2.weight")
    assert by_layer["4"].grad_norm == pytest.approx(gn, rel=1e-10)
    assert by_layer["4"].l2 == pytest.approx(l2, rel=1e-8)
    everything_before = ["0.weight", "0.bias", "2.weight", "2.bias", "4.bias"]
    gn, l2 = _by_hand(model, batch, 0.2, everything_before, "5.weight")
    assert by_layer["5"].l2 == pytest.approx(l2, rel=1e-8)


def test_ics_step_is_plain_sgd_and_a_users_momentum_state_is_untouched() -> None:
    # a float update is W' = W − η·G with no momentum, whatever optimizer trains the model
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), batchnorm.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        CE(model(batch[0]), batch[1]).backward()
        opt.step()
    state = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    snap = _snapshot(model)
    shifts = internal_covariate_shift(model, CE, batch, 0.05)
    fresh_momentum = internal_covariate_shift(
        model, CE, batch, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    )
    _assert_untouched(model, snap)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], state[id(p)])
    gn, l2 = _by_hand(model, batch, 0.05, ["0.weight", "0.bias", "1.weight", "1.bias"], "3.weight")
    assert shifts[1].l2 == pytest.approx(l2, rel=1e-8)
    # a fresh momentum buffer's first step is the plain gradient step
    assert fresh_momentum[1].l2 == pytest.approx(l2, rel=1e-8)


def test_ics_in_eval_mode_uses_running_statistics() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), batchnorm.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    for _ in range(3):
        model(2 * torch.randn(32, 6) - 1)
    model.eval()
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    snap = _snapshot(model)
    (_, last) = internal_covariate_shift(model, CE, batch, 0.3)
    _assert_untouched(model, snap)
    assert not model.training
    gn, l2 = _by_hand(model, batch, 0.3, ["0.weight", "0.bias", "1.weight", "1.bias"], "3.weight")
    assert last.grad_norm == pytest.approx(gn, rel=1e-12)
    assert last.l2 == pytest.approx(l2, rel=1e-10)


# ------------------------------------------------------------------------------------------
# loss landscape


def test_landscape_by_hand_on_a_bn_network_over_all_parameters() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 8), batchnorm.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    etas = [0.05, 0.2, 0.8]
    snap = _snapshot(model)
    probe = loss_landscape(model, CE, batch, etas)
    _assert_untouched(model, snap)
    g = _grads(model, batch)
    g0 = torch.cat([v.reshape(-1) for v in g.values()])
    losses, dists = [], []
    for eta in etas:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in moved.named_parameters():
                p.sub_(eta * g[k])
        losses.append(float(CE(moved(batch[0]), batch[1]).detach()))
        gm = _grads(moved, batch)
        dists.append(float((torch.cat([v.reshape(-1) for v in gm.values()]) - g0).norm()))
    np.testing.assert_allclose(probe.losses, losses, rtol=1e-12)
    np.testing.assert_allclose(probe.grad_distances, dists, rtol=1e-9)
    assert probe.loss_variation == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert probe.gradient_predictiveness == pytest.approx(max(dists), rel=1e-9)
    beta = max(d / (e * float(g0.norm())) for d, e in zip(dists, etas))
    assert probe.beta_smoothness == pytest.approx(beta, rel=1e-9)


# ------------------------------------------------------------------------------------------
# train/eval statistics mismatch


def test_bn_mismatch_divides_by_the_variance_bn_normalizes_with() -> None:
    # var_ratio is the variance of the eval-mode normalized input x̂ = (x − μ_run)/√(σ²_run + ε)
    # around its batch mean, so a running variance of 0 gives a finite ratio
    bn = nn.BatchNorm1d(3, eps=0.1)
    rm = torch.tensor([0.0, 1.0, -1.0])
    rv = torch.tensor([0.0, 4.0, 0.5])
    bn.load_state_dict({**bn.state_dict(), "running_mean": rm, "running_var": rv})
    x = torch.randn(64, 3)
    out = bn_statistics_mismatch(bn, x)[""]
    var = x.var(dim=0, unbiased=False)
    denom = rv + 0.1
    assert out["var_ratio"] == pytest.approx(float((var / denom).mean()), rel=1e-12)
    xhat = (x - rm) / denom.sqrt()
    assert out["var_ratio"] == pytest.approx(float(xhat.var(dim=0, unbiased=False).mean()), 1e-12)
    shift = (x.mean(dim=0) - rm).abs() / denom.sqrt()
    assert out["mean_shift"] == pytest.approx(float(shift.mean()), rel=1e-12)


def test_bn_mismatch_of_a_layer_called_twice_pools_both_calls() -> None:
    # a BN layer shared by two branches accumulates its running statistics from both calls;
    # its input's statistics are those of both inputs together, not of the last call alone
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x) + self.bn(3.0 * x + 5.0)

    model = Shared()
    x = torch.randn(40, 2, dtype=torch.float64)
    out = bn_statistics_mismatch(model, x)["bn"]
    both = torch.cat([x, 3.0 * x + 5.0])  # running statistics: mean 0, var 1
    var = both.var(dim=0, unbiased=False)
    assert out["var_ratio"] == pytest.approx(float((var / (1 + 1e-5)).mean()), rel=1e-12)
    shift = both.mean(dim=0).abs() / (1 + 1e-5) ** 0.5
    assert out["mean_shift"] == pytest.approx(float(shift.mean()), rel=1e-12)


def test_bn_mismatch_of_a_layer_called_by_keyword() -> None:
    class ByKeyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(input=x)

    x = torch.randn(40, 3, dtype=torch.float64) * 2 + 1
    out = bn_statistics_mismatch(ByKeyword(), x)["bn"]
    var = x.var(dim=0, unbiased=False)
    assert out["var_ratio"] == pytest.approx(float((var / (1 + 1e-5)).mean()), rel=1e-12)


class _Padded(nn.Module):
    """Our BN called with a fixed padding mask, by position or by keyword."""

    def __init__(self, mask: torch.Tensor, keyword: bool, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = batchnorm.BatchNorm1d(3, momentum=momentum)
        self.mask, self.keyword = mask, keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x, mask=self.mask) if self.keyword else self.bn(x, self.mask)


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A (6, 3, 10) batch of sequences of lengths 1–10, zero-padded, and its (N, L) mask."""
    torch.manual_seed(0)
    lengths = torch.tensor([10, 7, 4, 2, 9, 1])
    mask = torch.arange(10)[None, :] < lengths[:, None]
    return mask, (torch.randn(6, 3, 10) * 2 + 1) * mask[:, None, :]


@pytest.mark.parametrize("keyword", [False, True])
def test_bn_mismatch_of_a_layer_called_with_a_padding_mask(keyword: bool) -> None:
    # BN takes its statistics over the valid positions only (README: masked statistics for
    # padded sequences); the mismatch compares its running statistics with those, not with
    # statistics that include the padding
    mask, x = _padded_batch()
    model = _Padded(mask, keyword, momentum=1.0)
    model(x)  # momentum 1: the running statistics of the valid positions of x
    model.bn.running_mean.add_(torch.tensor([0.5, -1.0, 0.0]))  # a known shift
    out = bn_statistics_mismatch(model, x)["bn"]
    valid = x.transpose(1, 2)[mask]  # (valid values, C)
    rm, rv = model.bn.running_mean, model.bn.running_var
    var = valid.var(dim=0, unbiased=False)
    assert out["var_ratio"] == pytest.approx(float((var / (rv + 1e-5)).mean()), rel=1e-12)
    shift = (valid.mean(dim=0) - rm).abs() / (rv + 1e-5).sqrt()
    assert out["mean_shift"] == pytest.approx(float(shift.mean()), rel=1e-12)


def test_ics_places_a_parameter_where_the_forward_uses_it() -> None:
    """Def. 2.1 steps every parameter used before layer i: a root parameter applied at the
    output (a learned logit scale) comes after the layers it scales, so the first layer's shift
    is exactly 0; a weight a module uses directly (nn.MultiheadAttention's out_proj, never
    called) is used, and precedes the head."""
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
            self.logit_scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x))) * self.logit_scale

    model = Scaled()
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    by_layer = {s.layer: s for s in internal_covariate_shift(model, CE, batch, 0.5)}
    assert by_layer["fc1"].l2 == 0.0
    gn, l2 = _by_hand(model, batch, 0.5, ["fc1.weight", "fc1.bias"], "fc2.weight")
    assert by_layer["fc2"].l2 == pytest.approx(l2, rel=1e-8)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x)[0]).mean(0)

    model = Attention()
    batch = (torch.randn(5, 4, 8), torch.randint(0, 3, (4,)))
    shifts = internal_covariate_shift(model, CE, batch, 0.5)
    assert [s.layer for s in shifts] == ["attn.out_proj", "head"]
    upstream = [k for k, _ in model.named_parameters() if k.startswith("attn.")]
    gn, l2 = _by_hand(model, batch, 0.5, upstream, "head.weight")
    assert shifts[1].l2 == pytest.approx(l2, rel=1e-6)
    gn, l2 = _by_hand(
        model, batch, 0.5, ["attn.in_proj_weight", "attn.in_proj_bias"], "attn.out_proj.weight"
    )
    assert shifts[0].grad_norm == pytest.approx(gn, rel=1e-6) and gn > 0
    assert shifts[0].l2 == pytest.approx(l2, rel=1e-6)


def test_measurements_leave_the_global_random_stream_as_it_was() -> None:
    """A probe inside a training loop must not change the data order or dropout masks."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.Dropout(0.5), batchnorm.BatchNorm1d(8), nn.Linear(8, 3)
    )
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    for measure in (
        lambda: internal_covariate_shift(model, CE, batch, 0.1),
        lambda: loss_landscape(model, CE, batch, [0.1]),
        lambda: activation_statistics(model, batch[0]),
        lambda: bn_statistics_mismatch(model, batch[0]),
    ):
        torch.manual_seed(7)
        want = torch.rand(3)
        torch.manual_seed(7)
        measure()
        assert torch.equal(torch.rand(3), want)


def test_ics_order_ignores_reads_of_a_parameter_s_metadata() -> None:
    """``x.to(self.fc2.weight.dtype)`` (CLIP's pattern) reads no values: fc2 stays second, and
    a weight read only through ``.data`` is not a use either."""

    class DtypeFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.fc2.weight.dtype).to(next(self.fc2.parameters()).device)
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    model = DtypeFirst()
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    by_layer = {s.layer: s for s in internal_covariate_shift(model, CE, batch, 0.5)}
    assert by_layer["fc1"].l2 == 0.0
    _, l2 = _by_hand(model, batch, 0.5, ["fc1.weight", "fc1.bias"], "fc2.weight")
    assert by_layer["fc2"].l2 == pytest.approx(l2, rel=1e-8) and l2 > 0

    class DataOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale, self.fc = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x @ self.scale.weight.data.t())

    shifts = internal_covariate_shift(
        DataOnly(), CE, (torch.randn(8, 6), torch.randint(0, 3, (8,))), 0.5
    )
    assert [s.layer for s in shifts] == ["fc"] and shifts[0].l2 == 0.0


@pytest.mark.parametrize("keyword", [False, True])
def test_activation_statistics_of_a_masked_layer_are_over_its_valid_positions(
    keyword: bool,
) -> None:
    # the padding positions of a masked layer's output (β there, or whatever the layer left)
    # were pooled with the valid ones: mean and quantiles moved toward them
    mask, x = _padded_batch()
    model = _Padded(mask, keyword).eval()
    with torch.no_grad():
        model.bn.bias.fill_(5.0)  # the padding's output stands out
        y = model.bn(x, mask=mask)
    stats = batchnorm.activation_statistics(model, x, layers=["bn"], levels=[0.5])["bn"]
    valid = y.transpose(1, 2)[mask].double()  # (valid values, C)
    np.testing.assert_allclose(stats.mean, valid.mean(dim=0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats.std, valid.std(dim=0, unbiased=False).numpy(), rtol=1e-12)
