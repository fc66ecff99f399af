"""Anti-gradient control (AGC): skip samples whose loss is abnormally low, as memorized samples'
is (IET-AGC, Liu et al., ECCV 2024, arXiv 2407.15328; extended in IET-AGC+, arXiv 2502.09434).

A memory bank B[t] holds a running loss per diffusion timestep, initialised to 0. For a batch
with timesteps t_i, sample i is kept iff gamma * l_i >= B[t_i] (nothing is skipped while an
entry is 0); the loss is the mean over kept samples; then every sample, kept or not, updates
B[t_i] <- 0.8 B[t_i] + 0.2 l_i, in batch order. Skipped samples are masked, never removed, so
backward still runs on every process.

Under data parallelism every process gathers the global batch's losses and timesteps, so the
banks, the masks and the skip counts are the same on every process. Skip counts per training
sample are kept for memory-sample redistribution (IET-AGC+), and each batch's decision (which
samples were kept, and each sample's margin |gamma l_i - B[t_i]| / B[t_i] to the threshold) is
left in `last` for threshold-aware augmentation (IET-AGC+, `memguard.defenses.taa`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memguard.config import ConfigError, option
from memguard.defenses.base import Defense, TrainingContext


@dataclass(frozen=True)
class AGCConfig:
    """`--defense agc` settings."""

    gamma: float = option(
        2.0,
        "AGC: keep a sample iff gamma * loss >= its timestep's bank (2.0 for DDPM, 1.25 for SD)",
        flag="agc_gamma",
    )
    momentum: float = option(0.8, "AGC: decay of the per-timestep loss bank", flag="agc_momentum")

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ConfigError(f"agc_gamma: must be positive, got {self.gamma}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"agc_momentum: must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class AGCDecision:
    """AGC's decision on one micro-batch of the group, samples in rank order."""

    keep: torch.Tensor  # (group batch,) bool: the samples that stay in the loss
    margin: torch.Tensor  # (group batch,) float64: |gamma l - B[t]| / B[t]; inf where B[t] = 0


class AntiGradientControl(Defense):
    """Mask samples with gamma * loss below the running loss of their timestep.

    gamma: 2.0 for pixel-space DDPM, 1.25 for Stable Diffusion (the papers' settings);
    `float("inf")` keeps every sample (strength zero). momentum: the bank's decay (0.8).
    """

    name = "agc"
    config_class = AGCConfig

    def __init__(
        self, gamma: float = 2.0, momentum: float = 0.8, num_timesteps: int | None = None
    ) -> None:
        self.config = AGCConfig(gamma=gamma, momentum=momentum)  # validates
        self.gamma, self.momentum, self.num_timesteps = gamma, momentum, num_timesteps
        self.bank = torch.zeros(num_timesteps or 0, dtype=torch.float64)
        self.skip_counts: dict[int, int] = {}
        self.seen = self.skipped = 0
        self.last: AGCDecision | None = None  # the decision on the latest micro-batch

    def setup(self, model, optimizer, ctx: TrainingContext) -> None:
        """Size the bank from the run's noise scheduler (one entry per training timestep)."""
        if ctx.scheduler is not None:
            run_timesteps = ctx.scheduler.config.num_train_timesteps
            if self.num_timesteps not in (None, run_timesteps):
                raise ValueError(
                    f"AGC: num_timesteps={self.num_timesteps}, but the run's scheduler has "
                    f"{run_timesteps} training timesteps"
                )
            self.num_timesteps = run_timesteps
        if self.num_timesteps is None:
            raise ValueError("AGC needs num_timesteps, or a context with the run's scheduler")
        if len(self.bank) != self.num_timesteps:
            self.bank = torch.zeros(self.num_timesteps, dtype=torch.float64)

    def sample_weights(
        self, per_sample_loss: torch.Tensor, batch: dict, ctx: TrainingContext
    ) -> torch.Tensor | None:
        losses = ctx.gather(per_sample_loss.detach().double()).cpu()
        timesteps = ctx.gather(batch["timesteps"]).cpu()
        bank = self.bank[timesteps]  # before this batch's update
        keep = self.gamma * losses >= bank
        margin = (self.gamma * losses - bank).abs() / bank
        self.last = AGCDecision(keep, torch.where(bank > 0, margin, math.inf))
        for loss, t in zip(losses.tolist(), timesteps.tolist(), strict=True):
            self.bank[t] = self.momentum * self.bank[t] + (1.0 - self.momentum) * loss
        self.seen += len(keep)
        self.skipped += int((~keep).sum())
        if "indices" in batch:
            indices = ctx.gather(torch.as_tensor(batch["indices"]).to(losses.device)).cpu()
            for index in indices[~keep].tolist():
                self.skip_counts[index] = self.skip_counts.get(index, 0) + 1
        if keep.all():
            return None  # decided on the global batch, so the same on every process
        mine = keep.view(ctx.world_size, -1)[ctx.group.rank]
        return mine.to(per_sample_loss.dtype)

    def state_dict(self) -> dict:
        return {
            "bank": self.bank.clone(),
            "skip_counts": dict(self.skip_counts),
            "seen": self.seen,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.bank = state["bank"].clone()
        self.skip_counts = dict(state["skip_counts"])
        self.seen, self.skipped = state["seen"], state["skipped"]

    def report(self) -> dict:
        most = sorted(self.skip_counts.items(), key=lambda kv: -kv[1])[:20]
        return {
            "gamma": self.gamma,
            "samples_seen": self.seen,
            "samples_skipped": self.skipped,
            "skip_rate": self.skipped / self.seen if self.seen else 0.0,
            "most_skipped": [{"index": i, "skips": n} for i, n in most],
        }
