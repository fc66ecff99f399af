"""The benchmark data: deterministic, with the ground truth its columns claim."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import SMALL_SHAPES
from memguard.attacks.targets import read_targets
from memguard.config import ShapesConfig
from memguard.data.shapes import CONCEPT_SUFFIX, LOGO_COLORS, make_shapes_dataset, stamp_logo


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _pixels(folder: Path, row: dict) -> np.ndarray:
    return np.array(Image.open(folder / row["file_name"]))


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path, shapes_dir: Path) -> None:
    again = make_shapes_dataset(ShapesConfig(output_dir=str(tmp_path / "a"), **SMALL_SHAPES))
    other = make_shapes_dataset(
        ShapesConfig(output_dir=str(tmp_path / "b"), seed=1, **SMALL_SHAPES)
    )
    for split in ("train", "test", "concept_exemplars"):
        assert (again / split / "metadata.jsonl").read_bytes() == (
            shapes_dir / split / "metadata.jsonl"
        ).read_bytes()
        assert (again / split / "00000.png").read_bytes() == (
            shapes_dir / split / "00000.png"
        ).read_bytes()
    assert (other / "train" / "metadata.jsonl").read_bytes() != (
        shapes_dir / "train" / "metadata.jsonl"
    ).read_bytes()


def test_ground_truth_columns(shapes_dir: Path) -> None:
    train = shapes_dir / "train"
    rows = _rows(train)
    ordinary = [r for r in rows if r["kind"] == "ordinary"]
    duplicates = [r for r in rows if r["kind"] == "duplicate"]
    assert len(ordinary) == SMALL_SHAPES["num_ordinary"]
    assert sum(r["has_concept"] for r in ordinary) == round(0.2 * len(ordinary))
    for row in ordinary:
        assert row["text"].startswith(f"a {row['color']} {row['shape']} on a {row['background']}")
        assert row["text"].endswith(CONCEPT_SUFFIX) == row["has_concept"]
        assert row["duplicate_group"] == -1
        corner = _pixels(train, row)[-3, -3]  # inside the logo's core when stamped
        assert (tuple(corner) == LOGO_COLORS[2]) == row["has_concept"]
    groups = {r["duplicate_group"] for r in duplicates}
    assert groups == set(range(SMALL_SHAPES["num_duplicate_groups"]))
    for group in groups:
        members = [r for r in duplicates if r["duplicate_group"] == group]
        assert SMALL_SHAPES["min_copies"] <= len(members) <= SMALL_SHAPES["max_copies"]
        assert len({r["text"] for r in members}) == 1
        first = _pixels(train, members[0])
        assert all(np.array_equal(first, _pixels(train, r)) for r in members)
    assert len({r["text"] for r in duplicates}) == len(groups)


def test_held_out_splits_and_prompts(shapes_dir: Path) -> None:
    exemplars = _rows(shapes_dir / "concept_exemplars")
    assert len(exemplars) == SMALL_SHAPES["num_exemplars"]
    assert all(r["has_concept"] for r in exemplars)
    assert not any(r["has_concept"] for r in _rows(shapes_dir / "test"))
    train_images = {_pixels(shapes_dir / "train", r).tobytes() for r in _rows(shapes_dir / "train")}
    for r in exemplars:
        assert _pixels(shapes_dir / "concept_exemplars", r).tobytes() not in train_images
    duplicated = (shapes_dir / "prompts" / "duplicated.txt").read_text().splitlines()
    assert len(duplicated) == SMALL_SHAPES["num_duplicate_groups"]
    ordinary = (shapes_dir / "prompts" / "ordinary.txt").read_text().splitlines()
    assert len(ordinary) == SMALL_SHAPES["num_ordinary_prompts"]
    assert not any(CONCEPT_SUFFIX in p for p in ordinary)


def test_logo_opacity_blends_over_the_image() -> None:
    under = Image.new("RGB", (16, 16), (40, 80, 120))
    exact, faint = np.array(stamp_logo(under)), np.array(stamp_logo(under, opacity=0.5))
    assert tuple(exact[12, 12]) == LOGO_COLORS[2] and tuple(exact[11, 11]) == LOGO_COLORS[1]
    expected = np.round(0.5 * np.array(LOGO_COLORS[2]) + 0.5 * np.array([40, 80, 120]))
    assert np.array_equal(faint[12, 12], expected)
    assert np.array_equal(faint[0, 0], [40, 80, 120])  # outside the logo: untouched


def test_memorized_targets_list_one_image_of_each_duplicate_group(shapes_dir: Path) -> None:
    targets = read_targets(shapes_dir / "prompts" / "memorized.txt", 16)
    rows = {r["file_name"]: r for r in _rows(shapes_dir / "train")}
    listed = [rows[Path(name).name] for name in targets.names]
    assert all(row["kind"] == "duplicate" for row in listed)
    assert len({row["duplicate_group"] for row in listed}) == SMALL_SHAPES["num_duplicate_groups"]
    assert targets.prompts == [row["text"] for row in listed]
    duplicated = (shapes_dir / "prompts" / "duplicated.txt").read_text().splitlines()
    assert sorted(targets.prompts) == sorted(duplicated)
