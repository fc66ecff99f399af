"""Replication of training images: the Gu et al. criterion ("On Memorization in Diffusion
Models", Gu et al., 2023) and IET's memorization quotient MQ (IET-AGC, Liu et al., ECCV 2024,
arXiv 2407.15328), each in two conventions, on the exact search of `memguard.metrics.neighbors`.

Gu et al.: a generation x is a replica when d1(x) / d2(x) < 1/3, with d1 and d2 the L2 distances
to its nearest and second-nearest training images.
- memguard's headline merges exact copies in the training set first (planted or natural
  duplicates), so d1 and d2 are distances to DISTINCT images: a perfect replica of a duplicated
  image counts.
- The paper's code (DiffMemorize's `mem_ratio.py`) keeps every training row: a replica of an
  image present twice has d1 = d2 and does not count. `Replication.is_replica_all_rows` is that
  convention, to compare with published numbers.

IET's MQ, as IET-AGC's evaluation (`attack/all_in.py`) computes it: d1^2 / mean(d1^2 .. dk^2)
over SQUARED L2 distances to the k = 50 nearest training ROWS (copies of a duplicated image each
take a place among the 50; the mean includes d1), counted below 0.15, 0.2, 0.3, ..., 0.9:
`iet_mq`. With fewer than k training rows the mean runs over all of them (IET's code keeps the
50 smallest of whatever there is). memguard's earlier figure, d1 / mean(d1 .. dk) on plain
distances to the k nearest distinct images (k capped at their number), is a different figure
that can differ widely from IET's on the same generations; it is kept under its own name,
`mq_distinct_l2`.

Where d1 = d2 = 0 (or all k distances are 0), the reference codes divide 0 by 0; the NaN they
get counts below no threshold. memguard reads that ratio as 1, which counts below none of its
thresholds either, and keeps NaN out of results.json.

One implementation, two doors. Each figure is a function of a search (`DistinctNeighbors`):
`gu_from_neighbors`, `iet_mq_from_neighbors`, `mq_distinct_l2_from_neighbors`. The plain
functions `gu_replication`, `iet_mq` and `mq_distinct_l2` search and measure in one call. The
metrics `GuReplication` and `MemorizationQuotient` (`torchmetrics.Metric`, the training set a
constructor argument) search each `update()` batch (one pass over the training set per call) and
keep every generation's nearest distinct images as state, concatenated across processes when
`compute()` measures them with the same functions. `replication_metrics` puts both in one
`MetricCollection` that searches once for the two (a compute group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from memguard.metrics.intervals import rate_of
from memguard.metrics.neighbors import (
    REFERENCE_CHUNK,
    DistinctNeighbors,
    Rows,
    as_rows,
    distinct_rows,
    nearest_distinct,
    nearest_neighbors,
)

MQ_K = 50  # IET: the 50 nearest training rows
MQ_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 / 0 read as 1 (see the module docstring)."""
    safe = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    return torch.where(denominator > 0, numerator / safe, torch.ones_like(numerator))


# ------------------------------------------------------------------------------- Gu et al.


@dataclass
class Replication:
    """Per generation: the Gu ratio and verdict in both conventions, and the nearest image."""

    ratio: torch.Tensor  # (n,) d1 / d2, distinct training images (copies merged)
    is_replica: torch.Tensor  # (n,) bool
    ratio_all_rows: torch.Tensor  # (n,) d1 / d2 over every training row, as DiffMemorize's code
    is_replica_all_rows: torch.Tensor  # (n,) bool
    nearest: torch.Tensor  # (n,) index of a training row holding the nearest distinct image
    nearest_group: torch.Tensor  # (n,) distinct-image id of the nearest image
    groups: torch.Tensor  # (m,) distinct-image id of every training row
    d1: torch.Tensor
    d2: torch.Tensor


def gu_from_neighbors(neighbors: DistinctNeighbors, threshold: float = 1 / 3) -> Replication:
    """Gu et al.'s criterion against the distinct training images, and over every training row,
    from a search kept with k >= 2."""
    representatives, indices = neighbors.representatives, neighbors.indices
    if len(representatives) < 2:
        raise ValueError("the d1/d2 criterion needs at least two distinct training images")
    d1, d2 = neighbors.distinct(2).T
    ratio = d1 / d2  # d2 > 0: the reference rows are distinct
    rows = neighbors.all_rows(2)
    ratio_all_rows = _ratio(rows[:, 0], rows[:, 1])
    return Replication(
        ratio=ratio,
        is_replica=ratio < threshold,
        ratio_all_rows=ratio_all_rows,
        is_replica_all_rows=ratio_all_rows < threshold,
        nearest=representatives[indices[:, 0]],
        nearest_group=indices[:, 0],
        groups=neighbors.groups,
        d1=d1,
        d2=d2,
    )


def gu_replication(
    generated: torch.Tensor,  # (n, D)
    train: torch.Tensor | Rows,  # (m, D)
    threshold: float = 1 / 3,
    **search,
) -> Replication:
    """`gu_from_neighbors` of a search made here (`search`: `nearest_neighbors`' options)."""
    return gu_from_neighbors(nearest_distinct(generated, train, k=2, **search), threshold)


# ------------------------------------------------------------------------------------- MQ


def iet_mq_from_neighbors(neighbors: DistinctNeighbors, k: int = MQ_K) -> torch.Tensor:
    """IET's MQ per generation: d1^2 / mean(d1^2 .. dk^2) over squared L2 distances to the k
    nearest training rows, copies kept (k capped at the number of rows; the search kept at least
    that k). Low values: one training row is far nearer than the rest."""
    squared = neighbors.all_rows(k) ** 2
    return _ratio(squared[:, 0], squared.mean(dim=1))


def mq_distinct_l2_from_neighbors(neighbors: DistinctNeighbors, k: int = MQ_K) -> torch.Tensor:
    """memguard's MQ variant, not IET's figure: d1 / mean(d1 .. dk) over plain L2 distances to
    the k nearest DISTINCT training images (copies merged; k capped at their number)."""
    distances = neighbors.distinct(k)
    return _ratio(distances[:, 0], distances.mean(dim=1))


def iet_mq(
    generated: torch.Tensor, train: torch.Tensor | Rows, k: int = MQ_K, **search
) -> torch.Tensor:
    """`iet_mq_from_neighbors` of a search made here."""
    return iet_mq_from_neighbors(nearest_distinct(generated, train, k=k, **search), k)


def mq_distinct_l2(
    generated: torch.Tensor, train: torch.Tensor | Rows, k: int = MQ_K, **search
) -> torch.Tensor:
    """`mq_distinct_l2_from_neighbors` of a search made here."""
    return mq_distinct_l2_from_neighbors(nearest_distinct(generated, train, k=k, **search), k)


def fractions_below(
    values: torch.Tensor, thresholds: tuple[float, ...] = MQ_THRESHOLDS
) -> dict[str, dict]:
    """{threshold: the rate (`memguard.metrics.intervals.binomial_rate`) of values strictly
    below it}."""
    return {f"{t:g}": rate_of((values < t).tolist()) for t in thresholds}


# -------------------------------------------------------------------------------- metrics


class TrainingNeighbors(Metric):
    """Every generation's k nearest distinct training images, as metric state.

    `reference`: the training rows (a tensor (m, D), or `Rows` read in chunks), a constructor
    argument and never state; `distinct`: its `distinct_rows`, when already computed. `update`
    searches a batch on the metric's device (one pass over the training set per call: give it
    large batches); the distances and indices are states concatenated across processes.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        reference: torch.Tensor | Rows,
        k: int,
        distinct: tuple[torch.Tensor, torch.Tensor] | None = None,
        backend: str = "torch",
        chunk_size: int = REFERENCE_CHUNK,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        reference = as_rows(reference)
        if distinct is None:
            distinct = distinct_rows(reference, chunk_size)
        self.representatives, self.groups = distinct
        self.reference = reference.subset(self.representatives)
        self.k = min(k, len(self.representatives))
        self.backend, self.chunk_size = backend, chunk_size
        self.add_state("distances", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, generated: torch.Tensor) -> None:
        """`generated`: (b, D) vectors, or images (b, 3, H, W) in [0, 1] (flattened)."""
        distances, indices = nearest_neighbors(
            generated.flatten(1), self.reference, self.k, self.chunk_size, self.chunk_size,
            backend=self.backend, device=self.device,
        )  # fmt: skip
        self.distances.append(distances.to(self.device))
        self.indices.append(indices.to(self.device))

    def neighbors(self) -> DistinctNeighbors:
        """The search of every generation seen (call within `compute`, after the sync)."""
        return DistinctNeighbors(
            dim_zero_cat(self.distances).cpu(),
            dim_zero_cat(self.indices).cpu(),
            self.representatives,
            self.groups,
        )


class GuReplication(TrainingNeighbors):
    """Gu et al.'s criterion in both conventions; `compute()` is `gu_from_neighbors` of every
    generation seen, the same `Replication` as `gu_replication` on them all at once."""

    def __init__(self, reference, threshold: float = 1 / 3, k: int = 2, **kwargs) -> None:
        super().__init__(reference, max(k, 2), **kwargs)
        self.threshold = threshold

    def compute(self) -> Replication:
        return gu_from_neighbors(self.neighbors(), self.threshold)


class MemorizationQuotient(TrainingNeighbors):
    """IET's MQ and memguard's variant per generation; `compute()` is {"iet_mq",
    "mq_distinct_l2"}, the same values as `iet_mq` and `mq_distinct_l2` on every generation
    seen at once."""

    def __init__(self, reference, k: int = MQ_K, **kwargs) -> None:
        super().__init__(reference, k, **kwargs)
        self.mq_k = k

    def compute(self) -> dict[str, torch.Tensor]:
        neighbors = self.neighbors()
        return {
            "iet_mq": iet_mq_from_neighbors(neighbors, self.mq_k),
            "mq_distinct_l2": mq_distinct_l2_from_neighbors(neighbors, self.mq_k),
        }


def replication_metrics(
    reference: torch.Tensor | Rows,
    distinct: tuple[torch.Tensor, torch.Tensor] | None = None,
    threshold: float = 1 / 3,
    **kwargs,
) -> MetricCollection:
    """{"replication": GuReplication, "mq": MemorizationQuotient} sharing one search of the
    MQ_K nearest distinct images (a compute group: `update` searches once for both)."""
    reference = as_rows(reference)
    if distinct is None:
        distinct = distinct_rows(reference, kwargs.get("chunk_size", REFERENCE_CHUNK))
    return MetricCollection(
        {
            "replication": GuReplication(reference, threshold, MQ_K, distinct=distinct, **kwargs),
            "mq": MemorizationQuotient(reference, MQ_K, distinct=distinct, **kwargs),
        },
        compute_groups=[["replication", "mq"]],
    )
