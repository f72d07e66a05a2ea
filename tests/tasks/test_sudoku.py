import pytest

from dlmdistill.tasks.io import DataError
from dlmdistill.tasks.sudoku import (SudokuPuzzle, SudokuTask, all_grids, completions, fill_order,
                                     generate_sudoku, is_valid_grid, parse_grid, respects_givens, split_grids)

# d1's first test puzzle (8 blanks) and its reference solution
PUZZLE, SOLUTION = "3102200002100320", "3142243142131324"
# a puzzle with two solutions: 1 and 2 can swap in the rectangle r1c1, r1c2, r3c1, r3c2
AMBIGUOUS, REFERENCE, ALTERNATIVE = "0034341200434321", "1234341221434321", "2134341212434321"


def answer(grid: str) -> str:
    return f"<reasoning>...</reasoning><answer>{grid}</answer>"


def test_there_are_288_distinct_valid_grids():
    grids = all_grids()
    assert len(grids) == len(set(grids)) == 288
    assert all(is_valid_grid(g) for g in grids)


@pytest.mark.parametrize("grid, valid", [
    (SOLUTION, True),
    ("1234341221434321", True),
    ("1234123412341234", False),   # columns repeat
    ("1234214334124321", False),   # rows and columns fine, boxes repeat
    ("3142243142131325", False),   # digit out of range
    ("314224314213132", False),    # too short
    ("3142243142131320", False),   # a blank left
])
def test_grid_validity(grid, valid):
    assert is_valid_grid(grid) is valid


def test_givens():
    assert respects_givens(PUZZLE, SOLUTION)
    assert not respects_givens(PUZZLE, "4" + SOLUTION[1:])


def test_completions():
    assert completions(PUZZLE) == [SOLUTION]
    assert completions(AMBIGUOUS) == [REFERENCE, ALTERNATIVE]
    assert completions("1100" + "0" * 12) == []      # contradictory givens
    assert len(completions("0" * 16, limit=5)) == 5


def test_score_is_graded_and_accepts_any_valid_completion():
    task = SudokuTask()
    ex = task.example(SudokuPuzzle(PUZZLE, SOLUTION))
    assert task.score(ex, answer(SOLUTION)) == 1.0
    # separators and line breaks between digits are fine
    assert task.score(ex, "<answer>\n3142\n2431\n4213\n1324\n</answer>") == 1.0
    assert task.score(ex, "<answer>3 1 4 2 | 2 4 3 1 | 4 2 1 3 | 1 3 2 4</answer>") == 1.0
    wrong = "3122" + "2431" + "4213" + "1324"   # r1c3 = 2 instead of 4: invalid grid, 7 of 8 blanks right
    assert task.score(ex, answer(wrong)) == pytest.approx(7 / 8)
    d = task.details(ex, answer(wrong))
    assert d["valid"] is False and d["givens_respected"] is True and d["solved"] is False
    assert d["cell_accuracy"] == pytest.approx(7 / 8)
    # changing a given: valid grid, but not this puzzle's; graded on the blanks only
    other = "4132" + "2341" + "1423" + "3214"
    assert is_valid_grid(other)
    d = task.details(ex, answer(other))
    assert d["valid"] is True and d["givens_respected"] is False and d["solved"] is False
    assert task.score(ex, "no digits here") == 0.0
    assert task.score(ex, answer("31")) == 0.0          # too short: padded with blanks, none right
    assert task.is_correct(task.score(ex, answer(SOLUTION)))
    assert not task.is_correct(task.score(ex, answer(wrong)))
    assert task.is_correct(task.score(ex, answer(wrong)), threshold=0.25)   # d-OPSD's acceptance rule


def test_alternative_solution_counts_as_correct():
    task = SudokuTask()
    ex = task.example(SudokuPuzzle(AMBIGUOUS, REFERENCE))
    assert task.score(ex, answer(ALTERNATIVE)) == 1.0
    d = task.details(ex, answer(ALTERNATIVE))
    assert d["solved"] and not d["matches_reference"]


def test_last_answer_block_and_last_line_fallback():
    assert parse_grid(answer("1" * 16) + answer(SOLUTION)) == SOLUTION
    assert parse_grid(f"I filled it in:\n{SOLUTION}\n") == SOLUTION
    assert parse_grid("<answer>" + SOLUTION + "99</answer>") == SOLUTION    # first 16 digits, as in d1
    assert parse_grid("<answer>1234</answer>") == "1234" + "0" * 12


def test_fill_order_trace():
    steps = fill_order(SudokuPuzzle(PUZZLE, SOLUTION))
    assert len(steps) == PUZZLE.count("0")
    filled = list(PUZZLE)
    for step in steps:            # every step writes the solution's digit into a blank cell
        r, c, d = int(step[1]) - 1, int(step[3]) - 1, step[5]
        assert filled[r * 4 + c] == "0" and SOLUTION[r * 4 + c] == d
        filled[r * 4 + c] = d
    assert "".join(filled) == SOLUTION
    ex = SudokuTask().example(SudokuPuzzle(PUZZLE, SOLUTION))
    assert ex.prompt == f"sudoku: {PUZZLE}\n"
    assert ex.target == f"<reasoning>{' '.join(steps)}</reasoning><answer>{SOLUTION}</answer>"
    assert SudokuTask().score(ex, ex.target) == 1.0


def test_generator():
    puzzles = generate_sudoku(300, seed=3, min_blanks=5, max_blanks=9)
    assert puzzles == generate_sudoku(300, seed=3, min_blanks=5, max_blanks=9)
    assert len({p.puzzle for p in puzzles}) == 300
    for p in puzzles:
        assert 5 <= p.puzzle.count("0") <= 9
        assert is_valid_grid(p.solution) and respects_givens(p.puzzle, p.solution)
    for p in generate_sudoku(100, seed=3, min_blanks=10, max_blanks=10, unique=True):
        assert completions(p.puzzle) == [p.solution]
    with pytest.raises(ValueError, match="could not draw"):
        generate_sudoku(17, seed=0, grids=all_grids()[:1], min_blanks=1, max_blanks=1)  # only 16 exist


def test_grid_split_keeps_test_solutions_out_of_training():
    train_grids, test_grids = split_grids(seed=0, test_fraction=0.2)
    assert len(train_grids) + len(test_grids) == 288 and not set(train_grids) & set(test_grids)
    task = SudokuTask(num_test=200)
    test = task.load(split="test")
    train = task.load(split="train", limit=2000)
    assert len(test) == 200 and len(train) == 2000
    assert {e.meta["solution"] for e in test} <= set(test_grids)
    assert not {e.meta["solution"] for e in train} & set(test_grids)
    assert task.load(split="train", limit=20) == train[:20]


def test_test_file_grids_are_excluded_from_training(tmp_path):
    held = generate_sudoku(40, seed=5)
    f = tmp_path / "test.csv"
    f.write_text("Puzzle,Solution\n" + "".join(f"{p.puzzle},{p.solution}\n" for p in held))
    task = SudokuTask(test_source=str(f))
    test = task.load(split="test")
    assert [e.meta["puzzle"] for e in test] == [p.puzzle for p in held] and test[0].source == f"{f}:2"
    train = task.load(split="train", limit=1000)
    assert not {e.meta["solution"] for e in train} & {p.solution for p in held}
    assert task.load(str(f), split="train") == []


def test_bad_records(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text(f"Puzzle,Solution\n{PUZZLE},{SOLUTION}\n{PUZZLE},{'1' * 16}\n")
    with pytest.raises(DataError, match="bad.csv:3: solution '1111111111111111' is not a valid completion"):
        SudokuTask().load(str(f))
    g = tmp_path / "short.csv"
    g.write_text("Puzzle,Solution\n123,1234\n")
    with pytest.raises(DataError, match="short.csv:2: puzzle must be 16 digits"):
        SudokuTask().load(str(g))


def test_d1_test_set(shared_data):
    task = SudokuTask(test_source=str(shared_data / "sudoku4x4" / "4x4_test_sudoku.csv"))
    test = task.load(split="test")
    assert len(test) == 500 and test[0].meta == {"puzzle": PUZZLE, "solution": SOLUTION}
    assert all(task.score(e, e.target) == 1.0 for e in test)
    held_out = set(task.held_out_grids())
    assert len(held_out) == 229          # d1's 500 puzzles use 229 of the 288 grids
    train = task.load(split="train", limit=3000)
    assert not {e.meta["solution"] for e in train} & held_out
    assert len({e.meta["solution"] for e in train}) == 288 - 229
