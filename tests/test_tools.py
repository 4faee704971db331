"""recalibrate against population statistics computed directly from the layers' inputs; fold and
to_inference against the unfolded model in float64."""

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.nn.batchnorm import _BatchNormBase
from batchnorm.tools import Moments, accumulate_moments, merge_moments


def _bn_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Oracle: every BN layer's inputs over ``batches``, with the model in eval mode and the
    BN layers normalizing with batch statistics (without touching the real model)."""
    m = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in m.named_modules():
        if isinstance(layer, (nn.modules.batchnorm._BatchNorm, _BatchNormBase)):
            layer.train()
            layer.register_forward_pre_hook(
                lambda mod, args, n=name: seen.setdefault(n, []).append(args[0].detach())
            )
    with torch.no_grad():
        for b in batches:
            m(b)
    return {k: torch.cat(v) for k, v in seen.items()}


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(6, 4),
        batchnorm.BatchNorm1d(4),
        nn.Tanh(),
        nn.Linear(4, 3),
        batchnorm.BatchNorm(3, axis=-1, unbiased_running_var=False),
    ).double()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(0, 10_000))
def test_merge_moments_is_exact(sizes, seed) -> None:  # type: ignore[no-untyped-def]
    g = np.random.default_rng(seed)
    parts = [torch.from_numpy(g.normal(3, 2, size=(n, 3))) for n in sizes]
    total = Moments(0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    for p in parts:
        total = merge_moments(total, Moments.of(p, axis=1))
    allx = torch.cat(parts)
    assert total.count == allx.shape[0]
    torch.testing.assert_close(total.mean, allx.mean(0), rtol=1e-12, atol=1e-12)
    if allx.shape[0] > 1:
        torch.testing.assert_close(total.variance(), allx.var(0), rtol=1e-10, atol=1e-12)


def test_recalibrate_gives_exact_population_statistics_weighted_by_samples() -> None:
    net = _net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 2 + 1 for n in (16, 16, 5)]
    oracle = _bn_inputs(net, batches)
    used = batchnorm.recalibrate(net, batches)
    assert used == 37
    for name, unbiased in (("1", True), ("5", True), ("8", False)):
        layer = net.get_submodule(name)
        x = oracle[name]
        torch.testing.assert_close(layer.running_mean, x.mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            layer.running_var, x.var(0, unbiased=unbiased), rtol=1e-10, atol=1e-12
        )
    # torch's update_bn weights the short last batch like the others: a different answer
    other = _net()
    torch.optim.swa_utils.update_bn([(b,) for b in batches], other)
    assert not torch.allclose(other[1].running_mean, net[1].running_mean, rtol=1e-6)


def test_recalibrate_pools_the_variance_unlike_algorithm_2_and_says_so() -> None:
    torch.manual_seed(0)
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    batches = [torch.randn(8, 3, dtype=torch.float64) + 3 * i for i in range(4)]  # unshuffled
    batchnorm.recalibrate(nn.Sequential(bn), batches)
    pooled = torch.cat(batches).var(0)
    torch.testing.assert_close(bn.running_var, pooled, rtol=1e-12, atol=1e-12)
    # Algorithm 2: m/(m−1)·E_B[σ²_B], the average within-batch variance (torch's update_bn)
    alg2 = torch.stack([b.var(0) for b in batches]).mean(0)
    ref = nn.Sequential(nn.BatchNorm1d(3, dtype=torch.float64))
    torch.optim.swa_utils.update_bn(batches, ref)
    torch.testing.assert_close(ref[0].running_var, alg2, rtol=1e-12, atol=1e-12)
    assert bool((bn.running_var > 5 * alg2).all())  # the spread of the batch means counts
    doc = " ".join((batchnorm.recalibrate.__doc__ or "").split())
    assert "pooled mean and variance of all the values it saw" in doc
    assert "differs from Algorithm 2's" in doc and "population statistics of Algorithm 2" not in doc


def test_recalibrate_refuses_statistics_the_layers_dtype_cannot_hold() -> None:
    # a float16 layer whose input varies by 1000 has a variance of about 1e6 > 65504: refused,
    # and the other layer's statistics, which would fit, are not written either
    net = nn.Sequential(batchnorm.BatchNorm1d(3), nn.Linear(3, 3), batchnorm.BatchNorm1d(3))
    net = net.half()
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(3) * 1000)
    data = [torch.randn(16, 3).half() for _ in range(4)]
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(
        OverflowError, match=r"layer '2' \(BatchNorm1d\) holds .* torch.float16.*model.float\(\)"
    ):
        batchnorm.recalibrate(net, data)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    batchnorm.recalibrate(net.float(), [x.float() for x in data])
    assert float(net[2].running_var.min()) > 65504
    # activations beyond float32's range: float32 is no remedy there
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(3) * 1e30)
    with pytest.raises(OverflowError, match=r"torch.float32, .*\. Rescale the data") as e:
        batchnorm.recalibrate(net, [x.float() for x in data])
    assert "model.float()" not in str(e.value)


def test_recalibrate_restores_modes_momentum_and_counters() -> None:
    net = _net()
    net.train()
    net[3].eval()  # a mixed state must come back as it was
    net[5].momentum = None
    modes = {n: m.training for n, m in net.named_modules()}
    counters = {
        n: int(m.num_batches_tracked)
        for n, m in net.named_modules()
        if hasattr(m, "num_batches_tracked")
    }
    batchnorm.recalibrate(net, [torch.randn(8, 5, dtype=torch.float64) for _ in range(3)])
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert net[1].momentum == 0.1 and net[5].momentum is None
    assert counters == {
        n: int(m.num_batches_tracked)
        for n, m in net.named_modules()
        if hasattr(m, "num_batches_tracked")
    }


def test_recalibrate_num_samples_tuples_and_dataloader() -> None:
    net = _net()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    used = batchnorm.recalibrate(net, loader, num_samples=30)
    assert used == 30
    oracle = _bn_inputs(net, [x[:12], x[12:24], x[24:30]])  # the last batch is cut at 30
    torch.testing.assert_close(net[1].running_mean, oracle["1"].mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net[5].running_var, oracle["5"].var(0), rtol=1e-10, atol=1e-12)


def test_recalibrate_skips_a_last_batch_of_one_sample() -> None:
    """A DataLoader's uneven last batch of one sample cannot be normalized by a BN layer in
    train mode: it is skipped, and the statistics are those of the other samples."""
    net = _net()
    x = torch.randn(25, 5, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=12)
    assert batchnorm.recalibrate(net, loader) == 24  # batches of 12, 12 and 1
    oracle = _bn_inputs(net, [x[:12], x[12:24]])
    torch.testing.assert_close(net[1].running_mean, oracle["1"].mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net[5].running_var, oracle["5"].var(0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="no batch"):
        batchnorm.recalibrate(net, [x[:1], x[1:2]])


def test_adabn_recomputes_statistics_on_the_target_domain() -> None:
    # a BN layer after a fixed feature map: target statistics are those of the shifted data
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).double()
    src = [torch.rand(8, 1, 6, 6, dtype=torch.float64) for _ in range(4)]
    tgt = [0.5 * b + 0.4 for b in src]  # contrast and brightness shifted
    batchnorm.recalibrate(net, src)
    src_mean = net[1].running_mean.clone()
    batchnorm.recalibrate(net, tgt)
    feats = torch.cat([net[0](b) for b in tgt]).detach()
    torch.testing.assert_close(net[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        net[1].running_var, feats.transpose(0, 1).reshape(4, -1).var(1), rtol=1e-10, atol=1e-12
    )
    assert not torch.allclose(src_mean, net[1].running_mean)


def test_recalibrate_with_mask_uses_valid_positions() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = batchnorm.BatchNorm1d(2, dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x, mask=x[:, 0] != 0)  # zero padding marks invalid positions

    x = torch.randn(6, 2, 5, dtype=torch.float64)
    x[:3, :, 3:] = 0
    model = Masked()
    batchnorm.recalibrate(model, [x])
    valid = x.transpose(1, 2)[x[:, 0] != 0]  # (M, C)
    torch.testing.assert_close(model.bn.running_mean, valid.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.bn.running_var, valid.var(0), rtol=1e-10, atol=1e-12)


def test_recalibrate_skips_frozen_layers_and_reports_misuse() -> None:
    net = _net()
    batchnorm.recalibrate(net, [torch.randn(8, 5, dtype=torch.float64)])
    batchnorm.freeze(net[1:2])
    frozen = net[1].running_mean.clone()
    batchnorm.recalibrate(net, [torch.randn(8, 5, dtype=torch.float64) + 3])
    assert torch.equal(net[1].running_mean, frozen)
    with pytest.raises(ValueError, match="no batch"):
        batchnorm.recalibrate(net, [])
    with pytest.raises(TypeError, match="tensors or \\(x, y\\) tuples"):
        batchnorm.recalibrate(net, [{"x": 1}])
    with pytest.raises(RuntimeError, match="init_process_group"):
        batchnorm.recalibrate(net, [torch.randn(8, 5, dtype=torch.float64)], distributed=True)


def test_recalibrate_distributed_on_one_rank_equals_local(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        a, b = _net(), _net()
        data = [torch.randn(10, 5, dtype=torch.float64) for _ in range(3)]
        batchnorm.recalibrate(a, data)
        batchnorm.recalibrate(b, data, distributed=True)
        for la, lb in zip(a.modules(), b.modules()):
            if hasattr(la, "running_var"):
                torch.testing.assert_close(la.running_var, lb.running_var, rtol=1e-12, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_recalibrate_distributed_takes_group_and_timeout_and_needs_data_on_some_rank(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        net = _net()
        group = dist.new_group([0])
        data = [torch.randn(10, 5, dtype=torch.float64)]
        assert batchnorm.recalibrate(net, data, distributed=True, process_group=group, timeout=5)
        with pytest.raises(ValueError, match="no rank's data yielded a batch"):
            batchnorm.recalibrate(net, [data[0][:1]], distributed=True, timeout=5.0)
    finally:
        dist.destroy_process_group()


def test_accumulate_moments_is_the_local_half() -> None:
    net = _net()
    data = [torch.randn(10, 5, dtype=torch.float64) for _ in range(2)]
    moments = accumulate_moments(net, data)
    assert set(moments) == {"1", "5", "8"} and moments["1"].count == 20


# --- folding ---------------------------------------------------------------------------------


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, _BatchNormBase)):
            with torch.no_grad():
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


FOLD_CASES = [
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 9)),
    (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, bias=False, groups=2), nn.BatchNorm2d(6)),
        (2, 4, 7, 7),
    ),
    (
        lambda: nn.Sequential(nn.Conv3d(2, 3, 2), batchnorm.BatchNorm3d(3, affine=False)),
        (2, 2, 4, 4, 4),
    ),
    (lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6)), (2, 4, 5)),
    (
        lambda: nn.Sequential(nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False), nn.BatchNorm2d(4)),
        (2, 6, 4, 4),
    ),
    (lambda: nn.Sequential(nn.ConvTranspose3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 2, 3, 3, 3)),
    (lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)), (6, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 4), batchnorm.BatchNorm(4, axis=-1)), (2, 3, 5)),
]


@pytest.mark.parametrize("make,shape", FOLD_CASES)
def test_fold_matches_unfolded_in_float64(make, shape) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = _randomize_bn(make().double())
    x = torch.randn(*shape, dtype=torch.float64)
    original = copy.deepcopy(model.state_dict())
    folded, err = batchnorm.fold(model, x)
    assert [type(m) for m in folded] == [type(model[0]), nn.Identity]
    assert folded[0].bias is not None
    direct = float((folded(x) - model(x)).abs().max().detach())
    assert err == pytest.approx(direct, abs=1e-15) and err < 1e-12
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, original[k])


def test_fold_in_float32_is_computed_in_float64() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    x = torch.randn(4, 3, 8, 8)
    folded, err = batchnorm.fold(model, x)
    assert folded[0].weight.dtype == torch.float32
    exact = model.double()(x.double())
    assert float((folded(x).double() - exact).abs().max()) < 1e-4
    assert err < 1e-4


def test_fold_finds_pairs_outside_sequential_and_keeps_shared_or_unpaired_layers() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), batchnorm.BatchNorm2d(4)
            self.bn3 = nn.BatchNorm2d(4)  # after an addition: not foldable

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.bn3(x + y)

    model = _randomize_bn(Block().double())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    folded, err = batchnorm.fold(model, x)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn3, nn.BatchNorm2d)
    assert err < 1e-12


def test_fold_refuses_training_mode_and_missing_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(
        ValueError, match=r"fold: layer '1' \(BatchNorm2d\) is in training mode.*model.eval\(\)"
    ):
        batchnorm.fold(model, x)
    untracked = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)
    ).eval()
    with pytest.raises(ValueError, match=r"'1'.*no running statistics.*recalibrate"):
        batchnorm.fold(untracked, x)
    with pytest.raises(ValueError, match="training mode"):
        batchnorm.to_inference(model)


def test_fold_leaves_linear_bn_pair_on_other_axis() -> None:
    # Linear acts on the last axis, BatchNorm1d normalizes axis 1 of a 3-D input: not foldable
    model = _randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double())
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    folded, err = batchnorm.fold(model, x)
    assert isinstance(folded[1], nn.BatchNorm1d) and err == 0.0


def test_to_inference_replaces_every_bn_and_keeps_outputs() -> None:
    model = nn.Sequential(
        batchnorm.BatchNorm2d(3),
        nn.Conv2d(3, 4, 3),
        batchnorm.InPlaceABN(4, activation="elu"),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16, 5),
        batchnorm.GhostBatchNorm1d(5, virtual_batch_size=2),
    ).double()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6, dtype=torch.float64))  # real statistics
    model.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    deploy = batchnorm.to_inference(model)
    kinds = [type(m).__name__ for m in deploy.modules()]
    assert not any(
        isinstance(m, (nn.modules.batchnorm._BatchNorm, _BatchNormBase)) for m in deploy.modules()
    )
    assert "FrozenBatchNorm" in kinds and "ELU" in kinds
    torch.testing.assert_close(deploy(x), model(x), rtol=1e-10, atol=1e-10)
    deploy.train()  # no layer depends on the mode any more
    torch.testing.assert_close(deploy(x), model(x), rtol=1e-10, atol=1e-10)


def test_to_inference_without_example_input_does_not_guess_the_linear_bn_axis() -> None:
    """Linear → BatchNorm1d on (N, L, F) input with L == F: BN's axis 1 is not the Linear
    layer's feature axis. Without an example input the rank is unknown: the pair is not folded
    (a warning says so) and the output is unchanged; with one, a 2-D pair is folded."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    x = torch.randn(8, 5, 4)
    for _ in range(3):
        net(x)
    net.eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.normal_()
    with pytest.warns(UserWarning, match=r"pairs \['1'\] were not folded.*example_input"):
        plain = batchnorm.to_inference(net)
    torch.testing.assert_close(plain(x), net(x))
    torch.testing.assert_close(batchnorm.to_inference(net, x)(x), net(x))
    flat = torch.randn(8, 4)
    folded = batchnorm.to_inference(net, flat)
    assert [type(m).__name__ for m in folded] == ["Linear", "Identity"]
    torch.testing.assert_close(folded(flat), net(flat))


def _with_statistics(net: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``net`` after three training batches of ``shape``, in eval mode."""
    for _ in range(3):
        net(torch.randn(shape))
    return net.eval()


def test_fold_untraceable_model_with_a_bn_registered_twice() -> None:
    """A model torch.fx cannot trace falls back to Sequential pairs; a BN in the Sequential
    that is registered under another name first (and used there too) still folds correctly."""

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(8)
            self.seq = nn.Sequential(nn.Conv2d(3, 8, 3), self.bn)
            self.c2 = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # data-dependent control flow: not traceable
                return self.seq(x) + self.bn(self.c2(x))
            return x

    torch.manual_seed(0)
    net = _with_statistics(Untraceable(), (4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    folded, err = batchnorm.fold(net, x)
    assert isinstance(folded.seq[1], nn.Identity) and err < 1e-4
    frozen = batchnorm.to_inference(net)
    torch.testing.assert_close(frozen(x), net(x), rtol=1e-4, atol=1e-4)


def test_fold_knows_the_rank_of_a_linear_bn_registered_twice() -> None:
    """The example input's ranks are recorded under every name of a layer, so a Linear → BN
    pair found in a Sequential under the BN's second name folds (2-D input) without a
    warning."""
    import warnings

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(5)
            self.seq = nn.Sequential(nn.Linear(4, 5), self.bn)
            self.lin2 = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # not traceable
                return self.seq(x) + self.bn(self.lin2(x))
            return x

    torch.manual_seed(0)
    net = Untraceable()
    for _ in range(3):
        net(torch.randn(16, 4))
    net.eval()
    x = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, err = batchnorm.fold(net, x)
    assert isinstance(folded.seq[1], nn.Identity) and err < 1e-4


def test_fold_leaves_layers_that_transform_their_weight() -> None:
    """A conv whose forward rewrites its weight (weight standardization), a parametrized one
    (spectral_norm) and one with the legacy weight_norm hook are not folded: folding would
    give a wrong model (standardization undoes the scale) or fail; each pair is named in a
    warning and its BN kept as a fixed map."""
    import torch.nn.functional as F
    from torch.nn.utils.parametrizations import spectral_norm

    class StdConv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    class StdConvByConvForward(nn.Conv2d):  # the other common way to write it
        def _conv_forward(
            self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
        ) -> torch.Tensor:
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return super()._conv_forward(x, w, b)

    class PlainSubclass(nn.Conv2d):  # inherits forward: folds
        pass

    torch.manual_seed(0)
    layers = {
        "overrides forward": StdConv2d(3, 4, 3),
        "overrides _conv_forward": StdConvByConvForward(3, 4, 3),
        "parametrized": spectral_norm(nn.Conv2d(3, 4, 3)),
    }
    with pytest.warns(FutureWarning):  # the legacy hook-based form, deprecated but in use
        layers["forward hooks"] = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    for why, conv in layers.items():
        net = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())
        with torch.no_grad():
            net[1].weight.uniform_(0.5, 2)
            net[1].bias.uniform_(-1, 1)
        for _ in range(3):
            net(torch.randn(8, 3, 8, 8) * 2 + 1)
        net.eval()
        with torch.no_grad():
            ref = net(x)
        with pytest.warns(UserWarning, match=f"'0' → '1'.*{why}"):
            folded, err = batchnorm.fold(net, x)
        assert type(folded[1]) is nn.BatchNorm2d and err < 1e-5, why
        with pytest.warns(UserWarning, match=why):
            inf = batchnorm.to_inference(net)
        assert type(inf[1]).__name__ == "FrozenBatchNorm", why
        with torch.no_grad():
            torch.testing.assert_close(inf(x), ref, rtol=1e-5, atol=1e-5)
    net = nn.Sequential(PlainSubclass(3, 4, 3), nn.BatchNorm2d(4)).eval()
    folded, err = batchnorm.fold(net, x)
    assert isinstance(folded[1], nn.Identity) and err < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_folding_keeps_a_frozen_layer_frozen(bias: bool) -> None:
    """The folded bias trains as the old bias did (or as the weight, when the conv had no
    bias): a frozen backbone must not gain a trainable bias."""
    for frozen in (True, False):
        net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4)).eval()
        for p in net[0].parameters():
            p.requires_grad_(not frozen)
        for folded in (
            batchnorm.fold(net, torch.randn(2, 3, 6, 6))[0],
            batchnorm.to_inference(net),
        ):
            conv = folded[0]
            assert isinstance(folded[1], nn.Identity)
            assert conv.weight.requires_grad is conv.bias.requires_grad is (not frozen)


def test_to_inference_warns_when_pairs_come_from_sequential_order() -> None:
    """An untraceable model's pairs are taken from nn.Sequential order, which is not data
    flow: here the conv's output is also added after the BN, so the folded model differs.
    fold measures that; to_inference cannot, and says so."""

    class UsesConvOutputTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace it
                h = self.seq[0](x)
                return self.seq[1](h) + h
            return x

    torch.manual_seed(0)
    net = _with_statistics(UsesConvOutputTwice(), (8, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    _, err = batchnorm.fold(net, x)
    assert err > 1e-2  # wrong, and measured
    with pytest.warns(UserWarning, match=r"could not be traced .*\['seq.1'\].*batchnorm.fold"):
        batchnorm.to_inference(net)
    traceable = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batchnorm.to_inference(traceable)  # pairs from the graph: nothing to warn about


def test_a_layer_listed_twice_in_one_sequential() -> None:
    """``Sequential(conv, conv, bn)`` (one conv used twice) folds at the conv that feeds the BN
    only, and to_inference replaces a BN listed twice at both places, as one layer."""

    class Untraceable(nn.Module):  # pairs from Sequential adjacency
        def __init__(self) -> None:
            super().__init__()
            conv = nn.Conv2d(3, 3, 3, padding=1)
            self.seq = nn.Sequential(conv, conv, nn.BatchNorm2d(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.seq(x) if x.sum() > -1e9 else x

    torch.manual_seed(0)
    net = _with_statistics(Untraceable(), (4, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    folded, err = batchnorm.fold(net, x)
    assert isinstance(folded.seq[2], nn.Identity) and err < 1e-5
    assert folded.seq[0] is not folded.seq[1]

    bn = nn.BatchNorm1d(4)
    net2 = nn.Sequential(bn, nn.ReLU(), bn)
    for _ in range(3):
        net2(torch.randn(8, 4) * 3 + 2)
    net2.eval()
    x2 = torch.randn(8, 4) * 3 + 2
    with torch.no_grad():
        ref = net2(x2)
    inf = batchnorm.to_inference(net2)
    assert type(inf[2]).__name__ == "FrozenBatchNorm" and inf[0] is inf[2]
    inf.train()  # nothing left depends on the mode
    with torch.no_grad():
        torch.testing.assert_close(inf(x2), ref, rtol=1e-5, atol=1e-5)


def test_recalibrate_does_not_warn_of_small_batches_nor_use_up_the_warning() -> None:
    import warnings

    net = nn.Sequential(nn.Linear(3, 5), batchnorm.BatchNorm1d(5))
    loader = torch.utils.data.DataLoader(torch.randn(100, 3), batch_size=32)  # last batch: 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batchnorm.recalibrate(net, loader)
    net.train()
    with pytest.warns(batchnorm.SmallBatchWarning):
        net(torch.randn(3, 3))


def test_torch_fusion_tools_take_our_layers_or_their_conversion() -> None:
    """torch.nn.utils.fusion reads our layers' attributes; eager-mode quantization fusion
    looks layers up by class, which convert_model(to='torch') gives it."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU())
    for _ in range(3):
        net(torch.randn(8, 3, 6, 6) * 2 + 1)
    net.eval()
    x = torch.randn(2, 3, 6, 6)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(net[0], net[1])
    torch.testing.assert_close(fused(x), net[1](net[0](x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="fuser method"):
        torch.ao.quantization.fuse_modules(net, [["0", "1", "2"]])
    q = torch.ao.quantization.fuse_modules(
        batchnorm.convert_model(net, to="torch"), [["0", "1", "2"]]
    )
    torch.testing.assert_close(q(x), net(x), rtol=1e-5, atol=1e-5)


def test_recalibrate_runs_batch_renorm_as_plain_bn_and_keeps_its_record() -> None:
    """The pass normalizes with batch statistics: renorm's r and d, which correct towards the
    stale running statistics being replaced, would skew every later layer's statistics."""
    torch.manual_seed(0)

    def renorm(c: int) -> nn.Module:
        return batchnorm.BatchRenorm1d(c, warmup_steps=0, r_max_step=0, d_max_step=0)

    net = nn.Sequential(nn.Linear(4, 4), renorm(4), nn.Linear(4, 4), renorm(4))
    net[3].last_r = marker = torch.full((4,), 7.0)
    data = [torch.randn(64, 4) * 3 + 2 for _ in range(8)]
    plain = nn.Sequential(
        nn.Linear(4, 4), batchnorm.BatchNorm1d(4), nn.Linear(4, 4), batchnorm.BatchNorm1d(4)
    )
    plain.load_state_dict(net.state_dict())
    batchnorm.recalibrate(net, data)
    batchnorm.recalibrate(plain, data)
    for a, b in ((net[1], plain[1]), (net[3], plain[3])):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    # one pass is the fixed point: the eval-mode input of the last layer has those statistics
    x = torch.cat(data)
    net.eval()
    with torch.no_grad():
        h = net[2](net[1](net[0](x)))
    torch.testing.assert_close(net[3].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    assert (net[1].r_max, net[1].d_max) == (3.0, 5.0) and net[3].last_r is marker


def test_recalibrate_on_non_finite_data_raises_without_the_layers_warnings() -> None:
    net = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4))
    x = torch.randn(16, 3)
    x[3, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FloatingPointError, match="non-finite"):
            batchnorm.recalibrate(net, [x])


@pytest.mark.parametrize("tool", ["recalibrate", "fold", "to_inference", "freeze"])
def test_tools_name_a_lazy_layer_that_has_not_seen_an_input(tool: str) -> None:
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d()).eval()
    x = torch.randn(2, 3, 6, 6)
    call = {
        "recalibrate": lambda: batchnorm.recalibrate(net, [x]),
        "fold": lambda: batchnorm.fold(net, x),
        "to_inference": lambda: batchnorm.to_inference(net),
        "freeze": lambda: batchnorm.freeze(net),
    }[tool]
    with pytest.raises(ValueError, match=rf"^{tool}: layer '0' \(LazyConv2d\) .*run one batch"):
        call()
    net.train()(x)  # materialized, with statistics: the tool then works
    net.eval()
    call()


@pytest.mark.parametrize(
    "tool",
    ["recalibrate", "fold", "to_inference", "freeze", "convert_model", "convert_sync", "doctor"],
)
@pytest.mark.parametrize("whole", [True, False], ids=["scripted-model", "scripted-block"])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_tools_refuse_a_scripted_batchnorm_they_would_silently_skip(tool: str, whole: bool) -> None:
    """A TorchScript BN is no BN class to the tools: each used to return as if it had worked
    (recalibrate counted its samples, to_inference left a mode-dependent layer in place)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(16, 3, 8, 8)
    block(x)
    block.eval()
    net = torch.jit.script(block) if whole else nn.Sequential(torch.jit.script(block), nn.ReLU())
    call = {
        "recalibrate": lambda: batchnorm.recalibrate(net, [x]),
        "fold": lambda: batchnorm.fold(net, x),
        "to_inference": lambda: batchnorm.to_inference(net, x),
        "freeze": lambda: batchnorm.freeze(net),
        "convert_model": lambda: batchnorm.convert_model(net),
        "convert_sync": lambda: batchnorm.convert_sync_batchnorm(net),
        "doctor": lambda: batchnorm.doctor(net, x, batch_size=8),
    }[tool]
    layer = "1" if whole else "0.1"
    with pytest.raises(TypeError, match=rf"batch-norm layer '{layer}' is compiled by torch.jit"):
        call()


def test_convert_model_names_a_lazy_batchnorm_instead_of_skipping_it() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"^convert_model: layer '1' \(LazyBatchNorm2d\)"):
        batchnorm.convert_model(net)
    net(torch.randn(2, 3, 6, 6))
    assert type(batchnorm.convert_model(net)[1]) is batchnorm.BatchNorm2d


def test_a_batchnorms_hooks_survive_fold_to_inference_and_conversion() -> None:
    """Folding, fixing and converting replaced a hooked BN by a layer without its hooks: the
    output changed without a word."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net(x)
    net.eval()
    handle = net[1].register_forward_hook(lambda m, i, out: out * 2)
    ref = net(x)
    with pytest.warns(UserWarning, match=r"'0' → '1': the BN has forward hooks"):
        folded, err = batchnorm.fold(net, x)
    assert err == 0.0 and isinstance(folded[1], nn.BatchNorm2d)
    with pytest.warns(UserWarning, match="the BN has forward hooks"):
        fixed = batchnorm.to_inference(net, x)
    assert isinstance(fixed[1], batchnorm.FrozenBatchNorm)
    torch.testing.assert_close(fixed(x), ref)
    converted = batchnorm.convert_model(net)
    assert type(converted[1]) is batchnorm.BatchNorm2d
    torch.testing.assert_close(converted(x), ref)
    handle.remove()  # the user's handle still removes the hook from the new layer
    assert not converted[1]._forward_hooks
    torch.testing.assert_close(converted(x), ref / 2)


def test_to_inference_keeps_the_pre_hook_of_a_batchnorm_it_cannot_fold() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    net(x)
    net.eval()
    net[0].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    fixed = batchnorm.to_inference(net, x)
    torch.testing.assert_close(fixed(x), net(x))


def test_a_frozen_layer_converted_keeps_one_freezing_hook_and_unfreezes() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net(torch.randn(8, 3))
    batchnorm.freeze(net)
    converted = batchnorm.convert_model(net)
    assert len(converted[1]._forward_pre_hooks) == 1
    batchnorm.unfreeze(converted.train())
    assert not converted[1]._forward_pre_hooks and converted[1].training


def test_fold_leaves_a_pair_whose_weight_forward_also_reads_directly() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.bn = nn.BatchNorm2d(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + torch.nn.functional.conv2d(
                x, self.conv.weight, padding=1
            )

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(8, 3, 8, 8)
    net(x)
    net.eval()
    folded, err = batchnorm.fold(net, x)
    assert err == 0.0 and isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(batchnorm.to_inference(net, x)(x), net(x))


@pytest.mark.parametrize("policy", ["raise", "running", "skip"])
def test_recalibrate_skips_a_last_batch_of_one_sample_whatever_the_small_batch_policy(
    policy: str,
) -> None:
    """ "running" and "skip" let one sample through the layers, which then counted it: from the
    statistics being replaced, or as β, in every later layer."""
    torch.manual_seed(0)
    x = torch.randn(101, 5) * 3 + 1

    def net() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Linear(5, 8),
            batchnorm.BatchNorm1d(8, small_batch=policy),
            nn.Linear(8, 3),
            batchnorm.BatchNorm1d(3, small_batch=policy),
        )

    model, ref = net(), net()
    assert batchnorm.recalibrate(model, x.split(25)) == 100
    batchnorm.recalibrate(ref, x[:100].split(25))
    torch.testing.assert_close(model[3].running_var, ref[3].running_var)
    torch.testing.assert_close(model[3].running_mean, ref[3].running_mean)
