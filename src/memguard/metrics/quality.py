"""Quality beside memorization, so that no defense wins by breaking the model: FID (Heusel et
al., 2017) and KID (Binkowski et al., 2018) through torchmetrics, on a pluggable feature
extractor (the judge's features on the benchmark), and attribute accuracy of generations (a
rate with its Wilson interval). Either image set may be an image folder, read a batch at a
time, so a training set far larger than memory can be the reference.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from memguard.data.folder import ImageFolderDataset, unit_batches
from memguard.metrics.intervals import rate_of

Images = torch.Tensor | ImageFolderDataset  # (N, 3, H, W) in [0, 1], or a folder of them

_ORDINARY_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background")


@torch.no_grad()
def fid_kid(
    real: Images,
    generated: Images,
    extractor: nn.Module,
    kid_subset_size: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """FID and KID (mean, std over random subsets) of `generated` against `real`."""
    subset = min(kid_subset_size, len(real), len(generated))
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    kid = KernelInceptionDistance(
        feature=extractor, normalize=True, subsets=kid_subsets, subset_size=subset
    )
    for images, is_real in ((real, True), (generated, False)):
        for batch in unit_batches(images, batch_size):
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID's subsets
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
        "num_real": len(real),
        "num_generated": len(generated),
    }


def caption_attributes(caption: str) -> dict[str, str] | None:
    """{'color', 'shape', 'background'} named by a benchmark caption, or None."""
    match = _ORDINARY_CAPTION.match(caption)
    if match is None:
        return None
    color, shape, background = match.groups()
    return {"color": color, "shape": shape, "background": background}


def attribute_accuracy(prompts: list[str], predicted: dict[str, list]) -> dict[str, dict]:
    """Per attribute (shape, colour, background, and all three at once): the rate
    (`memguard.metrics.intervals.binomial_rate`) of generations whose judged value matches their
    prompt's. Prompts that name no attributes are left out; none at all gives {}."""
    hits: dict[str, list[bool]] = {"shape": [], "color": [], "background": [], "all": []}
    for i, prompt in enumerate(prompts):
        asked = caption_attributes(prompt)
        if asked is None:
            continue
        matches = [predicted[name][i] == value for name, value in asked.items()]
        for name, match in zip(asked, matches, strict=True):
            hits[name].append(match)
        hits["all"].append(all(matches))
    return {name: rate_of(values) for name, values in hits.items() if values}
