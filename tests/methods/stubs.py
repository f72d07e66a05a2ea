"""Helpers for the on-policy trainer tests: a verifier whose verdict the test chooses, prompt items
and a trainer factory (an untrained tiny model never solves a real task)."""

from __future__ import annotations

from typing import Callable

from dlmdistill.methods.onpolicy import prompt_items
from dlmdistill.tasks.base import Example, Task
from dlmdistill.training import TrainingConfig


class StubTask(Task):
    """Scores with ``verdict(example_index, completion)``; examples carry their index in ``meta``."""

    name = "stub"
    metric = "accuracy"

    def __init__(self, verdict: Callable[[int, str], float]):
        self.verdict = verdict

    def score(self, example: Example, completion: str) -> float:
        return float(self.verdict(example.meta["i"], completion))


def stub_examples(n: int = 4) -> list[Example]:
    return [Example(prompt=f"numbers: {i} {i + 1} 3 target: {2 * i + 4}\n", target=f"<answer>{i}+{i + 1}+3</answer>",
                    meta={"i": i}) for i in range(n)]


def items_for(examples, tok, gen_length: int, template: str | None = None):
    return prompt_items(examples, tok, gen_length=gen_length, teacher_template=template)


def training_config(out, **kw) -> TrainingConfig:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.0,
                warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1, progress_bar=False,
                report_to=["jsonl"], export_final=False, max_steps=2, max_grad_norm=1.0)
    base.update(kw)
    return TrainingConfig(**base)
