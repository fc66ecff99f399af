"""DoRI's embedding-trigger attack: it recovers an image a model memorized and not one it did
not, a target outside the training folder joins the d1/d2 reference, the attack is a function
of its seed, and `memguard attack trigger` writes the triggers, the generations and the JSON for
pixel and latent models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from helpers import tiny_model_folder
from memguard import cli
from memguard.attacks.targets import RecoveryJudge, Targets, read_targets
from memguard.attacks.trigger import TriggerAttack, TriggerRun
from memguard.config import TriggerConfig
from memguard.data.folder import ImageFolderDataset, unit_float
from memguard.data.text import MiniLMEncoder
from memguard.io import DiffusionModel, load_model
from memguard.metrics.neighbors import ConcatRows, ImageRows, TensorRows, distinct_rows
from memguard.models import noise_scheduler


class RecallingUNet(torch.nn.Module):
    """A denoiser that memorized some training images, differentiably in its conditioning: its
    clean-image estimate mixes the stored images with weights softmax(-||y - s_k|| / T), s_k
    the text states of image k's caption, and it predicts the exact noise of that estimate. At
    a caption's states it is that caption's image (the other weights underflow); in between,
    the weights move smoothly, so an attack on y has gradients to follow."""

    def __init__(self, states: torch.Tensor, images: torch.Tensor, scheduler: DDPMScheduler):
        super().__init__()
        self.images = torch.nn.Parameter(images, requires_grad=False)  # (K, 3, S, S) in [-1, 1]
        self.register_buffer("states", states.flatten(1))  # (K, L d)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone())
        self.config = SimpleNamespace(sample_size=images.shape[-1], in_channels=images.shape[1])

    def forward(self, x: torch.Tensor, t, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        offsets = encoder_hidden_states.flatten(1)[:, None] - self.states[None]
        distances = offsets.pow(2).sum(dim=-1).clamp_min(1e-12).sqrt()
        weights = torch.softmax(-distances, dim=1)  # T = 1: captions lie 15 to 30 apart
        x0 = torch.einsum("bk,kchw->bchw", weights, self.images)
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)  # t: one step, or one per sample
        return SimpleNamespace(sample=(x - abar.sqrt() * x0) / (1 - abar).sqrt())


def settings(**overrides) -> TriggerConfig:
    """The attack's settings, cut down for the CPU (model and images are not read here)."""
    values = {"model": "-", "images": "-", "num_inference_steps": 3, "steps": 50}
    return TriggerConfig(**{**values, **overrides})


def test_the_trigger_recovers_a_memorized_image_and_not_another(shapes_dir: Path) -> None:
    train = ImageFolderDataset(shapes_dir / "train", 8)
    memorized = [0, 1, 2, 3]  # the training images the model holds, under their captions
    encoder = MiniLMEncoder(max_length=8)
    config = noise_scheduler(1000, "squaredcos_cap_v2").config
    unet = RecallingUNet(
        encoder.encode([train.captions[i] for i in memorized]),
        train.stacked(memorized).float() / 127.5 - 1.0,
        DDPMScheduler.from_config(config),
    )
    model = DiffusionModel(unet, dict(config), encoder, vae=None, metadata={})
    other = next(i for i in range(len(train)) if train.captions[i] not in train.captions[:4])
    targets = Targets(
        [train.records[i].path.name for i in (0, other)],
        [train.captions[i] for i in (0, other)],
        train.stacked([0, other]),
    )
    judge = RecoveryJudge(targets, train)
    assert judge.target_in_train(0) and judge.target_in_train(1)
    # the unrelated prompt starts between the memorized images: no replica at first
    attack = TriggerAttack(model, judge, settings(init="unrelated", guidance_scale=1.0))
    recovered, missed = attack.run(targets, 0), attack.run(targets, 1)

    first, last = recovered.checks[0], recovered.checks[-1]
    assert [c.step for c in recovered.checks] == [0, 10, 20, 30, 40, 50]
    assert not first.verdict.replicated and last.verdict.replicated
    assert last.loss < 1e-3 * first.loss
    assert recovered.steps_to_replicate == 10
    assert last.verdict.ratio < 0.01 and last.verdict.distance < 0.01
    expected = train.stacked([0])[0].float() / 255
    torch.testing.assert_close(recovered.generation, expected, atol=2e-3, rtol=0)
    # an image the model does not hold cannot be denoised from any conditioning
    assert missed.steps_to_replicate is None and not missed.checks[-1].verdict.replicated


def test_a_target_outside_the_training_folder_joins_the_reference(shapes_dir: Path) -> None:
    train = ImageFolderDataset(shapes_dir / "train", 8)
    held_out = ImageFolderDataset(shapes_dir / "test", 8).stacked([0])
    targets = Targets(
        ["held out", "trained"], [None, None], torch.cat([held_out, train.stacked([5])])
    )
    judge = RecoveryJudge(targets, train)
    assert not judge.target_in_train(0) and judge.target_in_train(1)
    exact = unit_float(targets.pixels)
    for verdict in judge(exact, [0, 1]):
        assert verdict.replicated and verdict.distance == 0 and verdict.ratio == 0
    assert not any(v.replicated for v in judge(exact.flip(0), [0, 1]))  # the other's image
    assert (
        judge.criterion()["num_distinct_reference_images"]
        == len(distinct_rows(ImageRows(train))[0]) + 1
    )

    parts = torch.arange(10.0).reshape(5, 2), -torch.arange(6.0).reshape(3, 2)
    joined = ConcatRows(TensorRows(parts[0]), TensorRows(parts[1]))
    order = torch.tensor([6, 0, 5, 7, 1])
    subset = torch.cat(list(joined.subset(order).chunks(2)))
    assert torch.equal(subset, torch.cat(parts)[order])


def test_the_same_seed_gives_the_same_trigger(shapes_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_folder(tmp_path / "model"), "cpu")
    targets = read_targets(shapes_dir / "train", 8)
    targets = Targets(targets.names[:1], targets.prompts[:1], targets.pixels[:1])
    judge = RecoveryJudge(targets, None)

    def trigger(seed: int) -> TriggerRun:
        config = settings(init="gaussian", steps=4, check_every=4, num_inference_steps=2, seed=seed)
        return TriggerAttack(model, judge, config).run(targets, 0)

    first, again, other = trigger(0), trigger(0), trigger(1)
    assert torch.equal(first.trigger, again.trigger)
    assert first.checks == again.checks
    assert not torch.equal(first.trigger, other.trigger)
    assert first.trigger.shape == (8, MiniLMEncoder.hidden_size)


def test_attack_command_writes_triggers_generations_and_json(
    shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tiny_model_folder(tmp_path / "model")
    train = ImageFolderDataset(shapes_dir / "train", 8)
    for i in (0, 1):
        shutil.copy(train.records[i].path, tmp_path / f"target{i}.png")
    listing = tmp_path / "targets.txt"
    listing.write_text(f"target0.png\t{train.captions[0]}\ntarget1.png\n")
    output = tmp_path / "attack"
    cli.main(
        ["attack", "trigger", "--model", str(model), "--images", str(listing),
         "--output_dir", str(output), "--train_data_dir", str(shapes_dir / "train"),
         "--init", "unrelated", "--steps", "12", "--check_every", "5",
         "--num_inference_steps", "2", "--learning_rate", "0.05"]
    )  # fmt: skip
    assert "of 2 targets recovered" in capsys.readouterr().out

    results = json.loads((output / "triggers.json").read_text())
    assert results["criterion"]["kind"] == "gu"
    assert results["replicated"]["n"] == 2
    rows = results["targets"]
    assert [r["name"] for r in rows] == ["target0.png", "target1.png"]
    assert [r["prompt"] for r in rows] == [train.captions[0], None]
    assert all(r["target_in_train"] and r["init"] == "unrelated" for r in rows)
    assert [c["step"] for c in rows[0]["checks"]] == [0, 5, 10, 12]
    assert rows[0]["final_loss"] < rows[0]["initial_loss"]  # on the probe batch
    triggers = load_file(output / "triggers.safetensors")
    assert set(triggers) == {"target0.png", "target1.png"}
    assert all(t.shape == (8, MiniLMEncoder.hidden_size) for t in triggers.values())
    generations = ImageFolderDataset(output / "generations", 8)
    assert generations.captions == [train.captions[0], ""]
    assert [r["generation"] for r in rows] == ["generations/0000_00.png", "generations/0001_00.png"]


def test_attack_on_a_latent_model_with_one_target(
    pipeline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "target.png"
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(target)
    output = tmp_path / "attack"
    cli.main(
        ["attack", "trigger", "--model", str(pipeline_dir), "--images", str(target),
         "--output_dir", str(output), "--init", "gaussian", "--steps", "2",
         "--num_inference_steps", "2"]
    )  # fmt: skip
    results = json.loads((output / "triggers.json").read_text())
    assert results["criterion"]["kind"] == "distance"  # a lone target: judged by its distance
    (row,) = results["targets"]
    assert row["ratio"] is None and row["target_in_train"] is None and row["distance"] > 0
    assert load_file(output / "triggers.safetensors")["target.png"].shape == (16, 32)  # CLIP
    with Image.open(output / row["generation"]) as generation:
        assert generation.size == (16, 16)  # 8 latent pixels through the VAE
    with pytest.raises(SystemExit):
        cli.main(["attack", "trigger", "--model", str(pipeline_dir), "--images", str(target)])
    assert "--init prompt: a target has no caption" in capsys.readouterr().err
