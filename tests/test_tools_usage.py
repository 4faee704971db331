"""The tools used the way projects use them: DataLoaders of dicts and multi-input models for
recalibrate, checked against statistics computed directly from the layers' inputs."""

import re

import pytest
import torch
from torch import nn

import batchnorm


class _DictDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A dataset returning dicts, as many vision and text pipelines do."""

    def __init__(self, x: torch.Tensor, key: str = "image") -> None:
        self.x, self.key = x, key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {self.key: self.x[i], "label": i % 3}


def test_recalibrate_takes_a_dataloader_of_dicts_like_the_doctor() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).double()
    x = torch.randn(50, 5, dtype=torch.float64) * 2 + 1
    loader = torch.utils.data.DataLoader(_DictDataset(x), batch_size=16)
    assert batchnorm.recalibrate(net, loader) == 50
    with torch.no_grad():
        feats = net[0](x)
    torch.testing.assert_close(net[1].running_mean, feats.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, feats.var(0), rtol=1e-12, atol=1e-12)
    # num_samples cuts the dict's input as it cuts a tensor
    assert batchnorm.recalibrate(net, loader, num_samples=20) == 20
    with torch.no_grad():
        feats = net[0](x[:20])
    torch.testing.assert_close(net[1].running_mean, feats.mean(0), rtol=1e-12, atol=1e-12)
    # a dict without a known input key names its keys and the remedy
    unknown = torch.utils.data.DataLoader(_DictDataset(x, key="feats"), batch_size=16)
    with pytest.raises(TypeError, match=r"\['feats', 'label'\].*batch\['my_input'\]"):
        batchnorm.recalibrate(net, unknown)


class _DictModel(nn.Module):
    """A model that takes its batch dict whole (``model(batch)``), as many pipelines do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(5, 6), nn.BatchNorm1d(6)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bn(self.lin(batch["feats"]))


def test_a_model_that_takes_the_whole_dict_follows_the_named_remedy() -> None:
    torch.manual_seed(0)
    net = _DictModel().double()
    x = torch.randn(48, 5, dtype=torch.float64) * 2 + 1
    loader = torch.utils.data.DataLoader(_DictDataset(x, key="feats"), batch_size=16)
    remedy = re.escape("((batch,) for batch in loader)")
    with pytest.raises(TypeError, match=rf"^doctor: .*\['feats', 'label'\].*{remedy}"):
        batchnorm.doctor(net, loader)
    with pytest.raises(TypeError, match=rf"^recalibrate: .*\['feats', 'label'\].*{remedy}"):
        batchnorm.recalibrate(net, loader)
    # the remedy as written: each batch wrapped in a tuple, the model called on the dict
    report = batchnorm.doctor(net, ((batch,) for batch in loader), num_batches=3)
    assert report.num_batches == 3
    assert batchnorm.recalibrate(net, ((batch,) for batch in loader)) == 48
    with torch.no_grad():
        feats = net.lin(x)
    torch.testing.assert_close(net.bn.running_mean, feats.mean(0), rtol=1e-12, atol=1e-12)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xa, xb = inputs
        return self.bn(self.a(xa) + self.b(xb))


def test_recalibrate_takes_a_model_of_several_inputs() -> None:
    torch.manual_seed(0)
    net = _TwoInputs().double()
    xa, xb = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    data = [((xa[i : i + 10], xb[i : i + 10]), torch.zeros(10)) for i in range(0, 30, 10)]
    assert batchnorm.recalibrate(net, data, num_samples=25) == 25
    with torch.no_grad():
        feats = (net.a(xa) + net.b(xb))[:25]
    torch.testing.assert_close(net.bn.running_mean, feats.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.bn.running_var, feats.var(0), rtol=1e-12, atol=1e-12)


class _Segmenter(nn.Module):
    """torchvision's segmentation models' shape: a backbone and two heads, returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1, bias=False), nn.BatchNorm2d(2))
        self.aux = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        f = self.backbone(x)
        return {"out": self.head(f), "aux": [self.aux(f), f]}


def test_fold_takes_a_model_whose_output_is_a_dict_of_tensors() -> None:
    torch.manual_seed(0)
    model = _Segmenter().double()
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6, dtype=torch.float64))
    model.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, err = batchnorm.fold(model, x)
    assert isinstance(folded.backbone[1], nn.Identity) and isinstance(folded.head[1], nn.Identity)
    with torch.no_grad():
        want, got = model(x), folded(x)
    # the error is the largest over every output tensor
    diffs = [
        float((got["out"] - want["out"]).abs().max()),
        float((got["aux"][0] - want["aux"][0]).abs().max()),
        float((got["aux"][1] - want["aux"][1]).abs().max()),
    ]
    assert max(diffs) < 1e-12 and err == max(diffs)

    class _NoTensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval()

        def forward(self, x: torch.Tensor) -> str:
            return str(self.body(x).shape)

    with pytest.raises(TypeError, match=r"returned str.*return a tensor.*to_inference"):
        batchnorm.fold(_NoTensor(), torch.randn(1, 3, 2, 2))


def test_freeze_refusing_a_layer_leaves_every_layer_as_it_was() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 4),
        nn.BatchNorm1d(4, track_running_stats=False),
    )
    for _ in range(2):
        net(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"'3'.*track_running_stats=False.*nothing was frozen"):
        batchnorm.freeze(net, affine=True)
    # the first layer was not frozen before the second was refused: it still trains
    assert not batchnorm.variants.is_frozen(net[1]) and net[1].weight.requires_grad
    before = net[1].running_mean.clone()
    net.train()(torch.randn(8, 3) + 5)
    assert not torch.equal(before, net[1].running_mean)


class _Overflow(nn.Module):
    """Linear → BN → BN, the second layer's input infinite when the data hold a value > 100."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn1, self.bn2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.lin(x))
        return self.bn2(y * torch.where(x.abs().amax() > 100, torch.inf, 1.0))


def test_recalibrate_failing_on_a_later_layer_changes_no_layer() -> None:
    torch.manual_seed(0)
    net = _Overflow().double()
    batchnorm.recalibrate(net, [torch.randn(16, 3, dtype=torch.float64)])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 3, dtype=torch.float64) * 5 + 3
    x[0, 0] = 1000.0
    # the first layer's new statistics are finite, but a model half recalibrated would mix the
    # statistics of two passes over different data
    with pytest.raises(FloatingPointError, match=r"'bn2'.*non-finite"):
        batchnorm.recalibrate(net, [x])
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("length", [7, 6])  # 6: as many positions as channels
def test_doctor_measures_a_channels_last_frozen_layer_along_its_axis(length: int) -> None:
    torch.manual_seed(0)
    bn = batchnorm.BatchNorm(6, axis=-1)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), bn)
    x = torch.randn(256, length, 4) * 3 + 1
    batchnorm.recalibrate(net, x.split(32))  # exact statistics: nothing to find
    frozen = nn.Sequential(net[0], batchnorm.FrozenBatchNorm.from_batchnorm(bn))
    for model in (net.eval(), frozen):
        report = batchnorm.doctor(model, x, num_batches=8, batch_size=32)
        assert [f.check for f in report.findings] == [], report
        gaps = batchnorm.stat_gaps(model, x, num_batches=8, mode="inference")
        assert gaps["1"].num_features == 6 and gaps["1"].mean_shift_max < 0.2


def test_doctor_does_not_call_a_bias_before_a_frozen_layer_redundant() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    batchnorm.recalibrate(net, x.split(32))
    report = batchnorm.doctor(net.eval(), x, num_batches=4, batch_size=32)
    assert [f.check for f in report.findings] == ["bias-before-bn"]  # the batch mean cancels it
    # frozen, the layer subtracts its fixed running mean: the bias shifts the output and
    # learns during fine-tuning; removing it, as the finding says, would change the model
    frozen = nn.Sequential(
        net[0], batchnorm.FrozenBatchNorm1d.from_batchnorm(net[1]), net[2], net[3]
    ).train()
    with torch.no_grad():
        shifted = frozen(x)
        net[0].bias.add_(1.0)
        assert not torch.allclose(frozen(x), shifted)
        net[0].bias.sub_(1.0)
    batchnorm.freeze(net)
    for model in (frozen, net.train()):
        report = batchnorm.doctor(model, x, num_batches=4, batch_size=32)
        assert report.by_check("bias-before-bn") == [], report


def test_doctor_on_a_frozen_model_fine_tuned_with_single_samples() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 2 + 1
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    batchnorm.recalibrate(net, x.split(32))
    frozen = nn.Sequential(
        net[0], batchnorm.FrozenBatchNorm1d.from_batchnorm(net[1]), net[2], net[3]
    ).train()
    batchnorm.freeze(net)
    # batches of one sample are what freezing is for: nothing is non-finite, nothing is wrong
    for model in (frozen, net.train()):
        report = batchnorm.doctor(model, x, num_batches=16, batch_size=1)
        assert [f.check for f in report.findings] == [], report
        assert report.output_gap is not None and report.output_gap.relative_rms < 0.3
    # and statistics that are off are still found with single samples, as with batches of 2;
    # a frozen layer computes the same in train and eval mode, so there is no train/eval gap
    with torch.no_grad():
        frozen[1].running_mean.add_(3.0)
    for bs in (1, 2):
        report = batchnorm.doctor(frozen, x, num_batches=16, batch_size=bs)
        assert {f.check for f in report.errors} == {"stale-running-stats"}


def test_recalibrate_skips_a_batch_of_one_sample_with_num_samples_too() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    # batches bucketed by length can hold one sample anywhere, not only at the end
    data = [x[:1], x[1:9], x[9:10], x[10:30]]
    assert batchnorm.recalibrate(net, data, num_samples=20) == 20
    with torch.no_grad():
        feats = net[0](torch.cat([x[1:9], x[10:22]]))
    torch.testing.assert_close(net[1].running_mean, feats.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, feats.var(0), rtol=1e-12, atol=1e-12)
    assert batchnorm.recalibrate(net, data) == 28  # the same batches skipped without a limit


def test_recalibrate_takes_images_one_at_a_time() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        batchnorm.BatchNorm2d(4),
    ).double()
    images = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    # a DataLoader of batch size 1, as for segmentation or AdaBN on single test images: each
    # layer gets 64 or 36 values per channel from one image
    assert batchnorm.recalibrate(net, [(img[None], 0) for img in images]) == 6
    with torch.no_grad():
        first = net[0](images)
        second = net[3](net[2](nn.functional.batch_norm(first, None, None, training=True)))
    torch.testing.assert_close(net[1].running_mean, first.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        net[1].running_var, first.transpose(0, 1).reshape(4, -1).var(1), rtol=1e-10, atol=1e-12
    )
    # the second layer's inputs come from the first one normalized per image (batch statistics
    # of each batch, as in training)
    per_image = torch.cat(
        [
            net[3](net[2](nn.functional.batch_norm(first[i : i + 1], None, None, training=True)))
            for i in range(6)
        ]
    )
    assert not torch.allclose(per_image, second)
    torch.testing.assert_close(
        net[4].running_mean, per_image.mean((0, 2, 3)), rtol=1e-10, atol=1e-12
    )
    assert batchnorm.recalibrate(net, [img[None] for img in images], num_samples=4) == 4
    assert batchnorm.recalibrate(net, [images[:3]], num_samples=1) == 1  # one image suffices
    with torch.no_grad():
        one = net[0](images[:1])
    torch.testing.assert_close(net[1].running_mean, one.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"num_samples must be >= 1.*got 0"):
        batchnorm.recalibrate(net, [images], num_samples=0)
    # feature vectors one at a time still cannot be normalized: skipped, then no batch at all
    vec = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="no batch"):
        batchnorm.recalibrate(vec, [torch.randn(1, 3) for _ in range(4)])
    assert batchnorm.recalibrate(vec, [torch.randn(1, 3), torch.randn(5, 3)]) == 5
    with pytest.raises(ValueError, match="no batch"):
        batchnorm.recalibrate(vec, [torch.randn(4, 3)], num_samples=1)


def test_a_whole_pickled_model_loads_with_weights_only_and_safe_globals() -> None:
    """torch.save(model) of a model holding every layer of the package, one of them frozen,
    loads with torch.load(weights_only=True) once batchnorm.safe_globals() and the model's
    torch classes are allowed: the same outputs, and the frozen layer stays frozen."""
    import io

    torch.manual_seed(0)
    model = nn.Sequential(
        batchnorm.BatchNorm2d(3),
        batchnorm.BatchRenorm2d(3),
        batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4),
        batchnorm.InPlaceABN(3),
        batchnorm.SyncBatchNorm(3),
        batchnorm.FrozenBatchNorm2d(3),
        batchnorm.BatchNorm(3, axis=1),
    )
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    model(x)  # a training step: statistics that are not the initial ones
    batchnorm.freeze(model[0])
    model.eval()
    want = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    torch_classes = [nn.Sequential]
    buffer.seek(0)
    with (
        torch.serialization.safe_globals(torch_classes),
        pytest.raises(Exception, match="batchnorm"),
    ):
        torch.load(buffer, weights_only=True)  # without the package's globals: refused
    buffer.seek(0)
    with torch.serialization.safe_globals([*batchnorm.safe_globals(), *torch_classes]):
        loaded = torch.load(buffer, weights_only=True)
    torch.testing.assert_close(loaded(x), want)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded.train()  # the frozen layer stays in eval mode; the others train
    before = loaded[0].running_mean.clone()
    loaded(x)
    assert torch.equal(loaded[0].running_mean, before) and not loaded[0].training
    assert not torch.equal(loaded[1].running_mean, model[1].running_mean)


def test_update_bn_keeps_a_frozen_layer_s_statistics_with_a_warning() -> None:
    # update_bn reset the frozen layer to 0 and 1, and the freeze hook kept it from
    # re-estimating them: the learned statistics were lost without a word
    from torch.optim.swa_utils import AveragedModel, update_bn

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), torch.nn.ReLU())
    for _ in range(20):
        net(torch.randn(8, 3, 6, 6) * 2 + 1)
    batchnorm.freeze(net)
    swa = AveragedModel(net)
    before = {k: v.clone() for k, v in swa.module[1].state_dict().items()}
    with pytest.warns(batchnorm.FrozenStatisticsWarning, match=r"BatchNorm2d\(4\): frozen by"):
        update_bn([torch.randn(8, 3, 6, 6) for _ in range(3)], swa)
    for k, v in swa.module[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    batchnorm.unfreeze(swa)
    swa.module[1].reset_running_stats()  # unfrozen: reset as asked
    assert swa.module[1].running_var.eq(1).all()


def test_freeze_affine_switches_off_a_parametrized_gamma_and_unfreeze_restores_it() -> None:
    bn = batchnorm.BatchNorm2d(4)
    torch.nn.utils.parametrizations.weight_norm(bn, "weight", dim=0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn)
    net(torch.randn(8, 3, 5, 5))
    batchnorm.freeze(net, affine=True)
    held = list(bn.parametrizations.weight.parameters())
    assert held and not any(p.requires_grad for p in held) and not bn.bias.requires_grad
    net.train()(torch.randn(8, 3, 5, 5)).sum().backward()
    assert all(p.grad is None for p in held)
    batchnorm.unfreeze(net)
    assert all(p.requires_grad for p in held) and bn.bias.requires_grad


def test_a_quantized_model_reaching_our_layer_is_told_to_convert_it_first() -> None:
    # eager-mode quantization swaps torch.nn's classes only: the message said x.float()
    x = torch.quantize_per_tensor(torch.randn(2, 4, 3, 3), 0.1, 0, torch.quint8)
    with pytest.raises(batchnorm.BatchNormInputError, match=r"convert_model\(model, to='torch'\)"):
        batchnorm.BatchNorm2d(4).eval()(x)


@pytest.mark.parametrize("to", ["ours", "torch"])
def test_convert_model_refuses_a_parametrized_layer_by_name(to: str) -> None:
    # its generated class (ParametrizedBatchNorm2d) was skipped without a word (to ours) or
    # called a class with no torch.nn counterpart (to torch)
    bn = nn.BatchNorm2d(4) if to == "ours" else batchnorm.BatchNorm2d(4)
    torch.nn.utils.parametrizations.weight_norm(bn, "weight", dim=0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"layer '1' has a parametrization on weight"):
        batchnorm.convert_model(net, to=to)  # type: ignore[arg-type]
    assert type(net[2]) is nn.BatchNorm2d  # nothing converted
