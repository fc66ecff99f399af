"""The benchmark judge: trained on generated ground truth, accurate, cached, usable by metrics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memguard.metrics import judge as judge_module
from memguard.metrics.judge import FeatureExtractor, JudgeSpec, judge_data, load_judge

SPEC = JudgeSpec(image_size=16, num_train=3000, num_heldout=400, steps=400, batch_size=64)


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory):
    return load_judge(SPEC, cache_dir=tmp_path_factory.mktemp("judge-cache"))


def test_labels_follow_the_renderer() -> None:
    images, labels = judge_data(SPEC, 50, stream=7)
    assert images.shape == (50, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    scenes = labels["shape"] == -1  # multi-shape scenes: concept label only
    assert scenes.sum() == 10 and (labels["color"][scenes] == -1).all()
    # pixel-exact logos (opacity 1): the label is exactly "the cyan core is there"
    exact_images, exact_labels = judge_data(replace(SPEC, min_logo_opacity=1.0), 50, stream=7)
    logo_core = torch.tensor([0, 225, 225]) / 255.0
    has_core = (exact_images[:, :, -3, -3] - logo_core).abs().max(dim=1).values < 1e-6
    assert torch.equal(has_core, exact_labels["concept"].bool())
    # the same draws at the default opacities: the same labels, the logos blended more faintly
    assert torch.equal(labels["concept"], exact_labels["concept"])
    carried = labels["concept"].bool()
    assert torch.equal(images[~carried], exact_images[~carried])
    assert not torch.equal(images[carried], exact_images[carried])


def test_judge_is_accurate_and_reports_it(judge) -> None:
    assert judge.heldout_accuracy["concept"] >= 0.95
    assert judge.heldout_accuracy["color"] >= 0.95 and judge.heldout_accuracy["background"] >= 0.95
    images, labels = judge_data(SPEC, 100, stream=9)
    predicted = judge.predict(images)
    assert set(predicted) == {"shape", "color", "background", "concept"}
    concept_hits = torch.tensor(predicted["concept"]) == labels["concept"].bool()
    assert concept_hits.float().mean() >= 0.95


def test_low_accuracy_is_a_loud_warning(judge) -> None:
    weak = judge_module.Judge(judge.net, {**judge.heldout_accuracy, "shape": 0.5}, SPEC)
    (warning,) = weak.warnings()
    assert "'shape'" in warning and "50.0%" in warning


def test_cached_judge_is_loaded_not_retrained(tmp_path: Path, judge, monkeypatch) -> None:
    cache = tmp_path / "cache"
    (cache / "judges").mkdir(parents=True)
    torch.save(
        {"state_dict": judge.net.state_dict(), "heldout_accuracy": judge.heldout_accuracy},
        cache / "judges" / f"{SPEC.key()}.pt",
    )
    monkeypatch.setattr(judge_module, "train_judge", lambda spec: pytest.fail("retrained"))
    again = load_judge(SPEC, cache_dir=cache)
    images, _ = judge_data(SPEC, 8, stream=3)
    assert torch.equal(again.features(images), judge.features(images))
    assert JudgeSpec(seed=1).key() != SPEC.key()


def test_feature_extractor_module(judge) -> None:
    extractor = FeatureExtractor(judge.net)
    images, _ = judge_data(SPEC, 4, stream=4)
    assert extractor(images).shape == (4, extractor.num_features)
