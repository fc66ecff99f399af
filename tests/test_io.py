"""Model folders: what loads, what is refused with the missing file named, and atomic files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_stable_diffusion
from memguard.config import MODEL_PRESETS
from memguard.data.text import CLIPEncoder, load_text_encoder
from memguard.io import atomic_path, load_model, write_json
from memguard.models import PRESETS, build_unet, build_unet2d, noise_scheduler


def _bare_unet(folder: Path) -> Path:
    torch.manual_seed(0)
    build_unet("tiny", 8, cross_attention_dim=384).save_pretrained(folder)
    return folder


def test_a_unet_saved_by_plain_diffusers_loads_with_its_schedule_and_encoder(tmp_path):
    folder = _bare_unet(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json beside the UNet"):
        load_model(folder)
    noise_scheduler(1000, "linear", "v_prediction").save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no memguard.json naming the text encoder"):
        load_model(folder)
    write_json(folder / "memguard.json", {"text_encoder": {"name": "minilm", "max_length": 8}})
    model = load_model(folder, device="cpu")
    assert model.scheduler_config["prediction_type"] == "v_prediction"  # not a guessed schedule
    assert model.encoder.spec() == {"name": "minilm", "max_length": 8}
    assert model.device == torch.device("cpu") and not model.unet.training


def test_neither_kind_of_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a UNet folder nor a pipeline folder"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="--model: no such folder"):
        load_model(tmp_path / "nowhere")


def test_a_changed_clip_encoder_is_not_the_recorded_one(tmp_path: Path) -> None:
    pipeline = make_tiny_stable_diffusion(tmp_path / "sd")
    spec = CLIPEncoder(pipeline).spec()
    assert len(spec["sha256"]) == 64
    assert load_text_encoder(spec).spec() == spec
    config = pipeline / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "memguard_test": 1}))
    with pytest.raises(ValueError, match="its files changed since the model was trained"):
        load_text_encoder(spec)


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"old": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as partial:
        partial.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_preset_the_cli_offers_builds_both_kinds_of_unet(preset: str) -> None:
    assert set(MODEL_PRESETS) == set(PRESETS)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 500])
    text_unet = build_unet(preset, 16, cross_attention_dim=8)
    assert text_unet(x, t, encoder_hidden_states=torch.randn(2, 4, 8)).sample.shape == x.shape
    assert (
        build_unet2d(preset, 16, num_classes=3)(
            x, t, class_labels=torch.tensor([0, 3])
        ).sample.shape
        == x.shape
    )
