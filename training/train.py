"""The training entry points under a second name: ``from training.train import TrainConfig, train``.

Everything lives in :mod:`training.fit`; this module only re-exports it.
"""

from training.fit import TrainConfig, TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
