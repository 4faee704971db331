"""Training steps and inference of whole networks: ``torch.nn``'s batch-norm layers, ours, and
none.

:mod:`batchnorm.bench` times the layers alone. Here a network's full training step — forward,
cross-entropy loss, backward, an SGD step with momentum — or, with ``mode="eval"``, its
inference (eval mode, a forward under ``torch.no_grad()``) is timed three ways on the same
batch, from the same weights:

* ``torch`` — the network with ``torch.nn.BatchNorm1d/2d``;
* ``ours`` — the same network after :func:`batchnorm.convert_model` (``backend="auto"``: what
  a user of the package gets);
* ``no BN`` — every batch-norm layer replaced by ``nn.Identity``: the rest of the step, so
  ``step − no-BN step`` estimates what the batch-norm layers cost inside the network (with
  the interactions: the layers' memory traffic evicts what the convolutions would reuse, and
  their thread pool meets torch's). The layers' own time inside the step is also measured
  directly, over :data:`PROFILED_STEPS` more steps of ``torch`` and ``ours`` under
  ``torch.profiler`` (:func:`bn_own_time`);
* with ``compile=True`` (``--compile``) also ``torch compiled`` — the ``torch.nn`` network
  under ``torch.compile`` (its default backend, compiled in the untimed warm-up steps): the
  other way to speed a network up, which generates the normalization with the layers around
  it instead of calling a kernel.

The three are interleaved (one step of each in turn, the order reversed every repeat) and
medians reported. Before timing, the first step's losses of ``torch`` and ``ours`` are
compared (in the mode timed): both compute the same function, so a timing never compares
different work. In inference the batch-norm layers' output is what the next layer reads, so
this is where a layer that leaves its output in the cache and one that streams it to memory
differ — which the layer alone (:mod:`batchnorm.bench`) cannot show.

Networks (:data:`NETWORKS`): ``mlp`` — the paper's MNIST network (784-100-100-100-10, sigmoid,
BN before each nonlinearity, Sec. 4.1), batch 60; ``cnn`` — four conv3×3-BN-ReLU-maxpool
blocks (32, 64, 128, 256 channels) on 3×32×32 inputs, batch 64; ``cnn@cl`` — the same in
``channels_last``.

Command line: ``batchnorm bench-network [--networks mlp cnn cnn@cl] [--mode train|eval]
[--compile] [--repeats 21] [--min-seconds 1] [--json PATH] [--plot PNG]``; Python: :func:`run`. Short steps are repeated
until each variant has run ``--min-seconds`` (the paper's MLP: about a thousand steps).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import functools
import gc
import math
import os
import statistics
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm import bench
from batchnorm._console import allocation_failure, say
from batchnorm.diagnostics import is_batchnorm

__all__ = [
    "Network",
    "NETWORKS",
    "run",
    "bn_own_time",
    "format_table",
    "plot",
    "add_arguments",
    "main",
]

#: the contenders, in the table's order
VARIANTS = ("torch", "ours", "no BN")
#: the contender ``compile=True`` adds
COMPILED = "torch compiled"
#: the first losses of the networks timed must agree to this, relative to max(1, |loss|)
LOSS_TOLERANCE = 1e-3

#: what is timed: a training step, or inference (eval mode, no gradients)
MODES = ("train", "eval")
_TIMED = {"train": "training step", "eval": "inference"}

#: at most this many timed steps per variant, however short a step is
MAX_REPEATS = 2000


@dataclass(frozen=True)
class Network:
    """A network to time: ``build()`` returns it with this package's BN layers."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, without the batch
    batch: int
    num_classes: int = 10
    channels_last: bool = False


def _mlp() -> nn.Module:
    from batchnorm.lab.models import MLP

    return MLP(784, (100, 100, 100), 10, activation="sigmoid", bn="before")


def _cnn() -> nn.Module:
    from batchnorm.lab.models import SmallCNN

    return SmallCNN((3, 32, 32), 10, channels=(32, 64, 128, 256), activation="relu", bn="before")


_CNN_TEXT = "4 x (conv3x3-BN-ReLU-maxpool), 32-64-128-256 channels, 3x32x32 inputs"

#: the networks by name
NETWORKS: dict[str, Network] = {
    "mlp": Network(
        "mlp", "the paper's MNIST MLP: 784-100-100-100-10, sigmoid, BN before", _mlp, (784,), 60
    ),
    "cnn": Network("cnn", _CNN_TEXT, _cnn, (3, 32, 32), 64),
    "cnn@cl": Network("cnn@cl", _CNN_TEXT + ", channels_last", _cnn, (3, 32, 32), 64, 10, True),
}


@dataclass
class NetworkResult:
    """Medians (seconds) of one network's training step (or inference) per variant."""

    name: str
    description: str
    batch: int
    layout: str
    bn_inputs: list[list[int]]  # the input shape of every batch-norm layer
    loss_gap: float  # |loss(ours) − loss(torch)| of the first step, before any update
    # |loss(torch compiled) − loss(torch)| likewise (NaN: not compiled)
    compiled_loss_gap: float = math.nan
    repeats: int = 0  # timed steps per variant
    probe_s: float = math.nan  # median of the untimed steps that set ``repeats`` from min_seconds
    step_s: dict[str, float] = field(default_factory=dict)
    step_min_s: dict[str, float] = field(default_factory=dict)
    ours_over_torch: float = math.nan
    ours_over_compiled: float = math.nan  # (NaN: not compiled)
    # step − no-BN step: what the batch-norm layers cost inside the network
    bn_s: dict[str, float] = field(default_factory=dict)
    mode: str = "train"  # see MODES
    # the batch-norm layers' own time per step, measured inside the step by torch.profiler
    # (their forwards, and in training the backward nodes of their outputs), "torch" and "ours"
    bn_own_s: dict[str, float] = field(default_factory=dict)


def _without_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every batch-norm layer replaced by ``nn.Identity``."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if is_batchnorm(child):
                setattr(parent, name, nn.Identity())
    return out


def _variants(net: Network, compile: bool = False) -> dict[str, nn.Module]:
    """The variants of ``net`` (:data:`VARIANTS`, and :data:`COMPILED` with ``compile``), with
    the same weights."""
    from batchnorm.convert import convert_model

    ours = net.build()
    theirs = convert_model(copy.deepcopy(ours), to="torch")
    models = {"torch": theirs, "ours": ours, "no BN": _without_bn(ours)}
    if compile:
        models[COMPILED] = copy.deepcopy(theirs)
    for m in models.values():
        m.train()
        if net.channels_last:
            m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compile:
        # (the compiled module shares the copy's parameters and buffers)
        models[COMPILED] = torch.compile(models[COMPILED])  # type: ignore[assignment]
    return models


def _bn_inputs(model: nn.Module, x: Tensor) -> list[list[int]]:
    """The input shape of every batch-norm layer of ``model`` in a forward of ``x``."""
    shapes: list[list[int]] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: shapes.append(list(args[0].shape)))
        for m in model.modules()
        if is_batchnorm(m)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def repeats_for(repeats: int, min_seconds: float, step_s: float) -> int:
    """Timed steps per variant: at least ``repeats``, and enough that a step of ``step_s``
    seconds runs about ``min_seconds`` in all (at most :data:`MAX_REPEATS`).

    Short steps need the extra repeats: a median of 21 one-millisecond steps still moves by
    several per cent from run to run.
    """
    if min_seconds == 0:
        return repeats
    if step_s <= 0:  # a clock too coarse to see the step
        return max(repeats, MAX_REPEATS)
    return max(repeats, min(MAX_REPEATS, math.ceil(min_seconds / step_s)))


#: untimed steps whose median sets the number of timed ones (one step descheduled by another
#: process must not cut a run of ~700 steps to ~20)
PROBES = 5


#: steps of "torch" and of "ours" run under torch.profiler after the timed ones
PROFILED_STEPS = 10
#: the profiler's name for the scope around a batch-norm layer's forward
_FORWARD_SCOPE = "batch-norm layer forward"


def bn_own_time(
    model: nn.Module, step: Callable[[], None], n: int = PROFILED_STEPS
) -> tuple[float, set[str]]:
    """The batch-norm layers' own time per step of ``model`` (seconds), from ``torch.profiler``
    over ``n`` calls of ``step``, and the names of the profiler's events it sums: the forward
    of each layer (a scope its forward hooks open and close) and, when the step runs a
    backward, the autograd nodes that made the layers' outputs (by the node's name). Unlike
    ``step − no-BN step`` it cannot come out negative when the rest of the step is slower in
    one run than in another. The profiler's own cost per recorded operation (microseconds) is
    in it: torch's layer records more operations than ours, which weighs in layers of tens of
    microseconds (the MLP's), not in layers of a tenth of a millisecond and more."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    nodes: set[str] = set()
    open_scopes: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        scope = record_function(_FORWARD_SCOPE)
        scope.__enter__()
        open_scopes.append(scope)

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        open_scopes.pop().__exit__(None, None, None)
        if isinstance(out, Tensor) and out.grad_fn is not None:
            nodes.add(out.grad_fn.name())

    layers = [m for m in model.modules() if is_batchnorm(m)]
    handles = [m.register_forward_pre_hook(enter) for m in layers]
    handles += [m.register_forward_hook(leave) for m in layers]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
    finally:
        for h in handles:
            h.remove()
    events = [e for e in prof.key_averages() if e.key == _FORWARD_SCOPE or e.key in nodes]
    return sum(e.cpu_time_total for e in events) / 1e6 / n, {e.key for e in events}


def probe(step: Callable[[], None], n: int = PROBES) -> float:
    """The median time of ``n`` calls of ``step``, in seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_network(
    net: Network,
    repeats: int,
    warmup: int,
    batch: int | None,
    min_seconds: float,
    mode: str = "train",
    compile: bool = False,
) -> NetworkResult:
    torch.manual_seed(0)
    n = batch or net.batch
    models = _variants(net, compile)
    variants = tuple(models)
    for m in models.values():
        m.train(mode == "train")
    x = torch.randn((n, *net.input_shape))
    if net.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, net.num_classes, (n,))
    with torch.no_grad():  # the same function before any update, in the mode timed
        state = {k: copy.deepcopy(m.state_dict()) for k, m in models.items()}
        compared = ("torch", "ours", COMPILED) if compile else ("torch", "ours")
        first = {k: nn.functional.cross_entropy(models[k](x), target) for k in compared}
        bn_inputs = _bn_inputs(models["ours"], x)
        for k, m in models.items():
            m.load_state_dict(state[k])  # undo the running-statistics updates of those calls
    res = NetworkResult(
        name=net.name,
        description=net.description,
        batch=n,
        layout="channels_last" if net.channels_last else "contiguous",
        bn_inputs=bn_inputs,
        loss_gap=abs(float(first["ours"]) - float(first["torch"])),
        mode=mode,
    )
    if compile:
        res.compiled_loss_gap = abs(float(first[COMPILED]) - float(first["torch"]))
    for k in compared[1:]:  # a timing must not compare different work
        got, want = float(first[k]), float(first["torch"])
        if not abs(got - want) <= LOSS_TOLERANCE * max(1.0, abs(want)):
            raise ValueError(
                f"{net.name}: the first loss of the {k} network is {got:.6g}, torch.nn's "
                f"{want:.6g}: they do not compute the same function, so their times would "
                "not compare the same work; nothing was timed"
            )
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(k: str) -> None:
        if mode == "eval":
            with torch.no_grad():
                models[k](x)
            return
        opts[k].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(models[k](x), target).backward()
        opts[k].step()

    # (a compiled variant compiles in its first steps: at least two untimed ones)
    for _ in range(max(warmup, 2) if compile else warmup):
        for k in variants:
            step(k)
    res.probe_s = probe(lambda: step("torch"))
    res.repeats = repeats_for(repeats, min_seconds, res.probe_s)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(res.repeats):
            for k in variants if r % 2 == 0 else variants[::-1]:
                t0 = time.perf_counter()
                step(k)
                samples[k].append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    res.step_s = {k: statistics.median(v) for k, v in samples.items()}
    res.step_min_s = {k: min(v) for k, v in samples.items()}
    res.ours_over_torch = res.step_s["ours"] / res.step_s["torch"]
    if compile:
        res.ours_over_compiled = res.step_s["ours"] / res.step_s[COMPILED]
    res.bn_s = {k: res.step_s[k] - res.step_s["no BN"] for k in ("torch", "ours")}
    for k in ("torch", "ours"):
        res.bn_own_s[k] = bn_own_time(models[k], functools.partial(step, k))[0]
    return res


def run(
    networks: Sequence[str] | None = None,
    repeats: int = 21,
    warmup: int = 3,
    batch: int | None = None,
    json_path: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
    min_seconds: float = 1.0,
    mode: str = "train",
    compile: bool = False,
) -> dict[str, Any]:
    """Time the training steps (or inference); return (and with ``json_path`` write,
    atomically) the results.

    Args:
        networks: names from :data:`NETWORKS`; default all.
        repeats: timed steps per variant at least; medians are reported.
        warmup: untimed steps of each variant first (compilation, allocator warm-up).
        batch: batch size for every network (default: each network's own).
        json_path: where to write the JSON. progress: called with each network's name.
        threads: threads for torch's pool and Numba's (default: as configured).
        min_seconds: short steps are repeated more often, until each variant has run about
            this long (at most :data:`MAX_REPEATS` steps); the count is in each result.
        mode: ``"train"`` (a training step) or ``"eval"`` (inference: eval mode, a forward
            under ``torch.no_grad()``).
        compile: also time the ``torch.nn`` network under ``torch.compile`` (:data:`COMPILED`;
            compiling takes seconds to a minute per network, in the warm-up).

    Example::

        >>> from batchnorm import bench_network
        >>> res = bench_network.run(["mlp"], repeats=3)  # doctest: +SKIP
        >>> print(bench_network.format_table(res))  # doctest: +SKIP
    """
    if repeats < 1:
        raise ValueError(f"bench-network: repeats must be >= 1, got {repeats}")
    if not min_seconds >= 0:
        raise ValueError(f"bench-network: min_seconds must be >= 0, got {min_seconds}")
    if warmup < 0:
        raise ValueError(f"bench-network: warmup must be >= 0, got {warmup}")
    if mode not in MODES:
        raise ValueError(f"bench-network: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if batch is not None and batch < (2 if mode == "train" else 1):
        need = "2 (batch statistics)" if mode == "train" else "1"
        raise ValueError(f"bench-network: batch must be >= {need} in {mode} mode, got {batch}")
    names = list(networks or NETWORKS)
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise ValueError(
            f"bench-network: unknown network(s) {', '.join(unknown)}; "
            f"choose from {', '.join(NETWORKS)}"
        )
    with bench.threads_set(threads, "bench-network"), _compiling_here(compile):
        load_before = os.getloadavg()
        sample = bench.cpu_sample()
        started = _dt.datetime.now(_dt.timezone.utc)
        results = []
        for name in names:
            if progress is not None:
                progress(name)
            results.append(
                _bench_network(NETWORKS[name], repeats, warmup, batch, min_seconds, mode, compile)
            )
        data: dict[str, Any] = {
            "date": started.isoformat(timespec="seconds"),
            "mode": mode,
            "compiled": compile,
            "machine": bench._machine(load_before, os.getloadavg(), sample),
            "dtype": "float32",
            "repeats": repeats,
            "networks": [asdict(r) for r in results],
        }
    if json_path is not None:
        bench._write_json_atomic(json_path, data)
    return data


@contextlib.contextmanager
def _compiling_here(compile: bool) -> Iterator[None]:
    """With ``compile``: torch.compile's code generation in this process rather than in a pool
    of worker processes, which would count as other processes' use of the CPU (the warning
    the machine lines give)."""
    if not compile:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        yield


def format_table(data: dict[str, Any]) -> str:
    """The results as a Markdown table (step times in ms; in inference mode a "step" is one
    forward)."""
    compiled = bool(data.get("compiled"))  # (results saved before the option: not compiled)
    extra = " torch compiled step ms | ours/torch compiled |" if compiled else ""
    lines = [
        "| network | batch | layout | BN layers | torch step ms | ours step ms | no-BN step ms "
        "| ours/torch | BN in step, torch ms | BN in step, ours ms | BN own, torch ms "
        "| BN own, ours ms |" + extra,
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (2 if compiled else 0),
    ]
    for r in data["networks"]:
        s = r["step_s"]
        own = r.get("bn_own_s") or {}  # (results saved before the profiled steps: none)
        row = (
            f"| {r['name']} | {r['batch']} | {r['layout']} | {len(r['bn_inputs'])} |"
            f" {s['torch'] * 1e3:.2f} | {s['ours'] * 1e3:.2f} | {s['no BN'] * 1e3:.2f} |"
            f" {r['ours_over_torch']:.2f} | {r['bn_s']['torch'] * 1e3:.2f} |"
            f" {r['bn_s']['ours'] * 1e3:.2f} |"
            + "".join(f" {own[k] * 1e3:.2f} |" if k in own else " — |" for k in ("torch", "ours"))
        )
        if compiled:
            row += f" {s[COMPILED] * 1e3:.2f} | {r['ours_over_compiled']:.2f} |"
        lines.append(row)
    lines.append("")
    for r in data["networks"]:
        shapes = ", ".join("x".join(map(str, s)) for s in r["bn_inputs"])
        lines.append(
            f"- {r['name']}: {r['description']}; BN inputs {shapes}; median of {r['repeats']} steps"
        )
    lines.append(f"- timed: {_mode_text(data)}")
    lines.append(
        "- BN in step: step − no-BN step (the rest of the step's run-to-run spread is in it); "
        f"BN own: the layers' forwards and backward nodes inside the step, torch.profiler over "
        f"{PROFILED_STEPS} more steps of each"
    )
    if compiled:
        lines.append(
            "- torch compiled: the torch.nn network under torch.compile (default backend), "
            "compiled in the warm-up"
        )
    lines += bench.machine_lines(data, "times", " steps or more")
    return "\n".join(lines)


def _mode_text(data: dict[str, Any]) -> str:
    if data.get("mode", "train") == "eval":  # (results saved before the option: training)
        return "inference — eval mode, a forward under torch.no_grad()"
    return "a training step — forward, cross-entropy, backward, SGD with momentum"


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Results written by :func:`run` with ``json_path`` (a value that is not a number there,
    ``null`` in the JSON, comes back as NaN, as :func:`run` gives it)."""
    import json

    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("networks"), list):
        raise ValueError(f"{os.fspath(path)} holds no network results (no 'networks' list)")
    for r in data["networks"]:
        for key in _MAYBE_NAN:
            if isinstance(r, dict) and key in r and r[key] is None:
                r[key] = math.nan
    return data


#: result fields that are NaN when there is nothing to measure (no --compile)
_MAYBE_NAN = ("compiled_loss_gap", "ours_over_compiled")


def plot(data: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Draw saved results as a PNG (needs matplotlib): per network, the step time of each
    variant, split into the no-BN part and the batch-norm part. Reads ``data`` only."""
    if not bench._has_matplotlib():
        raise RuntimeError(f"plotting needs matplotlib ({bench._MPL_REMEDY})")
    from batchnorm.lab import plots

    nets = data["networks"]
    compiled = bool(data.get("compiled"))
    fig, axes = plots.new_figure(len(nets), 1, size=(3.2 if compiled else 2.6, 3.4))
    for j, (ax, r) in enumerate(zip(axes, nets, strict=True)):  # one panel each: own scale
        base = r["step_s"]["no BN"] * 1e3
        if compiled:  # one bar: its no-BN part was not compiled, so not measured
            t = r["step_s"][COMPILED] * 1e3
            bar = ax.bar(2, t, 0.7, color="white", edgecolor="0.3", hatch="//")
            ax.bar_label(bar, labels=[f"{t:.2f} ms"], fontsize=7, padding=1)
        names = ["torch.nn BN", "batchnorm"] + (["torch.nn BN,\ncompiled"] if compiled else [])
        for i, k in enumerate(("torch", "ours")):
            t = r["step_s"][k] * 1e3
            # a step timed below the no-BN step (noise, or BN's cost under it) has no BN part
            # to show: its bar is the step alone, not a segment of negative height
            rest = min(base, t)
            ax.bar(i, rest, 0.7, color="0.8", label="rest of the step" if i == 0 else None)
            bar = ax.bar(
                i,
                t - rest,
                0.7,
                bottom=rest,
                color=plots.color_for(k, i),
                label=f"BN layers, {names[i]}",  # each variant's colour: both explained
            )
            ax.bar_label(bar, labels=[f"{t:.2f} ms"], fontsize=7, padding=1)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        # each network's own count: short steps are repeated more (--min-seconds)
        steps = r.get("repeats") or f"{data['repeats']} or more"  # (older results: none)
        ax.set_title(
            f"{r['name']}, batch {r['batch']}: {r['ours_over_torch']:.2f}x\n"
            f"median of {steps} steps",
            fontsize=8,
        )
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.12)
        if j == 0:
            ax.set_ylabel(f"{_TIMED[data.get('mode', 'train')]}, ms (median)")
    # under the panels: inside one, it hid bars and their labels; beside one, it pushed the
    # panels apart
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        fontsize=7,
        ncol=min(3, len(nets)),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        frameon=False,
    )
    m = data["machine"]
    title = (
        f"{_TIMED[data.get('mode', 'train')]} with torch.nn's BN and with batchnorm's "
        + ("(and torch.nn's under torch.compile) " if compiled else "")
        + "(ours/torch and the steps timed in the titles): "
        f"{m['cpu']}, {m['cores']} cores, {data['date'][:10]}"
    )
    busy = bench.busy_note(m)
    if busy:
        title += f"; machine busy: {busy}, so these times also measure the scheduler"
    # wrapped to the figure's width (about 18 characters per inch at this size): one panel
    # is narrower than the line
    width = int(18 * fig.get_figwidth())
    fig.suptitle(textwrap.fill(title, width), fontsize=8, color="#b00000" if busy else "black")
    return os.fspath(plots.save_figure(fig, path))


#: the measuring options' defaults (one home: the parser's, and --from-json's check)
_MEASURE_DEFAULTS: dict[str, Any] = {
    "mode": "train",
    "repeats": 21,
    "min_seconds": 1.0,
    "warmup": 3,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``batchnorm bench-network`` options."""
    parser.add_argument(
        "--networks", nargs="+", choices=list(NETWORKS), help="default: all of them"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=_MEASURE_DEFAULTS["mode"],
        action=bench.Recorded,
        help="what to time: a training step (default) or inference (eval mode, no gradients)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the torch.nn network under torch.compile (compiled in the warm-up: "
        "seconds to a minute per network)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=_MEASURE_DEFAULTS["repeats"],
        action=bench.Recorded,
        help="timed steps per variant (at least; see --min-seconds)",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=_MEASURE_DEFAULTS["min_seconds"],
        action=bench.Recorded,
        help="repeat short steps until each variant ran this long (default 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=_MEASURE_DEFAULTS["warmup"],
        action=bench.Recorded,
        help="untimed steps first",
    )
    parser.add_argument("--batch", type=int, help="batch size (default: each network's own)")
    parser.add_argument("--threads", type=int, help="threads for torch and the kernels")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON (missing folders are made)"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the step times, in the format of the extension (.png, .pdf, .svg, ...)",
    )
    parser.add_argument(
        "--from-json", metavar="PATH", help="measure nothing: print (and plot) saved results"
    )


def main(args: argparse.Namespace) -> int:
    """Run from parsed arguments; print the table."""
    prog = "batchnorm bench-network"
    problem = bench.outputs_problem(args)
    if not args.from_json:  # what is measured, checked before measuring
        problem = problem or bench.counts_problem(args)
        if not 0 <= args.min_seconds < math.inf:
            problem = problem or f"--min-seconds must be finite and >= 0, got {args.min_seconds}"
    if problem:
        return bench.fail(prog, problem)
    if args.from_json:
        problem = bench.from_json_problem(
            args,
            _MEASURE_DEFAULTS,
            json=bool(args.json),
            networks=bool(args.networks),
            compile=bool(args.compile),
            batch=args.batch is not None,
            threads=args.threads is not None,
        )
        if problem:
            return bench.fail(prog, problem)
        try:
            data = load(args.from_json)
        except (OSError, ValueError) as e:
            return bench.fail(prog, f"cannot read --from-json {args.from_json}: {e}")
    else:
        try:
            data = run(
                args.networks,
                repeats=args.repeats,
                warmup=args.warmup,
                batch=args.batch,
                progress=lambda name: say(f"  {name} ..."),
                threads=args.threads,
                min_seconds=args.min_seconds,
                mode=args.mode,
                compile=args.compile,
            )
        except ValueError as e:
            return bench.fail(prog, str(e))
        except (RuntimeError, MemoryError) as e:  # --batch beyond the machine's memory
            too_big = allocation_failure(e)
            if too_big is None:
                raise
            return bench.fail(prog, f"{too_big} (--batch)")
    return bench.print_and_write(prog, data, args, format_table, plot)
