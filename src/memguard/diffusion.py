"""The denoising objective shared by training, attacks and audits (Ho et al., 2020).

`per_sample_loss` is l_i = mean((eps_theta(x_t, t, c) - eps)^2) for each sample i, with
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (or the v-prediction target where the scheduler
asks for it), and c the UNet's conditioning arguments (`memguard.conditioning`: caption states,
class labels, or nothing for an unconditional model). Defenses reweight these per-sample
losses; attacks minimise them over embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.training_utils import compute_snr


def per_sample_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,  # (B, C, H, W) images in [-1, 1] or VAE latents
    condition: Mapping[str, torch.Tensor] | torch.Tensor,  # conditioning arguments, or text
    # states (B, L, d)
    timesteps: torch.Tensor,  # (B,) integers in [0, T)
    noise: torch.Tensor,  # (B, C, H, W) standard normal
) -> torch.Tensor:
    """Denoising loss of each sample, shape (B,); `condition`: the UNet's conditioning
    arguments per sample (`memguard.conditioning`), or a text-conditional UNet's states."""
    if isinstance(condition, torch.Tensor):
        condition = {"encoder_hidden_states": condition}
    noisy = scheduler.add_noise(x0, noise, timesteps)
    prediction = unet(noisy, timesteps, **condition).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, floor: float = 0.0
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", ICCV 2023), shape (B,): w / SNR_t for an epsilon target, w / (SNR_t + 1)
    for a v target, so that the weight the loss puts on the clean image is w either way, with
    w = min(SNR_t, gamma). A `floor` > 0 also truncates w from below, w = clip(SNR_t, floor,
    gamma) (the truncated-SNR weighting of Salimans & Ho, "Progressive Distillation for Fast
    Sampling of Diffusion Models", ICLR 2022, is floor 1 without the cap), so that the
    high-noise steps, where SNR_t -> 0, are not left out of the loss."""
    snr = compute_snr(scheduler, timesteps).float()
    clipped = snr.clamp(min=floor, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr.clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def to_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled VAE latents (posterior mean, so training is deterministic)."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def from_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents -> images in [-1, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents / vae.config.scaling_factor + shift
    return vae.decode(latents.to(vae.dtype)).sample.float()
