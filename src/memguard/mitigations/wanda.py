"""Wanda's pruning scores, turned on memorization: Sun et al., "A Simple and Effective Pruning
Approach for Large Language Models", ICLR 2024, as Chavhan et al. (2024) apply it to the
memorized prompts of diffusion models.

Wanda scores a weight W_ij of a linear layer by |W_ij| * ||X_j||_2, with X the layer's inputs
(one row per token, position, image and call) and X_j its j-th input feature. Taken on a
memorized prompt, the highest scores mark the weights that carry most of that prompt's signal,
and the mitigation zeroes them: the top `sparsity` fraction of each chosen layer,
ceil(sparsity x its number of weights), per prompt. (Wanda itself prunes the lowest scores, to
compress a model; here the top goes, to cut what the memorized prompt drives.)

The inputs: a cross-attention key or value projection (attn2.to_k / to_v) reads the text
states, so X is the prompt's states (L, d), or any conditioning's (an embedding trigger), and no
UNet runs. Any other linear layer reads the image stream; its inputs are collected with forward
hooks during a generation from the prompt without guidance (so that every input comes from the
prompt), over every denoising step.
"""

from __future__ import annotations

import math

import torch

from memguard.io import DiffusionModel
from memguard.mitigations.layers import Selection, is_text_fed
from memguard.sampling import generate


@torch.no_grad()
def input_norms(
    model: DiffusionModel,
    layers: dict[str, torch.nn.Linear],
    states: torch.Tensor,
    num_images: int = 1,
    seed: int = 0,
    sampler: str = "dpm",
    num_inference_steps: int = 20,
) -> dict[str, torch.Tensor]:
    """||X_j||_2 for every input feature j of every layer, on the CPU, under the conditioning
    `states` (L, d): a prompt's text states or any other conditioning, an embedding trigger say
    (see the module docstring); the generation (`num_images` images from `seed`) runs only for
    layers that do not read the text states."""
    norms = {name: states.norm(dim=0).cpu() for name in layers if is_text_fed(name)}
    others = {name: layer for name, layer in layers.items() if name not in norms}
    if not others:
        return norms
    squares = {
        name: torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
        for name, layer in others.items()
    }

    def collect(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            inputs = args[0].reshape(-1, args[0].shape[-1])
            squares[name] += inputs.double().pow(2).sum(dim=0)

        return hook

    handles = [layer.register_forward_pre_hook(collect(name)) for name, layer in others.items()]
    try:
        generate(model, states[None], num_images, seed, sampler, num_inference_steps, 1.0)
    finally:
        for handle in handles:
            handle.remove()
    return norms | {name: total.sqrt().float().cpu() for name, total in squares.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||, shape of `weight` (out, in)."""
    return weight.abs() * norms.to(weight.device, weight.dtype)[None, :]


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices (ascending) of the ceil(fraction x size) highest scores."""
    count = math.ceil(fraction * scores.numel())
    return scores.flatten().topk(count).indices.sort().values.cpu()


def wanda_selection(
    layers: dict[str, torch.nn.Linear], norms: dict[str, torch.Tensor], fraction: float
) -> Selection:
    """Wanda's selection: the top `fraction` of every layer's weights by |W| x ||X||, `norms`
    being `input_norms` under one conditioning."""
    return {
        name: top_fraction(wanda_scores(layer.weight, norms[name]), fraction)
        for name, layer in layers.items()
    }
