"""How many steps DoRI's embedding-trigger attack needs on a memorized image and on one that is
not (Kowalczuk et al., arXiv 2507.16880: non-memorized images need far more, > 500 on Stable
Diffusion), on a model trained on the shapes benchmark.

Runs `memguard attack trigger` (the same attack, settings and recovery criterion) twice on the
model: on the planted duplicates (`prompts/memorized.txt` of the data) and on as many ordinary
training images (the first in the training folder, without the concept), each seen about 135
times under captions shared with other images, with a budget of `--steps` and a check every
`--check_every`. Writes each attack's folder under `--output_dir` and `trigger_steps.json`: per
group the targets recovered within the budget and the median of the steps they needed (a
target not recovered counts as more than the budget), and the ratio of the medians
(a lower bound when the ordinary images' median is beyond the budget). With `--locality`, DoRI's
locality analysis of the memorized images' triggers too (`memguard attack trigger --locality`
with the attack's own 50 steps, 4 Gaussian starts per image): its summary goes in.

    python benchmarks/trigger_steps.py runs/bench-dori/runs/nemo/seed-0 \\
        runs/bench-dori/data/seed-0 --output_dir runs/trigger_steps/seed-0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from memguard.attacks.trigger import run_trigger_attack
from memguard.config import TriggerConfig
from memguard.data.shapes import MEMORIZED_FILE
from memguard.io import write_json

RESULTS = "trigger_steps.json"


def ordinary_targets(data: Path, count: int, output: Path) -> Path:
    """A target list of the first `count` ordinary training images without the concept."""
    lines = (data / "train" / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    chosen = [r for r in rows if r["kind"] == "ordinary" and not r["has_concept"]][:count]
    output.mkdir(parents=True, exist_ok=True)
    listing = output / "ordinary_targets.txt"
    train = (data / "train").resolve()
    listing.write_text("".join(f"{train / r['file_name']}\t{r['text']}\n" for r in chosen))
    return listing


def summarize(results: dict, budget: int) -> dict:
    """Recovered within the budget, and the steps needed (None: beyond the budget)."""
    steps = [row["steps_to_replicate"] for row in results["targets"]]
    median = statistics.median(math.inf if s is None else s for s in steps)
    return {
        "targets": len(steps),
        "recovered": sum(s is not None for s in steps),
        "steps_to_replicate": steps,
        "median_steps": None if median == math.inf else median,
        "budget": budget,
    }


def median_ratio(ordinary: dict, memorized: dict) -> dict:
    """Median steps of the ordinary images over the memorized ones; a lower bound (the budget
    over the memorized median) when the ordinary median is beyond the budget."""
    below, above = memorized["median_steps"], ordinary["median_steps"]
    if not below:  # none recovered, or the prompt's own states already replicate (0 steps)
        return {"median_ratio": None, "median_ratio_is_lower_bound": False}
    if above is None:
        return {"median_ratio": ordinary["budget"] / below, "median_ratio_is_lower_bound": True}
    return {"median_ratio": above / below, "median_ratio_is_lower_bound": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder trained on the shapes benchmark")
    parser.add_argument("data", help="its benchmark data folder (train/, prompts/)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--check_every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--locality", action="store_true",
        help="also DoRI's locality analysis of the memorized images' triggers (4 Gaussian starts)",
    )  # fmt: skip
    args = parser.parse_args()
    data, output = Path(args.data), Path(args.output_dir)
    memorized = data / "prompts" / MEMORIZED_FILE
    count = sum(1 for line in memorized.read_text().splitlines() if line.strip())
    groups = {"memorized": memorized, "ordinary": ordinary_targets(data, count, output)}
    summary = {}
    for name, images in groups.items():
        config = TriggerConfig(
            model=args.model, images=str(images), output_dir=str(output / name),
            train_data_dir=str(data / "train"), steps=args.steps,
            check_every=args.check_every, seed=args.seed, device=args.device,
        )  # fmt: skip
        summary[name] = summarize(run_trigger_attack(config), args.steps)
    if args.locality:  # the attack as the audit runs it (50 steps), from 4 Gaussian starts
        config = TriggerConfig(
            model=args.model, images=str(memorized), output_dir=str(output / "locality"),
            train_data_dir=str(data / "train"), seed=args.seed, device=args.device,
            locality=True,
        )  # fmt: skip
        locality = run_trigger_attack(config)["locality"]
        summary["locality"] = {key: locality[key] for key in ("starts", "recovered", "summary")}
    record = {"model": args.model, "data": str(data), "settings": vars(args), **summary,
              **median_ratio(summary["ordinary"], summary["memorized"])}  # fmt: skip
    write_json(output / RESULTS, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
