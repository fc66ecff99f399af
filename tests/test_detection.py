"""Wen et al. detection: d(p) as defined, and ROC figures against scikit-learn and Wen et al.'s
evaluation (TPR at the last ROC point with FPR strictly below 1%)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from helpers import tiny_config
from memguard import Trainer
from memguard.io import load_model
from memguard.metrics.detection import (
    first_steps_score,
    roc_auc,
    roc_points,
    step_magnitudes,
    tpr_at_fpr,
)
from memguard.sampling import make_sampler


def reference_tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, limit: float) -> float:
    """Wen et al.'s evaluation: scikit-learn's ROC curve, the last point with FPR < limit."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[np.where(fpr < limit)[0][-1]])


@pytest.mark.parametrize("seed", range(4))
def test_roc_figures_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.uniform(size=1000) < 0.3  # about 700 negatives: FPR < 1% spans 7 of them
    scores = np.round(rng.normal(size=1000) + 2 * labels, 1)  # rounding makes ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    ours_fpr, ours_tpr = roc_points(scores, labels)
    assert np.array_equal(ours_fpr, fpr) and np.array_equal(ours_tpr, tpr)
    for limit in (0.005, 0.01, 0.1, 0.5):
        assert tpr_at_fpr(scores, labels, limit) == reference_tpr_at_fpr(scores, labels, limit)


def test_tpr_at_1pct_fpr_is_strictly_below_on_the_corners() -> None:
    # 300 negatives: three tied (positive, negative) pairs put ROC points at FPR 1/300, 2/300
    # and 3/300 = 1%. The point at 2/300 lies on the line between its neighbours, so
    # scikit-learn's curve leaves it out, and the point at exactly 1% is not below 1%.
    labels = np.array([True, False] * 3 + [True] * 7 + [False] * 297)
    scores = np.array([10.0, 10.0, 9.0, 9.0, 8.0, 8.0] + [5.0] * 7 + [0.0] * 297)
    assert reference_tpr_at_fpr(scores, labels, 0.01) == 0.1
    assert tpr_at_fpr(scores, labels, 0.01) == 0.1  # not 0.2 (2/300) nor 0.3 (FPR <= 1%)


def test_perfect_and_tied_scores() -> None:
    assert roc_auc([3.0, 2.0, 1.0], [True, False, False]) == 1.0
    assert roc_auc([1.0, 1.0], [True, False]) == 0.5
    assert tpr_at_fpr([3.0, 2.0, 1.0], [True, True, False], 0.01) == 1.0
    assert tpr_at_fpr([1.0, 1.0], [True, False], 0.01) == 0.0  # only the (0, 0) start
    with pytest.raises(ValueError, match="one positive and one negative"):
        roc_auc([1.0], [True])
    with pytest.raises(ValueError, match="one positive and one negative"):
        tpr_at_fpr([1.0], [True])
    with pytest.raises(ValueError, match="max_fpr must be positive"):
        tpr_at_fpr([1.0, 0.0], [True, False], 0.0)


def test_magnitude_is_the_mean_norm_along_the_trajectory(shapes_dir: Path, tmp_path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path)).train()
    model = load_model(tmp_path)
    prompts = ["a red circle on a gray background", "a painting called x"]
    scores = first_steps_score(step_magnitudes(model, prompts, seeds=2, num_inference_steps=3))
    # the definition, written out for prompt 1, seed 1, all steps, with DPM-Solver++
    schedule = make_sampler("dpm", model.scheduler_config)
    schedule.set_timesteps(3)
    x = torch.randn(model.sample_shape, generator=torch.Generator().manual_seed(1))[None]
    x = x * schedule.init_noise_sigma
    cond, uncond = model.encoder.encode(prompts[1:]), model.encoder.encode([""])
    norms = []
    for t in schedule.timesteps:
        e_c = model.unet(schedule.scale_model_input(x, t), t, encoder_hidden_states=cond).sample
        e_u = model.unet(schedule.scale_model_input(x, t), t, encoder_hidden_states=uncond).sample
        norms.append((e_c - e_u).flatten().double().norm())
        x = schedule.step(e_u + 3.0 * (e_c - e_u), t, x).prev_sample
    magnitudes = step_magnitudes(model, prompts[1:], seeds=2, num_inference_steps=3)
    one_seed = first_steps_score(magnitudes)
    assert scores[1] == pytest.approx(one_seed[0].item(), rel=1e-6)
    seed0 = first_steps_score(step_magnitudes(model, prompts[1:], seeds=1, num_inference_steps=3))
    assert 2 * one_seed[0] - seed0[0] == pytest.approx(torch.stack(norms).mean().item(), rel=1e-4)
    # the starts begin at `seed`: one start from seed 1 is the trajectory written out above
    seed1 = step_magnitudes(model, prompts[1:], seeds=1, num_inference_steps=3, seed=1)
    assert first_steps_score(seed1)[0] == pytest.approx(torch.stack(norms).mean().item(), rel=1e-4)
    first = first_steps_score(magnitudes, steps=1)
    assert first.shape == (1,) and first[0] > 0
