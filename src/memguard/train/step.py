"""One optimizer step of denoising training (Ho et al., 2020), with the defenses' hooks: the
unit that every training strategy drives.

`TrainingStep` owns a model, its optimizer, learning-rate schedule, EMA weights and defenses,
and the process group its gradients are averaged in. Called with the micro-batches of one
optimizer step, it runs, for each: the defenses' `before_forward` -> the per-sample loss (with
min-SNR weights when asked) -> the defenses' sample weights -> the group's weighted mean -> the
defenses' extra losses -> backward; then the gradient average over the group -> `after_backward`
hooks -> clipping -> the optimizer step -> `after_step` hooks -> the lr schedule and EMA. Plain
training is a loop over one step object on every process (`memguard.train.trainer`); IET's
proxies are several step objects with a group of one process each, averaged in rounds;
adversarial fine-tuning drives one step with an inner loop feeding `extra_loss`.

Mixed precision is autocast on the forward pass (the weights, their gradients and the optimizer
stay in float32), with a gradient scaler for fp16.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from memguard.defenses.base import (
    Defense,
    TrainingContext,
    combined_weights,
    sample_losses,
    weighted_mean,
)

AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); checkpoints already written are intact."""


class TrainingStep:
    """One optimizer step on a batch of micro-batches; see the module docstring.

    A micro-batch is a dict with "x0" (B, C, H, W) clean model inputs, "noise" like x0,
    "timesteps" (B,), the UNet's conditioning arguments ("encoder_hidden_states" (B, L, d),
    "class_labels" (B,), or none: `memguard.conditioning`), and whatever the defenses read
    ("captions", "indices", "pixels": the clean images before the VAE, "generator": the step's
    generator). The context's group is the group gradients are averaged in.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_schedule: torch.optim.lr_scheduler.LRScheduler,
        context: TrainingContext,
        defenses: Sequence[Defense] = (),
        ema: EMAModel | None = None,
        max_grad_norm: float = 0.0,
        mixed_precision: str = "no",
    ) -> None:
        self.model, self.optimizer, self.lr_schedule = model, optimizer, lr_schedule
        self.ctx, self.defenses, self.ema = context, list(defenses), ema
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.device = self.params[0].device
        self.autocast_dtype = AUTOCAST[mixed_precision]
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=mixed_precision == "fp16" and self.device.type == "cuda"
        )

    def setup_defenses(self) -> None:
        """Each defense's `setup` (once, before the first step)."""
        for defense in self.defenses:
            defense.setup(self.model, self.optimizer, self.ctx)

    def loss(self, batch: dict, micro_batches: int) -> torch.Tensor:
        """This process's share of the step's loss on one micro-batch (the extra losses' forward
        passes under the same autocast as the step's)."""
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            for defense in self.defenses:
                defense.before_forward(batch, self.ctx)
            losses = sample_losses(self.model, batch, self.ctx)
            weights = combined_weights(self.defenses, losses, batch, self.ctx)
            loss = weighted_mean(losses, weights, self.ctx)
            for defense in self.defenses:
                extra = defense.extra_loss(self.model, batch, self.ctx)
                if extra is not None:
                    loss = loss + extra
        return loss / micro_batches

    def __call__(self, micro_batches: Sequence[dict]) -> float:
        """Run one optimizer step; the mean of the micro-batches' losses (this process's)."""
        values = []
        for batch in micro_batches:
            loss = self.loss(batch, len(micro_batches))
            value = loss.item() * len(micro_batches)
            if not np.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at step {self.ctx.step + 1}; stopped before it reached the "
                    "weights"
                )
            values.append(value)
            self.scaler.scale(loss).backward()
        for param in self.params:  # every rank averages the same list of tensors
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        self.ctx.group.average_(param.grad for param in self.params)
        self.scaler.unscale_(self.optimizer)
        for defense in self.defenses:
            defense.after_backward(self.model, self.ctx)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        for defense in self.defenses:
            defense.after_step(self.model, self.ctx)
        if self.ema is not None:
            self.ema.step(self.params)
        self.ctx.step += 1
        return float(np.mean(values))

    def to(self, device: torch.device | str) -> None:
        """Move the training state (the trainable weights, the optimizer's state, the EMA
        weights) to `device`; frozen weights and buffers stay where they are. An IET proxy
        waits on the CPU while the others train."""
        device = torch.device(device)
        if device == self.device:
            return
        for param in self.params:
            param.data = param.data.to(device)
        # torch's own rule for moving optimizer state with its parameters (AdamW's step counts
        # stay on the CPU)
        self.optimizer.load_state_dict(self.optimizer.state_dict())
        if self.ema is not None:
            self.ema.to(device)
        self.device = device

    def finish(self) -> list[Defense]:
        """End of training: the EMA weights (when kept) go into the model, then the defenses
        report on the model as it will be saved, and are detached. Returns the defenses."""
        if self.ema is not None:
            self.ema.copy_to(self.params)
        return self.defenses

    def detach(self) -> None:
        for defense in self.defenses:
            defense.detach()

    def state_dict(self) -> dict:
        return {
            "step": self.ctx.step,
            "model": {
                n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad
            },
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
            "defenses": [defense.state_dict() for defense in self.defenses],
        }

    def load_state_dict(self, state: dict) -> None:
        self.ctx.step = state["step"]
        with torch.no_grad():
            named = dict(self.model.named_parameters())
            for name, value in state["model"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)
        self.scaler.load_state_dict(state["scaler"])
        if len(state["defenses"]) != len(self.defenses):
            raise ValueError(
                f"the checkpoint holds {len(state['defenses'])} defenses' states, this run "
                f"attaches {len(self.defenses)}"
            )
        for defense, saved in zip(self.defenses, state["defenses"], strict=True):
            defense.load_state_dict(saved)
