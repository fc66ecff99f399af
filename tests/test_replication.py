"""Nearest-neighbour search, Gu et al.'s criterion and MQ against brute-force numpy references.

The references follow the published code's conventions, written plainly: DiffMemorize's
`mem_ratio.py` (Gu et al.: L2 to every training row, d1 / d2 < 1/3) and IET-AGC's
`attack/all_in.py` (squared L2 to every training row, the 50 smallest kept, d1^2 over their mean,
counted strictly below each threshold). Where they divide 0 by 0, numpy's NaN counts below no
threshold, and memguard reports 1.
"""

import numpy as np
import pytest
import torch

from memguard.metrics.neighbors import nearest_distinct, nearest_neighbors
from memguard.metrics.replication import (
    MQ_THRESHOLDS,
    fractions_below,
    gu_from_neighbors,
    gu_replication,
    iet_mq,
    iet_mq_from_neighbors,
    mq_distinct_l2,
    mq_distinct_l2_from_neighbors,
)
from memguard.metrics.similarity import nearest_cosine, similarity_summary


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


def reference_distances(generated: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(n, m) L2 distances to every training row, ascending per generation, in float64."""
    difference = generated.astype(np.float64)[:, None, :] - train.astype(np.float64)[None]
    return np.sort(np.sqrt((difference**2).sum(axis=2)), axis=1)


def reference_gu_all_rows(generated: np.ndarray, train: np.ndarray, threshold: float = 1 / 3):
    """mem_ratio.py's convention: the two nearest training rows, copies kept."""
    d = reference_distances(generated, train)
    with np.errstate(invalid="ignore"):
        ratio = d[:, 0] / d[:, 1]
    return ratio, ratio < threshold


def reference_iet_mq(generated: np.ndarray, train: np.ndarray, k: int = 50) -> np.ndarray:
    """all_in.py's convention: squared L2, the k smallest over every row (all rows when there are
    fewer), d1^2 over their mean (d1^2 included)."""
    squared = reference_distances(generated, train)[:, :k] ** 2
    with np.errstate(invalid="ignore"):
        return squared[:, 0] / squared.mean(axis=1)


def reference_mq_distinct_l2(generated: np.ndarray, train: np.ndarray, k: int = 50) -> np.ndarray:
    """memguard's variant: plain L2 to the k nearest distinct images."""
    d = reference_distances(generated, np.unique(train, axis=0))[:, :k]
    return d[:, 0] / d.mean(axis=1)


def with_copies(rng: np.random.Generator, distinct: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer-valued training rows (ties in distance) with duplicated images, shuffled, and
    generations that copy some exactly (duplicated or not), copy one nearly, or are new."""
    base = rng.integers(0, 4, size=(distinct, dim)).astype(np.float32)
    train = np.concatenate([base, np.repeat(base[:2], 3, axis=0), base[5:6]])  # copies
    train = train[rng.permutation(len(train))]
    generated = np.concatenate(
        [base[:2], base[5:8], base[:2] + 0.05, rng.integers(0, 4, size=(10, dim))]
    ).astype(np.float32)
    return generated, train


def expected_or_one(reference: np.ndarray) -> np.ndarray:
    """The reference's ratios, its 0/0 (NaN) written as memguard writes it: 1."""
    return np.where(np.isnan(reference), 1.0, reference)


@pytest.mark.parametrize("distinct", [12, 30, 80])  # 12 and 30: fewer than 50 training rows
def test_gu_all_rows_follows_the_papers_code(distinct: int) -> None:
    generated, train = with_copies(np.random.default_rng(distinct), distinct, 6)
    result = gu_replication(torch.from_numpy(generated), torch.from_numpy(train))
    ratio, flags = reference_gu_all_rows(generated, train)
    np.testing.assert_allclose(result.ratio_all_rows.numpy(), expected_or_one(ratio), rtol=1e-12)
    assert np.array_equal(result.is_replica_all_rows.numpy(), flags)
    copies = np.array([(train == g).all(axis=1).sum() for g in generated])
    assert (copies > 1).sum() >= 3
    # an exact copy of a duplicated image: a replica with copies merged, not over every row
    assert (result.is_replica.numpy() & ~flags)[copies > 1].all()
    assert np.array_equal(result.is_replica.numpy()[copies == 1], flags[copies == 1])


@pytest.mark.parametrize("distinct", [12, 30, 80])
def test_iet_mq_follows_ietagc_code(distinct: int) -> None:
    generated, train = with_copies(np.random.default_rng(distinct + 1), distinct, 6)
    mq = iet_mq(torch.from_numpy(generated), torch.from_numpy(train), reference_chunk=7)
    expected = reference_iet_mq(generated, train)
    np.testing.assert_allclose(mq.numpy(), expected_or_one(expected), rtol=1e-12)
    fractions = fractions_below(mq)
    assert list(fractions) == ["0.15", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    for threshold in MQ_THRESHOLDS:
        count = int((expected < threshold).sum())  # NaN counts below no threshold
        below = fractions[f"{threshold:g}"]
        assert (below["count"], below["n"]) == (count, len(generated))
        assert below["rate"] == count / len(generated)


def test_mq_variant_is_plain_distances_to_distinct_images() -> None:
    generated, train = with_copies(np.random.default_rng(5), 70, 6)
    variant = mq_distinct_l2(torch.from_numpy(generated), torch.from_numpy(train))
    expected = reference_mq_distinct_l2(generated, train)
    np.testing.assert_allclose(variant.numpy(), expected, rtol=1e-12)
    iet = iet_mq(torch.from_numpy(generated), torch.from_numpy(train)).numpy()
    assert not np.allclose(variant.numpy(), iet)  # two figures, not one


def test_mq_caps_k_at_the_rows_or_the_distinct_images() -> None:
    # 5 rows, 3 distinct images: IET's mean runs over the 5 rows, the variant's over the 3
    train = torch.tensor([[0.0], [1.0], [1.0], [1.0], [3.0]])
    generated = torch.tensor([[0.5]])
    assert iet_mq(generated, train, k=50).item() == pytest.approx(0.25 / ((0.25 * 4 + 6.25) / 5))
    assert mq_distinct_l2(generated, train, k=50).item() == pytest.approx(0.5 / (3.5 / 3))
    assert iet_mq(generated, train, k=2).item() == pytest.approx(1.0)  # two rows at 0.5


def test_mq_of_all_zero_distances_is_one() -> None:
    train = torch.tensor([[2.0], [2.0], [2.0], [5.0]])
    mq = iet_mq(torch.tensor([[2.0]]), train, k=3)  # the three nearest rows are all copies
    assert mq.item() == 1.0  # all_in.py gets 0/0 = NaN: below no threshold, as 1 is
    assert not any(r["count"] for r in fractions_below(mq).values())
    assert np.isnan(reference_iet_mq(np.array([[2.0]]), train.numpy(), k=3)[0])


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
    above = summary["above_0.5"]
    assert (above["count"], above["n"]) == (int((cosine.max(axis=1) > 0.5).sum()), 30)


def test_one_search_serves_gu_and_mq() -> None:
    rng = np.random.default_rng(3)
    train = torch.from_numpy(np.round(rng.normal(size=(60, 5)), 1))
    train[10:20] = train[0]  # duplicates, merged before the search
    generated = torch.cat([train[:3], torch.from_numpy(rng.normal(size=(9, 5)))])
    shared = nearest_distinct(generated, train, k=50)
    alone = gu_replication(generated, train)
    reused = gu_from_neighbors(shared, 1 / 3)
    for field in ("ratio", "is_replica", "ratio_all_rows", "is_replica_all_rows", "nearest",
                  "nearest_group", "groups", "d1", "d2"):  # fmt: skip
        assert torch.equal(getattr(alone, field), getattr(reused, field)), field
    for mq, of_neighbors in ((iet_mq, iet_mq_from_neighbors),
                             (mq_distinct_l2, mq_distinct_l2_from_neighbors)):  # fmt: skip
        assert torch.equal(mq(generated, train), of_neighbors(shared, 50))
        assert torch.equal(mq(generated, train, k=7), of_neighbors(shared, 7))
    with pytest.raises(ValueError, match="the search kept 2 neighbours"):
        iet_mq_from_neighbors(nearest_distinct(generated, train, k=2), 50)
