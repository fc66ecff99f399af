"""Defenses that attach to a training loop through the protocol of `memguard.train.hooks`."""

from memguard.config import TrainConfig
from memguard.defenses.agc import AntiGradientControl
from memguard.defenses.projection import ConceptProjection
from memguard.train.hooks import Defense

__all__ = ["AntiGradientControl", "ConceptProjection", "build_defenses"]


def build_defenses(config: TrainConfig) -> list[Defense]:
    """The defenses that `--defense` names, configured from the run's config."""
    makers = {
        "agc": lambda: AntiGradientControl(gamma=config.agc_gamma),
        "projection": lambda: ConceptProjection(
            concepts=config.concept,
            energy=config.projection_energy,
            mode=config.projection_mode,
            exemplars=config.concept_exemplars,
            layers=config.projection_layers,
            anchor_energy=config.projection_anchor_energy,
            refresh_steps=config.projection_refresh_steps,
            side=config.projection_side,
            footprint_alpha=config.projection_footprint_alpha,
        ),
    }
    return [makers[name]() for name in config.defense]
