"""Regression fixtures: completions in the response format of LLaDA-8B-Instruct under d1's prompts
(reasoning prefilled, ``</reasoning>\\n<answer>\\n\\boxed{...}\\n</answer>``), written by hand with
the broken forms real generations take (missing or stray tags, unclosed boxes, units, thousands
separators, fractions, LaTeX operators, numbers in the reasoning). Each line carries the verdict
we expect, decided by hand (``correct``, or ``score`` for Sudoku), and, for reference, the verdict
of d1's evaluation parser (``d1``, not checked here; see docs/tasks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlmdistill.tasks.base import Example
from dlmdistill.tasks.countdown import CountdownTask
from dlmdistill.tasks.gsm8k import GSM8KTask, predicted_number
from dlmdistill.tasks.math500 import Math500Task
from dlmdistill.tasks.sudoku import SudokuTask

FIXTURES = Path(__file__).parent / "fixtures"


def load(task: str) -> list[dict]:
    rows = [json.loads(line) for line in (FIXTURES / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    return rows


def params(task: str):
    return [pytest.param(r, id=r["id"]) for r in load(task)]


@pytest.mark.parametrize("row", params("countdown"))
def test_countdown_fixture(row):
    task = CountdownTask()
    ex = Example(prompt="", meta={"numbers": row["numbers"], "target": row["target"]})
    assert task.score(ex, row["completion"]) == (1.0 if row["correct"] else 0.0), task.details(ex, row["completion"])


@pytest.mark.parametrize("row", params("gsm8k"))
def test_gsm8k_fixture(row):
    ex = Example(prompt="", meta={"answer": row["answer"]})
    assert predicted_number(row["completion"]) == row["predicted"]
    assert GSM8KTask().score(ex, row["completion"]) == (1.0 if row["correct"] else 0.0)


@pytest.mark.parametrize("row", params("math500"))
def test_math500_fixture(row):
    ex = Example(prompt="", meta={"answer": row["answer"]})
    task = Math500Task()
    assert task.score(ex, row["completion"]) == (1.0 if row["correct"] else 0.0), task.details(ex, row["completion"])


@pytest.mark.parametrize("row", params("sudoku"))
def test_sudoku_fixture(row):
    task = SudokuTask()
    ex = Example(prompt="", meta={"puzzle": row["puzzle"], "solution": row["solution"]})
    assert task.score(ex, row["completion"]) == pytest.approx(row["score"])
    assert task.details(ex, row["completion"])["solved"] is row["solved"]


def test_fixtures_cover_the_documented_forms():
    """Every task has fixtures that its verifier accepts and that it rejects, and some on which
    d1's parser decides differently (the table in docs/tasks.md)."""
    for task in ("countdown", "gsm8k", "math500"):
        rows = load(task)
        assert {r["correct"] for r in rows} == {True, False}
        assert any(r["correct"] != r["d1"] for r in rows)
    sudoku = load("sudoku")
    assert any(r["score"] != r["d1"] for r in sudoku) and any(0 < r["score"] < 1 for r in sudoku)
