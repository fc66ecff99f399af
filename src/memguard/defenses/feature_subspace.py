"""Activation subspaces of a concept for feature-mode gradient projection (selective learning,
Kothandaraman & Pytlarz, arXiv 2512.11194), in the manner of Gradient Projection Memory (Saha et
al., "Gradient Projection Memory for Continual Learning", ICLR 2021).

A layer y = W x learns from an image only through outer products g x^T of its backpropagated
error g and its input x. Collect the inputs each chosen layer sees on exemplar images of the
concept (noised as in training, at random timesteps, under their captions): the rows x of a
linear layer, the im2col patches of a convolution. Remove the directions that images without
the concept share (anchors), then keep the directions holding `energy` of what remains. The
result U_l per layer is what FeatureProjection projects gradients and updates off.

The output side measures instead the error signals g (the denoising loss's gradient at each
layer's output, one row per position) on the exemplars and anchors, by the same criterion:
guarding those directions keeps a layer from changing what it emits along them.

Both are accumulated as Gram matrices (fan_in x fan_in, or out x out), so memory does not grow
with the number of exemplars or spatial positions.

Image mode works on the exemplar images themselves, as the model takes them (pixels or VAE
latents): the concept's footprint is every position where the exemplars' mean differs from that
of images without the concept by a two-sample (Welch) test, and its subspace holds all channels
there. The energy criterion above does not serve in image space: an exemplar is the concept plus
an ordinary image, so its top directions mix the two and miss part of the concept's own pattern.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memguard.defenses.subspace import rank_for_energy
from memguard.diffusion import per_sample_loss

# Layers whose input is not the image's features: the text (cross-attention keys and values,
# text mode's business) and the timestep embedding.
NOT_IMAGE_INPUT = ("*attn2.to_k", "*attn2.to_v", "time_embedding.*", "*time_emb_proj")


def feature_layers(model: nn.Module, patterns: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers to guard: those matching `patterns` (fnmatch on module
    names), by default every one whose input is the image's features."""
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if patterns:
            keep = any(fnmatch.fnmatch(name, p) for p in patterns)
        else:
            keep = not any(fnmatch.fnmatch(name, p) for p in NOT_IMAGE_INPUT)
        if keep:
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ValueError(f"{name}: grouped convolutions are not supported")
            chosen[name] = module
    if not chosen:
        raise ValueError(f"no Linear or Conv2d layer matches {list(patterns) or 'the defaults'}")
    return chosen


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, fan_in): what the layer's weight, flattened to (out, fan_in), multiplies."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _add_gram(grams: dict[str, torch.Tensor], name: str, rows: torch.Tensor) -> None:
    rows = rows.detach().float()
    gram = (rows.T @ rows).double()  # per batch in float32, summed in float64
    grams[name] = grams[name] + gram if name in grams else gram


def _run_on_noised(
    model: nn.Module,
    layers: dict[str, nn.Module],
    hook: Callable[[str], Callable],
    x0: torch.Tensor,
    states: torch.Tensor,
    scheduler,
    draws: int,
    seed: int,
    batch_size: int,
    backward: bool,
) -> None:
    """Run the model, with `hook(name)` as each layer's forward hook, on `draws` noised copies
    of every image (random timesteps, as in training); with `backward`, also backpropagate the
    denoising loss to the layers' weights (through autograd.grad: no .grad is touched)."""
    generator = torch.Generator().manual_seed(seed)
    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    weights = [module.weight for module in layers.values()]
    was_training = model.training
    model.eval()
    try:
        num_timesteps = scheduler.config.num_train_timesteps
        for _ in range(draws):
            for start in range(0, len(x0), batch_size):
                clean = x0[start : start + batch_size]
                noise = torch.randn(clean.shape, generator=generator)
                t = torch.randint(0, num_timesteps, (len(clean),), generator=generator)
                with torch.set_grad_enabled(backward):
                    loss = per_sample_loss(
                        model, scheduler, clean.to(device, dtype),
                        states[start : start + batch_size].to(device, dtype),
                        t.to(device), noise.to(device, dtype),
                    ).mean()  # fmt: skip
                    if backward:
                        torch.autograd.grad(loss, weights)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def layer_grams(
    model: nn.Module,
    layers: dict[str, nn.Module],
    x0: torch.Tensor,  # (N, C, H, W) clean model inputs (pixels in [-1, 1] or latents)
    states: torch.Tensor,  # (N, L, d) caption states
    scheduler,
    side: str = "input",
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Per layer, a float64 Gram matrix over `draws` noised copies of each image: of its inputs
    (side "input", fan_in x fan_in), or of the denoising loss's gradient at its output, one row
    per position (side "output", out x out): the error signals g it would learn from as g x^T."""
    grams: dict[str, torch.Tensor] = {}

    def channels_last(grad: torch.Tensor) -> torch.Tensor:
        if grad.dim() == 4:  # convolution: channels at every position
            return grad.movedim(1, -1).reshape(-1, grad.shape[1])
        return grad.reshape(-1, grad.shape[-1])

    def record_input(name: str):
        return lambda module, inputs, _output: _add_gram(grams, name, layer_rows(module, inputs[0]))

    def record_output(name: str):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda grad: _add_gram(grams, name, channels_last(grad)))

        return hook

    backward = side == "output"
    record = record_output if backward else record_input
    _run_on_noised(model, layers, record, x0, states, scheduler, draws, seed, batch_size, backward)
    return grams


def _eigen(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending and >= 0, eigenvectors in that order) of a Gram matrix."""
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp_min(0), vectors.flip(1)


def basis_from_gram(gram: torch.Tensor, energy: float) -> torch.Tensor:
    """(fan_in, r) orthonormal: the top eigenvectors of a Gram matrix holding `energy` of its
    trace (the right-singular vectors of the rows it sums, by singular value)."""
    values, vectors = _eigen(gram)
    return vectors[:, : rank_for_energy(values, energy * float(values.sum()))].contiguous()


def concept_feature_bases(
    concept_grams: dict[str, torch.Tensor],
    anchor_grams: dict[str, torch.Tensor] | None,
    energy: float,
    anchor_energy: float,
) -> dict[str, torch.Tensor]:
    """Per layer: the concept's own directions, chosen by GPM's criterion. The directions holding
    `anchor_energy` of the anchors' inputs are shared, not guarded (0: none); the concept's
    inputs are projected off them, and the top directions of what remains are guarded until
    shared and guarded directions together hold `energy` of the concept's input energy. A layer
    whose concept inputs the shared directions already explain gets an empty basis."""
    bases = {}
    for name, gram in concept_grams.items():
        total = float(gram.trace())
        if anchor_grams is not None and anchor_energy > 0:
            shared = basis_from_gram(anchor_grams[name], anchor_energy)
            complement = torch.eye(len(gram), dtype=gram.dtype) - shared @ shared.T
            gram = complement @ gram @ complement
        needed = energy * total - (total - float(gram.trace()))  # still to explain
        values, vectors = _eigen(gram)
        bases[name] = vectors[:, : rank_for_energy(values, needed)].contiguous()
    return bases


def concept_footprint(
    concept: torch.Tensor,  # (N, C, H, W) exemplars as the model takes them (pixels or latents)
    anchors: torch.Tensor,  # (M, C, H, W) images without the concept
    alpha: float,
) -> torch.Tensor:
    """(C*H*W, r): the coordinate directions of every channel at each position where the
    exemplars' mean differs from the anchors' (Welch's t per position and channel against the
    normal quantile, Bonferroni over all C*H*W tests at family-wise level `alpha`): the
    concept's footprint in the model's image space, in no particular order. A position where
    both sets are constant and equal is not in it; one where the exemplars are constant (a
    pixel-exact mark) and differ is. An empty footprint is an error: the concept would go
    unguarded."""
    if min(len(concept), len(anchors)) < 2:
        raise ValueError(
            f"the footprint test needs at least 2 exemplars and 2 anchors, got "
            f"{len(concept)} and {len(anchors)}"
        )
    count, channels = len(concept), concept.shape[1]
    exemplars, plain = concept.double().flatten(2), anchors.double().flatten(2)  # (N, C, H*W)
    difference = (exemplars.mean(0) - plain.mean(0)).abs()
    spread = (exemplars.var(0) / count + plain.var(0) / len(plain)).sqrt()
    t = torch.where(difference > 0, difference / spread.clamp_min(1e-12), 0.0)
    tests = difference.numel()
    critical = torch.special.ndtri(torch.tensor(1 - alpha / (2 * tests), dtype=torch.float64))
    positions = torch.nonzero((t > critical).any(0)).flatten()
    width = positions.numel()
    if width == 0:
        raise ValueError(
            f"no position where the exemplars differ from images without the concept at "
            f"family-wise level {alpha}: is the concept at a fixed place in its images?"
        )
    coordinates = (positions + torch.arange(channels).view(-1, 1) * exemplars.shape[2]).flatten()
    basis = torch.zeros(tests, channels * width, dtype=torch.float64)
    basis[coordinates, torch.arange(channels * width)] = 1.0
    return basis
