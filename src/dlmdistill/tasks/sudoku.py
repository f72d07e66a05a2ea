"""Sudoku 4x4: fill a 4x4 grid with 1..4 so that every row, column and 2x2 box holds each once.

Grids are strings of 16 digits read row by row; in a puzzle ``0`` marks a blank. This is the
planning task of d1 and d-OPSD (their test set: 500 puzzles with 8 blanks each).

Verifier. The answer is the last ``<answer>`` block. Without one (or, if it holds no digit, in
what follows it), it is the last run of grid-like lines (digits and separators only) once tags are removed, else the
last non-empty line: a grid after a stray ``</answer>`` or with no tags at all. Row labels
(``Row 1:``) are dropped; the remaining digits are read in order, ignoring whitespace, newlines
and any separators (``|``, commas, brackets), and, as in d1, the first 16 are kept (a shorter
answer is padded with blanks). The answer *solves* the puzzle when
it is a valid grid (rows, columns and boxes are permutations of 1..4) that keeps every given
digit. A 4x4 puzzle can have several solutions, so any valid completion counts, not only the
reference solution. The score is graded as in d1: 1.0 for a solved puzzle, otherwise the
fraction of originally blank cells that hold the reference solution's digit. ``is_correct``
uses ``correct_threshold = 1.0`` (solved); d-OPSD accepts trajectories at a graded reward of
0.25, which is ``is_correct(score, 0.25)``.

Data. There are only 288 valid 4x4 grids (:func:`all_grids`), so a random train/test split of
*puzzles* would put the test solutions into training. We split the *grids* instead: with a
test file (d1's ``4x4_test_sudoku.csv``, columns ``Puzzle,Solution``) the grids that solve its
puzzles are held out (d1's 500 puzzles use 229 grids, leaving 59 for training); without one, a
seeded fraction of the grids is held out and test puzzles are generated from it. Training
puzzles blank random cells of the remaining grids (:func:`generate_sudoku`).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .base import (Example, PromptStyle, PuzzleTask, after_answer, check_style, extract_answer, format_reasoning,
                   strip_tags)
from .io import DataError, first_field, read_records

SIZE = 4

log = logging.getLogger(__name__)

CELLS = SIZE * SIZE
DIGITS = "1234"

_ROWS = [[r * SIZE + c for c in range(SIZE)] for r in range(SIZE)]
_COLS = [[r * SIZE + c for r in range(SIZE)] for c in range(SIZE)]
_BOXES = [[(br + r) * SIZE + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
UNITS: list[list[int]] = _ROWS + _COLS + _BOXES
#: For each cell, the other cells that share a row, column or box with it.
PEERS: list[frozenset[int]] = [frozenset(j for unit in UNITS if i in unit for j in unit) - {i} for i in range(CELLS)]


# --------------------------------------------------------------------------------------------
# grids


def is_valid_grid(grid: str) -> bool:
    """True if ``grid`` is 16 digits 1..4 with every row, column and box a permutation of 1..4."""
    return (len(grid) == CELLS and all(ch in DIGITS for ch in grid)
            and all(len({grid[i] for i in unit}) == SIZE for unit in UNITS))


def respects_givens(puzzle: str, grid: str) -> bool:
    """True if ``grid`` keeps every given (non-zero) digit of ``puzzle``."""
    return len(grid) == len(puzzle) and all(p == "0" or p == g for p, g in zip(puzzle, grid))


def completions(puzzle: str, limit: int | None = None) -> list[str]:
    """Valid grids that complete ``puzzle`` (backtracking in row-major order), at most ``limit``."""
    found: list[str] = []
    cells = list(puzzle)

    def fill(i: int) -> None:
        if limit is not None and len(found) >= limit:
            return
        if i == CELLS:
            found.append("".join(cells))
            return
        if cells[i] != "0":
            fill(i + 1)
            return
        for digit in candidates(cells, i):
            cells[i] = digit
            fill(i + 1)
            cells[i] = "0"

    if len(puzzle) == CELLS and all(puzzle[i] == "0" or _fits(puzzle, i) for i in range(CELLS)):
        fill(0)
    return found


def candidates(cells: Sequence[str], i: int) -> list[str]:
    """Digits that cell ``i`` can take: those not already held by one of its peers."""
    return [d for d in DIGITS if all(cells[j] != d for j in PEERS[i])]


def _fits(puzzle: str, i: int) -> bool:
    """The given digit at ``i`` is 1..4 and no peer holds the same digit."""
    return puzzle[i] in DIGITS and all(puzzle[j] != puzzle[i] for j in PEERS[i])


@lru_cache(maxsize=1)
def all_grids() -> tuple[str, ...]:
    """All 288 valid 4x4 grids, sorted."""
    return tuple(sorted(completions("0" * CELLS)))


def split_grids(seed: int = 0, test_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """A seeded ``(train, test)`` partition of :func:`all_grids`."""
    grids = list(all_grids())
    random.Random(seed).shuffle(grids)
    n_test = round(test_fraction * len(grids))
    return sorted(grids[n_test:]), sorted(grids[:n_test])


# --------------------------------------------------------------------------------------------
# puzzles


@dataclass(frozen=True)
class SudokuPuzzle:
    """A puzzle (16 digits, 0 = blank) and its reference solution."""

    puzzle: str
    solution: str

    @property
    def blanks(self) -> list[int]:
        return [i for i, ch in enumerate(self.puzzle) if ch == "0"]


def generate_sudoku(n: int, seed: int, grids: Sequence[str] | None = None, min_blanks: int = 4,
                    max_blanks: int = 10, unique: bool = False) -> list[SudokuPuzzle]:
    """``n`` distinct puzzles, deterministic for ``seed``: a random grid from ``grids`` (default
    all 288) with ``min_blanks..max_blanks`` random cells blanked. ``unique=True`` keeps only
    puzzles with a single solution."""
    grids = list(all_grids() if grids is None else grids)
    if not grids:
        raise ValueError("no grids to generate Sudoku puzzles from")
    rng = random.Random(seed)
    seen: set[str] = set()
    puzzles: list[SudokuPuzzle] = []
    attempts = 0
    while len(puzzles) < n:
        attempts += 1
        if attempts > 1000 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct puzzles from {len(grids)} grids with "
                             f"{min_blanks}..{max_blanks} blanks (got {len(puzzles)})")
        grid = rng.choice(grids)
        blanks = set(rng.sample(range(CELLS), rng.randint(min_blanks, max_blanks)))
        puzzle = "".join("0" if i in blanks else ch for i, ch in enumerate(grid))
        if puzzle in seen or (unique and len(completions(puzzle, limit=2)) != 1):
            continue
        seen.add(puzzle)
        puzzles.append(SudokuPuzzle(puzzle, grid))
    return puzzles


def fill_order(puzzle: SudokuPuzzle) -> list[str]:
    """A short solving trace, ``["r1c3=4", ...]`` (rows and columns from 1): repeatedly fill the
    first blank cell that has a single candidate left; when none has, fill the first blank from
    the reference solution (a guess the puzzle does not force)."""
    cells = list(puzzle.puzzle)
    steps = []
    while "0" in cells:
        blanks = [i for i, ch in enumerate(cells) if ch == "0"]
        forced = next((i for i in blanks if len(candidates(cells, i)) == 1), None)
        if forced is None:
            i, digit = blanks[0], puzzle.solution[blanks[0]]
        else:
            i, digit = forced, candidates(cells, forced)[0]
        cells[i] = digit
        steps.append(f"r{i // SIZE + 1}c{i % SIZE + 1}={digit}")
    return steps


# --------------------------------------------------------------------------------------------
# verification


#: Labels whose digits are not cells: ``Row 1:``, ``row 2 -``, ``Line 3.``.
_LABEL = re.compile(r"(?i)\b(?:row|line)\s*\d\s*[:=.)\-]?")
#: A line of a written grid: digits and separators only.
_GRID_LINE = re.compile(r"[\d\s|,;.:\-+\[\](){}`*_/]*\d[\d\s|,;.:\-+\[\](){}`*_/]*")


def answer_text(completion: str) -> str:
    """The answer part of a completion (see the module docstring), row labels removed."""
    text = extract_answer(completion)
    if text is None or not re.search(r"\d", _LABEL.sub(" ", text)):
        rest = strip_tags(after_answer(completion))
        lines = [_LABEL.sub(" ", line).strip() for line in rest.splitlines()]
        lines = [line for line in lines if line]
        run: list[str] = []
        for line in reversed(lines):
            if _GRID_LINE.fullmatch(line):
                run.insert(0, line)
            elif run:
                break
        text = "\n".join(run) if run else (lines[-1] if lines else "")
    return _LABEL.sub(" ", text)


def parse_grid(completion: str) -> str | None:
    """The 16-digit answer of a completion (see the module docstring), or None if it has no
    digits."""
    digits = "".join(re.findall(r"[0-9]", answer_text(completion)))
    return (digits[:CELLS]).ljust(CELLS, "0") if digits else None


@dataclass
class SudokuCheck:
    """Outcome of checking one answer grid (None if the completion held no digits)."""

    answer: str | None
    valid: bool
    givens_respected: bool
    cell_accuracy: float

    @property
    def solved(self) -> bool:
        return self.valid and self.givens_respected


def check_grid(answer: str | None, puzzle: SudokuPuzzle) -> SudokuCheck:
    """Validity, givens and cell accuracy (1.0 if solved, else the fraction of blank cells that
    match the reference solution) of an answer grid."""
    if answer is None:
        return SudokuCheck(None, False, False, 0.0)
    valid, givens = is_valid_grid(answer), respects_givens(puzzle.puzzle, answer)
    blanks = puzzle.blanks
    if valid and givens:
        accuracy = 1.0
    elif blanks:
        accuracy = sum(answer[i] == puzzle.solution[i] for i in blanks) / len(blanks)
    else:
        accuracy = 0.0
    return SudokuCheck(answer, valid, givens, accuracy)


# --------------------------------------------------------------------------------------------
# the task


def parse_record(record: dict[str, Any], where: str) -> SudokuPuzzle:
    """A puzzle from a record with ``Puzzle``/``puzzle``/``quizzes`` and ``Solution``/
    ``solution``/``solutions`` fields; the solution must be a valid completion."""
    puzzle = str(first_field(record, ("Puzzle", "puzzle", "quizzes"), where)).strip()
    solution = str(first_field(record, ("Solution", "solution", "solutions"), where)).strip()
    if len(puzzle) != CELLS or not all(ch in "0" + DIGITS for ch in puzzle):
        raise DataError(f"{where}: puzzle must be 16 digits 0..4, got {puzzle!r}")
    if not (is_valid_grid(solution) and respects_givens(puzzle, solution)):
        raise DataError(f"{where}: solution {solution!r} is not a valid completion of {puzzle!r}")
    return SudokuPuzzle(puzzle, solution)


class SudokuTask(PuzzleTask):
    """Sudoku 4x4 with d1's graded reward (see the module docstring).

    ``style``: ``"compact"`` (``"sudoku: 3102200002100320\\n"``) or ``"d1"``. ``test_source``: the
    held-out file; without it ``test_fraction`` of the grids (split with ``grid_seed``) are held
    out and ``num_test`` puzzles are generated from them with ``test_seed``. ``reasoning``: training
    targets carry the fill order in ``<reasoning>`` (default) or only the answer grid.
    """

    name = "sudoku"
    metric = "accuracy"
    correct_threshold = 1.0

    def __init__(self, style: PromptStyle = "compact", test_source: str | None = None,
                 num_train: int = 20_000, num_test: int = 500, min_blanks: int = 4, max_blanks: int = 10,
                 unique: bool = False, test_fraction: float = 0.2, grid_seed: int = 0,
                 test_seed: int = 1234, reasoning: bool = True) -> None:
        self.style = check_style(style)
        self.reasoning = reasoning
        self.test_source = test_source
        self.num_train = num_train
        self.num_test = num_test
        self.min_blanks = min_blanks
        self.max_blanks = max_blanks
        self.unique = unique
        self.test_fraction = test_fraction
        self.grid_seed = grid_seed
        self.test_seed = test_seed

    # prompts --------------------------------------------------------------------------------

    def prompt(self, puzzle: str) -> str:
        if self.style == "compact":
            return f"sudoku: {puzzle}\n"
        rows = "\n".join(puzzle[r * SIZE:(r + 1) * SIZE] for r in range(SIZE))
        return ("Solve this 4x4 Sudoku. Fill every 0 with a digit from 1 to 4 so that each row, each column "
                "and each of the four 2x2 boxes contains 1, 2, 3 and 4 exactly once; keep the given digits. "
                f"The grid, row by row:\n{rows}\n"
                "Think step by step inside <reasoning> </reasoning> tags, then write the completed grid as "
                "16 digits, row by row, inside <answer> </answer> tags.\n")

    def example(self, puzzle: SudokuPuzzle, source: str = "") -> Example:
        return Example(prompt=self.prompt(puzzle.puzzle),
                       target=format_reasoning(" ".join(fill_order(puzzle)) if self.reasoning else "",
                                               puzzle.solution),
                       references=[puzzle.solution],
                       meta={"puzzle": puzzle.puzzle, "solution": puzzle.solution}, source=source)

    # data -----------------------------------------------------------------------------------

    def _train_from_file(self, source: str, limit: int | None) -> list[Example]:
        held_out = set(self.held_out_grids())
        return [ex for ex in self._read(source, "train") if ex.meta["solution"] not in held_out][:limit]

    def _generate_train(self, n: int, seed: int) -> list[Example]:
        """``n`` puzzles generated from ``seed`` on the grids that are not held out."""
        held_out = set(self.held_out_grids())
        grids = [g for g in all_grids() if g not in held_out]
        if n >= 10_000:  # 2.4 s for 20,000 on our 2-core machine (mostly solving traces): say so
            log.info("sudoku: generating %d training puzzles and their solving traces (seed %d) ...", n, seed)
        puzzles = generate_sudoku(n, seed, grids, self.min_blanks, self.max_blanks, self.unique)
        from tqdm.auto import tqdm

        return [self.example(p, f"generated:train:seed={seed}[{i}]")
                for i, p in enumerate(tqdm(puzzles, desc="sudoku puzzles", unit="puzzle", leave=False,
                                           disable=n < 10_000))]

    def held_out_grids(self) -> list[str]:
        """Grids never used for training: the solutions of the test file, or the seeded test grids."""
        if self.test_source is not None:
            return sorted({ex.meta["solution"] for ex in self._read(self.test_source, "test")})
        return split_grids(self.grid_seed, self.test_fraction)[1]

    def _generate_test(self) -> list[Example]:
        puzzles = generate_sudoku(self.num_test, self.test_seed, self.held_out_grids(), self.min_blanks,
                                  self.max_blanks, self.unique)
        return [self.example(p, f"generated:test:seed={self.test_seed}[{i}]") for i, p in enumerate(puzzles)]

    def _read(self, source: str, split: str) -> list[Example]:
        return [self.example(parse_record(record, where), where) for record, where in read_records(source, split)]

    # scoring --------------------------------------------------------------------------------

    def check(self, example: Example, completion: str) -> SudokuCheck:
        puzzle = SudokuPuzzle(example.meta["puzzle"], example.meta["solution"])
        return check_grid(parse_grid(completion), puzzle)

    def score(self, example: Example, completion: str) -> float:
        return self.check(example, completion).cell_accuracy

    def details(self, example: Example, completion: str) -> dict[str, Any]:
        result = self.check(example, completion)
        return {"answer": result.answer, "cell_accuracy": result.cell_accuracy, "valid": result.valid,
                "givens_respected": result.givens_respected, "solved": result.solved,
                "matches_reference": result.answer == example.meta["solution"]}
