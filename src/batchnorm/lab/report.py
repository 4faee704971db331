"""Reports from run folders: ``report.md`` and ``report.html`` for one run, and the combined
report of ``batchnorm lab run all``.

A report is built from saved data only (:class:`~batchnorm.lab.results.RunData`): the dataset
actually used, the settings, each claim with its measured numbers and computed verdict, per-arm
accuracies (mean ± std over seeds), experiment-specific sections and the figures.

Reports are assembled as a list of blocks (heading, paragraph, table, image, list) rendered to
both Markdown and HTML, so the two always say the same thing. An experiment adds its own
sections through ``summary["sections"]``: a list of ``{"title": str, "text": str,
"table": {"headers": [...], "rows": [[...], ...]}}`` (``text`` and ``table`` optional).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchnorm.lab.results import Claim, RunData, atomic_write_text

__all__ = [
    "write_report",
    "write_combined_report",
    "format_value",
    "claims_table",
    "doctor_section",
]

Block = tuple[Any, ...]


def format_value(v: Any) -> str:
    """Short, readable numbers for tables."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    if isinstance(v, dict):
        if "mean" in v and "std" in v:
            if v["mean"] is None:
                return "–"
            return f"{format_value(v['mean'])} ± {format_value(v['std'])}"
        return ", ".join(f"{k}={format_value(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        # an item with a comma in it ("contrast 1, brightness 0") would read as two: the
        # list's text items are then quoted
        quote = any(isinstance(x, str) and "," in x for x in v)
        items = [f'"{x}"' if quote and isinstance(x, str) else format_value(x) for x in v]
        return "[" + ", ".join(items) + "]"
    return str(v)


def _verdict(c: Claim) -> str:
    return "**supported**" if c.verdict else "**not supported**"


def claims_table(claims: Sequence[tuple[str, Claim]]) -> Block:
    rows = [
        [
            exp,
            c.source,
            c.statement,
            format_value(c.measured),
            _verdict(c),
            format_value(c.seeds),
        ]
        for exp, c in claims
    ]
    return ("table", ["experiment", "source", "claim", "measured", "verdict", "seeds"], rows)


# --------------------------------------------------------------------------------------------
# rendering


def _md(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "code":
            out.append("```\n" + b[1] + "\n```")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "table":
            headers, rows = b[1], b[2]

            def cell(x: Any) -> str:
                return str(x).replace("|", "\\|").replace("\n", " ")

            lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    # the only inline markup reports use: **bold** and `code`
    s = html.escape(text)
    parts = s.split("**")
    s = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            body.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "code":
            body.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "img":
            body.append(
                f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}" '
                'style="max-width:100%"></p>'
            )
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(str(h))}</th>" for h in b[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(str(x))}</td>" for x in r) + "</tr>"
                for r in b[2]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:left;vertical-align:top}pre{background:#f5f5f5;padding:8px}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _run_blocks(run: RunData, figures: Sequence[Path], base: Path, level: int = 1) -> list[Block]:
    s = run.summary
    name = s.get("experiment", run.path.name)
    ds = s.get("dataset", {})
    blocks: list[Block] = [("h", level, f"{name}")]
    if s.get("description"):
        blocks.append(("p", s["description"]))
    if s.get("source"):
        blocks.append(("p", f"Source: {s['source']}"))
    blocks.append(
        (
            "p",
            f"Dataset used: **{ds.get('name', '?')}** ({ds.get('source', '?')}; "
            f"{ds.get('train_size', '?')} training / {ds.get('heldout_size', '?')} held-out "
            f"examples). Seeds: {format_value(s.get('seeds'))}. Runtime: "
            f"{format_value(s.get('runtime_s'))} s.",
        )
    )
    if s.get("command"):
        blocks.append(("code", s["command"]))
    cfg = s.get("config", run.config) or {}
    if cfg.get("quick"):
        seeds = s.get("seeds")
        one = isinstance(seeds, list) and len(seeds) == 1
        blocks.append(
            (
                "p",
                "**Quick size (`--quick`): a smoke test of the pipeline.** The verdicts below "
                "follow the same rules as a full run, but at this size (few steps"
                + (", one seed: every seed-to-seed spread is 0" if one else ", few seeds")
                + ") they are not evidence either way; run without `--quick` for that.",
            )
        )
    blocks.append(("h", level + 1, "Claims"))
    blocks.append(claims_table([(name, c) for c in run.claims]))
    details = [f"`{c.id}`: {c.details}" for c in run.claims if c.details]
    if details:
        blocks.append(("ul", details))
    arms = s.get("arms") or {}
    if arms:
        keys: list[str] = []
        for a in arms.values():
            keys += [k for k in a if k not in keys]
        blocks.append(("h", level + 1, "Arms (mean ± std over seeds)"))
        blocks.append(
            (
                "table",
                ["arm", *keys],
                [[arm, *(format_value(v.get(k)) for k in keys)] for arm, v in arms.items()],
            )
        )
    for sec in s.get("sections", []):
        blocks.append(("h", level + 1, sec.get("title", "")))
        if sec.get("text"):
            blocks.append(("p", sec["text"]))
        if sec.get("table"):
            t = sec["table"]
            blocks.append(
                ("table", t["headers"], [[format_value(x) for x in r] for r in t["rows"]])
            )
    if figures:
        blocks.append(("h", level + 1, "Figures"))
        for f in figures:
            blocks.append(("img", _rel(f, base), f.stem))
    blocks.append(("h", level + 1, "Settings"))
    blocks.append(("code", json.dumps(s.get("config", run.config), indent=2)))
    return blocks


def write_report(run: RunData, figures: Sequence[Path]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into the run folder."""
    blocks = _run_blocks(run, figures, run.path)
    md, htm = run.path / "report.md", run.path / "report.html"
    atomic_write_text(md, _md(blocks))
    atomic_write_text(htm, _html(blocks, str(run.summary.get("experiment", "report"))))
    return md, htm


#: the title of ``lab run all``'s report (its first line tells the command its own folder)
COMBINED_TITLE = "batchnorm lab: all experiments"


def write_combined_report(
    out: Path,
    runs: Sequence[tuple[RunData, Sequence[Path]]],
    failures: Sequence[tuple[str, str]] = (),
    settings: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """One report for ``lab run all``: a table of every claim of every run, then each run's
    section with its figures; experiments that failed are listed with their error."""
    blocks: list[Block] = [("h", 1, COMBINED_TITLE)]
    if settings:
        blocks.append(("p", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items())))
    datasets = sorted({str(r.summary.get("dataset", {}).get("name")) for r, _ in runs})
    blocks.append(("p", f"Datasets used: {', '.join(datasets) or '–'}."))
    quick = [
        str(r.summary.get("experiment"))
        for r, _ in runs
        if (r.summary.get("config", r.config) or {}).get("quick")
    ]
    if quick:
        which = "every run" if len(quick) == len(runs) else "the runs of " + ", ".join(quick)
        blocks.append(
            (
                "p",
                f"**Quick size (`--quick`) for {which}: a smoke test of the pipeline.** Their "
                "verdicts below follow the same rules as full runs, but at this size they are "
                "not evidence either way; run without `--quick` for that.",
            )
        )
    all_claims = [(str(r.summary.get("experiment")), c) for r, _ in runs for c in r.claims]
    n_ok = sum(c.verdict for _, c in all_claims)
    blocks.append(("h", 2, f"Claims ({n_ok} of {len(all_claims)} supported)"))
    blocks.append(claims_table(all_claims))
    if failures:
        blocks.append(("h", 2, "Experiments that failed"))
        blocks.append(("ul", [f"`{n}`: {e}" for n, e in failures]))
    for run, figs in runs:
        blocks += _run_blocks(run, figs, out, level=2)
    md, htm = out / "report.md", out / "report.html"
    atomic_write_text(md, _md(blocks))
    atomic_write_text(htm, _html(blocks, "batchnorm lab"))
    return md, htm


def doctor_section(
    title: str, entries: dict[str, list[dict[str, Any] | None]], seeds: list[int]
) -> dict[str, Any]:
    """A report section from ``batchnorm.diagnostics.before_after`` results (per arm, one per
    seed of ``seeds``, in order): what the doctor found, the model's train/eval output gap, and
    the same after the fix."""

    def checks(summary: dict[str, Any]) -> str:
        found = sorted({f["check"] for f in summary["findings"] if f["severity"] != "info"})
        return ", ".join(found) or "none"

    rows: list[list[Any]] = []
    for arm, per_seed in entries.items():
        for seed, d in zip(seeds, per_seed, strict=True):
            if d is None:
                continue
            rows.append(
                [
                    arm,
                    seed,
                    checks(d["before"]),
                    format_value(d["before"]["output_gap"]),
                    checks(d["after"]),
                    format_value(d["after"]["output_gap"]),
                    ", ".join(sorted({c["check"] for c in d["cured"]})) or "—",
                ]
            )
    return {
        "title": title,
        "text": (
            "`batchnorm.doctor` on each trained model, then on a copy after the fix it names "
            "(`batchnorm.recalibrate`). Output gap: relative RMS difference between the model's "
            "eval-mode outputs and its outputs with statistics pooled over the batches."
        ),
        "table": {
            "headers": [
                "arm",
                "seed",
                "findings before",
                "output gap before",
                "findings after",
                "output gap after",
                "cured",
            ],
            "rows": rows,
        },
    }
