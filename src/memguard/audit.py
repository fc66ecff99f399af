"""Audits of what a model reproduces, from folders on disk: generations against a training set.

`replication_summary` compares an image folder of generations (as `memguard sample` writes it:
the prompt in `text`) with the training folder, by the Gu et al. criterion in pixel space, and
sorts prompts into three kinds:

- duplicated: a caption of a planted duplicate when the training folder has a
  `duplicate_group` column (the benchmark's ground truth); otherwise a training caption at least
  one of whose images occurs more than once;
- ordinary: any other training caption;
- unseen: not a training caption.

A generation is an "own" replica when it replicates an image that was trained under its prompt.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image

from memguard.data.folder import ImageFolderDataset, read_metadata
from memguard.metrics.replication import gu_replication


def _pixels(dataset: ImageFolderDataset) -> torch.Tensor:
    return dataset.stacked().float().div(255.0).flatten(1)


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def replication_summary(
    samples_dir: str | Path,
    train_data_dir: str | Path,
    threshold: float = 1 / 3,
    image_column: str = "file_name",
    caption_column: str = "text",
) -> dict:
    """Replication figures of the generations in `samples_dir` against `train_data_dir`."""
    with Image.open(read_metadata(samples_dir)[0].path) as first:
        resolution = first.size[0]
    samples = ImageFolderDataset(samples_dir, resolution=resolution)
    train = ImageFolderDataset(train_data_dir, resolution, image_column, caption_column)
    result = gu_replication(_pixels(samples), _pixels(train), threshold)

    groups_of_caption: dict[str, set[int]] = defaultdict(set)
    for caption, group in zip(train.captions, result.groups.tolist(), strict=True):
        groups_of_caption[caption].add(group)
    group_size = Counter(result.groups.tolist())
    planted = train.column("duplicate_group")
    if any(g is not None for g in planted):
        duplicated = {
            c for c, g in zip(train.captions, planted, strict=True) if g is not None and g >= 0
        }
    else:
        duplicated = {
            c for c, gs in groups_of_caption.items() if any(group_size[g] > 1 for g in gs)
        }

    def kind(prompt: str) -> str:
        if prompt not in groups_of_caption:
            return "unseen"
        return "duplicated" if prompt in duplicated else "ordinary"

    generations = []
    for i, prompt in enumerate(samples.captions):
        replica = bool(result.is_replica[i])
        nearest = int(result.nearest[i])
        own = int(result.nearest_group[i]) in groups_of_caption.get(prompt, set())
        generations.append(
            {
                "file_name": samples.records[i].path.name,
                "prompt": prompt,
                "kind": kind(prompt),
                "ratio": float(result.ratio[i]),
                "replica": replica,
                "own_replica": replica and own,
                "nearest_is_own": own,
                "nearest_file": train.records[nearest].path.name,
            }
        )

    def figures(rows: list[dict]) -> dict:
        return {
            "generations": len(rows),
            "replica_rate": _rate([r["replica"] for r in rows]),
            "own_replica_rate": _rate([r["own_replica"] for r in rows]),
            "nearest_is_own_rate": _rate([r["nearest_is_own"] for r in rows]),
        }

    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in generations:
        by_prompt[row["prompt"]].append(row)
    hits = Counter(row["nearest_file"] for row in generations if row["replica"])
    caption_of = {record.path.name: record.text for record in train.records}
    return {
        "criterion": "gu: d1/d2 < threshold, pixel space, distinct training images",
        "threshold": threshold,
        "resolution": resolution,
        "num_train_images": len(train),
        "num_distinct_train_images": len(group_size),
        "overall": figures(generations),
        "by_prompt_kind": {
            k: figures([r for r in generations if r["kind"] == k])
            for k in ("duplicated", "ordinary", "unseen")
            if any(r["kind"] == k for r in generations)
        },
        "prompts": [
            {"prompt": p, "kind": kind(p), **figures(rows)} for p, rows in by_prompt.items()
        ],
        "most_replicated": [
            {"file_name": name, "caption": caption_of[name], "replicas": count}
            for name, count in hits.most_common(20)
        ],
        "generations": generations,
    }
