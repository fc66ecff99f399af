"""Exact nearest-neighbour search against a reference set read in chunks: the search behind
replication (Gu et al., "On Memorization in Diffusion Models", 2023; IET-AGC, Liu et al., ECCV
2024) and feature similarity (Somepalli et al., "Diffusion Art or Digital Forgery?", CVPR 2023).

A reference is read one chunk at a time (`Rows`): an in-memory tensor (`TensorRows`), or the
images of an image folder as pixel vectors in [0, 1] (`ImageRows`), decoded as uint8 and turned
into float one chunk at a time, so that peak memory is bounded by the chunk size and not by the
training set (100,000 images at 512 px are 300 GB as float); `ConcatRows` reads several as one.

The search makes one pass over the reference whatever the number of queries. For each reference
chunk and each query chunk, candidates come from one matmul (|q|^2 - 2 q.r + |r|^2) and a top-k
(k plus a margin); their distances are recomputed directly as ||q - r|| in float64 while the
chunk is in memory, and the nearest so far are kept in order of (distance, reference row). So
rounding in the matmul expansion cannot change a reported distance, and a tie goes to the
earlier reference row however the reference is chunked. Peak memory is about 32 bytes per
element of a (chunk, D) block. `backend="faiss"` takes the candidates from a faiss exact flat
index instead; that index holds every reference vector (its memory is not bounded by the
chunk), and distances are recomputed the same way from the vectors it stores.

Device: queries and reference chunks go to `device` (the audit's: on a GPU the matmuls, which
dominate, are far faster), and results come back on the CPU; faiss (`faiss-cpu`) searches on the
CPU.

Exact duplicates (`distinct_rows`) are found chunk by chunk too, by a 128-bit BLAKE2b digest of
each row's bytes: two different rows share a digest with probability about 2^-128 per pair.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from memguard.data.folder import ImageFolderDataset, unit_float

QUERY_CHUNK = 1024  # queries compared at once
REFERENCE_CHUNK = 8192  # reference rows read and compared at once


class Rows(ABC):
    """A reference set of vectors, read in chunks."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """The rows in order, as float32 tensors (c, D) of at most `size` rows."""

    @abstractmethod
    def subset(self, indices: torch.Tensor) -> Rows:
        """The rows at `indices`, in that order."""


class TensorRows(Rows):
    """Rows of an in-memory tensor (m, D)."""

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors = vectors

    def __len__(self) -> int:
        return len(self.vectors)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.vectors), size):
            yield self.vectors[start : start + size].float()

    def subset(self, indices: torch.Tensor) -> TensorRows:
        return TensorRows(self.vectors[indices])


class ImageRows(Rows):
    """The images of an image folder (all, or those at `indices`) as flattened pixel vectors in
    [0, 1], decoded one chunk at a time."""

    def __init__(self, dataset: ImageFolderDataset, indices: list[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for images in self.dataset.chunks(size, self.indices):
            yield unit_float(images).flatten(1)

    def subset(self, indices: torch.Tensor) -> ImageRows:
        return ImageRows(self.dataset, [self.indices[i] for i in indices.tolist()])


class ConcatRows(Rows):
    """Several references read one after the other, as one (a training folder and images that
    join it, say)."""

    def __init__(self, *parts: Rows) -> None:
        self.parts = parts
        self.starts = torch.tensor([0, *(len(part) for part in parts)]).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for part in self.parts:
            yield from part.chunks(size)

    def subset(self, indices: torch.Tensor) -> ConcatRows:
        indices = torch.as_tensor(indices, dtype=torch.long)
        which = torch.searchsorted(self.starts, indices, right=True) - 1
        runs = torch.unique_consecutive(which, return_counts=True)
        pieces, start = [], 0
        for part, count in zip(*(values.tolist() for values in runs), strict=True):
            local = indices[start : start + count] - self.starts[part]
            pieces.append(self.parts[part].subset(local))
            start += count
        return ConcatRows(*pieces)


def as_rows(reference: torch.Tensor | Rows) -> Rows:
    return reference if isinstance(reference, Rows) else TensorRows(reference)


def _by_distance(distances: torch.Tensor, indices: torch.Tensor, keep: int):
    """The `keep` nearest of each row, ordered by (distance, index)."""
    by_index = indices.argsort(dim=1, stable=True)
    distances, indices = distances.gather(1, by_index), indices.gather(1, by_index)
    order = distances.argsort(dim=1, stable=True)[:, :keep]
    return distances.gather(1, order), indices.gather(1, order)


def _exact(q: torch.Tensor, rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """||q - r|| in float64 for each candidate column r (n, D) of `rows`, drawn one at a time."""
    q = q.double()
    return torch.stack([(q - r.double()).norm(dim=1) for r in rows], dim=1)


def _torch_search(
    queries: torch.Tensor, reference: Rows, keep: int, query_chunk: int, reference_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = queries.device
    best_d = torch.empty(len(queries), 0, dtype=torch.float64, device=device)
    best_i = torch.empty(len(queries), 0, dtype=torch.long, device=device)
    q_norm = (queries * queries).sum(1, keepdim=True)
    start = 0
    for r in reference.chunks(reference_chunk):
        r = r.to(device)
        r_norm = (r * r).sum(1)[None, :]
        found_d, found_i = [], []
        for q0 in range(0, len(queries), query_chunk):
            q = queries[q0 : q0 + query_chunk]
            squared = q_norm[q0 : q0 + query_chunk] - 2.0 * q @ r.T + r_norm
            _, local = squared.topk(min(keep, len(r)), dim=1, largest=False)
            found_d.append(_exact(q, (r[column] for column in local.T)))
            found_i.append(local + start)
        distances = torch.cat([best_d, torch.cat(found_d)], dim=1)
        indices = torch.cat([best_i, torch.cat(found_i)], dim=1)
        best_d, best_i = _by_distance(distances, indices, keep)
        start += len(r)
    return best_d, best_i


def _faiss_search(
    queries: torch.Tensor, reference: Rows, keep: int, query_chunk: int, reference_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    index = None
    for r in reference.chunks(reference_chunk):
        if index is None:
            index = faiss.IndexFlatL2(r.shape[1])
        index.add(np.ascontiguousarray(r.numpy()))
    best_d, best_i = [], []
    for q0 in range(0, len(queries), query_chunk):
        q = queries[q0 : q0 + query_chunk]
        _, found = index.search(np.ascontiguousarray(q.numpy()), keep)
        rows = (torch.from_numpy(index.reconstruct_batch(column)) for column in found.T)
        distances, indices = _by_distance(_exact(q, rows), torch.from_numpy(found).long(), keep)
        best_d.append(distances)
        best_i.append(indices)
    return torch.cat(best_d), torch.cat(best_i)


def nearest_neighbors(
    queries: torch.Tensor,  # (n, D)
    reference: torch.Tensor | Rows,  # (m, D)
    k: int,
    query_chunk: int = QUERY_CHUNK,
    reference_chunk: int = REFERENCE_CHUNK,
    margin: int = 4,
    backend: str = "torch",
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (n, k) float64 ascending and indices (n, k) of the k nearest reference rows
    (ties: the earlier row first), on the CPU. `backend`: "torch" (chunked matmuls on `device`,
    default the CPU) or "faiss" (a flat index, on the CPU); the distances are exact either way.
    """
    reference = as_rows(reference)
    m = len(reference)
    if m < k:
        raise ValueError(f"need at least {k} reference vectors, got {m}")
    keep = min(m, k + margin)  # candidates kept per query, exact distances
    queries = queries.float().contiguous()
    if backend == "faiss":
        distances, indices = _faiss_search(queries.cpu(), reference, keep, query_chunk,
                                           reference_chunk)  # fmt: skip
    elif backend == "torch":
        device = torch.device(device) if device is not None else torch.device("cpu")
        distances, indices = _torch_search(queries.to(device), reference, keep, query_chunk,
                                           reference_chunk)  # fmt: skip
    else:
        raise ValueError(f"nearest-neighbour backend: 'torch' or 'faiss', not {backend!r}")
    return distances[:, :k].cpu(), indices[:, :k].cpu()


def distinct_rows(
    reference: torch.Tensor | Rows, chunk: int = REFERENCE_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of each distinct row (u,), group of every row (m,)), in order of appearance;
    rows compared as float32 bytes, read `chunk` at a time."""
    first: dict[bytes, int] = {}
    groups, representatives = [], []
    row = 0
    for vectors in as_rows(reference).chunks(chunk):
        for vector in np.ascontiguousarray(vectors.cpu().numpy()):
            key = hashlib.blake2b(vector.tobytes(), digest_size=16).digest()
            if key not in first:
                first[key] = len(representatives)
                representatives.append(row)
            groups.append(first[key])
            row += 1
    return torch.tensor(representatives, dtype=torch.long), torch.tensor(groups, dtype=torch.long)


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
    train: torch.Tensor | Rows,
    k: int,
    distinct: tuple[torch.Tensor, torch.Tensor] | None = None,
    **search,
) -> DistinctNeighbors:
    """Exact k-NN of `generated` among the distinct rows of `train` (k capped at their number);
    `distinct`: `distinct_rows(train)`, when already computed; `search`: `nearest_neighbors`'
    options."""
    train = as_rows(train)
    if distinct is None:
        distinct = distinct_rows(train, search.get("reference_chunk", REFERENCE_CHUNK))
    representatives, groups = distinct
    k = min(k, len(representatives))
    distances, indices = nearest_neighbors(generated, train.subset(representatives), k, **search)
    return DistinctNeighbors(distances, indices, representatives, groups)
