"""Speed of memguard's training loop against a bare PyTorch loop on the same work.

Both train the same preset UNet (same initial weights) with AdamW on the same batch size, from
the shapes benchmark at 16 px with MiniLM caption states. The bare loop holds every image and
caption embedding in one tensor and does only: sample a batch, add noise, forward, MSE,
backward, step. memguard's loop adds its data loader, the global-batch random draws, caption
dropout, the defense hooks (none attached), the learning-rate schedule, progress bar and log.
Gradient clipping is off in both. With `--defense`, memguard's loop also runs with that
defense attached, which gives the defense's step-time overhead against plain training in the
same run. Runs alternate (bare, ours, ours + defense, bare, ...). Two estimates of the speed
ratio are written: best of each, and the median over repeats of the ratio of adjacent runs
(robust to the machine's load drifting during the benchmark).

    python benchmarks/loop_speed.py --output runs/loop_speed.json
    python benchmarks/loop_speed.py --defense projection --set concept="the acme logo" \
        --output runs/loop_speed_projection.json
    python benchmarks/loop_speed.py --defense projection --set concept="the acme logo" \
        --set projection_mode=patch --set concept_exemplars={data}/concept_exemplars \
        --output runs/loop_speed_patch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memguard.config import ShapesConfig, TrainConfig
from memguard.data.folder import ImageFolderDataset
from memguard.data.shapes import make_shapes_dataset
from memguard.data.text import CaptionEmbeddings, MiniLMEncoder
from memguard.defenses.registry import build_training
from memguard.io import write_json
from memguard.models import build_unet, noise_scheduler
from memguard.train.trainer import Trainer


def bare_loop(data_dir: Path, config: TrainConfig) -> float:
    """Seconds for `config.max_train_steps` steps of the plainest possible loop."""
    dataset = ImageFolderDataset(data_dir, config.resolution)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    embeddings = CaptionEmbeddings(MiniLMEncoder(config.max_text_length), dataset.captions)
    states = embeddings.table[embeddings.rows(dataset.captions)]  # (N, L, d)
    torch.manual_seed(config.seed)
    unet = build_unet(config.scratch("model_preset"), config.resolution, MiniLMEncoder.hidden_size)
    scheduler = noise_scheduler(
        config.scratch("num_train_timesteps"), config.scratch("beta_schedule")
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay
    )
    unet.train()
    start = time.perf_counter()
    for _ in range(config.max_train_steps):
        index = torch.randint(0, len(images), (config.train_batch_size,))
        x0, noise = images[index], torch.randn_like(images[index])
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),))
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=states[index]).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def our_loop(settings: dict) -> float:
    config, defenses = build_training(settings, source="loop_speed")
    result = Trainer(config, defenses).train()
    assert result.steps_run == config.max_train_steps
    return result.loop_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--defense", help="also time memguard's loop with this defense")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a setting of the defense (repeatable), e.g. concept='the acme logo'; '{data}' "
        "in a value is the benchmark folder the script writes",
    )  # fmt: skip
    parser.add_argument("--output", default="runs/loop_speed.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = make_shapes_dataset(ShapesConfig(output_dir=f"{tmp}/data"))
        runs = []
        for repeat in range(args.repeats):
            settings = {
                "train_data_dir": str(root / "train"),
                "output_dir": f"{tmp}/ours-{repeat}",
                "model_preset": args.preset,
                "train_batch_size": args.batch_size,
                "max_train_steps": args.steps,
                "lr_warmup_steps": 0,
                "max_grad_norm": 0.0,
                "checkpointing_steps": 10**9,
            }
            run = {
                "bare_seconds": bare_loop(root / "train", TrainConfig(**settings)),
                "ours_seconds": our_loop(settings),
            }
            if args.defense:
                defended = settings | {
                    "output_dir": f"{tmp}/defended-{repeat}",
                    "defense": [args.defense],
                }
                for item in args.set:
                    key, value = item.split("=", 1)
                    value = value.replace("{data}", str(root))
                    repeated = key == "concept"  # a flag that may be given several times
                    defended[key] = [*defended.get(key, []), value] if repeated else value
                run["defended_seconds"] = our_loop(defended)
            runs.append(run)
            print(f"repeat {repeat}: " + json.dumps(run), flush=True)

    best = {key: min(r[key] for r in runs) for key in runs[0]}
    best_bare, best_ours = best["bare_seconds"], best["ours_seconds"]
    result = {
        "benchmark": "training loop speed, memguard Trainer vs bare PyTorch loop",
        "preset": args.preset,
        "resolution": 16,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "bare_images_per_second": args.steps * args.batch_size / best_bare,
        "ours_images_per_second": args.steps * args.batch_size / best_ours,
        "speed_ratio": best_bare / best_ours,  # ours as a fraction of the bare loop's speed
        "speed_ratio_median_of_pairs": statistics.median(
            r["bare_seconds"] / r["ours_seconds"] for r in runs
        ),
    }
    if args.defense:
        result["defense"] = args.defense
        result["defense_step_time_overhead"] = best["defended_seconds"] / best_ours - 1.0
        result["defense_step_time_overhead_median_of_pairs"] = statistics.median(
            r["defended_seconds"] / r["ours_seconds"] - 1.0 for r in runs
        )
    write_json(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
