"""What a run is built from, and what a step is fed: the parts every training strategy shares.

`build_run` loads a run's data (validated up front), its conditioning (`memguard.conditioning`:
the frozen text encoder with the cached caption states, the class column's labels, or none) and
its model: a from-scratch preset UNet on pixels (a `UNet2DModel` without text), or a local
Stable Diffusion UNet on VAE latents, full or LoRA. `make_step` wraps a model in a `TrainingStep`
(AdamW, the lr schedule, EMA, the defenses, the process group its gradients are averaged in).
`step_inputs` cuts this process's micro-batches of one optimizer step from a batch iterator and
the step's draws (`memguard.train.draws`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset, Sampler

from memguard.conditioning import (
    ClassConditioning,
    Conditioning,
    TextConditioning,
    Unconditional,
)
from memguard.config import ConfigError, TrainConfig
from memguard.data.folder import ImageFolderDataset
from memguard.data.text import CaptionEmbeddings, CLIPEncoder, MiniLMEncoder, TextEncoder
from memguard.defenses.base import Defense, TrainingContext
from memguard.diffusion import to_latents
from memguard.distributed import Group
from memguard.io import load_model
from memguard.models import (
    add_lora,
    build_unet,
    build_unet2d,
    load_stable_diffusion,
    noise_scheduler,
)
from memguard.train.draws import StepDraws
from memguard.train.step import TrainingStep


@dataclass
class Run:
    """What a run is built from its config: data, conditioning and the model's parts."""

    dataset: ImageFolderDataset
    conditioning: Conditioning
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    scheduler: object  # the training noise scheduler
    pipeline: str | None = None  # the Stable Diffusion folder the model comes from, if any

    def __post_init__(self) -> None:
        self.condition_values = self.conditioning.values(self.dataset)

    @property
    def encoder(self) -> TextEncoder | None:
        """The text encoder of a text-conditional run (None without text)."""
        return getattr(self.conditioning, "encoder", None)


def is_pipeline(path: str | Path) -> bool:
    """Whether a model folder is a Stable Diffusion pipeline folder (else a UNet folder)."""
    return (Path(path) / "unet").is_dir()


def _model_folder(config: TrainConfig, device: torch.device):
    """(encoder, unet, scheduler, vae) of a trained UNet folder (`memguard train`'s or
    `memguard mitigate`'s output) that the run fine-tunes: it brings its text encoder, which
    must be the one the config names."""
    path = config.pretrained_model_name_or_path
    try:
        model = load_model(path, device)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            str(error).replace("--model", "--pretrained_model_name_or_path")
        ) from None
    if model.encoder is None:
        raise ConfigError(
            f"--pretrained_model_name_or_path {path}: a model with conditioning "
            f"{model.conditioning.kind}; give the run --conditioning {model.conditioning.kind} "
            "(which trains from a preset) or fine-tune a text-conditional model"
        )
    spec = model.encoder.spec()
    wanted = {"name": config.text_encoder}
    if config.text_encoder == "minilm":
        wanted["max_length"] = config.max_text_length
    differs = {key: value for key, value in wanted.items() if spec.get(key) != value}
    if differs:
        flags = ", ".join(f"--{'text_encoder' if k == 'name' else 'max_text_length'} "
                          f"{spec.get(k)}" for k in differs)  # fmt: skip
        raise ConfigError(
            f"--pretrained_model_name_or_path {path}: the model was trained with the text "
            f"encoder {spec}; this run asks for {wanted} (give {flags})"
        )
    unet = model.unet.train().requires_grad_(True)
    return model.encoder, unet, DDPMScheduler.from_config(model.scheduler_config), model.vae


def _build_untexted(config: TrainConfig, dataset: ImageFolderDataset, device) -> Run:
    """A class-conditional or unconditional run: a preset `UNet2DModel`, seeded, on pixels."""
    if config.conditioning == "class":
        conditioning: Conditioning = ClassConditioning.of_dataset(dataset, config.class_column)
        num_classes = conditioning.num_classes
    else:
        conditioning, num_classes = Unconditional(), None
    set_seed(config.seed)
    unet = build_unet2d(config.scratch("model_preset"), config.resolution, num_classes)
    scheduler = noise_scheduler(
        config.scratch("num_train_timesteps"), config.scratch("beta_schedule"),
        config.scratch("prediction_type"),
    )  # fmt: skip
    return Run(dataset, conditioning, unet.to(device), None, scheduler)


def build_run(config: TrainConfig, device: torch.device) -> Run:
    """Load the data (validated up front), the conditioning and the model, seeded: a preset
    UNet from scratch, a Stable Diffusion pipeline's UNet (full or LoRA), or a trained UNet
    folder's (a plain or a mitigated model, fine-tuned). Without text, a preset `UNet2DModel`
    and a folder that needs no caption column."""
    dataset = ImageFolderDataset(
        config.train_data_dir, config.resolution, config.image_column, config.captions_read
    )
    if config.conditioning != "text":
        return _build_untexted(config, dataset, device)
    source = config.pretrained_model_name_or_path
    pipeline = None
    if source is not None and Path(source).is_dir() and not is_pipeline(source):
        encoder, unet, scheduler, vae = _model_folder(config, device)
        if vae is None and unet.config.sample_size != config.resolution:
            raise ConfigError(
                f"resolution: {config.resolution}, but the model in {source} makes "
                f"{unet.config.sample_size} px images"
            )
        if config.lora_rank > 0:
            set_seed(config.seed)
            add_lora(unet, config.lora_rank)
    else:
        if config.text_encoder == "clip":
            encoder: TextEncoder = CLIPEncoder(source)
        else:
            encoder = MiniLMEncoder(max_length=config.max_text_length)
        set_seed(config.seed)
        if source is not None:
            sd = load_stable_diffusion(source)
            unet, vae, scheduler, pipeline = sd.unet, sd.vae, sd.scheduler, source
            if config.lora_rank > 0:
                add_lora(unet, config.lora_rank)
        else:
            unet = build_unet(
                config.scratch("model_preset"), config.resolution, encoder.hidden_size
            )
            vae = None
            scheduler = noise_scheduler(
                config.scratch("num_train_timesteps"), config.scratch("beta_schedule"),
                config.scratch("prediction_type"),
            )  # fmt: skip
    if vae is not None:
        vae.to(device)
    embeddings = CaptionEmbeddings(encoder, dataset.captions)
    if unet.config.cross_attention_dim != encoder.hidden_size:
        raise ConfigError(
            f"text_encoder: '{config.text_encoder}' gives states of width {encoder.hidden_size}, "
            f"the UNet expects {unet.config.cross_attention_dim}"
        )
    conditioning = TextConditioning(encoder, embeddings)
    return Run(dataset, conditioning, unet.to(device), vae, scheduler, pipeline)


def make_step(
    config: TrainConfig,
    run: Run,
    model: torch.nn.Module,
    defenses: Sequence[Defense],
    group: Group,
    total_steps: int,
) -> TrainingStep:
    """The training step of `model` (the run's UNet, or a copy of it): AdamW, the lr schedule
    over `total_steps` optimizer steps, EMA, the defenses; gradients averaged in `group`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_schedule = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    ema = None
    if config.use_ema:
        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(params[0].device)
    context = TrainingContext(
        group=group, scheduler=run.scheduler, text_encoder=run.encoder, vae=run.vae,
        snr_gamma=config.snr_gamma,
        snr_floor=config.snr_floor,
    )  # fmt: skip
    return TrainingStep(
        model, optimizer, lr_schedule, context, defenses, ema,
        max_grad_norm=config.max_grad_norm, mixed_precision=config.mixed_precision,
    )  # fmt: skip


def batches(config: TrainConfig, dataset: Dataset, sampler: Sampler) -> Iterator[dict]:
    """The batches `sampler` draws from `dataset`, loaded."""
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.dataloader_num_workers)
    return iter(loader)


def micro_batch(
    config: TrainConfig, run: Run, batch: dict, draws: StepDraws, share: slice, device
) -> dict:
    """The step's inputs for this process's micro-batch `batch`, on `device`: clean images (or
    latents), their slice of the step's noise and timesteps, and the conditioning's arguments
    (caption states, class labels, or none) with the step's caption (label) dropout; the clean
    images (on the CPU) and the step's generator for the defenses that draw more."""
    values = [run.condition_values[int(i)] for i in batch["index"]]
    condition = run.conditioning.training_inputs(values, draws.dropped[share])
    pixels = batch["pixel_values"]
    if config.random_flip:
        pixels = torch.where(draws.flipped[share, None, None, None], pixels.flip(-1), pixels)
    x0 = pixels.to(device)
    if run.vae is not None:
        x0 = to_latents(run.vae, x0)
    return {
        "x0": x0,
        "noise": draws.noise(x0.shape[1:])[share].to(device),
        "timesteps": draws.timesteps[share].to(device),
        **{key: value.to(device) for key, value in condition.items()},
        "captions": batch["caption"],
        "indices": batch["index"],
        "pixels": pixels,
        "generator": draws.generator,
    }


def step_inputs(
    config: TrainConfig,
    run: Run,
    loader: Iterator[dict],
    seed: int,
    step: int,
    group: Group,
    device: torch.device,
) -> list[dict]:
    """This process's micro-batches of optimizer step `step` of a model trained by `group`: the
    next `gradient_accumulation_steps` batches of `loader`, with their slices of the step's
    draws for the group's whole effective batch, drawn from (seed, step)."""
    accum, local_batch = config.gradient_accumulation_steps, config.train_batch_size
    global_batch = local_batch * group.size
    draws = StepDraws(
        seed, step, global_batch * accum, run.scheduler.config.num_train_timesteps,
        config.caption_dropout,
    )  # fmt: skip
    inputs = []
    for micro in range(accum):
        first = micro * global_batch + group.rank * local_batch
        share = slice(first, first + local_batch)
        inputs.append(micro_batch(config, run, next(loader), draws, share, device))
    return inputs
