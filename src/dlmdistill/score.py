"""Re-score existing generations without a model: ``dlmdistill score --task T FILE``.

Two file formats are read:

* our own evaluation output: ``generations.jsonl`` written by ``dlmdistill evaluate`` (one row
  per item, step count and seed: ``prompt``, ``completion``, ``references``, ``steps``, ``seed``,
  ``index``, and the score given when it was written), or the folder that holds it;
* d1's generation file (``eval/eval.py`` of d1): a JSON object with a top-level ``generations``
  list of ``{"question", "generations", "ground_truth"}`` items, the completion decoded with its
  special tokens (it is cut at the first end token, as our decoder does).

The gold data of an item comes from the file: GSM8K and MATH500 from ``references[0]`` /
``ground_truth``; Countdown from explicit ``numbers``/``target`` fields, d1's ``ground_truth``
``[numbers, target]``, or the prompt (``numbers: 30 100 93 target: 23``, our d1-style prompt,
d1's ``Numbers: [30, 100, 93] Target: 23``); Sudoku from a ``puzzle`` field or the 16-digit
puzzle in the prompt (or the four grid rows of our d1-style prompt) and the solution in
``references[0]`` / ``ground_truth``.

Every completion is scored by the task's verifier (:mod:`dlmdistill.tasks`). The summary (the
task's metrics over all items, and per step count and seed for our files) is printed, and one
verdict per item is written as JSONL next to the input (``<name>.scored.jsonl``) or to ``out``.
An existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from .tasks.base import Example, Task, clean_completion
from .tasks.io import DataError, read_jsonl
from .tasks.registry import get_task

#: Tasks ``score`` knows how to read gold answers for.
SCORABLE_TASKS = ("countdown", "gsm8k", "math500", "sudoku")


class ScoreError(DataError):
    """The generations file cannot be scored; the message names the file (and item)."""


@dataclass
class Item:
    """One generation to score: the example (gold data), the completion, and where it came from."""

    example: Example
    completion: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)  # steps, seed, index, previous score


# --------------------------------------------------------------------------------------------
# reading


def generations_file(path: str | Path) -> Path:
    """The file to read: ``path`` itself, or ``generations.jsonl`` inside a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "generations.jsonl").is_file():
            raise ScoreError(f"{p}: a folder without generations.jsonl (give the file of generations)")
        return p / "generations.jsonl"
    if not p.exists():
        raise ScoreError(f"{p}: no such file or folder")
    return p


def read_items(path: Path, task: Task) -> tuple[list[Item], str]:
    """The items of a generations file and its format (``"d1"`` or ``"dlmdistill"``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ScoreError(f"{path}: not UTF-8 text (expected JSON or JSONL generations)") from None
    except OSError as e:
        raise ScoreError(f"{path}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise ScoreError(f"{path}: the file is empty")
    data = _whole_json(text)
    if data is not None:
        if isinstance(data, dict) and isinstance(data.get("generations"), list):
            items = [_d1_item(row, f"{path}:generations[{i}]", task) for i, row in enumerate(data["generations"])]
            fmt = "d1"
        elif isinstance(data, dict) and "completion" in data:  # a JSONL file with a single row
            items, fmt = _own_items(path, task), "dlmdistill"
        else:
            raise ScoreError(f"{path}: a JSON document without a top-level 'generations' list (d1's format); "
                             "expected d1's generation JSON or our generations.jsonl")
    else:
        items, fmt = _own_items(path, task), "dlmdistill"
    if not items:
        raise ScoreError(f"{path}: no generations to score")
    return items, fmt


def _whole_json(text: str) -> Any:
    """The file as one JSON document, or None if it is not one (JSONL with several lines)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _own_items(path: Path, task: Task) -> list[Item]:
    items = []
    for row, where in read_jsonl(path):
        completion = row.get("completion")
        if not isinstance(completion, str):
            raise ScoreError(f"{where}: missing text field 'completion' (fields present: {', '.join(sorted(row))})")
        extra = {k: row[k] for k in ("steps", "seed", "index") if k in row}
        if "score" in row:
            extra["previous_score"] = row["score"]
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        items.append(Item(_example(task, {**meta, **row}, where, d1=False), clean_completion(completion), where, extra))
    return items


def _d1_item(row: Any, where: str, task: Task) -> Item:
    if not isinstance(row, dict):
        raise ScoreError(f"{where}: expected an object with 'question', 'generations', 'ground_truth'")
    completion = row.get("generations")
    if not isinstance(completion, str):
        raise ScoreError(f"{where}: missing text field 'generations' (fields present: {', '.join(sorted(row))})")
    return Item(_example(task, row, where, d1=True), clean_completion(completion), where)


def _gold(row: dict, where: str, d1: bool) -> Any:
    key = "ground_truth" if d1 else "references"
    value = row.get(key)
    if not d1:
        if not isinstance(value, list) or not value:
            state = "absent" if value is None else "empty"
            raise ScoreError(f"{where}: missing gold answer: field 'references' is {state}")
        value = value[0]
    if value is None:
        raise ScoreError(f"{where}: missing required field {key!r}")
    return value


def _prompt(row: dict, d1: bool) -> str:
    return str(row.get("question" if d1 else "prompt") or "")


def _example(task: Task, row: dict, where: str, d1: bool) -> Example:
    """The example of a row: the gold data the task's verifier needs."""
    if task.name == "gsm8k":
        from .tasks.gsm8k import canonical, normalize_number

        gold = _gold(row, where, d1)
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            number = canonical(Fraction(str(gold)))
        else:
            number = normalize_number(str(gold))
        if number is None:
            raise ScoreError(f"{where}: the gold answer {gold!r} is not a number")
        return Example(prompt=_prompt(row, d1), references=[number], meta={"answer": number}, source=where)
    if task.name == "math500":
        gold = str(_gold(row, where, d1)).strip()
        if not gold:
            raise ScoreError(f"{where}: the gold answer is empty")
        return Example(prompt=_prompt(row, d1), references=[gold], meta={"answer": gold}, source=where)
    if task.name == "countdown":
        numbers, target = _countdown_gold(row, where, d1)
        return Example(prompt=_prompt(row, d1), meta={"numbers": numbers, "target": target}, source=where)
    if task.name == "sudoku":
        from .tasks.sudoku import is_valid_grid, respects_givens

        solution = str(_gold(row, where, d1)).strip()
        puzzle = str(row["puzzle"]).strip() if row.get("puzzle") is not None else _sudoku_puzzle(_prompt(row, d1))
        if puzzle is None:
            raise ScoreError(f"{where}: no 16-digit Sudoku puzzle in the prompt and no 'puzzle' field")
        if not (is_valid_grid(solution) and respects_givens(puzzle, solution)):
            raise ScoreError(f"{where}: the solution {solution!r} is not a valid completion of the puzzle {puzzle!r}")
        return Example(prompt=_prompt(row, d1), references=[solution], meta={"puzzle": puzzle, "solution": solution},
                       source=where)
    raise ScoreError(f"cannot score task {task.name!r}; valid: {', '.join(SCORABLE_TASKS)}")


_CD_COMPACT = re.compile(r"numbers:\s*([\d\s,]+?)\s*target:\s*(-?\d+)", re.IGNORECASE)
_CD_LIST = re.compile(r"numbers:\s*\[([\d\s,]+)\]\s*target:\s*(-?\d+)", re.IGNORECASE)
_CD_SENTENCE = re.compile(r"using the numbers\s+([\d\s,]+?),?\s+write an arithmetic expression that equals\s+(-?\d+)",
                          re.IGNORECASE)


def _countdown_gold(row: dict, where: str, d1: bool) -> tuple[list[int], int]:
    numbers, target = row.get("numbers"), row.get("target")
    if d1 and numbers is None and isinstance(row.get("ground_truth"), list) and len(row["ground_truth"]) == 2:
        numbers, target = row["ground_truth"]
    if numbers is None or target is None:
        prompt = _prompt(row, d1)
        match = _CD_LIST.search(prompt) or _CD_COMPACT.search(prompt) or _CD_SENTENCE.search(prompt)
        if match is None:
            what = "'ground_truth' [numbers, target]" if d1 else "'numbers' and 'target' fields"
            raise ScoreError(f"{where}: no Countdown numbers and target: neither {what} nor a recognised prompt")
        numbers, target = re.findall(r"\d+", match[1]), match[2]
    try:
        return [int(n) for n in numbers], int(target)
    except (TypeError, ValueError):
        raise ScoreError(f"{where}: Countdown numbers and target must be integers, "
                         f"got {numbers!r} and {target!r}") from None


_GRID_16 = re.compile(r"(?<!\d)[0-4]{16}(?!\d)")
_GRID_ROWS = re.compile(r"(?<!\d)([0-4]{4})\s*\n\s*([0-4]{4})\s*\n\s*([0-4]{4})\s*\n\s*([0-4]{4})(?!\d)")


def _sudoku_puzzle(prompt: str) -> str | None:
    """The puzzle in a prompt: a 16-digit string (``sudoku: 3102...``, d1's ``Sudoku puzzle:
    3102...``) or four rows of four digits (our d1-style prompt)."""
    match = _GRID_16.search(prompt)
    if match:
        return match[0]
    match = _GRID_ROWS.search(prompt)
    return "".join(match.groups()) if match else None


# --------------------------------------------------------------------------------------------
# scoring


def default_output(path: Path) -> Path:
    """``runs/x/eval/gsm8k/generations.jsonl`` -> ``.../generations.scored.jsonl``."""
    return path.with_name(f"{path.stem}.scored.jsonl")


def score_generations(path: str | Path, task: str, out: str | Path | None = None,
                      task_kwargs: dict | None = None) -> dict[str, Any]:
    """Score every generation of ``path`` (see the module docstring) and write the verdicts.

    Returns ``{"task", "format", "n", "metrics", "groups", "changed", "verdicts"}``: the task's
    metrics over all items; per ``"steps=S seed=X"`` group for our own files; how many verdicts
    differ from the score stored in the file (our files; None for d1's); the verdicts path.
    Refuses (:class:`ScoreError`) to overwrite an existing file.
    """
    if task not in SCORABLE_TASKS:
        raise ScoreError(f"cannot score task {task!r}; valid: {', '.join(SCORABLE_TASKS)}")
    source = generations_file(path)
    out_path = Path(out).expanduser() if out is not None else default_output(source)
    if out_path.exists():
        raise ScoreError(f"{out_path} already exists; not overwriting it (pass --out with a new file name)")
    t = get_task(task, **(task_kwargs or {}))
    items, fmt = read_items(source, t)
    rows, groups = [], {}
    changed = 0
    for i, item in enumerate(items):
        value = float(t.score(item.example, item.completion))
        correct = t.is_correct(value)
        row = {"item": i, "source": item.source, **{k: v for k, v in item.extra.items() if k != "previous_score"},
               "score": value, "correct": correct, **t.details(item.example, item.completion)}
        if "previous_score" in item.extra:
            previous = item.extra["previous_score"]
            row["previous_score"] = previous
            if isinstance(previous, (int, float)) and t.is_correct(float(previous)) != correct:
                changed += 1
        rows.append(row)
        if "steps" in item.extra or "seed" in item.extra:
            key = f"steps={item.extra.get('steps')} seed={item.extra.get('seed')}"
            groups.setdefault(key, []).append(row)
    metrics = t.aggregate([r["score"] for r in rows], rows)
    group_metrics = {k: t.aggregate([r["score"] for r in g], g) for k, g in groups.items()} if len(groups) > 1 else {}
    try:
        with open(out_path, "x", encoding="utf-8") as f:  # exclusive: never replaces a file
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except FileExistsError:
        raise ScoreError(f"{out_path} already exists; not overwriting it (pass --out with a new file name)") from None
    except OSError as e:
        raise ScoreError(f"{out_path}: cannot write the verdicts ({e.strerror or e})") from None
    return {"task": task, "format": fmt, "source": str(source), "n": len(rows), "metrics": metrics,
            "groups": group_metrics, "changed": changed if fmt == "dlmdistill" else None, "verdicts": str(out_path)}


def format_summary(result: dict[str, Any]) -> str:
    """The printed summary of :func:`score_generations`."""
    m = result["metrics"]
    lines = [f"{result['task']}: {result['n']} generations from {result['source']} ({result['format']} format)"]
    correct = round(m["accuracy"] * result["n"] / 100)
    lines.append(f"accuracy {m['accuracy']:.2f}% ({correct}/{result['n']}), mean reward {m['mean_reward']:.4f}")
    for key, gm in result["groups"].items():
        lines.append(f"  {key}: accuracy {gm['accuracy']:.2f}%, mean reward {gm['mean_reward']:.4f}")
    if result["changed"] is not None:
        lines.append(f"verdicts that differ from the scores stored in the file: {result['changed']}")
    lines.append(f"verdicts: {result['verdicts']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlmdistill score", description="re-score existing generations (our "
                                "eval/ output or d1's generation JSON) without a model")
    p.add_argument("--task", required=True, choices=SCORABLE_TASKS, help="the task whose verifier scores them")
    p.add_argument("file", help="generations.jsonl (or its folder) written by 'dlmdistill evaluate', or d1's "
                   "*_generations.json")
    p.add_argument("--out", default=None, help="where to write the per-item verdicts (JSONL; must not exist; "
                   "default: <file>.scored.jsonl beside the input)")
    a = p.parse_args(argv)
    try:
        result = score_generations(a.file, a.task, a.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0
