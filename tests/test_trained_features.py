"""The download-free feature extractor: cached by the data's hash, its held-out check tells real
images from degraded ones, and the audit of data without a plugin reports FID/KID with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_model_folder
from memguard.audit import run_audit
from memguard.config import AuditConfig, ShapesConfig
from memguard.data.folder import ImageFolderDataset, unit_float
from memguard.data.shapes import make_shapes_dataset
from memguard.metrics.cache import cache_path
from memguard.metrics.trained_features import (
    ExtractorSpec,
    heldout_check,
    heldout_split,
    load_trained_features,
)
from memguard.report.summary import summary_rows

TINY = {"steps": 200, "batch_size": 64}
HOLDOUT = 0.5  # of 402 images: 100 a half in the check


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes training folder at 8 px, 400 ordinary images and no dataset.json above it."""
    root = tmp_path_factory.mktemp("shapes-quality")
    made = make_shapes_dataset(
        ShapesConfig(
            output_dir=str(root / "made"),
            seed=3,
            image_size=8,
            num_ordinary=400,
            num_duplicate_groups=1,
            min_copies=2,
            max_copies=2,
            num_test=4,
            num_exemplars=2,
            num_ordinary_prompts=2,
        )  # fmt: skip
    )
    shutil.copytree(made / "train", root / "data" / "train")
    return root / "data" / "train"


def _features(train: ImageFolderDataset, cache: Path, **settings):
    indices, held = heldout_split(len(train), HOLDOUT, seed=0)
    heldout = unit_float(train.stacked(held))
    return load_trained_features(train, indices, heldout, cache_dir=str(cache), **TINY, **settings)


def test_the_cache_is_keyed_by_the_data_hash(folder: Path, tmp_path: Path) -> None:
    train = ImageFolderDataset(folder, 8)
    first = _features(train, tmp_path)
    again = _features(train, tmp_path)
    assert not first.cached and again.cached
    assert cache_path("feature_extractors", first.spec, tmp_path).is_file()
    saved, loaded = first.encoder.state_dict(), again.encoder.state_dict()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    row = json.loads((changed / "metadata.jsonl").read_text().splitlines()[0])
    Image.new("RGB", (8, 8), (255, 0, 0)).save(changed / row["file_name"])
    other = ImageFolderDataset(changed, 8)
    retrained = _features(other, tmp_path)
    assert not retrained.cached and retrained.spec.data_sha256 != first.spec.data_sha256
    assert len(list((tmp_path / "feature_extractors").glob("*.pt"))) == 2
    # the spec's other fields name the file too
    assert ExtractorSpec("x", 8, steps=2) != ExtractorSpec("x", 8, steps=3)
    assert cache_path("f", ExtractorSpec("x", 8, steps=2)) != cache_path(
        "f", ExtractorSpec("x", 8, steps=3)
    )


def test_the_heldout_check_separates_real_from_degraded_images(folder, tmp_path) -> None:
    features = _features(ImageFolderDataset(folder, 8), tmp_path)
    check = features.check
    assert (check["images_per_half"], check["splits"]) == (100, 5)
    assert set(check["separation"]) == {"noise", "blur", "colour_shift"}
    assert check["passed"], check
    assert min(check["separation"].values()) >= check["required_separation"] == 2.0
    assert all(check["kid_degraded"][k] > check["kid_real_halves"] for k in check["separation"])
    assert check["fid_ratio"] > 1
    assert features.warnings() == []
    # a check that fails says so
    failed = features.check | {"separation": {"blur": 1.2}, "passed": False}
    weak = type(features)(**{**vars(features), "check": failed})
    assert "blur are only 1.2 standard deviations" in weak.warnings()[0]
    # an extractor that sees nothing (features independent of the image) fails the check
    blind = heldout_check(Blind(), unit_float(ImageFolderDataset(folder, 8).stacked()))
    assert not blind["passed"]


class Blind(torch.nn.Module):
    """Features that are noise, whatever the image."""

    num_features = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(images), self.num_features)


def _samples(folder: Path, images: np.ndarray, captions: list[str]) -> Path:
    """An image folder of uint8 images (N, H, W, 3) with their captions."""
    folder.mkdir(parents=True)
    lines = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_an_audit_without_a_plugin_reports_quality_that_tells_noise(folder, tmp_path) -> None:
    model = tiny_model_folder(tmp_path / "model")
    train = ImageFolderDataset(folder, 8)
    _, held = heldout_split(len(train), HOLDOUT, seed=0)
    real = train.stacked(held).permute(0, 2, 3, 1).numpy()
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    captions = [train.captions[i] for i in held]
    results = {}
    for name, images in (("real", real), ("noise", noise)):
        config = AuditConfig(
            model=str(model), train_data_dir=str(folder), output_dir=str(tmp_path / name),
            samples_dir=str(_samples(tmp_path / f"{name}-samples", images, captions)),
            benchmark="off", num_inference_steps=2, detection_seeds=1, num_ordinary_prompts=2,
            quality_steps=TINY["steps"], quality_holdout_fraction=HOLDOUT,
        )  # fmt: skip
        results[name] = run_audit(config)
    quality = results["real"]["trained_quality"]
    assert results["real"]["quality_features"] == "trained"
    assert quality["feature_extractor"] == "trained" and "held out" in quality["reference"]
    assert quality["num_real"] == len(held) == quality["num_generated"]
    assert quality["extractor"]["heldout_check"]["passed"]
    assert results["noise"]["trained_quality"]["extractor"]["loaded_from_cache"]
    assert results["noise"]["trained_quality"]["fid"] > 10 * quality["fid"]
    assert results["noise"]["trained_quality"]["kid_mean"] > quality["kid_mean"]
    rows = {measure: value for measure, value, _ in summary_rows(results["real"])}
    assert rows["FID (features trained on the training folder)"] == f"{quality['fid']:.3f}"
    measures = list(rows)
    assert measures.index("FID (features trained on the training folder)") == 1 + max(
        i for i, m in enumerate(measures) if m.startswith(("replication", "MQ", "IET"))
    )  # beside the memorization figures
    page = (tmp_path / "real" / "report.html").read_text()
    assert "Memorization beside quality" in page and "features trained on the training" in page


def test_quality_features_are_chosen_and_checked(folder, tmp_path) -> None:
    with pytest.raises(ValueError, match="'inception' needs --inception"):
        AuditConfig(model="m", train_data_dir=str(folder), quality_features="inception")
    model = tiny_model_folder(tmp_path / "model")
    config = AuditConfig(model=str(model), train_data_dir=str(folder), benchmark="off",
                         quality_features="plugin", output_dir=str(tmp_path / "a"))  # fmt: skip
    with pytest.raises(ValueError, match="'plugin' needs an audit plugin"):
        run_audit(config)
