"""A quick probe of a trained benchmark model, for choosing the training recipe: does it follow
the attribute words, does it replicate the planted duplicates, and does it decide the
background at the first sampling step?

The last figure is the diagnosis of the benchmark's seed failure. At the first step of
DPM-Solver++ (t = 999 of the cosine schedule, abar = 0.006) the model's estimate of the clean
image, x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) for an epsilon model and
sqrt(abar) x_t - sqrt(1 - abar) v for a v-prediction model (Salimans & Ho, 2022), is little
more than the background; the probe reads its corners and names the nearest of the three
backgrounds. An epsilon model is trained with weight SNR_t on the clean image, about zero at
these steps, so whether it learns there to follow the background words is left to chance.

Measures (guided sampling at the audit's scale or `--guidance_scale`, 50 DPM-Solver++
steps, seeds 0..3): attribute accuracy of the judge on 20 ordinary training captions (drawn
with random.Random(0)) x 4 images; duplicated captions x 4 replicated (Gu et al., copies
merged); the first step's background.
Writes `recipe_probe.json` (`recipe_probe-gS.json` at another scale S) into the model folder and
prints it.

    memguard train --config configs/benchmark.yaml --train_data_dir DATA/train --output_dir M \\
        --seed 1 --max_train_steps 1000 --prediction_type epsilon --snr_gamma 0
    python benchmarks/recipe_probe.py M DATA
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch

from memguard.config import AuditConfig
from memguard.data.folder import ImageFolderDataset
from memguard.data.shapes import BACKGROUNDS
from memguard.io import DiffusionModel, load_model, write_json
from memguard.metrics.judge import JudgeSpec, load_judge
from memguard.metrics.quality import attribute_accuracy, caption_attributes
from memguard.metrics.replication import gu_replication
from memguard.sampling import generate, initial_noise, make_sampler

STEPS, IMAGES = 50, 4
AUDIT_GUIDANCE = next(
    f.default for f in dataclasses.fields(AuditConfig) if f.name == "guidance_scale"
)


@torch.no_grad()
def first_step_backgrounds(
    model: DiffusionModel, prompts: list[str], guidance_scale: float
) -> list[str]:
    """The background each prompt's guided clean-image estimate shows at the first sampling
    step, from IMAGES starts: the nearest background colour to its corners' mean."""
    schedule = make_sampler("dpm", model.scheduler_config)
    schedule.set_timesteps(STEPS)
    t = schedule.timesteps[0]
    x = initial_noise(model.sample_shape, 0, IMAGES).repeat(len(prompts), 1, 1, 1)
    cond = model.encoder.encode(prompts).repeat_interleave(IMAGES, 0)
    uncond = model.encoder.encode([""])[0].expand_as(cond)
    conditional = model.unet(x, t, encoder_hidden_states=cond).sample
    unconditional = model.unet(x, t, encoder_hidden_states=uncond).sample
    guided = unconditional + guidance_scale * (conditional - unconditional)
    abar = torch.tensor(schedule.alphas_cumprod[int(t)])
    if model.scheduler_config["prediction_type"] == "v_prediction":
        clean = abar.sqrt() * x - (1 - abar).sqrt() * guided
    else:
        clean = (x - (1 - abar).sqrt() * guided) / abar.sqrt()
    image = (clean.clamp(-1, 1) + 1) / 2 * 255
    corners = [image[:, :, :3, :3], image[:, :, -3:, :3], image[:, :, :3, -3:]]
    mean = torch.cat([c.flatten(2) for c in corners], dim=2).mean(dim=2)  # (N, 3)
    names = list(BACKGROUNDS)
    colours = torch.tensor([BACKGROUNDS[name] for name in names], dtype=torch.float32)
    return [names[i] for i in torch.cdist(mean, colours).argmin(dim=1).tolist()]


def probe(model_dir: Path, data_dir: Path, guidance_scale: float = AUDIT_GUIDANCE) -> dict:
    model = load_model(model_dir, device="cpu")
    train = ImageFolderDataset(data_dir / "train", model.image_size)
    groups = train.column("duplicate_group")
    duplicated = list(
        dict.fromkeys(c for c, g in zip(train.captions, groups, strict=True) if g >= 0)
    )
    others = sorted({c for c, g in zip(train.captions, groups, strict=True) if g < 0})
    ordinary = sorted(random.Random(0).sample(others, 20))
    images = generate(
        model,
        duplicated + ordinary,
        IMAGES,
        0,
        guidance_scale=guidance_scale,
        num_inference_steps=STEPS,
    )
    replicas = gu_replication(images.flatten(1), train.stacked().float().div(255).flatten(1))
    count = len(duplicated) * IMAGES
    judge = load_judge(JudgeSpec(image_size=model.image_size))
    prompts = [p for p in ordinary for _ in range(IMAGES)]
    backgrounds = first_step_backgrounds(model, ordinary, guidance_scale)
    asked = [caption_attributes(p)["background"] for p in prompts]
    return {
        "model": str(model_dir.resolve()),
        "guidance_scale": guidance_scale,
        "duplicates_replicated": float(replicas.is_replica[:count].double().mean()),
        "ordinary_replicated": float(replicas.is_replica[count:].double().mean()),
        "attribute_accuracy": attribute_accuracy(prompts, judge.predict(images[count:])),
        "first_step_background_accuracy": sum(
            a == b for a, b in zip(backgrounds, asked, strict=True)
        )
        / len(asked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a trained benchmark model folder")
    parser.add_argument("data", type=Path, help="its benchmark data folder (with train/)")
    parser.add_argument(
        "--guidance_scale", type=float, default=AUDIT_GUIDANCE, help="default: the audit's"
    )
    args = parser.parse_args()
    result = probe(args.model, args.data, args.guidance_scale)
    scale = "" if args.guidance_scale == AUDIT_GUIDANCE else f"-g{args.guidance_scale:g}"
    name = "recipe_probe" + scale
    write_json(args.model / f"{name}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
