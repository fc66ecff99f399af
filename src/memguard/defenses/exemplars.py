"""Images a projection is measured on: held-out exemplars of the concept, and as many training
images whose captions name none of the concepts (the anchors), as the model takes them (pixels
in [-1, 1], or VAE latents) with their caption states.

Feature mode measures each layer's inputs on both (`memguard.defenses.feature_subspace`); image
mode tests where they differ (the concept's footprint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memguard.data.folder import ImageFolderDataset
from memguard.defenses.base import TrainingContext
from memguard.diffusion import to_latents


@dataclass(frozen=True)
class ExemplarSource:
    """Where the exemplars and anchors come from, and how to read them."""

    exemplars: str  # image folder (metadata.jsonl) showing the concept
    anchors: str  # the training folder: anchors are its images whose captions name no concept
    resolution: int
    seed: int = 0  # which anchors are drawn


@dataclass
class MeasuredImages:
    """Images as the model takes them, and their caption states."""

    x0: torch.Tensor  # (N, C, H, W) pixels in [-1, 1], or VAE latents
    states: torch.Tensor  # (N, L, d) their caption states


def exemplar_images(
    source: ExemplarSource,
    concepts: tuple[str, ...],
    ctx: TrainingContext,
    with_anchors: bool,
    anchors_per_exemplar: int = 1,
) -> tuple[MeasuredImages, MeasuredImages | None]:
    """The concept exemplars and, `with_anchors`, `anchors_per_exemplar` times as many
    training images whose captions name none of the `concepts` (a seeded choice, as many as
    there are when fewer), encoded with the run's text encoder and VAE."""
    if ctx.text_encoder is None:
        raise ValueError("measuring exemplars needs the run's text encoder in the context")

    def measured(images: ImageFolderDataset, indices: list[int]) -> MeasuredImages:
        x0 = torch.stack([images[i]["pixel_values"] for i in indices])
        if ctx.vae is not None:
            x0 = to_latents(ctx.vae, x0.to(ctx.vae.device)).cpu()
        return MeasuredImages(x0, ctx.text_encoder.encode([images.captions[i] for i in indices]))

    folder = ImageFolderDataset(source.exemplars, source.resolution)
    concept = measured(folder, list(range(len(folder))))
    if not with_anchors:
        return concept, None
    train = ImageFolderDataset(source.anchors, source.resolution)
    plain = [i for i, c in enumerate(train.captions) if not any(k in c for k in concepts)]
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(source.seed))
    chosen = order[: anchors_per_exemplar * len(folder)].tolist()
    return concept, measured(train, [plain[i] for i in chosen])
