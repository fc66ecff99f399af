"""Replication of training images: exact chunked nearest-neighbour search, the Gu et al.
criterion ("On Memorization in Diffusion Models", Gu et al., 2023) and IET's memorization
quotient MQ (IET-AGC, Liu et al., ECCV 2024, arXiv 2407.15328), each in two conventions.

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

The search is exact and its memory bounded: queries and references are taken in chunks, each
chunk's candidates come from one matmul (|q|^2 - 2 q.r + |r|^2) and a top-k, and the final
distances of the candidates are recomputed directly as ||q - r|| in float64, so rounding in the
matmul expansion cannot change the reported distances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memguard.metrics.intervals import rate_of


def _torch_candidates(
    q: torch.Tensor, reference: torch.Tensor, keep: int, reference_chunk: int
) -> torch.Tensor:
    """Indices (n, keep) of the nearest rows by |q|^2 - 2 q.r + |r|^2, chunk by chunk."""
    q_norm = (q * q).sum(1, keepdim=True)
    best_d = torch.full((len(q), 0), float("inf"))
    best_i = torch.empty((len(q), 0), dtype=torch.long)
    for r0 in range(0, len(reference), reference_chunk):
        r = reference[r0 : r0 + reference_chunk]
        squared = q_norm - 2.0 * q @ r.T + (r * r).sum(1)[None, :]
        d, i = squared.topk(min(keep, len(r)), dim=1, largest=False)
        best_d, order = torch.cat([best_d, d], 1).topk(
            min(keep, best_d.shape[1] + d.shape[1]), dim=1, largest=False
        )
        best_i = torch.cat([best_i, i + r0], 1).gather(1, order)
    return best_i


def _faiss_candidates(q: torch.Tensor, index, keep: int) -> torch.Tensor:
    _, indices = index.search(q.numpy(), keep)
    return torch.from_numpy(indices).long()


def nearest_neighbors(
    queries: torch.Tensor,  # (n, D)
    reference: torch.Tensor,  # (m, D)
    k: int,
    query_chunk: int = 1024,
    reference_chunk: int = 8192,
    margin: int = 4,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (n, k) float64 ascending and indices (n, k) of the k nearest reference rows.

    `backend="faiss"` takes the candidates from a faiss exact flat index instead of chunked
    matmuls (faster for very large training sets; needs the `faiss-cpu` package); the final
    distances are recomputed exactly either way."""
    n, m = len(queries), len(reference)
    if m < k:
        raise ValueError(f"need at least {k} reference vectors, got {m}")
    keep = min(m, k + margin)  # candidates kept per query, re-ranked exactly at the end
    queries, reference = queries.float().contiguous(), reference.float().contiguous()
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatL2(reference.shape[1])
        index.add(reference.numpy())
    elif backend != "torch":
        raise ValueError(f"nearest-neighbour backend: 'torch' or 'faiss', not {backend!r}")
    out_d = torch.empty(n, k, dtype=torch.float64)
    out_i = torch.empty(n, k, dtype=torch.long)
    for q0 in range(0, n, query_chunk):
        q = queries[q0 : q0 + query_chunk]
        if backend == "faiss":
            best_i = _faiss_candidates(q, index, keep)
        else:
            best_i = _torch_candidates(q, reference, keep, reference_chunk)
        exact = torch.stack(  # one candidate column at a time: (chunk, D) in memory
            [(q.double() - reference[column].double()).norm(dim=1) for column in best_i.T], dim=1
        )
        exact, order = exact.sort(dim=1, stable=True)
        out_d[q0 : q0 + len(q)] = exact[:, :k]
        out_i[q0 : q0 + len(q)] = best_i.gather(1, order)[:, :k]
    return out_d, out_i


def distinct_rows(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of each distinct row (u,), group of every row (m,)), in order of appearance."""
    array = np.ascontiguousarray(vectors.cpu().numpy())
    first: dict[bytes, int] = {}
    groups = np.empty(len(array), dtype=np.int64)
    representatives = []
    for i, row in enumerate(array):
        key = row.tobytes()
        if key not in first:
            first[key] = len(representatives)
            representatives.append(i)
        groups[i] = first[key]
    return torch.tensor(representatives, dtype=torch.long), torch.from_numpy(groups)


@dataclass
class DistinctNeighbors:
    """The k nearest distinct training images of every generation. One search serves both
    conventions of Gu's criterion and of MQ: the distances to the nearest training ROWS are the
    distinct images' distances, each repeated by its number of copies."""

    distances: torch.Tensor  # (n, k), ascending
    indices: torch.Tensor  # (n, k) into `representatives`
    representatives: torch.Tensor  # (u,) first training row of each distinct image
    groups: torch.Tensor  # (m,) distinct-image id of every training row

    def _check_searched(self, k: int) -> None:
        if self.distances.shape[1] < min(k, len(self.representatives)):
            raise ValueError(f"the search kept {self.distances.shape[1]} neighbours; {k} needed")

    def distinct(self, k: int) -> torch.Tensor:
        """Distances (n, min(k, u)) to the nearest distinct training images."""
        self._check_searched(k)
        return self.distances[:, : min(k, len(self.representatives))]

    def all_rows(self, k: int) -> torch.Tensor:
        """Distances (n, min(k, m)) to the nearest training rows, copies each counted."""
        k = min(k, len(self.groups))
        self._check_searched(k)
        copies = torch.bincount(self.groups, minlength=len(self.representatives))[self.indices]
        ends = copies.cumsum(dim=1)  # (n, searched): rows covered up to each distinct image
        positions = torch.arange(k).expand(len(ends), k).contiguous()
        return self.distances.gather(1, torch.searchsorted(ends, positions, right=True))


def nearest_distinct(
    generated: torch.Tensor,
    train: torch.Tensor,
    k: int,
    distinct: tuple[torch.Tensor, torch.Tensor] | None = None,
    **search,
) -> DistinctNeighbors:
    """Exact k-NN of `generated` among the distinct rows of `train` (k capped at their number);
    `distinct`: `distinct_rows(train)`, when already computed."""
    representatives, groups = distinct if distinct is not None else distinct_rows(train)
    k = min(k, len(representatives))
    distances, indices = nearest_neighbors(generated, train[representatives], k=k, **search)
    return DistinctNeighbors(distances, indices, representatives, groups)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 / 0 read as 1 (see the module docstring)."""
    safe = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    return torch.where(denominator > 0, numerator / safe, torch.ones_like(numerator))


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


def gu_replication(
    generated: torch.Tensor,  # (n, D)
    train: torch.Tensor,  # (m, D)
    threshold: float = 1 / 3,
    neighbors: DistinctNeighbors | None = None,
    **search,
) -> Replication:
    """Gu et al.'s criterion against the distinct training images, and over every training row
    (`neighbors`: a search already made with k >= 2, else one is made here)."""
    neighbors = neighbors or nearest_distinct(generated, train, k=2, **search)
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


# ------------------------------------------------------------------------------------- MQ

MQ_K = 50  # IET: the 50 nearest training rows
MQ_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def iet_mq(
    generated: torch.Tensor,
    train: torch.Tensor,
    k: int = MQ_K,
    neighbors: DistinctNeighbors | None = None,
    **search,
) -> torch.Tensor:
    """IET's MQ per generation: d1^2 / mean(d1^2 .. dk^2) over squared L2 distances to the k
    nearest training rows, copies kept (k capped at the number of rows; `neighbors`: a search
    already made with at least that k). Low values: one training row is far nearer than the
    rest."""
    neighbors = neighbors or nearest_distinct(generated, train, k=k, **search)
    squared = neighbors.all_rows(k) ** 2
    return _ratio(squared[:, 0], squared.mean(dim=1))


def mq_distinct_l2(
    generated: torch.Tensor,
    train: torch.Tensor,
    k: int = MQ_K,
    neighbors: DistinctNeighbors | None = None,
    **search,
) -> torch.Tensor:
    """memguard's MQ variant, not IET's figure: d1 / mean(d1 .. dk) over plain L2 distances to
    the k nearest DISTINCT training images (copies merged; k capped at their number)."""
    neighbors = neighbors or nearest_distinct(generated, train, k=k, **search)
    distances = neighbors.distinct(k)
    return _ratio(distances[:, 0], distances.mean(dim=1))


def fractions_below(
    values: torch.Tensor, thresholds: tuple[float, ...] = MQ_THRESHOLDS
) -> dict[str, dict]:
    """{threshold: the rate (`memguard.metrics.intervals.binomial_rate`) of values strictly
    below it}."""
    return {f"{t:g}": rate_of((values < t).tolist()) for t in thresholds}


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
