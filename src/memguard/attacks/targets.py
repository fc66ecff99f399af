"""The images an extraction attack aims at, and whether a generation recovers one.

Targets are read from an image folder (`metadata.jsonl`; each image's caption is its original
prompt), from a text file listing images (one path a line, relative to the file, optionally
followed by a tab and the caption), or from a single image file (no caption). They are resized
and center-cropped to the model's image size as training images are.

Recovery (`RecoveryJudge`), in the pixel space of `memguard.metrics.replication`:

- With the training folder, the reference set is the training images followed by the targets.
  Exact copies are merged, so a target that is a training image adds nothing and one that is
  not joins the reference (a target "in the reference set" either way). A generation recovers
  its target when Gu et al.'s criterion holds against the distinct reference images (d1/d2 <
  threshold; "On Memorization in Diffusion Models", Gu et al., 2023) AND the nearest of them is
  the target: a replica of another training image is not a recovery of this one.
- Without the training folder there is no second image to measure d2 against, so each target is
  judged alone: the generation recovers it when its RMS distance to it, ||x - target|| / sqrt(D)
  over the D pixel values in [0, 1], is below `distance_threshold` (an absolute scale that the
  caller sets; 0.1 by default, a tenth of the pixel range).

Either way the L2 distance to the target (Gu's d1 when the target is the nearest) is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from memguard.config import ConfigError
from memguard.data.folder import (
    DataError,
    ImageFolderDataset,
    Record,
    load_image,
    read_metadata,
    unit_float,
)
from memguard.metrics.neighbors import ConcatRows, ImageRows, TensorRows, distinct_rows
from memguard.metrics.replication import gu_replication

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Targets:
    """The target images and their original prompts (None where an image has no caption)."""

    names: list[str]  # as the folder's metadata or the list file writes them
    prompts: list[str | None]
    pixels: torch.Tensor  # (N, 3, H, W) uint8

    def __len__(self) -> int:
        return len(self.names)

    def model_pixels(self) -> torch.Tensor:
        """(N, 3, H, W) float in [-1, 1], the diffusion models' convention."""
        return self.pixels.float().div(127.5).sub(1.0)


def _listed(path: Path) -> tuple[list[Record], list[str], list[str | None]]:
    """The records, names and prompts of a list file: `image path[<TAB>caption]` a line."""
    records, names, prompts = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, _, caption = line.partition("\t")
        image = path.parent / name.strip()
        if not image.is_file():
            raise DataError(f"{path}, line {number}: image file not found: {image}")
        records.append(Record(path=image, text=caption.strip(), line=number))
        names.append(name.strip())
        prompts.append(caption.strip() or None)
    if not records:
        raise DataError(f"{path}: no images listed")
    return records, names, prompts


def read_targets(path: str | Path, resolution: int, flag: str = "--images") -> Targets:
    """Targets from an image folder, a list file or one image (see the module docstring);
    `flag`: the option that named `path`, for the error when it does not exist."""
    path = Path(path)
    if path.is_dir():
        records = read_metadata(path)
        names = [record.columns["file_name"] for record in records]
        prompts: list[str | None] = [record.text for record in records]
    elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        records, names, prompts = [Record(path=path, text="", line=0)], [path.name], [None]
    elif path.is_file():
        records, names, prompts = _listed(path)
    else:
        raise FileNotFoundError(f"{flag}: no such file or folder: {path}")
    if len(set(names)) < len(names):
        raise DataError(f"{path}: an image is listed twice")
    pixels = torch.stack([torch.from_numpy(load_image(r, resolution)) for r in records])
    return Targets(names, prompts, pixels.permute(0, 3, 1, 2).contiguous())


@dataclass(frozen=True)
class Verdict:
    """Whether a generation recovers its target, and how near it came."""

    replicated: bool
    distance: float  # L2 to the target, pixel values in [0, 1]
    ratio: float | None  # Gu's d1/d2 against the reference (None when judged alone)


class RecoveryJudge:
    """Judges generations against their targets (see the module docstring for the criterion).

    `train`: the training folder at the targets' resolution, or None to judge each target
    alone; `device`: where the nearest-neighbour search runs.
    """

    def __init__(
        self,
        targets: Targets,
        train: ImageFolderDataset | None,
        threshold: float = 1 / 3,
        distance_threshold: float = 0.1,
        device: str | torch.device | None = None,
    ) -> None:
        self.targets = unit_float(targets.pixels).flatten(1)
        self.threshold, self.distance_threshold, self.device = threshold, distance_threshold, device
        self.train = train
        if train is None:
            return
        self.reference = ConcatRows(ImageRows(train), TensorRows(self.targets))
        self.distinct = distinct_rows(self.reference)
        representatives, groups = self.distinct
        if len(representatives) < 2:
            raise ConfigError("the d1/d2 criterion needs at least two distinct reference images")
        self.target_groups = groups[len(train) :]
        self.in_train = torch.isin(self.target_groups, groups[: len(train)])

    def criterion(self) -> dict:
        """The criterion, as the attack's JSON records it."""
        if self.train is None:
            return {
                "kind": "distance",
                "rule": "RMS distance to the target (pixel values in [0, 1]) < distance_threshold",
                "distance_threshold": self.distance_threshold,
            }
        return {
            "kind": "gu",
            "rule": "Gu et al. 2023: d1/d2 < threshold against the distinct images of the "
            "training folder and the targets, and the nearest of them is the target",
            "threshold": self.threshold,
            "train_data_dir": str(self.train.root),
            "num_distinct_reference_images": len(self.distinct[0]),
        }

    def target_in_train(self, index: int) -> bool | None:
        """Whether target `index` is a training image (None when judged alone)."""
        return None if self.train is None else bool(self.in_train[index])

    def __call__(self, generated: torch.Tensor, which: list[int]) -> list[Verdict]:
        """Verdicts for generations (n, 3, H, W) in [0, 1], generation i aimed at target
        `which[i]`."""
        vectors = generated.flatten(1).float()
        distances = (vectors.double() - self.targets[which].double()).norm(dim=1)
        if self.train is None:
            rms = distances / math.sqrt(vectors.shape[1])
            return [
                Verdict(bool(r < self.distance_threshold), float(d), None)
                for r, d in zip(rms, distances, strict=True)
            ]
        result = gu_replication(
            vectors, self.reference, self.threshold, distinct=self.distinct, device=self.device
        )
        recovered = result.is_replica & (result.nearest_group == self.target_groups[which])
        return [
            Verdict(bool(r), float(d), float(q))
            for r, d, q in zip(recovered, distances, result.ratio, strict=True)
        ]
