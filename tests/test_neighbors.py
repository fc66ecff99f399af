"""The training set streamed from its folder: the same search, duplicates and replication figures
as the whole set in memory, bit for bit, with chunks smaller than the folder, and never more
than a chunk of images decoded at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memguard.audit import images01, replication_summary
from memguard.data.folder import ImageFolderDataset
from memguard.metrics.neighbors import (
    ImageRows,
    TensorRows,
    distinct_rows,
    nearest_distinct,
    nearest_neighbors,
)
from memguard.metrics.replication import gu_replication, iet_mq, mq_distinct_l2
from memguard.sampling import save_samples

CHUNK = 7  # smaller than the folder (about 50 images), and not a divisor of its size


@pytest.fixture(scope="module")
def folder(shapes_dir: Path, tmp_path_factory) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The benchmark's training folder, uncached (every chunk decoded from its files), and a
    folder of generations: exact copies of two duplicated and two ordinary training images,
    near copies of three others, and noise."""
    train = ImageFolderDataset(shapes_dir / "train", 8, cache=False)
    pixels = images01(train)
    groups = train.column("duplicate_group")
    duplicated = [i for i, g in enumerate(groups) if g >= 0]
    ordinary = [i for i, g in enumerate(groups) if g < 0]
    sources = [duplicated[0], duplicated[-1], ordinary[0], ordinary[5]]
    near = (pixels[ordinary[1:4]] + 0.02).clamp(0, 1)
    noise = torch.rand(5, *pixels.shape[1:], generator=torch.Generator().manual_seed(0))
    images = torch.cat([pixels[sources], near, noise])
    prompts = [train.captions[i] for i in sources] + ["near"] * 3 + ["noise"] * 5
    samples = save_samples(images, prompts, 1, 0, tmp_path_factory.mktemp("samples"))
    return train, ImageFolderDataset(samples, 8)


def test_duplicates_are_found_chunk_by_chunk(folder) -> None:
    train, _ = folder
    in_memory = distinct_rows(images01(train).flatten(1))
    streamed = distinct_rows(ImageRows(train), CHUNK)
    assert all(torch.equal(a, b) for a, b in zip(in_memory, streamed, strict=True))
    groups = train.column("duplicate_group")
    assert len(in_memory[0]) == len(groups) - sum(g >= 0 for g in groups) + len(
        {g for g in groups if g >= 0}
    )  # every copy of a planted duplicate merged, nothing else


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_streamed_search_equals_in_memory(folder, backend: str) -> None:
    if backend == "faiss":
        pytest.importorskip("faiss")
    train, samples = folder
    reference = images01(train).flatten(1)
    queries = images01(samples).flatten(1)
    for k in (2, 50):
        in_memory = nearest_distinct(queries, reference, k)
        streamed = nearest_distinct(
            queries, ImageRows(train), k, query_chunk=3, reference_chunk=CHUNK, backend=backend
        )
        for name in ("distances", "indices", "representatives", "groups"):
            assert torch.equal(getattr(in_memory, name), getattr(streamed, name)), (k, name)
    search = {"query_chunk": 3, "reference_chunk": CHUNK, "backend": backend}
    expected, got = (
        gu_replication(queries, reference),
        gu_replication(queries, ImageRows(train), **search),
    )
    for name in ("ratio", "is_replica", "ratio_all_rows", "is_replica_all_rows", "nearest"):
        assert torch.equal(getattr(expected, name), getattr(got, name)), name
    assert expected.is_replica[:4].all() and not expected.is_replica_all_rows[:2].any()
    for mq in (iet_mq, mq_distinct_l2):
        assert torch.equal(mq(queries, reference), mq(queries, ImageRows(train), **search))


def test_ties_go_to_the_earlier_row_whatever_the_chunks() -> None:
    values = [5.0, 1.0, -1.0, 1.0, -5.0, 2.0, -2.0, 1.0, 7.0, -1.0, 3.0, -3.0]
    reference = torch.tensor(values)[:, None]  # distances to 0 tie in fives, twos and threes
    for chunks in ((1, 1), (1, 5), (3, 2), (1024, 8192)):
        distances, indices = nearest_neighbors(torch.zeros(1, 1), TensorRows(reference), 6,
                                               *chunks)  # fmt: skip
        assert indices.tolist() == [[1, 2, 3, 7, 9, 5]], chunks
        assert distances.tolist() == [[1, 1, 1, 1, 1, 2]]


def test_replication_reads_the_folder_a_chunk_at_a_time(folder, monkeypatch) -> None:
    train, samples = folder
    generated = images01(samples)
    read: list[int] = []
    stacked = ImageFolderDataset.stacked

    def counting(self, indices=None):
        images = stacked(self, indices)
        read.append(len(images))
        return images

    whole = replication_summary(samples, train, generated, chunk_size=len(train))
    monkeypatch.setattr(ImageFolderDataset, "stacked", counting)
    chunked = replication_summary(samples, train, generated, chunk_size=CHUNK)
    assert read and max(read) <= CHUNK  # duplicates, then the search: never the whole folder
    assert sum(read) == len(train) + whole["num_distinct_train_images"]  # one pass each
    assert chunked == whole
