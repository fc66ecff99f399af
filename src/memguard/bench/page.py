"""The pages of a benchmark grid: `bench.md` (one table) and `bench.html` (that table, one bar
chart per headline figure and the runs), built from bench.json's content alone.

Each chart shows, per arm, the mean over seeds as a bar, the bootstrap 95% interval of the mean
as an error bar and every seed's value as a point. Charts are matplotlib PNGs inlined as base64
(the audit report's helpers), so the page opens anywhere with no network.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib.figure
import numpy as np

from memguard.bench.spec import Figure
from memguard.report.html import STYLE, _png, _table

HEADER = ["figure", "arm", "mean", "min–max", "95% interval of the mean", "seeds"]


def _number(value: float | None, figure: Figure) -> str:
    return "n/a" if value is None else format(value, figure.format)


def cells(stats: dict[str, Any], figure: Figure) -> list[str]:
    """mean, min–max, bootstrap interval and count of one arm's figure, formatted."""
    if stats["n"] == 0:
        return ["n/a", "n/a", "n/a", "0"]
    if stats["n"] == 1:
        interval = "one seed: no interval"
    else:
        interval = f"{_number(stats['ci_low'], figure)} – {_number(stats['ci_high'], figure)}"
    spread = f"{_number(stats['min'], figure)} – {_number(stats['max'], figure)}"
    return [_number(stats["mean"], figure), spread, interval, str(stats["n"])]


def _figures(bench: dict[str, Any]) -> list[Figure]:
    return [Figure(**figure) for figure in bench["figures"]]


def rows(bench: dict[str, Any]) -> list[list[str]]:
    """One row per headline figure and arm, grouped by figure."""
    return [
        [figure.label, arm, *cells(by_key[figure.key], figure)]
        for figure in _figures(bench)
        for arm, by_key in bench["summary"].items()
    ]


def markdown(bench: dict[str, Any]) -> str:
    """bench.md: a title, what the figures are over, and the table of `rows`."""
    lines = [f"# {bench['name']}", "", _seeds_line(bench), ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(bench)]
    refused = [run for run in bench["runs"] if run["train"] == "refused"]
    if refused:
        lines += ["", "Runs that refused to train (no figures):", ""]
        lines += [f"- {run['arm']}, seed {run['seed']}: {run['refused']}" for run in refused]
    return "\n".join(lines) + "\n"


def _seeds_line(bench: dict[str, Any]) -> str:
    data = "its own seed" if bench["data_seed"] is None else f"seed {bench['data_seed']}"
    return (
        f"Seeds {', '.join(map(str, bench['seeds']))} (each run's data built with {data}); "
        f"mean over seeds, their min–max, and a percentile-bootstrap 95% interval of the mean "
        f"({bench['bootstrap_resamples']:,} resamples)."
    )


def _chart(bench: dict[str, Any], figure: Figure) -> str:
    scale = 100.0 if figure.format.endswith("%") else 1.0
    arms = list(bench["summary"])
    chart = matplotlib.figure.Figure(figsize=(max(4.0, 1.1 * len(arms)), 3))
    axis = chart.subplots()
    for x, arm in enumerate(arms):
        stats = bench["summary"][arm][figure.key]
        if stats["n"] == 0:
            axis.text(x, 0, "n/a", ha="center", va="bottom")
            continue
        mean = stats["mean"] * scale
        error = None
        if stats["ci_low"] is not None:
            error = [[mean - stats["ci_low"] * scale], [stats["ci_high"] * scale - mean]]
        axis.bar(x, mean, 0.6, yerr=error, capsize=4, color="#8aa6c1")
        values = [v * scale for v in stats["values"].values()]
        spread = 0.075 if len(values) > 1 else 0.0  # seeds side by side across the bar
        positions = x + np.linspace(-spread, spread, len(values))
        axis.scatter(positions, values, color="#222", s=12, zorder=3)
    if scale != 1.0:
        axis.set_ylim(0, 105)
    axis.set_xticks(range(len(arms)))
    axis.set_xticklabels(arms, fontsize=8)
    axis.set_title(figure.label + (" (%)" if scale != 1.0 else ""))
    return f'<img src="data:image/png;base64,{_png(chart)}">'


def _runs_table(bench: dict[str, Any]) -> str:
    header = ["arm", "seed", "data seed", "train seconds", "model", "audit"]
    body = [
        [run["arm"], run["seed"], run["data_seed"],
         "n/a" if run["train_seconds"] is None else f"{run['train_seconds']:.0f}",
         run["train"], run["audit"]]
        for run in bench["runs"]
    ]  # fmt: skip
    return _table(header, body)


def render_html(bench: dict[str, Any], output: str | Path) -> Path:
    """Write the page of a grid to `output`."""
    output = Path(output)
    charts = "".join(_chart(bench, figure) for figure in _figures(bench))
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>memguard bench: {html.escape(bench["name"])}</title><style>{STYLE}</style></head><body>
<h1>memguard bench: {html.escape(bench["name"])}</h1>
<p>spec: <code>{html.escape(bench["spec"])}</code>, audits on {html.escape(bench["device"])}.
{html.escape(_seeds_line(bench))}</p>
<h2>Figures</h2>{_table(HEADER, rows(bench))}
<h2>Mean, 95% interval and seeds</h2><div class="plots">{charts}</div>
<h2>Runs</h2>{_runs_table(bench)}
</body></html>"""
    output.write_text(page)
    return output
