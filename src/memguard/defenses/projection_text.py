"""Gradient projection, text mode: the cross-attention keys and values never learn the concept's
token states (Kothandaraman & Pytlarz, "Beyond Memorization: Gradient Projection Enables
Selective Learning in Diffusion Models", arXiv 2512.11194; the subspace construction is
memguard's reading of the paper).

Cross-attention keys and values are the only weights whose input is the text: `k = W_k e`,
`v = W_v e`. Prompts naming each concept are encoded by the run's text encoder; the states of
the concept's tokens and of the positions after them are kept (the first position, identical in
every prompt, and padding are dropped); optionally the directions shared by neutral anchor
prompts are removed; an SVD keeps the directions holding `energy` of the total. The guard
(`memguard.defenses.subspace`) then keeps `W c = W_0 c` for every c in that subspace, and under
LoRA projects the input-side factor A instead.

Use it from `memguard train --defense projection --concept "the acme logo"`, or attach it to a
model and optimizer of your own:

    projection = TextProjection.from_concepts(encoder, ["the acme logo"]).attach(unet, optimizer)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memguard.config import ConfigError, option
from memguard.data.folder import read_metadata
from memguard.data.text import TextEncoder
from memguard.defenses.signal import check_limit
from memguard.defenses.subspace import Guarded, SubspaceGuard, energy_basis

TEMPLATES = (
    "{}",
    "a photo with {}",
    "an image of {}",
    "a picture showing {}",
    "a drawing with {}",
    "{} in the corner",
    "something with {}",
)
GUARDED_SUFFIXES = ("attn2.to_k", "attn2.to_v")


def concept_option() -> tuple[str, ...]:
    return option((), "projection: a prohibited concept (repeatable)", flag="concept")


def energy_option() -> float:
    return option(
        0.99, "projection, text/feature mode: energy kept by the concept subspace",
        flag="projection_energy",
    )  # fmt: skip


def max_removed_option() -> float:
    return option(
        0.75,
        "projection: stop before training when the first step removes more than this fraction "
        "of the training signal (gradient energy; on the benchmark a working projection removes "
        "at most 45%, one that left the model learning nothing 96-99.9%)",
        flag="projection_max_removed",
    )


def check_concepts(concepts: tuple[str, ...], energy: float) -> None:
    """The settings every projection mode shares, validated."""
    if not concepts:
        raise ConfigError("concept: --defense projection needs at least one --concept")
    if not 0 < energy <= 1:
        raise ConfigError(f"projection_energy: must be in (0, 1], got {energy}")


@dataclass(frozen=True)
class TextProjectionConfig:
    """`--defense projection --projection_mode text` settings."""

    concept: tuple[str, ...] = concept_option()
    energy: float = energy_option()
    max_removed: float = max_removed_option()

    def __post_init__(self) -> None:
        check_concepts(self.concept, self.energy)
        check_limit(self.max_removed)


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


class TextProjection(SubspaceGuard):
    """Keeps every cross-attention key and value weight from moving on the subspace of the
    concepts' token states: give the `basis` (d, r), or the `concept`s to build it from at
    `setup` with the run's text encoder (and `extra_prompts`: training captions naming them)."""

    config_class = TextProjectionConfig
    mode = "text"

    def __init__(
        self,
        concept: tuple[str, ...] = (),
        energy: float = 0.99,
        max_removed: float = 0.75,
        basis: torch.Tensor | None = None,
        anchors: tuple[str, ...] = (),
        extra_prompts: tuple[str, ...] = (),
        captions_from: str | None = None,
    ) -> None:
        """`extra_prompts`: more prompts naming the concepts; `captions_from`: an image folder
        whose captions naming them join `extra_prompts` at setup."""
        super().__init__(max_removed)
        if basis is None:  # built at setup: the settings must be valid (a given one is used as is)
            self.config = TextProjectionConfig(tuple(concept), energy, max_removed)
        self.concepts, self.energy, self.anchors = tuple(concept), energy, tuple(anchors)
        self.basis = basis.double() if basis is not None else None  # (d, r)
        self.extra_prompts, self.captions_from = tuple(extra_prompts), captions_from

    @classmethod
    def for_run(cls, config: TextProjectionConfig, run) -> TextProjection:
        """As `memguard train` builds it: the training captions naming a concept join the
        prompts the subspace is measured on (read at setup)."""
        return cls(
            config.concept, config.energy, config.max_removed, captions_from=run.train_data_dir
        )

    @classmethod
    def from_concepts(
        cls,
        encoder: TextEncoder,
        concepts: list[str],
        energy: float = 0.99,
        anchors: tuple[str, ...] = (),
        extra_prompts: tuple[str, ...] = (),
    ) -> TextProjection:
        """Build the subspace of `concepts` with `encoder` now (see `concept_subspace`)."""
        basis = concept_subspace(encoder, concepts, energy, anchors, extra_prompts=extra_prompts)
        return cls(concepts, energy, basis=basis)

    def guarded(self, model, ctx):
        if self.basis is None:
            if ctx is None or ctx.text_encoder is None:
                raise ValueError("building the concept subspace needs the run's text encoder")
            prompts = self.extra_prompts
            if self.captions_from is not None:
                prompts += tuple(record.text for record in read_metadata(self.captions_from))
            self.basis = concept_subspace(
                ctx.text_encoder, list(self.concepts), self.energy, self.anchors,
                extra_prompts=prompts,
            )  # fmt: skip
        weights = guarded_weights(model)
        return weights, {name: self.basis for name in weights}

    def report(self) -> dict:
        return {
            "mode": self.mode,
            "concepts": list(self.concepts),
            "subspace_rank": int(self.basis.shape[1]) if self.basis is not None else 0,
            **super().report(),
        }
