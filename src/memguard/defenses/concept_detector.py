"""Where a concept is in each image: a translation-invariant patch detector trained on held-out
exemplars of the concept against images without it, for the per-image footprints of gradient
projection's patch mode (selective learning, Kothandaraman & Pytlarz, arXiv 2512.11194).

The detector is a small fully-convolutional network that scores every position of an image as
the model takes it (pixels or VAE latents) from the patch around it, so it finds the concept
wherever it is. It sees the image minus its local mean (a high-pass of the image), so that it
scores a pattern and not the colour of the background the pattern sits on: fed raw pixels, it
missed the shapes benchmark's acme hatching on 55% of its black-background images and 10% of its
white ones (`benchmarks/patch_detector.py --local_mean 0`), and none of either with the mean
of 5 x 5 positions subtracted.

It learns from image-level labels only, by multiple-instance learning (Maron & Lozano-Perez,
NeurIPS 1997; log-sum-exp pooling of Pinheiro & Collobert, CVPR 2015):
every position of an image without the concept is a negative, and an exemplar is positive when
at least one of its positions is (its positions' scores pooled by log-sum-exp). Its threshold is
calibrated on anchors it did not train on (at most `false_alarm` of them get any position above
it), and its recall is measured on held-out exemplars (the fraction in which it finds anything),
so a detector that cannot find the concept is reported before it guards nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class PatchDetector(nn.Module):
    """Scores (B, H, W) of the concept at each position of (B, C, H, W) images; each score sees
    the (2 * depth + 1)-pixel square around its position, of the image minus its mean over the
    `local_mean`-pixel square around each pixel (0: the image as it is). Borders are padded by
    replicating the edge, so that an image's edge looks like its background, not a frame."""

    def __init__(self, channels: int, width: int = 32, depth: int = 3, local_mean: int = 5) -> None:
        super().__init__()
        if local_mean < 0 or local_mean % 2 == 0 and local_mean != 0:
            raise ValueError(f"local_mean must be 0 or an odd size, got {local_mean}")
        layers: list[nn.Module] = []
        for i in range(depth):
            fan_in = channels if i == 0 else width
            layers += [nn.Conv2d(fan_in, width, 3, padding=1, padding_mode="replicate"), nn.SiLU()]
        layers.append(nn.Conv2d(width, 1, 1))
        self.net = nn.Sequential(*layers)
        self.channels, self.width, self.depth, self.local_mean = channels, width, depth, local_mean

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.local_mean:
            pad = self.local_mean // 2
            padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
            images = images - F.avg_pool2d(padded, self.local_mean, stride=1)
        return self.net(images)[:, 0]


@dataclass
class DetectorFit:
    """A trained detector, its threshold and what its held-out images say about it."""

    detector: PatchDetector
    threshold: float  # a position is the concept's when its score exceeds this
    recall: float  # held-out exemplars in which some position exceeds the threshold
    coverage: float  # mean fraction of a held-out exemplar's positions above it


def pooled_logit(scores: torch.Tensor) -> torch.Tensor:
    """(B,) image-level logits from (B, H, W) position scores: log-sum-exp pooling, normalised so
    that equal scores pool to themselves."""
    flat = scores.flatten(1)
    return torch.logsumexp(flat, dim=1) - math.log(flat.shape[1])


def _split(count: int, held_out: float, generator: torch.Generator) -> tuple[list, list]:
    order = torch.randperm(count, generator=generator).tolist()
    cut = max(1, round(count * held_out))
    if count - cut < 1:
        raise ValueError(f"the detector needs at least 2 images of each kind, got {count}")
    return order[cut:], order[:cut]


def fit_patch_detector(
    concept: torch.Tensor,  # (N, C, H, W) exemplars as the model takes them
    anchors: torch.Tensor,  # (M, C, H, W) images without the concept
    steps: int = 400,
    held_out: float = 0.25,
    false_alarm: float = 0.01,
    seed: int = 0,
    local_mean: int = 5,
) -> DetectorFit:
    """Train a `PatchDetector` on a share of the exemplars and anchors (the rest held out),
    set its threshold so that at most `false_alarm` of the held-out anchors have a position
    above it, and measure its recall on the held-out exemplars. `local_mean` is the detector's
    (`PatchDetector`). Deterministic for a seed on a device."""
    generator = torch.Generator().manual_seed(seed)
    fit_pos, test_pos = _split(len(concept), held_out, generator)
    fit_neg, test_neg = _split(len(anchors), held_out, generator)
    torch.manual_seed(seed)  # the detector's initial weights
    detector = PatchDetector(concept.shape[1], local_mean=local_mean).to(concept.device)
    optimizer = torch.optim.Adam(detector.parameters(), lr=3e-3)
    positives, negatives = concept[fit_pos].float(), anchors[fit_neg].float()
    for _ in range(steps):
        negative_scores = detector(negatives)
        image_loss = F.softplus(-pooled_logit(detector(positives))).mean()
        image_loss = image_loss + F.softplus(pooled_logit(negative_scores)).mean()
        position_loss = F.softplus(negative_scores).mean()
        optimizer.zero_grad(set_to_none=True)
        (image_loss + position_loss).backward()
        optimizer.step()
    detector.eval().requires_grad_(False)
    with torch.no_grad():
        strongest = detector(anchors[test_neg].float()).flatten(1).amax(1)
        threshold = float(torch.quantile(strongest, 1 - false_alarm))
        found = detector(concept[test_pos].float()) > threshold
    recall = float(found.flatten(1).any(1).float().mean())
    return DetectorFit(detector, threshold, recall, float(found.float().mean()))


@torch.no_grad()
def footprints(
    detector: PatchDetector, images: torch.Tensor, threshold: float, grow: int = 1
) -> torch.Tensor:
    """(B, H, W) bool: where each image shows the concept (its positions scoring above
    `threshold`), grown by `grow` pixels on every side so that its edges are covered."""
    found = (detector(images.float()) > threshold).float().unsqueeze(1)
    if grow > 0:
        found = F.max_pool2d(found, 2 * grow + 1, stride=1, padding=grow)
    return found[:, 0].bool()
