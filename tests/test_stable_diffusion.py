"""The local Stable Diffusion path: latent-space training of a pipeline folder, full or LoRA,
written back as a pipeline folder that diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from helpers import tiny_config
from memguard import Trainer
from memguard.config import ConfigError
from memguard.io import load_model
from memguard.sampling import generate


def _sd_config(shapes_dir: Path, pipeline_dir: Path, output: Path, **overrides):
    return tiny_config(
        shapes_dir / "train",
        output,
        pretrained_model_name_or_path=str(pipeline_dir),
        text_encoder="clip",
        resolution=16,  # the tiny VAE halves it: 8x8 latents
        max_train_steps=3,
        **overrides,
    )


def _base_unet(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_full_fine_tune_in_latent_space(shapes_dir: Path, pipeline_dir: Path, tmp_path) -> None:
    Trainer(_sd_config(shapes_dir, pipeline_dir, tmp_path / "full")).train()
    tuned = load_file(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors")
    base = _base_unet(pipeline_dir)
    assert tuned.keys() == base.keys()
    assert not torch.equal(tuned["conv_in.weight"], base["conv_in.weight"])
    metadata = json.loads((tmp_path / "full" / "memguard.json").read_text())
    assert metadata["text_encoder"]["name"] == "clip"
    model = load_model(tmp_path / "full")
    images = generate(model, ["a red circle"], 2, seed=0, num_inference_steps=3, progress=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "full")  # the layout is kept
    assert torch.equal(pipeline.unet.state_dict()["conv_in.weight"], tuned["conv_in.weight"])
    vae = load_file(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, pipeline.vae.state_dict()[k]) for k, v in vae.items())


def test_lora_trains_only_the_adapters(shapes_dir: Path, pipeline_dir: Path, tmp_path) -> None:
    config = _sd_config(shapes_dir, pipeline_dir, tmp_path / "lora", lora_rank=4)
    Trainer(config).train()
    assert (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "lora", subfolder="unet").state_dict()
    base = _base_unet(pipeline_dir)
    assert fused.keys() == base.keys()  # adapters fused: a plain UNet again
    changed = {k for k in base if not torch.equal(fused[k], base[k])}
    assert changed, "LoRA training changed nothing"
    targets = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    assert all(k.endswith(targets) for k in changed), sorted(changed)


def test_settings_a_pipeline_brings_itself_are_errors(shapes_dir: Path, pipeline_dir: Path):
    scratch = {"model_preset": "tiny", "beta_schedule": "linear", "num_train_timesteps": 10,
               "prediction_type": "v_prediction"}  # fmt: skip
    for key, value in scratch.items():
        with pytest.raises(ConfigError, match=f"{key}: a setting of a model trained from scratch"):
            _sd_config(shapes_dir, pipeline_dir, shapes_dir / "never", **{key: value})


def test_lora_needs_a_pretrained_model(shapes_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lora_rank: LoRA needs --pretrained_model_name_or_path"):
        tiny_config(shapes_dir / "train", tmp_path, lora_rank=4)


def test_missing_pipeline_folder_names_the_flag(shapes_dir: Path, tmp_path: Path) -> None:
    config = _sd_config(shapes_dir, tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--pretrained_model_name_or_path"):
        Trainer(config).train()
