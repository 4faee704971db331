"""batchnorm.doctor: each check against a model built to have exactly that bug and one without
it (no false alarm); the measurements against hand-computed oracles; the model never changes."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn

import batchnorm
from batchnorm.diagnostics import (
    DoctorReport,
    Thresholds,
    doctor,
    is_batchnorm,
    output_gap,
    stat_gaps,
)

# tiny models: one torch thread (conftest.one_torch_thread) for the whole module
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits(one_torch_thread) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(d.target), generator=g)
    x = torch.tensor(d.data, dtype=torch.float32)[perm] / 16.0
    return x, torch.tensor(d.target)[perm]


def mlp(*, dropout: float = 0.0, bias: bool = False, momentum: float | None = 0.1) -> nn.Sequential:
    """Linear → BN → ReLU (→ Dropout, right before the second BN) → Linear → BN → ReLU → Linear."""
    layers: list[nn.Module] = [
        nn.Linear(64, 64, bias=bias),
        nn.BatchNorm1d(64, momentum=momentum),
        nn.ReLU(),
        nn.Linear(64, 64, bias=bias),
    ]
    if dropout:
        layers += [nn.ReLU(), nn.Dropout(dropout)]
    layers += [nn.BatchNorm1d(64, momentum=momentum), nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int = 300) -> nn.Module:
    x, y = data
    torch.manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.fixture(scope="module")
def healthy(digits) -> nn.Module:
    return train(mlp(), digits)


@pytest.fixture(scope="module")
def with_dropout(digits) -> nn.Module:
    return train(mlp(dropout=0.5), digits)


def clone(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def checks(report: DoctorReport, at_least: str = "info") -> set[tuple[str, str]]:
    rank = {"error": 0, "warning": 1, "info": 2}
    return {(f.check, f.layer) for f in report.findings if rank[f.severity] <= rank[at_least]}


def severities(report: DoctorReport, check: str) -> list[str]:
    return [f.severity for f in report.by_check(check)]


def run(model: nn.Module, x: torch.Tensor, **kw) -> DoctorReport:
    return doctor(model, x, kw.pop("num_batches", 8), batch_size=kw.pop("batch_size", 32), **kw)


# --------------------------------------------------------------------------------------------
# no false alarm, and the model never changes


def test_healthy_trained_model_has_no_warning(healthy, digits):
    report = run(healthy, digits[0])
    assert checks(report, "warning") == set()
    assert report.output_gap is not None
    assert report.output_gap.relative_rms < Thresholds().output_gap_warning
    assert not report.has_errors
    assert set(report.train_gaps) == {"1", "4"}
    assert report.order == "the torch.fx graph"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_doctor_never_changes_the_model(with_dropout, digits, mode):
    model = clone(with_dropout)
    model.train() if mode == "train" else model.eval()
    model[1].eval()  # mixed modes must survive too
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    run(model, digits[0])
    stat_gaps(model, digits[0], mode="inference")
    output_gap(model, digits[0])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert torch.equal(rng, torch.get_rng_state())
    assert hooks == sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------
# measurements against oracles


def test_stat_gaps_matches_hand_computed_formula():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0, 9.0]))
    x = torch.randn(96, 5, dtype=torch.float64).float() * 2 + 1
    gaps = stat_gaps(nn.Sequential(bn), x, num_batches=3, batch_size=32)
    g = gaps["0"]
    xs = x.double().numpy().reshape(3, 32, 5)
    mean = xs.mean(axis=1).mean(axis=0)
    var = xs.var(axis=1, ddof=1).mean(axis=0)
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    shift = np.abs(mean - rm) / np.sqrt(rv + bn.eps)
    ratio = np.sqrt((var + bn.eps) / (rv + bn.eps))
    assert g.mean_shift_max == pytest.approx(shift.max(), rel=1e-9)
    assert g.mean_shift_median == pytest.approx(np.median(shift), rel=1e-9)
    assert g.std_ratio_worst == pytest.approx(ratio[np.abs(np.log(ratio)).argmax()], rel=1e-9)
    assert g.count == 32 and g.batches == 3
    # sampling noise: batch-to-batch spread of the means, for a 3-batch average and an EMA(0.1)
    # (the Gaussian standard error sqrt(var / count) is its floor)
    sd = np.maximum(xs.mean(axis=1).std(axis=0, ddof=1), np.sqrt(var / 32))
    noise = sd * math.sqrt(1 / 3 + 0.1 / 1.9) / np.sqrt(rv + bn.eps)
    assert g.noise == pytest.approx(np.median(noise), rel=1e-9)
    big = shift > 5 * noise
    assert g.mean_shift_significant == pytest.approx(shift[big].max() if big.any() else 0.0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(0.05, 20.0),
    offset=st.floats(-50.0, 50.0),
    batches=st.integers(1, 4),
)
def test_stat_gaps_is_invariant_to_an_affine_change_of_units(seed, scale, offset, batches):
    # x -> a·x + b with running_mean -> a·rm + b and running_var -> a²·rv: same gaps
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * batches, 4, generator=g, dtype=torch.float64)
    rm = torch.randn(4, generator=g, dtype=torch.float64)
    rv = torch.rand(4, generator=g, dtype=torch.float64) + 0.5

    def gaps(x, rm, rv):
        bn = nn.BatchNorm1d(4, eps=1e-12, dtype=torch.float64)
        with torch.no_grad():
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
        return stat_gaps(nn.Sequential(bn).eval(), x, num_batches=batches, batch_size=16)["0"]

    a, b = gaps(x, rm, rv), gaps(scale * x + offset, scale * rm + offset, scale**2 * rv)
    for field in ("mean_shift_max", "mean_shift_median", "std_ratio_worst", "noise"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-6, abs=1e-9), field


def test_stat_gaps_of_a_conv_layer_pools_spatial_values():
    bn = nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 5, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    g = stat_gaps(nn.Sequential(bn), x, num_batches=1, batch_size=8)["0"]
    assert g.count == 8 * 5 * 4
    v = x.double().transpose(0, 1).reshape(3, -1).var(dim=1)  # unbiased, per channel
    # running_var = 1: the worst channel is the widest one (std ≈ 3)
    assert g.std_ratio_worst == pytest.approx(math.sqrt((v[2].item() + 1e-5) / (1 + 1e-5)))


def test_output_gap_is_zero_when_running_stats_equal_the_data_statistics():
    x = torch.randn(64, 6) * 3 + 2
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():  # exactly the pooled statistics of the two probed batches
        xs = x.double().reshape(2, 32, 6)
        bn.running_mean.copy_(xs.mean(1).mean(0).float())
        bn.running_var.copy_(xs.var(1, unbiased=True).mean(0).float())
    model = nn.Sequential(bn, nn.Linear(6, 3)).eval()
    og = output_gap(model, x, num_batches=2, batch_size=32)
    assert og.relative_rms < 1e-5
    assert og.batch_relative_rms > og.relative_rms  # per-batch statistics differ from pooled
    with torch.no_grad():
        bn.running_var.mul_(4.0)
    assert output_gap(model, x, num_batches=2, batch_size=32).relative_rms > 0.1


def test_data_as_loader_of_tuples_equals_tensor(healthy, digits):
    x, y = digits
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:256], y[:256]), batch_size=32
    )
    a = stat_gaps(healthy, loader)
    b = stat_gaps(healthy, x[:256], batch_size=32)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].mean_shift_max == pytest.approx(b[k].mean_shift_max)


# --------------------------------------------------------------------------------------------
# running statistics: initial, stale, non-finite, untracked


def test_initial_running_stats_are_an_error_and_cumulative_recalibration_cures_it(healthy, digits):
    broken = clone(healthy)
    for m in broken.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.reset_running_stats()
    report = run(broken, digits[0])
    assert severities(report, "initial-running-stats") == ["error", "error"]
    assert severities(report, "train-eval-gap") == ["error"]
    assert report.has_errors
    assert "batchnorm.recalibrate" in report.by_check("initial-running-stats")[0].fix
    # the fix, done by hand: cumulative averages (momentum=None) over the data in train mode
    cured = clone(broken)
    for m in cured.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None
    cured.train()
    with torch.no_grad():
        for xb in torch.split(digits[0], 32):
            cured(xb)
    cured.eval()
    after = run(cured, digits[0])
    assert not after.has_errors
    assert after.output_gap.relative_rms < 0.25 * report.output_gap.relative_rms


def test_recalibrate_cures_initial_running_stats(healthy, digits):
    recalibrate = batchnorm.recalibrate
    broken = clone(healthy)
    for m in broken.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.reset_running_stats()
    assert run(broken, digits[0]).has_errors
    recalibrate(broken, torch.split(digits[0], 32))
    assert checks(run(broken, digits[0]), "warning") == set()


def test_recalibrate_cures_the_dropout_variance_shift(with_dropout, digits):
    recalibrate = batchnorm.recalibrate
    before = run(with_dropout, digits[0])
    assert before.by_check("eval-input-shift") and before.output_gap is not None
    fixed = clone(with_dropout)
    recalibrate(fixed, torch.split(digits[0], 32))
    after = run(fixed, digits[0])
    assert not after.by_check("eval-input-shift")
    assert after.inference_gaps["6"].std_ratio_median == pytest.approx(1.0, abs=0.05)
    assert after.output_gap is not None
    assert after.output_gap.relative_rms < 0.5 * before.output_gap.relative_rms
    # the structure stays, but with no measured shift it is only worth knowing
    assert severities(after, "dropout-before-bn") == ["info"]


def test_before_after_reports_the_cure_and_leaves_the_model_alone(with_dropout, digits):
    from batchnorm.diagnostics import before_after

    recalibrate = batchnorm.recalibrate
    state = {k: v.clone() for k, v in with_dropout.state_dict().items()}
    d = before_after(
        with_dropout,
        digits[0],
        lambda m: recalibrate(m, torch.split(digits[0], 32)),
        batch_size=32,
    )
    assert all(torch.equal(v, with_dropout.state_dict()[k]) for k, v in state.items())
    assert {"check": "eval-input-shift", "layer": "6"} in d["cured"]
    assert d["after"]["output_gap"] < d["before"]["output_gap"]
    assert d["after"]["std_ratio_median"]["6"] == pytest.approx(1.0, abs=0.05)
    assert d["before"]["std_ratio_median"]["6"] < 0.85
    json.dumps(d)


def test_stale_running_stats_after_weights_change(healthy, digits):
    stale = clone(healthy)
    with torch.no_grad():  # the weights moved on; the statistics did not
        stale[0].weight.mul_(3.0)
        stale[0].weight.add_(0.05)
    report = run(stale, digits[0])
    assert "error" in severities(report, "stale-running-stats")
    f = report.by_check("stale-running-stats")[0]
    assert f.layer == "1" and f.evidence["std_ratio_worst"] > 2
    recalibrate = getattr(batchnorm, "recalibrate", None)
    if recalibrate is not None:  # the fix named in the finding cures it
        recalibrate(stale, torch.split(digits[0], 32))
        assert not run(stale, digits[0]).by_check("stale-running-stats")


def test_nonfinite_running_stats(healthy, digits):
    bad = clone(healthy)
    with torch.no_grad():
        bad[4].running_var[3] = float("nan")
    report = run(bad, digits[0])
    assert severities(report, "nonfinite-running-stats") == ["error"]
    assert report.by_check("nonfinite-running-stats")[0].layer == "4"
    assert not run(healthy, digits[0]).by_check("nonfinite-running-stats")
    json.loads(report.to_json())  # still valid JSON with inf/NaN in the evidence


def test_nonfinite_activations(healthy, digits):
    x = digits[0].clone()
    x[5, 7] = float("inf")
    report = run(healthy, x)
    assert "nonfinite-activations" in {f.check for f in report.errors}
    assert not run(healthy, digits[0]).by_check("nonfinite-activations")


@pytest.mark.parametrize("momentum, found", [(None, ["warning"]), (0.1, [])])
def test_untracked_counter(healthy, digits, momentum, found):
    m = clone(healthy)
    m[1].num_batches_tracked.zero_()
    m[1].momentum = momentum
    # only the cumulative average (momentum=None) is hurt by a zero counter
    assert severities(run(m, digits[0]), "untracked-running-stats") == found
    assert not run(healthy, digits[0]).by_check("untracked-running-stats")


def test_no_running_stats_is_reported(digits):
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8, track_running_stats=False)).eval()
    report = run(model, digits[0])
    assert severities(report, "batch-stats-in-eval") == ["warning"]
    assert "0" not in [g for g, v in report.train_gaps.items() if v.has_running_stats]


# --------------------------------------------------------------------------------------------
# batch size


def test_small_per_channel_count(healthy, digits):
    small = run(healthy, digits[0], batch_size=4)
    assert {f.layer for f in small.by_check("small-count")} == {"1", "4"}
    assert small.by_check("small-count")[0].evidence["count"] == 4
    assert not run(healthy, digits[0]).by_check("small-count")
    # the count at the training batch size, measured on the data's batch size
    scaled = run(healthy, digits[0], train_batch_size=2)
    assert severities(scaled, "small-count") == ["warning", "warning"]
    one = run(healthy, digits[0], train_batch_size=1)
    assert severities(one, "small-count") == ["error", "error"]


def test_a_short_remainder_of_tensor_data_is_not_a_batch(healthy, digits):
    # 65 rows in batches of 32: two batches of 32, not a third of 1 (which fails in train mode)
    report = run(healthy, digits[0][:65], num_batches=8)
    assert report.num_batches == 2 and not report.by_check("forward-failed")
    assert report.train_gaps["1"].count == 32


def test_a_data_loader_s_short_last_batch_is_not_a_batch_either(healthy, digits):
    x = digits[0][:65]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32)
    report = doctor(healthy, loader, 8)
    assert report.num_batches == 2 and not report.by_check("forward-failed")
    assert report.train_gaps["1"].count == 32 and not report.by_check("small-count")
    # a full last batch is kept, and so is one batch alone; num_batches cuts before the end
    assert doctor(healthy, list(x[:64].split(32)), 8).num_batches == 2
    assert doctor(healthy, [x[:20]], 8).num_batches == 1
    assert doctor(healthy, loader, 1).train_gaps["1"].count == 32


def test_running_statistics_of_small_training_batches_are_not_called_stale():
    """An EMA over 4-sample (virtual) batches scatters much more than the probe's batch of 64
    suggests: that noise is the running average's, not staleness."""
    torch.manual_seed(0)
    x = torch.randn(2048, 20) * 3 + 1
    stale = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        for make, kw in (
            (lambda: batchnorm.GhostBatchNorm1d(32, virtual_batch_size=4), {}),
            (lambda: batchnorm.BatchNorm1d(32), {"train_batch_size": 4}),
        ):
            torch.manual_seed(seed)
            m = nn.Sequential(nn.Linear(20, 32, bias=False), make(), nn.ReLU(), nn.Linear(32, 4))
            step = 64 if kw == {} else 4
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", batchnorm.SmallBatchWarning)
                for _ in range(200 if kw == {} else 800):
                    m(x[torch.randint(0, 2048, (step,), generator=g)])
            report = doctor(m.eval(), x, 8, batch_size=64, **kw)
            assert report.by_check("small-count")
            stale += report.by_check("stale-running-stats")
    assert stale == []


def test_conv_count_includes_spatial_positions():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    x = torch.randn(16, 1, 6, 6)
    assert run(model, x, batch_size=2).train_gaps["1"].count == 2 * 36
    assert not run(model, x, batch_size=2).by_check("small-count")


def test_batch_of_one_fails_in_train_mode(healthy, digits):
    report = run(healthy, digits[0][:3], batch_size=1)
    assert "forward-failed" in {f.check for f in report.errors}
    (f,) = report.by_check("forward-failed")  # eval mode runs; train mode does not
    assert f.evidence["mode"] == "train" and "2 values per channel" in f.why


def test_data_that_does_not_fit_the_model_is_one_finding(healthy, digits):
    """Wrong feature count: the same error in eval and train mode is reported once, without
    the batch-size explanation that belongs to a train-mode-only failure."""
    report = run(healthy, digits[0][:, :7])
    (f,) = report.by_check("forward-failed")
    assert f.evidence["mode"] == "eval" and "per channel" not in f.why


class _Raises(nn.Module):
    """A BN model whose forward fails on the data with ``kind`` — behind a data-dependent
    branch (which torch.fx cannot trace) when ``branchy``."""

    def __init__(self, kind: type[Exception], branchy: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(20)
        self.kind, self.branchy = kind, branchy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        if self.branchy and bool(h.mean() > -1e9):
            h = h + 1
        raise self.kind(f"the model's own {self.kind.__name__}")


def test_one_nan_in_the_data_is_that_finding_not_a_train_eval_gap():
    """The NaN reaches the reference outputs too: those rows compare nothing (it was an inf
    train/eval gap, an error with recalibrate as its fix, on a healthy model)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(20, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)
    )
    with torch.no_grad():
        for _ in range(50):
            m(torch.randn(64, 20))
    m.eval()
    x = torch.randn(512, 20)
    assert not run(m, x).findings
    x[3, 2] = float("nan")
    assert [f.check for f in run(m, x).findings] == ["nonfinite-activations"]


@pytest.mark.parametrize("branchy", [False, True], ids=["traceable", "untraceable"])
@pytest.mark.parametrize("kind", [IndexError, AssertionError, KeyError, TypeError, RuntimeError])
def test_whatever_the_model_raises_is_a_forward_failed_finding(kind, branchy):
    report = run(_Raises(kind, branchy).eval(), torch.randn(256, 20))
    (f,) = report.by_check("forward-failed")
    assert f.severity == "error" and f"the model's own {kind.__name__}" in f.measured


# --------------------------------------------------------------------------------------------
# structure: Dropout, bias, normalization after BN


def test_dropout_right_before_bn_is_measured_and_found(with_dropout, healthy, digits):
    report = run(with_dropout, digits[0])
    f = report.by_check("dropout-before-bn")
    assert [x.layer for x in f] == ["6"] and f[0].severity == "warning"
    assert f[0].evidence["immediate"] is True
    assert "torch.fx" in f[0].measured
    # the measured variance shift: eval-mode input std well below the running std
    g = report.inference_gaps["6"]
    assert g.std_ratio_median < 0.85
    assert report.train_gaps["6"].std_ratio_median == pytest.approx(1.0, abs=0.1)
    assert report.by_check("eval-input-shift")[0].layer == "6"
    assert not run(healthy, digits[0]).by_check("dropout-before-bn")


def test_dropout_after_the_last_bn_is_fine(digits):
    model = nn.Sequential(
        nn.Linear(64, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 10),
    )
    report = run(train(model, digits, steps=150), digits[0])
    assert not report.by_check("dropout-before-bn")
    assert not report.by_check("eval-input-shift")


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 1.0
        return self.bn(self.drop(self.fc(x)))


def test_order_falls_back_to_forward_hooks(digits):
    report = run(_Branchy().eval(), digits[0])
    assert report.order.startswith("a hooked forward pass")
    assert [f.layer for f in report.by_check("dropout-before-bn")] == ["bn"]
    assert "hooked forward pass" in report.by_check("dropout-before-bn")[0].measured


class _SideBranch(nn.Module):
    """Untraceable, with a Dropout called right before the BN but on another branch."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(64, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.side = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 1.0
        a = self.drop(x)
        return self.bn(self.fc(x)) + self.side(a)


def test_hook_order_follows_tensors_not_just_call_order(digits):
    report = run(_SideBranch().eval(), digits[0])
    assert report.order.startswith("a hooked forward pass")
    assert not report.by_check("dropout-before-bn")  # the Dropout feeds 'side', not 'bn'


def test_hooked_pass_sees_functional_dropout_and_views(digits):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 16, bias=True)
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # untraceable
                x = x * 1.0
            h = nn.functional.dropout(self.fc(x), 0.3, self.training)
            return self.bn(h.view(-1, 16))

    report = run(Net().eval(), digits[0])
    assert report.order.startswith("a hooked forward pass")
    f = report.by_check("dropout-before-bn")
    assert [(x.layer, x.evidence["p"], x.evidence["immediate"]) for x in f] == [("bn", 0.3, True)]
    assert not report.by_check("bias-before-bn")  # the dropout sits between fc and bn


def test_functional_dropout_is_found_in_the_graph(digits):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 16, bias=False)
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(nn.functional.dropout(self.fc(x), 0.4, self.training))

    assert [f.layer for f in run(Net().eval(), digits[0]).by_check("dropout-before-bn")] == ["bn"]


@pytest.mark.parametrize("bias", [True, False])
def test_bias_before_bn(digits, bias):
    model = nn.Sequential(nn.Linear(64, 16, bias=bias), nn.Flatten(), nn.BatchNorm1d(16)).eval()
    found = run(model, digits[0]).by_check("bias-before-bn")
    assert [f.severity for f in found] == (["info"] if bias else [])


def test_bias_before_bn2d():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
    found = run(model, torch.randn(32, 2, 6, 6)).by_check("bias-before-bn")
    assert [(f.layer, f.evidence["producer"]) for f in found] == [("1", "0")]


def test_bn_undone_by_a_normalization_right_after(digits):
    bad = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.BatchNorm1d(16)).eval()
    assert [f.layer for f in run(bad, digits[0]).by_check("bn-undone")] == ["1"]
    ln = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.LayerNorm(16)).eval()
    assert [f.layer for f in run(ln, digits[0]).by_check("bn-undone")] == ["1"]
    good = nn.Sequential(
        nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16)
    ).eval()
    assert not run(good, digits[0]).by_check("bn-undone")
    # a frozen BN next is a fixed affine map, which re-normalizes nothing: not flagged
    for freeze in (batchnorm.FrozenBatchNorm1d.from_batchnorm, batchnorm.freeze):
        frozen_next = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.BatchNorm1d(16))
        frozen_next[2] = freeze(frozen_next[2].eval())
        assert not run(frozen_next.eval(), digits[0]).by_check("bn-undone")
    # a frozen BN followed by a live one: the live one undoes the frozen one's map
    first_frozen = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.BatchNorm1d(16))
    batchnorm.freeze(first_frozen[1])
    assert [f.layer for f in run(first_frozen.eval(), digits[0]).by_check("bn-undone")] == ["1"]


# --------------------------------------------------------------------------------------------
# momentum, dead channels, γ = 0


def test_keras_momentum(healthy, digits):
    m = clone(healthy)
    m[4].momentum = 0.99
    report = run(m, digits[0])
    f = report.by_check("keras-momentum")
    assert [(x.layer, x.severity) for x in f] == [("4", "warning")]
    assert f[0].evidence["suggested"] == pytest.approx(0.01)
    assert not run(healthy, digits[0]).by_check("keras-momentum")
    # Keras' 0.99 through from_keras is PyTorch's 0.01: no finding
    keras_style = nn.Sequential(
        nn.Linear(64, 8), batchnorm.BatchNorm.from_keras(8, momentum=0.99, backend="torch")
    )
    assert not run(keras_style.eval(), digits[0]).by_check("keras-momentum")


def test_dead_channels_and_zero_gamma(healthy, digits):
    m = clone(healthy)
    with torch.no_grad():
        m[3].weight[[2, 5]] = 0.0  # channels 2 and 5 of the second BN get a constant input
        m[1].weight[[7]] = 0.0  # γ = 0 for channel 7 of the first BN
    report = run(m, digits[0])
    dead = report.by_check("dead-channels")
    assert [(f.layer, f.evidence["dead_channels"]) for f in dead] == [("4", [2, 5])]
    zg = report.by_check("zero-gamma")
    assert [(f.layer, f.severity, f.evidence["zero_gamma_channels"]) for f in zg] == [
        ("1", "warning", [7])
    ]
    assert not run(healthy, digits[0]).by_check("dead-channels")
    assert not run(healthy, digits[0]).by_check("zero-gamma")
    # a dead channel is left out of the gap summary: no stale-statistics alarm from it
    assert not report.by_check("stale-running-stats")


# --------------------------------------------------------------------------------------------
# frozen by accident / not frozen when fine-tuning


def test_frozen_by_accident(healthy, digits):
    m = clone(healthy).train()
    m[4].eval()  # a stray .eval()
    f = run(m, digits[0]).by_check("frozen-stats")
    assert [(x.layer, x.severity) for x in f] == [("4", "warning")]
    assert not run(clone(healthy).train(), digits[0]).by_check("frozen-stats")


def test_not_frozen_while_fine_tuning(healthy, digits):
    m = clone(healthy).train()
    for p in m.parameters():
        p.requires_grad_(False)
    m[6].weight.requires_grad_(True)  # fine-tune the head only, but BN still in train mode
    report = run(m, digits[0])
    assert {f.layer for f in report.by_check("unfrozen-stats")} == {"1", "4"}
    freeze = getattr(batchnorm, "freeze", None)
    if freeze is None:
        from batchnorm import variants

        freeze = variants.freeze
    fixed = freeze(clone(m), affine=True).train()
    report = run(fixed, digits[0])
    assert not report.by_check("unfrozen-stats") and not report.by_check("frozen-stats")


def test_frozen_layers_show_no_train_eval_gap(healthy, digits):
    # a frozen layer normalizes with its running statistics in train mode too, so its model has
    # no train/eval gap, whatever those statistics are (pretrained on other data, say)
    x = digits[0]
    with torch.no_grad():
        shifted = clone(healthy)
        for i in (1, 4):
            shifted[i].running_mean.add_(0.5)
            shifted[i].running_var.mul_(3.0)
    frozen = batchnorm.freeze(clone(shifted)).train()
    with torch.no_grad():
        assert torch.equal(frozen(x[:64]), clone(frozen).eval()(x[:64]))
    for model in (frozen, clone(frozen).eval()):
        report = run(model, x)
        assert report.output_gap is not None and report.output_gap.relative_rms == 0.0
        assert not report.by_check("train-eval-gap")
    # the same statistics in layers that are not frozen: the gap is there and found
    assert run(clone(shifted).eval(), x).by_check("train-eval-gap")


# --------------------------------------------------------------------------------------------
# our layers, report formats


def test_our_layers_give_the_same_findings(healthy, digits):
    theirs = clone(healthy)
    theirs[4].momentum = 0.9
    ours = batchnorm.convert_model(clone(theirs))
    for m in ours.modules():
        if isinstance(m, batchnorm.BatchNorm1d):
            m.backend = "torch"  # the numerics are tested elsewhere; skip the kernels' compile
    assert all(is_batchnorm(m) for m in (ours[1], ours[4], theirs[1]))
    a, b = run(theirs, digits[0]), run(ours, digits[0])
    assert [(f.check, f.layer, f.severity) for f in a.findings] == [
        (f.check, f.layer, f.severity) for f in b.findings
    ]
    assert a.train_gaps["1"].mean_shift_max == pytest.approx(b.train_gaps["1"].mean_shift_max)


def test_keras_convention_layer_compares_biased_variance(digits):
    bn = batchnorm.BatchNorm(5, axis=-1, unbiased_running_var=False, backend="torch")
    x = torch.randn(256, 5)
    with torch.no_grad():  # biased variance of 32-row batches, as a Keras layer stores it
        xs = x.double().reshape(8, 32, 5)
        bn.running_mean.copy_(xs.mean(1).mean(0).float())
        bn.running_var.copy_(xs.var(1, unbiased=False).mean(0).float())
    g = stat_gaps(nn.Sequential(bn).eval(), x, batch_size=32)["0"]
    assert g.mean_shift_max < 1e-6 and abs(g.std_ratio_worst - 1) < 1e-6


def test_report_text_and_json(healthy, digits):
    broken = clone(healthy)
    broken[1].reset_running_stats()
    broken[4].momentum = 0.99
    report = run(broken, digits[0])
    text = str(report)
    assert text.splitlines()[0].startswith("batchnorm doctor: Sequential")
    assert "ERROR   initial-running-stats  [1]" in text
    assert "fix: batchnorm.recalibrate(model, data)" in text
    d = json.loads(report.to_json())
    assert d["summary"]["error"] == len(report.errors) >= 1
    assert {f["check"] for f in d["findings"]} == {f.check for f in report.findings}
    ranks = [{"error": 0, "warning": 1, "info": 2}[f.severity] for f in report.findings]
    assert ranks == sorted(ranks)
    for f in d["findings"]:
        assert set(f) == {"check", "severity", "layer", "measured", "why", "fix", "evidence"}


def test_bad_input_messages(healthy):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        doctor("not a model", torch.zeros(4, 64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_batches"):
        doctor(healthy, torch.zeros(4, 64), num_batches=0)
    with pytest.raises(TypeError, match="iterable of batches"):
        doctor(healthy, 3.0)
    with pytest.raises(ValueError, match="train_batch_size must be >= 1, got 0"):
        doctor(healthy, torch.zeros(4, 64), train_batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        stat_gaps(healthy, torch.zeros(4, 64), mode="test")  # type: ignore[arg-type]


def test_a_model_without_bn_is_said_so():
    report = doctor(nn.Sequential(nn.Linear(3, 2)), torch.randn(10, 3))
    assert [(f.check, f.severity) for f in report.findings] == [("no-batchnorm", "info")]
    assert report.layers == [] and not report.has_errors


def test_a_fresh_model_in_train_mode_is_not_an_error(digits):
    fresh = mlp().train()  # about to be trained: initial statistics are expected
    report = run(fresh, digits[0])
    assert not report.has_errors
    assert severities(report, "initial-running-stats") == ["info", "info"]
    # the same model deployed (eval mode) without training is an error
    assert severities(run(fresh.eval(), digits[0]), "initial-running-stats") == ["error", "error"]


def test_messages_fit_the_layer_a_nan_channel_and_a_bn_without_beta(healthy, digits):
    m = copy.deepcopy(healthy)
    m[1].running_mean[2] = float("nan")
    (f,) = run(m, digits[0]).by_check("nonfinite-running-stats")
    assert "those channels' outputs are NaN" in f.why and "every output" not in f.why
    m[1].running_var.fill_(float("nan"))
    (f,) = run(m, digits[0]).by_check("nonfinite-running-stats")
    assert "every output of this layer" in f.why

    net = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8, affine=False)).eval()
    (f,) = doctor(net, digits[0], 4, batch_size=32).by_check("bias-before-bn")
    assert "β takes its role" not in f.why and "has no β" in f.why


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: batchnorm.stat_gaps(nn.BatchNorm1d(4), x, num_batches=0), "num_batches must"),
        (lambda x: batchnorm.output_gap(nn.BatchNorm1d(4), x, batch_size=0), "batch_size must"),
        (lambda x: batchnorm.stat_gaps(nn.BatchNorm1d(4), []), "data yielded no batches"),
        (lambda x: batchnorm.output_gap(nn.BatchNorm1d(4), 5), "data must be a tensor"),
        (lambda x: batchnorm.stat_gaps(nn.BatchNorm1d(4), [{"y": x}]), "a batch is a dict"),
    ],
)
def test_stat_gaps_and_output_gap_name_themselves_in_argument_errors(call, message):
    """Their argument checks are the doctor's and said "doctor:" for a function not called."""
    name = "stat_gaps" if "stat_gaps" in call.__code__.co_names else "output_gap"
    with pytest.raises((ValueError, TypeError), match=rf"^{name}: {message}"):
        call(torch.randn(64, 4))
