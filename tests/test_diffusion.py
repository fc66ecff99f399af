"""The loss weights of `memguard.diffusion`: min-SNR (Hang et al., 2023) and its floor, checked
as the weight they put on the clean-image error, computed here from the schedule directly."""

from __future__ import annotations

import pytest
import torch

from memguard.diffusion import min_snr_weights
from memguard.models import noise_scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("gamma", "floor"), [(5.0, 0.0), (5.0, 1.0), (2.0, 0.5)])
def test_weight_on_the_clean_image_is_the_clipped_snr(prediction_type, gamma, floor) -> None:
    scheduler = noise_scheduler(1000, "squaredcos_cap_v2", prediction_type)
    timesteps = torch.tensor([0, 10, 200, 500, 800, 950, 999])
    abar = scheduler.alphas_cumprod[timesteps].double()
    snr = abar / (1 - abar)
    # The target's error is the clean image's error times a factor fixed by the schedule:
    # eps error = sqrt(SNR) * x0 error, v error = x0 error / sqrt(1 - abar).
    per_unit_x0_error = snr if prediction_type == "epsilon" else 1 / (1 - abar)
    weights = min_snr_weights(scheduler, timesteps, gamma, floor).double()
    expected = snr.clamp(min=floor, max=gamma)
    torch.testing.assert_close(weights * per_unit_x0_error, expected, rtol=1e-4, atol=0)


def test_without_a_floor_high_noise_steps_lose_their_weight() -> None:
    scheduler = noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction")
    last = torch.tensor([999])
    assert min_snr_weights(scheduler, last, 5.0) < 0.01
    assert min_snr_weights(scheduler, last, 5.0, floor=1.0) > 0.99
