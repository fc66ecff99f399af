"""memguard: train diffusion models on data they must not reproduce, and prove that they don't.

The public surface: configs, the `Trainer` with its defense protocol, and the measures.
"""

__version__ = "0.1.0"

from memguard.config import ConfigError, SampleConfig, ShapesConfig, TrainConfig  # noqa: E402
from memguard.defenses.base import Defense, TrainingContext  # noqa: E402
from memguard.train.step import TrainingError, TrainingStep  # noqa: E402
from memguard.train.trainer import Trainer  # noqa: E402

__all__ = [
    "ConfigError",
    "Defense",
    "SampleConfig",
    "ShapesConfig",
    "TrainConfig",
    "Trainer",
    "TrainingContext",
    "TrainingError",
    "TrainingStep",
    "__version__",
]
