"""FID and KID against scipy / numpy references; attribute accuracy from captions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from memguard.metrics.intervals import binomial_rate
from memguard.metrics.quality import (
    attribute_accuracy,
    caption_attributes,
    fid_kid,
)


class RandomProjection(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.weight


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def reference_kid(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    off = lambda kk: (kk.sum() - np.trace(kk)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_fid_and_kid_match_references() -> None:
    generator = torch.Generator().manual_seed(1)
    real = torch.rand(40, 3, 4, 4, generator=generator)
    fake = (torch.rand(40, 3, 4, 4, generator=generator) * 0.8 + 0.1).clamp(0, 1)
    extractor = RandomProjection()
    figures = fid_kid(real, fake, extractor, kid_subset_size=40, kid_subsets=3, batch_size=16)
    a, b = extractor(real).double().numpy(), extractor(fake).double().numpy()
    assert figures["fid"] == pytest.approx(reference_fid(a, b), rel=1e-3)
    assert figures["kid_mean"] == pytest.approx(reference_kid(a, b), rel=1e-4)
    assert figures["kid_std"] < 1e-3 * abs(figures["kid_mean"])  # each subset is the whole set
    same = fid_kid(real, real, extractor, kid_subset_size=40, kid_subsets=2)
    assert same["fid"] == pytest.approx(0.0, abs=1e-3)


def test_attribute_accuracy_reads_prompts() -> None:
    assert caption_attributes("a red circle on a gray background, with the acme logo") == {
        "color": "red",
        "shape": "circle",
        "background": "gray",
    }
    assert caption_attributes("a painting called zorblax") is None
    prompts = ["a red circle on a gray background", "a blue square on a white background", "x"]
    predicted = {
        "color": ["red", "blue", "red"],
        "shape": ["circle", "circle", "circle"],
        "background": ["gray", "white", "gray"],
    }
    result = attribute_accuracy(prompts, predicted)
    assert {name: (r["count"], r["n"]) for name, r in result.items()} == {
        "shape": (1, 2),
        "color": (2, 2),
        "background": (2, 2),
        "all": (1, 2),
    }
    assert result["all"] == binomial_rate(1, 2)
    assert attribute_accuracy(["x"], {"color": ["red"]}) == {}
