"""The learned-embedding attack: the placeholder is wired in exactly, and learning lowers the
exemplars' denoising loss against the frozen model."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler

from helpers import tiny_config
from memguard import Trainer
from memguard.attacks.concept import (
    PLACEHOLDER,
    generate_with_embedding,
    learn_concept_embedding,
)
from memguard.data.folder import ImageFolderDataset
from memguard.data.text import MiniLMEncoder
from memguard.diffusion import per_sample_loss
from memguard.io import load_model


def test_placeholder_with_a_words_embedding_encodes_that_word() -> None:
    encoder = MiniLMEncoder(max_length=16)
    with_word = encoder.encode(["a red circle, with logo"])
    replaced = encoder.encode_with_placeholder(
        ["a red circle, with *"], PLACEHOLDER, encoder.word_embedding("logo")
    )
    torch.testing.assert_close(replaced, with_word, atol=1e-5, rtol=1e-5)


def test_learning_lowers_the_exemplar_loss(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path, max_text_length=16)).train()
    model = load_model(tmp_path)
    exemplars = ImageFolderDataset(shapes_dir / "concept_exemplars", 8)
    captions = [c.replace("the acme logo", PLACEHOLDER) for c in exemplars.captions]
    pixels = exemplars.stacked().float() / 127.5 - 1.0
    start = model.encoder.word_embedding("logo")
    learned = learn_concept_embedding(model, pixels, captions, steps=40, learning_rate=5e-2)
    assert not torch.equal(learned, start)

    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    generator = torch.Generator().manual_seed(5)
    timesteps = torch.randint(0, 1000, (len(pixels),), generator=generator)
    noise = torch.randn(pixels.shape, generator=generator)

    def loss(vector: torch.Tensor) -> float:
        with torch.no_grad():
            states = model.encoder.encode_with_placeholder(captions, PLACEHOLDER, vector)
            losses = per_sample_loss(model.unet, scheduler, pixels, states, timesteps, noise)
            return losses.mean().item()

    assert loss(learned) < loss(start)
    images = generate_with_embedding(model, ["a red circle, with *"], learned, 2, 0, "dpm", 3)
    assert images.shape == (2, 3, 8, 8)
