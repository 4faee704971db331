"""Benchmark of the fused kernels against ``torch.nn.BatchNorm*`` and the memory roofline.

For each shape of a suite, on the same tensor, interleaved (one call of each contender in turn,
so drifting machine load hits both alike), the median over ``repeats`` of:

* ``fwd`` — training forward (batch statistics, running-statistics update, no autograd graph);
* ``fwd+bwd`` — training forward and backward through autograd (``y.backward(dy)``), output and
  gradient allocation included;
* ``eval`` — inference forward;
* ``eval+bwd`` (on request: ``--passes``) — inference forward and backward through autograd:
  BN kept in eval mode inside a network that trains (fine-tuning with frozen statistics);
* ``copy`` — ``out.copy_(x)`` into a preallocated tensor: the memory bandwidth just measured.

A third contender, timed in the same rounds, is a per-channel affine layer without statistics
(:class:`Affine`: ``y = x·γ + β`` in one ``torch.addcmul``, γ and β learnable): what any
per-channel layer pays for the module call, autograd and one pass over the tensor. It tells
per-call cost from the kernels' work — on small inputs it takes most of torch's time too.

Ours is :class:`batchnorm.BatchNorm1d/2d/3d` with ``backend="numba"``; torch's is
``torch.nn.BatchNorm1d/2d/3d``. The roofline of a pass is the bytes it must move divided by the
copy bandwidth: a copy moves 2 values per element (read x, write out), the forward too (read x,
write y), inference too, and forward + backward 5 (x, y; x, dy, dx) — statistics fused into the
element passes, so ``roofline = copy time × {fwd: 1, fwd+bwd: 2.5, eval: 1, eval+bwd: 2.5}``.

By default each call finds the caches as the calls before it left them: on tensors that fit
the last-level cache the copy, timed first in each round right after a pass over x, reads part
of x from the cache while the layers' passes, between the other contenders', mostly read from
memory. With ``cold`` (``--cold``) a sweep over twice the last-level cache (at least 64 MiB),
untimed, comes before every timed call, the copy's included: every contender then reads from
memory, and ``ours/roof`` says how close the layers come to the bandwidth of a copy from
memory. The targets are defined for the default run.

Command line: ``batchnorm bench [--shapes 60x100 32x64x56x56@cl ...] [--repeats 15]
[--passes fwd fwd+bwd eval eval+bwd] [--cold] [--processes N] [--json PATH]``; Python:
:func:`run`, and :func:`run_in_processes` / :func:`combine` for the median over fresh
processes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm._console import say

__all__ = [
    "Affine",
    "Case",
    "SUITE",
    "parse_case",
    "run",
    "format_table",
    "load",
    "plot",
    "add_arguments",
    "main",
]

#: bytes each pass must move, in values per element (a copy moves 2)
PASS_VALUES = {"fwd": 2.0, "fwd+bwd": 5.0, "eval": 2.0, "eval+bwd": 5.0}
#: the passes timed by default (the speed targets'); ALL_PASSES adds those timed on request
PASSES = ("fwd", "fwd+bwd", "eval")
ALL_PASSES = (*PASSES, "eval+bwd")
# the dtypes `bench` measures (`--dtype`): float32 is the targets'
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Case:
    """A benchmark input: ``shape`` (channels at axis 1) and memory ``layout``."""

    shape: tuple[int, ...]
    layout: str = "contiguous"  # or "channels_last" (4-D) / "channels_last_3d" (5-D)

    @property
    def name(self) -> str:
        s = "x".join(map(str, self.shape))
        return s + ("@cl" if self.layout != "contiguous" else "")

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


#: the default suite: dense, NCHW, the conv shapes as channels_last, and NCDHW
SUITE: tuple[Case, ...] = (
    Case((60, 100)),  # the paper's MNIST batch of 60 and 100 sigmoid units
    Case((256, 1024)),
    Case((8192, 256)),
    Case((32, 64, 56, 56)),
    Case((64, 256, 14, 14)),
    Case((128, 512, 7, 7)),
    Case((32, 64, 56, 56), "channels_last"),
    Case((64, 256, 14, 14), "channels_last"),
    Case((128, 512, 7, 7), "channels_last"),
    Case((4, 32, 16, 32, 32)),
)


def parse_case(spec: str) -> Case:
    """``"32x64x56x56"`` → NCHW contiguous; a ``@cl`` suffix → ``channels_last``."""
    if not re.fullmatch(r"[0-9]+(x[0-9]+)+(@[a-z0-9]+)?", spec.lower()):
        # (int() alone would take "1_0", "+4" and " 4", and partition an empty "@" suffix)
        raise ValueError(
            f"bench: cannot read shape {spec!r}; write it like 32x64x56x56, or 32x64x56x56@cl"
        )
    body, _, suffix = spec.lower().partition("@")
    shape = tuple(int(s) for s in body.split("x"))
    if len(shape) < 2 or len(shape) > 5 or min(shape) < 1:
        raise ValueError(f"bench: shape {spec!r} must have 2 to 5 positive sizes (N, C, ...)")
    if suffix not in ("", "cl"):
        raise ValueError(f"bench: unknown layout suffix in {spec!r}; only '@cl' (channels_last)")
    layout = "contiguous"
    if suffix == "cl":
        if len(shape) not in (4, 5):
            raise ValueError(f"bench: '@cl' needs a 4-D or 5-D shape, got {spec!r}")
        layout = "channels_last" if len(shape) == 4 else "channels_last_3d"
    if math.prod(shape) // shape[1] < 2:
        raise ValueError(f"bench: shape {spec!r} has fewer than 2 values per channel")
    return Case(shape, layout)


def _modules(case: Case, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    import batchnorm

    nd = len(case.shape)
    ours_cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}
    torch_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
    c = case.shape[1]
    # what ``auto`` picks on CPU, named so that $BATCHNORM_BACKEND does not change it: the
    # kernels for float32/float64, torch's operator for half inputs (the kernels do not read them)
    backend = "numba" if dtype in (torch.float32, torch.float64) else "aten"
    ours = ours_cls.get(nd, batchnorm.BatchNorm3d)(c, backend=backend, dtype=dtype)
    theirs = torch_cls.get(nd, nn.BatchNorm3d)(c, dtype=dtype)
    return ours, theirs


class Affine(nn.Module):
    """``y = x·γ + β`` per channel (axis 1) in one ``torch.addcmul``: the benchmark's reference
    layer without statistics (one pass forward, one node in the autograd graph)."""

    def __init__(self, num_features: int, ndim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype))
        self._view = (1, num_features) + (1,) * (ndim - 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias.view(self._view), x, self.weight.view(self._view))


def _tensor(case: Case, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    t = torch.randn(case.shape, generator=gen, dtype=dtype)
    if case.layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif case.layout == "channels_last_3d":
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


def _calls(m: nn.Module, x: Tensor, dy: Tensor) -> dict[str, Callable[[], None]]:
    """The three timed calls on module ``m`` (each leaves ``m`` in train mode)."""
    xg = x.detach().clone().requires_grad_(True)

    def fwd() -> None:
        with torch.no_grad():
            m(x)

    def fwd_bwd() -> None:
        xg.grad = None
        for p in m.parameters():
            p.grad = None
        m(xg).backward(dy)

    def evaluate() -> None:
        m.eval()
        with torch.no_grad():
            m(x)
        m.train()

    def evaluate_bwd() -> None:
        xg.grad = None
        for p in m.parameters():
            p.grad = None
        m.eval()
        m(xg).backward(dy)
        m.train()

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "eval": evaluate, "eval+bwd": evaluate_bwd}


#: the least the cold mode sweeps between timed calls (it sweeps twice the last-level cache)
COLD_SWEEP_MIN_BYTES = 64 << 20


def _cache_sweeper(cold: bool) -> Callable[[], None]:
    """What runs before every timed call: nothing, or with ``cold`` a read of a buffer twice
    the last-level cache (at least :data:`COLD_SWEEP_MIN_BYTES`), which leaves none of the
    previous calls' tensors in any cache (their dirty lines written back during the sweep).
    The read is a torch operation on torch's threads, as the layer before a BN layer in a
    network is: torch's thread pool is awake after it, the kernels' pool is not. (A NumPy read
    on one thread instead left torch's pool asleep too, and torch's inference at 60×100 took
    0.16 ms after it against 0.11 after torch's own read; ours 0.12 either way.)"""
    if not cold:
        return lambda: None
    from batchnorm import kernels

    nbytes = max(2 * kernels.LLC_BYTES, COLD_SWEEP_MIN_BYTES)
    buf = torch.ones(nbytes // 4)

    def sweep() -> None:
        buf.sum()

    return sweep


def _timed(f: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


@dataclass
class CaseResult:
    """Medians (seconds) for one case; ratios are time ratios (< 1: ours is faster)."""

    name: str
    shape: tuple[int, ...]
    layout: str
    numel: int
    copy_s: float
    copy_gbps: float
    ours_s: dict[str, float] = field(default_factory=dict)
    torch_s: dict[str, float] = field(default_factory=dict)
    roofline_s: dict[str, float] = field(default_factory=dict)
    # the per-channel affine reference (Affine): module call, autograd and one pass, no statistics
    affine_s: dict[str, float] = field(default_factory=dict)
    ours_over_torch: dict[str, float] = field(default_factory=dict)
    ours_over_roofline: dict[str, float] = field(default_factory=dict)
    # fastest of the repeats: less sensitive than the median to other processes on the machine
    ours_min_s: dict[str, float] = field(default_factory=dict)
    torch_min_s: dict[str, float] = field(default_factory=dict)
    copy_min_s: float = 0.0


def _bench_case(
    case: Case,
    repeats: int,
    dtype: torch.dtype,
    warmup: int,
    passes: Sequence[str] = PASSES,
    cold: bool = False,
) -> CaseResult:
    gen = torch.Generator().manual_seed(0)
    x = _tensor(case, dtype, gen)
    dy = _tensor(case, dtype, gen)
    out = torch.empty_like(x)
    ours, theirs = _modules(case, dtype)
    affine = Affine(case.shape[1], len(case.shape), dtype)
    calls = {
        "ours": _calls(ours, x, dy),
        "torch": _calls(theirs, x, dy),
        "affine": _calls(affine, x, dy),
    }
    # every order of the three in turn, so none always runs on a cache warmed by another
    orders = list(itertools.permutations(calls))

    def copy() -> None:
        out.copy_(x)

    for _ in range(warmup):  # first calls compile / load the kernels and warm the allocator
        copy()
        for who in calls:
            for p in passes:
                calls[who][p]()
    sweep = _cache_sweeper(cold)
    samples: dict[str, list[float]] = {"copy": []}
    for who in calls:
        for p in passes:
            samples[f"{who}/{p}"] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            sweep()
            samples["copy"].append(_timed(copy))
            for p in passes:
                for who in orders[r % len(orders)]:
                    sweep()
                    samples[f"{who}/{p}"].append(_timed(calls[who][p]))
    finally:
        if gc_was:
            gc.enable()
    med = {k: statistics.median(v) for k, v in samples.items()}
    fastest = {k: min(v) for k, v in samples.items()}
    itemsize = x.element_size()
    res = CaseResult(
        name=case.name,
        shape=case.shape,
        layout=case.layout,
        numel=case.numel,
        copy_s=med["copy"],
        copy_gbps=2 * itemsize * case.numel / med["copy"] / 1e9,
        copy_min_s=fastest["copy"],
    )
    for p in passes:
        o, t = med[f"ours/{p}"], med[f"torch/{p}"]
        roof = med["copy"] * PASS_VALUES[p] / 2.0
        res.ours_s[p] = o
        res.torch_s[p] = t
        res.roofline_s[p] = roof
        res.affine_s[p] = med[f"affine/{p}"]
        res.ours_over_torch[p] = o / t
        res.ours_over_roofline[p] = o / roof
        res.ours_min_s[p] = fastest[f"ours/{p}"]
        res.torch_min_s[p] = fastest[f"torch/{p}"]
    return res


def _geomean(v: Sequence[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: other processes using more than this share of the machine's CPU time during a run make
#: its medians measure the scheduler as well (the run is flagged as busy)
BUSY_SHARE = 0.10


def cpu_sample() -> tuple[float, float, float] | None:
    """``(CPU seconds used by every process, this process's CPU seconds, wall seconds)`` now,
    from ``/proc/stat`` (Linux; ``None`` elsewhere). Two samples tell how much of the machine
    other processes used in between (:func:`other_share`)."""
    import resource

    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal; guest is in user
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime, time.perf_counter()


def other_share(
    before: tuple[float, float, float] | None, after: tuple[float, float, float] | None
) -> float | None:
    """The share of the machine's CPU time (0 … 1) that other processes (and the hypervisor's
    steal) used between two :func:`cpu_sample` s; ``None`` without samples."""
    if before is None or after is None:
        return None
    wall = after[2] - before[2]
    if wall <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def _machine(
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    sample_before: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """What a run ran on: CPU, cores, threads of both pools, versions, the load average, and
    the share of the CPU other processes used while it measured (from ``sample_before``, a
    :func:`cpu_sample` taken when it started)."""
    import numba

    from batchnorm import kernels

    share = other_share(sample_before, cpu_sample())
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        # the size the kernels' streaming policy reads (0: unknown)
        "llc_bytes": kernels.LLC_BYTES,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "other_cpu_share": share,
        # other processes competed for the cores: medians then measure the scheduler too. The
        # load average counts the run's own threads (and the run before it), so it decides only
        # where /proc/stat cannot be read
        "busy": share > BUSY_SHARE
        if share is not None
        else max(load_before[0], load_after[0]) > (os.cpu_count() or 1),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
    }


#: the roofline target holds for shapes of at least this many values (4M)
ROOFLINE_MIN_NUMEL = 4 * 2**20


def _targets(results: list[CaseResult], passes: Sequence[str] = PASSES) -> dict[str, Any]:
    """The project's speed targets, each with the measured value and a computed verdict
    (those whose passes were timed)."""
    big = [r for r in results if r.numel >= ROOFLINE_MIN_NUMEL]
    small_train = [r for r in results if r.shape == (60, 100)]
    out: dict[str, Any] = {}
    if "fwd+bwd" in passes:
        fb_speedups = [1.0 / r.ours_over_torch["fwd+bwd"] for r in results]
        out["fwd+bwd geometric-mean speedup >= 2.0"] = {
            "value": _geomean(fb_speedups),
            "met": _geomean(fb_speedups) >= 2.0,
        }
        out["fwd+bwd no shape slower than torch"] = {
            "value": max(r.ours_over_torch["fwd+bwd"] for r in results),
            "met": all(r.ours_over_torch["fwd+bwd"] <= 1.0 for r in results),
        }
    if "eval" in passes:
        out["eval no shape slower than torch"] = {
            "value": max(r.ours_over_torch["eval"] for r in results),
            "met": all(r.ours_over_torch["eval"] <= 1.0 for r in results),
        }
    if "fwd+bwd" not in passes:
        return out
    if big:
        worst = max(r.ours_over_roofline["fwd+bwd"] for r in big)
        out["fwd+bwd within 1.6x of roofline (>= 4M elements)"] = {
            "value": worst,
            "met": worst <= 1.6,
        }
    if small_train and "fwd" in passes:
        worst = max(
            max(r.ours_over_torch["fwd"], r.ours_over_torch["fwd+bwd"]) for r in small_train
        )
        out["(60, 100) training step no slower than torch"] = {"value": worst, "met": worst <= 1.0}
    return out


def run(
    cases: Sequence[Case | str] | None = None,
    repeats: int = 15,
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    json_path: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
    passes: Sequence[str] = PASSES,
    cold: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; return (and with ``json_path`` write, atomically) the results.

    Args:
        cases: :class:`Case` objects or specs like ``"32x64x56x56@cl"``; default :data:`SUITE`.
        repeats: timed calls per contender and pass; medians are reported.
        dtype: ``torch.float32`` (the targets' dtype), ``torch.float64``, ``torch.bfloat16``
            or ``torch.float16``.
        warmup: untimed rounds first (compilation, allocator warm-up).
        json_path: where to write the JSON.
        progress: called with each case's name before it runs.
        threads: threads for both contenders (torch's and Numba's); default: as configured.
        passes: which of :data:`ALL_PASSES` to time; default :data:`PASSES`.
        cold: sweep the caches before every timed call (the module's docstring says when
            that matters); the targets are defined for the default, False.

    Returns a dict with ``machine`` (CPU model, cores, threads, load), ``cases`` (per-case
    medians in seconds and the ratios ours/torch and ours/roofline) and ``targets`` (each with
    the measured value and whether it is met).

    Example::

        >>> from batchnorm import bench
        >>> res = bench.run(["60x100"], repeats=3)  # doctest: +SKIP
        >>> print(bench.format_table(res))  # doctest: +SKIP
    """
    if repeats < 1:
        raise ValueError(f"bench: repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"bench: warmup must be >= 0, got {warmup}")
    if dtype not in DTYPES:
        names = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in DTYPES)
        raise ValueError(f"bench: dtype must be one of {names}, got {dtype!r}")
    unknown = [p for p in passes if p not in ALL_PASSES]
    if unknown or not passes:
        raise ValueError(
            f"bench: passes must be some of {', '.join(ALL_PASSES)}, got {list(passes)!r}"
        )
    chosen = [c if isinstance(c, Case) else parse_case(c) for c in (cases or SUITE)]
    timed = tuple(p for p in ALL_PASSES if p in passes)  # the table's order
    with threads_set(threads):
        return _run(chosen, repeats, dtype, warmup, json_path, progress, timed, cold)


@contextlib.contextmanager
def threads_set(threads: int | None, who: str = "bench") -> Iterator[None]:
    """Run with ``threads`` threads in torch's pool and Numba's (None: as configured); both
    are restored after. ``who`` starts the error message."""
    import numba

    saved = (torch.get_num_threads(), numba.get_num_threads())
    if threads is not None:
        most = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        if not 1 <= threads <= most:
            raise ValueError(f"{who}: threads must be in 1..{most}, got {threads}")
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def _run(
    chosen: list[Case],
    repeats: int,
    dtype: torch.dtype,
    warmup: int,
    json_path: str | os.PathLike[str] | None,
    progress: Callable[[str], None] | None,
    passes: tuple[str, ...] = PASSES,
    cold: bool = False,
) -> dict[str, Any]:
    load_before = os.getloadavg()
    sample = cpu_sample()
    started = _dt.datetime.now(_dt.timezone.utc)
    results = []
    for case in chosen:
        if progress is not None:
            progress(case.name)
        results.append(_bench_case(case, repeats, dtype, warmup, passes, cold))
    load_after = os.getloadavg()
    data = _assemble(
        results,
        started.isoformat(timespec="seconds"),
        _machine(load_before, load_after, sample),
        str(dtype).replace("torch.", ""),
        repeats,
        passes,
        cold,
    )
    if json_path is not None:
        _write_json_atomic(json_path, data)
    return data


def _assemble(
    results: list[CaseResult],
    date: str,
    machine: dict[str, Any],
    dtype: str,
    repeats: int,
    passes: Sequence[str],
    cold: bool = False,
) -> dict[str, Any]:
    """The saved form of a run: its cases, the summary's geometric means and the targets."""
    return {
        "date": date,
        "machine": machine,
        "dtype": dtype,
        "repeats": repeats,
        "passes": list(passes),
        # caches swept before every timed call (results saved before the option: False)
        "cold": cold,
        "roofline_values_per_element": PASS_VALUES,
        "cases": [asdict(r) for r in results],
        "summary": {
            **{
                f"{p} geomean speedup vs torch": _geomean(
                    [1.0 / r.ours_over_torch[p] for r in results]
                )
                for p in passes
            },
            # the same from each side's fastest repeat: a time that is sometimes much slower
            # (memory fresh from the operating system) moves the median, not the minimum
            **{
                f"{p} geomean speedup vs torch, fastest repeats": _geomean(
                    [r.torch_min_s[p] / r.ours_min_s[p] for r in results]
                )
                for p in passes
            },
            # the reference layer without statistics: how much of torch's time is per-call cost
            **{
                f"{p} geomean speedup vs torch of a per-channel affine (no statistics)": _geomean(
                    [r.torch_s[p] / r.affine_s[p] for r in results]
                )
                for p in passes
            },
        },
        "targets": _targets(results, passes),
    }


#: a case's per-pass values (:class:`CaseResult`); those ending in ``min_s`` are fastest repeats
_PER_PASS = (
    "ours_s", "torch_s", "roofline_s", "affine_s", "ours_over_torch", "ours_over_roofline",
    "ours_min_s", "torch_min_s",
)  # fmt: skip


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Results of the same benchmark run in several processes (:func:`run`'s dicts), as one:
    per case and pass the median over the processes of each time and of each ratio (each
    process's ratios come from its own interleaved medians), the fastest repeat over all, and
    the summary and targets computed from those medians. ``processes`` says how many, and
    ``process_targets`` holds each process's own target values.

    A process is a draw of its own on many machines: where memory lands and how the caches
    share it stays fixed for a process's life, and the same call can take 1.2× the time in
    one process that it takes in the next, which no number of repeats inside one process
    averages out.
    """
    if not runs:
        raise ValueError("combine: no runs")
    first = runs[0]
    passes = timed_passes(first)

    def suite(r: dict[str, Any]) -> list[tuple[str, str]]:
        return [(c["name"], c["layout"]) for c in r["cases"]]

    for r in runs[1:]:
        if (
            suite(r) != suite(first)
            or timed_passes(r) != passes
            or r["dtype"] != first["dtype"]
            or r.get("cold", False) != first.get("cold", False)
        ):
            raise ValueError(
                "combine: the runs time different cases, passes or dtypes, or one swept the "
                "caches (--cold) and another did not"
            )
    median = statistics.median
    results = []
    for i, c in enumerate(first["cases"]):
        per = [r["cases"][i] for r in runs]
        by_pass = {
            key: {p: (min if key.endswith("min_s") else median)([q[key][p] for q in per])
                  for p in passes}
            for key in _PER_PASS
        }  # fmt: skip
        results.append(
            CaseResult(
                name=c["name"],
                shape=tuple(c["shape"]),
                layout=c["layout"],
                numel=c["numel"],
                copy_s=median(q["copy_s"] for q in per),
                copy_gbps=median(q["copy_gbps"] for q in per),
                copy_min_s=min(q["copy_min_s"] for q in per),
                **by_pass,
            )
        )
    machines = [r["machine"] for r in runs]
    shares = [m.get("other_cpu_share") for m in machines]
    machine = {
        **machines[0],
        "loadavg_after": machines[-1]["loadavg_after"],
        "other_cpu_share": None if None in shares else max(shares),
        "busy": any(m.get("busy") for m in machines),
    }
    data = _assemble(
        results,
        first["date"],
        machine,
        first["dtype"],
        first["repeats"],
        passes,
        first.get("cold", False),
    )
    data["processes"] = len(runs)
    data["process_targets"] = [{k: v["value"] for k, v in r["targets"].items()} for r in runs]
    return data


def _write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Standard JSON: a value that is not a finite number is ``null`` (``NaN`` is not JSON)."""
    from batchnorm.lab.results import atomic_write_json

    atomic_write_json(path, data)


def format_table(data: dict[str, Any]) -> str:
    """The results as a Markdown table: times in ms, ratios ours/torch and ours/roofline, and
    the forward + backward of the per-channel affine reference (:class:`Affine`)."""
    passes = timed_passes(data)
    head = "| shape | layout | copy ms | GB/s |" + "".join(
        f" {p} ours ms | {p} torch ms | {p} ours/torch | {p} ours/roof |" for p in passes
    )
    # the affine reference is timed with the forward + backward (absent from results saved
    # before it): its column only where some case has it
    with_affine = any(c.get("affine_s", {}).get("fwd+bwd") is not None for c in data["cases"])
    if with_affine:
        head += " fwd+bwd affine ms |"
    sep = "|" + "---|" * (4 + with_affine + 4 * len(passes))
    lines = [head, sep]
    for c in data["cases"]:
        row = f"| {'x'.join(map(str, c['shape']))} | {c['layout']} | {c['copy_s'] * 1e3:.3f} |"
        row += f" {c['copy_gbps']:.1f} |"
        for p in passes:
            row += (
                f" {c['ours_s'][p] * 1e3:.3f} | {c['torch_s'][p] * 1e3:.3f} |"
                f" {c['ours_over_torch'][p]:.2f} | {c['ours_over_roofline'][p]:.2f} |"
            )
        affine = c.get("affine_s", {}).get("fwd+bwd")
        if with_affine:
            row += " — |" if affine is None else f" {affine * 1e3:.3f} |"
        lines.append(row)
    lines.append("")
    for k, v in data["summary"].items():
        lines.append(f"- {k}: {v:.2f}x")
    per_process = data.get("process_targets")
    for k, v in data["targets"].items():
        each = ""
        if per_process:
            each = " (each process: " + " / ".join(f"{t[k]:.2f}" for t in per_process) + ")"
        lines.append(f"- target {k}: {v['value']:.2f}{each} — {'met' if v['met'] else 'NOT met'}")
    if data.get("cold"):
        lines.append(
            "- cold: the caches were swept before every timed call, the copy's included; the "
            "targets are defined for the default run"
        )
    lines += machine_lines(data, "ratios", "")
    return "\n".join(lines)


def timed_passes(data: dict[str, Any]) -> tuple[str, ...]:
    """The passes saved results hold (results saved before ``passes`` existed: the default)."""
    return tuple(data.get("passes") or PASSES)


def machine_lines(data: dict[str, Any], measured: str, unit: str) -> list[str]:
    """The table's footer: a warning when other processes shared the CPU, and the machine,
    versions, load and repeats of the run (``measured``: what a busy machine distorts;
    ``unit``: what the repeats count, e.g. ``" steps"``)."""
    m = data["machine"]
    out = []
    share = m.get("other_cpu_share")
    used = busy_note(m)
    if used:
        out.append(
            f"- WARNING: {used} while measuring: they shared the cores, so these {measured} "
            "also measure the scheduler"
        )
    others = "" if share is None else f"; other processes {share:.0%} of the CPU"
    llc = m.get("llc_bytes")  # (absent from older results)
    cache = f", {llc / 2**20:g} MiB last-level cache" if llc else ""
    out.append(
        f"- machine: {m['cpu']}, {m['cores']} cores{cache}; torch {m['torch']} ({m['torch_threads']} "
        f"threads), numba {m['numba']} ({m['numba_threads']} threads); load average "
        f"{m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after{others}; "
        f"{data['dtype']}, median of {data['repeats']}{unit}{_over_processes(data)}; "
        f"{data['date']}"
    )
    return out


def busy_note(machine: dict[str, Any]) -> str | None:
    """What made a run busy (``machine["busy"]``: other processes shared its cores), e.g.
    "other processes used 39% of the CPU time"; None for a run that was not."""
    if not machine.get("busy"):
        return None
    share = machine.get("other_cpu_share")
    if share is None:
        return "the load average exceeded the core count"
    return f"other processes used {share:.0%} of the CPU time"


def _over_processes(data: dict[str, Any]) -> str:
    n = data.get("processes", 1)
    return f", then over {n} processes" if n > 1 else ""


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Results written by :func:`run` with ``json_path`` (e.g. ``docs/bench.json``)."""
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise ValueError(f"{os.fspath(path)} holds no benchmark results (no 'cases' list)")
    return data


def _label(case: dict[str, Any]) -> str:
    shape = "x".join(map(str, case["shape"]))
    return shape + ("" if case["layout"] == "contiguous" else "\n" + case["layout"])


_MPL_REMEDY = "pip install matplotlib, or the package's [lab] extra"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(data: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Draw saved results as a PNG at ``path`` (needs matplotlib): per case and pass, our time
    over torch's (top; below 1: ours is faster; a black dash beside the fwd+bwd bar marks the
    forward + backward of the per-channel affine reference) and over the roofline (bottom, log
    scale, bars from 1), with the targets as lines (the roofline's over the shapes it is
    defined for). A run flagged busy says so in the title. Reads ``data`` only — nothing is
    measured here.

    Example::

        >>> from batchnorm import bench
        >>> bench.plot(bench.load("docs/bench.json"), "bench.png")  # doctest: +SKIP
        'bench.png'
    """
    if not _has_matplotlib():
        raise RuntimeError(f"plotting needs matplotlib ({_MPL_REMEDY})")
    import numpy as np

    from batchnorm.lab import plots

    cases = data["cases"]
    passes = timed_passes(data)
    xs = np.arange(len(cases))
    with_affine = "fwd+bwd" in passes and all("affine_s" in c for c in cases)
    # per case, a slot per pass, and in the top panel the affine reference its own right after
    # fwd+bwd (over that bar, its dash struck through the bar's value label)
    top_slots = list(passes)
    if with_affine:
        top_slots.insert(top_slots.index("fwd+bwd") + 1, "affine")

    def at(slot: str, slots: Sequence[str]) -> Any:
        return xs + (slots.index(slot) - (len(slots) - 1) / 2) * 0.8 / len(slots)

    fig, (top, bottom) = plots.new_figure(1, 2, size=(max(8.0, 1.05 * len(cases)), 3.6))
    for ax, key, ylabel, base, slots in (
        (top, "ours_over_torch", "time ours / torch.nn", 0.0, top_slots),
        # from 1 (the roofline), not from wherever the log axis starts
        (bottom, "ours_over_roofline", "time ours / roofline (log)", 1.0, passes),
    ):
        width = 0.8 / len(slots)
        for i, p in enumerate(passes):
            vals = [c[key][p] for c in cases]
            bars = ax.bar(
                at(p, slots),
                [v - base for v in vals],
                width,
                bottom=base,
                label=p,
                color=plots.color_for(p, i),
            )
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=6, padding=1)
        ax.set_xticks(xs)
        ax.set_xticklabels([_label(c) for c in cases], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    affine: list[float] = []  # (results saved before the reference have none)
    if with_affine:
        affine = [c["affine_s"]["fwd+bwd"] / c["torch_s"]["fwd+bwd"] for c in cases]
        x, half = at("affine", top_slots), 0.36 / len(top_slots)
        top.hlines(
            affine,
            x - half,
            x + half,
            linewidths=2.0,
            color="black",
            zorder=3,
            label="per-channel affine, fwd+bwd",
        )
    top.axhline(1.0, color="black", lw=1.0, label="torch's time")
    top.axhline(0.5, color="gray", lw=1.0, ls="--", label="2x faster (target, mean)")
    bottom.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    for which in (bottom.yaxis.set_major_formatter, bottom.yaxis.set_minor_formatter):
        which(FormatStrFormatter("%g"))  # 2, 3, 4 rather than 2×10⁰
    bottom.axhline(1.0, color="black", lw=1.0, label="the roofline")
    lowest = min(c["ours_over_roofline"][p] for c in cases for p in passes)
    bottom.set_ylim(bottom=min(1.0, lowest) / 1.15)  # the roofline in view
    # the target holds for the large shapes only: drawn over their groups, not across
    big = [x for x, c in zip(xs, cases) if c["numel"] >= ROOFLINE_MIN_NUMEL]
    if big:
        bottom.hlines(
            [1.6] * len(big),
            np.array(big) - 0.45,
            np.array(big) + 0.45,
            color="gray",
            lw=1.0,
            ls="--",
            label="1.6x (target, >= 4M values)",
        )
    shown = [c["ours_over_torch"][p] for c in cases for p in passes] + affine
    top.set_ylim(0, 1.18 * max(1.0, *shown))  # every dash inside the panel
    for ax in (top, bottom):
        # above the plot: inside, the legend hid the labels of the bars under it
        ax.legend(fontsize=7, ncol=6, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    m = data["machine"]
    busy = busy_note(m)
    fig.suptitle(
        f"batchnorm bench, {data['dtype']}, median of {data['repeats']}"
        f"{', caches swept before every call' if data.get('cold') else ''}: {m['cpu']}, "
        f"{m['cores']} cores, {data['date'][:10]}"
        + (f"\nmachine busy: {busy}, so these ratios also measure the scheduler" if busy else ""),
        fontsize=9,
        color="#b00000" if busy else "black",
    )
    return os.fspath(plots.save_figure(fig, path))


#: the defaults of the options that shape a measurement (``--from-json`` refuses others)
_MEASURE_DEFAULTS: dict[str, Any] = {
    "repeats": 15,
    "warmup": 2,
    "dtype": "float32",
    "passes": list(PASSES),
}


class Recorded(argparse.Action):
    """Store the value and record that the option was given (``args._given``), so that
    ``--from-json`` can refuse a measuring option spelled with its default value too."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace._given = {*getattr(namespace, "_given", ()), self.dest}


def from_json_problem(
    args: argparse.Namespace, defaults: dict[str, Any], **given: bool
) -> str | None:
    """Why measuring options given with ``--from-json``, which measures nothing, are refused
    (they would be ignored without a word): those of ``defaults`` given (options declared with
    :class:`Recorded`) or changed from their default, and those ``given`` marks True; None when
    there are none."""
    recorded: set[str] = getattr(args, "_given", set())
    named = [f"--{k}" for k, v in defaults.items() if k in recorded or getattr(args, k) != v]
    named += [f"--{k}" for k, on in given.items() if on]
    if not named:
        return None
    flags = ", ".join(n.replace("_", "-") for n in named)
    return (
        f"--from-json measures nothing, so {flags} do not apply; use --from-json PATH [--plot FILE]"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``batchnorm bench`` options."""
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE",
        help="shapes like 60x100 or 32x64x56x56 (suffix @cl: channels_last); default: the suite",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=_MEASURE_DEFAULTS["repeats"],
        action=Recorded,
        help="timed calls per pass (median)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=_MEASURE_DEFAULTS["warmup"],
        action=Recorded,
        help="untimed rounds first",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(str(d).removeprefix("torch.") for d in DTYPES),
        default=_MEASURE_DEFAULTS["dtype"],
        action=Recorded,
    )
    parser.add_argument(
        "--passes",
        nargs="+",
        choices=ALL_PASSES,
        default=_MEASURE_DEFAULTS["passes"],
        action=Recorded,
        metavar="PASS",
        help=f"what to time, some of {', '.join(ALL_PASSES)} (eval+bwd: BN in eval mode with "
        f"gradients); default: {' '.join(PASSES)}",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON (missing folders are made)"
    )
    parser.add_argument(
        "--threads", type=int, help="threads for torch and the kernels (default: as configured)"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the ratios, in the format of the extension (.png, .pdf, .svg, ...)",
    )
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: print (and with --plot draw) results saved with --json",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="sweep the caches before every timed call, the copy's included, so that every "
        "contender reads from memory (the targets are defined without it)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        action=Recorded,
        metavar="N",
        help="run the whole benchmark in N fresh processes, one after another, and report the "
        "median over them (a process's memory placement stays fixed for its life: on many "
        "machines the same call differs more between processes than within one)",
    )


def _unwritable(path: str | None) -> str | None:
    """Why a file cannot be written at ``path`` (None if it can, or if no path is given)."""
    if not path:
        return None
    if os.path.isdir(path):
        return "it is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # created on writing: check the first existing ancestor
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        return f"{parent} is not a writable directory"
    try:  # os.access says yes to root everywhere (/proc, read-only mounts): try it
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".batchnorm-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{parent} is not writable ({e.strerror or e})"
    return None


def fail(prog: str, msg: str) -> int:
    """Print ``prog: msg`` on stderr (one prefix: a message that already starts with the
    command's short name loses it) and return the exit code of a refused request."""
    short = prog.removeprefix("batchnorm ") + ": "
    say(f"{prog}: {msg.removeprefix(short)}", err=True)
    return 2


def counts_problem(args: argparse.Namespace) -> str | None:
    """Why ``--repeats``/``--warmup``/``--threads`` cannot be used (None if they can)."""
    if args.repeats < 1:
        return f"--repeats must be >= 1, got {args.repeats}"
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    if args.threads is not None:
        import numba

        most = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        if not 1 <= args.threads <= most:
            return f"--threads must be in 1..{most} (this machine's threads), got {args.threads}"
    return None


#: tensors of a case's size alive at once while it is measured (inputs, gradients, both
#: layers' outputs and gradients, the copy's pair), with room to spare
TENSORS_PER_CASE = 10


def memory_problem(cases: Sequence[Case] | None, dtype: str) -> str | None:
    """Why a shape cannot be measured on this machine: its tensors would not fit the memory
    (found before anything is measured, not as an allocation failure half-way); None if all
    fit or the memory size is unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    for case in cases or ():
        need = case.numel * item * TENSORS_PER_CASE
        if need > total:
            return (
                f"shape {case.name} needs about {need / 2**30:.3g} GiB ({TENSORS_PER_CASE} tensors "
                f"of {case.numel} {dtype} values), more than this machine's "
                f"{total / 2**30:.3g} GiB; choose a smaller shape"
            )
    return None


def main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; print the table."""
    prog = "batchnorm bench"
    try:
        cases = [parse_case(s) for s in args.shapes] if args.shapes else None
    except ValueError as e:
        return fail(prog, str(e))
    problem = _paths_problem(args)
    if problem:
        return fail(prog, problem)
    if args.from_json:
        problem = from_json_problem(
            args,
            _MEASURE_DEFAULTS,
            json=bool(args.json),
            shapes=bool(args.shapes),
            threads=args.threads is not None,
            cold=bool(args.cold),
            processes=args.processes != 1 or "processes" in getattr(args, "_given", ()),
        )
        if problem:
            return fail(prog, problem)
    if args.processes < 1:
        return fail(prog, f"--processes must be >= 1, got {args.processes}")
    # found before measuring, not after (the counts only matter when measuring)
    problem = (
        None if args.from_json else counts_problem(args) or memory_problem(cases, args.dtype)
    ) or outputs_problem(args)
    if problem:
        return fail(prog, problem)
    if args.from_json:
        try:
            data = load(args.from_json)
        except (OSError, ValueError) as e:
            return fail(prog, f"cannot read --from-json {args.from_json}: {e}")
    elif args.processes > 1:
        try:
            data = run_in_processes(
                _child_arguments(args), args.processes, progress=lambda line: say(line)
            )
        except RuntimeError as e:
            return fail(prog, str(e))
    else:
        data = run(
            cases,
            repeats=args.repeats,
            dtype=getattr(torch, args.dtype),
            warmup=args.warmup,
            progress=lambda name: say(f"  {name} ..."),
            threads=args.threads,
            passes=args.passes,
            cold=args.cold,
        )
    return print_and_write(prog, data, args, format_table, plot)


def _child_arguments(args: argparse.Namespace) -> list[str]:
    """The options of one process of ``--processes``: what to measure, and how."""
    argv = ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--dtype", args.dtype]
    argv += ["--passes", *args.passes]
    if args.shapes:
        argv += ["--shapes", *args.shapes]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.cold:
        argv.append("--cold")
    return argv


def run_in_processes(
    argv: Sequence[str],
    processes: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``batchnorm bench`` with the options ``argv`` run in ``processes`` fresh Python
    processes, one after another, its results combined (:func:`combine`). The processes'
    progress and warnings go to this one's stderr; their tables are not printed.

    Example::

        >>> from batchnorm import bench
        >>> data = bench.run_in_processes(["--shapes", "60x100", "--repeats", "51"], 3)  # doctest: +SKIP
        >>> print(bench.format_table(data))  # doctest: +SKIP
    """
    import subprocess
    import sys
    import tempfile

    if processes < 1:
        raise ValueError(f"bench: processes must be >= 1, got {processes}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="batchnorm-bench-") as tmp:
        for i in range(processes):
            if progress is not None:
                progress(f"process {i + 1} of {processes}")
            out = os.path.join(tmp, f"process{i}.json")
            cmd = [sys.executable, "-m", "batchnorm.cli", "bench", *argv, "--json", out]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"process {i + 1} of {processes} failed (exit {done.returncode}; its "
                    "messages are above)"
                )
            runs.append(load(out))
    return combine(runs)


def _paths_problem(args: argparse.Namespace) -> str | None:
    """Why the ``--json``/``--plot``/``--from-json`` paths are unusable as given: empty (an
    unset shell variable, which would read as "not given": measured, nothing saved), a folder's
    name ending in a separator, or one file named twice (the figure would replace the
    measurements)."""
    given = {
        opt: value
        for opt, value in (
            ("--json", args.json),
            ("--plot", args.plot),
            ("--from-json", getattr(args, "from_json", None)),
        )
        if value is not None
    }
    for opt, value in given.items():
        if not value.strip():
            return f"{opt} is empty; give a file, or leave {opt} out"
        if value.endswith(("/", os.sep)):
            return f"{opt} {value} ends in a folder separator; give a file name"
    if "--plot" in given:
        plot = os.path.realpath(given["--plot"])
        for opt in ("--json", "--from-json"):
            if opt in given and os.path.realpath(given[opt]) == plot:
                return (
                    f"--plot {given['--plot']} is the file of {opt} too: the figure would "
                    "replace the measurements; give the figure another name"
                )
    return None


def outputs_problem(args: argparse.Namespace) -> str | None:
    """Why the ``--json``/``--plot`` outputs cannot be written (None if they can), checked
    before anything is measured."""
    problem = _paths_problem(args)
    if problem:
        return problem
    if args.plot and not _has_matplotlib():
        return f"--plot needs matplotlib ({_MPL_REMEDY})"
    for opt, out in (("--json", args.json), ("--plot", args.plot)):
        problem = _unwritable(out)
        if problem:
            return f"cannot write {opt} {out}: {problem}"
    if args.plot:
        from batchnorm.lab.plots import figure_format

        try:
            figure_format(args.plot)
        except ValueError as e:
            return f"--plot {args.plot}: {e}"
    return None


def print_and_write(
    prog: str,
    data: dict[str, Any],
    args: argparse.Namespace,
    table: Callable[[dict[str, Any]], str],
    draw: Callable[[dict[str, Any], str], str],
) -> int:
    """Write ``--json``, print the ``table`` of ``data``, draw ``--plot``; the exit code. The
    JSON comes first and the lines go through :func:`batchnorm._console.say`, so neither a
    reader that quits (``| head``) nor a failing table or figure loses the measurements."""
    wrote_json = None
    if args.json:
        try:
            _write_json_atomic(args.json, data)
            wrote_json = f"wrote {args.json}"
        except OSError as e:
            fail(prog, f"cannot write --json {args.json}: {e.strerror or e}")
    try:
        say(table(data))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # saved results of another shape, or edited by hand
        what = f"missing or bad {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        return fail(prog, f"the results hold no usable benchmark data ({what})")
    if wrote_json:
        say(wrote_json)
    elif args.json:
        return 2
    if args.plot:
        try:
            say(f"wrote {draw(data, args.plot)}")
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
            return fail(prog, f"cannot draw --plot {args.plot}: {e}")
    return 0
