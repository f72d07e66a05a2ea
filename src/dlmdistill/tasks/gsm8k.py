"""GSM8K: grade-school math word problems with a numeric answer.

Records have a ``question`` and an ``answer`` whose last line is ``#### N``; the lines before it
are a worked solution with calculator annotations such as ``<<16-3-4=9>>``. The training
response is ``<reasoning>`` the solution without the annotations ``</reasoning><answer>N</answer>``.

Verifier. The predicted number comes from the last ``<answer>`` block: the content of its last
``\\boxed{}`` if it has one (d1's prompt asks for ``<answer>\\boxed{...}</answer>``), else the
block itself. Without a non-empty ``<answer>`` block: the last ``\\boxed{}`` of the completion
(of what follows an empty block), else the last number there. From a box the *first* number
after its last ``=`` is read (the box holds the answer, and words after the number are units:
``\\boxed{12 \\text{ m}^2}`` is 12, ``\\boxed{x = 18}`` is 18); from unboxed text the *last*
number (``She makes 18 dollars.``). A box cut off before its ``}`` runs to the end of the block.

Numbers are read leniently: thousands separators (``6,277``, ``6{,}277``, ``6\\,277``), currency
signs, units and percent signs around the number are ignored; ``\\frac{7}{2}``, ``7/2`` and a
time ``2:30`` are one number each (3.5, 3.5 and 2.5 hours; ``2:00 pm`` is 2). The comparison is
numeric and exact (``18``, ``18.0`` and ``$18.00`` are equal). Score 1.0 or 0.0.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .base import Example, Task, after_answer, extract_answer, format_reasoning, last_boxed
from .io import DataError, read_records, require

_NUM = r"(?:\d+(?:\.\d+)?|\.\d+)"
#: One number: a LaTeX fraction, a time ``h:mm``, a fraction ``a/b`` or a decimal. A ``-`` is a
#: sign only when no digit precedes it (``3-4`` holds 3 and 4).
_NUMBER = re.compile(
    r"(?P<fsign>(?<![\d.])-)?\\[dt]?frac\s*\{\s*(?P<fnum>\d+)\s*\}\s*\{\s*(?P<fden>\d+)\s*\}"
    r"|(?<![\d.:/])(?P<hours>\d{1,2}):(?P<minutes>[0-5]\d)(?![\d:])"
    rf"|(?P<sign>(?<![\d.])-)?(?<![\d.:/])(?:(?P<num>\d+)/(?P<den>\d+)(?!\d|/|\.\d)|(?P<dec>{_NUM}))")
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\{,\}|\\,|\\ )(?=\d{3}(?!\d))")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _numbers(text: str) -> list[Fraction]:
    """Every number of ``text`` in order, exact (see :data:`_NUMBER`); thousands separators
    are dropped first."""
    values = []
    for m in _NUMBER.finditer(_THOUSANDS.sub("", text.replace("−", "-"))):
        if m["fnum"] is not None:
            value = Fraction(int(m["fnum"]), int(m["fden"])) if int(m["fden"]) else None
            negative = m["fsign"] is not None
        elif m["hours"] is not None:
            value, negative = Fraction(int(m["hours"])) + Fraction(int(m["minutes"]), 60), False
        elif m["num"] is not None:
            value = Fraction(int(m["num"]), int(m["den"])) if int(m["den"]) else None
            negative = m["sign"] is not None
        else:
            value, negative = Fraction(Decimal(m["dec"])), m["sign"] is not None
        if value is not None:
            values.append(-value if negative else value)
    return values


def canonical(value: Fraction) -> str:
    """A number as text: ``18``, ``1234.5``, ``-3``; a fraction without a finite decimal form
    as ``a/b`` (``1/3``)."""
    if value.denominator == 1:
        return str(value.numerator)
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(decimal) == value:
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def last_number(text: str) -> str | None:
    """The last number in ``text`` in canonical form (:func:`canonical`), or None."""
    numbers = _numbers(text)
    return canonical(numbers[-1]) if numbers else None


def normalize_number(text: str) -> str | None:
    """Canonical form of the last number in ``text``: ``"$1,234.50"`` -> ``"1234.5"``,
    ``"18.0"`` -> ``"18"``, ``"-3 apples"`` -> ``"-3"``; None if there is no number."""
    return last_number(text)


def boxed_number(content: str) -> str | None:
    """The number a box holds: the first number after its last ``=`` (``x = 18`` -> 18,
    ``12 \\text{ m}^2`` -> 12), in canonical form; None if there is none."""
    numbers = _numbers(content.rpartition("=")[2])
    return canonical(numbers[0]) if numbers else None


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
    """The normalised answer of a completion (see the module docstring), or None."""
    tagged = extract_answer(completion)
    text = tagged if tagged else after_answer(completion)
    boxed = last_boxed(text, allow_unclosed=True)
    if boxed is not None:
        number = boxed_number(boxed)
        if number is not None:
            return number
    return last_number(text)


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
