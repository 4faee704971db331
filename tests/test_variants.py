"""Batch renorm against the float64 reference, ghost batches against plain BN per chunk, frozen
BN and freeze/unfreeze against eval-mode BN."""

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import reference as ref
from batchnorm.functional import BatchNormInputError
from batchnorm.variants import ghost_chunks, is_frozen

NO_WARMUP = {"warmup_steps": 0, "r_max_step": 0, "d_max_step": 0}


def _randomize(bn: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = bn.running_mean.numel()
        bn.running_mean.copy_(torch.randn(c, generator=g) * 2)
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))


# --- batch renormalization -------------------------------------------------------------------


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0), (1.0, 0.0), (1.1, 0.05)])
@pytest.mark.parametrize(
    "cls,shape,axis",
    [
        (batchnorm.BatchRenorm1d, (16, 4), 1),
        (batchnorm.BatchRenorm2d, (4, 4, 3, 5), 1),
        (batchnorm.BatchRenorm3d, (2, 4, 2, 3, 2), 1),
        (batchnorm.BatchRenorm, (6, 5, 4), -1),
    ],
)
def test_renorm_matches_float64_reference(cls, shape, axis, r_max, d_max) -> None:  # type: ignore[no-untyped-def]
    kw = {"axis": axis} if cls is batchnorm.BatchRenorm else {}
    bn = cls(4, r_max=r_max, d_max=d_max, momentum=0.2, dtype=torch.float64, **NO_WARMUP, **kw)
    _randomize(bn)
    rm, rv = bn.running_mean.clone().numpy(), bn.running_var.clone().numpy()
    x = torch.randn(*shape, dtype=torch.float64) * 1.7 + 0.4
    y = bn(x)
    want, r, d = ref.batch_renorm_forward(
        x.numpy(),
        rm,
        rv,
        bn.weight.detach().numpy(),
        bn.bias.detach().numpy(),
        r_max=r_max,
        d_max=d_max,
        eps=bn.eps,
        axis=axis,
    )
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(bn.last_r.numpy(), r, rtol=1e-12)
    np.testing.assert_allclose(bn.last_d.numpy(), d, rtol=1e-12, atol=1e-15)
    mean, var = ref.batch_stats(x.numpy(), axis)
    m = ref.channel_count(tuple(x.shape), axis)
    wm, wv = ref.running_stats_update(rm, rv, mean, var, m, 0.2)
    np.testing.assert_allclose(bn.running_mean.numpy(), wm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), wv, rtol=1e-12)


def test_renorm_clipping_is_active_in_the_reference_test() -> None:
    # the parametrized test above would be vacuous if r and d were never clipped
    bn = batchnorm.BatchRenorm1d(4, r_max=1.1, d_max=0.05, dtype=torch.float64, **NO_WARMUP)
    _randomize(bn)
    bn(torch.randn(16, 4, dtype=torch.float64) * 1.7 + 0.4)
    assert bool(
        ((bn.last_r - 1.1).abs() < 1e-12).any() | ((bn.last_r - 1 / 1.1).abs() < 1e-12).any()
    )
    assert bool((bn.last_d.abs() - 0.05).abs().min() < 1e-12)


def test_renorm_with_rmax_1_dmax_0_is_batch_norm_forward_and_backward() -> None:
    torch.manual_seed(0)
    ours = batchnorm.BatchRenorm2d(5, r_max=1.0, d_max=0.0, dtype=torch.float64, **NO_WARMUP)
    theirs = nn.BatchNorm2d(5, dtype=torch.float64)
    _randomize(ours)
    theirs.load_state_dict(ours.state_dict())
    x1 = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x1), theirs(x2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r_max,d_max", [(1.0, 0.0), (1.5, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_renorm_of_half_inputs_is_as_accurate_as_batch_norm(
    dtype: torch.dtype, r_max: float, d_max: float
) -> None:
    """As BN computes half inputs: float32 statistics, affine map and parameter gradients, the
    output rounded once. The affine map ran in the half dtype, so dγ and dβ were sums rounded
    to it (bfloat16: ~0.4 off where BN is float32-accurate), at r_max = 1, d_max = 0 too."""
    torch.manual_seed(0)
    bn = batchnorm.BatchRenorm2d(4, r_max=r_max, d_max=d_max, **NO_WARMUP)
    _randomize(bn)
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    x = (torch.randn(16, 4, 8, 8) * 2 + 1).to(dtype).requires_grad_()
    dy = torch.randn(16, 4, 8, 8).to(dtype)
    y = bn(x)
    y.backward(dy)
    # oracle: the paper's formula in float64 on the same (rounded) values, r and d constants
    x64 = x.detach().double().requires_grad_()
    w = bn.weight.detach().double().requires_grad_()
    b = bn.bias.detach().double().requires_grad_()
    mu, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    sb, s = torch.sqrt(var + bn.eps), torch.sqrt(rv + bn.eps)
    r = (sb / s).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm) / s).clamp(-d_max, d_max).detach()

    def c(v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1)

    want = c(w) * ((x64 - c(mu)) / c(sb) * c(r) + c(d)) + c(b)
    want.backward(dy.double())
    assert y.dtype == dtype and x.grad is not None and x.grad.dtype == dtype
    # one rounding to the half dtype
    tol = {"rtol": 1e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(y.double(), want.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    # float32 sums, as BN's
    for got, exp in ((bn.weight.grad, w.grad), (bn.bias.grad, b.grad)):
        assert got is not None and exp is not None
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5 * float(exp.abs().max()))


def test_renorm_gradient_treats_r_and_d_as_constants() -> None:
    torch.manual_seed(2)
    bn = batchnorm.BatchRenorm1d(
        3, r_max=2.0, d_max=1.0, momentum=0.0, dtype=torch.float64, **NO_WARMUP
    )
    _randomize(bn, seed=3)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 3, dtype=torch.float64)
    torch.autograd.backward(bn(x), g)
    # oracle: the paper's formula with torch ops, r and d detached (stop_gradient)
    x2 = x.detach().clone().requires_grad_(True)
    w = bn.weight.detach().clone().requires_grad_(True)
    b = bn.bias.detach().clone().requires_grad_(True)
    mu, var = x2.mean(0), x2.var(0, unbiased=False)
    sb, s = torch.sqrt(var + bn.eps), torch.sqrt(bn.running_var + bn.eps)
    r = (sb / s).clamp(0.5, 2.0).detach()
    d = ((mu - bn.running_mean) / s).clamp(-1.0, 1.0).detach()
    y = w * ((x2 - mu) / sb * r + d) + b
    torch.autograd.backward(y, g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.bias.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_renorm_warmup_schedule() -> None:
    bn = batchnorm.BatchRenorm1d(
        2, r_max=3.0, d_max=5.0, warmup_steps=10, r_max_step=50, d_max_step=30
    )
    expected = {
        0: (1.0, 0.0),
        9: (1.0, 0.0),
        10: (1.0, 0.0),
        20: (1.5, 2.5),
        30: (2.0, 5.0),
        50: (3.0, 5.0),
        1000: (3.0, 5.0),
    }
    for step, (r, d) in expected.items():
        bn.num_batches_tracked.fill_(step)
        got = bn.renorm_limits()
        assert got == pytest.approx((r, d)), step
        # the tensor form a traced or compiled module computes gives the same limits
        as_tensors = bn._schedule(bn.num_batches_tracked.double())
        assert tuple(float(v) for v in as_tensors) == got, step
    # during warm-up the layer is plain BN whatever the running statistics
    _randomize(bn)
    bn.num_batches_tracked.zero_()
    x = torch.randn(8, 2)
    want = ref.batch_norm_forward(x.numpy(), bn.weight.detach().numpy(), bn.bias.detach().numpy())[
        0
    ]
    np.testing.assert_allclose(bn(x).detach().numpy(), want, rtol=1e-4, atol=1e-5)
    # the paper's default schedule
    paper = batchnorm.BatchRenorm2d(2)
    assert (paper.warmup_steps, paper.r_max_step, paper.d_max_step) == (5000, 40000, 25000)


def test_renorm_errors() -> None:
    with pytest.raises(ValueError, match=r"BatchRenorm1d\(4\): r_max must be a number >= 1"):
        batchnorm.BatchRenorm1d(4, r_max=0.5)
    with pytest.raises(ValueError, match="d_max must be a number >= 0"):
        batchnorm.BatchRenorm1d(4, d_max=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        batchnorm.BatchRenorm1d(4, warmup_steps=100, r_max_step=10)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        batchnorm.BatchRenorm1d(4, track_running_stats=False)
    with pytest.raises(batchnorm.BatchNormInputError, match=r"BatchRenorm2d\(4\): expected 4D"):
        batchnorm.BatchRenorm2d(4)(torch.randn(3, 4))


@pytest.mark.parametrize(
    "arg,value,want",
    [
        ("r_max", None, "a number"),
        ("d_max", "5", "a number"),
        ("warmup_steps", None, "an int"),
        ("r_max_step", 40000.0, "an int"),
        ("d_max_step", True, "an int"),
    ],
)
def test_renorm_rejects_non_numeric_arguments_by_name(arg, value, want) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        ValueError,
        match=rf"BatchRenorm1d\(3\): {arg} must be {want}, got .*; pass e\.g\. {arg}=",
    ):
        batchnorm.BatchRenorm1d(3, **{arg: value})
    bn = batchnorm.BatchRenorm1d(3, r_max=np.float64(2.0), warmup_steps=np.int64(0))
    assert (bn.r_max, bn.warmup_steps) == (2.0, 0) and type(bn.warmup_steps) is int


def test_renorm_infinite_limits_are_plain_bn_in_warm_up_and_unclipped_after() -> None:
    # r_max = inf or d_max = inf: no clipping once warmed up; during warm-up the limits are
    # still 1 and 0 (their ramp's inf·0 must not turn into NaN)
    bn = batchnorm.BatchRenorm1d(
        2, r_max=math.inf, d_max=math.inf, warmup_steps=10, r_max_step=20, d_max_step=30
    )
    for step, want in ((0, (1.0, 0.0)), (10, (1.0, 0.0)), (11, (math.inf, math.inf))):
        bn.num_batches_tracked.fill_(step)
        assert bn.renorm_limits() == want, step
        as_tensors = bn._schedule(bn.num_batches_tracked.double())
        assert tuple(float(v) for v in as_tensors) == want, step
    bn.num_batches_tracked.zero_()
    x = torch.randn(8, 2) * 3 + 1
    y = bn(x)
    plain = nn.BatchNorm1d(2)(x)
    torch.testing.assert_close(y, plain)
    assert bool(torch.isfinite(bn.last_r).all() and torch.isfinite(bn.last_d).all())


def test_renorm_warmup_follows_the_counter_under_jit_trace_and_compile() -> None:
    torch.manual_seed(0)
    kw = {"r_max": 3.0, "d_max": 5.0, "warmup_steps": 1, "r_max_step": 3, "d_max_step": 4}
    base = batchnorm.BatchRenorm2d(3, dtype=torch.float64, **kw)
    eager = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(
            copy.deepcopy(base), torch.randn(4, 3, 3, 3, dtype=torch.float64), check_trace=False
        )
    traced.load_state_dict(base.state_dict())  # undo the step tracing ran
    compiled_module = copy.deepcopy(base)
    compiled = torch.compile(compiled_module, backend="eager")
    for t in range(6):
        x = torch.randn(4, 3, 3, 3, dtype=torch.float64) * (1 + 2 * t) + 3 * t
        want = eager(x)
        torch.testing.assert_close(traced(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compiled(x), want, rtol=1e-12, atol=1e-12)
    assert float(eager.last_r.max()) == pytest.approx(3.0)  # the limits were reached and clip
    for m in (traced, compiled_module):
        torch.testing.assert_close(m.running_var, eager.running_var, rtol=1e-12, atol=1e-12)
        assert int(m.num_batches_tracked) == 6


# --- ghost batches ---------------------------------------------------------------------------


def test_ghost_chunks_rule() -> None:
    assert ghost_chunks(10, 4, 1) == [4, 4, 2]
    assert ghost_chunks(9, 4, 1) == [4, 5]  # a last chunk of one value merges into the previous
    assert ghost_chunks(9, 4, 3) == [4, 4, 1]  # one sample with 3 values per channel is enough
    assert ghost_chunks(3, 8, 1) == [3]
    assert ghost_chunks(1, 8, 5) == [1]
    assert sum(ghost_chunks(37, 5, 1)) == 37


@pytest.mark.parametrize(
    "cls,plain,shape,vbs",
    [
        (batchnorm.GhostBatchNorm1d, nn.BatchNorm1d, (10, 3), 4),
        (batchnorm.GhostBatchNorm1d, nn.BatchNorm1d, (9, 3), 4),
        (batchnorm.GhostBatchNorm2d, nn.BatchNorm2d, (7, 3, 2, 2), 3),
        (batchnorm.GhostBatchNorm3d, nn.BatchNorm3d, (5, 3, 2, 1, 2), 2),
        (batchnorm.GhostBatchNorm1d, nn.BatchNorm1d, (6, 3), 16),
    ],
)
def test_ghost_equals_plain_bn_on_each_chunk_in_order(cls, plain, shape, vbs) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    ghost = cls(3, virtual_batch_size=vbs, momentum=0.3, dtype=torch.float64)
    bn = plain(3, momentum=0.3, dtype=torch.float64)
    _randomize(ghost)
    bn.load_state_dict(ghost.state_dict())
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    per_sample = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    sizes = ghost_chunks(shape[0], vbs, per_sample)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.cat([bn(c) for c in torch.split(x2, sizes)])
    y = ghost(x)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(ghost.num_batches_tracked) == len(sizes) == int(bn.num_batches_tracked)
    ghost.eval(), bn.eval()
    torch.testing.assert_close(ghost(x), bn(x2), rtol=1e-12, atol=1e-12)


def test_ghost_statistics_are_per_chunk_not_per_batch() -> None:
    # two chunks with very different means: each is normalized to mean 0 on its own
    x = torch.cat([torch.randn(8, 2) + 10, torch.randn(8, 2) - 10])
    y = batchnorm.GhostBatchNorm1d(2, virtual_batch_size=8)(x)
    y = y.detach()
    assert float(y[:8].mean(0).abs().max()) < 1e-5 and float(y[8:].mean(0).abs().max()) < 1e-5
    y_full = batchnorm.BatchNorm1d(2)(x)
    assert float(y_full[:8].mean(0).abs().min()) > 0.5


def test_ghost_with_mask_and_any_axis() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 5, 3, dtype=torch.float64)  # (N, L, C), channels last
    mask = torch.rand(6, 5) < 0.7
    mask[:, 0] = True
    ghost = batchnorm.GhostBatchNorm(3, axis=-1, virtual_batch_size=2, dtype=torch.float64)
    plain = batchnorm.BatchNorm(3, axis=-1, dtype=torch.float64)
    y = ghost(x, mask=mask)
    y2 = torch.cat([plain(x[i : i + 2], mask=mask[i : i + 2]) for i in range(0, 6, 2)])
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=1e-12, atol=1e-12)


def test_ghost_mask_merges_virtual_batches_with_fewer_than_two_valid_values() -> None:
    torch.manual_seed(2)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([5, 5, 4, 2, 1, 0])  # sorted by length, as bucketing gives
    mask = torch.arange(5)[None, :] < lengths[:, None]
    ghost = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2, dtype=torch.float64)
    plain = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    y = ghost(x, mask=mask)  # the last virtual batch has 1 valid value: merged into the previous
    y2 = torch.cat([plain(x[:2], mask=mask[:2]), plain(x[2:], mask=mask[2:])])
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=1e-12, atol=1e-12)
    assert int(ghost.num_batches_tracked) == 2
    # a first virtual batch without valid values is merged into the next one
    first = torch.tensor([0, 1, 5, 5])
    m2 = torch.arange(5)[None, :] < first[:, None]
    ghost2 = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2, dtype=torch.float64)
    plain2 = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    torch.testing.assert_close(ghost2(x[:4], mask=m2), plain2(x[:4], mask=m2), rtol=0, atol=1e-12)
    # one virtual batch per sample of length-1 sequences: joined until each has 2 values
    ones = torch.tensor([1, 1, 1, 1])
    m3 = torch.arange(5)[None, :] < ones[:, None]
    ghost3 = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=1, dtype=torch.float64)
    plain3 = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    torch.testing.assert_close(
        ghost3(x[:4], mask=m3),
        torch.cat([plain3(x[:2], mask=m3[:2]), plain3(x[2:4], mask=m3[2:])]),
        rtol=1e-12,
        atol=1e-12,
    )
    # fewer than 2 valid values in the whole batch: the usual error, naming the whole input
    with pytest.raises(batchnorm.BatchNormInputError, match=r"GhostBatchNorm1d\(3\).*\(4, 3, 5\)"):
        ghost(x[:4], mask=torch.arange(5)[None, :] < torch.tensor([1, 0, 0, 0])[:, None])


def test_ghost_eval_without_running_statistics_uses_the_whole_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64) + torch.arange(8.0, dtype=torch.float64)[:, None]
    ghost = batchnorm.GhostBatchNorm1d(
        3, virtual_batch_size=2, track_running_stats=False, dtype=torch.float64
    )
    plain = nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64)
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost(x), plain(x), rtol=1e-12, atol=1e-12)
    mask = torch.ones(8, dtype=torch.bool)
    torch.testing.assert_close(ghost(x, mask=mask), plain(x), rtol=1e-12, atol=1e-12)
    ghost.train()  # training still splits into virtual batches
    torch.testing.assert_close(ghost(x[:2]), plain.train()(x[:2]), rtol=1e-12, atol=1e-12)
    assert float((ghost(x) - plain(x)).abs().max()) > 0.5


def test_ghost_errors() -> None:
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\): virtual_batch_size"):
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=0)
    with pytest.raises(TypeError):
        batchnorm.GhostBatchNorm1d(3)  # type: ignore[call-arg]
    with pytest.raises(batchnorm.BatchNormInputError, match="dimension 0"):
        batchnorm.GhostBatchNorm(4, axis=0, virtual_batch_size=2)(torch.randn(4, 6))
    # one sample per virtual batch of 2-D input: the remedy is the virtual batch size
    with pytest.raises(
        batchnorm.BatchNormInputError, match=r"shape \(5, 4\) give 1 value.*virtual_batch_size=2"
    ):
        batchnorm.GhostBatchNorm1d(4, virtual_batch_size=1)(torch.randn(5, 4))
    y = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=1)(torch.randn(5, 4, 3, 3))
    assert y.shape == (5, 4, 3, 3)  # one image still has 9 values per channel


# --- frozen BN -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frozen_cls,bn_cls,shape",
    [
        (batchnorm.FrozenBatchNorm1d, nn.BatchNorm1d, (4, 3)),
        (batchnorm.FrozenBatchNorm2d, nn.BatchNorm2d, (2, 3, 4, 4)),
        (batchnorm.FrozenBatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 2, 2)),
    ],
)
def test_frozen_module_is_eval_bn_in_both_modes(frozen_cls, bn_cls, shape) -> None:  # type: ignore[no-untyped-def]
    bn = bn_cls(3, dtype=torch.float64)
    _randomize(bn)
    bn.eval()
    frozen = frozen_cls.from_batchnorm(bn)
    x = torch.randn(*shape, dtype=torch.float64)
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)
    assert list(frozen.parameters()) == []
    # a torch.nn.BatchNorm checkpoint loads as is
    other = frozen_cls(3, dtype=torch.float64)
    other.load_state_dict(bn.state_dict())
    torch.testing.assert_close(other(x), bn(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw", [{"affine": False}, {"bias": False}], ids=["affine=False", "bias=False"]
)
def test_frozen_loads_a_checkpoint_without_weight_or_bias(kw) -> None:  # type: ignore[no-untyped-def]
    bn = nn.BatchNorm2d(3, dtype=torch.float64, **kw)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([0.3, 1.5, 4.0]))
        if bn.weight is not None:
            bn.weight.copy_(torch.tensor([1.5, 0.7, 2.0]))
    bn.eval()
    frozen = batchnorm.FrozenBatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        frozen.weight.fill_(7.0), frozen.bias.fill_(7.0)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(frozen(x), batchnorm.FrozenBatchNorm2d.from_batchnorm(bn)(x))


def test_frozen_generic_axis_and_errors() -> None:
    bn = batchnorm.BatchNorm(3, axis=-1, dtype=torch.float64)
    _randomize(bn)
    bn.eval()
    frozen = batchnorm.FrozenBatchNorm.from_batchnorm(bn)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), bn(x))
    with pytest.raises(ValueError, match="axis -1"):
        batchnorm.FrozenBatchNorm2d.from_batchnorm(bn)
    with pytest.raises(ValueError, match="no running statistics"):
        batchnorm.FrozenBatchNorm1d.from_batchnorm(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(batchnorm.BatchNormInputError, match=r"FrozenBatchNorm2d\(3\): expected 4D"):
        batchnorm.FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(batchnorm.BatchNormInputError, match="expected 3 channels"):
        batchnorm.FrozenBatchNorm1d(3)(torch.randn(2, 4))


def _trained_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), batchnorm.BatchNorm1d(4)
    )
    for _ in range(3):
        net(torch.randn(16, 3))
    return net


def test_freeze_keeps_statistics_through_train_and_unfreeze_restores() -> None:
    net = _trained_net()
    x = torch.randn(8, 3)
    expected = copy.deepcopy(net).eval()(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained statistics: no warning
        batchnorm.freeze(net)
    net.train()
    torch.testing.assert_close(net(x), expected)  # normalized with the running statistics
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # nothing updated, not even num_batches_tracked
    assert all(p.requires_grad for p in net.parameters())  # affine stays trainable by default
    assert is_frozen(net[1]) and is_frozen(net[4])
    batchnorm.unfreeze(net.train())
    assert net[1].training and net[4].training and not is_frozen(net[1])
    net(x)
    assert not torch.equal(net[1].running_mean, state["1.running_mean"])


def test_freeze_affine_and_unfreeze_restore_requires_grad_exactly() -> None:
    net = _trained_net()
    net[4].bias.requires_grad_(False)  # the user's choice survives the round trip
    batchnorm.freeze(net, affine=True)
    assert not any(p.requires_grad for m in (net[1], net[4]) for p in m.parameters())
    assert net[0].weight.requires_grad
    batchnorm.unfreeze(net)
    assert net[1].weight.requires_grad and net[1].bias.requires_grad
    assert net[4].weight.requires_grad and not net[4].bias.requires_grad


def test_freeze_affine_after_freeze_switches_affine_off_and_unfreeze_restores() -> None:
    net = _trained_net()
    net[4].bias.requires_grad_(False)
    batchnorm.freeze(net)  # stage 1: statistics
    assert all(p.requires_grad for p in net[1].parameters())
    batchnorm.freeze(net, affine=True)  # stage 2: γ and β too
    assert not any(p.requires_grad for m in (net[1], net[4]) for p in m.parameters())
    net.train()
    net(torch.randn(8, 3)).sum().backward()
    assert net[1].weight.grad is None and net[4].weight.grad is None
    assert net[0].weight.grad is not None
    batchnorm.freeze(net, affine=True)  # again: nothing more to switch off or record
    batchnorm.unfreeze(net)
    assert net[1].weight.requires_grad and net[1].bias.requires_grad
    assert net[4].weight.requires_grad and not net[4].bias.requires_grad


@pytest.mark.parametrize("mode", [True, False])
def test_unfreeze_of_a_layer_itself_restores_its_mode(mode) -> None:  # type: ignore[no-untyped-def]
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(8, 3))
    bn.train(mode)
    batchnorm.freeze(bn)
    bn(torch.randn(4, 3))
    assert not bn.training
    batchnorm.unfreeze(bn)
    assert bn.training is mode and not is_frozen(bn)
    # nested layers take the model's mode, as before
    net = _trained_net().train()
    batchnorm.freeze(net)
    batchnorm.unfreeze(net.eval())
    assert not net[1].training and not net[4].training
    # a layer replaced by another class keeps the frozen state and the mode to restore
    from batchnorm.variants import freeze_like

    src = batchnorm.freeze(nn.BatchNorm1d(3).train(mode))
    dst = batchnorm.BatchNorm1d(3)
    freeze_like(src, dst)
    assert is_frozen(dst) and batchnorm.unfreeze(dst).training is mode


def test_freeze_warns_on_initial_statistics_and_rejects_untracked() -> None:
    with pytest.warns(batchnorm.variants.FrozenStatisticsWarning, match=r"'1'.*initial statistics"):
        batchnorm.freeze(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"'1'.*track_running_stats=False"):
        batchnorm.freeze(
            nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False))
        )


def test_frozen_model_survives_deepcopy_and_save(tmp_path) -> None:  # type: ignore[no-untyped-def]
    net = batchnorm.freeze(_trained_net())
    clone = copy.deepcopy(net).train()
    x = torch.randn(4, 3)
    torch.testing.assert_close(clone(x), copy.deepcopy(net).eval()(x))
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).train()
    before = loaded[1].running_mean.clone()
    loaded(x)
    assert torch.equal(before, loaded[1].running_mean)


def test_ghost_batches_compose_with_renorm_by_inheritance() -> None:
    from batchnorm.variants import _Ghost, _Renorm

    class GhostRenorm1d(_Ghost, _Renorm, batchnorm.BatchNorm1d):
        pass

    torch.manual_seed(3)
    kw = {"r_max": 1.5, "d_max": 0.5, "dtype": torch.float64, **NO_WARMUP}
    both = GhostRenorm1d(3, virtual_batch_size=4, **kw)
    plain = batchnorm.BatchRenorm1d(3, **kw)
    _randomize(both)
    plain.load_state_dict(both.state_dict())
    x = torch.randn(12, 3, dtype=torch.float64) * 2
    y = both(x)
    y2 = torch.cat([plain(c) for c in torch.split(x, 4)])  # renorm of each virtual batch in turn
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.running_mean, plain.running_mean, rtol=1e-12, atol=1e-12)
    assert int(both.num_batches_tracked) == 3


def test_frozen_forward_takes_a_mask_and_only_validates_it() -> None:
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    _randomize(bn)
    bn.eval()
    frozen = batchnorm.FrozenBatchNorm1d.from_batchnorm(bn)
    x = torch.randn(4, 3, 10, dtype=torch.float64)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 7, 3, 1])[:, None]
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x, mask=mask), bn(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(frozen(x, mask[:, None, :]), frozen(x))
    with pytest.raises(batchnorm.BatchNormInputError, match=r"FrozenBatchNorm1d\(3\).*\(4, 10\)"):
        frozen(x, mask=mask[:, :5])
    with pytest.raises(batchnorm.BatchNormInputError, match="boolean"):
        frozen(x, mask=mask.float())
    generic = batchnorm.FrozenBatchNorm(3, axis=-1)
    xl = torch.randn(2, 5, 3)
    torch.testing.assert_close(generic(xl, mask=torch.ones(2, 5, dtype=torch.bool)), generic(xl))


def test_small_batch_warning_names_remedies_the_layer_does_not_already_use() -> None:
    x = torch.randn(4, 3)
    with pytest.warns(batchnorm.SmallBatchWarning) as plain:
        batchnorm.BatchNorm1d(3)(x)
    with pytest.warns(batchnorm.SmallBatchWarning) as renorm:
        batchnorm.BatchRenorm1d(3)(x)
    assert "BatchRenorm" in str(plain[0].message)
    assert "Use larger batches, or GroupNorm" in str(renorm[0].message)


def test_ghost_layers_warn_on_the_virtual_batches_they_normalize_with() -> None:
    # a batch of 64 split into virtual batches of 2 samples is a batch of 2 to BN
    with pytest.warns(batchnorm.SmallBatchWarning, match=r"as few as 2 values per channel"):
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2)(torch.randn(64, 3))
    # ... and so is its smallest chunk: 64 in fives leaves a last virtual batch of 4
    with pytest.warns(batchnorm.SmallBatchWarning, match=r"as few as 4 values per channel"):
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=5)(torch.randn(64, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", batchnorm.SmallBatchWarning)
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=8)(torch.randn(64, 3))
        batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2)(torch.randn(64, 3, 2, 2))  # 8 each
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2).eval()(torch.randn(64, 3))
    # masked: the virtual batch with the fewest valid values decides — samples 4 and 5 keep
    # 2 + 1 of their 4 positions, the other virtual batches 8 values each
    x, mask = torch.randn(8, 3, 4), torch.ones(8, 4, dtype=torch.bool)
    mask[4, 2:] = False
    mask[5, 1:] = False
    with pytest.warns(batchnorm.SmallBatchWarning, match=r"as few as 3 values per channel"):
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2)(x, mask=mask)


def test_a_refused_batch_does_not_advance_the_counter_in_a_trace_or_compiled_graph() -> None:
    """Inside a graph the refusal of a non-finite batch is a torch.where, and the counter has
    to follow it there too: it advanced anyway, and renorm's warm-up schedule — read from the
    counter — switched its limits on early (outputs off by 7.8)."""
    import copy
    import warnings

    torch.manual_seed(0)
    bad = torch.randn(6, 3)
    bad[0, 0] = float("nan")
    x = torch.randn(6, 3) * 4 + 2
    eager = batchnorm.BatchRenorm1d(3, warmup_steps=1, r_max_step=1, d_max_step=1)
    graphs = copy.deepcopy(eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graphs, (torch.randn(6, 3),), check_trace=False)
        graphs.load_state_dict(eager.state_dict())
        eager(bad)
        traced(bad)
    assert int(eager.num_batches_tracked) == int(graphs.num_batches_tracked) == 0
    assert graphs.renorm_limits() == eager.renorm_limits() == (1.0, 0.0)
    torch.testing.assert_close(traced(x), eager(x))
    compiled_layer = batchnorm.BatchRenorm1d(3)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    compiled(bad)
    assert int(compiled_layer.num_batches_tracked) == 0

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = batchnorm.BatchNorm1d(3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.bn(t, mask=torch.ones(t.shape[0], dtype=torch.bool))

    # a mask's count of valid positions would be a constant of the trace: refused by name
    masked = Masked()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BatchNormInputError, match=r"BatchNorm1d\(3\): a traced layer takes no"):
            torch.jit.trace(masked, (torch.randn(6, 3),), check_trace=False)
        m_traced = torch.jit.trace(masked.eval(), (torch.randn(6, 3),), check_trace=False)
    torch.testing.assert_close(m_traced(x), masked(x))  # in eval mode a mask is only checked


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNorm1d(3),
        lambda: batchnorm.BatchRenorm1d(3),
        lambda: batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2),
    ],
)
def test_a_small_first_batch_compiles_with_fullgraph(make) -> None:  # type: ignore[no-untyped-def]
    """The small-batch warning is Python torch.compile cannot trace (torch.nn's layer compiles
    the same call): it is not given while compiling."""
    torch._dynamo.reset()
    layer = make()
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(torch.randn(4, 3))
    assert y.shape == (4, 3) and int(layer.num_batches_tracked) >= 1


def test_variants_take_numpy_integer_counts_as_torch_nn_does() -> None:
    # torch.nn.BatchNorm1d(np.int64(4)) works; sizes computed with NumPy must work here too
    frozen = batchnorm.FrozenBatchNorm1d(np.int64(4))
    assert frozen.num_features == 4 and type(frozen.num_features) is int
    ghost = batchnorm.GhostBatchNorm1d(np.int32(4), virtual_batch_size=np.int64(8))
    assert ghost.virtual_batch_size == 8 and type(ghost.virtual_batch_size) is int
    assert ghost(torch.randn(16, 4)).shape == (16, 4)
    for bad in (True, 0, 2.0, "4"):
        with pytest.raises(ValueError, match="num_features must be a positive int"):
            batchnorm.FrozenBatchNorm1d(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
            batchnorm.GhostBatchNorm1d(4, virtual_batch_size=bad)  # type: ignore[arg-type]


def test_traced_renorm_holds_r_and_d_constant_in_its_gradient() -> None:
    """torch.jit.trace does not record no_grad: r and d are detached so that the replayed
    graph's gradient is the eager one (the paper's stop_gradient)."""

    def make() -> nn.Module:
        return batchnorm.BatchRenorm1d(3, r_max=2.0, d_max=1.0, **NO_WARMUP).double()

    eager, layer = make(), make()
    for m in (eager, layer):
        m.running_mean.fill_(0.3)
        m.running_var.fill_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            layer, (torch.randn(6, 3, dtype=torch.float64),), check_trace=False
        )
    layer.load_state_dict(eager.state_dict())
    x = torch.randn(6, 3, dtype=torch.float64) * 2 + 0.5
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    traced(x1).pow(2).sum().backward()
    eager(x2).pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_a_traced_float64_step_blends_in_float64() -> None:
    """The traced count is an int64 tensor: the Bessel factor must not drop to float32."""
    layer = batchnorm.BatchNorm1d(3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            layer, (torch.randn(7, 3, dtype=torch.float64),), check_trace=False
        )
    layer.reset_running_stats()
    x = torch.randn(7, 3, dtype=torch.float64) * 3 + 1
    traced(x)
    exact = 0.9 + 0.1 * x.var(0, unbiased=True)
    assert (layer.running_var - exact).abs().max().item() < 1e-15


def test_renorm_takes_a_c_by_1_weight_and_runs_without_values() -> None:
    """A weight of any shape holding C values, as torch.nn takes it; and the meta device and
    FakeTensorMode, where the warm-up counter has no value to read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    x = torch.randn(8, 4, 2, 2)
    flat = batchnorm.BatchRenorm2d(4, **NO_WARMUP)
    _randomize(flat)
    col = copy.deepcopy(flat)
    col.weight = nn.Parameter(flat.weight.detach().reshape(4, 1).clone())
    col.bias = nn.Parameter(flat.bias.detach().reshape(4, 1).clone())
    torch.testing.assert_close(col(x), flat(x))
    torch.testing.assert_close(col.running_mean, flat.running_mean)
    y = batchnorm.BatchRenorm2d(4, device="meta")(torch.empty(8, 4, 3, 3, device="meta"))
    assert y.shape == (8, 4, 3, 3) and y.device.type == "meta"
    with FakeTensorMode():
        assert batchnorm.BatchRenorm2d(4)(torch.randn(8, 4, 3, 3)).shape == (8, 4, 3, 3)


def test_a_real_renorm_layer_propagates_shapes_under_fake_tensor_mode() -> None:
    """As torch.nn's layers do (torch.compile's shape propagation calls the real module): the
    warm-up limits were read from the counter as a number, which a fake value cannot give."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer, ref = batchnorm.BatchRenorm2d(4), nn.BatchNorm2d(4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert layer(torch.empty(8, 4, 3, 3)).shape == ref(torch.empty(8, 4, 3, 3)).shape
    for k, v in layer.state_dict().items():  # nothing read, nothing written
        assert torch.equal(v, before[k]), k


def test_a_traced_ghost_layer_says_it_holds_the_batch_size() -> None:
    with pytest.warns(torch.jit.TracerWarning, match=r"GhostBatchNorm1d\(3\): .*batch size 4"):
        torch.jit.trace(
            batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2),
            torch.randn(4, 3),
            check_trace=False,
        )


def test_a_ghost_layer_s_wrong_length_weight_names_the_whole_batch() -> None:
    bn = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2)
    bn.weight = nn.Parameter(torch.ones(6))
    with pytest.raises(BatchNormInputError, match=r"input of shape \(8, 4, 3, 3\)"):
        bn(torch.randn(8, 4, 3, 3))


def test_renorm_skip_of_a_one_value_batch_keeps_the_correction_d() -> None:
    """Algorithm 1 at m = 1: μ_B = x, σ²_B = 0, x̂ = 0, so y = γ·clip((x − μ)/σ, ±d_max) + β
    (plain BN's limit, y = β, dropped the correction); dγ = Σdy·d, dβ = Σdy, dx = 0; the
    running statistics are left as they were. In warm-up (d_max = 0) it is BN's y = β."""
    kw = dict(r_max=3.0, d_max=5.0, warmup_steps=0, r_max_step=0, d_max_step=0)
    layer = batchnorm.BatchRenorm1d(2, small_batch="skip", dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 1.0]))
        layer.running_var.fill_(0.01)
        layer.weight.copy_(torch.tensor([2.0, -1.0]))
        layer.bias.fill_(0.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.tensor([[3.0, 1.02]], dtype=torch.float64, requires_grad=True)
    sigma = (layer.running_var + layer.eps).sqrt()
    d = ((x.detach()[0] - layer.running_mean) / sigma).clamp(-5.0, 5.0)
    y = layer(x)
    torch.testing.assert_close(y[0], layer.weight.detach() * d + 0.5)
    assert float(d[0]) == 5.0 and abs(float(d[1]) - 0.02 / float(sigma[1])) < 1e-12
    dy = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    y.backward(dy)
    assert x.grad is not None and not bool(x.grad.any())
    torch.testing.assert_close(layer.weight.grad, dy[0] * d)
    torch.testing.assert_close(layer.bias.grad, dy[0])
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    # one valid position of a masked sequence batch
    seq = torch.tensor([[[9.0, 3.0], [7.0, 1.02]]], dtype=torch.float64)  # (1, C=2, L=2)
    masked = batchnorm.BatchRenorm1d(2, small_batch="skip", dtype=torch.float64, **kw)
    masked.load_state_dict(layer.state_dict())
    y_masked = masked(seq, mask=torch.tensor([[False, True]]))
    torch.testing.assert_close(y_masked[0, :, 1], y.detach()[0])
    # warm-up: d_max is still 0, so the correction is 0 and y = β
    warm = batchnorm.BatchRenorm1d(2, small_batch="skip", dtype=torch.float64, warmup_steps=5)
    warm.load_state_dict(layer.state_dict())
    torch.testing.assert_close(warm(x.detach()), torch.full((1, 2), 0.5, dtype=torch.float64))
