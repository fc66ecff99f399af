"""NeMo's localization of memorization neurons: Hintersdorf et al., "Finding NeMo: Localizing
Neurons Responsible for Memorization in Diffusion Models", NeurIPS 2024.

A value neuron is an output channel of a cross-attention value projection (`attn2.to_v`). It
reads the text states and not the image, so its activation on a prompt is computed from the
prompt's states without running the UNet: the absolute output, averaged over the prompt's token
positions (all of them, padding included, as the UNet sees them). A neuron is a candidate for a
memorized prompt when the z-score of its activation against its activations on ordinary prompts,
z = (a - mean) / std over the reference prompts (the population standard deviation), exceeds a
threshold: an out-of-distribution activation. The candidates are then deactivated, highest z
first, in growing groups (0, 1, 2, 4, ... of them, ending with all) until the prompt's
generations stop replicating; the prompt needs the first group that works.

This is NeMo's initial selection with its search made a ranked group search; the paper's
refinement (re-activating the selected neurons one at a time) is left out, and its memorization
measure (the similarity between generations from different seeds) is the caller's `replicates`
(`memguard mitigate`: Gu et al.'s criterion against the training set).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memguard.mitigations.layers import Selection

# Ordinary prompts the activations are compared against when the caller gives none.
REFERENCE_PROMPTS = (
    "a photo of a dog playing in the grass",
    "a cup of coffee on a wooden table",
    "a city street at night with cars",
    "a mountain landscape with a lake",
    "a bowl of fresh fruit",
    "a person riding a bicycle",
    "an old house with a red door",
    "a cat sleeping on a sofa",
    "a plate of pasta with tomato sauce",
    "a sailing boat on the sea",
    "a bunch of flowers in a vase",
    "a child reading a book",
    "a train crossing a bridge",
    "a forest path in autumn",
    "a pair of shoes on the floor",
    "a bird sitting on a branch",
    "a kitchen with white cabinets",
    "a beach with palm trees",
    "a laptop on a desk",
    "a snowy village in winter",
    "a horse standing in a field",
    "a bottle of water",
    "a painting of a sunset",
    "a group of people at a concert",
)


@torch.no_grad()
def neuron_activations(layers: dict[str, torch.nn.Linear], states: torch.Tensor) -> torch.Tensor:
    """(P, n) mean absolute outputs of every output channel of `layers` (concatenated in their
    order) over the token positions, for text states (P, L, d)."""
    return torch.cat(
        [
            layer(states.to(layer.weight.device)).abs().mean(dim=1).float().cpu()
            for layer in layers.values()
        ],
        dim=1,
    )


def z_scores(activation: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(n,) float64 z-scores of `activation` (n,) against `reference` (R, n): (a - mean) / std,
    the population standard deviation over the R reference rows (a neuron constant over them
    and equal to it scores 0)."""
    reference = reference.double()
    std = reference.std(dim=0, unbiased=False)
    deviation = activation.double() - reference.mean(dim=0)
    return deviation / std.clamp_min(torch.finfo(torch.float64).tiny)


def outlier_neurons(
    activation: torch.Tensor, reference: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The neurons whose z-score exceeds `threshold`, highest z first (ties: lower index first),
    and their z-scores."""
    z = z_scores(activation, reference)
    candidates = torch.nonzero(z > threshold).flatten()
    order = candidates[z[candidates].argsort(descending=True, stable=True)]
    return order, z[order]


def neurons(layers: dict[str, torch.nn.Linear], flat: torch.Tensor) -> Selection:
    """Neurons numbered across `layers` (as `neuron_activations` orders them), per layer."""
    selection, start = {}, 0
    for name, layer in layers.items():
        inside = flat[(flat >= start) & (flat < start + layer.out_features)] - start
        if len(inside):
            selection[name] = inside.sort().values
        start += layer.out_features
    return selection


def candidate_neurons(
    layers: dict[str, torch.nn.Linear],
    states: torch.Tensor,
    reference: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """NeMo's candidates for the conditioning `states` (L, d), a prompt's text states or any
    other conditioning (an embedding trigger): the neurons of `layers` whose activation's
    z-score against `reference` (R, n) exceeds `threshold`, numbered across the layers, highest
    z first."""
    activation = neuron_activations(layers, states[None])[0]
    return outlier_neurons(activation, reference, threshold)[0]


def group_sizes(count: int) -> list[int]:
    """0, 1, 2, 4, ... below `count`, then `count`: the groups the search deactivates."""
    sizes, size = [0], 1
    while size < count:
        sizes.append(size)
        size *= 2
    return sizes + [count] if count else sizes


def deactivation_search(count: int, replicates_without: Callable[[int], bool]) -> int | None:
    """The first size k of `group_sizes(count)` for which the prompt stops replicating with its
    k highest-z candidates deactivated (`replicates_without(k)` false); None when even all of
    them leave it replicating."""
    return next((k for k in group_sizes(count) if not replicates_without(k)), None)
