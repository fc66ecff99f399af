"""Model folders and files that survive a kill: what training, sampling, the audit and any
post-training step read and write.

A model folder is one of:

- a diffusers UNet folder (`config.json` + `diffusion_pytorch_model.safetensors`, loadable with
  `UNet2DConditionModel.from_pretrained`, or `UNet2DModel.from_pretrained` for a model without
  text: `memguard.conditioning`), with `scheduler_config.json` and `memguard.json`
  beside it: what memguard writes for a model trained from scratch;
- a diffusers Stable Diffusion pipeline folder (`unet/`, `vae/`, `scheduler/`, `text_encoder/`,
  `tokenizer/`): what memguard writes for a fine-tuned pipeline, keeping the layout so that
  `StableDiffusionPipeline.from_pretrained` loads it; the untouched components are hard links
  to (or copies of) the source pipeline's files, and LoRA adapters are also saved on their own
  under `lora/` (peft format) before they are fused into the UNet.

`memguard.json` records what the folder cannot say by itself (the conditioning, the text
encoder, the data hash,
the defenses and their reports, versions). Every file is written under a temporary name and
renamed; a model folder is complete when its `memguard.json` is there, which is written last
(and removed first when a folder is overwritten).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from memguard.conditioning import Conditioning, from_spec
from memguard.config import ConfigError

if TYPE_CHECKING:
    from memguard.data.text import TextEncoder

METADATA_FILE = "memguard.json"
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "feature_extractor", "model_index.json")


# ----------------------------------------------------------------------------- atomic files


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed to `path` when the block succeeds (and removed
    when it fails), so that a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_metadata(model_dir: str | Path) -> dict:
    """A model folder's memguard.json ({} when it has none)."""
    path = Path(model_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` (a file or a folder tree) to `target`, copying where links fail."""
    if source.is_dir():
        for item in source.rglob("*"):
            if item.is_file():
                _link_or_copy(item, target / item.relative_to(source))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ------------------------------------------------------------------------------ saving


def save_model(
    output_dir: str | Path,
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    metadata: dict,
    pipeline: str | Path | None = None,
) -> Path:
    """Write a trained UNet as a model folder: a UNet folder, or with `pipeline` (the source
    Stable Diffusion folder) a whole pipeline folder in its layout. LoRA adapters (peft) are
    saved under `lora/`, then fused into the UNet's weights and unloaded."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / ".model.partial"
    if staging.exists():
        shutil.rmtree(staging)
    if getattr(unet, "peft_config", None):
        unet.save_lora_adapter(staging / "lora")
        unet.fuse_lora()
        unet.unload_lora()
    if pipeline is None:
        unet.save_pretrained(staging, safe_serialization=True)
        scheduler.save_pretrained(staging)
    else:
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
        for part in PIPELINE_PARTS:
            if (Path(pipeline) / part).exists():
                _link_or_copy(Path(pipeline) / part, staging / part)
    (output_dir / METADATA_FILE).unlink(missing_ok=True)  # the folder is incomplete from here
    for source in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = output_dir / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    shutil.rmtree(staging)
    write_json(output_dir / METADATA_FILE, metadata)  # last: the folder is complete
    return output_dir


# ------------------------------------------------------------------------------ loading


@dataclass
class DiffusionModel:
    """What sampling, the audit and the attacks need: the UNet, its noise schedule, its text
    encoder (None without text), the VAE of a latent model, the folder's memguard.json, and
    the conditioning it records (`memguard.conditioning`; text when it records none)."""

    unet: UNet2DConditionModel | UNet2DModel
    scheduler_config: dict
    encoder: TextEncoder | None
    vae: AutoencoderKL | None
    metadata: dict
    conditioning: Conditioning | None = None

    def __post_init__(self) -> None:
        if self.conditioning is None:
            self.conditioning = from_spec(self.metadata.get("conditioning"), self.encoder)

    def require_text(self, what: str) -> TextEncoder:
        """The text encoder, or an error saying that `what` needs a text-conditional model."""
        if self.encoder is None:
            raise ConfigError(
                f"{what} needs a text-conditional model; this one has conditioning "
                f"{self.conditioning.kind}"
            )
        return self.encoder

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_size(self) -> int:
        """Side of the generated images: the UNet's sample size, times the VAE's upsampling."""
        size = self.unet.config.sample_size
        if self.vae is not None:
            size *= 2 ** (len(self.vae.config.block_out_channels) - 1)
        return size

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)


def best_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given, else the first GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unet_folder_parts(root: Path, metadata: dict):
    """(scheduler, encoder spec or None, vae) of a UNet folder, from its own files and
    memguard.json."""
    if not (root / "scheduler_config.json").is_file():
        raise FileNotFoundError(
            f"--model {root}: no scheduler_config.json beside the UNet (the noise schedule it "
            "was trained with); save the training scheduler there with save_pretrained"
        )
    untexted = metadata.get("conditioning", {}).get("kind", "text") != "text"
    if "text_encoder" not in metadata and not untexted:
        raise FileNotFoundError(
            f"--model {root}: no {METADATA_FILE} naming the text encoder the UNet was trained "
            'with; write one, e.g. {"text_encoder": {"name": "minilm", "max_length": 16}}'
        )
    vae = None
    if metadata.get("vae"):
        vae = AutoencoderKL.from_pretrained(metadata["vae"], subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(root)
    return scheduler, None if untexted else metadata["text_encoder"], vae


def load_model(model_dir: str | Path, device: str | torch.device | None = None) -> DiffusionModel:
    """Load a model folder (see the module docstring) for inference, frozen, on `device`
    (default: `best_device()`). A folder that lacks what sampling needs (the scheduler config,
    the text encoder's name) is an error naming the missing file."""
    from memguard.data.text import CLIPEncoder, load_text_encoder

    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--model: no such folder: {root}")
    metadata = read_metadata(root)
    if (root / "unet").is_dir():  # a diffusers pipeline folder
        for part in ("scheduler", "vae"):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"--model {root}: a pipeline folder needs '{part}/'")
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
        encoder: TextEncoder | None = CLIPEncoder(root)
    elif (root / "config.json").is_file():
        untexted = json.loads((root / "config.json").read_text()).get("_class_name")
        unet_class = UNet2DModel if untexted == "UNet2DModel" else UNet2DConditionModel
        unet = unet_class.from_pretrained(root)
        if unet_class is UNet2DModel and "conditioning" not in metadata:
            if unet.config.num_class_embeds is not None:
                raise FileNotFoundError(
                    f"--model {root}: a class-conditional UNet2DModel without a {METADATA_FILE} "
                    "naming its classes (conditioning: kind, column, classes)"
                )
            metadata = {**metadata, "conditioning": {"kind": "none"}}  # a diffusers DDPM UNet
        scheduler, encoder_spec, vae = _unet_folder_parts(root, metadata)
        encoder = None if encoder_spec is None else load_text_encoder(encoder_spec)
    else:
        raise FileNotFoundError(f"--model {root}: neither a UNet folder nor a pipeline folder")
    device = best_device(device)
    unet.eval().requires_grad_(False).to(device)
    if vae is not None:
        vae.eval().requires_grad_(False).to(device)
    return DiffusionModel(unet, dict(scheduler.config), encoder, vae, metadata)
