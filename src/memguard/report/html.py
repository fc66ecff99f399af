"""An offline HTML page from an audit's `results.json` alone, and a side-by-side comparison.

The page holds a summary table, a gallery of the most replicated generations beside their
nearest training images (read from the folders that results.json names), histograms of the
Gu ratio and the MQ curve, and concept-extraction bars. Plots are matplotlib PNGs and images
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

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 4px 12px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f4f4; } .warn { color: #b00; font-weight: bold; }
.pair { display: inline-block; margin: 6px; text-align: center; font-size: 0.8em; }
.pair img { image-rendering: pixelated; width: 96px; height: 96px; border: 1px solid #ccc; }
.plots img { max-width: 48%; }
"""


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


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def summary_rows(results: dict) -> list[tuple[str, str]]:
    """(measure, value) pairs: the page's table and the comparison's rows."""
    rows = []
    for kind, figures in results["replication"]["by_prompt_kind"].items():
        rows.append((f"replication, {kind} prompts", _percent(figures["replica_rate"])))
    detection = results.get("detection", {})
    if "auc" in detection:
        rows.append(("memorized-prompt detection AUC", f"{detection['auc']:.3f}"))
    if results.get("similarity"):
        rows.append(
            ("similarity to nearest training image, mean", f"{results['similarity']['mean']:.3f}")
        )
    if "inception_quality" in results:
        quality = results["inception_quality"]
        rows.append(("FID (Inception features)", f"{quality['fid']:.3f}"))
        rows.append(("KID (Inception features)", f"{quality['kid_mean']:.4f}"))
    benchmark = results.get("benchmark")
    if benchmark:
        rows.append(("FID (judge features)", f"{benchmark['quality']['fid']:.3f}"))
        rows.append(("KID (judge features)", f"{benchmark['quality']['kid_mean']:.4f}"))
        attributes = benchmark.get("attribute_accuracy", {})
        rows.append(("attribute accuracy, ordinary prompts", _percent(attributes.get("all"))))
        carried = benchmark.get("attribute_accuracy_on_concept_captions", {})
        rows.append(("attribute accuracy, concept images' captions", _percent(carried.get("all"))))
        for attack, rate in benchmark["concept_extraction"]["rates"].items():
            rows.append((f"concept extraction, {attack.replace('_', ' ')}", _percent(rate)))
    for name, report in (results.get("model_training", {}).get("defenses") or {}).items():
        if report.get("leak") is not None:
            rows.append((f"{name}: leak certificate", f"{report['leak']:.2e}"))
    return rows


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
    fractions = results["replication"]["mq"]["fraction_below"]
    axis.plot([float(t) for t in fractions], list(fractions.values()), marker="o")
    axis.set(xlabel="threshold", ylabel="fraction below", title="IET MQ: d1 / mean(d1..d50)")
    plots.append(_png(figure))

    benchmark = results.get("benchmark")
    if benchmark:
        rates = benchmark["concept_extraction"]["rates"]
        figure, axis = plt.subplots(figsize=(5, 3))
        axis.bar([k.replace("_", "\n") for k in rates], list(rates.values()), color="#c55")
        axis.set(ylim=(0, 1), ylabel="detector fires", title="concept extraction")
        plots.append(_png(figure))
    return "".join(f'<img src="data:image/png;base64,{p}">' for p in plots)


def render_report(results: dict, output: str | Path) -> Path:
    """Write the audit page for `results` to `output` (an .html file)."""
    output = Path(output)
    warnings = "".join(
        f'<p class="warn">WARNING: {html.escape(w)}</p>' for w in results["warnings"]
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>memguard audit</title><style>{STYLE}</style></head><body>
<h1>memguard audit</h1>
<p>model: <code>{html.escape(results["model"])}</code><br>
training data: <code>{html.escape(results["train_data"]["path"])}</code>
({results["train_data"]["num_images"]} images, sha256 {results["train_data"]["sha256"][:12]})</p>
{warnings}
<h2>Summary</h2>{_table(["measure", "value"], [list(r) for r in summary_rows(results)])}
<h2>Most replicated generations (left) and their nearest training images (right)</h2>
{_gallery(results)}
<h2>Distributions</h2><div class="plots">{_plots(results)}</div>
</body></html>"""
    output.write_text(page)
    return output


def comparison_table(runs: dict[str, dict]) -> dict[str, list[str]]:
    """{measure: [value of each run]} over the union of the runs' summary rows."""
    table: dict[str, list[str]] = {}
    for column, results in enumerate(runs.values()):
        for measure, value in summary_rows(results):
            table.setdefault(measure, [""] * len(runs))[column] = value
    return table


def render_comparison(runs: dict[str, dict], output: str | Path) -> Path:
    """A table and a bar plot of several audits side by side (e.g. plain vs defended)."""
    output = Path(output)
    names = list(runs)
    table = comparison_table(runs)
    figure, axis = plt.subplots(figsize=(7, 3))
    measures = [m for m in table if all(v.endswith("%") for v in table[m])]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [float(table[m][i].rstrip("%")) / 100 for m in measures]
        axis.bar([j + i * width for j in range(len(measures))], values, width, label=name)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(measures))])
    axis.set_xticklabels([m.replace(", ", "\n") for m in measures], fontsize=7)
    axis.set(ylim=(0, 1), title="rates")
    axis.legend()
    rows = [[measure, *values] for measure, values in table.items()]
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>memguard comparison</title><style>{STYLE}</style></head><body>
<h1>memguard comparison</h1>{_table(["measure", *names], rows)}
<div class="plots"><img src="data:image/png;base64,{_png(figure)}"></div></body></html>"""
    output.write_text(page)
    return output
