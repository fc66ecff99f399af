"""What anti-gradient control skipped in finished runs, against the training data's ground truth.

AGC (the AGC of IET-AGC+, Liu et al., "Iterative Ensemble Training with Anti-Gradient Control
for Mitigating Memorization in Diffusion Models", ECCV 2024) skips a sample whose loss falls
below a fraction of the running mean at its timestep; each run's `memguard.json` records, per
AGC instance (one per proxy under `--strategy iet`), the skip rate and the samples skipped most
often. This script tallies those most-skipped samples by a metadata column of the run's training
folder (default `kind`: on the shapes benchmark `duplicate` marks the planted copies) beside the
column's share of the whole training set, so that "AGC skips the memorized samples" is a number:

    python benchmarks/agc_skips.py runs/bench-iet/runs/iet_agc_plus/seed-0 --output skips.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from memguard import io
from memguard.data.folder import read_metadata


def agc_reports(run: Path, metadata: dict) -> list[dict]:
    """Every AGC report of the run's `metadata` (one per IET proxy, or the run's one)."""
    for defense in metadata.get("defenses", []):
        if defense["name"] == "agc":
            report = defense["report"]
            return report.get("proxies", [report])
    raise SystemExit(f"{run / 'memguard.json'}: the run has no agc defense")


def tally(run: Path, column: str) -> dict:
    metadata = io.read_metadata(run)
    if not metadata:
        raise SystemExit(f"{run}: no memguard.json (not a finished memguard run)")
    train = metadata["data"]["train_data_dir"]
    values = [record.columns.get(column) for record in read_metadata(train, caption_column=None)]
    reports = agc_reports(run, metadata)
    most = [values[entry["index"]] for report in reports for entry in report["most_skipped"]]
    seen = sum(report["samples_seen"] for report in reports)
    return {
        "train_data_dir": train,
        "column": column,
        "skip_rate": sum(report["samples_skipped"] for report in reports) / seen,
        "skip_rate_per_instance": [report["skip_rate"] for report in reports],
        "most_skipped": len(most),
        "most_skipped_by_value": dict(Counter(map(str, most)).most_common()),
        "training_set_share_by_value": {
            str(value): count / len(values) for value, count in Counter(values).most_common()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (memguard.json)")
    parser.add_argument("--column", default="kind", help="metadata column to tally by")
    parser.add_argument("--output", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    results = {str(run): tally(run, args.column) for run in args.runs}
    print(json.dumps(results, indent=2))
    if args.output:
        io.write_json(args.output, results)


if __name__ == "__main__":
    main()
