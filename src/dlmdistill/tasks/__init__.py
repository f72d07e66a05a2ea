"""Tasks: data loading, prompts, training targets, verifiers and metrics.

``get_task(name)`` returns a :class:`Task`; ``task.load(...)`` gives :class:`Example` items
whose ``prompt`` and ``target`` feed training and whose completions ``task.score`` grades.
"""

from .base import Example, PromptStyle, Task, extract_answer, format_reasoning
from .countdown import CountdownTask, check_answer, evaluate_expression, generate_countdown, solve_countdown
from .gsm8k import GSM8KTask, normalize_number
from .instruct import InstructTask, build_prompt, rouge_l
from .io import DataError, read_records, require
from .math500 import Math500Task, math_equal
from .registry import TASKS, get_task, task_names
from .sudoku import SudokuTask, all_grids, generate_sudoku, is_valid_grid

__all__ = [
    "DataError", "Example", "PromptStyle", "Task", "TASKS",
    "CountdownTask", "GSM8KTask", "InstructTask", "Math500Task", "SudokuTask",
    "all_grids", "build_prompt", "check_answer", "evaluate_expression", "extract_answer", "format_reasoning",
    "generate_countdown", "generate_sudoku", "get_task", "is_valid_grid", "math_equal", "normalize_number",
    "read_records", "require", "rouge_l", "solve_countdown", "task_names",
]
