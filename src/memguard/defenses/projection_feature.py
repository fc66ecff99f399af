"""Gradient projection, feature mode: the layers that see the image do not learn from the
concept's own input directions (in the manner of Gradient Projection Memory, Saha et al.,
ICLR 2021, applied to the selective learning of Kothandaraman & Pytlarz, arXiv 2512.11194).

Every layer that sees the image (convolutions on im2col patches, linear layers on their rows)
gets its own subspace from its inputs on exemplar images of the concept, with the directions
that images without the concept share left free (`memguard.defenses.feature_subspace`), and
the guard (`memguard.defenses.subspace`) keeps each weight from moving on it. With
`refresh_steps` the exemplars are measured again with the current model every that many steps
and the new directions join each layer's subspace (GPM's memory update). `side="output"`
guards instead the directions of the loss gradient at each layer's output (its error signals)
on the exemplars, weight and bias: the layer cannot change what it emits along them.

On the shapes benchmark this mode keeps its certificate and still lets the concept through
(the README's projection table): a logo image's inputs are mostly shared with ordinary images,
and the gradient through those shared directions still carries the logo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from memguard.config import ConfigError, option
from memguard.defenses.base import TrainingContext
from memguard.defenses.exemplars import ExemplarSource, MeasuredImages, exemplar_images
from memguard.defenses.feature_subspace import concept_feature_bases, feature_layers, layer_grams
from memguard.defenses.projection_text import (
    check_concepts,
    concept_option,
    energy_option,
    max_removed_option,
)
from memguard.defenses.signal import check_limit
from memguard.defenses.subspace import Guarded, SubspaceGuard, columns_of, rows_of


def exemplars_option() -> str | None:
    return option(
        None,
        "projection, feature/image/patch mode: image folder (metadata.jsonl) showing the concept",
        flag="concept_exemplars",
    )  # fmt: skip


@dataclass(frozen=True)
class FeatureProjectionConfig:
    """`--defense projection --projection_mode feature` settings."""

    concept: tuple[str, ...] = concept_option()
    exemplars: str | None = exemplars_option()
    energy: float = energy_option()
    layers: tuple[str, ...] = option(
        (), "projection, feature mode: layer name patterns to guard (default: all image layers)",
        flag="projection_layers",
    )  # fmt: skip
    side: str = option(
        "input",
        "projection, feature mode: guard each layer's input directions or its output (error) ones",
        choices=("input", "output"),
        flag="projection_side",
    )
    refresh_steps: int = option(
        0, "projection, feature mode: re-measure the exemplars every N steps, add new directions",
        flag="projection_refresh_steps",
    )  # fmt: skip
    anchor_energy: float = option(
        0.99, "projection, feature mode: energy of the anchors' shared directions left free",
        flag="projection_anchor_energy",
    )  # fmt: skip
    max_removed: float = max_removed_option()

    def __post_init__(self) -> None:
        check_concepts(self.concept, self.energy)
        check_limit(self.max_removed)
        if self.exemplars is None:
            raise ConfigError("concept_exemplars: --projection_mode feature needs a folder")
        if self.side not in ("input", "output"):
            raise ConfigError(f"projection_side: 'input' or 'output', not {self.side!r}")
        if self.refresh_steps < 0:
            raise ConfigError("projection_refresh_steps: must be >= 0")
        if not 0 <= self.anchor_energy < 1:
            raise ConfigError("projection_anchor_energy: must be in [0, 1)")


class FeatureProjection(SubspaceGuard):
    """Guards the layers `feature_layers` chooses, one subspace per layer: give `bases`
    (module name -> (width, r)), or the `source` of exemplars and anchors to measure them from
    at `setup` (what `memguard train --projection_mode feature` does)."""

    config_class = FeatureProjectionConfig
    mode = "feature"

    def __init__(
        self,
        concept: tuple[str, ...] = (),
        exemplars: str | None = None,
        energy: float = 0.99,
        layers: tuple[str, ...] = (),
        side: str = "input",
        refresh_steps: int = 0,
        anchor_energy: float = 0.99,
        max_removed: float = 0.75,
        bases: dict[str, torch.Tensor] | None = None,
        source: ExemplarSource | None = None,
    ) -> None:
        super().__init__(max_removed)
        if bases is None:
            self.config = FeatureProjectionConfig(
                concept, exemplars, energy, layers, side, refresh_steps, anchor_energy, max_removed
            )
            if source is None:
                raise ValueError("feature mode needs `bases` or a `source` of exemplars")
        self.concepts, self.energy, self.layers = tuple(concept), energy, tuple(layers)
        self.side, self.refresh_steps, self.anchor_energy = side, refresh_steps, anchor_energy
        self.layer_bases = {k: v.double() for k, v in (bases or {}).items()} or None
        self.source = source
        self.refresh_seconds: list[float] = []  # wall time of each measurement
        self._layers: dict[str, nn.Module] = {}
        self._images: tuple[MeasuredImages, MeasuredImages | None] | None = None

    @classmethod
    def for_run(cls, config: FeatureProjectionConfig, run) -> FeatureProjection:
        source = ExemplarSource(config.exemplars, run.train_data_dir, run.resolution, run.seed)
        return cls(
            config.concept, config.exemplars, config.energy, config.layers, config.side,
            config.refresh_steps, config.anchor_energy, config.max_removed, source=source,
        )  # fmt: skip

    def guarded(self, model, ctx):
        self._layers = layers = {
            name: module
            for name, module in feature_layers(model, self.layers).items()
            if module.weight.requires_grad
        }
        if self.layer_bases is None:
            width = rows_of if self.side == "input" else columns_of
            self.layer_bases = {
                name: torch.zeros(width(m.weight).shape[1], 0, dtype=torch.float64)
                for name, m in layers.items()
            }
            self.measure(model, ctx)  # the first measurement
        missing = sorted(set(self.layer_bases) - set(layers))
        if missing:
            raise ValueError(f"feature bases for layers the model lacks: {missing[:5]}")
        keep_empty = self.refresh_steps > 0  # a refresh may give an empty layer directions
        weights, bases = {}, {}
        for name, u in self.layer_bases.items():
            if not (u.shape[1] or keep_empty):
                continue
            module = layers[name]
            if self.side == "input":
                weights[f"{name}.weight"] = Guarded(module.weight)
                bases[f"{name}.weight"] = u
                continue
            for kind in ("weight", "bias"):  # the output side moves the bias too
                if getattr(module, kind) is not None:
                    weights[f"{name}.{kind}"] = Guarded(getattr(module, kind), columns_of)
                    bases[f"{name}.{kind}"] = u
        return weights, bases

    def after_step(self, model: nn.Module, ctx: TrainingContext) -> None:
        super().after_step(model, ctx)
        if self.refresh_steps and ctx.step > 0 and ctx.step % self.refresh_steps == 0:
            self.measure(model, ctx)

    @torch.no_grad()
    def measure(self, model: nn.Module, ctx: TrainingContext | None) -> None:
        """Measure the exemplars with the model as it is now, and add to each layer's subspace
        the directions it lacks; once training has started, each new direction is held at the
        weight it meets now."""
        if ctx is None or ctx.scheduler is None or self.source is None:
            raise ValueError("measuring feature subspaces needs the run's context and exemplars")
        start = time.perf_counter()
        if self._images is None:  # decoded and encoded once, measured at every refresh
            self._images = exemplar_images(
                self.source, self.concepts, ctx, with_anchors=self.anchor_energy > 0
            )
        concept, anchor = self._images

        def grams(measured: MeasuredImages) -> dict[str, torch.Tensor]:
            return layer_grams(
                model, self._layers, measured.x0, measured.states, ctx.scheduler, self.side,
                seed=self.source.seed,
            )  # fmt: skip

        anchor_grams = grams(anchor) if anchor is not None else None
        found = concept_feature_bases(grams(concept), anchor_grams, self.energy, self.anchor_energy)
        for layer, new in found.items():
            old = self.layer_bases[layer]
            fresh = new - old @ (old.T @ new)
            fresh = fresh[:, fresh.norm(dim=0) > 0.5]  # mostly outside the span so far
            if fresh.shape[1] == 0:
                continue
            fresh = torch.linalg.qr(fresh - old @ (old.T @ fresh))[0]
            self.layer_bases[layer] = torch.cat([old, fresh], dim=1)
            for name in (f"{layer}.weight", f"{layer}.bias"):
                if name in self.weights:  # training has started (and the layer has this part)
                    self.extend(name, fresh)
        self.refresh_seconds.append(time.perf_counter() - start)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "layer_bases": dict(self.layer_bases or {})}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.layer_bases = dict(state["layer_bases"])  # every layer's, empty ones included

    def report(self) -> dict:
        ranks = [int(u.shape[1]) for u in (self.layer_bases or {}).values()]
        return {
            "mode": self.mode,
            "side": self.side,
            "concepts": list(self.concepts),
            "subspace_rank": max(ranks, default=0),
            "subspace_rank_total": sum(ranks),
            "subspace_width_total": sum(int(u.shape[0]) for u in (self.layer_bases or {}).values()),
            **({"refresh_seconds": self.refresh_seconds} if self.refresh_steps else {}),
            **super().report(),
        }
