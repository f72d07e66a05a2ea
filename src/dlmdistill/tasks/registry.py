"""Task lookup by name: ``get_task("countdown", style="d1")``."""

from __future__ import annotations

import inspect

from ..errors import UserError
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
ALIASES: dict[str, str] = {"dolly": "instruct", "rouge": "instruct", "chat": "instruct", "auto": "instruct"}


def task_names() -> list[str]:
    """Valid task names, aliases included."""
    return sorted([*TASKS, *ALIASES])


def task_options(name: str) -> list[str]:
    """The keyword options (``data.task_kwargs``) task ``name`` accepts."""
    cls = TASKS[_key(name)]
    params = inspect.signature(cls).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _key(name: str) -> str:
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in TASKS:
        raise UserError(f"unknown task {name!r}; valid names: {', '.join(task_names())}")
    return key


def get_task(name: str, **kwargs: object) -> Task:
    """A task instance by name or alias; ``kwargs`` go to the task's constructor. An unknown name, an
    unknown option or a value the task rejects is a :class:`~dlmdistill.errors.UserError`."""
    cls = TASKS[_key(name)]
    options = task_options(name)
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        valid = ", ".join(options) or "none"
        raise UserError(f"task {name!r} has no option {', '.join(repr(k) for k in unknown)} (data.task_kwargs); "
                        f"its options: {valid}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"task {name!r}, data.task_kwargs {kwargs}: {e}") from None
