"""Sampling with classifier-free guidance (Ho & Salimans, 2022) and DDIM (Song et al., 2021) or
DPM-Solver++ (Lu et al., 2022) steps, from a memguard model folder or a diffusers one.

Image j of every prompt starts from the noise of `seed + j`, so the same seed gives the same
images, and different prompts are compared from the same starting points. A prompt is what the
model is conditioned on (`memguard.conditioning`): a caption, a class label (its value in the
class column, as a string), or, for an unconditional model (Ho et al., 2020), the empty prompt
"" alone, without guidance. Generations are written as an image folder (PNG + `metadata.jsonl`
with the prompt as `text`), which is what the audit reads, plus a grid for people.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from tqdm.auto import tqdm

from memguard.diffusion import from_latents
from memguard.io import DiffusionModel, atomic_path


def make_sampler(name: str, scheduler_config: dict):
    """A fresh sampling scheduler with the training noise schedule ('ddim' or 'dpm')."""
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config, clip_sample=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++"
        )
    raise ValueError(f"scheduler: unknown sampler {name!r} (ddim or dpm)")


def initial_noise(shape: tuple[int, ...], seed: int, count: int) -> torch.Tensor:
    """(count, *shape): image j starts from the noise of generator seed + j."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed + j))
            for j in range(count)
        ]
    )


def as_noise(schedule, predictions: tuple[torch.Tensor, ...], x: torch.Tensor, t) -> tuple:
    """Model outputs at x_t as noise predictions: eps = sqrt(abar) v + sqrt(1 - abar) x_t for
    a v-prediction model, unchanged for an epsilon one."""
    if schedule.config.prediction_type != "v_prediction":
        return predictions
    abar = schedule.alphas_cumprod[int(t)].to(x.device, x.dtype)
    return tuple(abar.sqrt() * v + (1 - abar).sqrt() * x for v in predictions)


def _rows(arguments: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The conditioning arguments of `rows`."""
    return {key: value[rows] for key, value in arguments.items()}


@torch.no_grad()
def denoise(
    model: DiffusionModel,
    noise: torch.Tensor,  # (B, C, H, W)
    cond: dict[str, torch.Tensor],  # the UNet's conditioning arguments, B rows each
    uncond: dict[str, torch.Tensor],  # those of the unconditional branch, 1 row each
    sampler: str = "dpm",
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from `noise`; images in [0, 1], shape (B, 3, H', W').

    `on_step(i, unconditional, conditional)` sees both noise predictions of step i as noise
    (epsilon) predictions, whatever the model predicts (guided sampling only); memorization
    detection reads them there. An unconditional model (no arguments) is never guided.
    """
    device = next(model.unet.parameters()).device
    schedule = make_sampler(sampler, model.scheduler_config)
    schedule.set_timesteps(num_inference_steps)
    x = noise.to(device) * schedule.init_noise_sigma
    guided = guidance_scale != 1.0 and bool(cond)
    arguments = {key: value.to(device) for key, value in cond.items()}
    if guided:
        arguments = {
            key: torch.cat([uncond[key].to(device).expand_as(value), value])
            for key, value in arguments.items()
        }
    for i, t in enumerate(schedule.timesteps):
        inputs = schedule.scale_model_input(torch.cat([x, x]) if guided else x, t)
        prediction = model.unet(inputs, t, **arguments).sample
        if guided:
            unconditional, conditional = prediction.chunk(2)
            if on_step is not None:
                on_step(i, *as_noise(schedule, (unconditional, conditional), x, t))
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        x = schedule.step(prediction, t, x).prev_sample
    if model.vae is not None:
        x = from_latents(model.vae, x)
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


def images_per_prompt(num_images: int | Sequence[int], num_prompts: int) -> list[int]:
    """One count per prompt: `num_images` for every prompt, or the counts given."""
    counts = [num_images] * num_prompts if isinstance(num_images, int) else list(num_images)
    if len(counts) != num_prompts:
        raise ValueError(f"{len(counts)} image counts for {num_prompts} prompts")
    return counts


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts: list[str] | torch.Tensor,  # captions, classes or [""]; or text states (P, L, d)
    num_images: int | Sequence[int],
    seed: int,
    sampler: str = "dpm",
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Images (sum of the per-prompt counts, 3, H, W) in [0, 1], prompt-major; `num_images`:
    per prompt, or one count for each prompt; `prompts` may be text states already computed
    (a learned embedding, say)."""
    conditioning = model.conditioning
    if isinstance(prompts, list):
        cond = conditioning.model_inputs(prompts)
    else:
        cond = {"encoder_hidden_states": prompts}
    uncond = conditioning.null_inputs(1)
    counts = images_per_prompt(num_images, len(prompts))
    noise = initial_noise(model.sample_shape, seed, max(counts))
    jobs = [(p, j) for p in range(len(prompts)) for j in range(counts[p])]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc="sample"):
        chunk = jobs[start : start + batch_size]
        images.append(
            denoise(
                model,
                noise[[j for _, j in chunk]],
                _rows(cond, [p for p, _ in chunk]),
                uncond,
                sampler,
                num_inference_steps,
                guidance_scale,
            )
        )
    return torch.cat(images)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image."""
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def grid(images: torch.Tensor, columns: int, cell: int = 64) -> Image.Image:
    """A grid of images, upscaled (nearest) so small ones are visible."""
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (cell + 2), rows * (cell + 2)), (255, 255, 255))
    for i, image in enumerate(images):
        tile = to_pil(image).resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, ((i % columns) * (cell + 2) + 1, (i // columns) * (cell + 2) + 1))
    return sheet


def save_samples(
    images: torch.Tensor,
    prompts: list[str],
    num_images: int | Sequence[int],
    seed: int,
    output_dir: str | Path,
) -> Path:
    """Write PNGs, `metadata.jsonl` (file_name, text, seed, image_index) and `grid.png` (a row
    per prompt); `num_images`: per prompt, or one count for each prompt, as generated."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = images_per_prompt(num_images, len(prompts))
    places = [(p, j) for p, count in enumerate(counts) for j in range(count)]
    columns = max(counts)
    sheet = torch.ones(len(prompts) * columns, *images.shape[1:])  # white where a row is short
    rows = []
    for image, (p, j) in zip(images, places, strict=True):
        file_name = f"{p:04d}_{j:02d}.png"
        to_pil(image).save(output_dir / file_name)
        sheet[p * columns + j] = image
        rows.append(
            {"file_name": file_name, "text": prompts[p], "seed": seed + j, "image_index": j}
        )
    with atomic_path(output_dir / "metadata.jsonl") as partial:
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    grid(sheet, columns=columns).save(output_dir / "grid.png")
    return output_dir
