"""An offline HTML page from an audit's `results.json` alone, and a side-by-side comparison.

The page opens with each prompt kind's replication rate beside the model's FID/KID (and the
features they were measured with), then a summary table (the rows of `memguard.report.summary`),
a gallery of the most replicated generations beside their nearest training images (read from the
folders that results.json names), with `--attacks trigger` a strip per memorized target (the
target, its prompt's generation, its DoRI trigger's generation; Kowalczuk et al., arXiv
2507.16880), histograms of the Gu ratio, the MQ curves (IET's and memguard's variant) and
concept-extraction bars; every rate with its 95% interval. Plots are matplotlib PNGs and images
are inlined as base64, so the file opens anywhere with no network.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from memguard.metrics.intervals import format_rate  # noqa: E402
from memguard.report.summary import headline_rows, summary_rows  # noqa: E402

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 4px 12px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f4f4; } .warn { color: #b00; font-weight: bold; }
.pair { display: inline-block; margin: 6px; text-align: center; font-size: 0.8em; }
.pair img { image-rendering: pixelated; width: 96px; height: 96px; border: 1px solid #ccc; }
.plots img { max-width: 48%; }
.strip { display: inline-block; margin: 6px; padding: 4px; border: 1px solid #eee; }
.strip img { image-rendering: pixelated; width: 96px; height: 96px; border: 1px solid #ccc; }
.strip .none { display: inline-block; width: 96px; height: 96px; vertical-align: top; }
.strip figcaption { font-size: 0.8em; max-width: 300px; }
"""


HEADLINE = [
    "generations",
    "count",
    "replicas, copies merged (Gu et al.) [95% interval]",
    "FID",
    "KID",
    "quality features",
]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _image(path: Path) -> str:
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _gallery(results: dict, count: int = 12) -> str:
    samples = Path(results["samples_dir"])
    train = Path(results["train_data"]["path"])
    generations = sorted(results["replication"]["generations"], key=lambda g: g["ratio"])
    cells = []
    for g in generations[:count]:
        generated, nearest = _image(samples / g["file_name"]), _image(train / g["nearest_file"])
        cells.append(
            f'<div class="pair"><img src="data:image/png;base64,{generated}">'
            f'<img src="data:image/png;base64,{nearest}"><br>'
            f"{html.escape(g['prompt'][:40])}<br>d1/d2 = {g['ratio']:.3f}"
            f"{' (replica)' if g['replica'] else ''}</div>"
        )
    return "".join(cells)


def _verdict(row: dict, prefix: str) -> str:
    if row[f"{prefix}_replicated"] is None:
        return f"{prefix}: no prompt"
    ratio = row[f"{prefix}_ratio"]
    measure = (
        f"d1/d2 = {ratio:.3f}" if ratio is not None else f"L2 = {row[prefix + '_distance']:.3f}"
    )
    return f"{prefix}: {measure}{' (replica)' if row[f'{prefix}_replicated'] else ''}"


def _trigger_strips(section: dict) -> str:
    """The trigger attack's line of both rates, and a strip per target: the target, its
    prompt's generation, its trigger's generation."""
    folder = Path(section["dir"])
    line = (
        f"<p>{len(section['targets'])} targets ({html.escape(section['targets_from'])}) "
        f"replicated from their prompts: {format_rate(section['prompt_replicated'])}; "
        f"under the embedding-trigger attack: {format_rate(section['trigger_replicated'])}</p>"
    )
    strips = []
    for row in section["targets"]:
        images = [
            f'<img src="data:image/png;base64,{_image(folder / path)}" title="{title}">'
            if path is not None
            else '<span class="none">no prompt</span>'
            for path, title in ((row["image"], "target"), (row["prompt_generation"], "prompt"),
                                (row["trigger_generation"], "trigger"))
        ]  # fmt: skip
        caption = f"{row['target']}: {row['prompt'] or '(no caption)'}"
        strips.append(
            f'<figure class="strip">{"".join(images)}<figcaption>{html.escape(caption[:60])}'
            f"<br>{html.escape(_verdict(row, 'prompt'))}<br>"
            f"{html.escape(_verdict(row, 'trigger'))}</figcaption></figure>"
        )
    return line + "".join(strips)


def _bars(rates: list[dict]) -> tuple[list[float], list[list[float]]]:
    """Heights and (below, above) error-bar lengths of rates, from their 95% intervals."""
    heights = [r["rate"] for r in rates]
    errors = [[r["rate"] - r["ci95"][0] for r in rates], [r["ci95"][1] - r["rate"] for r in rates]]
    return heights, errors


def _plots(results: dict) -> str:
    plots = []
    figure, axis = plt.subplots(figsize=(5, 3))
    by_kind: dict[str, list[float]] = {}
    for g in results["replication"]["generations"]:
        by_kind.setdefault(g["kind"], []).append(g["ratio"])
    for kind, ratios in by_kind.items():
        axis.hist(ratios, bins=20, range=(0, 1), alpha=0.6, label=kind)
    axis.axvline(results["replication"]["threshold"], color="k", linestyle="--")
    axis.set(xlabel="d1 / d2 (Gu et al.)", ylabel="generations", title="nearest-neighbour ratio")
    axis.legend()
    plots.append(_png(figure))

    figure, axis = plt.subplots(figsize=(5, 3))
    for name, label in (
        ("iet_mq", "IET: d1² / mean(d1²..dk²), every row"),
        ("mq_distinct_l2", "variant: d1 / mean(d1..dk), distinct"),
    ):
        fractions = results["replication"]["mq"][name]["fraction_below"]
        thresholds = [float(t) for t in fractions]
        axis.errorbar(thresholds, *_bars(list(fractions.values())), marker="o", label=label)
    axis.set(xlabel="threshold", ylabel="fraction below", title="MQ, with 95% intervals")
    axis.legend(fontsize=7)
    plots.append(_png(figure))

    rates = (results.get("benchmark") or {}).get("concept_extraction", {}).get("rates")
    if rates:
        figure, axis = plt.subplots(figsize=(5, 3))
        labels = [k.replace("_", "\n") for k in rates]
        heights, errors = _bars(list(rates.values()))
        axis.bar(labels, heights, yerr=errors, capsize=3, color="#c55")
        axis.set(ylim=(0, 1), ylabel="detector fires", title="concept extraction (95% intervals)")
        plots.append(_png(figure))
    return "".join(f'<img src="data:image/png;base64,{p}">' for p in plots)


def render_report(results: dict, output: str | Path) -> Path:
    """Write the audit page for `results` to `output` (an .html file)."""
    output = Path(output)
    summary = [[measure, value] for measure, value, _ in summary_rows(results)]
    warnings = "".join(
        f'<p class="warn">WARNING: {html.escape(w)}</p>' for w in results["warnings"]
    )
    trigger = (results.get("attacks") or {}).get("trigger")
    attacks = ""
    if trigger:
        attacks = (
            "<h2>Embedding-trigger attack (DoRI): target | prompt's generation | trigger's "
            f"generation</h2>\n{_trigger_strips(trigger)}\n"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>memguard audit</title><style>{STYLE}</style></head><body>
<h1>memguard audit</h1>
<p>model: <code>{html.escape(results["model"])}</code><br>
training data: <code>{html.escape(results["train_data"]["path"])}</code>
({results["train_data"]["num_images"]} images, sha256 {results["train_data"]["sha256"][:12]})</p>
{warnings}
<h2>Memorization beside quality</h2>{_table(HEADLINE, headline_rows(results))}
<h2>Summary</h2>{_table(["measure", "value [95% interval]"], summary)}
<h2>Most replicated generations (left) and their nearest training images (right)</h2>
{_gallery(results)}
{attacks}<h2>Distributions</h2><div class="plots">{_plots(results)}</div>
</body></html>"""
    output.write_text(page)
    return output


def comparison_table(runs: dict[str, dict]) -> dict[str, list[str]]:
    """{measure: [value of each run]} over the union of the runs' summary rows."""
    table: dict[str, list[str]] = {}
    for column, results in enumerate(runs.values()):
        for measure, value, _ in summary_rows(results):
            table.setdefault(measure, [""] * len(runs))[column] = value
    return table


def _comparison_rates(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """{measure: [rate of each run]} for the rates every run reports."""
    rates: dict[str, list[dict]] = {}
    for results in runs.values():
        for measure, _, rate in summary_rows(results):
            if rate is not None:
                rates.setdefault(measure, []).append(rate)
    return {m: r for m, r in rates.items() if len(r) == len(runs)}


def render_comparison(runs: dict[str, dict], output: str | Path) -> Path:
    """A table and a bar plot (rates with 95% intervals) of several audits side by side (e.g.
    plain vs defended)."""
    output = Path(output)
    names = list(runs)
    table = comparison_table(runs)
    rates = _comparison_rates(runs)
    measures = list(rates)
    figure, axis = plt.subplots(figsize=(8, 1 + 0.3 * len(measures) * len(names)))
    height = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        widths, errors = _bars([rates[m][i] for m in measures])
        positions = [j + i * height for j in range(len(measures))]
        axis.barh(positions, widths, height, xerr=errors, capsize=2, label=name)
    axis.set_yticks([j + 0.4 - height / 2 for j in range(len(measures))])
    axis.set_yticklabels(measures, fontsize=7)
    axis.invert_yaxis()  # in the table's order
    axis.set(xlim=(0, 1), title="rates, with 95% intervals")
    axis.legend()
    rows = [[measure, *values] for measure, values in table.items()]
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>memguard comparison</title><style>{STYLE}</style></head><body>
<h1>memguard comparison</h1>{_table(["measure", *names], rows)}
<div class="plots"><img src="data:image/png;base64,{_png(figure)}"></div></body></html>"""
    output.write_text(page)
    return output
