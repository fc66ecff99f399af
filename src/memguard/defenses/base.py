"""The defense protocol: the fixed points at which a defense acts on a training step.

A defense is an object with a few optional hooks (the diffusers hook / Opacus `make_private`
pattern); memguard's `TrainingStep` calls them, and a user can call them by hand in a loop of
their own. Every hook of the base class is a no-op, so a defense overrides only what it needs:

    setup(model, optimizer, ctx)             once, before the first step (subspaces, banks, ...)
    before_forward(batch, ctx)               before each micro-batch's forward pass (what a
                                             per-image projection reads of the clean inputs)
    sample_weights(per_sample_loss, batch, ctx) -> (B,) weights or None
                                             mask / reweight samples (AGC, Wen et al. threshold);
                                             backward always runs, so ranks stay in step;
                                             None vs weights must be the same on every process
    extra_loss(model, batch, ctx) -> scalar or None
                                             a term added to the loss before backward
                                             (adversarial fine-tuning, regularisers)
    after_backward(model, ctx)               after the gradient all-reduce (gradient projection)
    after_step(model, ctx)                   after optimizer.step() (update re-projection)
    connect(peers)                           the defenses it `needs`, by name (TAA reads AGC)
    state_dict() / load_state_dict(state)    everything a resume needs
    log_values() -> dict                     figures for the run log's next line
    report() -> dict                         what it did, for memguard.json
    detach()                                 remove every hook; the model is left as it was

The sample hook returns per-sample weights rather than a scalar so that several defenses compose
(their weights multiply) and so that the reduction over the group's batch lives in one place,
`weighted_mean`, which is exact under data parallelism. What a hook may need about the run is in
`TrainingContext`: the process group its reductions run in, the step, the noise scheduler, the
text encoder, the VAE and the loss's min-SNR weighting (`sample_losses` is the step's loss, for a
defense that trains on a batch of its own). What only one defense needs (exemplar folders, a
resolution, a seed) is given to that defense's constructor; a defense that reads another's
decisions names it in `needs` and is handed it by `connect` when the registry builds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memguard.conditioning import condition_of
from memguard.diffusion import min_snr_weights, per_sample_loss
from memguard.distributed import Group


@dataclass
class TrainingContext:
    """What a hook may need to know about the run."""

    group: Group = field(default_factory=Group.local)  # processes training this model together
    step: int = 0  # optimizer steps completed
    scheduler: Any = None  # the training noise scheduler (diffusers DDPMScheduler)
    text_encoder: Any = None  # memguard.data.text.TextEncoder of the run, when known
    vae: Any = None  # the VAE of a latent model; None in pixel space
    snr_gamma: float = 0.0  # min-SNR-gamma weighting of the loss (0: off)
    snr_floor: float = 0.0  # lower bound of that weight on the clean image (0: off)

    @property
    def world_size(self) -> int:
        return self.group.size

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Concatenation over the group's processes in rank order (itself on one process)."""
        return self.group.gather(value)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over the group's processes (itself on one process)."""
        return self.group.sum(value)


class Defense:
    """Base class: every hook does nothing. Subclasses override what they need."""

    name = "defense"
    config_class: type | None = None  # its settings' dataclass, when `memguard train` builds it
    config: Any = None  # the settings it was built from (recorded in memguard.json)
    needs: tuple[str, ...] = ()  # names of the defenses it reads, handed to `connect`
    needs_text: bool = False  # reads caption states or prompts: a text-conditional run only

    @classmethod
    def for_run(cls, config: Any, run: Any) -> Defense:
        """The defense `memguard train` attaches: built from its settings (`config_class`) and
        what it needs of the run (`run`: the TrainConfig, e.g. its data folder or seed)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def connect(self, peers: dict[str, Defense]) -> None:
        """Given the defenses named in `needs` (name -> the instance on the same step)."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: TrainingContext):
        """Called once before the first step, with the unwrapped model and the optimizer."""

    def before_forward(self, batch: dict, ctx: TrainingContext) -> None:
        """Called with each micro-batch before the model's forward pass on it."""

    def sample_weights(
        self, per_sample_loss: torch.Tensor, batch: dict, ctx: TrainingContext
    ) -> torch.Tensor | None:
        """Weights (B,) for this process's samples, or None to leave them at 1."""
        return None

    def extra_loss(
        self, model: nn.Module, batch: dict, ctx: TrainingContext
    ) -> torch.Tensor | None:
        """A scalar added to this process's loss before backward, or None."""
        return None

    def after_backward(self, model: nn.Module, ctx: TrainingContext) -> None:
        """Called when gradients are complete and synchronised, before clipping and the step."""

    def after_step(self, model: nn.Module, ctx: TrainingContext) -> None:
        """Called right after optimizer.step()."""

    def log_values(self) -> dict:
        """Figures for the run log's next line (name -> number or None), since the last one."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def report(self) -> dict:
        return {}

    def detach(self) -> None:
        """Remove anything attached to the model or optimizer."""


def sample_losses(model: nn.Module, batch: dict, ctx: TrainingContext) -> torch.Tensor:
    """The training loss of each sample of `batch` (x0, noise, timesteps, and the conditioning
    arguments: encoder_hidden_states, class_labels or none), (B,): the denoising loss, with
    min-SNR weights when the run asks for them."""
    losses = per_sample_loss(
        model, ctx.scheduler, batch["x0"], condition_of(batch), batch["timesteps"], batch["noise"]
    )
    if ctx.snr_gamma > 0:
        losses = losses * min_snr_weights(
            ctx.scheduler, batch["timesteps"], ctx.snr_gamma, ctx.snr_floor
        )
    return losses


def combined_weights(
    defenses: Sequence[Defense], per_sample_loss: torch.Tensor, batch: dict, ctx: TrainingContext
) -> torch.Tensor | None:
    """Product of the defenses' sample weights; None when no defense reweights."""
    weights = None
    for defense in defenses:
        w = defense.sample_weights(per_sample_loss, batch, ctx)
        if w is not None:
            w = w.to(per_sample_loss.device, per_sample_loss.dtype).detach()
            weights = w if weights is None else weights * w
    return weights


def weighted_mean(
    per_sample_loss: torch.Tensor, weights: torch.Tensor | None, ctx: TrainingContext
) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i over the GROUP's batch, as this process's share of the loss.

    The group averages gradients over its processes, so each process returns
    `size * sum_local(w l) / sum_group(w)`; their average is the group's weighted mean.
    With all weights at one this is the plain local mean, with no communication.
    """
    if weights is None:
        return per_sample_loss.mean()
    total = ctx.global_sum(weights.sum())
    total = total.clamp_min(torch.finfo(total.dtype).tiny)
    return (weights * per_sample_loss).sum() * ctx.world_size / total
