"""What iterative ensemble training costs against plain training at the same sample budget.

IET-AGC (Liu et al., ECCV 2024, arXiv 2407.15328) trains K proxy models on disjoint shards and
averages them in rounds; memguard's `--strategy iet` counts every proxy's optimizer steps in
`max_train_steps`, so at equal settings it trains on as many samples as plain training. This
script trains the benchmark recipe (`configs/benchmark.yaml`, shortened to `--steps`) on the
shapes data, alternating plain training, IET with K proxies, and IET-AGC+ (IET with AGC,
memory-sample redistribution and threshold-aware augmentation, which trains on its augmented
batches on top of the budget), each in a fresh `memguard train` process so that its peak
memory is its own. For each it reads the run's `memguard.json`: the training loop's wall time
(the averaging and the proxies' bookkeeping included) and the process's peak memory (resident;
on a GPU also what torch allocated there). Writes JSON with the medians and the ratios to plain.

    python benchmarks/iet_cost.py --output runs/iet_cost.json
    python benchmarks/iet_cost.py --arms plain iet --steps 160 --output runs/iet_cost_iet.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from memguard.config import ShapesConfig
from memguard.data.shapes import make_shapes_dataset
from memguard.io import write_json

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "benchmark.yaml"


def arms(num_proxies: int, rounds: int) -> dict[str, list[str]]:
    """Each arm's `memguard train` flags on top of the recipe."""
    iet = ["--strategy", "iet", "--num_proxies", str(num_proxies), "--rounds", str(rounds)]
    plus = ["--defense", "agc", "--redistribute", "0.2", "--augment", "taa"]
    return {"plain": [], "iet": iet, "iet_agc_plus": iet + plus}


def train(data: Path, output: Path, steps: int, flags: list[str]) -> dict:
    """One run in its own process; the figures its memguard.json records."""
    command = [
        sys.executable, "-m", "memguard", "train", "--config", str(RECIPE),
        "--train_data_dir", str(data), "--output_dir", str(output),
        "--max_train_steps", str(steps), "--checkpointing_steps", str(10**9), *flags,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    metadata = json.loads((output / "memguard.json").read_text())
    return {"train_seconds": metadata["train_seconds"], **metadata["peak_memory"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=320, help="optimizer steps of every arm")
    parser.add_argument("--num_proxies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=["plain", "iet", "iet_agc_plus"])
    parser.add_argument("--output", default="runs/iet_cost.json")
    args = parser.parse_args()

    flags = {name: extra for name, extra in arms(args.num_proxies, args.rounds).items()
             if name in args.arms}  # fmt: skip
    if "plain" not in flags:
        parser.error("--arms: the ratios need plain")
    runs: dict[str, list[dict]] = {name: [] for name in flags}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_shapes_dataset(ShapesConfig(output_dir=f"{tmp}/data")) / "train"
        for repeat in range(args.repeats):
            for name, extra in flags.items():
                run = train(data, Path(tmp) / f"{name}-{repeat}", args.steps, extra)
                runs[name].append(run)
                print(f"repeat {repeat} {name}: {json.dumps(run)}", flush=True)

    medians = {
        name: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
        for name, measured in runs.items()
    }
    result = {
        "benchmark": "IET against plain training at the same sample budget, one process",
        "recipe": str(RECIPE.name),
        "steps": args.steps,
        "num_proxies": args.num_proxies,
        "rounds": args.rounds,
        "runs": runs,
        "medians": medians,
        "ratio_to_plain": {
            name: {key: value / medians["plain"][key] for key, value in figures.items()}
            for name, figures in medians.items()
            if name != "plain"
        },
    }
    write_json(args.output, result)
    print(json.dumps({key: result[key] for key in ("medians", "ratio_to_plain")}, indent=2))


if __name__ == "__main__":
    main()
