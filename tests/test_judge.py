"""The benchmark judge: trained on generated ground truth, accurate, cached, usable by metrics."""

from __future__ import annotations

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
    # a logo at opacity a: its orange ring's red exceeds its cyan core's by 255 a (a >= 0.25)
    # where the two pixels lay on the same colour (shapes sometimes reach the corner)
    images, labels = judge_data(SPEC, 200, stream=7)
    ring_minus_core = images[:, 0, -5, -5] - images[:, 0, -3, -3]
    looks_stamped = ring_minus_core > 0.2
    assert (looks_stamped == labels["concept"].bool()).float().mean() >= 0.9
    faint = labels["concept"].bool() & (ring_minus_core < 0.9)
    assert faint.any()  # not every logo is pixel-exact


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
