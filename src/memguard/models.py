"""The diffusion models memguard trains: named UNet presets, and local Stable Diffusion folders.

Presets are diffusers `UNet2DConditionModel` configs sized for a CPU, with cross-attention only
at the lowest resolution (where attention is cheap) and in the mid block:

    tiny     2 levels (16, 32) channels     tests: trains in seconds
    compact  3 levels (16, 32, 64)          the benchmark at about half bench's step time
    bench    3 levels (32, 64, 64)          the benchmark: 16 px images, memorizes duplicates
    small    3 levels (64, 128, 128)        32 px images

Without text (`--conditioning class|none`) a preset is a diffusers `UNet2DModel` of the same
channels and levels, self-attention where the text preset has cross-attention, with one
embedding per class (and a null class) for `class`: the DDPM UNet of Ho et al. (2020) that
IET-AGC trains (Liu et al., ECCV 2024).

A Stable Diffusion pipeline folder (`unet/`, `vae/`, `scheduler/`, `text_encoder/`,
`tokenizer/`) is loaded from a local path only; its UNet trains in VAE latent space, in full or
through LoRA adapters (peft) on the attention projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from memguard.config import ConfigError


def _cross_attention_last(channels: tuple[int, ...], attention_head_dim: int) -> dict:
    """A layout of len(channels) levels, cross-attention only at the lowest (and mid block)."""
    plain = len(channels) - 1
    return {
        "block_out_channels": channels,
        "down_block_types": ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",),
        "up_block_types": ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * plain,
        "attention_head_dim": attention_head_dim,
    }


PRESETS: dict[str, dict] = {
    "tiny": _cross_attention_last((16, 32), 8),
    "compact": _cross_attention_last((16, 32, 64), 32),
    "bench": _cross_attention_last((32, 64, 64), 32),
    "small": _cross_attention_last((64, 128, 128), 32),
}

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _preset(preset: str, resolution: int) -> dict:
    """A preset's layout, checked against the resolution."""
    if preset not in PRESETS:
        raise ConfigError(f"model_preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    config = PRESETS[preset]
    levels = len(config["block_out_channels"])
    if resolution % 2 ** (levels - 1):
        raise ConfigError(
            f"resolution: {resolution} is not divisible by {2 ** (levels - 1)}, "
            f"which the '{preset}' preset's {levels} levels need"
        )
    return config


def build_unet(
    preset: str, resolution: int, cross_attention_dim: int, in_channels: int = 3
) -> UNet2DConditionModel:
    """A freshly initialised text-conditional UNet of a named preset (seed torch before)."""
    config = _preset(preset, resolution)
    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        mid_block_type="UNetMidBlock2DCrossAttn",
        **config,
    )


def build_unet2d(
    preset: str, resolution: int, num_classes: int | None = None, in_channels: int = 3
) -> UNet2DModel:
    """A freshly initialised UNet of a named preset without text (seed torch before calling):
    the text preset's layout with self-attention blocks for its cross-attention ones, and
    `num_classes` + 1 class embeddings (the last the null class) when class-conditional."""
    config = _preset(preset, resolution)
    plain = {"CrossAttnDownBlock2D": "AttnDownBlock2D", "CrossAttnUpBlock2D": "AttnUpBlock2D"}
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=config["block_out_channels"],
        down_block_types=tuple(plain.get(b, b) for b in config["down_block_types"]),
        up_block_types=tuple(plain.get(b, b) for b in config["up_block_types"]),
        attention_head_dim=config["attention_head_dim"],
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def noise_scheduler(
    num_train_timesteps: int, beta_schedule: str, prediction_type: str = "epsilon"
) -> DDPMScheduler:
    """The training noise schedule of a from-scratch model."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    )


@dataclass
class StableDiffusion:
    """The trainable and frozen parts of a local Stable Diffusion pipeline."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler


def load_stable_diffusion(path: str | Path) -> StableDiffusion:
    """Load UNet, VAE and noise scheduler from a local pipeline folder (never from a hub)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--pretrained_model_name_or_path: no such folder: {path}")
    for sub in ("unet", "vae", "scheduler"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(
                f"--pretrained_model_name_or_path {path}: no '{sub}' folder "
                "(expected a diffusers Stable Diffusion pipeline folder)"
            )
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    vae.requires_grad_(False).eval()
    return StableDiffusion(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        vae=vae,
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )


def add_lora(unet: UNet2DConditionModel, rank: int) -> None:
    """Freeze the UNet and add trainable LoRA adapters of `rank` to its attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
        )
    )
