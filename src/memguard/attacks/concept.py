"""The learned-embedding concept-extraction attack (textual inversion, Gal et al., 2023): the
adversary of concept-level selective learning (Kothandaraman & Pytlarz, arXiv 2512.11194).

The adversary holds the trained model, frozen, and a few held-out images that show the concept.
It learns the input embedding of a placeholder word so that the model denoises those images
from captions in which the placeholder stands for the concept, then generates with prompts that
use the placeholder. If the model learned the concept, the embedding finds it even when the
concept's own name was made harmless (as gradient projection does).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from memguard.data.text import MiniLMEncoder
from memguard.diffusion import per_sample_loss, to_latents
from memguard.io import DiffusionModel
from memguard.sampling import generate

PLACEHOLDER = "*"  # a single word-piece in MiniLM's vocabulary, rare in captions


def learn_concept_embedding(
    model: DiffusionModel,
    exemplars: torch.Tensor,  # (N, 3, H, W) in [-1, 1]
    captions: list[str],  # one per exemplar, the concept written as PLACEHOLDER
    init_word: str = "logo",
    steps: int = 300,
    learning_rate: float = 5e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """The placeholder's learned input embedding (hidden,), against the frozen model."""
    encoder = model.require_text("textual inversion")
    if not isinstance(encoder, MiniLMEncoder):
        raise NotImplementedError("textual inversion is implemented for the MiniLM encoder only")
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    device = next(model.unet.parameters()).device
    exemplars = exemplars.to(device)
    x0 = to_latents(model.vae, exemplars) if model.vae is not None else exemplars
    vector = encoder.word_embedding(init_word).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x0), (min(batch_size, len(x0)),), generator=generator)
        states = encoder.encode_with_placeholder([captions[i] for i in index], PLACEHOLDER, vector)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(index),), generator=generator
        )
        noise = torch.randn(x0[index].shape, generator=generator)
        loss = per_sample_loss(
            model.unet, scheduler, x0[index.to(device)], states.to(device), timesteps.to(device),
            noise.to(device),
        ).mean()  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return vector.detach()


@torch.no_grad()
def generate_with_embedding(
    model: DiffusionModel,
    prompts: list[str],  # containing PLACEHOLDER
    vector: torch.Tensor,
    num_images: int,
    seed: int,
    sampler: str = "dpm",
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
) -> torch.Tensor:
    """Images (len(prompts) * num_images, 3, H, W) in [0, 1] with the learned word in place."""
    cond = model.encoder.encode_with_placeholder(prompts, PLACEHOLDER, vector)
    return generate(model, cond, num_images, seed, sampler, num_inference_steps, guidance_scale)
