"""The configuration dataclasses, defined apart from the code that uses them.

Nothing in this package imports torch or transformers at import time, so that ``dlmdistill COMMAND
--help`` can list every option at once (a ``validate()`` may import them: it runs only when a
configuration is loaded for a run). Each class is re-exported where it was defined before, beside its
implementation: ``dlmdistill.sampling.GenerationConfig``, ``dlmdistill.data.DataConfig``,
``dlmdistill.models.loading.ModelConfig``, ``dlmdistill.training.trainer.TrainingConfig``,
``dlmdistill.methods.common.TrainEvalConfig``, ``dlmdistill.methods.sft.SFTConfig`` (and every other
method's ``*Config`` / ``*RunConfig``), ``dlmdistill.evaluation.EvalRunConfig``.

The YAML recipes are the repository's top-level ``configs/`` folder; the loader (YAML, command-line
overrides, help) is ``dlmdistill.config``.
"""

from .commands import EvalRunConfig, GenerateRunConfig
from .data import DataConfig
from .generation import GenerationConfig
from .methods import (ARSFTConfig, ARSFTRunConfig, DiffuGRPOConfig, DiffuGRPORunConfig, DOPSDConfig, DOPSDRunConfig,
                      KDConfig, KDRunConfig, SelfFusionConfig, SelfFusionRunConfig, SeqKDConfig, SeqKDRunConfig,
                      SFTConfig, SFTRunConfig, TrainEvalConfig, run_config_class)
from .model import ModelConfig
from .training import TrainingConfig

__all__ = ["ARSFTConfig", "ARSFTRunConfig", "DataConfig", "DiffuGRPOConfig", "DiffuGRPORunConfig", "DOPSDConfig",
           "DOPSDRunConfig", "EvalRunConfig", "GenerateRunConfig", "GenerationConfig", "KDConfig", "KDRunConfig",
           "ModelConfig", "SelfFusionConfig", "SelfFusionRunConfig", "SeqKDConfig", "SeqKDRunConfig", "SFTConfig",
           "SFTRunConfig", "TrainEvalConfig", "TrainingConfig", "run_config_class"]
