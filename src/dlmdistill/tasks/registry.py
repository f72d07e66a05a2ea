"""Task lookup by name: ``get_task("countdown", style="d1")``."""

from __future__ import annotations

from .base import Task
from .countdown import CountdownTask
from .gsm8k import GSM8KTask
from .instruct import InstructTask
from .math500 import Math500Task
from .sudoku import SudokuTask
from .text import TextTask

TASKS: dict[str, type[Task]] = {
    "instruct": InstructTask,
    "countdown": CountdownTask,
    "sudoku": SudokuTask,
    "gsm8k": GSM8KTask,
    "math500": Math500Task,
    "text": TextTask,
}
ALIASES: dict[str, str] = {"dolly": "instruct", "rouge": "instruct"}


def task_names() -> list[str]:
    """Valid task names, aliases included."""
    return sorted([*TASKS, *ALIASES])


def get_task(name: str, **kwargs: object) -> Task:
    """A task instance by name or alias; ``kwargs`` go to the task's constructor."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(task_names())}")
    return TASKS[key](**kwargs)
