"""MATH500: competition mathematics (the 500-problem test subset of MATH used by PRM800K).

Records have a ``problem``, a LaTeX ``solution`` ending in ``\\boxed{...}`` and, in MATH500, the
final ``answer``. The gold answer is the ``answer`` field, or the last ``\\boxed{}`` of the
solution when there is none. The training response is ``<reasoning>`` the solution
``</reasoning><answer>`` the gold answer ``</answer>``.

Verifier: the predicted answer is the content of the last ``\\boxed{}`` inside the last
``<answer>`` block, else that block's content, else the last ``\\boxed{}`` of the completion (if
it has no block) or of what follows an empty block. A box cut off before its closing brace
counts up to the end of the block (``<answer>\\boxed{\\frac{1}{2}</answer>`` reads ``\\frac{1}{2}``).
Prediction and gold are each wrapped in ``\\boxed{}`` and compared with ``math_verify``
(``parse`` + ``verify``): mathematical equivalence, so ``\\frac{1}{2}`` equals ``0.5`` and
``x^2+1`` equals ``1+x^2``. Score 1.0 or 0.0.
"""

from __future__ import annotations

import threading
from typing import Any

from .base import Example, Task, after_answer, extract_answer, format_reasoning, last_boxed
from .io import DataError, read_records, require

__all__ = ["Math500Task", "last_boxed", "math_equal", "predicted_answer"]


def predicted_answer(completion: str) -> str | None:
    """The answer string of a completion (see the module docstring), or None."""
    tagged = extract_answer(completion)
    if tagged:
        boxed = last_boxed(tagged, allow_unclosed=True)
        return boxed if boxed is not None else tagged
    return last_boxed(after_answer(completion), allow_unclosed=True)


def math_equal(gold: str, predicted: str | None, timeout_seconds: int | None = 5) -> bool:
    """``math_verify`` equivalence of two answer strings, each wrapped in ``\\boxed{}``.

    ``math_verify`` bounds its work with ``SIGALRM``, which only the main thread may use; in
    other threads the timeout is dropped."""
    if not predicted:
        return False
    from math_verify import parse, verify

    if threading.current_thread() is not threading.main_thread():
        timeout_seconds = None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout_seconds)
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout_seconds)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout_seconds))


class Math500Task(Task):
    """MATH500 scored with ``math_verify``."""

    name = "math500"
    metric = "accuracy"

    def __init__(self, timeout_seconds: int | None = 5) -> None:
        self.timeout_seconds = timeout_seconds

    @staticmethod
    def prompt(problem: str) -> str:
        return (f"{problem}\n"
                "Think step by step inside <reasoning> </reasoning> tags, then give the final answer in "
                "simplest form, in LaTeX, inside <answer> </answer> tags.\n")

    def load(self, source: str | None = None, split: str = "test", limit: int | None = None,
             seed: int = 0) -> list[Example]:
        """Read MATH-format records from a file, a folder (``{split}.jsonl``) or a HF id
        (default ``HuggingFaceH4/MATH-500``)."""
        examples = []
        for record, where in read_records(source or "HuggingFaceH4/MATH-500", split)[:limit]:
            solution = require(record, "solution", where)
            answer = record.get("answer") or last_boxed(solution)
            if not answer:
                raise DataError(f"{where}: missing required field 'answer' (and no \\boxed{{}} in the solution)")
            examples.append(Example(prompt=self.prompt(require(record, "problem", where)),
                                    target=format_reasoning(solution.strip(), answer), references=[answer],
                                    meta={"answer": answer}, source=where))
        return examples

    def score(self, example: Example, completion: str) -> float:
        return 1.0 if math_equal(example.meta["answer"], predicted_answer(completion), self.timeout_seconds) else 0.0

    def details(self, example: Example, completion: str) -> dict[str, Any]:
        return {"predicted": predicted_answer(completion), "gold": example.meta["answer"]}
