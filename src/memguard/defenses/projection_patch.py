"""Gradient projection, patch mode: each training image's own footprint of the concept, found
by a patch detector, so that a concept without a fixed place is kept out (memguard's design for
the selective learning of Kothandaraman & Pytlarz, arXiv 2512.11194). On the shapes benchmark
it keeps a fixed or a moving logo out; of a texture (acme hatching, a shape's fill in stripes)
it lets part through: footprints that miss a few pixels at a fill's edge leave stripes to learn,
and even footprints grown to cover the whole fill (`grow` 4) leave more than oracle filtering.

Image mode projects every prediction gradient off one footprint, the positions where exemplars
differ from other images on average; a concept that moves has no such place, and its footprint
becomes most of the image. Patch mode finds where the concept is in *this* image instead: a
translation-invariant detector (`memguard.defenses.concept_detector`), trained before training
on the held-out exemplars against training images whose captions name no concept, marks the
positions of each training image that show the concept, and the gradient of the loss with
respect to the model's prediction is projected off those coordinates (all channels there), for
that image only. The projection is per sample, P_i = I - diag(m_i): an image in which the
detector finds nothing trains as it would without the defense, and an image with the concept
teaches the model everything but the concept's pixels, so nothing about how to draw the concept
reaches any weight, under any caption.

It works in the space the model denoises (pixels, or VAE latents of a latent model: the detector
is trained on latents there). Like image mode it guards no weight, so it has no leak
certificate; it reports the detector's held-out recall and the fraction of the prediction
gradient's energy it removed. The detector must see the concept as the exemplars show it: a
concept whose instances in the training images look unlike every exemplar is not found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memguard.config import ConfigError, option
from memguard.defenses.base import TrainingContext
from memguard.defenses.concept_detector import PatchDetector, fit_patch_detector, footprints
from memguard.defenses.exemplars import ExemplarSource, exemplar_images
from memguard.defenses.prediction_guard import GradientHook, PredictionGuard
from memguard.defenses.projection_feature import exemplars_option
from memguard.defenses.projection_text import check_concepts, concept_option, max_removed_option
from memguard.defenses.signal import check_limit

# Images without the concept the detector learns from and is calibrated on, per exemplar: its
# negatives are every position of them, and its threshold is a quantile over them.
ANCHORS_PER_EXEMPLAR = 4


@dataclass(frozen=True)
class PatchProjectionConfig:
    """`--defense projection --projection_mode patch` settings."""

    concept: tuple[str, ...] = concept_option()
    exemplars: str | None = exemplars_option()
    detector_steps: int = option(
        400, "projection, patch mode: training steps of the patch detector that finds the "
        "concept in each image", flag="projection_detector_steps",
    )  # fmt: skip
    local_mean: int = option(
        5, "projection, patch mode: the detector sees each image minus its mean over this odd "
        "square of positions around each one, so that it scores patterns rather than the "
        "background's colour (0: the image as it is)", flag="projection_detector_local_mean",
    )  # fmt: skip
    grow: int = option(
        2, "projection, patch mode: pixels (or latent positions) each found footprint is grown "
        "by on every side", flag="projection_footprint_grow",
    )  # fmt: skip
    min_recall: float = option(
        0.8, "projection, patch mode: stop before training when the detector finds the concept "
        "in fewer than this fraction of held-out exemplars", flag="projection_min_recall",
    )  # fmt: skip
    max_removed: float = max_removed_option()

    def __post_init__(self) -> None:
        check_concepts(self.concept, 1.0)
        check_limit(self.max_removed)
        if self.exemplars is None:
            raise ConfigError("concept_exemplars: --projection_mode patch needs a folder")
        if self.detector_steps < 1:
            raise ConfigError("projection_detector_steps: must be >= 1")
        if self.local_mean < 0 or self.local_mean % 2 == 0 and self.local_mean != 0:
            raise ConfigError("projection_detector_local_mean: must be 0 or an odd size")
        if self.grow < 0:
            raise ConfigError("projection_footprint_grow: must be >= 0")
        if not 0 <= self.min_recall <= 1:
            raise ConfigError("projection_min_recall: must be in [0, 1]")


class PatchProjection(PredictionGuard):
    """Projects each sample's prediction gradient off that image's footprint of the concept:
    give a trained `detector` and its `threshold`, or the `source` of exemplars and anchors to
    train one from at `setup`. In a loop of your own, call `locate(x0)` with the batch's clean
    model inputs before the forward pass whose gradient is to be projected."""

    needs_text = True  # its anchors are the training images whose captions name no concept
    config_class = PatchProjectionConfig
    mode = "patch"

    def __init__(
        self,
        concept: tuple[str, ...] = (),
        exemplars: str | None = None,
        detector_steps: int = 400,
        local_mean: int = 5,
        grow: int = 2,
        min_recall: float = 0.8,
        max_removed: float = 0.75,
        detector: PatchDetector | None = None,
        threshold: float = float("inf"),
        source: ExemplarSource | None = None,
    ) -> None:
        super().__init__(max_removed)
        if detector is None:
            self.config = PatchProjectionConfig(
                concept, exemplars, detector_steps, local_mean, grow, min_recall, max_removed
            )
            if source is None:
                raise ValueError("patch mode needs a `detector` or a `source` of exemplars")
        self.concepts, self.source = tuple(concept), source
        self.detector_steps, self.local_mean = detector_steps, local_mean
        self.grow, self.min_recall = grow, min_recall
        self.detector, self.threshold = detector, threshold
        self.recall: float | None = None  # the detector's, on held-out exemplars
        self.coverage: float | None = None  # mean share of a held-out exemplar it marks
        self._pending: torch.Tensor | None = None  # footprints for the next forward pass

    @classmethod
    def for_run(cls, config: PatchProjectionConfig, run) -> PatchProjection:
        source = ExemplarSource(config.exemplars, run.train_data_dir, run.resolution, run.seed)
        return cls(
            config.concept, config.exemplars, config.detector_steps, config.local_mean,
            config.grow, config.min_recall, config.max_removed, source=source,
        )  # fmt: skip

    def prepare(self, ctx: TrainingContext | None) -> None:
        if self.detector is not None:
            return
        if ctx is None:
            raise ValueError("training the detector needs the run's training context")
        concept, anchor = exemplar_images(
            self.source, self.concepts, ctx, with_anchors=True,
            anchors_per_exemplar=ANCHORS_PER_EXEMPLAR,
        )  # fmt: skip
        fit = fit_patch_detector(
            concept.x0, anchor.x0, self.detector_steps, seed=self.source.seed,
            local_mean=self.local_mean,
        )  # fmt: skip
        self.detector, self.threshold = fit.detector, fit.threshold
        self.recall, self.coverage = fit.recall, fit.coverage
        if fit.recall < self.min_recall:
            raise ConfigError(
                f"projection_min_recall: the patch detector found the concept in "
                f"{fit.recall:.0%} of held-out exemplars (limit {self.min_recall:.0%}): it "
                "would leave most instances unguarded. Check the exemplars, raise "
                "--projection_detector_steps, or lower --projection_min_recall."
            )

    def locate(self, x0: torch.Tensor) -> torch.Tensor:
        """Find the concept in the clean model inputs `x0` (B, C, H, W); the next forward pass
        of that batch has its prediction gradient projected off these footprints (B, H, W)."""
        self.detector.to(x0.device)
        self._pending = footprints(self.detector, x0, self.threshold, self.grow)
        return self._pending

    def before_forward(self, batch: dict, ctx: TrainingContext) -> None:
        self.locate(batch["x0"])

    def gradient_hook(self, prediction: torch.Tensor) -> GradientHook | None:
        """The located batch's prediction is projected off its footprints; other forward
        passes (an attack's inner loop, say) are not."""
        footprint, self._pending = self._pending, None
        if footprint is None:
            return None
        if footprint.shape != (prediction.shape[0], *prediction.shape[2:]):
            raise ValueError(
                f"footprints {tuple(footprint.shape)} do not fit the prediction "
                f"{tuple(prediction.shape)}: locate() the batch this forward pass denoises"
            )
        return lambda grad: self.project_prediction_gradient(grad, footprint)

    @torch.no_grad()
    def project_prediction_gradient(
        self, grad: torch.Tensor, footprint: torch.Tensor
    ) -> torch.Tensor:
        """g_i <- g_i (I - diag(m_i)): each sample's gradient zeroed on its own footprint."""
        inside = footprint.unsqueeze(1).to(grad.dtype)
        removed = grad * inside
        self.signal.add(removed.square().sum(), grad.square().sum())
        return grad - removed

    def detach(self) -> None:
        super().detach()
        self._pending = None

    def state_dict(self) -> dict:
        detector = self.detector
        return {
            "detector": {k: v.cpu() for k, v in detector.state_dict().items()},
            "detector_shape": (
                detector.channels,
                detector.width,
                detector.depth,
                detector.local_mean,
            ),
            "threshold": self.threshold,
            "recall": self.recall,
            "coverage": self.coverage,
            "signal": self.signal.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["detector_shape"]) != 4:
            raise ValueError(
                "this checkpoint's patch detector was saved by a memguard whose detector saw raw "
                "pixels; it cannot be resumed as it was: start the run again"
            )
        self.detector = PatchDetector(*state["detector_shape"])
        self.detector.load_state_dict(state["detector"])
        self.detector.eval().requires_grad_(False)
        self.threshold, self.recall, self.coverage = (
            state["threshold"], state["recall"], state["coverage"]
        )  # fmt: skip
        self.signal.load_state_dict(state["signal"])

    def report(self) -> dict:
        return {
            "mode": self.mode,
            "concepts": list(self.concepts),
            "detector_recall": self.recall,
            "detector_coverage": self.coverage,
            **self.signal.report(),
        }
