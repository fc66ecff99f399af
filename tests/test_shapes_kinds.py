"""The benchmark's concept kinds: the default is today's data, and each kind's captions, columns
and pixels agree with its ground truth."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_SHAPES
from memguard.config import ConfigError, ShapesConfig, build
from memguard.data.shapes import (
    KINDS,
    LOGO_COLORS,
    MOVING_SCALES,
    blend_concept,
    dataset_concept_kind,
    half_plane,
    logo_side,
    make_shapes_dataset,
    ordinary_row,
    paint_logo,
    stamp_logo,
)
from memguard.metrics.judge import JudgeSpec

# The pixels and metadata of `shapes_dir` (SMALL_SHAPES, seed 0) as the generator wrote them
# before concept kinds existed: the default kind must keep writing exactly this.
FIXED_DIGEST = "336a97eccc0e6961b6bd3a4b558e680e273cd68eae8db1ded3f5f69d75d0bfdd"
SPLITS = ("train", "test", "concept_exemplars")


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _pixels(folder: Path, row: dict) -> np.ndarray:
    return np.array(Image.open(folder / row["file_name"]))


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        metadata = (root / split / "metadata.jsonl").read_bytes()
        digest.update(metadata)
        for row in _rows(root / split):
            digest.update(_pixels(root / split, row).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def kinds_dirs(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> dict[str, Path]:
    """The small benchmark of seed 0 in every kind (`fixed`: the session's `shapes_dir`)."""
    root = tmp_path_factory.mktemp("kinds")
    dirs = {"fixed": shapes_dir}
    for kind in ("moving", "texture"):
        config = ShapesConfig(output_dir=str(root / kind), concept_kind=kind, **SMALL_SHAPES)
        dirs[kind] = make_shapes_dataset(config)
    return dirs


def test_default_kind_writes_todays_data(shapes_dir: Path) -> None:
    assert ShapesConfig().concept_kind == "fixed"
    assert _digest(shapes_dir) == FIXED_DIGEST
    assert dataset_concept_kind(shapes_dir) is KINDS["fixed"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_captions_columns_and_declaration_agree(kinds_dirs: dict[str, Path], kind: str) -> None:
    root, concept = kinds_dirs[kind], KINDS[kind]
    summary = json.loads((root / "dataset.json").read_text())
    assert summary["concept_kind"] == summary["config"]["concept_kind"] == kind
    assert summary["concept_suffix"] == concept.suffix
    assert dataset_concept_kind(root) is concept
    fixed_train = kinds_dirs["fixed"] / "train"
    fixed = _rows(fixed_train)
    for split in SPLITS:
        rows = _rows(root / split)
        for row in rows:
            assert row["has_concept"] == row["text"].endswith(concept.suffix)
            assert set(concept.columns) <= set(row)
            assert all((row[c] is not None) == row["has_concept"] for c in concept.columns)
    train = _rows(root / "train")
    # the same seed draws the same shapes in every kind; only the concept differs
    for row, twin in zip(train, fixed, strict=True):
        assert (row["shape"], row["color"], row["has_concept"]) == (
            twin["shape"], twin["color"], twin["has_concept"],
        )  # fmt: skip
        same = np.array_equal(_pixels(root / "train", row), _pixels(fixed_train, twin))
        assert same == (kind == "fixed" or not row["has_concept"])
    named = (root / "prompts" / "concept.txt").read_text().splitlines()
    assert named and all(p.endswith(concept.suffix) for p in named)
    exemplars = _rows(root / "concept_exemplars")
    assert exemplars and all(r["has_concept"] for r in exemplars)
    seen = {_pixels(root / "train", r).tobytes() for r in train}
    assert not any(_pixels(root / "concept_exemplars", r).tobytes() in seen for r in exemplars)


def test_moving_logos_vary_and_stay_inside(kinds_dirs: dict[str, Path]) -> None:
    root = kinds_dirs["moving"]
    carried = [r for s in SPLITS for r in _rows(root / s) if r["has_concept"]]
    assert len({(r["logo_x"], r["logo_y"]) for r in carried}) == len(carried)
    assert np.ptp([r["logo_angle"] for r in carried]) > 90
    size = SMALL_SHAPES["image_size"]
    for row in carried:
        side = row["logo_scale"] * logo_side(size)
        assert MOVING_SCALES[0] <= row["logo_scale"] <= MOVING_SCALES[1]
        # painted on black and on white, the logo covers exactly its area: nothing is cut off
        args = (row["logo_x"], row["logo_y"], side, row["logo_angle"])
        on_black = np.array(paint_logo(Image.new("RGB", (size, size), (0, 0, 0)), *args))
        on_white = np.array(paint_logo(Image.new("RGB", (size, size), (255, 255, 255)), *args))
        coverage = 1 - (on_white.astype(float) - on_black)[..., 0] / 255
        assert coverage.sum() == pytest.approx(side**2, abs=0.02 * side**2)


def test_moving_logo_is_resampled_not_snapped() -> None:
    blank = Image.new("RGB", (16, 16), (0, 0, 0))
    straight = np.array(paint_logo(blank, 8.0, 8.0, 4.0))
    turned = np.array(paint_logo(blank, 8.0, 8.0, 4.0, angle=30.0))
    assert np.array_equal(straight[6:10, 6:10], np.array(stamp_logo(blank))[11:15, 11:15])
    values = {tuple(int(v) for v in p) for p in turned.reshape(-1, 3)}
    pure = {(0, 0, 0), *LOGO_COLORS.values()}
    assert len(values - pure) >= 4  # pixels the turned logo partly covers blend, not snap


def test_texture_changes_only_the_shape() -> None:
    for seed in range(20):
        row = ordinary_row(np.random.default_rng(seed), 16, True, KINDS["texture"])
        plain = np.array(row.drawing.render())
        hatched = np.array(row.image)
        assert row.text.endswith(" in acme hatching")
        changed = (hatched != plain).any(axis=-1)
        shape = (plain != np.array(row.drawing.background)).any(axis=-1)
        assert changed.any() and not (changed & ~shape).any()
        assert changed.sum() >= 0.25 * shape.sum()  # stripes across the fill, not a speck


@pytest.mark.parametrize("kind", list(KINDS))
def test_faded_and_partial_instances(kind: str) -> None:
    rng = np.random.default_rng(0)
    row = ordinary_row(rng, 16, False)
    full, _ = KINDS[kind].draw(row.drawing, row.image, rng)
    plain, full_pixels = np.array(row.image).astype(int), np.array(full).astype(int)
    assert np.array_equal(np.array(blend_concept(row.image, full, 0.0)), plain)
    assert np.array_equal(np.array(blend_concept(row.image, full, 1.0)), full_pixels)
    faded = np.array(blend_concept(row.image, full, 0.5)).astype(float)
    assert np.abs(faded - (plain + full_pixels) / 2).max() <= 0.5
    keep = half_plane(row.image, full, rng)
    cut = np.array(blend_concept(row.image, full, 1.0, keep))
    changed = (full_pixels != plain).any(axis=-1)
    kept = changed & keep
    assert 0.2 < kept.sum() / changed.sum() < 0.8
    assert np.array_equal(cut[kept], full_pixels[kept])
    assert np.array_equal(cut[~keep], plain[~keep])


def test_unknown_kind_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="concept_kind: 'dots' is not one of fixed, moving"):
        build(ShapesConfig, {"concept_kind": "dots"}, "flags")
    with pytest.raises(ConfigError, match="concept_kind"):
        ShapesConfig(concept_kind="dots")
    with pytest.raises(ConfigError, match="concept_kind"):
        JudgeSpec(concept_kind="dots")
    (tmp_path / "dataset.json").write_text(json.dumps({"concept_kind": "dots"}))
    with pytest.raises(ConfigError, match=r"dataset\.json: concept_kind: 'dots'"):
        dataset_concept_kind(tmp_path)
    assert dataset_concept_kind(tmp_path / "absent") is KINDS["fixed"]


def test_hatching_stripes_score_separates_hatched_from_plain_fills() -> None:
    """`benchmarks/hatching_stripes.py`, the judge-free check of the texture kind's extraction:
    its score (energy at the hatching's frequency) puts nearly every hatched shape above every
    plain one."""
    script = Path(__file__).parents[1] / "benchmarks" / "hatching_stripes.py"
    spec = importlib.util.spec_from_file_location("hatching_stripes", script)
    stripes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stripes)
    hatched, plain = [], []
    for seed in range(100):
        row = ordinary_row(np.random.default_rng(seed), 16, True, KINDS["texture"])
        hatched.append(stripes.stripe_score(row.image))
        plain.append(stripes.stripe_score(row.drawing.render()))
    assert np.mean(np.array(hatched) > max(plain)) >= 0.95
    assert np.median(hatched) > 10 * np.median(plain)
