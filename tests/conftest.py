"""Shared fixtures: a small shapes benchmark at 8 px and a tiny Stable Diffusion pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_tiny_stable_diffusion  # noqa: E402
from memguard.config import ShapesConfig  # noqa: E402
from memguard.data.shapes import make_shapes_dataset  # noqa: E402

SMALL_SHAPES = {
    "image_size": 8,
    "num_ordinary": 40,
    "num_duplicate_groups": 2,
    "min_copies": 4,
    "max_copies": 6,
    "num_test": 8,
    "num_exemplars": 6,
    "num_ordinary_prompts": 4,
}


@pytest.fixture(autouse=True, scope="session")
def _embedding_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["MEMGUARD_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small benchmark, written once per session; tests must not modify it."""
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(ShapesConfig(output_dir=str(root), seed=0, **SMALL_SHAPES))


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline folder, written once per session."""
    return make_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))
