"""What the training loop's parts share: its position (``TrainerState``) and the error of a non-finite
update."""

from __future__ import annotations

from dataclasses import dataclass


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite; the message names the step
    and the last checkpoint, which is intact (a checkpoint with non-finite weights is never written)."""


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in the current epoch
    skipped_steps: int = 0
    optimizer_steps: int = 0  # gradient updates (diffu-GRPO takes mu of them per global step)
