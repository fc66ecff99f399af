"""Gradient projection, image mode: no training image teaches the model anything at the
concept's footprint (projection taken to the model's output; memguard's design for the
selective learning of Kothandaraman & Pytlarz, arXiv 2512.11194).

The subspace is the concept's footprint in image space (pixels or VAE latents): all channels at
the positions where the exemplars differ from training images that do not name the concept
(`concept_footprint`, Welch's t per position and channel, Bonferroni). The gradient of the loss
with respect to the UNet's prediction is projected off it, for every training image, with the
concept or without, so no layer learns anything there from any image; what the model draws
there comes from what it learned elsewhere. It suits a concept with a fixed place (a watermark,
a stamped logo); one that moves has no footprint smaller than the image. It guards no weight,
so it has no leak certificate; it reports the fraction of the prediction gradient's energy it
removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memguard.config import ConfigError, option
from memguard.defenses.base import TrainingContext
from memguard.defenses.exemplars import ExemplarSource, exemplar_images
from memguard.defenses.feature_subspace import concept_footprint
from memguard.defenses.prediction_guard import GradientHook, PredictionGuard
from memguard.defenses.projection_feature import exemplars_option
from memguard.defenses.projection_text import check_concepts, concept_option, max_removed_option
from memguard.defenses.signal import check_limit


@dataclass(frozen=True)
class ImageProjectionConfig:
    """`--defense projection --projection_mode image` settings."""

    concept: tuple[str, ...] = concept_option()
    exemplars: str | None = exemplars_option()
    footprint_alpha: float = option(
        1e-3,
        "projection, image mode: family-wise level of the per-position test that finds where "
        "the exemplars differ from images without the concept",
        flag="projection_footprint_alpha",
    )
    max_removed: float = max_removed_option()

    def __post_init__(self) -> None:
        check_concepts(self.concept, 1.0)
        check_limit(self.max_removed)
        if self.exemplars is None:
            raise ConfigError("concept_exemplars: --projection_mode image needs a folder")
        if not 0 < self.footprint_alpha < 1:
            raise ConfigError("projection_footprint_alpha: must be in (0, 1)")


class ImageProjection(PredictionGuard):
    """Projects the gradient of the loss at the model's prediction off a subspace of image
    space: give the `basis` (C*H*W, r), or the `source` of exemplars and anchors to find the
    concept's footprint from at `setup`."""

    needs_text = True  # its footprint is measured under captions naming the concept
    config_class = ImageProjectionConfig
    mode = "image"

    def __init__(
        self,
        concept: tuple[str, ...] = (),
        exemplars: str | None = None,
        footprint_alpha: float = 1e-3,
        max_removed: float = 0.75,
        basis: torch.Tensor | None = None,
        source: ExemplarSource | None = None,
    ) -> None:
        super().__init__(max_removed)
        if basis is None:
            self.config = ImageProjectionConfig(concept, exemplars, footprint_alpha, max_removed)
            if source is None:
                raise ValueError("image mode needs a `basis` or a `source` of exemplars")
        self.concepts, self.footprint_alpha, self.source = tuple(concept), footprint_alpha, source
        self.basis = basis.double() if basis is not None else None
        self._u: torch.Tensor | None = None  # the basis in the gradients' device and dtype

    @classmethod
    def for_run(cls, config: ImageProjectionConfig, run) -> ImageProjection:
        source = ExemplarSource(config.exemplars, run.train_data_dir, run.resolution, run.seed)
        return cls(
            config.concept, config.exemplars, config.footprint_alpha, config.max_removed,
            source=source,
        )  # fmt: skip

    def prepare(self, ctx: TrainingContext | None) -> None:
        if self.basis is not None:
            return
        if ctx is None:
            raise ValueError("finding the footprint needs the run's training context")
        concept, anchor = exemplar_images(self.source, self.concepts, ctx, with_anchors=True)
        try:
            self.basis = concept_footprint(concept.x0, anchor.x0, self.footprint_alpha)
        except ValueError as error:  # no footprint: the concept has no fixed place
            raise ConfigError(
                f"projection_mode: image mode cannot guard this concept: {error} "
                "(--projection_mode patch finds the concept in each image)"
            ) from None

    def gradient_hook(self, prediction: torch.Tensor) -> GradientHook:
        return self.project_prediction_gradient  # every prediction

    @torch.no_grad()
    def project_prediction_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """g <- g (I - U U^T) for each sample's gradient g of the loss w.r.t. its prediction."""
        flat = grad.reshape(len(grad), -1)
        if flat.shape[1] != self.basis.shape[0]:
            raise ValueError(
                f"image subspace width {self.basis.shape[0]} != prediction size {flat.shape[1]}"
            )
        u = self._u
        if u is None or u.device != grad.device or u.dtype != grad.dtype:
            u = self._u = self.basis.to(grad.device, grad.dtype)
        removed = (flat @ u) @ u.T
        self.signal.add(removed.square().sum(), flat.square().sum())
        return (flat - removed).view_as(grad)

    def state_dict(self) -> dict:
        return {"basis": self.basis, "signal": self.signal.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.basis, self._u = state["basis"], None
        self.signal.load_state_dict(state["signal"])

    def report(self) -> dict:
        return {
            "mode": self.mode,
            "concepts": list(self.concepts),
            "subspace_rank": int(self.basis.shape[1]) if self.basis is not None else 0,
            "subspace_width_total": int(self.basis.shape[0]) if self.basis is not None else 0,
            **self.signal.report(),
        }
