"""Gradient projection on the shapes benchmark: plain training, oracle filtering, and projection
in text and feature mode, each trained with configs/benchmark.yaml and measured by `memguard
audit` (METHODS.md section 1; the issue's evaluation table).

- plain: every training image.
- oracle: the images that carry the concept removed before training (the naive alternative).
- text: `--defense projection --concept "the acme logo"` (cross-attention keys and values).
- feature: the same in feature mode, subspaces from the held-out concept exemplars, measured
  again every FEATURE_REFRESH_STEPS steps; feature_static: measured once, at the start;
  feature_no_anchors: measured once and no directions left free for the anchors (METHODS.md's
  plain GPM recipe: the directions holding 99% of the exemplars' input energy); feature_output:
  the loss gradients at each layer's output instead of its inputs, refreshed, anchors at 0.9.
- image: the gradient of the loss at the UNet's prediction projected off the concept's
  footprint in image space (where the exemplars differ from training images not naming it).

A training or audit run already present under `--runs` is reused, so the script can be resumed
and arms can be added one by one. The step-time overhead of each defended arm against plain
training is measured in one process: short runs alternate plain / text / feature, and the median
ratio of adjacent runs is reported. Writes one JSON file and prints a Markdown table.

    python benchmarks/projection_eval.py --data runs/bench/data --runs runs/bench \
        --output runs/bench/projection_eval.json

Another training seed on the same data, without the timing:

    python benchmarks/projection_eval.py --arms plain image --seed 1 --runs runs/bench_seed1 \
        --overhead_repeats 0 --output runs/bench_seed1/projection_eval.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from memguard.config import TrainConfig, build, load_yaml
from memguard.data.shapes import CONCEPT
from memguard.defenses import build_defenses
from memguard.train.trainer import Trainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "benchmark.yaml"
FEATURE_REFRESH_STEPS = 200
ARMS = ("plain", "oracle", "text", "feature_static", "feature", "feature_no_anchors",
        "feature_output", "image")  # fmt: skip


def arm_settings(arm: str, data: Path) -> dict:
    """The `memguard train` settings that make each arm (beyond the benchmark config)."""
    projection = {"defense": ["projection"], "concept": [CONCEPT]}
    feature = {
        "projection_mode": "feature",
        "concept_exemplars": str(data / "concept_exemplars"),
        "projection_refresh_steps": FEATURE_REFRESH_STEPS,
    }
    arms = {"plain": {}, "oracle": {}, "text": projection, "feature": projection | feature}
    arms["feature_static"] = arms["feature"] | {"projection_refresh_steps": 0}
    arms["feature_no_anchors"] = arms["feature_static"] | {"projection_anchor_energy": 0.0}
    arms["feature_output"] = arms["feature"] | {
        "projection_side": "output",
        "projection_anchor_energy": 0.9,
    }
    arms["image"] = projection | {
        "projection_mode": "image",
        "concept_exemplars": str(data / "concept_exemplars"),
    }
    return arms[arm]


def flags(settings: dict) -> list[str]:
    """Settings as command-line flags (lists become repeated flags)."""
    return [
        item
        for key, value in settings.items()
        for one in (value if isinstance(value, list) else [value])
        for item in (f"--{key}", str(one))
    ]


def oracle_split(train_dir: Path, output_dir: Path) -> Path:
    """A copy of the training folder without the images whose ground truth carries the concept."""
    output_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    for line in (train_dir / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        if not record["has_concept"]:
            shutil.copyfile(train_dir / record["file_name"], output_dir / record["file_name"])
            kept.append(line)
    (output_dir / "metadata.jsonl").write_text("\n".join(kept) + "\n")
    return output_dir


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def train_and_audit(arm: str, data: Path, runs: Path, config: Path, seed: int | None) -> dict:
    """Train the arm (unless its model exists) and audit it (unless audited); its results.
    `seed`: the training seed, if not the config's."""
    model = runs / arm
    memguard = [sys.executable, "-m", "memguard"]
    if not (model / "memguard.json").is_file():
        train_dir = data / "train"
        if arm == "oracle":
            train_dir = oracle_split(train_dir, runs / "oracle_data")
        run(memguard + ["train", "--config", str(config), "--train_data_dir", str(train_dir),
                        "--output_dir", str(model)] + flags(arm_settings(arm, data))
            + ([] if seed is None else ["--seed", str(seed)]))  # fmt: skip
    audit = model / "audit"
    if not (audit / "results.json").is_file():
        run(memguard + ["audit", "--model", str(model), "--train_data_dir", str(data / "train"),
                        "--output_dir", str(audit)])  # fmt: skip
    return json.loads((audit / "results.json").read_text())


def figures(results: dict) -> dict:
    """The issue's columns, from one audit."""
    benchmark = results["benchmark"]
    quality = benchmark["quality"]
    duplicated = results["replication"]["by_prompt_kind"]["duplicated"]
    defenses = results["model_training"].get("defenses") or {}
    projection = defenses.get("projection", {}) if isinstance(defenses, dict) else {}
    extraction = benchmark["concept_extraction"]
    return {
        "concept_extraction": {k: r["rate"] for k, r in extraction["rates"].items()},
        "strongest_attack": extraction["strongest_attack"],
        "strongest_rate": extraction["strongest_rate"]["rate"],
        "fid": quality["fid"],
        "kid": quality["kid_mean"],
        "attribute_accuracy": benchmark["attribute_accuracy"]["all"]["rate"],
        "attribute_accuracy_concept_captions": benchmark["attribute_accuracy_on_concept_captions"][
            "all"
        ]["rate"],
        "duplicates_replicated": duplicated["replica_rate"]["rate"],
        "leak": projection.get("leak"),
    }


def step_time_overheads(data: Path, arms: list[str], steps: int, repeats: int) -> dict:
    """Per defended arm, against plain training in this process: the median over repeats of
    (its loop time / the adjacent plain loop time) - 1, over short runs that alternate; plus,
    where the defense re-measures its subspaces every N steps, the cost of one re-measurement
    spread over N plain steps."""
    yaml = load_yaml(CONFIG)
    seconds: dict[str, list[float]] = {arm: [] for arm in ["plain", *arms]}
    refresh: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for arm in seconds:
                config = build(TrainConfig, yaml | arm_settings(arm, data) | {
                    "train_data_dir": str(data / "train"), "output_dir": f"{tmp}/{arm}-{repeat}",
                    "max_train_steps": steps, "checkpointing_steps": 10**9, "lr_warmup_steps": 0,
                })  # fmt: skip
                defenses = build_defenses(config)
                seconds[arm].append(Trainer(config, defenses).train().loop_seconds)
                for defense in defenses:
                    if getattr(defense, "refresh_steps", 0):
                        refresh[arm] = defense.report()["refresh_seconds"][0]
    plain = seconds["plain"]
    plain_step = statistics.median(plain) / steps
    result: dict = {"steps": steps, "seconds": seconds, "refresh_seconds": refresh}
    for arm in arms:
        step = statistics.median(t / p - 1.0 for t, p in zip(seconds[arm], plain, strict=True))
        every = arm_settings(arm, data).get("projection_refresh_steps", 0)
        spread = refresh[arm] / (every * plain_step) if arm in refresh else 0.0
        result[arm] = {"per_step": step, "refresh": spread, "total": step + spread}
    return result


def table(rows: dict) -> str:
    attacks = ("naming_prompts", "paraphrases", "learned_embedding", "generic_base_rate")
    header = ["arm", *attacks, "FID", "KID", "attr. acc.", "attr. acc. concept captions",
              "duplicates replicated", "leak"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, row in rows.items():
        rates = [f"{row['concept_extraction'].get(a, float('nan')):.1%}" for a in attacks]
        leak = "" if row["leak"] is None else f"{row['leak']:.1e}"
        lines.append("| " + " | ".join([arm, *rates, f"{row['fid']:.2f}", f"{row['kid']:.4f}",
                     f"{row['attribute_accuracy']:.1%}",
                     f"{row['attribute_accuracy_concept_captions']:.1%}",
                     f"{row['duplicates_replicated']:.1%}", leak]) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/bench/data"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench"))
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--seed", type=int, help="training seed (default: the config's)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--overhead_steps", type=int, default=40)
    parser.add_argument("--overhead_repeats", type=int, default=3, help="0: skip the timing")
    parser.add_argument("--output", type=Path, default=Path("runs/bench/projection_eval.json"))
    args = parser.parse_args()

    rows = {
        arm: figures(train_and_audit(arm, args.data, args.runs, args.config, args.seed))
        for arm in args.arms
    }
    result = {
        "data": str(args.data.resolve()),
        "config": str(args.config),
        "seed": args.seed,
        "arms": rows,
    }
    defended = [arm for arm in args.arms if arm_settings(arm, args.data)]
    if defended and args.overhead_repeats > 0:
        result["step_time_overhead"] = step_time_overheads(
            args.data, defended, args.overhead_steps, args.overhead_repeats
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    if "step_time_overhead" in result:
        overheads = result["step_time_overhead"]
        print("step-time overhead vs plain: " + ", ".join(
            f"{arm} {overheads[arm]['total']:+.1%}" for arm in defended))  # fmt: skip


if __name__ == "__main__":
    main()
