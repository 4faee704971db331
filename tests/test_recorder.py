"""ActivationRecorder: quantiles checked against numpy on the exact tensors the layer saw."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import ActivationRecorder

Q = (0.15, 0.5, 0.85)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3))


def test_exported_from_package():
    assert batchnorm.ActivationRecorder is ActivationRecorder
    assert "ActivationRecorder" in batchnorm.__all__


def test_input_quantiles_match_numpy():
    net = _net()
    rec = ActivationRecorder(net, ["1"], Q)
    xs = [torch.randn(40, 6) for _ in range(3)]
    with rec:
        for step, x in enumerate(xs):
            rec.step = step * 10
            net(x)
    steps, values = rec.history("1")
    assert steps.tolist() == [0, 10, 20]
    assert values.shape == (3, 3, 5)
    for t, x in enumerate(xs):
        pre = net[0](x).detach().numpy()  # what the sigmoid received
        want = np.quantile(pre, Q, axis=0)  # (Q, U), linear interpolation as torch
        np.testing.assert_allclose(values[t], want, rtol=1e-5, atol=1e-6)


def test_output_and_unit_selection():
    net = _net()
    rec = ActivationRecorder(net, ["1"], Q, what="output", units=[4, 1])
    x = torch.randn(50, 6)
    with rec:
        net(x)
    _, values = rec.history("1")
    out = torch.sigmoid(net[0](x)).detach().numpy()[:, [4, 1]]
    np.testing.assert_allclose(values[0], np.quantile(out, Q, axis=0), rtol=1e-5, atol=1e-6)
    rec2 = ActivationRecorder(net, ["1"], Q, units=2)
    with rec2:
        net(x)
    assert rec2.history("1")[1].shape == (1, 3, 2)


def test_conv_channels_reduce_over_batch_and_space():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
    rec = ActivationRecorder(conv, ["1"], (0.1, 0.9))
    x = torch.randn(4, 2, 5, 5)
    with rec:
        conv(x)
    pre = conv[0](x).detach().numpy()  # (N, C, H, W)
    per_channel = pre.transpose(1, 0, 2, 3).reshape(3, -1).T  # (N·H·W, C)
    want = np.quantile(per_channel, (0.1, 0.9), axis=0)
    np.testing.assert_allclose(rec.history("1")[1][0], want, rtol=1e-5, atol=1e-6)


def test_every_and_capture_schedule():
    net = _net()
    rec = ActivationRecorder(net, ["1"], Q, every=3)
    with rec:
        for _ in range(7):
            net(torch.randn(8, 6))
    assert rec.history("1")[0].tolist() == [0, 3, 6]  # call indices when no step is set

    manual = ActivationRecorder(net, ["1"], Q, every=None)
    with manual:
        net(torch.randn(8, 6))  # not recorded: capture only
        with manual.capture(step=42):
            net(torch.randn(8, 6))
    assert manual.history("1")[0].tolist() == [42]
    # capture attaches temporarily when the hooks are not installed
    with manual.capture(step=43):
        net(torch.randn(8, 6))
    assert manual.history("1")[0].tolist() == [42, 43]
    net(torch.randn(8, 6))
    assert len(manual.history("1")[0]) == 2


def test_detach_stops_recording_and_clear():
    net = _net()
    rec = ActivationRecorder(net, ["1"], Q).attach()
    net(torch.randn(8, 6))
    rec.detach()
    net(torch.randn(8, 6))
    assert len(rec.history("1")[0]) == 1
    rec.clear()
    assert len(rec.history("1")[0]) == 0


def test_max_samples_subsamples_deterministically():
    # row r holds the value r: the quantiles at k/99 of 100 kept rows are exactly those rows
    net = nn.Sequential(nn.Identity())
    x = torch.arange(1000, dtype=torch.float32).unsqueeze(1)  # (1000, 1)
    levels = tuple(k / 99 for k in range(100))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        rec = ActivationRecorder(net, ["0"], levels, max_samples=100)
        with rec:
            net(x)
            net(x)
        assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
        values = rec.history("0")[1][:, :, 0]  # (2 records, 100)
        np.testing.assert_array_equal(values[0], values[1])  # the same rows every call
        runs.append(values[0])
    np.testing.assert_array_equal(runs[0], runs[1])  # and from one recorder to the next
    kept = np.round(runs[0]).astype(int)
    np.testing.assert_allclose(runs[0], kept, atol=1e-3)
    assert len(set(kept.tolist())) == 100 and 0 <= kept.min() and kept.max() < 1000
    assert not np.all(kept % 10 == kept[0] % 10)  # not a fixed stride


def test_max_samples_does_not_alias_periodic_inputs():
    # a 100x100 map with even columns 1 and odd columns 0: a stride of 2 sees only the ones
    net = nn.Sequential(nn.Identity())
    x = torch.zeros(1, 1, 100, 100)
    x[..., ::2] = 1.0
    rec = ActivationRecorder(net, ["0"], (0.25, 0.75), max_samples=5000)
    with rec:
        net(x)
    np.testing.assert_array_equal(rec.history("0")[1][0, :, 0], [0.0, 1.0])
    # and on a smooth input the subsample still estimates the quantiles well
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    rec = ActivationRecorder(net, ["0"], Q, max_samples=4000)
    with rec:
        net(x)
    full = np.quantile(x.transpose(0, 1).reshape(3, -1).numpy(), Q, axis=1)
    np.testing.assert_allclose(rec.history("0")[1][0], full, atol=0.08)


def test_units_are_validated_with_a_remedy():
    net = _net()
    for bad in (0, -1, [], [-1, 2], True, 1.5, [1.0]):
        with pytest.raises(ValueError, match="units"):
            ActivationRecorder(net, ["1"], units=bad)  # type: ignore[arg-type]
    # the channel count is known only when the layer runs: a clear error there, not torch's
    rec = ActivationRecorder(net, ["1"], units=[0, 60])
    with pytest.raises(ValueError, match=r"units=\[0, 60\].*5 units.*below 5"), rec:
        net(torch.randn(8, 6))
    assert ActivationRecorder(net, ["1"], units=np.int64(2)).units == 2  # type: ignore[arg-type]
    assert ActivationRecorder(net, ["1"], units=np.array([3, 1])).units == (3, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_samples"):
        ActivationRecorder(net, ["1"], max_samples=0)


def test_history_of_unknown_layer_lists_recorded_layers():
    rec = ActivationRecorder(_net(), ["1", "2"], Q)
    with pytest.raises(KeyError, match=r"'0' is not a recorded layer.*\['1', '2'\]"):
        rec.history("0")


def test_bad_arguments_name_the_problem():
    net = _net()
    with pytest.raises(ValueError, match="no layer 'nope'"):
        ActivationRecorder(net, ["nope"])
    with pytest.raises(ValueError, match="quantiles"):
        ActivationRecorder(net, ["1"], (0.5, 1.5))
    with pytest.raises(ValueError, match="every"):
        ActivationRecorder(net, ["1"], every=0)


def test_to_dict_is_json():
    net = _net()
    rec = ActivationRecorder(net, {"sig": net[1]}, Q)
    with rec:
        net(torch.randn(8, 6))
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["quantiles"] == list(Q)
    assert np.asarray(d["layers"]["sig"]["values"]).shape == (1, 3, 5)


def test_records_inputs_to_our_bn_network():
    # the lab's use: the input of the last sigmoid of an MLP with batchnorm.BatchNorm1d
    from batchnorm.lab.models import MLP

    torch.manual_seed(0)
    net = MLP(12, (8, 8), 3, bn="before").eval()
    rec = ActivationRecorder(net, ["hidden.1.act"], Q)
    x = torch.randn(30, 12)
    with rec, torch.no_grad():
        net(x)
        h = net.hidden[0](x)
        pre = net.hidden[1].bn(net.hidden[1].linear(h)).numpy()
    np.testing.assert_allclose(
        rec.history("hidden.1.act")[1][0], np.quantile(pre, Q, axis=0), rtol=1e-5, atol=1e-6
    )


def test_capture_blocks_nest() -> None:
    net = nn.Sequential(nn.Identity())
    rec = batchnorm.ActivationRecorder(net, ["0"], every=None)
    x = torch.randn(4, 2)
    with rec.capture(5):
        with rec.capture(6):
            net(x)
        net(x)  # still inside capture(5)
    net(x)  # outside: every=None records nothing
    assert rec.history("0")[0].tolist() == [6, 5]


def test_keyword_inputs_tuple_outputs_and_calls_without_tensors() -> None:
    class ByKeyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x)

    net = ByKeyword()
    rec = batchnorm.ActivationRecorder(net, ["fc"])
    with rec:
        net(torch.randn(8, 3))
    assert rec.history("fc")[1].shape == (1, 3, 3)
    lstm = nn.Sequential(nn.LSTM(3, 5))
    out = batchnorm.ActivationRecorder(lstm, ["0"], what="output", axis=-1)
    with out:
        y, _ = lstm(torch.randn(4, 2, 3))
    np.testing.assert_allclose(
        out.history("0")[1][0],
        torch.quantile(y.detach().reshape(-1, 5), out._q.float(), dim=0).numpy(),
        rtol=1e-6,
    )

    class NoTensor(nn.Module):
        def forward(self, x: object = None) -> object:
            return x

    holder = nn.Sequential(NoTensor())
    silent = batchnorm.ActivationRecorder(holder, ["0"])
    with silent, pytest.warns(UserWarning, match="no tensor input to record"):
        holder(None)
        holder(None)  # (once)
    assert silent.history("0")[0].size == 0


def test_changing_widths_empty_batches_float64_and_every_are_handled() -> None:
    net = nn.Sequential(nn.Identity())
    rec = batchnorm.ActivationRecorder(net, ["0"])
    with rec:
        net(torch.randn(5, 4))
        net(torch.randn(0, 4))  # an empty batch: skipped, not a failure inside the forward
        net(torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"recorded with \[4, 6\] units"):
        rec.history("0")
    exact = batchnorm.ActivationRecorder(net, ["0"], quantiles=(0.5,))
    with exact:
        net(torch.tensor([[1 + 1e-12], [1 + 3e-12], [1 + 2e-12]], dtype=torch.float64))
    assert exact.history("0")[1][0, 0, 0] == 1 + 2e-12
    for bad in (1.5, 0, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            batchnorm.ActivationRecorder(net, ["0"], every=bad)  # type: ignore[arg-type]


def test_recorder_keeps_float64_levels_and_refuses_a_string_of_layers() -> None:
    # the levels were float32: 0.15 of [0, 1e12] came out 1.50000006e11 from float64 values
    net = nn.Sequential(nn.Identity()).double()
    rec = ActivationRecorder(net, ["0"], quantiles=(0.15, 0.3, 0.7), what="output")
    with rec.capture():
        net(torch.tensor([[0.0], [1e12]], dtype=torch.float64))
    _, values = rec.history("0")  # (T, Q, U)
    assert values[0, :, 0].tolist() == [1.5e11, 3e11, 7e11]
    with pytest.raises(TypeError, match="layers must be a list of layer names"):
        ActivationRecorder(net, "0")  # type: ignore[arg-type]


def test_the_library_s_measurements_are_neither_recorded_nor_counted() -> None:
    # a probe inside the training loop changes nothing: the doctor's deep copies carry the
    # recorder's hooks, the analysis functions run the model itself
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), batchnorm.BatchNorm1d(8), nn.Sigmoid(), nn.Linear(8, 2))
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64,))
    ce = nn.functional.cross_entropy
    rec = ActivationRecorder(model, ["2"], every=2)
    with rec:
        model(x)  # call 0: recorded
        batchnorm.internal_covariate_shift(model, ce, (x, y), 0.1)
        batchnorm.loss_landscape(model, ce, (x, y), [0.1, 0.2])
        batchnorm.activation_statistics(model, x)
        batchnorm.bn_statistics_mismatch(model, x)
        batchnorm.doctor(model, x, num_batches=2, batch_size=32)
        batchnorm.stat_gaps(model, x, num_batches=2, batch_size=32)
        batchnorm.output_gap(model, x, num_batches=2, batch_size=32)
        model(x)  # call 1: skipped by every=2
        model(x)  # call 2: recorded
    assert rec.history("2")[0].tolist() == [0, 2]
