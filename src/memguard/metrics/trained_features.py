"""A feature extractor for FID/KID that needs no download: a small CNN trained on the training
folder itself, so that an audit of any data (not only the shapes benchmark, whose judge offers
features, and without a user's Inception file) has a quality figure beside its memorization
figures.

Objective: SimCLR's contrastive loss (Chen et al., "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020): two random views of each image (a random crop by a
whole-pixel shift and a horizontal flip, with mild brightness, contrast and saturation jitter,
all written with torch ops) are pulled together and pushed away from the other images of the
batch (NT-Xent, a temperature-scaled cross-entropy over cosine similarities of a projection
head's outputs); the features are taken before the projection head, as SimCLR recommends: every
conv stage's spatial mean and standard deviation per channel. Why this objective for a quality
measure: it needs no labels, it learns what distinguishes one image of the folder from another
(its content: shapes, colours, layout), and what it is not taught to ignore stays visible in its
features. Its views never add noise or blur and jitter colours only mildly (SimCLR's strong
colour distortion would make the features blind to colour shifts), so the failures of a broken
diffusion model, noise, blur, wrong colours, move generations away from the real images in this
feature space. FID (Heusel et al., NeurIPS 2017) and KID (Binkowski et al., ICLR 2018) on
learned features of the data at hand follow the practice of domain-specific FID features (e.g.
Kynkaanniemi et al., "The Role of ImageNet Classes in Frechet Inception Distance", ICLR 2023, on
how FID depends on what its features were trained to see).

Its own held-out check (`heldout_check`): FID and KID in its feature space between two random
halves of real held-out images (small: the same distribution) against those between one half
and the other half degraded (Gaussian noise, blur, a colour shift: what a broken model
produces), over several random halvings. KID, unbiased where FID is not on a few hundred
images, gives each degradation's separation in standard deviations; below `SANITY_SEPARATION`
for any of them the extractor cannot tell a broken model, and the audit says so in a warning.

The trained network is cached (`memguard.metrics.cache`) by its spec: the SHA-256 of the images
it was trained on (`memguard.data.folder.fingerprint`), its size, steps, seed and version; a
second audit of the same folder reuses it, a changed folder trains anew.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from memguard.config import ConfigError
from memguard.data.folder import ImageFolderDataset, fingerprint, unit_float
from memguard.metrics.cache import load_or_train
from memguard.metrics.quality import Images, fid_kid

SANITY_SEPARATION = 2.0  # degraded KID above the real halves', in standard deviations
SPLITS = 5  # random halvings of the held-out images the check averages over
MIN_HELDOUT = 8  # held-out images the check and the reference need, at least
MAX_FEATURE_SIZE = 32  # images are resized to at most this side: a cheap network at any size


@dataclass(frozen=True)
class ExtractorSpec:
    """Everything the trained extractor is a function of; its hash names the cached weights."""

    data_sha256: str  # the images it is trained on (`memguard.data.folder.fingerprint`)
    image_size: int
    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 3e-3
    width: int = 8
    temperature: float = 0.2
    seed: int = 0
    version: int = 1  # bump when the network, the views or the loss change

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size < 2 or self.width <= 0:
            raise ConfigError(
                f"trained feature extractor: steps ({self.steps}) and width ({self.width}) must "
                f"be positive and batch_size ({self.batch_size}) at least 2"
            )

    @property
    def feature_size(self) -> int:
        return min(self.image_size, MAX_FEATURE_SIZE)


class Encoder(nn.Module):
    """Conv stages (BatchNorm, SiLU) halving the image down to 4 px; the features are every
    stage's spatial mean and standard deviation per channel (`num_features` = 2 x the stages'
    channels): the deep stages' means carry content, the shallow stages' deviations the
    local texture that noise raises and blur lowers, which global pooling of the last stage
    alone averages away. Takes images in [0, 1] of any size (resized to `feature_size`)."""

    def __init__(self, width: int, feature_size: int) -> None:
        super().__init__()
        self.feature_size = feature_size
        halvings = max(0, int(math.log2(feature_size / 4)))
        self.stages = nn.ModuleList()
        channels_in, channels = 3, width
        for stride in [1] + [2] * halvings:
            self.stages.append(nn.Sequential(nn.Conv2d(channels_in, channels, 3, stride, 1),
                                             nn.BatchNorm2d(channels),
                                             nn.SiLU()))  # fmt: skip
            channels_in, channels = channels, 2 * channels
        self.num_features = 2 * sum(stage[0].out_channels for stage in self.stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-1] != self.feature_size or images.shape[-2] != self.feature_size:
            size = (self.feature_size, self.feature_size)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        maps, pooled = images * 2.0 - 1.0, []
        for stage in self.stages:
            maps = stage(maps)
            pooled += [maps.mean(dim=(2, 3)), maps.std(dim=(2, 3))]
        return torch.cat(pooled, dim=1)


def random_views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view per image (B, 3, H, W) in [0, 1]: a random crop by a whole-pixel shift of
    up to 1/8 of the side (reflected borders, SimCLR's crop for small images), flipped with
    probability 1/2, and mild brightness (+-0.1), contrast and saturation (x 0.8 to 1.2)
    jitter. Nothing resamples: a view is as sharp as its image, so sharpness is not something
    the features learn to ignore."""
    n, side = len(images), images.shape[-1]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    reach = max(1, side // 8)
    shifts = torch.randint(-reach, reach + 1, (n, 2), generator=generator).float()
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip, 1.0
    theta[:, :, 2] = 2 * shifts / side  # whole pixels, in grid units
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="nearest", padding_mode="reflection",
                          align_corners=False)  # fmt: skip
    views = views + uniform(-0.1, 0.1).view(n, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = mean + (views - mean) * uniform(0.8, 1.2).view(n, 1, 1, 1)
    grey = views.mean(dim=1, keepdim=True)
    views = grey + (views - grey) * uniform(0.8, 1.2).view(n, 1, 1, 1)
    return views.clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of projections, row i of each a view of image i."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


def train_extractor(
    spec: ExtractorSpec, images: ImageFolderDataset, indices: Sequence[int]
) -> Encoder:
    """SimCLR on the images at `indices` of the folder, `spec.steps` batches drawn with
    replacement; the encoder, frozen."""
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    encoder = Encoder(spec.width, spec.feature_size)
    dim = encoder.num_features
    head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, spec.learning_rate, spec.steps)
    size = (spec.feature_size, spec.feature_size)
    batch_size = min(spec.batch_size, len(indices))
    for _ in range(spec.steps):
        picked = torch.randint(0, len(indices), (batch_size,), generator=generator)
        batch = unit_float(images.stacked([indices[i] for i in picked.tolist()]))
        if batch.shape[-1] != spec.feature_size:
            batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True)
        views = [random_views(batch, generator) for _ in range(2)]
        loss = nt_xent(*(head(encoder(v)) for v in views), spec.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return encoder.eval().requires_grad_(False)


# ------------------------------------------------------------------------ held-out check


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `sigma` pixels (reflected borders), channel by channel."""
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=3), vertical, groups=3)


def degradations(seed: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """What a broken model produces, applied to real images in [0, 1]: Gaussian noise (std 0.2),
    blur (sigma 1 px, on a side of 16 px and scaled with it), a colour shift (+0.1 red, -0.1
    blue)."""

    def noise(images: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return (images + 0.2 * torch.randn(images.shape, generator=generator)).clamp(0, 1)

    def blur(images: torch.Tensor) -> torch.Tensor:
        return _blur(images, images.shape[-1] / 8)

    def colour_shift(images: torch.Tensor) -> torch.Tensor:
        return (images + torch.tensor([0.15, 0.0, -0.15]).view(1, 3, 1, 1)).clamp(0, 1)

    return {"noise": noise, "blur": blur, "colour_shift": colour_shift}


def heldout_check(
    extractor: nn.Module, heldout: torch.Tensor, seed: int = 0, splits: int = SPLITS
) -> dict:
    """Real held-out images (N, 3, H, W) in [0, 1], split into random halves `splits` times:
    FID and KID between the halves (the baseline) and between one half and the other degraded
    (`degradations`), each averaged over the splits. KID is unbiased (Binkowski et al. 2018), so
    its baseline is near 0 even on small halves, where FID's finite-sample bias is large; each
    degradation's separation is its KID's excess over the baseline in standard deviations of
    the two over the splits, and the check passes when every degradation's reaches
    `SANITY_SEPARATION`. The FID ratio (smallest degraded FID over the baseline) is recorded
    too."""
    if len(heldout) < MIN_HELDOUT:
        raise ConfigError(
            f"trained feature extractor: {len(heldout)} held-out images, the check needs at "
            f"least {MIN_HELDOUT} (give --test_data_dir, or raise --quality_holdout_fraction)"
        )
    half = len(heldout) // 2
    damage = degradations(seed)
    fid: dict[str, list[float]] = {name: [] for name in ["real", *damage]}
    kid: dict[str, list[float]] = {name: [] for name in ["real", *damage]}
    for split in range(splits):
        generator = torch.Generator().manual_seed(seed * 1000 + split)
        order = torch.randperm(len(heldout), generator=generator)
        first, second = heldout[order[:half]], heldout[order[half : 2 * half]]
        for name, images in (("real", second), *((k, d(second)) for k, d in damage.items())):
            figures = fid_kid(first, images, extractor, seed=seed)
            fid[name].append(figures["fid"])
            kid[name].append(figures["kid_mean"])
    mean = {name: float(np.mean(values)) for name, values in kid.items()}
    spread = {name: float(np.std(values, ddof=1)) for name, values in kid.items()}
    separation = {
        name: (mean[name] - mean["real"])
        / max(float(np.hypot(spread[name], spread["real"])), 1e-12)
        for name in damage
    }
    fid_real = float(np.mean(fid["real"]))
    fid_degraded = {name: float(np.mean(fid[name])) for name in damage}
    return {
        "images_per_half": half,
        "splits": splits,
        "fid_real_halves": fid_real,
        "fid_degraded": fid_degraded,
        "fid_ratio": min(fid_degraded.values()) / max(fid_real, 1e-12),
        "kid_real_halves": mean["real"],
        "kid_degraded": {name: mean[name] for name in damage},
        "separation": separation,
        "required_separation": SANITY_SEPARATION,
        "passed": min(separation.values()) >= SANITY_SEPARATION,
    }


# -------------------------------------------------------------------------- the extractor


def heldout_split(num_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of a folder of `num_images`: a seeded random `fraction`
    held out (at least one image on each side)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"quality_holdout_fraction: {fraction} is not in (0, 1)")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    count = min(num_images - 1, max(1, round(fraction * num_images)))
    return sorted(order[count:]), sorted(order[:count])


@dataclass
class TrainedFeatures:
    """A trained extractor, its spec, its held-out check, and how it came to be."""

    encoder: Encoder
    spec: ExtractorSpec
    check: dict
    training_seconds: float
    cached: bool

    def summary(self) -> dict:
        """What results.json records of the extractor."""
        return {
            "method": "SimCLR (Chen et al., ICML 2020) on the training folder, features before "
            "the projection head (every stage's spatial means and standard deviations)",
            "spec": asdict(self.spec),
            "num_features": self.encoder.num_features,
            "training_seconds": self.training_seconds,
            "loaded_from_cache": self.cached,
            "heldout_check": self.check,
        }

    def warnings(self) -> list[str]:
        """The audit's warning when the held-out check failed (none when it passed)."""
        if self.check["passed"]:
            return []
        weakest = min(self.check["separation"], key=self.check["separation"].get)
        return [
            f"trained feature extractor: held-out images degraded by {weakest} are only "
            f"{self.check['separation'][weakest]:.1f} standard deviations (KID) from real ones "
            f"(< {SANITY_SEPARATION}): it cannot tell a broken model, and its FID/KID are not "
            "trustworthy (train longer: --quality_steps, or give --inception)"
        ]

    def fid_kid(self, real: Images, generated: Images) -> dict[str, float]:
        """FID and KID of `generated` against `real` on these features
        (`memguard.metrics.quality.fid_kid`)."""
        return fid_kid(real, generated, self.encoder)


def load_trained_features(
    images: ImageFolderDataset,
    indices: Sequence[int],
    heldout: torch.Tensor,
    spec: ExtractorSpec | None = None,
    cache_dir: str | Path | None = None,
    **settings: Any,
) -> TrainedFeatures:
    """The extractor trained on the folder's images at `indices` (spec: default settings, the
    `settings` given, those images' fingerprint and the folder's resolution): from the cache
    when trained before, else trained, checked on `heldout` ((N, 3, H, W) in [0, 1]) and
    cached."""
    if spec is not None and settings:
        raise TypeError(
            f"load_trained_features: a spec, or settings ({', '.join(settings)}), not both"
        )
    if spec is None:
        sha = fingerprint([images.records[i] for i in indices])
        spec = ExtractorSpec(data_sha256=sha, image_size=images.resolution, **settings)

    def train() -> dict:
        start = time.perf_counter()
        encoder = train_extractor(spec, images, indices)
        seconds = time.perf_counter() - start
        return {"state_dict": encoder.state_dict(), "training_seconds": seconds}

    saved, cached = load_or_train("feature_extractors", spec, train, cache_dir)
    encoder = Encoder(spec.width, spec.feature_size)
    encoder.load_state_dict(saved["state_dict"])
    encoder.eval().requires_grad_(False)
    check = heldout_check(encoder, heldout, spec.seed)
    return TrainedFeatures(encoder, spec, check, float(saved["training_seconds"]), cached)
