"""The cost of adversarial fine-tuning's outer step (Kowalczuk et al., arXiv 2507.16880) beside a
plain step, on the benchmark recipe (configs/benchmark.yaml: the bench UNet, 16 px, batch 64).

Both steps fine-tune the same model folder on the same batches; the adversarial one attacks
`--adv_images` memorized images per step (here the first planted duplicates, with their
captions) for each inner-step count given, batch `--adv_batch_size` (the paper's 8). Steps
alternate between the arms so that a machine's load falls on both alike; the first step of each
arm (the surrogates' generation, allocations) is not timed. Prints the median seconds per step
and the ratio to a plain step, as JSON.

    memguard data shapes --output_dir DATA
    memguard train --config configs/benchmark.yaml --train_data_dir DATA/train --output_dir M \\
        --max_train_steps 1
    python benchmarks/adversarial_step.py M DATA --inner_steps 50 10 5 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from memguard.config import SCRATCH_DEFAULTS
from memguard.data.folder import ImageFolderDataset
from memguard.defenses.registry import build_training
from memguard.distributed import Group
from memguard.train.draws import GlobalBatchSampler
from memguard.train.run import batches, build_run, make_step, step_inputs

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "benchmark.yaml"


def memorized_listing(data: Path, output: Path, count: int) -> Path:
    """A list file of the first `count` planted duplicates (one copy each, with its caption)."""
    train = ImageFolderDataset(data / "train", 16)
    groups = train.column("duplicate_group")
    seen, lines = set(), []
    for i, group in enumerate(groups):
        if group is not None and group not in seen and len(seen) < count:
            seen.add(group)
            lines.append(f"{train.records[i].path.resolve()}\t{train.captions[i]}")
    output.write_text("\n".join(lines) + "\n")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model folder trained on the benchmark")
    parser.add_argument("data", type=Path, help="the benchmark folder (with train/)")
    parser.add_argument("--inner_steps", type=int, nargs="+", default=[50, 10, 5])
    parser.add_argument("--adv_images", type=int, default=1)
    parser.add_argument("--adv_batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    args = parser.parse_args()

    recipe = {k: v for k, v in yaml.safe_load(RECIPE.read_text()).items()
              if k not in SCRATCH_DEFAULTS}  # fmt: skip
    listing = memorized_listing(args.data, args.model / "memorized.txt", args.adv_images)
    base = {
        **recipe, "train_data_dir": str(args.data / "train"), "output_dir": str(args.model),
        "pretrained_model_name_or_path": str(args.model), "lr_warmup_steps": 0,
    }  # fmt: skip
    plain_config, _ = build_training(base)
    run = build_run(plain_config, torch.device("cpu"))
    arms = {"plain": make_step(plain_config, run, copy.deepcopy(run.unet), [], Group.local(), 100)}
    for inner in args.inner_steps:
        config, defenses = build_training({
            **base, "strategy": "adversarial", "memorized": str(listing),
            "adv_inner_steps": inner, "adv_images": args.adv_images,
            "adv_batch_size": args.adv_batch_size, "output_dir": str(args.model / "adv"),
        })  # fmt: skip
        arms[f"adversarial, {inner} inner steps"] = make_step(
            config, run, copy.deepcopy(run.unet), defenses, Group.local(), 100
        )
    for step in arms.values():
        step.setup_defenses()
        step.model.train()
    sampler = GlobalBatchSampler(len(run.dataset), plain_config.train_batch_size, 0, 1, 0)
    loader = batches(plain_config, run.dataset, sampler)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for index in range(args.steps + 1):
        inputs = step_inputs(plain_config, run, loader, 0, index, Group.local(), "cpu")
        for name, step in arms.items():
            start = time.perf_counter()
            step(inputs)
            if index > 0:
                seconds[name].append(time.perf_counter() - start)
    plain = statistics.median(seconds["plain"])
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "train_batch_size": plain_config.train_batch_size,
        "adv_batch_size": args.adv_batch_size, "adv_images": args.adv_images,
        "median_seconds": {name: statistics.median(s) for name, s in seconds.items()},
        "ratio_to_plain": {name: statistics.median(s) / plain for name, s in seconds.items()},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
