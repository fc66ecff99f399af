"""Threshold-aware augmentation (IET-AGC+, arXiv 2502.09434): its settings, the images it trains
on (kornia's RandAugment for the step's seed, in pixels and through the VAE), and strength zero.
Its resumption is checked with IET's (test_iet.py: a killed run)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from kornia.augmentation.auto import RandAugment

from helpers import ACTIVE_AGC, tiny_settings, train_tiny
from memguard.config import ConfigError
from memguard.defenses import AntiGradientControl, ThresholdAwareAugmentation, TrainingContext
from memguard.defenses.registry import build_training
from memguard.defenses.taa import OP_SETS, RANGES, operations
from memguard.diffusion import to_latents
from memguard.models import noise_scheduler
from test_trainer import assert_same_weights


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"augment": "taa"}, "--augment taa needs --defense agc"),
        ({"defense": ["agc", "taa"]}, "defense: 'taa' is attached by --augment taa"),
        (
            {**ACTIVE_AGC, "taa_ops": ["rotate"]},
            "taa_ops: a setting of --augment taa, which this run",
        ),
        ({**ACTIVE_AGC, "augment": "taa", "taa_ops": ["hue"]}, "taa_ops: unknown 'hue'"),
    ],
)
def test_settings_are_validated(settings: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        build_training(tiny_settings(tmp_path, tmp_path, **settings), source="test")


def test_the_operations_are_named_sets_or_kornias() -> None:
    assert operations(("geometric", "rotate", "color")) == (*OP_SETS["geometric"], "color")
    config, (agc, taa) = build_training(
        {"train_data_dir": "d", **ACTIVE_AGC, "augment": "taa", "taa_ops": ["paper"]}
    )
    assert taa.ops == OP_SETS["paper"] and taa.agc is agc and config.augment == "taa"


@pytest.mark.parametrize("latent", [False, True], ids=["pixels", "vae-latents"])
def test_taa_trains_on_what_kornia_draws_for_the_steps_seed(latent: bool, request) -> None:
    vae = None
    if latent:
        pipeline = request.getfixturevalue("pipeline_dir")
        vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    agc = AntiGradientControl(gamma=1.0, momentum=0.0, num_timesteps=2)
    taa = ThresholdAwareAugmentation(agc=agc)
    ctx = TrainingContext(scheduler=noise_scheduler(2, "linear"), vae=vae)
    timesteps = torch.tensor([0, 1, 0, 1, 0, 1])
    agc.sample_weights(torch.ones(6), {"timesteps": timesteps}, ctx)  # the bank: 1 everywhere
    losses = torch.tensor([1.1, 0.5, 1.02, 1.3, 0.9, 1.05])  # kept: 0, 2, 3, 5
    agc.sample_weights(losses, {"timesteps": timesteps}, ctx)
    pixels = torch.rand(6, 3, 16, 16) * 2 - 1
    x0 = pixels if vae is None else to_latents(vae, pixels)
    batch = {
        "x0": x0, "pixels": pixels, "encoder_hidden_states": torch.randn(6, 4, 5),
        "generator": torch.Generator().manual_seed(7),
    }  # fmt: skip
    inputs = taa.augmented_inputs(batch, ctx)

    strength = [math.exp(-5 * abs(x - 1.0)) for x in (1.1, 1.02, 1.3, 1.05)]
    magnitude = math.floor(5 * sum(strength) / 4 + 0.5)
    assert magnitude == 3 and taa.report()["batches_by_magnitude"] == {"3": 1}
    generator = torch.Generator().manual_seed(7)  # the step's, drawn from as TAA does
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    policy = [[(op, *RANGES[op])] for op in OP_SETS["geometric"]]
    torch.manual_seed(seed)
    kept = (pixels[[0, 2, 3, 5]] + 1) / 2
    expected = RandAugment(n=2, m=magnitude, policy=policy)(kept).clamp(0, 1) * 2 - 1
    assert not torch.equal(expected, pixels[[0, 2, 3, 5]])
    if vae is not None:
        expected = to_latents(vae, expected)
    assert torch.equal(inputs["x0"], expected)
    assert torch.equal(inputs["timesteps"], torch.randint(0, 2, (4,), generator=generator))
    noise = torch.randn(4, *x0.shape[1:], generator=generator)
    assert torch.equal(inputs["noise"], noise)
    assert torch.equal(
        inputs["encoder_hidden_states"], batch["encoder_hidden_states"][[0, 2, 3, 5]]
    )


def test_taa_at_strength_zero_is_agc_alone(shapes_dir: Path, tmp_path: Path) -> None:
    """With gamma near 0 a sample is kept only while its timestep's bank is empty, where there is
    no threshold to be near: strength 0, no augmented batch, nothing drawn."""
    never = {**ACTIVE_AGC, "agc_gamma": 1e-9}
    train_tiny(shapes_dir / "train", tmp_path / "agc", **never)
    metadata = train_tiny(shapes_dir / "train", tmp_path / "taa", **never, augment="taa")
    assert_same_weights(tmp_path / "agc", tmp_path / "taa")
    (_, taa) = metadata["defenses"]
    assert taa["name"] == "taa" and taa["report"]["augmented_batches"] == 0
    metadata = train_tiny(shapes_dir / "train", tmp_path / "on", **ACTIVE_AGC, augment="taa")
    assert metadata["defenses"][1]["report"]["augmented_batches"] > 0
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "agc", tmp_path / "on")
