"""The metric classes (torchmetrics): fed in several batches, or on two processes that sync
through gloo, each computes what its pure function computes on all the data at once."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memguard.metrics import replication
from memguard.metrics.detection import MemorizationDetection, roc_auc, tpr_at_fpr
from memguard.metrics.replication import (
    GuReplication,
    MemorizationQuotient,
    gu_replication,
    iet_mq,
    mq_distinct_l2,
    replication_metrics,
)
from memguard.metrics.similarity import FeatureSimilarity, nearest_cosine

FIELDS = ("ratio", "is_replica", "ratio_all_rows", "is_replica_all_rows", "nearest",
          "nearest_group", "groups", "d1", "d2")  # fmt: skip


def data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Training rows with copies (integer-valued: ties), generations that copy some, near
    copies and new rows; descriptors; detection scores with ties and their labels."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4, size=(30, 6)).astype(np.float32)
    train = np.concatenate([base, np.repeat(base[:2], 3, axis=0)])[rng.permutation(36)]
    generated = np.concatenate(
        [base[:2], base[5:8], base[:2] + 0.05, rng.integers(0, 4, size=(10, 6))]
    ).astype(np.float32)
    labels = rng.uniform(size=200) < 0.3
    return {
        "train": torch.from_numpy(train),
        "generated": torch.from_numpy(generated),
        "train_features": torch.from_numpy(rng.normal(size=(50, 8)) + 3.0),
        "features": torch.from_numpy(rng.normal(size=(17, 8)) + 3.0),
        "scores": torch.from_numpy(np.round(rng.normal(size=200) + 2 * labels, 1)),
        "labels": torch.from_numpy(labels),
    }


def expected(d: dict[str, torch.Tensor]) -> dict:
    """Every figure from the pure functions, on all the data at once."""
    centre = d["train_features"].mean(dim=0)
    scores, labels = d["scores"].numpy(), d["labels"].numpy()
    return {
        "gu": gu_replication(d["generated"], d["train"]),
        "mq": {"iet_mq": iet_mq(d["generated"], d["train"]),
               "mq_distinct_l2": mq_distinct_l2(d["generated"], d["train"])},
        "similarity": nearest_cosine(d["features"], d["train_features"]),
        "centred": nearest_cosine(d["features"] - centre, d["train_features"] - centre),
        "detection": {"auc": roc_auc(scores, labels),
                      "tpr_at_1pct_fpr": tpr_at_fpr(scores, labels, 0.01)},
    }  # fmt: skip


def metrics(d: dict[str, torch.Tensor]) -> dict:
    return {
        "gu": GuReplication(d["train"]),
        "mq": MemorizationQuotient(d["train"]),
        "similarity": FeatureSimilarity(d["train_features"]),
        "centred": FeatureSimilarity(d["train_features"], centre=True),
        "detection": MemorizationDetection(),
    }


def update(measures: dict, d: dict[str, torch.Tensor], part: slice) -> None:
    """Feed every metric the rows of `part`, in batches of at most 4 (5 for detection)."""
    for name in ("gu", "mq"):
        for batch in d["generated"][part].split(4):
            measures[name].update(batch)
    for name in ("similarity", "centred"):
        for batch in d["features"][part].split(4):
            measures[name].update(batch)
    for scores, labels in zip(d["scores"][part].split(5), d["labels"][part].split(5), strict=True):
        measures["detection"].update(scores, labels)


def assert_equal(computed: dict, reference: dict) -> None:
    for field in FIELDS:
        assert torch.equal(getattr(computed["gu"], field), getattr(reference["gu"], field)), field
    for name in ("iet_mq", "mq_distinct_l2"):
        assert torch.equal(computed["mq"][name], reference["mq"][name]), name
    for name in ("similarity", "centred"):
        for got, want in zip(computed[name], reference[name], strict=True):
            assert torch.equal(got, want), name
    assert computed["detection"] == reference["detection"]


def test_each_metric_computes_its_function_over_batches() -> None:
    d = data()
    measures = metrics(d)
    update(measures, d, slice(None))
    assert_equal({name: metric.compute() for name, metric in measures.items()}, expected(d))


def test_the_replication_collection_searches_once(monkeypatch) -> None:
    d = data(1)
    calls = []
    search = replication.nearest_neighbors
    monkeypatch.setattr(replication, "nearest_neighbors",
                        lambda *a, **k: calls.append(1) or search(*a, **k))  # fmt: skip
    collection = replication_metrics(d["train"])
    for batch in d["generated"].split(6):
        collection.update(batch)
    assert len(calls) == 3  # one search per batch serves both metrics
    gu, mq = collection["replication"].compute(), collection["mq"].compute()
    reference = expected(d)
    for field in FIELDS:
        assert torch.equal(getattr(gu, field), getattr(reference["gu"], field)), field
    assert all(torch.equal(mq[name], reference["mq"][name]) for name in mq)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, port: int, output: str) -> None:
    """One of two processes: half the data each (uneven halves), synced in `compute()`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        d = data()
        measures = metrics(d)
        halves = {"generated": 8, "features": 7, "scores": 120}
        for key, middle in halves.items():
            d[key] = d[key][:middle] if rank == 0 else d[key][middle:]
        d["labels"] = d["labels"][:120] if rank == 0 else d["labels"][120:]
        update(measures, d, slice(None))
        computed = {name: metric.compute() for name, metric in measures.items()}
        if rank == 0:
            torch.save(computed, output)
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_processes(tmp_path: Path) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    output = tmp_path / "computed.pt"
    mp.spawn(_process, args=(_free_port(), str(output)), nprocs=2, join=True)
    assert_equal(torch.load(output, weights_only=False), expected(data()))
