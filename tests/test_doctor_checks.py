"""batchnorm.doctor on models with a shared BN layer, few batches, frozen initial statistics,
a bias that BN does not cancel, GhostBatchNorm, a negative running variance, lazy layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.diagnostics import DoctorReport, doctor
from batchnorm.variants import FrozenBatchNorm1d

# tiny models: one torch thread (conftest.one_torch_thread) for the whole module
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def found(report: DoctorReport) -> list[tuple[str, str]]:
    return [(f.severity, f.check) for f in report.findings]


def mlp(bn: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 16, bias=False), bn, nn.ReLU(), nn.Linear(16, 4))


def fill_stats(model: nn.Module, x: torch.Tensor, batch: int = 64, epochs: int = 1) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(epochs):
            for b in torch.split(x, batch):
                model(b)
    return model.eval()


class _Shared(nn.Module):
    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.bn = nn.BatchNorm1d(16, momentum=None)
        self.out = nn.Linear(32, 4)
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        both = torch.cat([self.bn(h), self.bn(h * self.scale + self.shift)], 1)
        return self.out(torch.relu(both))


def test_shared_bn_on_inputs_with_different_statistics_is_an_error():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    model = fill_stats(_Shared(5.0, 3.0), x, epochs=3)
    (f,) = doctor(model, x).by_check("shared-bn")
    assert (f.severity, f.layer, f.evidence["calls"]) == ("error", "bn", 2)
    assert "called 2 times per forward pass" in f.measured
    assert "call 1:" in f.measured and "call 2:" in f.measured and "running_mean" in f.measured
    assert "its own BN layer" in f.fix
    assert len(f.evidence["call_mean_median"]) == 2


def test_shared_bn_on_inputs_alike_is_fine():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    model = fill_stats(_Shared(1.0, 0.0), x, epochs=3)
    report = doctor(model, x)
    assert report.by_check("shared-bn") == []
    assert [f for f in report.findings if f.severity != "info"] == []


def _calibrated() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4096, 16) * 2 + 1
    model = fill_stats(mlp(nn.BatchNorm1d(16, momentum=None)), x, epochs=3)
    return model, x


@pytest.mark.parametrize(("num_batches", "batch_size"), [(1, 64), (1, 16), (2, 16), (2, 64)])
def test_a_calibrated_model_on_few_batches_raises_no_alarm(num_batches, batch_size):
    model, x = _calibrated()
    for seed in range(5):
        xs = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
        report = doctor(model, xs, num_batches=num_batches, batch_size=batch_size)
        assert [f for f in report.findings if f.severity != "info"] == [], (seed, found(report))
        if num_batches == 1:
            (f,) = report.by_check("few-batches")
            assert f.evidence["min_batches"] == 2 and "at least 2 batches" in f.why
            assert "recalibrate" not in f.fix


def test_few_batches_still_find_initial_statistics():
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 2 + 1
    report = doctor(mlp(nn.BatchNorm1d(16)).eval(), x, num_batches=1)
    assert ("error", "initial-running-stats") in found(report)


def test_frozen_layer_with_initial_statistics_in_a_training_model_is_an_error():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 2 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = batchnorm.freeze(mlp(nn.BatchNorm1d(16))).train()
    built_frozen = mlp(FrozenBatchNorm1d(16)).train()
    held_eval = mlp(nn.BatchNorm1d(16)).train()
    held_eval[1].eval()
    for model in (frozen, built_frozen, held_eval):
        report = doctor(model, x)
        assert report.has_errors, found(report)
        assert report.by_check("initial-running-stats")[0].severity == "error"
    assert "unfreeze" in doctor(frozen, x).by_check("initial-running-stats")[0].fix


def test_a_fresh_model_about_to_train_is_still_info():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 2 + 1
    report = doctor(mlp(nn.BatchNorm1d(16)).train(), x)
    assert not report.has_errors
    assert report.by_check("initial-running-stats")[0].severity == "info"


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.out(h + self.bn(h))


class _LastAxis(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def test_a_bias_that_bn_does_not_cancel_is_not_reported():
    torch.manual_seed(0)
    residual = fill_stats(_Residual(), torch.randn(256, 16), batch=32)
    assert doctor(residual, torch.randn(256, 16), batch_size=32).by_check("bias-before-bn") == []
    x = torch.randn(256, 8, 8)  # (N, C, L): the Linear acts on L, BatchNorm1d normalizes C
    last = fill_stats(_LastAxis(nn.BatchNorm1d(8)), x, batch=32)
    assert doctor(last, x, batch_size=32).by_check("bias-before-bn") == []


def test_a_bias_along_the_channel_axis_of_our_bn_is_reported():
    torch.manual_seed(0)
    x = torch.randn(256, 8, 8)  # (N, L, C): the Linear acts on C, our BN with axis=-1 too
    model = fill_stats(_LastAxis(batchnorm.BatchNorm(8, axis=-1)), x, batch=32)
    assert [f.layer for f in doctor(model, x, batch_size=32).by_check("bias-before-bn")] == ["bn"]


def test_the_fix_for_initial_statistics_with_cumulative_momentum_settles():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 2 + 1
    model = mlp(nn.BatchNorm1d(16, momentum=None)).eval()
    (f,) = doctor(model, x).by_check("initial-running-stats")
    assert "num_batches_tracked" in f.fix
    batches = torch.split(x, 64)
    batchnorm.recalibrate(model, batches)
    if int(model[1].num_batches_tracked) == 0:  # the fix's second step
        model[1].num_batches_tracked.fill_(len(batches))
    report = doctor(model, x)
    assert [f for f in report.findings if f.severity != "info"] == [], found(report)


def test_ghost_batch_norm_counts_values_per_virtual_batch():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    ghost = fill_stats(mlp(batchnorm.GhostBatchNorm1d(16, virtual_batch_size=4)), x, epochs=5)
    (f,) = doctor(ghost, x, batch_size=64).by_check("small-count")
    assert (f.severity, f.evidence["count"]) == ("warning", 4)
    assert "virtual batch of 4" in f.measured
    roomy = fill_stats(mlp(batchnorm.GhostBatchNorm1d(16, virtual_batch_size=32)), x, epochs=5)
    assert doctor(roomy, x, batch_size=64).by_check("small-count") == []


def test_negative_running_var_is_counted_and_not_repeated_as_inf():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    model = fill_stats(mlp(nn.BatchNorm1d(16, momentum=None)), x)
    model[1].running_var[3] = -0.5
    model[1].running_var[7] = -1.0
    report = doctor(model, x)
    (f,) = report.by_check("nonfinite-running-stats")
    assert "negative in 2 of 16 channel(s) [3, 7]" in f.measured
    assert not f.measured.startswith("BatchNorm1d(16): 0 ")
    assert f.evidence["negative_var_count"] == 2
    assert f.evidence["negative_var_channels"] == [3, 7]
    for g in report.findings:
        assert "inf" not in g.measured, (g.check, g.measured)


def test_an_uninitialized_lazy_layer_is_explained():
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyBatchNorm1d())
    with pytest.raises(TypeError, match="run one forward pass"):
        doctor(model, torch.randn(64, 4))


class _ByKeyword(nn.Module):
    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.keyword = keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.bn(input=h) if self.keyword else self.bn(h)


def test_a_bn_layer_called_by_keyword_is_measured_as_one_called_by_position():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 3 + 1
    by_position, by_keyword = _ByKeyword(False).eval(), _ByKeyword(True).eval()
    by_keyword.load_state_dict(by_position.state_dict())
    expected = doctor(by_position, x)
    assert found(expected)[:2] == [("error", "train-eval-gap"), ("error", "initial-running-stats")]
    report = doctor(by_keyword, x)
    assert found(report) == found(expected)
    assert report.train_gaps["bn"] == expected.train_gaps["bn"]
    assert batchnorm.stat_gaps(by_keyword, x) == batchnorm.stat_gaps(by_position, x)


class _UntraceableDropoutByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
            h = self.drop(h)
        return self.bn(input=h)


def test_the_hooked_dataflow_links_a_bn_layer_called_by_keyword():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    model = fill_stats(_UntraceableDropoutByKeyword(), x)
    (f,) = doctor(model, x).by_check("dropout-before-bn")
    assert f.layer == "bn" and "hooked forward pass" in f.measured


class _Padded(nn.Module):
    """(N, C, L) sequences zero-padded at the end; BN takes its statistics over the valid
    positions (README: masked statistics for padded sequences)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 1, bias=False)
        self.bn = batchnorm.BatchNorm1d(4, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x), mask=x.abs().sum(1) != 0)


def test_a_bn_layer_called_with_a_padding_mask_is_measured_on_the_valid_positions():
    torch.manual_seed(0)
    lengths = torch.randint(3, 21, (256,))
    valid = torch.arange(20)[None, :] < lengths[:, None]  # (N, L)
    x = (torch.randn(256, 3, 20) * 2 + 3) * valid[:, None, :]
    model = fill_stats(_Padded(), x, epochs=3)  # running statistics: the valid positions'
    report = doctor(model, x)
    assert [f for f in report.findings if f.severity != "info"] == [], found(report)
    batchnorm.recalibrate(model, torch.split(x, 64))
    assert not doctor(model, x).has_errors
    # the gap of one batch, by hand over its valid positions only
    g = batchnorm.stat_gaps(model, x[:64], num_batches=1, batch_size=64)["bn"]
    with torch.no_grad():
        h = model.conv(x[:64]).double().transpose(1, 2)[valid[:64]]  # (valid values, C)
    rm, rv = model.bn.running_mean.double(), model.bn.running_var.double()
    shift = (h.mean(0) - rm).abs() / (rv + model.bn.eps).sqrt()
    assert g.count == int(valid[:64].sum())
    assert g.mean_shift_max == pytest.approx(float(shift.max()), rel=1e-9)


class _CalledTwice(nn.Module):
    def __init__(self, elsewhere: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.elsewhere = elsewhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.fc(x)))
        # the second call's output goes past the BN (its bias matters), or into the BN again
        return h + (self.fc(x) if self.elsewhere else self.bn(self.fc(2 * x)))


def test_a_bias_that_also_reaches_the_output_past_the_bn_is_not_reported():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    elsewhere = fill_stats(_CalledTwice(True), x, batch=32)
    assert doctor(elsewhere, x, batch_size=32).by_check("bias-before-bn") == []
    into_bn = fill_stats(_CalledTwice(False), x, batch=32)
    found_ = doctor(into_bn, x, batch_size=32).by_check("bias-before-bn")
    assert [(f.layer, f.evidence["producer"]) for f in found_] == [("bn", "fc")]


def _readme_severities(check: str) -> set[str]:
    """The severities the README's table of the doctor's checks lists for ``check``."""
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    (row,) = [r for r in readme.read_text().splitlines() if r.startswith(f"| `{check}` |")]
    cell = row.split("|")[2]
    return {s for s in ("error", "warning", "info") if s in cell}


def test_the_readme_lists_every_severity_of_the_train_eval_gap():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 2 + 1
    about_to_train = doctor(mlp(nn.BatchNorm1d(16)).train(), x).by_check("train-eval-gap")
    never_trained = doctor(mlp(nn.BatchNorm1d(16)).eval(), x).by_check("train-eval-gap")
    given = {f.severity for f in about_to_train + never_trained}
    assert given == {"info", "error"}
    assert given <= _readme_severities("train-eval-gap")


class _MaskedConv(nn.Module):
    """conv (with a bias) → our BN called with a padding mask; ``traceable=False`` adds a
    branch on data, so the doctor follows the dataflow with hooks instead of torch.fx."""

    def __init__(self, keyword: bool, traceable: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 4, 1), batchnorm.BatchNorm1d(4)
        self.keyword, self.traceable = keyword, traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and bool(x.isnan().any()):
            x = x.nan_to_num()
        mask = x.abs().sum(1) != 0
        h = self.conv(x)
        return self.bn(h, mask=mask) if self.keyword else self.bn(h, mask)


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("traceable", [True, False])
def test_a_bias_before_a_layer_called_with_a_mask_is_reported(keyword, traceable):
    # the mask counted as the BN's second input, so its producer was not found and the bias,
    # cancelled all the same, went unreported
    torch.manual_seed(0)
    found_ = doctor(_MaskedConv(keyword, traceable), torch.randn(64, 3, 10), batch_size=32)
    assert [(f.layer, f.evidence["producer"]) for f in found_.by_check("bias-before-bn")] == [
        ("bn", "conv")
    ]
