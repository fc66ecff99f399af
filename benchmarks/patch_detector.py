"""Patch mode's detector against the benchmark's ground truth, per concept kind.

For each benchmark folder given (`memguard data shapes --concept_kind KIND`), the detector is
trained exactly as `memguard train --projection_mode patch` trains it (the exemplars against
four times as many training images whose captions name no concept, seeded by the run's seed),
then run over every training image. Reported: its held-out recall and threshold, the share of
the concept's training images in which it finds anything, the share of the other images in
which it finds something (each such image loses part of its signal for nothing), the share of
the concept's images found on each background colour, the mean share of positions its
footprints cover, and, where the data records where the concept is (the moving
logo's `logo_x`, `logo_y`, `logo_scale`, `logo_angle`), the share of the logo the footprints
cover (pixels weighted by how much of each the logo paints) and the share of logos whose every
pixel more than half painted is covered; for acme hatching, which fills the shape, the same two
figures over the shape's pixels (those more than 15% of full scale away from the background's
colour in some channel). Both are `concept_area_covered` and `concepts_wholly_covered`.

    memguard data shapes --concept_kind moving --output_dir runs/moving
    python benchmarks/patch_detector.py runs/moving --output runs/patch_detector.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memguard import io
from memguard.data.folder import ImageFolderDataset, read_metadata
from memguard.data.shapes import (
    BACKGROUNDS,
    ConceptKind,
    dataset_concept_kind,
    logo_side,
    paint_logo,
)
from memguard.data.text import MiniLMEncoder
from memguard.defenses.base import TrainingContext
from memguard.defenses.exemplars import ExemplarSource
from memguard.defenses.projection_patch import PatchProjection


def logo_weights(row: dict, size: int) -> torch.Tensor:
    """(size, size): how much of each pixel the moving logo of `row` covers (0 to 1; its
    area-sampled edges partly), from its paint on black and on white."""
    side = row["logo_scale"] * logo_side(size)
    weight = np.zeros((size, size))
    for shade in (0, 255):
        blank = Image.new("RGB", (size, size), (shade, shade, shade))
        painted = paint_logo(blank, row["logo_x"], row["logo_y"], side, row["logo_angle"])
        weight = np.maximum(weight, np.abs(np.array(painted, float) - shade).max(axis=2) / 255)
    return torch.from_numpy(weight / weight.max())


def shape_pixels(image: torch.Tensor, background: str) -> torch.Tensor:
    """(size, size) bool: the pixels of `image` (3, size, size, in [-1, 1]) more than 15% of full
    scale away from the colour of its `background` in some channel: the shape, hatching included."""
    shade = torch.tensor(BACKGROUNDS[background], dtype=image.dtype)[:, None, None] / 127.5 - 1
    return ((image - shade).abs().amax(0) / 2) > 0.15


def concept_weights(
    kind: ConceptKind, row: dict, image: torch.Tensor, size: int
) -> torch.Tensor | None:
    """(size, size): where the concept of a training image is, 0 to 1, when the data says: the
    moving logo's paint, or the shape that acme hatching fills; None for the fixed logo."""
    if "logo_x" in kind.columns:
        return logo_weights(row, size)
    if kind.name == "texture":
        return shape_pixels(image, row["background"]).double()
    return None


def measure(root: Path, resolution: int, seed: int, steps: int, local_mean: int, grow: int) -> dict:
    kind = dataset_concept_kind(root)
    source = ExemplarSource(str(root / "concept_exemplars"), str(root / "train"), resolution, seed)
    projection = PatchProjection(
        (kind.concept,),
        source.exemplars,
        detector_steps=steps,
        local_mean=local_mean,
        grow=grow,
        min_recall=0.0,
        source=source,
    )
    ctx = TrainingContext(text_encoder=MiniLMEncoder(max_length=16))
    start = time.perf_counter()
    projection.prepare(ctx)
    seconds = time.perf_counter() - start

    train = ImageFolderDataset(str(root / "train"), resolution)
    rows = [record.columns for record in read_metadata(root / "train")]
    images = torch.stack([train[i]["pixel_values"] for i in range(len(train))])
    found = projection.locate(images)
    has_concept = torch.tensor([bool(row["has_concept"]) for row in rows])
    any_found = found.flatten(1).any(1)
    result = {
        "concept_kind": kind.name,
        "detector_seconds": round(seconds, 1),
        "detector_recall_heldout": projection.recall,
        "threshold": projection.threshold,
        "concept_images_found": float(any_found[has_concept].float().mean()),
        "other_images_with_a_footprint": float(any_found[~has_concept].float().mean()),
        "footprint_share_concept_images": float(found[has_concept].float().mean()),
        "footprint_share_other_images": float(found[~has_concept].float().mean()),
    }
    background = [row.get("background") for row in rows]
    found_by_background = {}
    for shade in sorted({b for b in background if b}):
        on_it = has_concept & torch.tensor([b == shade for b in background])
        if on_it.any():
            found_by_background[shade] = float(any_found[on_it].float().mean())
    result["concept_images_found_by_background"] = found_by_background
    covered, whole = [], []
    for i in torch.nonzero(has_concept).flatten().tolist():
        weight = concept_weights(kind, rows[i], images[i], resolution)
        if weight is not None:
            covered.append(float((weight * found[i]).sum() / weight.sum()))
            whole.append(bool(found[i][weight > 0.5].all()))
    if covered:
        result["concept_area_covered"] = float(np.mean(covered))
        result["concepts_wholly_covered"] = float(np.mean(whole))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="benchmark folders (dataset.json)")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed")
    parser.add_argument("--detector_steps", type=int, default=400)
    parser.add_argument(
        "--local_mean", type=int, default=5, help="--projection_detector_local_mean (0: off)"
    )
    parser.add_argument("--grow", type=int, default=2, help="--projection_footprint_grow")
    parser.add_argument("--output", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    results = {
        str(root): measure(
            root, args.resolution, args.seed, args.detector_steps, args.local_mean, args.grow
        )
        for root in args.data
    }
    print(json.dumps(results, indent=2))
    if args.output:
        io.write_json(args.output, results)


if __name__ == "__main__":
    main()
