import pytest

import dlmdistill.tasks as tasks
from dlmdistill.tasks import (CountdownTask, GSM8KTask, InstructTask, Math500Task, SudokuTask, get_task,
                              task_names)


@pytest.mark.parametrize("name, cls", [
    ("instruct", InstructTask), ("dolly", InstructTask), ("rouge", InstructTask), ("countdown", CountdownTask),
    ("sudoku", SudokuTask), ("gsm8k", GSM8KTask), ("math500", Math500Task), ("Countdown", CountdownTask),
])
def test_get_task(name, cls):
    task = get_task(name)
    assert type(task) is cls and task.name == cls.name


def test_kwargs_reach_the_constructor():
    assert get_task("countdown", style="d1").style == "d1"
    assert get_task("sudoku", min_blanks=6).min_blanks == 6


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_task("gsm9k")
    for name in task_names():
        assert name in str(err.value)


def test_metrics_and_thresholds():
    assert get_task("instruct").metric == "rouge_l"
    assert {get_task(n).metric for n in ("countdown", "sudoku", "gsm8k", "math500")} == {"accuracy"}
    assert get_task("sudoku").is_correct(0.25, threshold=0.25) and not get_task("sudoku").is_correct(0.99)


def test_public_names_exist():
    for name in tasks.__all__:
        assert hasattr(tasks, name), name
