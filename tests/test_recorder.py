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
    net = _net()
    rec = ActivationRecorder(net, ["1"], (0.5,), max_samples=100)
    x = torch.randn(1000, 6)
    with rec:
        net(x)
    pre = net[0](x).detach().numpy()[::10]  # stride ceil(1000/100)
    np.testing.assert_allclose(rec.history("1")[1][0, 0], np.median(pre, axis=0), rtol=1e-5)


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
