"""Gradient projection in patch mode: the patch detector finds a mark wherever it is, each
sample's prediction gradient is projected off its own footprint, and the protocol's guarantees
(strength zero, a SIGKILLed run resumes, two processes equal one, settings; attach/detach is
test_projection.py's, for every mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import (
    kill_after_first_checkpoint,
    tiny_config,
    tiny_run,
    tiny_settings,
    train_on_two_processes,
)
from memguard import Trainer
from memguard.config import ConfigError
from memguard.defenses import PatchProjection, rebuild
from memguard.defenses.concept_detector import PatchDetector, fit_patch_detector, footprints
from memguard.models import build_unet
from test_trainer import assert_same_weights

CONCEPT = ("the acme logo",)
MARK = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])  # a checker


def marked_images(count: int, seed: int, with_mark: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, 12, 12) smooth random images and, `with_mark`, the checker stamped at a random
    place in every channel; and where it is (count, 12, 12)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 3, 3, generator=generator) * 1.2 - 0.6
    images = torch.nn.functional.interpolate(coarse, size=12, mode="bilinear")
    where = torch.zeros(count, 12, 12, dtype=torch.bool)
    if with_mark:
        for i, (y, x) in enumerate(torch.randint(0, 10, (count, 2), generator=generator)):
            images[i, :, y : y + 3, x : x + 3] = MARK
            where[i, y : y + 3, x : x + 3] = True
    return images, where


def test_the_detector_scores_a_pattern_alike_on_every_background() -> None:
    """It sees each image minus its local mean: a pattern scores the same on a black, grey or
    white background, and uniform images score alike whatever their colour."""
    torch.manual_seed(0)
    backgrounds = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 12, 12)
    pattern = marked_images(1, seed=0, with_mark=True)[0] * 0.3
    for images in (backgrounds, backgrounds + pattern):
        scores = PatchDetector(3)(images)
        assert torch.allclose(scores, scores[:1].expand_as(scores), atol=1e-5)
        raw = PatchDetector(3, local_mean=0)(images)
        assert not torch.allclose(raw, raw[:1].expand_as(raw), atol=1e-3)


def test_the_detector_finds_a_mark_wherever_it_is() -> None:
    exemplars, _ = marked_images(48, seed=0, with_mark=True)
    anchors, _ = marked_images(192, seed=1, with_mark=False)
    fit = fit_patch_detector(exemplars, anchors, steps=200, seed=0)
    assert fit.recall == 1.0
    new, where = marked_images(32, seed=2, with_mark=True)
    found = footprints(fit.detector, new, fit.threshold, grow=1)
    assert found[where].float().mean() > 0.95  # the mark is covered
    # and little else: the mark, the 2 pixels around it whose local mean it changes, and the
    # 1-pixel rim are 9 x 9 of the 12 x 12 positions (56%)
    assert found.float().mean() < 0.56
    plain, _ = marked_images(64, seed=3, with_mark=False)
    assert footprints(fit.detector, plain, fit.threshold).flatten(1).any(1).float().mean() < 0.15


def test_patch_mode_projects_each_images_own_footprint() -> None:
    """The parameter gradients are those of the loss on the residual zeroed, per sample, where
    the detector finds the concept in that sample's clean input."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, cross_attention_dim=384)
    detector = PatchDetector(3)
    x0, noisy, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    threshold = float(detector(x0).quantile(0.8))  # about a fifth of the positions
    states, t = torch.randn(2, 4, 384), torch.tensor([10, 500])
    footprint = footprints(detector, x0, threshold, grow=0)
    assert footprint[0].any() and not torch.equal(footprint[0], footprint[1])

    def gradients(masked_loss: bool) -> list[torch.Tensor]:
        unet.zero_grad()
        residual = unet(noisy, t, encoder_hidden_states=states).sample - target
        if masked_loss:
            residual = residual * ~footprint.unsqueeze(1)
        residual.square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    reference = gradients(masked_loss=True)
    projection = PatchProjection(detector=detector, threshold=threshold, grow=0)
    projection.attach(unet, torch.optim.SGD(unet.parameters(), lr=0.0))
    assert torch.equal(projection.locate(x0), footprint)
    defended = gradients(masked_loss=False)
    unlocated = gradients(masked_loss=False)  # a forward pass of no located batch is untouched
    projection.detach()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(defended, reference, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(unlocated, gradients(False), strict=True))
    assert 0 < projection.report()["signal_removed"] < 1


def test_strength_zero_equals_plain_training(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain")).train()
    never_found = PatchProjection(detector=PatchDetector(3), threshold=float("inf"))
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "patch"), [never_found]).train()
    assert_same_weights(tmp_path / "plain", tmp_path / "patch")


# A detector trained briefly on the small benchmark's 6 exemplars: what the runs below need is
# the mode's machinery, not a good detector.
PATCH_SETTINGS = {
    "defense": ("projection",),
    "concept": CONCEPT,
    "max_text_length": 16,
    "projection_mode": "patch",
    "projection_detector_steps": 30,
    "projection_min_recall": 0.0,
}


def patch(shapes_dir: Path, **overrides) -> dict:
    """Patch mode's settings on the small benchmark."""
    exemplars = str(shapes_dir / "concept_exemplars")
    return {"concept_exemplars": exemplars, **PATCH_SETTINGS, **overrides}


def records(output: Path) -> list[dict]:
    return json.loads((output / "memguard.json").read_text())["defenses"]


def test_a_killed_run_resumes_to_the_same_weights_and_report(shapes_dir: Path, tmp_path: Path):
    steps = {"max_train_steps": 60, "checkpointing_steps": 15, "logging_steps": 15}
    train = shapes_dir / "train"
    Trainer(*tiny_run(train, tmp_path / "full", **patch(shapes_dir, **steps))).train()
    kill_after_first_checkpoint(
        tiny_settings(train, tmp_path / "killed", **patch(shapes_dir, **steps))
    )
    resumed = patch(shapes_dir, resume_from_checkpoint="latest", **steps)
    config, defenses = tiny_run(train, tmp_path / "killed", **resumed)
    assert 0 < Trainer(config, defenses).train().steps_run < 60
    assert_same_weights(tmp_path / "full", tmp_path / "killed")
    full, killed = records(tmp_path / "full")[0], records(tmp_path / "killed")[0]
    assert killed["report"] == full["report"] and full["report"]["mode"] == "patch"
    assert 0 < full["report"]["signal_removed"] < 0.5


def test_two_processes_match_one(shapes_dir: Path, tmp_path: Path) -> None:
    train = shapes_dir / "train"
    Trainer(*tiny_run(train, tmp_path / "one", **patch(shapes_dir, train_batch_size=8))).train()
    done = train_on_two_processes(
        tiny_settings(train, tmp_path / "two", **patch(shapes_dir, train_batch_size=4))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)
    one, two = records(tmp_path / "one")[0]["report"], records(tmp_path / "two")[0]["report"]
    assert one["detector_recall"] == two["detector_recall"]  # each process trains the same one
    assert one["signal_removed_first_step"] == pytest.approx(two["signal_removed_first_step"])
    assert one["signal_removed"] == pytest.approx(two["signal_removed"])  # the group's


def test_the_recorded_settings_rebuild_the_defense(shapes_dir: Path, tmp_path: Path) -> None:
    config, (projection,) = tiny_run(
        shapes_dir / "train", tmp_path / "run", **patch(shapes_dir, max_train_steps=1)
    )
    Trainer(config, [projection]).train()
    (rebuilt,) = rebuild(records(tmp_path / "run"), config)
    assert type(rebuilt) is PatchProjection and rebuilt.config == projection.config


def test_its_settings_are_checked(shapes_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="projection_detector_steps: a setting of projection_mode patch"
    ):
        image_mode = patch(shapes_dir, projection_mode="image")
        tiny_run(shapes_dir / "train", tmp_path / "x", **image_mode)
    with pytest.raises(ConfigError, match="concept_exemplars: --projection_mode patch needs"):
        tiny_run(shapes_dir / "train", tmp_path / "x", **PATCH_SETTINGS)
    hopeless = patch(shapes_dir, projection_min_recall=1.0, projection_detector_steps=1)
    config, (projection,) = tiny_run(shapes_dir / "train", tmp_path / "x", **hopeless)
    with pytest.raises(ConfigError, match="projection_min_recall: the patch detector found"):
        Trainer(config, [projection]).train()
    assert not (tmp_path / "x" / "diffusion_pytorch_model.safetensors").exists()


def test_a_detector_saved_before_the_local_mean_is_refused() -> None:
    state = PatchProjection(detector=PatchDetector(3), threshold=0.0).state_dict()
    state["detector_shape"] = state["detector_shape"][:3]  # as saved before `local_mean`
    with pytest.raises(ValueError, match="saw raw pixels; it cannot be resumed"):
        PatchProjection(detector=PatchDetector(3)).load_state_dict(state)
