import json
from fractions import Fraction

import pytest

from dlmdistill.tasks.countdown import (CountdownTask, ExpressionError, check_answer, evaluate_expression,
                                        example_key, generate_countdown, ordered_solution, solve, solve_countdown)
from dlmdistill.tasks.io import DataError

NUMBERS, TARGET = [30, 100, 93], 23


@pytest.mark.parametrize("answer", [
    "(30+93)-100", "30+93-100", "93-(100-30)", "(93 - 100) + 30", "-100+93+30", "(30+93)-100 = 23",
    "((30)+(93))-100", "30 + 93\n- 100",
])
def test_accepts_correct_expressions(answer):
    assert check_answer(answer, NUMBERS, TARGET).correct


@pytest.mark.parametrize("answer, reason", [
    ("__import__('os')", "not allowed: Call"),
    ("__import__('os').system('true')", "not allowed"),
    ("x + 93 - 100", "not allowed: Name"),
    ("abs(30) + 93 - 100", "not allowed: Call"),
    ("(30).real + 93 - 100", "not allowed: Attribute"),
    ("30**1 + 93 - 100", "not allowed: operator Pow"),
    ("30//1 + 93 - 100", "not allowed: operator FloorDiv"),
    ("30%31 + 93 - 100", "not allowed: operator Mod"),
    ("+30 + 93 - 100", "not allowed: unary operator UAdd"),
    ("30.0 + 93 - 100", "not allowed: literal 30.0"),
    ("0x1e + 93 - 100", "not allowed: literal '0x1e'"),
    ("3_0 + 93 - 100", "not allowed: literal '3_0'"),
    ("[30, 93, 100]", "not allowed: List"),
    ("30 + 93 - 100 == 23", "not allowed: Compare"),
    ("lambda: 23", "not allowed: Lambda"),
    ("30 +", "not an arithmetic expression"),
    ("import os", "not an arithmetic expression"),
    ("30 + 93 - 100; 1", "not an arithmetic expression"),
    ("30 + 93 + 100", "value 223 is not the target 23"),
    ("30 + 93 - 100 + 0", "numbers used"),          # extra number
    ("123 - 100", "numbers used"),                  # missing number (30+93 precomputed)
    ("30 + 93 - 100 + 30 - 30", "numbers used"),    # reused number
    ("30 + 93 - 100 + 2.5", "not allowed: literal 2.5"),
    ("30 / (100 - 100) + 93", "division by zero"),
    ("30/(93-93)", "division by zero"),
    ("(" * 300 + "1" + ")" * 300, "longer than"),
    ("", "no answer"),
])
def test_rejects_anything_but_arithmetic_on_the_given_numbers(answer, reason):
    result = check_answer(answer, NUMBERS, TARGET)
    assert not result.correct
    assert reason in result.reason


def test_exact_rational_arithmetic():
    assert evaluate_expression("1/3*3") == (Fraction(1), [1, 3, 3])
    assert check_answer("(6/4)*2*2", [6, 4, 2, 2], 6).correct  # intermediate 3/2 is fine
    assert not check_answer("7/2", [7, 2], 3).correct           # no integer division
    with pytest.raises(ExpressionError):
        evaluate_expression("print(1)")


def test_score_parses_the_last_answer_block_with_last_line_fallback():
    task = CountdownTask()
    ex = task.example(solve(NUMBERS, TARGET))
    assert task.score(ex, "<reasoning>30+93=123, 123-100=23</reasoning><answer>(30+93)-100</answer>") == 1.0
    assert task.score(ex, "<answer>30+93+100</answer> then <answer>30+93-100</answer>") == 1.0
    assert task.score(ex, "<answer>30+93-100</answer> then <answer>30+93+100</answer>") == 0.0
    assert task.score(ex, "<answer>\n30+93-100\n") == 1.0          # unclosed final block
    assert task.score(ex, "I think the answer is\n30+93-100\n") == 1.0  # last line
    assert task.score(ex, "<answer>__import__('os')</answer>") == 0.0
    details = task.details(ex, "<answer>30+93+100</answer>")
    assert details == {"expression": "30+93+100", "value": "223", "numbers_used": [30, 93, 100],
                       "reason": "value 223 is not the target 23"}
    assert task.details(ex, "<answer>(30+93)-100</answer>")["reason"] is None


def test_solver():
    assert solve_countdown(NUMBERS, TARGET) == "(30+93)-100"
    assert solve_countdown([2, 3, 4], 1000) is None
    assert check_answer(solve_countdown([7, 2, 3], 17), [7, 2, 3], 17).correct
    # needs a fractional intermediate: 6 / (1 - 3/4) = 24
    expression = solve_countdown([6, 1, 3, 4], 24)
    assert expression is not None and check_answer(expression, [6, 1, 3, 4], 24).correct


def test_generator_is_deterministic_solvable_and_distinct():
    a = generate_countdown(300, seed=7)
    assert a == generate_countdown(300, seed=7)
    assert a != generate_countdown(300, seed=8)
    assert len({p.key for p in a}) == 300
    for p in a:
        assert len(p.numbers) == 3 and all(1 <= x <= 100 for x in p.numbers) and 1 <= p.target <= 100
        assert check_answer(p.expression, list(p.numbers), p.target).correct
        assert solve_countdown(p.numbers, p.target) is not None
        # each step is "a op b = c" with a positive integer result, ending at the target
        assert all(int(step.split("=")[1]) > 0 for step in p.steps)
        assert int(p.steps[-1].split("=")[1]) == p.target


def test_generator_respects_exclusions_and_ranges():
    base = generate_countdown(50, seed=1, max_number=20, max_target=30)
    again = generate_countdown(50, seed=1, max_number=20, max_target=30, exclude={p.key for p in base[:10]})
    assert not {p.key for p in base[:10]} & {p.key for p in again}
    assert all(max(p.numbers) <= 20 and p.target <= 30 for p in again)
    with pytest.raises(ValueError, match="could not draw"):
        generate_countdown(20, seed=0, max_number=2, max_target=3)  # at most 12 exist


def test_training_target_format():
    ex = CountdownTask().example(solve(NUMBERS, TARGET))
    assert ex.prompt == "numbers: 30 100 93 target: 23\n"
    assert ex.target == "<reasoning>30+93=123, 123-100=23</reasoning><answer>(30+93)-100</answer>"
    assert CountdownTask().score(ex, ex.target) == 1.0
    d1 = CountdownTask(style="d1").example(solve(NUMBERS, TARGET)).prompt
    assert "30, 100, 93" in d1 and "23" in d1 and "<answer>" in d1 and "exactly once" in d1
    with pytest.raises(ValueError, match="unknown prompt style"):
        CountdownTask(style="chatty")


def test_generated_splits_are_disjoint():
    task = CountdownTask(num_test=200)
    test = task.load(split="test")
    train = task.load(split="train", limit=3000, seed=0)
    assert len(test) == 200 and len(train) == 3000
    assert not {example_key(e) for e in test} & {example_key(e) for e in train}
    assert task.load(split="train", limit=50, seed=0) == train[:50]   # deterministic
    assert all(task.score(e, e.target) == 1.0 for e in train[:200] + test)


def test_test_file_is_held_out_of_training(tmp_path):
    f = tmp_path / "test.jsonl"
    held = generate_countdown(400, seed=0)   # the training stream of seed 0: maximal overlap
    f.write_text("".join(json.dumps({"input": ",".join(map(str, p.numbers)), "output": str(p.target)}) + "\n"
                         for p in held))
    task = CountdownTask(test_source=str(f))
    test = task.load(split="test")
    train = task.load(split="train", limit=1000, seed=0)
    assert len(test) == 400 and test[0].source == f"{f}:1"
    assert not {example_key(e) for e in test} & {example_key(e) for e in train}
    # a training file is filtered the same way
    assert task.load(str(f), split="train") == []


def test_bad_records(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"input": "1,2,x", "output": "3"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: numbers and target must be integers"):
        CountdownTask().load(str(f))
    g = tmp_path / "missing.jsonl"
    g.write_text('{"nums": [1, 2, 3]}\n')
    with pytest.raises(DataError, match="missing.jsonl:1: missing required field 'target' or 'output'"):
        CountdownTask().load(str(g))
    with pytest.raises(ValueError, match="unknown split"):
        CountdownTask().load(split="dev")


def test_d1_test_set(shared_data):
    task = CountdownTask(test_source=str(shared_data / "countdown" / "countdown_cd3_test.jsonl"))
    test = task.load(split="test")
    assert len(test) == 256
    assert test[0].meta == {"numbers": [30, 100, 93], "target": 23}
    assert all(e.target is not None and task.score(e, e.target) == 1.0 for e in test)  # all solvable
    train = task.load(split="train", limit=2000)
    assert not {example_key(e) for e in test} & {example_key(e) for e in train}


def test_answer_only_targets_keep_the_format_and_verify():
    from dlmdistill.tasks.countdown import CountdownTask

    task = CountdownTask(reasoning=False)
    ex = task.load(None, split="train", limit=3)[0]
    assert ex.target.startswith("<reasoning></reasoning><answer>") and ex.target.endswith("</answer>")
    assert task.score(ex, ex.target) == 1.0


@pytest.mark.parametrize("answer", [
    "(30+93)-100 # 9**9**9**9",          # ast.parse would drop the comment and accept
    "(30+93)-100 #",
    "# comment\n(30+93)-100",
    "(30+93)-100\n# 9**9**9**9",
])
def test_rejects_python_comments(answer):
    result = check_answer(answer, NUMBERS, TARGET)
    assert not result.correct and "'#'" in result.reason


@pytest.mark.parametrize("answer, numbers, target", [
    (r"6 \times 8 - 2", [6, 8, 2], 46),
    (r"84 \div 4 + 9", [84, 4, 9], 30),
    (r"7 \cdot 5 + 3", [7, 5, 3], 38),
    ("6 × 8 − 2", [6, 8, 2], 46),
    ("84 ÷ 4 + 9", [84, 4, 9], 30),
    (r"\frac{30}{6} + 5", [30, 6, 5], 10),
    (r"\dfrac{84}{4} + 9", [84, 4, 9], 30),
    (r"\left(30 + 93\right) - 100", NUMBERS, TARGET),
    (r"$(30 + 93) - 100$", NUMBERS, TARGET),
    (r"\((30 + 93) - 100\)", NUMBERS, TARGET),
    ("{30 + 93} - 100", NUMBERS, TARGET),
    ("(30 + 93) - 100.", NUMBERS, TARGET),
    (r"30\,+\,93\,-\,100", NUMBERS, TARGET),
])
def test_reads_latex_and_typographic_operators(answer, numbers, target):
    assert check_answer(answer, numbers, target).correct


@pytest.mark.parametrize("answer", [
    r"\sqrt{30 + 93 - 100}", r"30 + 93 - 100 \times", r"\text{30 + 93 - 100}", r"30 \bmod 93 - 100",
    r"{}", "30 + 93 - 100 = 24",
])
def test_latex_is_only_rewritten_never_trusted(answer):
    assert not check_answer(answer, NUMBERS, TARGET).correct


def test_answer_extraction_from_broken_d1_format():
    task = CountdownTask()
    ex = task.example(solve([49, 55, 53], 51))
    right = ["<answer> \\boxed{49 + 55 - 53} </answer>",
             "so 49 + 55 = 104\n</reasoning>\n</answer>\n49 + 55 - 53\n</",     # after a stray </answer>
             "so 49 + 55 = 104\n</reasoning>\n</answer>\n\\boxed{49 + 55 - 53}\n</answ",
             "<answer>\n\\boxed{49 + 55 - 53\n</answer>",                       # unclosed box
             "<answer>\nThe expression is:\n49 + 55 - 53\n</answer>",          # last line of the block
             "<answer>\\boxed{1 + 2}</answer> <answer>\\boxed{49 + 55 - 53}</answer>"]
    wrong = ["\\boxed{49 + 55 - 53}</reasoning><answer>49 + 55 + 53</answer>",  # the answer block decides
             "<answer>\\boxed{49 + 55 - 53} # \\boxed{1}</answer>",
             "49 + 55 = 104. Then 104 - 53 ="]
    assert [task.score(ex, c) for c in right] == [1.0] * len(right)
    assert [task.score(ex, c) for c in wrong] == [0.0] * len(wrong)
    assert task.details(ex, right[1])["expression"] == "49 + 55 - 53"


def test_bounded_solver():
    assert solve([3, 7, 25, 50, 75, 100], 9999, budget=1000).expression == ""   # gives up quickly
    assert solve([30, 100, 93], 23, budget=1000).expression == "(30+93)-100"     # small searches finish


def test_six_number_file_loads_fast(tmp_path):
    import time

    f = tmp_path / "cd6.jsonl"
    rows = [([3, 7, 25, 50, 75, 100], 9999), ([1, 2, 3, 4, 5, 6], 7919), ([2, 4, 6, 8, 10, 12], 1),
            ([5, 10, 15, 20, 25], 9973)] * 10    # unsolvable or hard targets: a full search takes seconds each
    f.write_text("".join(json.dumps({"input": ",".join(map(str, n)), "output": str(t)}) + "\n" for n, t in rows))
    task = CountdownTask(test_source=str(f))
    start = time.perf_counter()
    test = task.load(split="test")
    assert time.perf_counter() - start < 2.0
    assert len(test) == 40 and test[0].meta == {"numbers": [3, 7, 25, 50, 75, 100], "target": 9999}
    assert test[0].target is None and test[0].references == []
    ex = test[2]   # not solved when read, but scored: (6+8)/(12-10) - (2+4) = 7 - 6 = 1
    assert task.score(ex, "<answer>\\boxed{(6 + 8) \\div (12 - 10) - (2 + 4)}</answer>") == 1.0
    assert task.score(ex, "<answer>\\boxed{(6 + 8) / (12 - 10) - (2 + 4 + 2)}</answer>") == 0.0   # 2 used twice
    start = time.perf_counter()
    train = task.load(str(f), split="train", limit=3)    # training needs targets: bounded search per kept record
    assert time.perf_counter() - start < 5.0
    assert train == []    # every record is held out (the test file itself)


def test_puzzle_size_is_validated(tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_text('{"input": "5", "output": "5"}\n')
    with pytest.raises(DataError, match="one.jsonl:1: a puzzle needs 2 to 12 numbers, got 1"):
        CountdownTask().load(str(f))


def test_model_text_raises_no_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_answer("30abc + 93 - 100", NUMBERS, TARGET).correct
        assert not check_answer("0777 + 1", [777, 1], 778).correct


def test_not_sum_subset_accuracy_is_reported_beside_the_whole_set():
    # hand-made puzzles: two are solved by summing every number (10+20+30=60, 1+2+3=6), two are not
    task = CountdownTask(reasoning=False)
    examples = [task.example(solve(numbers, target)) for numbers, target in
                [([10, 20, 30], 60), ([1, 2, 3], 6), ([4, 5, 6], 14), ([7, 8, 9], 47)]]
    scores = [1.0, 1.0, 1.0, 0.0]  # both sums right, one of the two others right
    metrics = task.aggregate(scores, examples=examples)
    assert metrics["accuracy"] == 75.0
    assert metrics["accuracy_not_sum"] == 50.0
    assert metrics["n_not_sum"] == 2.0
    assert "accuracy_not_sum" not in task.aggregate(scores)  # without the examples: the whole set only


@pytest.mark.parametrize("numbers, target, expected", [
    ([12, 11, 41], 64, "(12+11)+41"),   # the prompt's order, + first
    ([46, 94, 61], 79, "(46+94)-61"),   # + before -
    ([78, 76, 30], 60, "(78-76)*30"),   # - before *
    ([54, 19, 63], 28, "(19+63)-54"),   # the prompt's order has no left-to-right solution: the next order
    ([6, 4, 3], 8, "(6*4)/3"),          # * before /
    ([5, 3, 2], 4, "(5+3)/2"),          # +, -, * of 8 and 2 miss; / is the last operator tried
])
def test_ordered_solution_is_the_first_left_to_right_solution_in_prompt_order(numbers, target, expected):
    puzzle = ordered_solution(numbers, target)
    assert puzzle.expression == expected
    assert check_answer(puzzle.expression, numbers, target).correct


def test_ordered_training_targets_are_correct_and_independent_of_the_generating_expression():
    generated = CountdownTask(reasoning=False).load(split="train", limit=300)
    ordered = CountdownTask(reasoning=False, solution="ordered").load(split="train", limit=300)
    assert [e.prompt for e in generated] == [e.prompt for e in ordered]  # the same puzzles
    assert all(check_answer(e.references[0], e.meta["numbers"], e.meta["target"]).correct for e in ordered)
    assert sum(g.references != o.references for g, o in zip(generated, ordered)) > 100
    with pytest.raises(ValueError, match="unknown solution"):
        CountdownTask(solution="shortest")
