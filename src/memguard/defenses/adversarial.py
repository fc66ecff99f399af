"""Adversarial fine-tuning against embedding triggers: DoRI's defense (Kowalczuk et al.,
"Finding Dori: Memorization in Text-to-Image Diffusion Models Is Less Local Than Assumed",
arXiv 2507.16880). `memguard train --strategy adversarial --memorized FILE` (plain training with
this attached; `--defense adversarial` attaches it to any strategy, IET's proxies included).

Pruning a memorized prompt's neurons or weights (NeMo, Wanda: `memguard.mitigations`) stops the
prompt from replicating, but DoRI's attack (`memguard.attacks.trigger`) still finds a
conditioning y, near the prompt's text states, under which the model denoises the memorized
image: the memory is still there. Adversarial fine-tuning trains it out, from a trained (plain or
mitigated) model. Before the first step, each memorized image's *surrogate* is generated from its
original prompt by the starting model: what the mitigated model makes instead of the memorized
image. A mitigation may stop only some of a prompt's generations, so the surrogate is the first
generation, from the noise of seed, seed + 1, ... (`surrogate_tries`), that is not a replica
of its image (RMS distance at least 0.1); where all are, the last is kept, with a warning.
`--adv_surrogate_fallback empty` takes instead what the model makes from the empty prompt, the
anchor that concept ablation maps a concept to (Kumari et al., "Ablating Concepts in
Text-to-Image Diffusion Models", ICCV 2023), so that no trigger is trained towards its memory;
on the shapes benchmark it did not stop more triggers and cost quality (README).
Then every call of `extra_loss` (one micro-batch of one optimizer step):

1. draws `images` of the memorized images (`--memorized`: a list in the attack's target format,
   `memguard.attacks.targets`, every image with its prompt);
2. runs the attack against the model as it is now (`optimize_conditioning`: Adam at
   `learning_rate` on y from the prompt's states, `inner_steps` steps of `batch_size` copies of
   the image with fresh timesteps and noise), with gradients to y alone: the model's gradients
   see nothing of the inner loop. With `--adv_trigger_start previous` the attack starts instead
   from the trigger that the last attack on that image found (the prompt's states the first
   time), so that short inner loops add up across outer steps into a long attack that follows
   the model as it changes: the persistent perturbations of "Adversarial Training for Free!"
   (Shafahi et al., NeurIPS 2019), here on the conditioning;
3. returns `weight` x L_adv, L_adv the training loss (min-SNR weights included when the run uses
   them) of the surrogate image conditioned on the detached triggers, on `batch_size` fresh
   timesteps and noises per image.

The step adds it to L_DM, the ordinary denoising loss of the batch, so one backward trains the
model to keep its quality and to denoise the found triggers towards the non-replicating
surrogate. With `weight` 0 the attack still runs, and the weights are plain fine-tuning's
bit for bit: the term adds exact zeros to the gradients, and its draws come from a stream of
their own.

Which images. A fixed number per call, drawn from the memorized list, rather than the memorized
images that happen to be in the batch: the list need not be part of the training folder (the
audit's memorized images, or duplicates removed from the fine-tuning data), a batch of a large
folder rarely holds a given image, and a fixed number keeps every outer step's cost the same.

Randomness. A call's draws (the images, the inner loop's timesteps and noise, L_adv's) come from
a generator seeded by the step's generator's seed (a function of the run's seed and the step,
and of the proxy under IET) and the micro-batch's index in the step. So a resumed run repeats an
uninterrupted one, every process of a data-parallel group draws the same attack (the group's
average is one process's), and the step's own stream, which other defenses read, is untouched.

State: the surrogates (model space: latents for a latent model), computed once and kept in the
checkpoint so that a resume trains towards the same ones; they are also written as an image
folder, `adversarial_surrogates/` in the run's output folder, for people to look at.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memguard.attacks.targets import Targets, read_targets
from memguard.attacks.trigger import draw, optimize_conditioning
from memguard.config import ConfigError, option
from memguard.defenses.base import Defense, TrainingContext, sample_losses
from memguard.diffusion import to_latents
from memguard.io import DiffusionModel
from memguard.sampling import generate, save_samples

SURROGATES_DIR = "adversarial_surrogates"
REPLICA_RMS = 0.1  # a surrogate this near its image is a replica (the attack's default)
SURROGATE_FALLBACKS = ("empty", "none")
TRIGGER_STARTS = ("prompt", "previous")
STREAM = 7  # key of the adversarial draws, beside the step generator's seed


@dataclass(frozen=True)
class AdversarialConfig:
    """`--strategy adversarial` (or `--defense adversarial`) settings."""

    memorized: str | None = option(
        None,
        "adversarial: the memorized images to defend, in the trigger attack's target format "
        "(an image folder with metadata.jsonl, or a file of image paths each followed by a tab "
        "and its prompt); every image needs its prompt (required)",
    )
    weight: float = option(
        1.0, "adversarial: weight of L_adv beside the denoising loss", flag="adv_weight"
    )
    inner_steps: int = option(
        50, "adversarial: Adam steps of the inner trigger attack (the paper's 50)",
        flag="adv_inner_steps",
    )  # fmt: skip
    learning_rate: float = option(
        0.1, "adversarial: the inner attack's Adam learning rate on the conditioning",
        flag="adv_lr",
    )  # fmt: skip
    batch_size: int = option(
        8, "adversarial: copies of each image per inner step, and in L_adv, each with its own "
        "timestep and noise", flag="adv_batch_size",
    )  # fmt: skip
    images: int = option(
        1, "adversarial: memorized images attacked per micro-batch, drawn from the list",
        flag="adv_images",
    )  # fmt: skip
    trigger_start: str = option(
        "prompt", "adversarial: where each inner attack starts: 'prompt' (the image's prompt "
        "states, as the paper's) or 'previous' (the trigger the last attack on that image "
        "found, so that the inner loops add up across steps)", flag="adv_trigger_start",
    )  # fmt: skip
    surrogate_steps: int = option(
        20, "adversarial: DPM-Solver++ steps of the surrogates' generation",
        flag="adv_surrogate_steps",
    )  # fmt: skip
    surrogate_tries: int = option(
        8, "adversarial: noises tried per prompt (seed, seed + 1, ...) for a surrogate that is "
        "not a replica of its image (RMS distance >= 0.1); the first such is kept",
        flag="adv_surrogate_tries",
    )  # fmt: skip
    surrogate_fallback: str = option(
        "none", "adversarial: where the prompt's generation replicates its image from every "
        "noise tried, 'none' keeps the replica (and warns), 'empty' takes the empty prompt's "
        "generation as the surrogate", flag="adv_surrogate_fallback",
    )  # fmt: skip
    guidance_scale: float = option(
        3.0, "adversarial: guidance scale of the surrogates' generation",
        flag="adv_guidance_scale",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.memorized is None:
            raise ConfigError(
                "memorized: required by --strategy adversarial (a file listing the memorized "
                "images and their prompts)"
            )
        choices = {
            "adv_surrogate_fallback": (self.surrogate_fallback, SURROGATE_FALLBACKS),
            "adv_trigger_start": (self.trigger_start, TRIGGER_STARTS),
        }
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(allowed)}")
        at_least_zero = {"adv_weight": self.weight, "adv_inner_steps": self.inner_steps}
        positive = {
            "adv_lr": self.learning_rate,
            "adv_batch_size": self.batch_size,
            "adv_images": self.images,
            "adv_surrogate_steps": self.surrogate_steps,
            "adv_surrogate_tries": self.surrogate_tries,
        }
        for flag, value in at_least_zero.items():
            if not value >= 0:
                raise ConfigError(f"{flag}: must be >= 0, got {value}")
        for flag, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{flag}: must be positive, got {value}")


def read_memorized(path: str | Path, resolution: int) -> Targets:
    """The memorized images and their prompts; an image without a prompt is an error."""
    targets = read_targets(path, resolution, flag="--memorized")
    missing = [
        name for name, prompt in zip(targets.names, targets.prompts, strict=True) if not prompt
    ]
    if missing:
        raise ConfigError(
            f"--memorized {path}: no prompt for {', '.join(missing)}; the triggers start from "
            "an image's prompt and its surrogate is generated from it (list each image with a "
            "tab and its prompt, or give an image folder with captions)"
        )
    return targets


def _rms(image: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS distance of two images in [0, 1] (the attack's `distance_threshold` scale)."""
    return float((image.double() - reference.double()).square().mean().sqrt())


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint32)[0] >> 1)


class AdversarialFineTuning(Defense):
    """L_adv on the triggers of memorized images, found anew every step; see the module
    docstring. `targets`: the memorized images with their prompts; `output_dir`: where the
    surrogates' image folder goes (None: not written)."""

    name = "adversarial"
    needs_text = True  # its triggers are text states
    config_class = AdversarialConfig

    def __init__(
        self,
        targets: Targets,
        config: AdversarialConfig,
        seed: int = 0,
        output_dir: str | Path | None = None,
    ) -> None:
        self.targets, self.config, self.seed = targets, config, seed
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.surrogates: torch.Tensor | None = None  # (n, C, H, W) model space, on the CPU
        self._x0: torch.Tensor | None = None  # the memorized images in model space
        self._states: torch.Tensor | None = None  # their prompts' states (n, L, d)
        self.triggers: torch.Tensor | None = None  # the last trigger of each image (previous)
        self._step, self._calls = -1, 0  # the step being run, extra_loss calls in it
        self.attacks = 0
        self.distances: list[float] = []  # RMS distance of each surrogate to its image
        self.surrogate_seeds: list[int] = []  # the noise seed each surrogate was made from
        self.surrogate_prompts: list[str] = []  # and its prompt: the image's, or "" (empty)
        self._window: list[float] = [0.0, 0.0, 0.0]  # L_adv sum, trigger loss sum, calls

    @classmethod
    def for_run(cls, config: AdversarialConfig, run) -> AdversarialFineTuning:
        if run.pretrained_model_name_or_path is None:
            raise ConfigError(
                "adversarial fine-tuning starts from a trained model (plain or mitigated): give "
                "its folder as --pretrained_model_name_or_path"
            )
        targets = read_memorized(config.memorized, run.resolution)
        return cls(targets, config, seed=run.seed, output_dir=run.output_dir)

    # --------------------------------------------------------------------------- the hooks

    def setup(self, model: nn.Module, optimizer, ctx: TrainingContext | None = None) -> None:
        if ctx is None or ctx.text_encoder is None or ctx.scheduler is None:
            raise ValueError("adversarial fine-tuning needs the run's text encoder and scheduler")
        device = next(model.parameters()).device
        pixels = self.targets.model_pixels().to(device)
        with torch.no_grad():
            self._x0 = to_latents(ctx.vae, pixels) if ctx.vae is not None else pixels
        self._states = ctx.text_encoder.encode(list(self.targets.prompts)).to(device)
        if self.config.trigger_start == "previous":  # a checkpoint's triggers replace these
            self.triggers = self._states.detach().cpu().clone()

    def _make_surrogates(self, model: nn.Module, ctx: TrainingContext) -> None:
        """What the starting model makes for each original prompt (once, before any update):
        the first generation, from the noise of seed, seed + 1, ... (`surrogate_tries` of
        them), that is not a replica of its memorized image; failing that, the last, or with
        the `empty` fallback a generation from the empty prompt."""
        if ctx.step > 0:
            raise RuntimeError(
                "adversarial fine-tuning: no surrogates at step > 0 (they come from the "
                "starting model, and a checkpoint keeps them)"
            )
        config, prompts = self.config, list(self.targets.prompts)
        wrapped = DiffusionModel(model, dict(ctx.scheduler.config), ctx.text_encoder, ctx.vae, {})

        def made(chosen: list[str], num_images: int, seed: int) -> torch.Tensor:
            with torch.autocast(self._x0.device.type, enabled=False):
                return generate(
                    wrapped, chosen, num_images, seed, "dpm",
                    config.surrogate_steps, config.guidance_scale,
                ).cpu()  # fmt: skip

        images = made(prompts, 1, self.seed)
        if images.shape[1:] != self.targets.pixels.shape[1:]:
            raise ConfigError(
                f"--memorized: images of {tuple(self.targets.pixels.shape[2:])} px, the model "
                f"makes {tuple(images.shape[2:])}; give --resolution {images.shape[-1]}"
            )
        reference = self.targets.pixels.float() / 255

        def replicas(indices: list[int]) -> list[int]:
            return [i for i in indices if _rms(images[i], reference[i]) < REPLICA_RMS]

        seeds, sources = [self.seed] * len(prompts), list(prompts)
        pending = replicas(list(range(len(prompts))))  # those whose surrogate is a replica
        for seed in range(self.seed + 1, self.seed + config.surrogate_tries):
            if not pending:
                break
            images[pending] = made([prompts[i] for i in pending], 1, seed)
            for i in pending:
                seeds[i] = seed
            pending = replicas(pending)
        if pending and config.surrogate_fallback == "empty":  # one noise each, not one shared
            images[pending] = made([""], len(pending), self.seed)
            for i in pending:
                seeds[i], sources[i] = self.seed, ""
            pending = replicas(pending)
        self.distances = [_rms(image, ref) for image, ref in zip(images, reference, strict=True)]
        self.surrogate_seeds, self.surrogate_prompts = seeds, sources
        with torch.no_grad():
            pixels = images.to(self._x0.device) * 2 - 1
            x0 = to_latents(ctx.vae, pixels) if ctx.vae is not None else pixels
        self.surrogates = x0.float().cpu()
        if pending:
            tried = f"with each of {config.surrogate_tries} noises"
            if config.surrogate_fallback == "empty":
                tried += " and from the empty prompt"
            warnings.warn(
                f"adversarial fine-tuning: the starting model still makes (nearly) the memorized "
                f"image of {', '.join(self.targets.names[i] for i in pending)} from its prompt "
                f"{tried} (RMS distance < {REPLICA_RMS}), so L_adv trains towards it; mitigate "
                "the model first (memguard mitigate)",
                stacklevel=2,
            )
        if self.output_dir is not None and ctx.group.rank == 0:
            save_samples(images, prompts, 1, self.seed, self.output_dir / SURROGATES_DIR)

    def extra_loss(
        self, model: nn.Module, batch: dict, ctx: TrainingContext
    ) -> torch.Tensor | None:
        """weight x L_adv for this micro-batch (see the module docstring)."""
        if self.surrogates is None:
            self._make_surrogates(model, ctx)
        if ctx.step != self._step:
            self._step, self._calls = ctx.step, 0
        base = batch["generator"].initial_seed() if "generator" in batch else self.seed
        generator = torch.Generator().manual_seed(_seed(base, ctx.step, STREAM, self._calls))
        self._calls += 1
        config, n = self.config, len(self.targets)
        chosen = torch.randperm(n, generator=generator)[: min(config.images, n)]
        x0 = self._x0[chosen.to(self._x0.device)]
        kept = self.triggers is not None  # --adv_trigger_start previous
        start = self.triggers[chosen] if kept else self._states[chosen.to(self._states.device)]
        triggers, trigger_losses = optimize_conditioning(
            model, ctx.scheduler, x0, start.to(self._states.device),
            config.inner_steps, config.learning_rate, config.batch_size, generator,
        )  # fmt: skip
        if kept:
            self.triggers[chosen] = triggers.cpu()
        surrogates = self.surrogates[chosen].to(x0.device)
        timesteps, noise = draw(
            surrogates, config.batch_size, ctx.scheduler.config.num_train_timesteps, generator
        )
        copies = {
            "x0": surrogates.repeat_interleave(config.batch_size, dim=0),
            "encoder_hidden_states": triggers.repeat_interleave(config.batch_size, dim=0),
            "timesteps": timesteps,
            "noise": noise,
        }
        adversarial = sample_losses(model, copies, ctx).mean()
        self.attacks += len(chosen)
        self._window = [
            self._window[0] + float(adversarial.detach()),
            self._window[1] + float(trigger_losses.mean()),
            self._window[2] + 1,
        ]
        return config.weight * adversarial

    # ---------------------------------------------------------------------------- records

    def log_values(self) -> dict:
        adversarial, trigger, calls = self._window
        self._window = [0.0, 0.0, 0.0]
        if not calls:
            return {"adv_loss": None, "trigger_loss": None}
        return {"adv_loss": adversarial / calls, "trigger_loss": trigger / calls}

    def state_dict(self) -> dict:
        return {
            "surrogates": self.surrogates,
            "distances": self.distances,
            "surrogate_seeds": self.surrogate_seeds,
            "surrogate_prompts": self.surrogate_prompts,
            "attacks": self.attacks,
            "names": list(self.targets.names),
            "triggers": self.triggers,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != list(self.targets.names):
            raise ConfigError(
                f"--memorized: the checkpoint was trained against {state['names']}, this run "
                f"lists {list(self.targets.names)}"
            )
        self.surrogates, self.distances = state["surrogates"], state["distances"]
        self.surrogate_seeds = state.get("surrogate_seeds", [])  # not kept before 2026-12
        self.surrogate_prompts = state.get("surrogate_prompts", [])  # nor this
        self.attacks = state["attacks"]
        if state.get("triggers") is not None:  # kept since 2026-12, with `previous` only
            self.triggers = state["triggers"]

    def report(self) -> dict:
        return {
            "paper": "Kowalczuk et al., arXiv 2507.16880 (adversarial fine-tuning)",
            "memorized": list(self.targets.names),
            "surrogate_rms_distance": self.distances,
            "surrogate_seeds": self.surrogate_seeds,
            "surrogate_prompts": self.surrogate_prompts,
            "surrogates": SURROGATES_DIR,
            "attacks": self.attacks,
            "trigger_drift": self._drift(),
        }

    def _drift(self) -> list[float] | None:
        """Per image, how far its kept trigger has moved from its prompt's states: the RMS of
        the difference over the RMS of the states (None unless triggers are kept)."""
        if self.triggers is None or self._states is None:
            return None
        states = self._states.detach().double().cpu()
        moved = (self.triggers.double() - states).flatten(1).square().mean(1).sqrt()
        return (moved / states.flatten(1).square().mean(1).sqrt()).tolist()
