"""The benchmark judge per concept kind: held-out accuracy of every head and training time.

For each kind (`memguard.data.shapes.KINDS`) a judge is trained from scratch (no cache) with the
JudgeSpec given by the flags (default: the audit's judge), and measured on its own held-out
renders: every head's accuracy, and the concept head's share found among faded (opacity below
50%) and partial (half cut away) instances. A second held-out set of `--extra` renders, from a
stream the judge never saw, gives the same figures again.

    python benchmarks/judge_kinds.py --output runs/judge_kinds.json
    python benchmarks/judge_kinds.py --num_train 3000 --steps 400 --batch_size 64  # the tests'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from memguard.config import CONCEPT_KINDS
from memguard.io import write_json
from memguard.metrics.judge import JudgeSpec, accuracies, judge_data, train_judge


def measure(spec: JudgeSpec, extra: int) -> dict:
    """Train `spec`'s judge; its held-out accuracies, those on `extra` fresh renders, and the
    seconds training took."""
    start = time.perf_counter()
    net, heldout = train_judge(spec)
    seconds = time.perf_counter() - start
    images, labels = judge_data(spec, extra, stream=99)
    return {
        "heldout": heldout,
        "fresh": accuracies(net, images, labels),
        "train_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(CONCEPT_KINDS), choices=CONCEPT_KINDS)
    for f in dataclasses.fields(JudgeSpec):
        if f.name != "concept_kind":
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    parser.add_argument("--extra", type=int, default=2000, help="fresh renders measured too")
    parser.add_argument("--output", type=Path, help="JSON file for the figures")
    args = parser.parse_args()
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(JudgeSpec)
                if f.name != "concept_kind"}  # fmt: skip
    result = {}
    for kind in args.kinds:
        spec = JudgeSpec(**settings, concept_kind=kind)
        result[kind] = {"spec": dataclasses.asdict(spec), **measure(spec, args.extra)}
        print(kind, json.dumps({k: v for k, v in result[kind].items() if k != "spec"}), flush=True)
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
