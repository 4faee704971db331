"""Figure primitives for experiments' ``figures`` functions. They draw saved run data only —
nothing here trains.

* :func:`curves` — one line per group: the mean over seeds with a shaded ±1 std band;
* :func:`grouped_points` — means grouped by category with ±1 std error bars over seeds;
* :func:`percentile_bands` — low/median/high percentile trajectories (Figure 1b/c style);
* :func:`legend` — a legend beside the axis, where it covers no data;
* :func:`new_figure` / :func:`save_figure` — Agg figures saved atomically as PNG.

Example::

    >>> from batchnorm.lab import plots
    >>> fig, (ax,) = plots.new_figure(1)
    >>> plots.curves(ax, [0, 10, 20], {"bn": [[0.1, 0.5, 0.9], [0.1, 0.6, 0.9]]})
    >>> plots.save_figure(fig, "/tmp/example.png")  # doctest: +ELLIPSIS
    PosixPath('/tmp/example.png')
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.lab.results import atomic_write_bytes

__all__ = [
    "new_figure",
    "save_figure",
    "curves",
    "grouped_points",
    "percentile_bands",
    "legend",
    "COLORS",
]

# one color per arm, stable across figures
COLORS = {
    "baseline": "#1f77b4",
    "bn": "#d62728",
    "none": "#1f77b4",
    "before": "#d62728",
    "after": "#2ca02c",
}
_CYCLE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def color_for(name: str, i: int = 0) -> str:
    return COLORS.get(name, _CYCLE[i % len(_CYCLE)])


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.6, 3.4)) -> Any:
    """``(fig, axes)`` with ``axes`` a flat list; uses the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    return fig, list(np.asarray(axes).ravel())


def legend(ax: Any, **kwargs: Any) -> Any:
    """The legend of ``ax`` right of its frame, top-aligned (``kwargs`` go to ``ax.legend``):
    inside, matplotlib's "best" place covered a median line, curves, and error bars, which
    it does not weigh at all. :func:`save_figure` lays the figure out around it."""
    opts: dict[str, Any] = {"fontsize": 8, **kwargs}
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **opts)


def log_axis(ax: Any, values: Sequence[float]) -> None:
    """A log-scaled x axis labelled at ``values`` (the grid's learning rates or scales) and
    nowhere else: matplotlib's minor labels of a narrow range (3×10⁻¹, 4×10⁻¹, …) overlap."""
    from matplotlib.ticker import NullFormatter

    ticks = sorted({float(v) for v in values if v > 0})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def figure_format(path: str | os.PathLike[str]) -> str:
    """The image format of ``path``'s extension (``.png``, ``.pdf``, ``.svg``, …; none: PNG);
    ``ValueError`` naming the formats matplotlib writes for any other extension."""
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = Figure().canvas.get_supported_filetypes()
    if fmt not in known:
        raise ValueError(
            f"cannot write .{fmt} figures; use one of " + ", ".join(f".{k}" for k in sorted(known))
        )
    return fmt


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save ``fig`` atomically in the format of ``path``'s extension (PNG without one; see
    :func:`figure_format`) and close it."""
    import matplotlib.pyplot as plt

    fmt = figure_format(path)
    buf = io.BytesIO()
    fig.tight_layout()
    # the image grown to whatever lies outside the frame (legends beside an axis, long labels)
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def curves(
    ax: Any,
    x: Sequence[float],
    groups: Mapping[str, Sequence[Sequence[float | None]]],
    *,
    labels: Mapping[str, str] | None = None,
    xlabel: str = "step",
    ylabel: str = "",
    title: str = "",
) -> None:
    """Plot, per group, the mean over seeds of ``groups[name]`` (shape ``(seeds, len(x))``;
    ``None`` marks a missing point, e.g. after divergence) with a ±1 std band; an axis left
    without a single finite point says so in its middle."""
    drawn = False
    for i, (name, runs) in enumerate(groups.items()):
        # runs of different lengths (one diverged earlier) end in missing points: NaN
        width = max([len(x), *(len(r) for r in runs)]) if runs else 0
        arr = np.full((len(runs), width), np.nan)
        for row, r in zip(arr, runs):
            row[: len(r)] = [np.nan if v is None else float(v) for v in r]
        arr = arr[:, : len(x)]
        if arr.size == 0:
            continue
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(arr, axis=0)
                std = np.nanstd(arr, axis=0)
        c = color_for(name, i)
        label = (labels or {}).get(name, name)
        if arr.shape[0] > 1:
            label += f" (n={arr.shape[0]})"
        xs = np.asarray(x, dtype=float)[: mean.shape[0]]
        ax.plot(xs, mean, color=c, label=label, lw=1.5)
        drawn = drawn or bool(np.isfinite(mean[: xs.shape[0]]).any())
        if arr.shape[0] > 1:
            ax.fill_between(xs, mean - std, mean + std, color=c, alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        legend(ax)
    else:
        _no_data(ax)


def _no_data(ax: Any) -> None:
    """Say on an empty axis why it is empty (a blank frame reads like a plotting failure)."""
    ax.text(
        0.5,
        0.5,
        "no finite values to plot:\nevery run diverged or stopped\nbefore its first measurement",
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="0.35",
    )


def grouped_points(
    ax: Any,
    categories: Sequence[str],
    series: Mapping[str, Sequence[Sequence[float | None]]],
    *,
    colors: Mapping[str, str] | None = None,
    ylabel: str = "",
    title: str = "",
) -> None:
    """Means with error bars: one group per category, one marker per series at the mean over
    seeds, error bar = ±1 std. Markers, not bars: the axis may then be zoomed to the values
    (a bar's length must start at 0 to mean anything). ``series[name][k]`` holds the per-seed
    values for ``categories[k]``; ``colors[name]`` keeps a series in its arm's colour of
    another panel (default: :func:`color_for`)."""
    n = max(1, len(series))
    width = 0.8 / n
    xs = np.arange(len(categories))
    for i, (name, per_cat) in enumerate(series.items()):
        means, stds = [], []
        for vals in per_cat:
            v = np.array([np.nan if a is None else float(a) for a in vals], dtype=float)
            ok = v[np.isfinite(v)]
            means.append(float(ok.mean()) if ok.size else np.nan)
            stds.append(float(ok.std()) if ok.size > 1 else 0.0)
        ax.errorbar(
            xs + (i - (n - 1) / 2) * width,
            means,
            yerr=stds,
            fmt="o",
            capsize=3,
            label=name,
            color=(colors or {}).get(name) or color_for(name, i),
        )
    ax.set_xticks(xs)
    ax.set_xticklabels(categories)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    legend(ax)


def percentile_bands(
    ax: Any,
    x: Sequence[float],
    percentiles: Mapping[str, Sequence[float]],
    *,
    color: str = "#1f77b4",
    xlabel: str = "step",
    ylabel: str = "",
    title: str = "",
) -> None:
    """Percentile trajectories: keys like ``"15"``, ``"50"``, ``"85"``; the median is drawn
    solid, the others dashed, with the band between the outermost shaded."""
    keys = sorted(percentiles, key=float)
    # a trajectory that ended early (a diverged run) is drawn as far as it goes
    n = min([len(x), *(len(percentiles[k]) for k in keys)])
    xs = np.asarray(x, dtype=float)[:n]
    for k in keys:
        ys = np.asarray(percentiles[k], dtype=float)[:n]
        mid = float(k) == 50.0  # the median, if it is among them
        ax.plot(
            xs, ys, color=color, lw=1.6 if mid else 1.0, ls="-" if mid else "--", label=f"{k}th"
        )
    if len(keys) >= 2:
        lo = np.asarray(percentiles[keys[0]], dtype=float)[:n]
        hi = np.asarray(percentiles[keys[-1]], dtype=float)[:n]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.12, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    legend(ax)
