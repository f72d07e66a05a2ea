import json

import pytest

from dlmdistill.tasks.io import DataError
from dlmdistill.tasks.math500 import Math500Task, last_boxed, math_equal, predicted_answer


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}", "5"),
    (r"\boxed{\frac{1}{2}} then \boxed{x^{2}+1}", "x^{2}+1"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}.", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\fbox{7}", "7"),
    (r"$\boxed 5$.", "5"),
    (r"\boxed{unbalanced", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_predicted_answer():
    assert predicted_answer(r"<reasoning>\boxed{1}</reasoning><answer>\frac{1}{2}</answer>") == r"\frac{1}{2}"
    assert predicted_answer(r"<answer>The answer is $\boxed{3}$</answer>") == "3"
    assert predicted_answer(r"so the answer is \boxed{4}") == "4"
    assert predicted_answer("the answer is 4") is None


@pytest.mark.parametrize("gold, predicted", [
    (r"\frac{1}{2}", "0.5"), (r"\frac12", "1/2"), (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("x^2+1", "1+x^2"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})"), (r"10\%", "10"), ("2,000", "2000"),
    (r"\text{Evelyn}", "Evelyn"), (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"), ("$\\frac{1}{2}$", "0.5"),
])
def test_equivalent_answers(gold, predicted):
    assert math_equal(gold, predicted)


@pytest.mark.parametrize("gold, predicted", [
    (r"\frac{1}{2}", "0.51"), ("3", "4"), ("x^2+1", "x^2-1"), (r"(3, \frac{\pi}{2})", r"(\frac{\pi}{2}, 3)"),
    ("5", ""), ("5", None),
])
def test_different_answers(gold, predicted):
    assert not math_equal(gold, predicted)


def test_load_and_score(tmp_path):
    f = tmp_path / "test.jsonl"
    rows = [{"problem": "What is 1/2 as a decimal?", "solution": r"It is $\boxed{0.5}$.", "answer": "0.5"},
            {"problem": "Compute 2+2.", "solution": r"We get $\boxed{4}$."}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = Math500Task()
    a, b = task.load(str(f))
    assert a.meta["answer"] == "0.5" and b.meta["answer"] == "4"   # from the answer field / the last box
    assert a.target == r"<reasoning>It is $\boxed{0.5}$.</reasoning><answer>0.5</answer>"
    assert task.score(a, r"<reasoning>...</reasoning><answer>\frac{1}{2}</answer>") == 1.0
    assert task.score(a, r"<answer>\boxed{\frac{2}{4}}</answer>") == 1.0
    assert task.score(a, r"no tags but \boxed{1/2}") == 1.0
    assert task.score(a, r"<answer>\frac{1}{3}</answer>") == 0.0
    assert task.score(a, "0.5 but no tags or box") == 0.0
    assert task.score(b, b.target) == 1.0
    assert task.details(a, "<answer>0.25</answer>") == {"predicted": "0.25", "gold": "0.5"}
    g = tmp_path / "bad.jsonl"
    g.write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: missing required field 'answer'"):
        task.load(str(g))


def test_works_outside_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_equal, r"\frac{1}{2}", "0.5").result()


def test_shared_math500_gold_agrees_with_boxed_solutions(shared_data):
    task = Math500Task()
    examples = task.load(str(shared_data / "math500"))
    assert len(examples) == 500
    records = [json.loads(line) for line in (shared_data / "math500" / "test.jsonl").open()]
    for ex, record in list(zip(examples, records))[::5]:   # every 5th problem keeps this fast
        assert task.score(ex, record["solution"]) == 1.0, ex.source


def test_unclosed_boxes_and_broken_tags():
    assert predicted_answer("<answer>\n\\boxed{\\frac{1}{2}\n</answer>") == r"\frac{1}{2}"
    assert predicted_answer("half\n</reasoning>\n</answer>\n\\boxed{\\frac{1}{2}}\n</") == r"\frac{1}{2}"
    assert predicted_answer("<answer>\n</answer> so \\boxed{3}") == "3"          # an empty block falls back
    assert last_boxed(r"\boxed{\frac{1}{2}", allow_unclosed=True) == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\frac{1}{2}", allow_unclosed=False) is None
