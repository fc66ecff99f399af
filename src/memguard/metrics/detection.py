"""Prompt-level memorization detection (Wen et al., "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", ICLR 2024), and the ROC figures that score it.

For a prompt p, d(p) = mean over sampling steps t of ||eps(x_t, t, E(p)) - eps(x_t, t, E(""))||,
the magnitude of the text-conditional part of the noise prediction along the (guided) sampling
trajectory, averaged over a few starts. Memorized prompts pull the trajectory hard toward their
training image, so d is large. `steps` limits the average to the first k steps (Wen et al. find
the first step alone already separates well).

Starts: memguard draws the same S starting noises (seeds s .. s+S-1, s the audit's seed) for
every prompt, so prompts are compared from the same points (a paired comparison); Wen et al.'s
detection draws each prompt's starts with seeds of its own. The two agree in expectation, not
run by run.

TPR at 1% FPR follows Wen et al.'s evaluation: the true-positive rate of the last point of the
ROC curve (scikit-learn's `roc_curve`, corners only) whose false-positive rate is strictly below
0.01.

One implementation, two doors: `roc_auc` and `tpr_at_fpr` score all prompts at once;
`MemorizationDetection` is a `torchmetrics.Metric` whose `update(scores, memorized)` keeps each
prompt's d(p) and label as state, concatenated across processes when `compute()` scores them
with the same functions.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from memguard.conditioning import Unconditional
from memguard.io import DiffusionModel
from memguard.sampling import denoise, initial_noise


@torch.no_grad()
def step_magnitudes(
    model: DiffusionModel,
    prompts: list[str],
    seeds: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    sampler: str = "dpm",
    batch_size: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """(P, num_inference_steps): ||eps(x_t, p) - eps(x_t, '')|| at each sampling step along the
    guided trajectory, averaged over `seeds` starts (the noises of seeds seed .. seed+seeds-1)."""
    if guidance_scale == 1.0:
        raise ValueError("detection needs guided sampling (guidance_scale != 1)")
    if isinstance(model.conditioning, Unconditional):
        raise ValueError("detection compares a prompt's (or class's) prediction with the "
                         "unconditional one; an unconditional model has no prompts")  # fmt: skip
    cond = model.conditioning.model_inputs(prompts)
    uncond = model.conditioning.null_inputs(1)
    noise = initial_noise(model.sample_shape, seed, seeds)
    jobs = [(p, s) for p in range(len(prompts)) for s in range(seeds)]
    totals = torch.zeros(len(prompts), num_inference_steps, dtype=torch.float64)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        rows = torch.tensor([p for p, _ in chunk])
        per_step = torch.zeros(len(chunk), num_inference_steps, dtype=torch.float64)

        def record(i: int, unconditional, conditional, per_step: torch.Tensor = per_step) -> None:
            difference = (conditional - unconditional).flatten(1).double().norm(dim=1)
            per_step[:, i] = difference.cpu()

        denoise(
            model,
            noise[[s for _, s in chunk]],
            {key: value[rows] for key, value in cond.items()},
            uncond,
            sampler,
            num_inference_steps,
            guidance_scale,
            on_step=record,
        )
        totals.index_add_(0, rows, per_step)
    return totals / seeds


def first_steps_score(magnitudes: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """d(p) per prompt, shape (P,): `step_magnitudes` averaged over the first `steps` sampling
    steps (None or 0: all of them)."""
    return magnitudes[:, : steps or None].mean(dim=1)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (positives should score high); ties count one half.

    The Mann-Whitney form: the probability that a random positive outscores a random negative.
    """
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve as scikit-learn's `roc_curve` returns it by default: (0, 0),
    then one point per distinct score from the highest (predict positive when score >= it),
    keeping only the corners (a point on the straight line between its neighbours is left out).
    """
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError("a ROC curve needs at least one positive and one negative")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each distinct score
    tps = np.cumsum(labels)[last]
    fps = last + 1 - tps
    if len(tps) > 2:
        corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps = tps[corner], fps[corner]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, max_fpr: float = 0.01) -> float:
    """The true-positive rate of the last ROC point (`roc_points`) whose false-positive rate is
    strictly below `max_fpr`, as Wen et al.'s evaluation reads TPR at 1% FPR."""
    if max_fpr <= 0:
        raise ValueError("max_fpr must be positive: no ROC point has a negative FPR")
    fpr, tpr = roc_points(scores, labels)
    return float(tpr[np.flatnonzero(fpr < max_fpr)[-1]])


class MemorizationDetection(Metric):
    """Wen et al.'s detection figures of memorized (label True) against other prompts from
    their scores d(p); `compute()` is {"auc": `roc_auc`, "tpr_at_1pct_fpr": `tpr_at_fpr`} of
    every prompt seen."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("memorized", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, memorized: torch.Tensor) -> None:
        self.scores.append(torch.as_tensor(scores, dtype=torch.float64, device=self.device))
        # as integers: not every collective backend gathers booleans
        self.memorized.append(torch.as_tensor(memorized, device=self.device).long())

    def compute(self) -> dict[str, float]:
        scores = dim_zero_cat(self.scores).cpu().numpy()
        labels = dim_zero_cat(self.memorized).cpu().numpy().astype(bool)
        return {
            "auc": roc_auc(scores, labels),
            "tpr_at_1pct_fpr": tpr_at_fpr(scores, labels, 0.01),
        }
