"""What gradient projection taken at the model's prediction shares, in image and patch mode
(memguard's design for the selective learning of Kothandaraman & Pytlarz, arXiv 2512.11194).

Such a mode guards no weight: a forward hook on the UNet registers, on the predictions it
chooses, a gradient hook that removes part of the gradient of the loss with respect to the
prediction, so that no layer learns anything from what was removed. The guard owns that forward
hook, the measure of the gradient energy removed (`RemovedSignal`, whose limit stops a run at
its first step) and attach/detach; a mode says what to prepare before training (`prepare`) and
which hook, if any, a prediction gets (`gradient_hook`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memguard.defenses.base import Defense, TrainingContext
from memguard.defenses.signal import RemovedSignal

GradientHook = Callable[[torch.Tensor], torch.Tensor]


class PredictionGuard(Defense):
    """Base class of the projections at the prediction; see the module docstring."""

    name = "projection"

    def __init__(self, max_removed: float) -> None:
        self.signal = RemovedSignal(max_removed)
        self._handles: list = []

    def prepare(self, ctx: TrainingContext | None) -> None:
        """Before the first step: find what the mode projects off, when it was not given."""

    def gradient_hook(self, prediction: torch.Tensor) -> GradientHook | None:
        """The hook that projects this prediction's gradient, or None to leave it alone."""
        raise NotImplementedError

    def setup(self, model: nn.Module, optimizer, ctx: TrainingContext | None = None) -> None:
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already attached; detach() it first")
        self.prepare(ctx)
        self._handles.append(model.register_forward_hook(self._on_prediction))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> PredictionGuard:
        """For a loop of your own, with what the mode projects off given to the constructor."""
        self.setup(model, optimizer)
        return self

    def _on_prediction(self, module: nn.Module, inputs, output) -> None:
        """Forward hook on the UNet: the prediction's gradient gets the mode's hook."""
        prediction = output[0] if isinstance(output, tuple) else output.sample
        hook = self.gradient_hook(prediction)
        if hook is not None and prediction.requires_grad:
            prediction.register_hook(hook)

    def after_backward(self, model: nn.Module, ctx: TrainingContext) -> None:
        self.signal.end_step(ctx.group, "the prediction's gradient energy")

    def log_values(self) -> dict:
        return {"signal_removed": self.signal.take_window()}

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
