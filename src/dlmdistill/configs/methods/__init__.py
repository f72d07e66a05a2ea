"""The configurations of the training recipes, one module per method next to the name of its recipe
(``configs/methods/dopsd.py`` for ``methods/dopsd.py``): each method's own section (``SFTConfig``, ...)
and its run configuration (``SFTRunConfig``, ...: sections ``model``, ``data``, ``training``, ``eval``,
``method``; ``run.py``). The recipes re-export them; ``dlmdistill.methods.config_class(name)`` returns a
method's run configuration without importing its recipe (which imports torch)."""

from .diffu_grpo import DiffuGRPOConfig, DiffuGRPORunConfig
from .dopsd import (OFFICIAL_DOPSD, OFFICIAL_DOPSD_LORA, OFFICIAL_DOPSD_SUDOKU, OFFICIAL_DOPSD_TRAINING, ClipModeSetting,
                    DOPSDConfig, DOPSDRunConfig)
from .kd import ARSFTConfig, ARSFTRunConfig, KDConfig, KDRunConfig, SeqKDConfig, SeqKDRunConfig
from .run import WHEN_EVAL_MISSING, TrainEvalConfig, run_config_class
from .selffusion import SelfFusionConfig, SelfFusionRunConfig
from .sft import SFTConfig, SFTRunConfig

__all__ = ["ARSFTConfig", "ARSFTRunConfig", "ClipModeSetting", "DiffuGRPOConfig", "DiffuGRPORunConfig", "DOPSDConfig",
           "DOPSDRunConfig", "KDConfig", "KDRunConfig", "OFFICIAL_DOPSD", "OFFICIAL_DOPSD_LORA", "OFFICIAL_DOPSD_SUDOKU",
           "OFFICIAL_DOPSD_TRAINING", "SelfFusionConfig", "SelfFusionRunConfig", "SeqKDConfig", "SeqKDRunConfig",
           "SFTConfig", "SFTRunConfig", "TrainEvalConfig", "WHEN_EVAL_MISSING", "run_config_class"]
