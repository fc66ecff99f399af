"""Feature similarity of generations to their training set (Somepalli et al., "Diffusion Art or
Digital Forgery? Investigating Data Replication in Diffusion Models", CVPR 2023): the cosine
similarity of each generation's descriptor to its most similar training descriptor, summarised
by its mean, 95th percentile and the rates above 0.5 and 0.7.

The descriptor is what the audit is given: SSCD (Pizzi et al., CVPR 2022) from a local
TorchScript file, or the features an audit plugin offers (the shapes benchmark's judge).
Pooled activations share a large mean, so a `Descriptor` may ask for centring on the training
descriptors' mean before the cosine.

One implementation, two doors: `nearest_cosine` measures all generations at once;
`FeatureSimilarity` is a `torchmetrics.Metric` (the training descriptors a constructor argument)
whose `update()` measures a batch and keeps each generation's similarity and nearest training
row as state, concatenated across processes by `compute()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from memguard.data.folder import ImageFolderDataset, unit_batches
from memguard.metrics.intervals import rate_of
from memguard.metrics.neighbors import nearest_neighbors

DESCRIPTOR_BATCH = 64  # images described at once, whatever the chunk size: the same features


@dataclass(frozen=True)
class Descriptor:
    """Image descriptors for the similarity measure: `extract` maps images (B, 3, H, W) in
    [0, 1] to (B, d) features; `centre`: subtract the training descriptors' mean first."""

    name: str
    extract: Callable[[torch.Tensor], torch.Tensor]
    centre: bool = False

    @torch.no_grad()
    def of(self, images: torch.Tensor | ImageFolderDataset) -> torch.Tensor:
        """Descriptors (N, d) of images in [0, 1], or of an image folder read a batch at a
        time."""
        return torch.cat([self.extract(batch) for batch in unit_batches(images, DESCRIPTOR_BATCH)])


def nearest_cosine(
    generated: torch.Tensor, train: torch.Tensor, **search
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity (n,) of each generation's descriptor to its most similar training
    descriptor, and that training row (n,). Exact: on unit vectors the nearest in L2 is the most
    similar in cosine, and cos = 1 - d^2 / 2."""
    unit_generated = torch.nn.functional.normalize(generated.double(), dim=1)
    unit_train = torch.nn.functional.normalize(train.double(), dim=1)
    distances, indices = nearest_neighbors(unit_generated, unit_train, k=1, **search)
    return 1.0 - distances[:, 0] ** 2 / 2.0, indices[:, 0]


def similarity_summary(similarity: torch.Tensor) -> dict:
    """Somepalli et al.'s figures: mean, 95th percentile, and the rates above 0.5 and 0.7."""
    values = similarity.double()
    return {
        "mean": float(values.mean()),
        "p95": float(torch.quantile(values, 0.95)),
        "above_0.5": rate_of((values > 0.5).tolist()),
        "above_0.7": rate_of((values > 0.7).tolist()),
    }


class FeatureSimilarity(Metric):
    """`nearest_cosine` of every generation seen against `reference`, the training descriptors
    (m, d), centred on their mean with `centre`; `compute()` is (similarity (n,), nearest
    training row (n,)). The search runs on the metric's device, or on faiss's CPU index with
    `backend="faiss"`."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self, reference: torch.Tensor, centre: bool = False, backend: str = "torch", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.centre = reference.mean(dim=0) if centre else None
        self.reference = reference - self.centre if centre else reference
        self.backend = backend
        self.add_state("similarity", default=[], dist_reduce_fx="cat")
        self.add_state("nearest", default=[], dist_reduce_fx="cat")

    def update(self, descriptors: torch.Tensor) -> None:
        if self.centre is not None:
            descriptors = descriptors - self.centre
        similarity, nearest = nearest_cosine(
            descriptors, self.reference, backend=self.backend, device=self.device
        )
        self.similarity.append(similarity.to(self.device))
        self.nearest.append(nearest.to(self.device))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.similarity).cpu(), dim_zero_cat(self.nearest).cpu()
