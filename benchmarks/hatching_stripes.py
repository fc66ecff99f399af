"""Acme hatching measured without the judge: the energy of generations at the hatching's frequency.

A second reading of the texture kind's extraction rates, independent of the judge's learned
head. Acme hatching is diagonal stripes with `HATCH_STRIPES` periods per image side, so a hatched
image has energy at one spatial frequency that a plain fill lacks: the (k, k) and (-k, -k)
coefficients of the 2-D Fourier transform of its luminance (mean removed), k = HATCH_STRIPES.
The score is that energy as a share of the image's whole. The threshold is the one that best
separates the ordinary training images with hatching from those without (balanced accuracy);
the script reports how well it does on them, then the share of each sample folder's images
(from `memguard sample`, typically with the concept prompts) that score above it.

    memguard sample --model RUN --prompt_file DATA/prompts/concept.txt --num_images 2 \
        --output_dir SAMPLES
    python benchmarks/hatching_stripes.py DATA SAMPLES... --output runs/stripes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from memguard.data.folder import read_metadata
from memguard.data.shapes import HATCH_STRIPES
from memguard.io import write_json


def stripe_score(image: Image.Image) -> float:
    """The share of the image's luminance energy (mean removed) at the hatching's frequency."""
    luminance = np.asarray(image.convert("L"), dtype=float)
    power = np.abs(np.fft.fft2(luminance - luminance.mean())) ** 2
    k = HATCH_STRIPES
    return float((power[k, k] + power[-k, -k]) / max(power.sum(), 1e-12))


def calibrate(train: Path) -> dict:
    """The threshold that best separates the ordinary training images with and without the
    hatching (maximum balanced accuracy), and how well it does."""
    scores: dict[bool, list[float]] = {True: [], False: []}
    for record in read_metadata(train):
        if record.columns.get("kind") == "ordinary":
            scores[bool(record.columns["has_concept"])].append(
                stripe_score(Image.open(record.path))
            )
    hatched, plain = np.array(scores[True]), np.array(scores[False])
    if not len(hatched) or not len(plain):
        raise SystemExit(f"{train}: needs ordinary images with and without the hatching")
    candidates = np.unique(np.concatenate([hatched, plain]))
    balanced = [((hatched >= t).mean() + (plain < t).mean()) / 2 for t in candidates]
    threshold = float(candidates[int(np.argmax(balanced))])
    return {
        "threshold": threshold,
        "hatched_training_images_found": float((hatched >= threshold).mean()),
        "plain_training_images_flagged": float((plain >= threshold).mean()),
        "hatched_training_images": len(hatched),
        "plain_training_images": len(plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="a texture benchmark folder (dataset.json)")
    parser.add_argument("samples", nargs="+", type=Path, help="folders from `memguard sample`")
    parser.add_argument("--output", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    result = {"calibration": calibrate(args.data / "train"), "samples": {}}
    threshold = result["calibration"]["threshold"]
    for folder in args.samples:
        records = read_metadata(folder)
        scores = np.array([stripe_score(Image.open(record.path)) for record in records])
        result["samples"][str(folder)] = {
            "images": len(scores),
            "with_stripes": float((scores >= threshold).mean()),
            "median_score": float(np.median(scores)),
        }
    print(json.dumps(result, indent=2))
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
