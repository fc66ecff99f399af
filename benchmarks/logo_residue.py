"""How much of the acme logo a projection run left learnable, and how strongly its model draws it.

Two figures behind the README's account of image-mode projection (benchmark only):

- coverage: the fraction of the energy of the logo's own pattern (the logo in pixel space,
  each channel's mean over its 4 x 4 patch removed: the ring against the core) that lies in the
  image-mode subspace a run guarded, read from the run's last checkpoint;
- opacity: for every audit generation whose prompt names the concept, the least-squares `a` in
  corner - background = a (logo - background), with the background taken as the mean of the
  image's top-left 3 x 3 pixels (1: the logo as trained, 0: none).

    python benchmarks/logo_residue.py --runs runs/bench --arms plain oracle image \
        --output runs/bench/logo_residue.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memguard.data.shapes import CONCEPT, LOGO_COLORS, LOGO_PATTERN, stamp_logo
from memguard.io import write_json

SIZE = 16


def logo_patch() -> tuple[np.ndarray, slice]:
    """The logo's pixels (4, 4, 3) in [0, 255] and the slice of rows/columns it occupies."""
    blank = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    stamped = np.array(stamp_logo(blank)).astype(float)
    rows = np.flatnonzero(stamped.sum(axis=(1, 2)))
    where = slice(int(rows[0]), int(rows[-1]) + 1)
    patch = stamped[where, where]
    assert patch.shape[:2] == LOGO_PATTERN.shape and tuple(patch[0, 0]) == LOGO_COLORS[1]
    return patch, where


def pattern_coverage(run: Path) -> float | None:
    """Energy fraction of the logo's own pattern inside the run's image-mode subspace."""
    for state_file in sorted(run.glob("checkpoints/*/custom_checkpoint_*.pkl")):
        state = torch.load(state_file, weights_only=False)
        if isinstance(state, dict) and state.get("image_basis") is not None:
            basis = state["image_basis"].double()
            break
    else:
        return None
    patch, where = logo_patch()
    pattern = torch.zeros(3, SIZE, SIZE, dtype=torch.float64)
    own = torch.from_numpy(patch / 127.5 - 1.0).permute(2, 0, 1)  # the model's [-1, 1] scale
    pattern[:, where, where] = own - own.mean(dim=(1, 2), keepdim=True)
    flat = pattern.flatten()
    return float((flat @ basis).square().sum() / flat.square().sum())


def opacities(run: Path) -> list[float]:
    """Estimated logo opacity of each audit generation whose prompt names the concept."""
    patch, where = logo_patch()
    samples = run / "audit" / "samples"
    found = []
    for line in (samples / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        if CONCEPT not in record["text"]:
            continue
        image = np.array(Image.open(samples / record["file_name"]).convert("RGB")).astype(float)
        background = image[1:4, 1:4].reshape(-1, 3).mean(axis=0)
        target, seen = patch - background, image[where, where] - background
        found.append(float((seen * target).sum() / (target * target).sum()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/bench"))
    parser.add_argument("--arms", nargs="+", default=["plain", "oracle", "image"])
    parser.add_argument("--output", type=Path, default=Path("runs/bench/logo_residue.json"))
    args = parser.parse_args()
    result = {}
    for arm in args.arms:
        found = opacities(args.runs / arm)
        result[arm] = {
            "pattern_coverage": pattern_coverage(args.runs / arm),
            "opacity": {
                "generations": len(found),
                "mean": float(np.mean(found)),
                "min": float(np.min(found)),
                "max": float(np.max(found)),
            },
        }
        print(arm, json.dumps(result[arm]))
    write_json(args.output, result)


if __name__ == "__main__":
    main()
