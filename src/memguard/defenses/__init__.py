"""Defenses that attach to a training loop through the protocol of `memguard.train.hooks`."""

from memguard.config import TrainConfig
from memguard.defenses.agc import AntiGradientControl
from memguard.train.hooks import Defense

__all__ = ["AntiGradientControl", "build_defenses"]


def build_defenses(config: TrainConfig) -> list[Defense]:
    """The defenses that `--defense` names, configured from the run's config."""
    makers = {"agc": lambda: AntiGradientControl(gamma=config.agc_gamma)}
    return [makers[name]() for name in config.defense]
