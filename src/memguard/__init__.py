"""memguard: train diffusion models on data they must not reproduce, and prove that they don't.

The public surface: configs, the `Trainer` with its defense protocol, and the measures.
"""

__version__ = "0.1.0"

from memguard.config import ConfigError, SampleConfig, ShapesConfig, TrainConfig  # noqa: E402
from memguard.train.hooks import Defense, TrainingContext  # noqa: E402
from memguard.train.trainer import Trainer, TrainingError  # noqa: E402

__all__ = [
    "ConfigError",
    "Defense",
    "SampleConfig",
    "ShapesConfig",
    "TrainConfig",
    "Trainer",
    "TrainingContext",
    "TrainingError",
    "__version__",
]
