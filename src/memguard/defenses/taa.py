"""Threshold-aware augmentation (TAA): train again, augmented, on the samples that AGC kept but
that came close to its threshold (IET-AGC+, "Redistribute Ensemble Training for Mitigating
Memorization in Diffusion Models", arXiv 2502.09434; AGC from IET-AGC, Liu et al., ECCV 2024,
arXiv 2407.15328).

For the samples AGC kept in a micro-batch, the margin to its threshold is
d_i = |gamma l_i - B[t_i]| / B[t_i] (`AGCDecision.margin`; a sample whose timestep's bank is
still empty has no threshold, d_i = inf) and its strength s_i = exp(-5 d_i). The kept samples are
drawn again through RandAugment (Cubuk et al., CVPR Workshops 2020; kornia's implementation) with
two operations at magnitude round(5 * mean s) (of kornia's 30, rounded half up), and trained on
with fresh noise and timesteps: `extra_loss` returns their mean loss, added to the step's. At
magnitude 0 (no kept sample, or all far from the threshold) there is no augmented batch and
training is AGC's alone.

The operations are a setting (`--taa_ops`): the paper's set changes colours and contrast, which
contradicts captions that name colours (the shapes benchmark's do), so the default is the
geometric operations only (rotate, shear, translate); `paper` is Cubuk et al.'s list as kornia
implements it (identity aside, which kornia does not have).

Every draw (which operations, their parameters, the noise and the timesteps) comes from the
step's generator (`memguard.train.draws`), so a resumed run augments as the uninterrupted one
did. Under data parallelism the kept images of the group's micro-batch are gathered, augmented
alike on every process and each takes its own: the same as one process on the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

from memguard.conditioning import condition_of
from memguard.config import ConfigError, option
from memguard.defenses.agc import AntiGradientControl
from memguard.defenses.base import Defense, TrainingContext, sample_losses, weighted_mean
from memguard.diffusion import to_latents

NUM_OPS = 2  # RandAugment's N, the paper's
SHARPNESS = 5.0  # s_i = exp(-SHARPNESS d_i)
MAX_MAGNITUDE = 5  # magnitude = round(MAX_MAGNITUDE * mean s)
RANGES = {name: (low, high) for ((name, low, high),) in default_policy}  # kornia's ranges
OP_SETS = {
    "geometric": ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"),
    "paper": (
        "auto_contrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
        "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
    ),
}  # fmt: skip


def operations(names: tuple[str, ...]) -> tuple[str, ...]:
    """The RandAugment operations that `--taa_ops` names (sets expanded, each once)."""
    ops: dict[str, None] = {}
    for name in names:
        if name not in OP_SETS and name not in RANGES:
            raise ConfigError(
                f"taa_ops: unknown {name!r} (sets: {', '.join(OP_SETS)}; operations: "
                f"{', '.join(RANGES)})"
            )
        ops.update(dict.fromkeys(OP_SETS.get(name, (name,))))
    return tuple(ops)


@dataclass(frozen=True)
class TAAConfig:
    """`--augment taa` settings."""

    ops: tuple[str, ...] = option(
        ("geometric",),
        "TAA: RandAugment's operations: 'geometric' (rotate, shear, translate), 'paper' (Cubuk "
        "et al.'s, colour and contrast too) or operation names (repeatable). Geometric by "
        "default: colour operations would train on images that contradict captions naming "
        "colours",
        flag="taa_ops",
    )

    def __post_init__(self) -> None:
        if not self.ops:
            raise ConfigError("taa_ops: name at least one operation or set")
        operations(self.ops)


def randaugment(pixels: torch.Tensor, ops: tuple[str, ...], magnitude: int, seed: int):
    """`pixels` (B, 3, H, W) in [-1, 1] through kornia's RandAugment: min(2, len(ops)) of `ops`
    at `magnitude` (1-29), every draw from `seed` alone (the global generator is left as it
    was)."""
    augment = RandAugment(
        n=min(NUM_OPS, len(ops)), m=magnitude, policy=[[(op, *RANGES[op])] for op in ops]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        augmented = augment((pixels + 1.0) / 2.0)
    return augmented.clamp(0.0, 1.0) * 2.0 - 1.0


class ThresholdAwareAugmentation(Defense):
    """Train again, augmented, on the kept samples near AGC's threshold; see the module.

    agc: the AntiGradientControl on the same step, whose decisions it reads (the registry
    connects it; pass it when building both by hand). ops: `TAAConfig.ops`.
    """

    name = "taa"
    config_class = TAAConfig
    needs = ("agc",)

    def __init__(
        self, ops: tuple[str, ...] = ("geometric",), agc: AntiGradientControl | None = None
    ) -> None:
        self.config = TAAConfig(ops=tuple(ops))  # validates
        self.ops = operations(self.config.ops)
        self.agc = agc
        self.batches = self.samples = 0  # augmented batches and samples (over the group)
        self.magnitudes: dict[int, int] = {}  # magnitude -> augmented batches

    def connect(self, peers: dict[str, Defense]) -> None:
        self.agc = peers["agc"]

    def setup(self, model, optimizer, ctx: TrainingContext) -> None:
        if not isinstance(self.agc, AntiGradientControl):
            raise ValueError("TAA augments the samples AGC keeps: give it the run's AGC (agc=)")

    def augmented_inputs(self, batch: dict, ctx: TrainingContext) -> dict | None:
        """The augmented batch of this process's kept samples (model inputs as in a
        micro-batch), or None at magnitude 0; draws from `batch["generator"]`."""
        decision = self.agc.last
        keep = decision.keep
        if not keep.any():
            return None
        strength = torch.exp(-SHARPNESS * decision.margin[keep])
        magnitude = math.floor(MAX_MAGNITUDE * float(strength.mean()) + 0.5)
        if magnitude == 0:
            return None
        generator = batch["generator"]
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        device = batch["x0"].device
        pixels = ctx.gather(batch["pixels"].to(device)).cpu()[keep]
        augmented = randaugment(pixels, self.ops, magnitude, seed)
        count = len(pixels)
        timesteps = torch.randint(
            0, ctx.scheduler.config.num_train_timesteps, (count,), generator=generator
        )
        noise = torch.randn((count, *batch["x0"].shape[1:]), generator=generator)
        self.batches, self.samples = self.batches + 1, self.samples + count
        self.magnitudes[magnitude] = self.magnitudes.get(magnitude, 0) + 1
        per_rank = keep.view(ctx.world_size, -1)
        first = int(per_rank[: ctx.group.rank].sum())
        mine = slice(first, first + int(per_rank[ctx.group.rank].sum()))
        x0 = augmented[mine].to(device)
        if ctx.vae is not None:
            x0 = to_latents(ctx.vae, x0)
        return {
            "x0": x0,
            "noise": noise[mine].to(device),
            "timesteps": timesteps[mine].to(device),
            **{
                key: value[per_rank[ctx.group.rank].to(value.device)]
                for key, value in condition_of(batch).items()
            },
        }

    def extra_loss(self, model, batch: dict, ctx: TrainingContext) -> torch.Tensor | None:
        """The mean loss of the augmented kept samples over the group (None at magnitude 0)."""
        inputs = self.augmented_inputs(batch, ctx)
        if inputs is None:
            return None
        if len(inputs["x0"]):
            losses = sample_losses(model, inputs, ctx)
        else:  # none of the group's kept samples is this process's
            losses = inputs["x0"].new_zeros(0)
        return weighted_mean(losses, torch.ones_like(losses), ctx)

    def state_dict(self) -> dict:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "magnitudes": dict(self.magnitudes),
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.samples = state["batches"], state["samples"]
        self.magnitudes = dict(state["magnitudes"])

    def report(self) -> dict:
        return {
            "ops": list(self.ops),
            "augmented_batches": self.batches,
            "augmented_samples": self.samples,
            "batches_by_magnitude": {str(m): n for m, n in sorted(self.magnitudes.items())},
        }
