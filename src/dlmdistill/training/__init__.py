"""The Accelerate-based training loop shared by every method."""

from .trainer import NonFiniteLossError, Trainer, TrainerState, TrainingConfig, latest_checkpoint

__all__ = ["Trainer", "TrainerState", "TrainingConfig", "NonFiniteLossError", "latest_checkpoint"]
