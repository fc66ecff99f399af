"""Concept-level gradient projection in text, feature and image mode (Kothandaraman & Pytlarz,
"Beyond Memorization: Gradient Projection Enables Selective Learning in Diffusion Models", arXiv
2512.11194; the subspace construction is memguard's reading of METHODS.md section 1).

A weight W acting on inputs x learns only through outer products g x^T, so right-multiplying its
gradient by P = I - U U^T, with U an orthonormal basis of the concept's inputs to that weight,
removes every training signal those inputs carry. Adam's per-coordinate scaling and decoupled
weight decay still move W along span(U), so after every optimizer step W is restored on the
subspace: W <- W + (W_0 U - W U) U^T, which keeps W c = W_0 c exactly for every c in span(U).
The certificate is the leak max_{c in span(U)} ||(W_T - W_0) c|| / ||W_0 c|| over the guarded
weights (a generalised eigenvalue problem in r dimensions).

Text mode (default) guards the cross-attention keys and values, the only weights whose input is
the text: prompts naming each concept are encoded by the run's text encoder; the states of the
concept's tokens and of the positions after them are kept (the first position, identical in
every prompt, and padding are dropped); optionally the directions shared by neutral anchor
prompts are removed; an SVD keeps the directions holding `energy` of the total.

Feature mode guards the layers that see the image (convolutions on im2col patches, linear
layers on their rows), one subspace per layer from its inputs on exemplar images of the concept,
with the directions that images without the concept share left free
(`memguard.defenses.feature_subspace`).

Image mode takes projection to the model's output: the subspace is the concept's footprint in
image space (pixels or VAE latents): all channels at the positions where the exemplars differ
from training images that do not name the concept (`concept_footprint`), and the gradient of
the loss with respect to the UNet's prediction is projected off it, so that no training image,
with the concept or without, teaches the model anything there, whichever layer would have
learned it; what the model draws there comes from what it learned elsewhere. It suits a concept
with a fixed place (a watermark, a stamped logo); one that moves has no footprint smaller than
the image. It guards no weight, so it has no leak certificate; it reports the fraction of the
prediction gradient's energy it removed.

Use it from `memguard train --defense projection --concept "the acme logo"` (add
`--projection_mode feature|image --concept_exemplars DIR` for the other modes), or attach it
to a model and optimizer of your own with `attach()` / `detach()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from memguard.data.folder import ImageFolderDataset
from memguard.data.text import TextEncoder
from memguard.defenses.feature_subspace import (
    concept_feature_bases,
    concept_footprint,
    feature_layers,
    layer_grams,
)
from memguard.diffusion import to_latents
from memguard.train.hooks import Defense, TrainingContext

TEMPLATES = (
    "{}",
    "a photo with {}",
    "an image of {}",
    "a picture showing {}",
    "a drawing with {}",
    "{} in the corner",
    "something with {}",
)
ANCHORS = ("a photo", "an image", "a picture", "a drawing", "a painting", "on a background")
GUARDED_SUFFIXES = ("attn2.to_k", "attn2.to_v")


def _concept_positions(tokens: list[int], concept: list[int], length: int) -> list[int]:
    """Positions from the concept's first token to the last real token ([] if absent)."""
    for start in range(length - len(concept) + 1):
        if tokens[start : start + len(concept)] == concept:
            return list(range(start, length))
    return []


@torch.no_grad()
def concept_states(
    encoder: TextEncoder, concept: str, extra_prompts: tuple[str, ...] = ()
) -> torch.Tensor:
    """(n, d): token states of the concept and what follows it, over prompts naming it.

    The prompts are TEMPLATES filled with the concept, plus `extra_prompts` that contain it
    (the training captions that name it are the best such prompts: a bidirectional encoder
    gives the concept's tokens states that depend on the whole caption)."""
    prompts = [t.format(concept) for t in TEMPLATES] + [p for p in extra_prompts if concept in p]
    states, mask = encoder.encode_with_mask(prompts)
    ids = encoder.tokenize(prompts)["input_ids"]
    alone = encoder.tokenize([concept])
    concept_ids = alone["input_ids"][0, 1 : int(alone["attention_mask"][0].sum()) - 1].tolist()
    rows = [
        states[i, positions]
        for i in range(len(prompts))
        if (positions := _concept_positions(ids[i].tolist(), concept_ids, int(mask[i].sum())))
    ]
    if not rows:
        raise ValueError(f"concept {concept!r}: its tokens fit in no prompt (raise max length?)")
    return torch.cat(rows)


def energy_basis(vectors: torch.Tensor, energy: float) -> torch.Tensor:
    """(d, r) orthonormal: the top right-singular vectors holding `energy` of sum(S^2)."""
    _, singular, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    cumulative = torch.cumsum(singular**2, 0) / (singular**2).sum()
    rank = int((cumulative < energy).sum()) + 1
    return vh[:rank].T.contiguous()


@torch.no_grad()
def concept_subspace(
    encoder: TextEncoder,
    concepts: list[str],
    energy: float = 0.99,
    anchors: tuple[str, ...] = (),
    anchor_energy: float = 0.9,
    extra_prompts: tuple[str, ...] = (),
) -> torch.Tensor:
    """(d, r) basis of the concepts' token-state subspace, anchors' shared directions removed."""
    vectors = torch.cat([concept_states(encoder, c, extra_prompts) for c in concepts]).double()
    if anchors:
        states, mask = encoder.encode_with_mask(list(anchors))
        mask[:, 0] = 0  # the first position is the same in every prompt
        shared = energy_basis(states[mask.bool()], anchor_energy)
        vectors = vectors - (vectors @ shared) @ shared.T
    return energy_basis(vectors, energy)


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) as the matrix whose rows meet its inputs: (out, fan_in)."""
    return tensor.view(len(tensor), -1)


def columns_of(tensor: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) as the matrix whose rows meet the layer's outputs: (fan_in, out),
    a view; a bias becomes one row."""
    return tensor.view(len(tensor), -1).T


@dataclass
class Guarded:
    """A weight to project, and the text-facing weight it changes (itself, or W + s B A).

    `matrix` views the parameter (or its gradient) as the matrix M that the subspace basis U
    multiplies from the right: M <- M (I - U U^T) projects, M U = M_0 U is the invariant."""

    param: nn.Parameter  # receives the projected gradients and updates
    matrix: Callable[[torch.Tensor], torch.Tensor] = rows_of
    lora_weight: Callable[[], torch.Tensor] | None = None  # base + s B A, when param is A

    def acting(self) -> torch.Tensor:
        """M of the weight as it acts on the layer's input (base + LoRA delta under LoRA)."""
        return self.lora_weight() if self.lora_weight is not None else self.matrix(self.param)

    @torch.no_grad()
    def held(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M U, M_acting U) in float64: what the invariant and the certificate hold fixed."""
        u = u.to(self.param.device, torch.float64)
        return self.matrix(self.param).double() @ u, self.acting().double() @ u


def guarded_weights(model: nn.Module) -> dict[str, Guarded]:
    """Weights whose input is the text embedding: every cross-attention key and value.

    With LoRA adapters (peft) on them, the input-side factors `lora_A` are projected instead:
    delta W = s B A, so keeping A c = 0 keeps W c fixed."""
    found = {}
    for name, module in model.named_modules():
        if not name.endswith(GUARDED_SUFFIXES):
            continue
        lora = getattr(module, "lora_A", None)
        if lora is not None and len(lora) > 0:
            for adapter, layer in lora.items():

                def lora_weight(module=module, adapter=adapter) -> torch.Tensor:
                    delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
                    return module.base_layer.weight + module.scaling[adapter] * delta

                key = f"{name}.lora_A.{adapter}.weight"
                found[key] = Guarded(layer.weight, lora_weight=lora_weight)
        else:
            found[f"{name}.weight"] = Guarded(module.weight)
    if not found:
        raise ValueError("no cross-attention key/value weights (attn2.to_k / attn2.to_v) found")
    return found


class ConceptProjection(Defense):
    """Projects the gradients and updates of guarded weights off a concept's subspaces.

    mode "text": the cross-attention keys and values, one subspace of the text encoder's token
    states. mode "feature": the layers `feature_layers` chooses, one subspace per layer from its
    inputs on `exemplars` (a folder of images showing the concept, with captions), with the
    directions shared by training images that do not name the concept removed. mode "image":
    the gradient of the loss at the model's prediction, off the concept's footprint in image
    space (`concept_footprint` at family-wise level `footprint_alpha`)."""

    name = "projection"

    def __init__(
        self,
        basis: torch.Tensor | None = None,
        concepts: tuple[str, ...] = (),
        energy: float = 0.99,
        anchors: tuple[str, ...] = (),
        mode: str = "text",
        exemplars: str | None = None,
        layers: tuple[str, ...] = (),
        anchor_energy: float = 0.99,
        bases: dict[str, torch.Tensor] | None = None,
        refresh_steps: int = 0,
        side: str = "input",
        footprint_alpha: float = 1e-3,
    ) -> None:
        """Text mode: give the `basis` (d, r), or the `concepts` to build it from at `setup` with
        the run's text encoder and training captions. Feature mode: give `bases` (module name ->
        (fan_in, r)), or `exemplars` to build them from at `setup` (what `memguard train
        --defense projection --projection_mode feature` does). With `refresh_steps`, feature
        mode measures the exemplars again with the current model every that many steps and adds
        the concept's new directions to each layer's subspace (GPM's memory update), so that
        features the model builds for the concept during training are guarded too. `side`
        "output" guards, instead of the inputs' directions, the directions of the loss gradient
        at each layer's output (its error signals) on the exemplars: the layer's weight and bias
        cannot change what it emits along them, whatever its input. Image mode: give the
        `basis` (C*H*W, r) in the model's image space, or `exemplars` to find the concept's
        footprint from at `setup`, against as many training images not naming `concepts`."""
        if mode not in ("text", "feature", "image"):
            raise ValueError(f"projection mode must be 'text', 'feature' or 'image', not {mode!r}")
        if mode == "text" and basis is None and not concepts:
            raise ValueError("ConceptProjection needs a basis or at least one concept")
        if mode == "feature" and bases is None and exemplars is None:
            raise ValueError("feature mode needs `bases` or a folder of concept `exemplars`")
        if mode == "image" and basis is None and exemplars is None:
            raise ValueError("image mode needs a `basis` or a folder of concept `exemplars`")
        self.mode = mode
        self.basis = basis.double() if basis is not None else None  # text, image mode (d, r)
        self.layer_bases = {k: v.double() for k, v in (bases or {}).items()} or None
        self.concepts, self.energy, self.anchors = tuple(concepts), energy, tuple(anchors)
        self.exemplars, self.layers, self.anchor_energy = exemplars, tuple(layers), anchor_energy
        self.refresh_steps, self.footprint_alpha = refresh_steps, footprint_alpha
        if side not in ("input", "output"):
            raise ValueError(f"projection side must be 'input' or 'output', not {side!r}")
        self.side = side
        self.refresh_seconds: list[float] = []  # wall time of each re-measurement
        self._layers: dict[str, nn.Module] = {}
        self._images: tuple[MeasuredImages, MeasuredImages | None] | None = None
        self.weights: dict[str, Guarded] = {}
        self.bases: dict[str, torch.Tensor] = {}  # per guarded parameter, (fan_in, r)
        self.anchor: dict[str, torch.Tensor] = {}  # P_0 U per projected parameter P
        self.effective_anchor: dict[str, torch.Tensor] = {}  # W_0 U per guarded weight
        self._u: dict[str, torch.Tensor] = {}
        self._u64: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._image_u: torch.Tensor | None = None  # image mode: basis in the gradients' dtype
        self._removed = torch.zeros(2, dtype=torch.float64)  # image mode: removed, total energy

    @classmethod
    def from_concepts(
        cls,
        encoder: TextEncoder,
        concepts: list[str],
        energy: float = 0.99,
        anchors: tuple[str, ...] = (),
        extra_prompts: tuple[str, ...] = (),
    ) -> ConceptProjection:
        """Build the subspace of `concepts` with `encoder` (see `concept_subspace`)."""
        basis = concept_subspace(encoder, concepts, energy, anchors, extra_prompts=extra_prompts)
        return cls(basis)

    # ------------------------------------------------------------------------ the hooks

    def _text_weights(self, ctx: TrainingContext | None, model: nn.Module) -> None:
        if self.basis is None:
            if ctx is None or ctx.text_encoder is None:
                raise ValueError("building the concept subspace needs the run's text encoder")
            self.basis = concept_subspace(
                ctx.text_encoder, list(self.concepts), self.energy, self.anchors,
                extra_prompts=ctx.captions,
            )  # fmt: skip
        self.weights = guarded_weights(model)
        self.bases = {name: self.basis for name in self.weights}

    def _feature_weights(self, ctx: TrainingContext | None, model: nn.Module) -> None:
        self._layers = layers = {
            name: module
            for name, module in feature_layers(model, self.layers).items()
            if module.weight.requires_grad
        }
        if self.layer_bases is None:
            if ctx is None or ctx.text_encoder is None or ctx.scheduler is None:
                raise ValueError("building feature subspaces needs the run's encoder and scheduler")
            width = rows_of if self.side == "input" else columns_of
            self.layer_bases = {
                name: torch.zeros(width(m.weight).shape[1], 0, dtype=torch.float64)
                for name, m in layers.items()
            }
            self.refresh(model, ctx)  # the first measurement
        missing = sorted(set(self.layer_bases) - set(layers))
        if missing:
            raise ValueError(f"feature bases for layers the model lacks: {missing[:5]}")
        keep_empty = self.refresh_steps > 0
        weights = {
            name: layers[name].weight
            for name, u in self.layer_bases.items()
            if u.shape[1] or keep_empty
        }
        self.weights, self.bases = {}, {}
        for name, weight in weights.items():
            if self.side == "input":
                self.weights[f"{name}.weight"] = Guarded(weight)
                self.bases[f"{name}.weight"] = self.layer_bases[name]
                continue
            bias = layers[name].bias  # the output side moves the bias too
            for param in (weight, bias) if bias is not None else (weight,):
                key = f"{name}.{'weight' if param is weight else 'bias'}"
                self.weights[key] = Guarded(param, columns_of)
                self.bases[key] = self.layer_bases[name]

    def _watch_output(self, ctx: TrainingContext | None, model: nn.Module) -> None:
        if self.basis is None:
            if ctx is None or ctx.text_encoder is None:
                raise ValueError("image mode without a `basis` needs the run's training context")
            concept, anchor = exemplar_images(ctx, self.exemplars, self.concepts, with_anchors=True)
            self.basis = concept_footprint(concept.x0, anchor.x0, self.footprint_alpha)
        self._handles.append(model.register_forward_hook(self._on_prediction))

    def _on_prediction(self, module: nn.Module, inputs, output) -> None:
        """Forward hook on the UNet: the prediction's gradient will be projected."""
        prediction = output[0] if isinstance(output, tuple) else output.sample
        if prediction.requires_grad:
            prediction.register_hook(self.project_prediction_gradient)

    @torch.no_grad()
    def project_prediction_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """g <- g (I - U U^T) for each sample's gradient g of the loss w.r.t. its prediction."""
        flat = grad.reshape(len(grad), -1)
        if flat.shape[1] != self.basis.shape[0]:
            raise ValueError(
                f"image subspace width {self.basis.shape[0]} != prediction size {flat.shape[1]}"
            )
        u = self._image_u
        if u is None or u.device != grad.device or u.dtype != grad.dtype:
            u = self._image_u = self.basis.to(grad.device, grad.dtype)
        removed = (flat @ u) @ u.T
        energies = torch.stack([removed.square().sum(), flat.square().sum()]).double()
        self._removed = self._removed.to(grad.device) + energies
        return (flat - removed).view_as(grad)

    def setup(self, model: nn.Module, optimizer, ctx: TrainingContext | None = None) -> None:
        if self.mode == "image":
            self._watch_output(ctx, model)
        elif self.mode == "text":
            self._text_weights(ctx, model)
        else:
            self._feature_weights(ctx, model)
        for name, guarded in self.weights.items():
            weight, basis = guarded.param, self.bases[name]
            width = guarded.matrix(weight).shape[1]
            if width != basis.shape[0]:
                raise ValueError(
                    f"{name}: width {width} != subspace width {basis.shape[0]} "
                    "(was the subspace built with this model and text encoder?)"
                )
            with torch.no_grad():
                u = basis.to(weight.device)
                if ".lora_A." in name:  # LoRA: start A inside the complement
                    weight -= ((weight.double() @ u) @ u.T).to(weight.dtype)
                self.anchor[name], self.effective_anchor[name] = guarded.held(basis)
        self._place_bases()

    def _place_bases(self) -> None:
        """Each basis on its weight's device, in float64 (restoring) and the weight's dtype
        (projecting gradients), made once rather than at every step."""
        self._u64, self._u = {}, {}
        for name, guarded in self.weights.items():
            self._u64[name] = self.bases[name].to(guarded.param.device, torch.float64)
            self._u[name] = self._u64[name].to(guarded.param.dtype)

    @torch.no_grad()
    def project_gradients(self) -> None:
        """grad <- grad (I - U U^T) for every guarded weight."""
        for name, guarded in self.weights.items():
            grad = guarded.param.grad
            if grad is not None:
                u = self._u[name]
                flat = guarded.matrix(grad)
                flat -= (flat @ u) @ u.T

    @torch.no_grad()
    def restore_subspace(self) -> None:
        """W <- W + (W_0 U - W U) U^T: the weights do not move on the concept's subspace."""
        for name, guarded in self.weights.items():
            weight = guarded.matrix(guarded.param)
            u = self._u64[name]
            drift = self.anchor[name] - weight.double() @ u
            weight += (drift @ u.T).to(weight.dtype)

    def after_backward(self, model: nn.Module, ctx: TrainingContext) -> None:
        self.project_gradients()

    def after_step(self, model: nn.Module, ctx: TrainingContext) -> None:
        self.restore_subspace()
        if self.refresh_steps and ctx.step > 0 and ctx.step % self.refresh_steps == 0:
            self.refresh(model, ctx)

    @torch.no_grad()
    def refresh(self, model: nn.Module, ctx: TrainingContext) -> None:
        """Feature mode: add the directions the exemplars' inputs take under the current weights
        and that the subspace lacks; each new direction is held at the weight it has now."""
        start = time.perf_counter()
        if self._images is None:  # decoded and encoded once, measured at every refresh
            self._images = exemplar_images(
                ctx, self.exemplars, self.concepts, with_anchors=self.anchor_energy > 0
            )
        found = exemplar_bases(
            model, self._layers, ctx, self._images, self.energy, self.anchor_energy, self.side
        )
        for layer, new in found.items():
            old = self.layer_bases[layer]
            fresh = new - old @ (old.T @ new)
            fresh = fresh[:, fresh.norm(dim=0) > 0.5]  # mostly outside the span so far
            if fresh.shape[1] == 0:
                continue
            fresh = torch.linalg.qr(fresh - old @ (old.T @ fresh))[0]
            self.layer_bases[layer] = torch.cat([old, fresh], dim=1)
            for name in (f"{layer}.weight", f"{layer}.bias"):
                if name not in self.weights:  # not set up yet, or no bias
                    continue
                # training has started: hold the new directions at the weight they meet now
                held, acting = self.weights[name].held(fresh)
                self.anchor[name] = torch.cat([self.anchor[name], held], dim=1)
                self.effective_anchor[name] = torch.cat([self.effective_anchor[name], acting], 1)
                self.bases[name] = self.layer_bases[layer]
        if self.weights:
            self._place_bases()
        self.refresh_seconds.append(time.perf_counter() - start)

    # ------------------------------------------------------------- attach to your own loop

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> ConceptProjection:
        """Set up and register torch hooks: gradients are projected as they are accumulated,
        and the subspace is restored after every `optimizer.step()`. Attaching twice is an error.
        """
        if self._handles:
            raise RuntimeError("ConceptProjection is already attached; detach() it first")
        self.setup(model, optimizer)
        for guarded in self.weights.values():
            self._handles.append(
                guarded.param.register_post_accumulate_grad_hook(lambda _: self.project_gradients())
            )
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore_subspace()))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --------------------------------------------------------------------- certificate

    @torch.no_grad()
    def leak(self) -> float:
        """max over guarded weights and c in their subspace of ||(W - W_0) c|| / ||W_0 c||, with W
        the weight as it multiplies its input (base + LoRA delta under LoRA) and W_0 the weight
        when c joined the subspace (the start, or a feature-mode refresh). Directions c that
        W_0 maps to (nearly) zero, as a layer with fewer outputs than subspace directions has,
        are measured against W_0's largest response on the subspace instead."""
        worst = 0.0
        for name, guarded in self.weights.items():
            u = self.bases[name]
            if u.shape[1] == 0:
                continue
            b = self.effective_anchor[name]  # W_0 U
            acting = guarded.acting().double()
            a = acting @ u.to(acting.device) - b  # (W - W_0) U
            _, singular, vh = torch.linalg.svd(b, full_matrices=True)
            responds = int((singular > 1e-6 * singular[0]).sum())
            on_range = a @ vh[:responds].T / singular[:responds]  # c = V S^-1 z, ||W_0 c|| = ||z||
            worst = max(worst, float(torch.linalg.matrix_norm(on_range, ord=2)))
            if responds < u.shape[1]:
                null = a @ vh[responds:].T / singular[0]
                worst = max(worst, float(torch.linalg.matrix_norm(null, ord=2)))
        return worst

    def state_dict(self) -> dict:
        return {
            "bases": dict(self.bases),
            "anchor": dict(self.anchor),
            "effective_anchor": dict(self.effective_anchor),
            "layer_bases": dict(self.layer_bases or {}),
            "image_basis": self.basis if self.mode == "image" else None,
            "removed_energy": self._removed.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.bases = dict(state["bases"])
        self.anchor = dict(state["anchor"])
        self.effective_anchor = dict(state["effective_anchor"])
        if self.mode == "feature":  # every layer's subspace, empty ones included
            self.layer_bases = dict(state["layer_bases"])
        if self.mode == "image":
            self.basis, self._image_u = state["image_basis"], None
        self._removed = state["removed_energy"].clone()
        self._place_bases()

    def report(self) -> dict:
        # one subspace per layer (a bias shares its weight's), or one for all text-facing weights
        # (text mode) or for the prediction (image mode)
        subspaces = self.layer_bases if self.mode == "feature" else {self.mode: self.basis}
        removed, total = self._removed.tolist()
        ranks = [int(u.shape[1]) for u in (subspaces or {}).values() if u is not None]
        return {
            "mode": self.mode,
            **({"side": self.side} if self.mode == "feature" else {}),
            "concepts": list(self.concepts),
            "subspace_rank": max(ranks, default=0),
            "subspace_rank_total": sum(ranks),
            "subspace_width_total": sum(
                int(u.shape[0]) for u in (subspaces or {}).values() if u is not None
            ),  # fmt: skip
            "guarded_weights": len(self.weights),
            "leak": self.leak() if self.weights else None,
            **({"refresh_seconds": self.refresh_seconds} if self.refresh_steps else {}),
            **(
                {"prediction_gradient_energy_removed": removed / total if total else 0.0}
                if self.mode == "image"
                else {}
            ),
        }


@dataclass
class MeasuredImages:
    """Images the feature subspaces are measured on, as the model takes them."""

    x0: torch.Tensor  # (N, C, H, W) pixels in [-1, 1], or VAE latents
    states: torch.Tensor  # (N, L, d) their caption states


def exemplar_images(
    ctx: TrainingContext, exemplars: str, concepts: tuple[str, ...], with_anchors: bool
) -> tuple[MeasuredImages, MeasuredImages | None]:
    """The concept exemplars (a folder) and, `with_anchors`, as many training images whose
    captions name none of the concepts (seeded choice)."""

    def measured(images: ImageFolderDataset, indices: list[int]) -> MeasuredImages:
        x0 = torch.stack([images[i]["pixel_values"] for i in indices])
        if ctx.vae is not None:
            x0 = to_latents(ctx.vae, x0.to(ctx.vae.device)).cpu()
        return MeasuredImages(x0, ctx.text_encoder.encode([images.captions[i] for i in indices]))

    folder = ImageFolderDataset(exemplars, ctx.config.resolution)
    concept = measured(folder, list(range(len(folder))))
    if not with_anchors:
        return concept, None
    captions = ctx.dataset.captions
    plain = [i for i, c in enumerate(captions) if not any(k in c for k in concepts)]
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(ctx.config.seed))
    return concept, measured(ctx.dataset, [plain[i] for i in order[: len(folder)].tolist()])


def exemplar_bases(
    model: nn.Module,
    layers: dict[str, nn.Module],
    ctx: TrainingContext,
    images: tuple[MeasuredImages, MeasuredImages | None],
    energy: float,
    anchor_energy: float,
    side: str = "input",
) -> dict[str, torch.Tensor]:
    """Feature-mode subspaces from (exemplars, anchors) measured with the model as it is now.
    `side`: the layers' inputs or the loss gradients at their outputs."""

    def grams(measured: MeasuredImages) -> dict[str, torch.Tensor]:
        return layer_grams(
            model, layers, measured.x0, measured.states, ctx.scheduler, side, seed=ctx.config.seed
        )

    concept, anchor = images
    anchor_grams = grams(anchor) if anchor is not None else None
    return concept_feature_bases(grams(concept), anchor_grams, energy, anchor_energy)
