"""The training loop: text-conditional denoising (DDPM) on accelerate, with the defense hooks.

One loop serves a from-scratch preset UNet on pixels and a local Stable Diffusion UNet on VAE
latents (full or LoRA). Its randomness is a pure function of (seed, step): the order of samples,
the noise, the timesteps and the caption dropout (for classifier-free guidance, Ho & Salimans
2022) are drawn for the whole effective batch and each process and micro-batch takes its slice.
Hence a killed run resumed from a checkpoint, the same run on N processes, and the same run
with gradient accumulation give the weights of one uninterrupted process on the same batch.

Per step: per-sample losses -> defenses' sample weights -> global weighted mean -> backward
(gradient all-reduce) -> `after_backward` hooks -> clipping -> optimizer step -> `after_step`
hooks -> EMA. See `memguard.train.hooks` for the protocol.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from memguard import __version__
from memguard.config import ConfigError, TrainConfig, to_dict
from memguard.data.folder import ImageFolderDataset, fingerprint
from memguard.data.text import CaptionEmbeddings, CLIPEncoder, MiniLMEncoder, TextEncoder
from memguard.diffusion import min_snr_weights, per_sample_loss, to_latents
from memguard.models import add_lora, build_unet, load_stable_diffusion, noise_scheduler
from memguard.train.checkpoint import (
    METADATA_FILE,
    publish,
    resolve_resume,
    save_checkpoint,
    write_json,
)
from memguard.train.hooks import Defense, TrainingContext, combined_weights, weighted_mean

LOG_FILE = "train_log.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); checkpoints already written are intact."""


class StepDraws:
    """The random draws of one optimizer step, for its whole effective batch.

    Drawn from a generator seeded by (seed, step) alone, for processes x accumulation x batch
    samples; each micro-batch of each process takes its slice. So the draws do not depend on
    the number of processes, on gradient accumulation, or on where a run was resumed.
    """

    def __init__(self, seed: int, step: int, size: int, scheduler, config: TrainConfig) -> None:
        state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
        self._generator = torch.Generator().manual_seed(int(state >> np.uint64(1)))
        self.size = size
        num_timesteps = scheduler.config.num_train_timesteps
        self.timesteps = torch.randint(0, num_timesteps, (size,), generator=self._generator)
        self.dropped = torch.rand(size, generator=self._generator) < config.caption_dropout
        self.flipped = torch.rand(size, generator=self._generator) < 0.5
        self._noise: torch.Tensor | None = None

    def noise(self, shape: torch.Size) -> torch.Tensor:
        """Standard normal noise (size, *shape), drawn on first use (latent shapes vary)."""
        if self._noise is None:
            self._noise = torch.randn((self.size, *shape), generator=self._generator)
        return self._noise


class GlobalBatchSampler(Sampler):
    """Yields this process's slice of each global batch, forever.

    The data order is a chain of permutations, one per epoch, each seeded by (seed, epoch), so
    global batch b is the same whatever the number of processes and wherever a run resumed.
    """

    def __init__(
        self, num_samples: int, local_batch: int, rank: int, world: int, seed: int, start: int = 0
    ) -> None:
        self.num_samples, self.local_batch, self.rank = num_samples, local_batch, rank
        self.global_batch = local_batch * world
        self.seed, self.start = seed, start
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutations = {
                epoch: torch.randperm(self.num_samples, generator=generator).tolist()
            }
        return self._permutations[epoch]

    def batch(self, index: int) -> list[int]:
        """Indices of global batch `index`."""
        first = index * self.global_batch
        return [
            self._permutation(p // self.num_samples)[p % self.num_samples]
            for p in range(first, first + self.global_batch)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start
        while True:
            batch = self.batch(index)
            yield batch[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
            index += 1


class StepCounter:
    """Optimizer steps done and the wall time they took, summed over resumed runs; registered
    with accelerate so that checkpoints carry both."""

    def __init__(self) -> None:
        self.value = 0
        self.seconds = 0.0

    def state_dict(self) -> dict:
        return {"global_step": self.value, "train_seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["global_step"])
        self.seconds = float(state.get("train_seconds", 0.0))  # absent before it was recorded


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

    # ----------------------------------------------------------------------------- set-up

    def _text_encoder(self) -> TextEncoder:
        if self.config.text_encoder == "clip":
            return CLIPEncoder(self.config.pretrained_model_name_or_path)
        return MiniLMEncoder(max_length=self.config.max_text_length)

    def _model(self, encoder: TextEncoder):
        """(unet, vae or None, noise scheduler)."""
        cfg = self.config
        if cfg.pretrained_model_name_or_path is not None:
            sd = load_stable_diffusion(cfg.pretrained_model_name_or_path)
            unet, vae, scheduler = sd.unet, sd.vae, sd.scheduler
            if cfg.lora_rank > 0:
                add_lora(unet, cfg.lora_rank)
        else:
            unet = build_unet(cfg.model_preset, cfg.resolution, encoder.hidden_size)
            vae, scheduler = (
                None,
                noise_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type),
            )
        if unet.config.cross_attention_dim != encoder.hidden_size:
            raise ConfigError(
                f"text_encoder: '{cfg.text_encoder}' gives states of width {encoder.hidden_size}, "
                f"the UNet expects {unet.config.cross_attention_dim}"
            )
        return unet, vae, scheduler

    # ------------------------------------------------------------------------------ train

    def train(self) -> TrainResult:
        cfg = self.config
        # accelerate keeps one AcceleratorState per process; drop an earlier run's settings
        # (mixed precision, accumulation) so that this one may choose its own.
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=_cpu_data_parallel(),
        )
        main = accelerator.is_main_process
        output_dir = Path(cfg.output_dir)
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)

        dataset = ImageFolderDataset(
            cfg.train_data_dir, cfg.resolution, cfg.image_column, cfg.caption_column
        )
        data_hash = fingerprint(dataset.records)
        encoder = self._text_encoder()
        embeddings = CaptionEmbeddings(encoder, dataset.captions)

        set_seed(cfg.seed)
        unet, vae, scheduler = self._model(encoder)
        if vae is not None:
            vae.to(accelerator.device)
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        lr_schedule = get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_train_steps,
        )
        unet, optimizer = accelerator.prepare(unet, optimizer)
        model = accelerator.unwrap_model(unet)
        ema = None
        if cfg.use_ema:
            ema = EMAModel(params, decay=cfg.ema_decay)
            ema.to(accelerator.device)
            accelerator.register_for_checkpointing(ema)
        counter = StepCounter()
        accelerator.register_for_checkpointing(lr_schedule)
        accelerator.register_for_checkpointing(counter)
        ctx = TrainingContext(
            accelerator=accelerator,
            config=cfg,
            text_encoder=encoder,
            captions=tuple(embeddings.captions),
            dataset=dataset,
            scheduler=scheduler,
            vae=vae,
        )
        for defense in self.defenses:
            defense.setup(model, optimizer.optimizer, ctx)
            accelerator.register_for_checkpointing(defense)

        resume = resolve_resume(output_dir, cfg.resume_from_checkpoint)
        if resume is not None:
            accelerator.load_state(str(resume))
        ctx.step = counter.value

        accum = cfg.gradient_accumulation_steps
        rank, world = accelerator.process_index, accelerator.num_processes
        local_batch = cfg.train_batch_size
        global_batch = local_batch * world
        sampler = GlobalBatchSampler(
            len(dataset), local_batch, rank, world, cfg.seed, start=counter.value * accum
        )
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.dataloader_num_workers)
        progress = tqdm(
            total=cfg.max_train_steps,
            initial=counter.value,
            disable=not (self.progress and accelerator.is_local_main_process),
            desc="train",
        )

        micro_step = counter.value * accum
        window: list[float] = []
        last_loss = float("nan")
        steps_run, loop_start, log_start = 0, time.perf_counter(), time.perf_counter()
        seconds_before = counter.seconds
        unet.train()
        batches = iter(loader)
        while counter.value < cfg.max_train_steps:
            batch = next(batches)
            micro = micro_step % accum
            if micro == 0:
                draws = StepDraws(cfg.seed, counter.value, global_batch * accum, scheduler, cfg)
            first = micro * global_batch + rank * local_batch
            x0, noise, timesteps, states = self._inputs(
                batch, draws, slice(first, first + local_batch), embeddings, vae, accelerator.device
            )

            with accelerator.accumulate(unet):
                losses = per_sample_loss(unet, scheduler, x0, states, timesteps, noise)
                if cfg.snr_gamma > 0:
                    losses = losses * min_snr_weights(scheduler, timesteps, cfg.snr_gamma)
                hook_batch = {
                    "x0": x0,
                    "captions": batch["caption"],
                    "indices": batch["index"],
                    "timesteps": timesteps,
                    "noise": noise,
                    "encoder_hidden_states": states,
                }
                weights = combined_weights(self.defenses, losses, hook_batch, ctx)
                loss = weighted_mean(losses, weights, ctx)
                value = loss.item()
                if not np.isfinite(value):
                    raise TrainingError(
                        f"loss is {value} at step {counter.value + 1}; stopped before it reached "
                        f"the weights. Checkpoints in {output_dir} are intact; lower "
                        "--learning_rate or check the data."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for defense in self.defenses:
                        defense.after_backward(model, ctx)
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            window.append(value)
            if not accelerator.sync_gradients:
                continue

            lr_schedule.step()
            for defense in self.defenses:
                defense.after_step(model, ctx)
            if ema is not None:
                ema.step(params)
            counter.value += 1
            counter.seconds = seconds_before + time.perf_counter() - loop_start
            ctx.step = counter.value
            steps_run += 1
            progress.update(1)
            if counter.value % cfg.logging_steps == 0 or counter.value == cfg.max_train_steps:
                last_loss = float(np.mean(window))
                now = time.perf_counter()
                images = len(window) * global_batch
                if main:
                    record = {
                        "step": counter.value,
                        "loss": last_loss,
                        "lr": lr_schedule.get_last_lr()[0],
                        "images_per_second": images / max(now - log_start, 1e-9),
                    }
                    with open(output_dir / LOG_FILE, "a") as log:
                        log.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{last_loss:.4f}")
                window, log_start = [], now
            if counter.value % cfg.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, counter.value, cfg.checkpoints_total_limit)
        loop_seconds = time.perf_counter() - loop_start
        progress.close()

        reports = {defense.name: defense.report() for defense in self.defenses}
        for defense in self.defenses:
            defense.detach()
        accelerator.wait_for_everyone()
        if main:
            if ema is not None:
                ema.copy_to(params)
            metadata = {
                "memguard_version": __version__,
                "config": to_dict(cfg),
                "text_encoder": encoder.spec(),
                "vae": cfg.pretrained_model_name_or_path if vae is not None else None,
                "resolution": cfg.resolution,
                "data": {
                    "train_data_dir": str(Path(cfg.train_data_dir).resolve()),
                    "sha256": data_hash,
                    "num_images": len(dataset),
                    "num_captions": len(embeddings.captions) - 1,
                },
                "seed": cfg.seed,
                "global_step": counter.value,
                "train_seconds": counter.seconds,
                "final_loss": last_loss,
                "num_processes": world,
                "defenses": reports,
                "versions": versions(),
            }
            self._write_model(model, scheduler, output_dir, metadata)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(output_dir, counter.value, last_loss, loop_seconds, steps_run)

    def _inputs(self, batch: dict, draws: StepDraws, share: slice, embeddings, vae, device):
        """(x0, noise, timesteps, text states) of this process's micro-batch, on `device`."""
        rows = embeddings.rows(batch["caption"])
        dropped = torch.full_like(rows, embeddings.unconditional_row)
        rows = torch.where(draws.dropped[share], dropped, rows)  # caption dropout
        x0 = batch["pixel_values"]
        if self.config.random_flip:
            x0 = torch.where(draws.flipped[share, None, None, None], x0.flip(-1), x0)
        x0 = x0.to(device)
        if vae is not None:
            x0 = to_latents(vae, x0)
        noise = draws.noise(x0.shape[1:])[share].to(device)
        return x0, noise, draws.timesteps[share].to(device), embeddings.table[rows].to(device)

    def _write_model(self, model, scheduler, output_dir: Path, metadata: dict) -> None:
        """save_pretrained (safetensors) + scheduler config + memguard.json, all atomically."""
        staging = output_dir / ".model.partial"
        if staging.exists():
            shutil.rmtree(staging)
        if self.config.lora_rank > 0:
            model.save_lora_adapter(staging / "lora")
            model.fuse_lora()
            model.unload_lora()
        model.save_pretrained(staging, safe_serialization=True)
        scheduler.save_pretrained(staging)
        publish(staging, output_dir)
        write_json(output_dir / METADATA_FILE, metadata)
