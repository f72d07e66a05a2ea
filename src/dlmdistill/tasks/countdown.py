"""Countdown with three numbers: combine the given numbers into an expression that hits a target.

A puzzle is a list of numbers (three by default) and a positive integer target, e.g. numbers
30, 100, 93 and target 23; ``(30+93)-100`` solves it. This is the planning task of d1 and
d-OPSD (their test set: 256 puzzles, numbers and targets in 1..100).

Verifier. The answer is the content of the last ``<answer>`` block; inside it, the content of
its last ``\\boxed{}`` if there is one (d1's prompt asks for ``<answer>\\boxed{a + b * c}</answer>``;
a box cut off before its ``}`` runs to the end of the block). Without a non-empty ``<answer>``
block: the last ``\\boxed{}`` of the completion (of what follows an empty block), else the last
non-empty line once the tags are removed (so an expression after a stray ``</answer>`` is read,
not a final ``</``). If the answer spans several lines and is not an expression as a whole, its
last line is tried. An ``expression = target`` form is accepted as the expression.

LaTeX and typography are read as arithmetic: ``\\times``, ``\\cdot``, ``\\ast``, ``×``, ``·`` as
``*``; ``\\div``, ``÷`` as ``/``; ``\\frac{a}{b}`` as ``(a)/(b)``; ``−``, ``–`` as ``-``; braces as
parentheses; ``$``, ``\\left``, ``\\right``, ``\\(``, ``\\)``, ``\\[``, ``\\]`` and a final full stop are dropped.

The expression is parsed with :mod:`ast` and evaluated by a whitelist evaluator, never ``eval``:
only decimal integer literals, binary ``+ - * /``, unary minus and parentheses are allowed;
names, calls, attributes, ``**``, ``//``, ``%``, floats, comparisons and everything else are
rejected, and so is any ``#`` (``ast.parse`` would silently drop a Python comment). Arithmetic
is exact (:class:`fractions.Fraction`), so ``/`` is true division and division by zero is a
wrong answer. The literals must be exactly the given numbers as a multiset (each used once, none
missing, none added) and the value must equal the target. Score 1.0 or 0.0; ``details`` says why.

Data. Training puzzles come from :func:`generate_countdown`: random numbers combined by a random
expression whose intermediate results are positive integers; the target is its value. The
training response is a short trace of the steps and the expression, e.g.
``<reasoning>30+93=123, 123-100=23</reasoning><answer>(30+93)-100</answer>``. Test puzzles come
from a file (d1's ``countdown_cd3_test.jsonl``: ``{"input": "30,100,93", "output": "23"}``) or
are generated from a separate seed; training data never contains a held-out puzzle (same
multiset of numbers and same target). A puzzle read from a file is solved (for its training
target) by a search bounded to :data:`SOLVE_BUDGET` combinations, and a test puzzle with more
than four numbers is not solved at all, so 5- and 6-number files load in bounded time; a puzzle
without a solution has no training target (and no reference expression) but is scored normally.

Why one file of this length: the task's safe evaluator, verifier, solvers and generator belong
together (the verifier's rules and the generator's targets must agree); the task class itself is short.
"""

from __future__ import annotations

import ast
import random
import re
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import permutations
from typing import Any

from .base import (Example, PromptStyle, PuzzleTask, after_answer, check_style, extract_answer, format_reasoning,
                   last_boxed, last_line)
from .io import DataError, first_field, read_records

#: Longest answer the verifier parses; longer ones are wrong (bounds the parser's work).
MAX_EXPRESSION_CHARS = 200

#: Longest answer text read at all (before LaTeX is rewritten); longer ones are wrong.
MAX_ANSWER_CHARS = 4 * MAX_EXPRESSION_CHARS

_BINARY_OPS: dict[type[ast.operator], str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_UNICODE_OPS = str.maketrans({"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "{": "(", "}": ")",
                              "$": " "})
_LATEX_OPS = (("\\times", "*"), ("\\cdot", "*"), ("\\ast", "*"), ("\\div", "/"), ("\\left", ""),
              ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\!", ""),
              ("\\right", ""), ("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "))
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


# --------------------------------------------------------------------------------------------
# safe evaluation


class ExpressionError(ValueError):
    """The text is not an allowed arithmetic expression (or divides by zero)."""


def normalize_expression(text: str) -> str:
    """Plain arithmetic from an answer written with LaTeX or typographic operators (see the
    module docstring): ``"49 \\times 2 \\div (8-1)"`` -> ``"49 * 2 / (8-1)"``. Whitespace runs,
    line breaks included, become single spaces."""
    for latex, plain in _LATEX_OPS:
        text = text.replace(latex, plain)
    for _ in range(MAX_EXPRESSION_CHARS):  # innermost fractions first; bounded
        text, n = _LATEX_FRAC.subn(r"(\1)/(\2)", text)
        if not n:
            break
    text = " ".join(text.translate(_UNICODE_OPS).split())
    return text[:-1].rstrip() if text.endswith(".") else text


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses, in order.

    LaTeX operators are read first (:func:`normalize_expression`). Only decimal integer
    literals, ``+ - * /``, unary minus and parentheses are allowed; anything else raises
    :class:`ExpressionError`, as does division by zero. A ``#`` anywhere is rejected before
    parsing: :func:`ast.parse` would drop a comment and everything after it.
    """
    if "#" in expression:
        raise ExpressionError("not allowed: '#' (a Python comment)")
    if len(expression) > MAX_ANSWER_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    expression = normalize_expression(expression)
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and the like: model text, not our code
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ExpressionError("not an arithmetic expression") from None
    literals: list[int] = []
    return _evaluate(tree.body, expression, literals), literals


def _evaluate(node: ast.AST, text: str, literals: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if not (ast.get_source_segment(text, node) or "").isdigit():  # rejects 0x1e, 1_0, ...
            raise ExpressionError(f"not allowed: literal {ast.get_source_segment(text, node)!r}")
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, text, literals)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _evaluate(node.left, text, literals)
        right = _evaluate(node.right, text, literals)
        value = apply_op(_BINARY_OPS[type(node.op)], left, right)
        if value is None:
            raise ExpressionError("division by zero")
        return value
    raise ExpressionError(f"not allowed: {_describe(node, text)}")


def _describe(node: ast.AST, text: str) -> str:
    if isinstance(node, ast.BinOp):
        return f"operator {type(node.op).__name__}"
    if isinstance(node, ast.UnaryOp):
        return f"unary operator {type(node.op).__name__}"
    if isinstance(node, ast.Constant):
        return f"literal {node.value!r}"
    segment = ast.get_source_segment(text, node) or ""
    return f"{type(node).__name__} {segment[:40]!r}"


def apply_op(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    """``a op b`` for op in ``+ - * /``; None for division by zero."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


# --------------------------------------------------------------------------------------------
# verification


@dataclass
class CountdownCheck:
    """Outcome of checking one answer. ``reason`` is None exactly when the answer is correct."""

    expression: str | None
    value: Fraction | None = None
    numbers_used: list[int] = field(default_factory=list)
    reason: str | None = None

    @property
    def correct(self) -> bool:
        return self.reason is None


def check_answer(answer: str | None, numbers: list[int], target: int) -> CountdownCheck:
    """Check an answer expression against a puzzle (see the module docstring for the rules). An
    answer of several lines that is not an expression as a whole is checked by its last line."""
    if not answer or not answer.strip():
        return CountdownCheck(None, reason="no answer")
    result = _check_expression(answer.strip(), numbers, target)
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if result.value is None and len(lines) > 1 and "#" not in answer:
        last = _check_expression(lines[-1], numbers, target)
        if last.value is not None:
            return last
    return result


def _check_expression(answer: str, numbers: list[int], target: int) -> CountdownCheck:
    expression = _drop_equals_target(answer, target)
    try:
        value, used = evaluate_expression(expression)
    except ExpressionError as e:
        return CountdownCheck(expression, reason=str(e))
    if sorted(used) != sorted(numbers):
        return CountdownCheck(expression, value, used,
                              reason=f"numbers used {sorted(used)} are not the given numbers {sorted(numbers)}")
    if value != target:
        return CountdownCheck(expression, value, used, reason=f"value {value} is not the target {target}")
    return CountdownCheck(expression, value, used)


def _drop_equals_target(answer: str, target: int) -> str:
    """``"(30+93)-100 = 23"`` -> ``"(30+93)-100"`` when the right side is the target."""
    left, sep, right = answer.partition("=")
    if sep and normalize_expression(right) == str(target):
        return left.strip()
    return answer


def answer_text(completion: str) -> str | None:
    """The answer part of a completion (see the module docstring): the last ``\\boxed{}`` of the
    last non-empty ``<answer>`` block, else that block; without one, the last ``\\boxed{}`` of the
    completion, else its last line once tags are removed."""
    answer = extract_answer(completion)
    if answer:
        boxed = last_boxed(answer, allow_unclosed=True)
        return answer if boxed is None else boxed
    rest = after_answer(completion)
    boxed = last_boxed(rest, allow_unclosed=True)
    return boxed if boxed is not None else last_line(rest)


# --------------------------------------------------------------------------------------------
# solving and generating


#: Identity of a puzzle for train/test separation: (sorted numbers, target).
PuzzleKey = tuple[tuple[int, ...], int]


@dataclass(frozen=True)
class CountdownPuzzle:
    """A puzzle with one solution: ``expression`` and its ``steps`` (e.g. ``"30+93=123"``);
    both empty when the puzzle has no known solution."""

    numbers: tuple[int, ...]
    target: int
    expression: str = ""
    steps: tuple[str, ...] = ()

    @property
    def key(self) -> PuzzleKey:
        """Identity used to keep held-out puzzles out of training: number multiset and target."""
        return tuple(sorted(self.numbers)), self.target


@dataclass(frozen=True)
class _Term:
    value: Fraction
    expression: str
    steps: tuple[str, ...] = ()


def _leaf(number: int) -> _Term:
    return _Term(Fraction(number), str(number))


def _combine(a: _Term, op: str, b: _Term) -> _Term | None:
    value = apply_op(op, a.value, b.value)
    if value is None:
        return None
    expression = f"{_wrap(a.expression)}{op}{_wrap(b.expression)}"
    return _Term(value, expression, a.steps + b.steps + (f"{a.value}{op}{b.value}={value}",))


def _wrap(expression: str) -> str:
    return expression if expression.isdigit() else f"({expression})"


#: Combinations :func:`solve` tries at most for a training puzzle read from a file. An exhaustive
#: search takes at most 432 for 3 numbers and 20,832 for 4, but 1.7 million for 5 and 2e8 for 6.
SOLVE_BUDGET = 25_000
#: Held-out (test) puzzles with more numbers than this are not solved when read: their reference
#: solution is not needed to score an answer.
MAX_SOLVED_TEST_NUMBERS = 4


class _BudgetSpent(Exception):
    pass


def _search(terms: list[_Term], target: int, natural: bool, budget: list[int] | None = None) -> Iterator[_Term]:
    """All ways to combine ``terms`` into one term of value ``target`` (with repeats).

    ``natural`` restricts intermediate results to positive integers. ``budget`` (a one-item
    list, counted down) bounds the combinations tried; :class:`_BudgetSpent` when it runs out."""
    if len(terms) == 1:
        if terms[0].value == target:
            yield terms[0]
        return
    for i, j in permutations(range(len(terms)), 2):
        rest = [t for k, t in enumerate(terms) if k not in (i, j)]
        for op in "+-*/":
            if budget is not None:
                budget[0] -= 1
                if budget[0] < 0:
                    raise _BudgetSpent
            term = _combine(terms[i], op, terms[j])
            if term is None or (natural and (term.value.denominator != 1 or term.value <= 0)):
                continue
            yield from _search(rest + [term], target, natural, budget)


def solve(numbers: list[int] | tuple[int, ...], target: int, budget: int | None = None) -> CountdownPuzzle:
    """Brute-force solution of a puzzle, preferring positive-integer intermediate results; the
    returned puzzle has an empty expression if there is no solution, or if none was found
    within ``budget`` combinations (None: no bound)."""
    terms = [_leaf(n) for n in numbers]
    left = None if budget is None else [budget]
    try:
        for natural in (True, False):
            for term in _search(terms, target, natural, left):
                return CountdownPuzzle(tuple(numbers), target, term.expression, term.steps)
    except _BudgetSpent:
        pass
    return CountdownPuzzle(tuple(numbers), target)


def ordered_solution(numbers: list[int] | tuple[int, ...], target: int) -> CountdownPuzzle:
    """The first solution in a fixed order that keeps the prompt's order where it can: orders of the
    numbers from the prompt's own, each combined left to right (``(a op b) op c``) with the operators
    tried as ``+ - * /``, positive-integer intermediate results first. One answer per puzzle, the
    same whichever expression generated it: a target a small model can learn. Puzzles with no
    left-to-right solution fall back to :func:`solve`."""
    for natural in (True, False):
        for order in permutations(numbers):
            found = _left_to_right([_leaf(n) for n in order], target, natural)
            if found is not None:
                return CountdownPuzzle(tuple(numbers), target, found.expression, found.steps)
    return solve(numbers, target)


def _left_to_right(terms: list[_Term], target: int, natural: bool) -> _Term | None:
    if len(terms) == 1:
        return terms[0] if terms[0].value == target else None
    for op in "+-*/":
        term = _combine(terms[0], op, terms[1])
        if term is None or (natural and (term.value.denominator != 1 or term.value <= 0)):
            continue
        found = _left_to_right([term, *terms[2:]], target, natural)
        if found is not None:
            return found
    return None


def solve_countdown(numbers: list[int] | tuple[int, ...], target: int) -> str | None:
    """An expression using each number exactly once that equals ``target``, or None."""
    return solve(numbers, target).expression or None


def generate_countdown(n: int, seed: int, max_number: int = 100, max_target: int = 100,
                       min_number: int = 1, count: int = 3,
                       exclude: Collection[PuzzleKey] = ()) -> list[CountdownPuzzle]:
    """``n`` distinct solvable puzzles, deterministic for ``seed``.

    Each puzzle draws ``count`` numbers uniformly from ``min_number..max_number`` and combines
    them by a random expression (random pairs, random operators) whose intermediate results are
    positive integers; its value, kept if in ``1..max_target``, is the target, and the expression
    and its steps are the puzzle's solution. Puzzles whose :attr:`CountdownPuzzle.key` is in
    ``exclude`` or already drawn are skipped. The defaults match d1's test set (1..100).
    """
    rng = random.Random(seed)
    puzzles: list[CountdownPuzzle] = []
    seen = set(exclude)
    attempts = 0
    while len(puzzles) < n:
        attempts += 1
        if attempts > 1000 * n + 100_000:
            raise ValueError(f"could not draw {n} distinct puzzles with numbers {min_number}..{max_number} "
                             f"and targets 1..{max_target} (got {len(puzzles)})")
        numbers = [rng.randrange(min_number, max_number + 1) for _ in range(count)]
        drawn = _random_tree(numbers, rng)
        if drawn is None or not 1 <= drawn[0] <= max_target:
            continue
        key = (tuple(sorted(numbers)), drawn[0])
        if key not in seen:
            seen.add(key)
            term = _build(drawn[1])
            puzzles.append(CountdownPuzzle(tuple(numbers), drawn[0], term.expression, term.steps))
    return puzzles


def _random_tree(numbers: list[int], rng: random.Random) -> tuple[int, int | tuple] | None:
    """Combine random pairs with random operators into a tree ``(left, op, right)`` and return
    its value and the tree; None if an intermediate result is not a positive integer. Plain
    integers and tuples: this runs hundreds of thousands of times."""
    items: list[tuple[int, int | tuple]] = [(x, x) for x in numbers]  # (value, tree)
    while len(items) > 1:
        i = rng.randrange(len(items))
        j = rng.randrange(len(items) - 1)
        j += j >= i  # a second, different index
        (a, left), (b, right) = items[i], items[j]
        op = rng.choice("+-*/")
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            value = a // b if a % b == 0 else 0
        if value <= 0:
            return None
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [(value, (left, op, right))]
    return items[0]


def _build(tree: int | tuple) -> _Term:
    """The term (expression, steps) of a tree ``n`` or ``(left, op, right)``."""
    if isinstance(tree, int):
        return _leaf(tree)
    left, op, right = tree
    term = _combine(_build(left), op, _build(right))
    assert term is not None  # the tree was evaluated without division by zero
    return term


# --------------------------------------------------------------------------------------------
# the task


#: Most numbers a puzzle read from a file may have.
MAX_NUMBERS = 12


def parse_record(record: dict[str, Any], where: str) -> tuple[list[int], int]:
    """Numbers and target of a record: ``input``/``numbers``/``nums`` (list or ``"30,100,93"``)
    and ``output``/``target``."""
    raw = first_field(record, ("numbers", "nums", "input"), where)
    raw_target = first_field(record, ("target", "output"), where)
    items = re.split(r"[,\s]+", raw.strip()) if isinstance(raw, str) else raw
    try:
        numbers, target = [int(x) for x in items], int(raw_target)
    except (TypeError, ValueError):
        raise DataError(f"{where}: numbers and target must be integers, got {raw!r} and {raw_target!r}") from None
    if not 2 <= len(numbers) <= MAX_NUMBERS:
        raise DataError(f"{where}: a puzzle needs 2 to {MAX_NUMBERS} numbers, got {len(numbers)}")
    return numbers, target


def example_key(example: Example) -> PuzzleKey:
    """The held-out key of an example (see :attr:`CountdownPuzzle.key`)."""
    return tuple(sorted(example.meta["numbers"])), example.meta["target"]


class CountdownTask(PuzzleTask):
    """Countdown (3 numbers by default). Score 1.0 for a correct expression, else 0.0.

    ``style``: ``"compact"`` (``"numbers: 30 100 93 target: 23\\n"``, for tiny models trained
    from scratch) or ``"d1"`` (a natural-language instruction). ``test_source``: the held-out
    file (e.g. d1's test set); it is what ``load(split="test")`` returns by default, and training
    puzzles with the same key are excluded. Without it the test split is ``num_test`` puzzles
    generated from ``test_seed``. ``reasoning``: training targets carry the step trace in
    ``<reasoning>`` (default) or only ``<answer>expression</answer>`` (easier for tiny models).
    ``solution``: the expression of a generated training puzzle's target: ``"generated"`` (the random
    expression that generated it, default) or ``"ordered"`` (:func:`ordered_solution`: one answer per
    puzzle, in the prompt's order where possible; what a tiny model learns from scratch).
    """

    name = "countdown"
    metric = "accuracy"

    def __init__(self, style: PromptStyle = "compact", test_source: str | None = None,
                 num_train: int = 50_000, num_test: int = 500, max_number: int = 100,
                 max_target: int = 100, test_seed: int = 1234, reasoning: bool = True,
                 solution: str = "generated") -> None:
        self.style = check_style(style)
        if solution not in ("generated", "ordered"):
            raise ValueError(f"countdown: unknown solution {solution!r}; valid: generated, ordered")
        self.solution = solution
        self.reasoning = reasoning
        self.test_source = test_source
        self.num_train = num_train
        self.num_test = num_test
        self.max_number = max_number
        self.max_target = max_target
        self.test_seed = test_seed

    # prompts --------------------------------------------------------------------------------

    def prompt(self, numbers: list[int] | tuple[int, ...], target: int) -> str:
        if self.style == "compact":
            return f"numbers: {' '.join(map(str, numbers))} target: {target}\n"
        return (f"Using the numbers {', '.join(map(str, numbers))}, write an arithmetic expression that "
                f"equals {target}. Use each number exactly once; you may use +, -, *, / and parentheses. "
                "Think step by step inside <reasoning> </reasoning> tags, then write only the expression "
                "(without '=' or the result) inside <answer> </answer> tags.\n")

    def example(self, puzzle: CountdownPuzzle, source: str = "") -> Example:
        """An example for a puzzle; its target response is None if the puzzle has no solution."""
        target = None
        if puzzle.expression:
            target = format_reasoning(", ".join(puzzle.steps) if self.reasoning else "", puzzle.expression)
        return Example(prompt=self.prompt(puzzle.numbers, puzzle.target), target=target,
                       references=[puzzle.expression] if puzzle.expression else [],
                       meta={"numbers": list(puzzle.numbers), "target": puzzle.target}, source=source)

    # data -----------------------------------------------------------------------------------

    def _held_out_keys(self) -> set[PuzzleKey]:
        return {example_key(ex) for ex in self._held_out(None)}

    def _train_from_file(self, source: str, limit: int | None) -> list[Example]:
        return self._read(source, "train", exclude=self._held_out_keys(), limit=limit)

    def _generate_train(self, n: int, seed: int) -> list[Example]:
        """``n`` puzzles generated from ``seed`` (with the ``solution`` of this task), none held out."""
        puzzles = generate_countdown(n, seed, self.max_number, self.max_target, exclude=self._held_out_keys())
        if self.solution == "ordered":
            puzzles = [ordered_solution(p.numbers, p.target) for p in puzzles]
        return [self.example(p, f"generated:train:seed={seed}[{i}]") for i, p in enumerate(puzzles)]

    def _generate_test(self) -> list[Example]:
        puzzles = generate_countdown(self.num_test, self.test_seed, self.max_number, self.max_target)
        return [self.example(p, f"generated:test:seed={self.test_seed}[{i}]") for i, p in enumerate(puzzles)]

    def _read(self, source: str, split: str, exclude: Collection[PuzzleKey] = (),
              limit: int | None = None) -> list[Example]:
        """Examples of a puzzle file, without the puzzles in ``exclude``, at most ``limit``; every
        record is validated, only the kept ones are solved."""
        kept = []
        for record, where in read_records(source, split):
            numbers, target = parse_record(record, where)
            if (tuple(sorted(numbers)), target) not in exclude:
                kept.append((numbers, target, where))
        examples = []
        for numbers, target, where in kept[:limit]:
            if split == "test" and len(numbers) > MAX_SOLVED_TEST_NUMBERS:
                puzzle = CountdownPuzzle(tuple(numbers), target)
            else:
                puzzle = solve(numbers, target, SOLVE_BUDGET)
            examples.append(self.example(puzzle, where))
        return examples

    # scoring --------------------------------------------------------------------------------

    def check(self, example: Example, completion: str) -> CountdownCheck:
        return check_answer(answer_text(completion), example.meta["numbers"], example.meta["target"])

    def score(self, example: Example, completion: str) -> float:
        return 1.0 if self.check(example, completion).correct else 0.0

    def subsets(self, examples: Sequence[Example]) -> dict[str, list[bool]]:
        """``not_sum``: the puzzles whose target is not the sum of all their numbers, which a model
        solves by writing ``a+b+c`` without searching."""
        return {"not_sum": [sum(ex.meta["numbers"]) != ex.meta["target"] for ex in examples]}

    def details(self, example: Example, completion: str) -> dict[str, Any]:
        result = self.check(example, completion)
        return {"expression": result.expression,
                "value": None if result.value is None else str(result.value),
                "numbers_used": result.numbers_used, "reason": result.reason}

