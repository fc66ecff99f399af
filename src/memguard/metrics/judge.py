"""The benchmark's judge: models that score generated shapes images against known ground truth.

One small CNN is trained on freshly generated, labelled images from the benchmark's own renderer
(its own seed, never the training folder's images) with four heads: shape, colour and
background (the attribute classifier), and the concept (the concept detector); its pooled
penultimate layer is the feature extractor for FID/KID and feature similarity on the benchmark.
A judge detects one kind of concept (`JudgeSpec.concept_kind`: the fixed or moving acme logo,
or acme hatching; `memguard.data.shapes.KINDS`), the one the data folder's dataset.json
records. Half the images carry the concept, drawn by the benchmark's own renderer: whole, at an
opacity drawn from [min_logo_opacity, 1] (a model that learned the concept partly renders it
faded, and a faded logo is still the logo), or, for a `partial_fraction` of them, only the
half on one side of a random line through it (a model may render part of it). A fifth are
multi-shape scenes like the planted duplicates (concept label only), and training adds pixel
noise so that slightly noisy generations are judged like clean renders. Held-out accuracy of
every head is measured on a separate generated set, and the concept head's also on faded
(opacity below 50%) and partial instances alone. The trained judge is cached under the memguard
cache, named by a hash of its spec (`memguard.metrics.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memguard.config import CONCEPT_KINDS, ConfigError, ShapesConfig
from memguard.data.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    blend_concept,
    concept_kind,
    duplicate_rows,
    half_plane,
    ordinary_row,
)
from memguard.metrics.cache import load_or_train, spec_key

HEADS = {"shape": SHAPES, "color": tuple(COLORS), "background": tuple(BACKGROUNDS)}
ACCURACY_WARNING = 0.95
FADED = 0.5  # whole instances below this opacity count as faded in the held-out figures


@dataclass(frozen=True)
class JudgeSpec:
    """Everything the judge is a function of; its hash names the cached weights."""

    image_size: int = 16
    num_train: int = 8000
    num_heldout: int = 2000
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    noise_std: float = 0.04  # augmentation, in [0, 1] pixel units
    min_logo_opacity: float = 0.25  # faintest concept the concept head is taught to find
    partial_fraction: float = 0.25  # of the concept's instances, those cut in half
    concept_kind: str = "fixed"  # the kind of concept detected (the data's dataset.json's)
    width: int = 32
    seed: int = 1234
    version: int = 3  # bump when the renderer or the network changes

    def __post_init__(self) -> None:
        if self.concept_kind not in CONCEPT_KINDS:
            raise ConfigError(
                f"concept_kind: {self.concept_kind!r} is not one of {', '.join(CONCEPT_KINDS)}"
            )

    def key(self) -> str:
        return spec_key(self)


class JudgeNet(nn.Module):
    """Three conv stages, global average pooling, and one linear head per question; the concept
    head also sees the stages' global maximum (a small mark anywhere, e.g. a moving logo, is
    one strong response that averaging over the image dilutes)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *stage(3, width, 1),
            *stage(width, 2 * width, 2),
            *stage(2 * width, 4 * width, 2),
        )
        self.num_features = 4 * width
        self.heads = nn.ModuleDict(
            {name: nn.Linear(self.num_features, len(values)) for name, values in HEADS.items()}
        )
        self.concept = nn.Linear(2 * self.num_features, 1)

    def _maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2.0 - 1.0)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_features) for images (B, 3, H, W) in [0, 1]: the pooled last stage."""
        return self._maps(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self._maps(images)
        features = maps.mean(dim=(2, 3))
        logits = {name: head(features) for name, head in self.heads.items()}
        peaks = torch.cat([features, maps.amax(dim=(2, 3))], dim=1)
        logits["concept"] = self.concept(peaks).squeeze(-1)
        return logits


class FeatureExtractor(nn.Module):
    """The judge's features as a module of its own (what torchmetrics' FID/KID take)."""

    def __init__(self, net: JudgeNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.float())


def judge_data(spec: JudgeSpec, count: int, stream: int) -> tuple[torch.Tensor, dict]:
    """`count` labelled renders: images (N, 3, H, W) in [0, 1] and labels (-1: not applicable),
    with each image's concept 'opacity' (1 where whole or absent) and whether it is 'partial'."""
    rng = np.random.default_rng([spec.seed, stream])
    concept = concept_kind(spec.concept_kind)
    scenes = duplicate_rows(
        ShapesConfig(
            image_size=spec.image_size,
            num_duplicate_groups=count // 5,
            min_copies=1,
            max_copies=1,
        ),
        rng,
    )
    rows = [ordinary_row(rng, spec.image_size, False) for _ in range(count)]
    rows[: len(scenes)] = scenes
    carries = rng.uniform(size=count) < 0.5
    opacity = rng.uniform(spec.min_logo_opacity, 1.0, size=count)
    partial = carries & (rng.uniform(size=count) < spec.partial_fraction)
    opacity[partial | ~carries] = 1.0
    images, labels = [], {name: [] for name in [*HEADS, "concept"]}
    for i, row in enumerate(rows):
        image = row.image
        if carries[i]:
            full, _ = concept.draw(row.drawing, row.image, rng)
            keep = half_plane(row.image, full, rng) if partial[i] else None
            image = blend_concept(row.image, full, opacity[i], keep)
        images.append(np.array(image))
        for name, values in HEADS.items():
            value = getattr(row, name)
            labels[name].append(values.index(value) if value is not None else -1)
        labels["concept"].append(float(carries[i]))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    labels = {name: torch.tensor(values) for name, values in labels.items()}
    labels["opacity"], labels["partial"] = torch.from_numpy(opacity), torch.from_numpy(partial)
    return pixels, labels


def _loss(logits: dict, labels: dict) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    loss = sum(ce(logits[name], labels[name], ignore_index=-1) for name in HEADS)
    return loss + nn.functional.binary_cross_entropy_with_logits(
        logits["concept"], labels["concept"].float()
    )


@torch.no_grad()
def accuracies(net: JudgeNet, images: torch.Tensor, labels: dict) -> dict[str, float]:
    """Accuracy of every head on labelled images (rows labelled -1 are skipped), and of the
    concept head on faded and on partial instances alone ('concept_faded', 'concept_partial':
    the share found, where there are any)."""
    net.eval()
    logits = net(images)
    result = {}
    for name in HEADS:
        known = labels[name] >= 0
        hits = logits[name].argmax(-1)[known] == labels[name][known]
        result[name] = float(hits.float().mean())
    found = (logits["concept"] > 0) == labels["concept"].bool()
    result["concept"] = float(found.float().mean())
    carried = labels["concept"].bool()
    subsets = {
        "concept_faded": carried & ~labels["partial"] & (labels["opacity"] < FADED),
        "concept_partial": carried & labels["partial"],
    }
    result.update(
        {k: float(found[rows].float().mean()) for k, rows in subsets.items() if rows.any()}
    )
    return result


def train_judge(spec: JudgeSpec) -> tuple[JudgeNet, dict[str, float]]:
    """Train a judge from scratch; returns it and its held-out accuracies."""
    images, labels = judge_data(spec, spec.num_train, stream=1)
    heldout_images, heldout_labels = judge_data(spec, spec.num_heldout, stream=2)
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    net = JudgeNet(spec.width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=spec.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, spec.learning_rate, spec.steps)
    net.train()
    for _ in range(spec.steps):
        index = torch.randint(0, len(images), (spec.batch_size,), generator=generator)
        batch = images[index]
        noisy = batch + spec.noise_std * torch.randn(batch.shape, generator=generator)
        loss = _loss(net(noisy.clamp(0, 1)), {k: v[index] for k, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval().requires_grad_(False)
    return net, accuracies(net, heldout_images, heldout_labels)


@dataclass
class Judge:
    """A trained judge and its held-out accuracies."""

    net: JudgeNet
    heldout_accuracy: dict[str, float]
    spec: JudgeSpec

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list]:
        """Per image: 'shape', 'color', 'background' names and 'concept' (bool)."""
        logits = self.net(images.float())
        result = {
            name: [values[i] for i in logits[name].argmax(-1).tolist()]
            for name, values in HEADS.items()
        }
        result["concept"] = (logits["concept"] > 0).tolist()
        return result

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.float())

    def warnings(self) -> list[str]:
        return [
            f"judge head '{name}' has held-out accuracy {value:.1%} < {ACCURACY_WARNING:.0%}: "
            "its figures are not trustworthy"
            for name, value in self.heldout_accuracy.items()
            if value < ACCURACY_WARNING
        ]


def load_judge(spec: JudgeSpec | None = None, cache_dir: str | Path | None = None) -> Judge:
    """The judge for `spec`: from the cache when trained before, else trained and cached
    (`memguard.metrics.cache`)."""
    spec = spec or JudgeSpec()

    def train() -> dict:
        net, heldout = train_judge(spec)
        return {"state_dict": net.state_dict(), "heldout_accuracy": heldout}

    saved, _ = load_or_train("judges", spec, train, cache_dir)
    net = JudgeNet(spec.width)
    net.load_state_dict(saved["state_dict"])
    net.eval().requires_grad_(False)
    return Judge(net, saved["heldout_accuracy"], spec)
