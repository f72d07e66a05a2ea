"""GSM8K: grade-school math word problems with a numeric answer.

Records have a ``question`` and an ``answer`` whose last line is ``#### N``; the lines before it
are a worked solution with calculator annotations such as ``<<16-3-4=9>>``. The training
response is ``<reasoning>`` the solution without the annotations ``</reasoning><answer>N</answer>``.

Verifier: the answer is the last number inside the last ``<answer>`` block, or, if there is no
such block, the last number of the completion. Numbers are normalised before comparing:
thousands separators (``1,000``), currency signs, units and percent signs around the number
are ignored, and the comparison is numeric and exact (``18``, ``18.0`` and ``$18.00`` are
equal). Score 1.0 or 0.0.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .base import Example, Task, extract_answer, format_reasoning
from .io import DataError, read_records, require

_NUMBER = re.compile(r"(?<!\d)-?(?:\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def last_number(text: str) -> str | None:
    """The last number in ``text`` as written (commas dropped), or None. A ``-`` counts as a sign
    only when no digit precedes it (``3-4`` holds 3 and 4)."""
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
    return numbers[-1] if numbers else None


def normalize_number(text: str) -> str | None:
    """Canonical form of the last number in ``text``: ``"$1,234.50"`` -> ``"1234.5"``,
    ``"18.0"`` -> ``"18"``, ``"-3 apples"`` -> ``"-3"``; None if there is no number."""
    number = last_number(text)
    if number is None:
        return None
    canonical = format(Decimal(number).normalize(), "f")
    return "0" if canonical == "-0" else canonical


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact numeric equality of two canonical numbers (None equals nothing)."""
    return a is not None and b is not None and Fraction(a) == Fraction(b)


def split_solution(answer: str, where: str) -> tuple[str, str]:
    """``(reasoning, final number)`` of a GSM8K answer field."""
    reasoning, sep, final = answer.rpartition("####")
    number = normalize_number(final)
    if not sep or number is None:
        raise DataError(f"{where}: field 'answer' has no final '#### <number>' line")
    return _CALCULATOR.sub("", reasoning).strip(), number


def predicted_number(completion: str) -> str | None:
    """The normalised answer of a completion: the last number of the last ``<answer>`` block,
    else the last number of the whole text."""
    tagged = extract_answer(completion)
    return normalize_number(completion if tagged is None else tagged)


class GSM8KTask(Task):
    """GSM8K with exact numeric matching of the final answer."""

    name = "gsm8k"
    metric = "accuracy"

    @staticmethod
    def prompt(question: str) -> str:
        return (f"{question}\n"
                "Think step by step inside <reasoning> </reasoning> tags, then give the final answer, "
                "a number only, inside <answer> </answer> tags.\n")

    def load(self, source: str | None = None, split: str = "test", limit: int | None = None,
             seed: int = 0) -> list[Example]:
        """Read GSM8K records from a file, a folder (``{split}.jsonl``) or a HF id (default
        ``openai/gsm8k:main``)."""
        examples = []
        for record, where in read_records(source or "openai/gsm8k:main", split)[:limit]:
            reasoning, number = split_solution(require(record, "answer", where), where)
            examples.append(Example(prompt=self.prompt(require(record, "question", where)),
                                    target=format_reasoning(reasoning, number), references=[number],
                                    meta={"answer": number}, source=where))
        return examples

    def score(self, example: Example, completion: str) -> float:
        return 1.0 if numbers_equal(predicted_number(completion), example.meta["answer"]) else 0.0

    def details(self, example: Example, completion: str) -> dict[str, Any]:
        return {"predicted": predicted_number(completion), "gold": example.meta["answer"]}
