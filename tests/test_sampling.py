"""Sampling: deterministic from the seed, both samplers, and folders any audit can read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from memguard import Trainer
from memguard.data.folder import ImageFolderDataset
from memguard.io import load_model
from memguard.sampling import generate, save_samples


@pytest.fixture(scope="module")
def model_dir(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("model")
    Trainer(tiny_config(shapes_dir / "train", output)).train()
    return output


def _generate(model, seed: int, sampler: str = "ddim", prompts=("a red circle", "a blue square")):
    return generate(
        model, list(prompts), 3, seed, sampler, num_inference_steps=4, batch_size=4, progress=False
    )


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_same_seed_same_images(model_dir: Path, sampler: str) -> None:
    model = load_model(model_dir)
    first, again = _generate(model, 0, sampler), _generate(model, 0, sampler)
    assert first.shape == (6, 3, 8, 8)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, _generate(model, 1, sampler))


def test_image_j_starts_from_seed_plus_j(model_dir: Path) -> None:
    model = load_model(model_dir)
    three = _generate(model, 0, prompts=("a red circle",))
    shifted = _generate(model, 1, prompts=("a red circle",))
    torch.testing.assert_close(three[1:], shifted[:2], atol=1e-5, rtol=0)


def test_saved_samples_are_an_image_folder(model_dir: Path, tmp_path: Path) -> None:
    prompts = ["a red circle", "a blue square"]
    images = _generate(load_model(model_dir), 0, prompts=prompts)
    save_samples(images, prompts, 3, 0, tmp_path)
    folder = ImageFolderDataset(tmp_path, resolution=8)
    assert folder.captions == [p for p in prompts for _ in range(3)]
    expected = (images * 255).round().to(torch.uint8)
    assert torch.equal(folder.stacked(), expected)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert (tmp_path / "grid.png").is_file()


def test_a_count_per_prompt(model_dir: Path, tmp_path: Path) -> None:
    model, prompts = load_model(model_dir), ["a red circle", "a blue square"]
    uneven = generate(model, prompts, [1, 3], 0, "ddim", num_inference_steps=4, progress=False)
    even = _generate(model, 0, prompts=prompts)  # 3 per prompt, from the same starts
    torch.testing.assert_close(uneven, even[[0, 3, 4, 5]], atol=1e-5, rtol=0)
    save_samples(uneven, prompts, [1, 3], 0, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["text"], r["seed"]) for r in rows] == [
        ("0000_00.png", "a red circle", 0),
        ("0001_00.png", "a blue square", 0),
        ("0001_01.png", "a blue square", 1),
        ("0001_02.png", "a blue square", 2),
    ]
    with pytest.raises(ValueError, match="3 image counts for 2 prompts"):
        generate(model, prompts, [1, 1, 1], 0, progress=False)
