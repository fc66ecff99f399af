"""Replication of training images: exact chunked nearest-neighbour search and the Gu et al.
criterion ("On Memorization in Diffusion Models", Gu et al., 2023).

A generation x is a replica when d1(x) / d2(x) < 1/3, with d1 and d2 the L2 distances to its
nearest and second-nearest DISTINCT training images. Exact copies in the training set (planted
or natural duplicates) are merged first: otherwise a perfect replica of a duplicated image would
have d1 = d2 and never count.

The search is exact and its memory bounded: queries and references are taken in chunks, each
chunk's candidates come from one matmul (|q|^2 - 2 q.r + |r|^2) and a top-k, and the final
distances of the candidates are recomputed directly as ||q - r|| in float64, so rounding in the
matmul expansion cannot change the reported distances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    """The k nearest distinct training images of every generation (one search serves Gu's
    criterion and MQ; exact duplicates in the training set are merged first)."""

    distances: torch.Tensor  # (n, k), ascending
    indices: torch.Tensor  # (n, k) into `representatives`
    representatives: torch.Tensor  # (u,) first training row of each distinct image
    groups: torch.Tensor  # (m,) distinct-image id of every training row


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


@dataclass
class Replication:
    """Per generation: the Gu ratio, the verdict and the nearest training image."""

    ratio: torch.Tensor  # (n,) d1 / d2
    is_replica: torch.Tensor  # (n,) bool
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
    """Gu et al.'s criterion against the distinct training images (`neighbors`: a search
    already made with k >= 2, else one is made here)."""
    neighbors = neighbors or nearest_distinct(generated, train, k=2, **search)
    representatives, indices = neighbors.representatives, neighbors.indices
    if len(representatives) < 2:
        raise ValueError("the d1/d2 criterion needs at least two distinct training images")
    d1, d2 = neighbors.distances[:, 0], neighbors.distances[:, 1]
    ratio = d1 / d2  # d2 > 0: the reference rows are distinct
    return Replication(
        ratio=ratio,
        is_replica=ratio < threshold,
        nearest=representatives[indices[:, 0]],
        nearest_group=indices[:, 0],
        groups=neighbors.groups,
        d1=d1,
        d2=d2,
    )


# --------------------------------------------------------------------- IET's MQ and features

MQ_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def mq_ratio(
    generated: torch.Tensor,
    train: torch.Tensor,
    k: int = 50,
    neighbors: DistinctNeighbors | None = None,
    **search,
) -> torch.Tensor:
    """IET's memorization ratio d1 / mean(d1..dk) per generation, over distinct training images
    (k is capped at their number; `neighbors`: a search already made with at least that k).
    Low values: one training image is far nearer than the rest."""
    neighbors = neighbors or nearest_distinct(generated, train, k=k, **search)
    distances = neighbors.distances[:, :k]
    return distances[:, 0] / distances.mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)


def fractions_below(values: torch.Tensor, thresholds=MQ_THRESHOLDS) -> dict[str, float]:
    """{threshold: fraction of values strictly below it}."""
    return {f"{t:g}": float((values < t).double().mean()) for t in thresholds}


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


def similarity_summary(similarity: torch.Tensor) -> dict[str, float]:
    """Somepalli et al.'s figures: mean, 95th percentile, fraction above 0.5 and above 0.7."""
    values = similarity.double()
    return {
        "mean": float(values.mean()),
        "p95": float(torch.quantile(values, 0.95)),
        "above_0.5": float((values > 0.5).double().mean()),
        "above_0.7": float((values > 0.7).double().mean()),
    }
