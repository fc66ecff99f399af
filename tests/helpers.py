"""Test helpers: a tiny training config, and a tiny Stable Diffusion pipeline built from configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from memguard.config import TrainConfig, to_dict
from memguard.data.text import MiniLMEncoder
from memguard.defenses import Defense
from memguard.defenses.registry import build_training
from memguard.io import save_model
from memguard.models import build_unet, noise_scheduler
from memguard.train.checkpoint import checkpoint_dirs, checkpoint_info


def tiny_settings(data_dir: Path, output_dir: Path, **overrides) -> dict:
    """`memguard train` settings (defense flags too) for a few steps of the tiny preset on 8 px
    images: seconds on a CPU."""
    values = {
        "train_data_dir": str(data_dir),
        "output_dir": str(output_dir),
        "model_preset": "tiny",
        "resolution": 8,
        "max_text_length": 8,
        "train_batch_size": 8,
        "max_train_steps": 6,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "checkpointing_steps": 1000,
        "logging_steps": 2,
        "seed": 0,
    }
    if overrides.get("pretrained_model_name_or_path"):
        del values["model_preset"]  # the pipeline brings its own UNet
    values.update(overrides)
    return values


def tiny_config(data_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    """The TrainConfig of `tiny_settings` (no defense flags)."""
    return TrainConfig(**tiny_settings(data_dir, output_dir, **overrides))


def tiny_run(data_dir: Path, output_dir: Path, **overrides) -> tuple[TrainConfig, list[Defense]]:
    """The TrainConfig and defenses `memguard train` builds from `tiny_settings`."""
    return build_training(tiny_settings(data_dir, output_dir, **overrides), source="test")


# AGC settings under which it skips, and threshold-aware augmentation augments, within a few
# steps of the tiny preset: the bank remembers only the last loss (momentum 0) of 4 timesteps.
ACTIVE_AGC = {"defense": ["agc"], "agc_gamma": 1.0, "agc_momentum": 0.0, "num_train_timesteps": 4}


def train_tiny(data_dir: Path, output_dir: Path, **overrides) -> dict:
    """Train `tiny_run`'s model and defenses; the model folder's memguard.json."""
    from memguard.train.trainer import Trainer

    config, defenses = tiny_run(data_dir, output_dir, **overrides)
    Trainer(config, defenses, progress=False).train()
    return json.loads((Path(output_dir) / "memguard.json").read_text())


def tiny_model_folder(path: Path, max_text_length: int = 8) -> Path:
    """A model folder as `memguard train` writes it for the tiny preset at 8 px (MiniLM text
    states), with the random weights of seed 0 instead of training."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, MiniLMEncoder.hidden_size)
    encoder = {"name": "minilm", "max_length": max_text_length}
    save_model(path, unet, noise_scheduler(1000, "squaredcos_cap_v2"), {"text_encoder": encoder})
    return path


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE vocabularies use (GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    characters = _byte_characters()
    vocab = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[])


def make_tiny_stable_diffusion(path: Path) -> Path:
    """A Stable-Diffusion-shaped pipeline (UNet, VAE, CLIP) with random weights, saved to `path`."""
    torch.manual_seed(0)
    tokenizer = _tiny_clip_tokenizer()
    tokenizer.model_max_length = 16
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def cli_flags(settings: TrainConfig | dict) -> list[str]:
    """The `memguard train` flags that reproduce `settings` (sequences as repeated flags)."""
    values = to_dict(settings) if isinstance(settings, TrainConfig) else settings
    flags = []
    for key, value in values.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None:
                flags += [f"--{key}", str(item)]
    return flags


def kill_after_first_checkpoint(settings: TrainConfig | dict, timeout: float = 900) -> dict:
    """Run `memguard train` with `settings` in a subprocess, SIGKILL it as soon as its first
    checkpoint exists, and return that checkpoint's `checkpoint.json`. Fails (rather than
    killing a run that has not checkpointed) when none appears within `timeout` seconds: a
    loaded machine can take minutes to start the process."""
    values = to_dict(settings) if isinstance(settings, TrainConfig) else settings
    output_dir = Path(values["output_dir"])
    command = [sys.executable, "-m", "memguard", "train", *cli_flags(values)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not checkpoint_dirs(output_dir) and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no checkpoint in {output_dir} after {timeout:.0f} s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before its first checkpoint"
    weights = output_dir / "diffusion_pytorch_model.safetensors"
    assert not weights.exists(), "the run finished before the kill"
    return checkpoint_info(checkpoint_dirs(output_dir)[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_two_processes(settings: TrainConfig | dict) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m memguard train ...` on the CPU."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "memguard", "train", *cli_flags(settings),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
