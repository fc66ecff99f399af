"""Concept-level gradient projection, text mode (Kothandaraman & Pytlarz, "Beyond Memorization:
Gradient Projection Enables Selective Learning in Diffusion Models", arXiv 2512.11194; the
subspace construction is memguard's reading of METHODS.md section 1).

Cross-attention keys and values are the only weights whose input is the text: k = W_k e,
v = W_v e. Their gradient is a sum of outer products g e^T, so right-multiplying it by
P = I - U U^T, with U an orthonormal basis of the concept's token states, removes every training
signal the concept's tokens carry. Adam's per-coordinate scaling and decoupled weight decay
still move W along span(U), so after every optimizer step W is restored on the subspace:
W <- W + (W_0 U - W U) U^T, which keeps W c = W_0 c exactly for every c in span(U). The
certificate is the leak max_{c in span(U)} ||(W_T - W_0) c|| / ||W_0 c|| over the guarded
weights (a generalised eigenvalue problem in r dimensions).

Subspace: prompts naming each concept are encoded by the run's text encoder; the states of the
concept's tokens and of the positions after them are kept (the first position, identical in
every prompt, and padding are dropped); optionally the directions shared by neutral anchor
prompts are removed; an SVD keeps the directions holding `energy` of the total.

Use it from `memguard train --defense projection --concept "the acme logo"`, or attach it to a
model and optimizer of your own with `attach()` / `detach()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from memguard.data.text import TextEncoder
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


@dataclass
class Guarded:
    """A weight to project, and the text-facing weight it changes (itself, or W + s B A)."""

    param: nn.Parameter  # receives the projected gradients and updates
    effective: Callable[[], torch.Tensor]  # (out, d): the weight that multiplies the text


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

                def effective(module=module, adapter=adapter) -> torch.Tensor:
                    delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
                    return module.base_layer.weight + module.scaling[adapter] * delta

                found[f"{name}.lora_A.{adapter}.weight"] = Guarded(layer.weight, effective)
        else:
            found[f"{name}.weight"] = Guarded(module.weight, lambda w=module.weight: w)
    if not found:
        raise ValueError("no cross-attention key/value weights (attn2.to_k / attn2.to_v) found")
    return found


class ConceptProjection(Defense):
    """Projects the gradients and updates of text-facing weights off a concept subspace."""

    name = "projection"

    def __init__(
        self,
        basis: torch.Tensor | None = None,
        concepts: tuple[str, ...] = (),
        energy: float = 0.99,
        anchors: tuple[str, ...] = (),
    ) -> None:
        """Give the `basis` (d, r), or the `concepts` to build it from at `setup` with the run's
        text encoder and training captions (what `memguard train --defense projection` does)."""
        if basis is None and not concepts:
            raise ValueError("ConceptProjection needs a basis or at least one concept")
        self.basis = basis.double() if basis is not None else None  # (d, r), orthonormal
        self.concepts, self.energy, self.anchors = tuple(concepts), energy, tuple(anchors)
        self.weights: dict[str, Guarded] = {}
        self.anchor: dict[str, torch.Tensor] = {}  # P_0 U per projected parameter P
        self.effective_anchor: dict[str, torch.Tensor] = {}  # W_0 U per text-facing weight
        self._handles: list = []

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

    def _basis_for(self, weight: torch.Tensor) -> torch.Tensor:
        return self.basis.to(weight.device, weight.dtype)

    def setup(self, model: nn.Module, optimizer, ctx: TrainingContext | None = None) -> None:
        if self.basis is None:
            if ctx is None or ctx.text_encoder is None:
                raise ValueError("building the concept subspace needs the run's text encoder")
            self.basis = concept_subspace(
                ctx.text_encoder, list(self.concepts), self.energy, self.anchors,
                extra_prompts=ctx.captions,
            )  # fmt: skip
        self.weights = guarded_weights(model)
        for name, guarded in self.weights.items():
            weight = guarded.param
            if weight.shape[1] != self.basis.shape[0]:
                raise ValueError(
                    f"{name}: input width {weight.shape[1]} != concept basis width "
                    f"{self.basis.shape[0]} (was the basis built with this model's text encoder?)"
                )
            with torch.no_grad():
                if ".lora_A." in name:  # LoRA: start A inside the complement
                    u = self._basis_for(weight)
                    weight -= (weight @ u) @ u.T
                u = self.basis.to(weight.device)
                self.anchor[name] = (weight.double() @ u).clone()
                self.effective_anchor[name] = (guarded.effective().double() @ u).clone()

    @torch.no_grad()
    def project_gradients(self) -> None:
        """grad <- grad (I - U U^T) for every guarded weight."""
        for weight in (guarded.param for guarded in self.weights.values()):
            if weight.grad is not None:
                u = self._basis_for(weight)
                weight.grad -= (weight.grad @ u) @ u.T

    @torch.no_grad()
    def restore_subspace(self) -> None:
        """W <- W + (W_0 U - W U) U^T: the concept's keys and values do not move."""
        for name, guarded in self.weights.items():
            weight = guarded.param
            u = self.basis.to(weight.device)
            drift = self.anchor[name] - weight.double() @ u
            weight += (drift @ u.T).to(weight.dtype)

    def after_backward(self, model: nn.Module, ctx: TrainingContext) -> None:
        self.project_gradients()

    def after_step(self, model: nn.Module, ctx: TrainingContext) -> None:
        self.restore_subspace()

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
        """max over guarded weights and c in span(U) of ||(W - W_0) c|| / ||W_0 c||, with W the
        weight that multiplies the text (base + LoRA delta under LoRA)."""
        worst = 0.0
        if self.basis is None or self.basis.shape[1] == 0:
            return worst
        for name, guarded in self.weights.items():
            b = self.effective_anchor[name]  # W_0 U
            effective = guarded.effective().double()
            a = effective @ self.basis.to(effective.device) - b  # (W - W_0) U
            gram_b = b.T @ b
            chol = torch.linalg.cholesky(gram_b + 1e-30 * torch.eye(len(gram_b), dtype=b.dtype))
            inv = torch.linalg.inv(chol)
            ratio = torch.linalg.eigvalsh(inv @ (a.T @ a) @ inv.T).max().clamp_min(0).sqrt()
            worst = max(worst, float(ratio))
        return worst

    def state_dict(self) -> dict:
        return {
            "basis": self.basis,
            "anchor": dict(self.anchor),
            "effective_anchor": dict(self.effective_anchor),
        }

    def load_state_dict(self, state: dict) -> None:
        self.basis = state["basis"]
        self.anchor = dict(state["anchor"])
        self.effective_anchor = dict(state["effective_anchor"])

    def report(self) -> dict:
        return {
            "mode": "text",
            "concepts": list(self.concepts),
            "subspace_rank": int(self.basis.shape[1]),
            "embedding_width": int(self.basis.shape[0]),
            "guarded_weights": len(self.weights),
            "leak": self.leak() if self.weights else None,
        }
