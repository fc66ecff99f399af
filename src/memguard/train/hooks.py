"""The defense protocol: the fixed points at which a defense acts on a training loop.

A defense is an object with a few optional hooks (the diffusers hook / Opacus `make_private`
pattern); memguard's `Trainer` calls them, and a user can call them by hand in a loop of their
own. Every hook of the base class is a no-op, so a defense overrides only what it needs:

    setup(model, optimizer, ctx)             once, before the first step (subspaces, banks, ...)
    sample_weights(per_sample_loss, batch, ctx) -> (B,) weights or None
                                             mask / reweight samples (AGC, Wen et al. threshold);
                                             backward always runs, so DDP ranks stay in step;
                                             None vs weights must be the same on every process
    after_backward(model, ctx)               after the gradient all-reduce (gradient projection)
    after_step(model, ctx)                   after optimizer.step() (update re-projection)
    state_dict() / load_state_dict(state)    everything a resume needs
    report() -> dict                         what it did, for the run log and memguard.json
    detach()                                 remove every hook; the model is left as it was

The loss hook returns per-sample weights rather than a scalar so that several defenses compose
(their weights multiply) and so that the reduction over the global batch lives in one place,
`weighted_mean`, which is exact under data parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TrainingContext:
    """What a hook may need to know about the run: the accelerator, the config and the step."""

    accelerator: Any  # accelerate.Accelerator
    config: Any  # memguard.config.TrainConfig, or a user's own settings object
    step: int = 0  # optimizer steps completed
    text_encoder: Any = None  # memguard.data.text.TextEncoder of the run, when known
    captions: tuple[str, ...] = ()  # the training captions
    dataset: Any = None  # memguard.data.folder.ImageFolderDataset of the training images
    scheduler: Any = None  # the training noise scheduler
    vae: Any = None  # the VAE of a latent model, None in pixel space

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Concatenation over processes in rank order (itself on one process)."""
        if self.world_size == 1:
            return value
        return self.accelerator.gather(value.contiguous())

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over all processes (itself on one process)."""
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.detach().clone(), reduction="sum")


class Defense:
    """Base class: every hook does nothing. Subclasses override what they need."""

    name = "defense"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: TrainingContext):
        """Called once before the first step, with the unwrapped model and the optimizer."""

    def sample_weights(
        self, per_sample_loss: torch.Tensor, batch: dict, ctx: TrainingContext
    ) -> torch.Tensor | None:
        """Weights (B,) for this process's samples, or None to leave them at 1."""
        return None

    def after_backward(self, model: nn.Module, ctx: TrainingContext) -> None:
        """Called when gradients are complete and synchronised, before clipping and the step."""

    def after_step(self, model: nn.Module, ctx: TrainingContext) -> None:
        """Called right after optimizer.step()."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def report(self) -> dict:
        return {}

    def detach(self) -> None:
        """Remove anything attached to the model or optimizer."""


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
    """sum_i w_i l_i / sum_i w_i over the GLOBAL batch, as this process's share of the loss.

    Data parallelism averages gradients over processes, so each process returns
    `world_size * sum_local(w l) / sum_global(w)`; their average is the global weighted mean.
    With all weights at one this is the plain local mean, with no communication.
    """
    if weights is None:
        return per_sample_loss.mean()
    total = ctx.global_sum(weights.sum())
    total = total.clamp_min(torch.finfo(total.dtype).tiny)
    return (weights * per_sample_loss).sum() * ctx.world_size / total
