"""Nearest-neighbour search and the Gu et al. criterion against brute-force numpy references."""

import numpy as np
import pytest
import torch

from memguard.metrics.replication import (
    fractions_below,
    gu_replication,
    mq_ratio,
    nearest_cosine,
    nearest_distinct,
    nearest_neighbors,
    similarity_summary,
)


def brute_force_knn(queries: np.ndarray, reference: np.ndarray, k: int):
    distances = np.linalg.norm(queries[:, None, :] - reference[None, :, :], axis=2)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def brute_force_gu(generated: np.ndarray, train: np.ndarray, threshold: float):
    distinct, first = np.unique(train, axis=0, return_index=True)
    distinct = train[np.sort(first)]
    d, _ = brute_force_knn(generated, distinct, 2)
    return d[:, 0] / d[:, 1] < threshold, d[:, 0] / d[:, 1]


@pytest.mark.parametrize("chunks", [(1024, 8192), (7, 13)])
def test_knn_matches_brute_force(chunks: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    queries, reference = rng.normal(size=(50, 20)), rng.normal(size=(300, 20))
    expected_d, expected_i = brute_force_knn(queries, reference, 5)
    d, i = nearest_neighbors(torch.from_numpy(queries), torch.from_numpy(reference), 5, *chunks)
    np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-6)
    assert np.array_equal(i.numpy(), expected_i)


def test_faiss_backend_matches_brute_force() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    queries, reference = rng.normal(size=(40, 16)), rng.normal(size=(500, 16))
    expected_d, expected_i = brute_force_knn(queries, reference, 3)
    d, i = nearest_neighbors(
        torch.from_numpy(queries), torch.from_numpy(reference), 3, query_chunk=16, backend="faiss"
    )
    np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-6)
    assert np.array_equal(i.numpy(), expected_i)


def test_gu_matches_brute_force_with_duplicates() -> None:
    rng = np.random.default_rng(1)
    train = rng.uniform(size=(40, 12)).astype(np.float32)
    train = np.concatenate([train, np.repeat(train[:3], 5, axis=0)])  # planted duplicates
    generated = np.concatenate(
        [train[:3] + rng.normal(scale=0.01, size=(3, 12)), rng.uniform(size=(20, 12))]
    ).astype(np.float32)
    result = gu_replication(
        torch.from_numpy(generated), torch.from_numpy(train), reference_chunk=16
    )
    expected_flags, expected_ratio = brute_force_gu(generated, train, 1 / 3)
    np.testing.assert_allclose(result.ratio.numpy(), expected_ratio, rtol=1e-5)
    assert np.array_equal(result.is_replica.numpy(), expected_flags)
    assert result.is_replica[:3].all()  # copies of duplicated images count despite d1 == d2 ties
    assert result.nearest[:3].tolist() == [0, 1, 2]
    assert result.groups[40:].tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_exact_copy_is_a_replica_and_ties_are_not() -> None:
    train = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    generated = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # a copy; the midpoint of two images
    result = gu_replication(generated, train)
    assert result.is_replica.tolist() == [True, False]
    assert result.ratio[1] == pytest.approx(1.0)


def test_one_distinct_training_image_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least two distinct"):
        gu_replication(torch.zeros(2, 4), torch.ones(3, 4))


def test_mq_ratio_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    train = rng.normal(size=(60, 8))
    train = np.concatenate([train, train[:5]])  # duplicates are merged before ranking
    generated = np.concatenate([train[:3] + 0.01, rng.normal(size=(10, 8))])
    distinct = train[:60]
    d, _ = brute_force_knn(generated, distinct, 50)
    expected = d[:, 0] / d.mean(axis=1)
    result = mq_ratio(torch.from_numpy(generated), torch.from_numpy(train), reference_chunk=7)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)
    fractions = fractions_below(result)
    assert fractions["0.15"] == pytest.approx(np.mean(expected < 0.15))
    assert list(fractions) == ["0.15", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]


def test_mq_caps_k_at_the_number_of_distinct_images() -> None:
    train = torch.tensor([[0.0], [1.0], [3.0]])
    ratio = mq_ratio(torch.tensor([[0.0]]), train, k=50)
    assert ratio.item() == 0.0  # d = (0, 1, 3): d1 / mean = 0


def test_nearest_cosine_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    generated, train = rng.normal(size=(30, 16)), rng.normal(size=(200, 16))
    cosine = (generated / np.linalg.norm(generated, axis=1, keepdims=True)) @ (
        train / np.linalg.norm(train, axis=1, keepdims=True)
    ).T
    similarity, index = nearest_cosine(
        torch.from_numpy(generated), torch.from_numpy(train), reference_chunk=50
    )
    np.testing.assert_allclose(similarity.numpy(), cosine.max(axis=1), atol=1e-9)
    assert np.array_equal(index.numpy(), cosine.argmax(axis=1))
    summary = similarity_summary(similarity)
    assert summary["p95"] == pytest.approx(np.percentile(cosine.max(axis=1), 95))
    assert summary["above_0.5"] == pytest.approx(np.mean(cosine.max(axis=1) > 0.5))


def test_one_search_serves_gu_and_mq() -> None:
    rng = np.random.default_rng(3)
    train = torch.from_numpy(np.round(rng.normal(size=(60, 5)), 1))
    train[10:20] = train[0]  # duplicates, merged before the search
    generated = torch.from_numpy(rng.normal(size=(9, 5)))
    shared = nearest_distinct(generated, train, k=50)
    alone = gu_replication(generated, train)
    reused = gu_replication(generated, train, 1 / 3, shared)
    for field in ("ratio", "is_replica", "nearest", "nearest_group", "groups", "d1", "d2"):
        assert torch.equal(getattr(alone, field), getattr(reused, field)), field
    assert torch.equal(mq_ratio(generated, train), mq_ratio(generated, train, 50, shared))
    assert torch.equal(mq_ratio(generated, train, k=7), mq_ratio(generated, train, 7, shared))
