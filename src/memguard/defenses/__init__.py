"""Defenses that attach to a training step through the protocol of `memguard.defenses.base`."""

from memguard.defenses.agc import AGCConfig, AGCDecision, AntiGradientControl
from memguard.defenses.base import Defense, TrainingContext, combined_weights, weighted_mean
from memguard.defenses.projection_feature import FeatureProjection, FeatureProjectionConfig
from memguard.defenses.projection_image import ImageProjection, ImageProjectionConfig
from memguard.defenses.projection_patch import PatchProjection, PatchProjectionConfig
from memguard.defenses.projection_text import TextProjection, TextProjectionConfig
from memguard.defenses.registry import KINDS, build_defenses, rebuild, record
from memguard.defenses.taa import TAAConfig, ThresholdAwareAugmentation

__all__ = [
    "AGCConfig",
    "AGCDecision",
    "AntiGradientControl",
    "Defense",
    "FeatureProjection",
    "FeatureProjectionConfig",
    "ImageProjection",
    "ImageProjectionConfig",
    "KINDS",
    "PatchProjection",
    "PatchProjectionConfig",
    "TAAConfig",
    "TextProjection",
    "TextProjectionConfig",
    "ThresholdAwareAugmentation",
    "TrainingContext",
    "build_defenses",
    "combined_weights",
    "rebuild",
    "record",
    "weighted_mean",
]
