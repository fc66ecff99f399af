"""Plain training: text-conditional denoising (DDPM) of a diffusers UNet, one `TrainingStep` on
every process, gradients averaged over all of them.

`Trainer` builds what a run needs from its `TrainConfig` (the image folder, the frozen text
encoder and its cached caption states, the model: a from-scratch preset UNet on pixels, or a
local Stable Diffusion UNet on VAE latents, full or LoRA; the optimizer, lr schedule and EMA)
and then loops: draw the step's randomness (`memguard.train.draws`), cut this process's
micro-batches, run the step, log, checkpoint. `accelerate launch` starts the processes and
accelerate's `PartialState` joins them (gloo on CPUs). At the end the EMA weights go into the
model, the defenses report on it, and the model folder is written (`memguard.io`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from memguard import __version__
from memguard.config import ConfigError, TrainConfig, to_dict
from memguard.data.folder import ImageFolderDataset, fingerprint
from memguard.data.text import CaptionEmbeddings, CLIPEncoder, MiniLMEncoder, TextEncoder
from memguard.defenses.base import Defense, TrainingContext
from memguard.defenses.registry import record
from memguard.diffusion import to_latents
from memguard.distributed import Group
from memguard.io import save_model
from memguard.models import add_lora, build_unet, load_stable_diffusion, noise_scheduler
from memguard.train.checkpoint import (
    checkpoint_info,
    load_unit,
    resolve_resume,
    save_checkpoint,
)
from memguard.train.draws import GlobalBatchSampler, StepDraws
from memguard.train.step import TrainingError, TrainingStep

LOG_FILE = "train_log.jsonl"
MODEL_UNIT = "model"  # the checkpoint unit of the one model plain training trains


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float
    loop_seconds: float  # wall time of the optimizer steps run by this call
    steps_run: int


def _cpu_data_parallel() -> bool:
    """Several processes and no GPU: data parallelism on CPUs (gloo).

    `accelerate launch --multi_gpu --num_processes N` (torchrun underneath) starts the processes;
    accelerate then needs `cpu=True` to use gloo instead of looking for GPUs.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    return {
        "memguard": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
    }


@dataclass
class Run:
    """What a run is built from its config: data, conditioning and the model's parts."""

    dataset: ImageFolderDataset
    encoder: TextEncoder
    embeddings: CaptionEmbeddings
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    scheduler: object  # the training noise scheduler


def build_run(config: TrainConfig, device: torch.device) -> Run:
    """Load the data (validated up front), the text encoder and the model, seeded."""
    dataset = ImageFolderDataset(
        config.train_data_dir, config.resolution, config.image_column, config.caption_column
    )
    if config.text_encoder == "clip":
        encoder: TextEncoder = CLIPEncoder(config.pretrained_model_name_or_path)
    else:
        encoder = MiniLMEncoder(max_length=config.max_text_length)
    embeddings = CaptionEmbeddings(encoder, dataset.captions)
    set_seed(config.seed)
    if config.pretrained_model_name_or_path is not None:
        sd = load_stable_diffusion(config.pretrained_model_name_or_path)
        unet, vae, scheduler = sd.unet, sd.vae, sd.scheduler
        if config.lora_rank > 0:
            add_lora(unet, config.lora_rank)
        vae.to(device)
    else:
        unet = build_unet(config.scratch("model_preset"), config.resolution, encoder.hidden_size)
        vae = None
        scheduler = noise_scheduler(
            config.scratch("num_train_timesteps"), config.scratch("beta_schedule"),
            config.scratch("prediction_type"),
        )  # fmt: skip
    if unet.config.cross_attention_dim != encoder.hidden_size:
        raise ConfigError(
            f"text_encoder: '{config.text_encoder}' gives states of width {encoder.hidden_size}, "
            f"the UNet expects {unet.config.cross_attention_dim}"
        )
    return Run(dataset, encoder, embeddings, unet.to(device), vae, scheduler)


def make_step(
    config: TrainConfig, run: Run, defenses: Sequence[Defense], group: Group
) -> TrainingStep:
    """The training step of `run`'s UNet: AdamW, the lr schedule, EMA, the defenses."""
    params = [p for p in run.unet.parameters() if p.requires_grad]
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
        num_training_steps=config.max_train_steps,
    )
    ema = None
    if config.use_ema:
        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(params[0].device)
    context = TrainingContext(
        group=group, scheduler=run.scheduler, text_encoder=run.encoder, vae=run.vae
    )
    return TrainingStep(
        run.unet, optimizer, lr_schedule, context, defenses, ema,
        max_grad_norm=config.max_grad_norm, snr_gamma=config.snr_gamma,
        mixed_precision=config.mixed_precision,
    )  # fmt: skip


def micro_batch(
    config: TrainConfig, run: Run, batch: dict, draws: StepDraws, share: slice, device
) -> dict:
    """The step's inputs for this process's micro-batch `batch`, on `device`: clean images (or
    latents), their slice of the step's noise and timesteps, and the caption states with the
    step's caption dropout."""
    rows = run.embeddings.rows(batch["caption"])
    dropped = torch.full_like(rows, run.embeddings.unconditional_row)
    rows = torch.where(draws.dropped[share], dropped, rows)  # caption dropout
    x0 = batch["pixel_values"]
    if config.random_flip:
        x0 = torch.where(draws.flipped[share, None, None, None], x0.flip(-1), x0)
    x0 = x0.to(device)
    if run.vae is not None:
        x0 = to_latents(run.vae, x0)
    return {
        "x0": x0,
        "noise": draws.noise(x0.shape[1:])[share].to(device),
        "timesteps": draws.timesteps[share].to(device),
        "encoder_hidden_states": run.embeddings.table[rows].to(device),
        "captions": batch["caption"],
        "indices": batch["index"],
    }


class Trainer:
    """Trains a text-conditional diffusion UNet with a list of defenses attached.

    >>> Trainer(TrainConfig(train_data_dir="data/train", output_dir="out")).train()

    `progress=False` hides the progress bar (a caller showing its own, as `memguard bench`).
    """

    def __init__(
        self, config: TrainConfig, defenses: Sequence[Defense] = (), progress: bool = True
    ) -> None:
        self.config = config
        self.defenses = list(defenses)
        self.progress = progress

    def train(self) -> TrainResult:
        cfg = self.config
        state = PartialState(cpu=_cpu_data_parallel())
        world = Group.world()
        main = state.is_main_process
        output_dir = Path(cfg.output_dir)
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)

        run = build_run(cfg, state.device)
        step = make_step(cfg, run, self.defenses, world)
        step.setup_defenses()
        resume = resolve_resume(output_dir, cfg.resume_from_checkpoint)
        seconds_before = 0.0  # training wall time of the runs this one resumes
        if resume is not None:
            step.load_state_dict(load_unit(resume, MODEL_UNIT))
            seconds_before = checkpoint_info(resume)["train_seconds"]
        start = step.ctx.step

        accum, local_batch = cfg.gradient_accumulation_steps, cfg.train_batch_size
        global_batch = local_batch * world.size
        sampler = GlobalBatchSampler(
            len(run.dataset), local_batch, world.rank, world.size, cfg.seed, start=start * accum
        )
        batches = iter(
            DataLoader(run.dataset, batch_sampler=sampler, num_workers=cfg.dataloader_num_workers)
        )
        progress = tqdm(
            total=cfg.max_train_steps, initial=start, desc="train",
            disable=not (self.progress and state.is_local_main_process),
        )  # fmt: skip
        num_timesteps = run.scheduler.config.num_train_timesteps
        window: list[float] = []
        last_loss = float("nan")
        loop_start = log_start = time.perf_counter()
        run.unet.train()
        while step.ctx.step < cfg.max_train_steps:
            draws = StepDraws(
                cfg.seed, step.ctx.step, global_batch * accum, num_timesteps, cfg.caption_dropout
            )
            micro_batches = []
            for micro in range(accum):
                first = micro * global_batch + world.rank * local_batch
                share = slice(first, first + local_batch)
                micro_batches.append(
                    micro_batch(cfg, run, next(batches), draws, share, state.device)
                )
            try:
                window.append(step(micro_batches))
            except TrainingError as error:
                raise TrainingError(
                    f"{error}. Checkpoints in {output_dir} are intact; lower --learning_rate or "
                    "check the data."
                ) from None
            done = step.ctx.step
            progress.update(1)
            if done % cfg.logging_steps == 0 or done == cfg.max_train_steps:
                last_loss = float(np.mean(window))
                now = time.perf_counter()
                if main:
                    line = {
                        "step": done,
                        "loss": last_loss,
                        "lr": step.lr_schedule.get_last_lr()[0],
                        "images_per_second": len(window)
                        * global_batch
                        * accum
                        / max(now - log_start, 1e-9),
                    }
                    with open(output_dir / LOG_FILE, "a") as log:
                        log.write(json.dumps(line) + "\n")
                progress.set_postfix(loss=f"{last_loss:.4f}")
                window, log_start = [], now
            if done % cfg.checkpointing_steps == 0:
                owned = {MODEL_UNIT: step.state_dict()} if main else {}
                seconds = seconds_before + time.perf_counter() - loop_start
                save_checkpoint(
                    output_dir, done, owned, cfg.checkpoints_total_limit, world,
                    info={"train_seconds": seconds},
                )  # fmt: skip
        loop_seconds = time.perf_counter() - loop_start
        progress.close()

        step.finish()  # EMA weights into the model: what is saved is what is certified
        records = [record(defense) for defense in self.defenses]
        step.detach()
        if main:
            metadata = {
                "memguard_version": __version__,
                "config": to_dict(cfg),
                "text_encoder": run.encoder.spec(),
                "resolution": cfg.resolution,
                "data": {
                    "train_data_dir": str(Path(cfg.train_data_dir).resolve()),
                    "sha256": fingerprint(run.dataset.records),
                    "num_images": len(run.dataset),
                    "num_captions": len(run.embeddings.captions) - 1,
                },
                "seed": cfg.seed,
                "global_step": step.ctx.step,
                "train_seconds": seconds_before + loop_seconds,  # summed over resumed runs
                "final_loss": last_loss,
                "num_processes": world.size,
                "defenses": records,
                "versions": versions(),
            }
            save_model(
                output_dir, run.unet, run.scheduler, metadata, cfg.pretrained_model_name_or_path
            )
        world.barrier()
        return TrainResult(
            output_dir, step.ctx.step, last_loss, loop_seconds, step.ctx.step - start
        )
