"""How much of the training signal a projection removes, and the limit that stops a run which
would learn almost nothing.

Gradient projection (Kothandaraman & Pytlarz, arXiv 2512.11194) removes the part of each
gradient that lies in the concept's subspace. When that subspace is most of what the data
teaches (a footprint covering most of the image, say), the model learns nothing and the run
still ends without a word: every generation is noise. So every projection mode measures the
fraction of the gradient energy it removes: of the prediction's gradient in image mode, of the
guarded weights' gradients in text and feature mode. The fraction over the run, at the first
step, and since the last log line go into the run's report and log; at the first step, before
any weight has changed, a fraction above the limit (`--projection_max_removed`) stops the run
with an error naming that flag.
"""

from __future__ import annotations

import torch

from memguard.config import ConfigError
from memguard.distributed import Group


class RemovedSignal:
    """Removed and total gradient energy: over the run, and since the last `take_window`.

    A training loop ends each step with `end_step`, on every process of the group: the step's
    energies are summed over the group, so the figures are the group's, not one process's. A
    loop of one's own that never calls it still gets this process's figures."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._step = torch.zeros(2, dtype=torch.float64)  # counted since the last end_step
        self._run = torch.zeros(2, dtype=torch.float64)
        self._window = torch.zeros(2, dtype=torch.float64)
        self.first_step: float | None = None  # the fraction at the run's first step

    def add(self, removed: torch.Tensor, total: torch.Tensor) -> None:
        """Count one projection: the energy it removed and the energy it was given."""
        self._step += torch.stack([removed.detach().double(), total.detach().double()]).cpu()

    def _close_step(self, energies: torch.Tensor) -> None:
        self._run += energies
        self._window += energies
        self._step = torch.zeros_like(self._step)

    @staticmethod
    def _fraction(energies: torch.Tensor) -> float | None:
        removed, total = energies.tolist()
        return removed / total if total > 0 else None

    @property
    def fraction(self) -> float | None:
        """Over the run so far (None before any gradient)."""
        return self._fraction(self._run + self._step)

    def take_window(self) -> float | None:
        """The fraction since the last call, which starts a new window."""
        self._close_step(self._step)
        fraction, self._window = self._fraction(self._window), torch.zeros_like(self._window)
        return fraction

    def end_step(self, group: Group, what: str) -> None:
        """After a step's backward (every process of the group calls it): add the group's
        energies of the step; at the run's first step, record its fraction and stop when it
        exceeds the limit, before any weight changes."""
        energies = group.sum(self._step)
        self._close_step(energies)
        if self.first_step is not None:  # measured already (or a resumed run)
            return
        fraction = self._fraction(energies)
        self.first_step = fraction
        if fraction is not None and fraction > self.limit:
            raise ConfigError(
                f"projection_max_removed: the projection removed {fraction:.1%} of {what} at the "
                f"first step (limit {self.limit:.0%}): the model would learn almost nothing from "
                "its data. Check the concept's exemplars and settings, or raise "
                "--projection_max_removed to train anyway."
            )

    def report(self) -> dict:
        return {"signal_removed": self.fraction, "signal_removed_first_step": self.first_step}

    def state_dict(self) -> dict:
        return {"run": self._run + self._step, "first_step": self.first_step}

    def load_state_dict(self, state: dict) -> None:
        self._run = state["run"].clone()
        self._step = torch.zeros_like(self._run)
        self._window = torch.zeros_like(self._run)
        self.first_step = state["first_step"]


def check_limit(limit: float) -> None:
    if not 0 < limit <= 1:
        raise ConfigError(f"projection_max_removed: must be in (0, 1], got {limit}")
