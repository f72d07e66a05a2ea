"""What every recipe's configuration shares: the evaluation-during-training section and the run
configuration of a method (sections ``model``, ``data``, ``training``, ``eval``, ``method``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ...config import field
from ..data import DataConfig
from ..generation import GenerationConfig
from ..model import ModelConfig
from ..training import TrainingConfig


#: What a run does when its task has no evaluation data of its own and ``data.eval_source`` is not set.
WHEN_EVAL_MISSING = ("holdout", "skip", "error")


@dataclass
class TrainEvalConfig:
    enabled: bool = field(True, help="evaluate the task metric during/after training")
    limit: int | None = field(200, help="evaluation items (a subset of data.eval_*)")
    seed: int = field(0, help="sampling seed for evaluation")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(gen_length=64, steps=32),
                                         help="sampler settings used for evaluation during training")
    when_missing: Literal["holdout", "skip", "error"] = field(
        "holdout", help="when data.eval_source is not set and the task has no evaluation data of its own (the "
        "instruct task: your own file): 'holdout' evaluates on a random slice of the training records, which are "
        "then not trained on (holdout_size; the log and data_stats.json give the sizes), 'skip' trains without "
        "evaluation (one notice), 'error' stops")
    holdout_size: float = field(0.1, help="size of that held-out slice: a fraction of the training records "
                                "(below 1) or a number of records (1 or more); at most eval.limit records")

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or null), got {self.limit}")
        if self.when_missing not in WHEN_EVAL_MISSING:
            raise ValueError(f"when_missing must be one of {', '.join(WHEN_EVAL_MISSING)}, got {self.when_missing!r}")
        size = self.holdout_size
        if not (0 < size < 1 or (size >= 1 and float(size).is_integer())):
            raise ValueError(f"holdout_size must be a fraction in (0, 1) or a whole number of records >= 1, "
                             f"got {size}")


def run_config_class(name: str, method_cls: type, doc: str = "") -> type:
    """The configuration tree of a recipe: model, data, training, eval and the method's own section."""
    cls = dataclasses.make_dataclass(name, [
        ("model", ModelConfig, field(default_factory=ModelConfig, help="backbone and how to load it")),
        ("data", DataConfig, field(default_factory=DataConfig, help="task and data")),
        ("training", TrainingConfig, field(default_factory=TrainingConfig, help="optimisation, logging, checkpoints")),
        ("eval", TrainEvalConfig, field(default_factory=TrainEvalConfig, help="evaluation during training")),
        ("method", method_cls, field(default_factory=method_cls, help=f"{method_cls.__name__} options")),
    ])
    cls.__doc__ = doc or f"Configuration of a {name} run."
    return cls
