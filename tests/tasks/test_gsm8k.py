import json

import pytest

from dlmdistill.tasks.gsm8k import GSM8KTask, normalize_number, numbers_equal, predicted_number, split_solution
from dlmdistill.tasks.io import DataError

RECORD = {"question": "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. "
                      "She sells the rest for $2 each. How much does she make?",
          "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"}


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("18.0", "18"), ("18.00", "18"), ("$18", "18"), ("$1,234.50", "1234.5"),
    ("1,000,000 dollars", "1000000"), ("-3 apples", "-3"), ("50%", "50"), ("0.50", "0.5"), (".5", "0.5"),
    ("The answer is 18.", "18"), ("3-4", "4"), ("1,2,3", "3"), ("-0", "0"), ("no number", None), ("", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_equal():
    assert numbers_equal("18", "18") and numbers_equal(normalize_number("18.0"), "18")
    assert not numbers_equal("18", "18.5") and not numbers_equal(None, "18")


def test_training_target_drops_calculator_annotations():
    reasoning, number = split_solution(RECORD["answer"], "x:1")
    assert number == "18"
    assert "<<" not in reasoning and reasoning.endswith("$18 every day at the farmer's market.")
    with pytest.raises(DataError, match="x:1: field 'answer' has no final"):
        split_solution("no final line", "x:1")


def test_load_and_score(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text(json.dumps(RECORD) + "\n")
    task = GSM8KTask()
    (ex,) = task.load(str(tmp_path))
    assert ex.prompt.startswith(RECORD["question"] + "\n") and "<answer>" in ex.prompt
    assert ex.target.startswith("<reasoning>Janet sells 16 - 3 - 4 = 9 duck eggs") and ex.target.endswith("<answer>18</answer>")
    assert ex.references == ["18"] and ex.source == f"{f}:1"
    right = ["<reasoning>9*2=18</reasoning><answer>18</answer>", "<answer>$18.00</answer>",
             "<answer>She makes 18 dollars.</answer>", "<answer>17</answer> no, <answer>18</answer>",
             "so 16-3-4 = 9 and 9*2 = 18", "<answer> 18", ex.target]
    wrong = ["<answer>17</answer>", "<answer>18</answer> wait <answer>19</answer>",
             "<answer>none</answer> 18",   # the tagged answer has no number; no fallback past the tag
             "the answer is eighteen", "", "<answer>180</answer>", "<answer>1.8</answer>"]
    assert [task.score(ex, c) for c in right] == [1.0] * len(right)
    assert [task.score(ex, c) for c in wrong] == [0.0] * len(wrong)
    assert task.details(ex, "<answer>$1,8</answer>") == {"predicted": "8", "gold": "18"}
    assert predicted_number("<answer>1,800</answer>") == "1800"


def test_missing_fields(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="test.jsonl:1: missing required field 'answer'"):
        GSM8KTask().load(str(f))


def test_shared_gsm8k(shared_data):
    task = GSM8KTask()
    test = task.load(str(shared_data / "gsm8k"), split="test")
    train = task.load(str(shared_data / "gsm8k"), split="train")
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].meta["answer"] == "18"
    assert all(task.score(e, e.target) == 1.0 for e in test)
    assert not any("<<" in e.target for e in train)


@pytest.mark.parametrize("completion, expected", [
    (r"<answer>\boxed{13} years old in 3 years</answer>", "13"),     # the box, not the last number
    (r"<answer>\boxed{2:00 pm}</answer>", "2"),                        # d1 reads 2 as well (first number)
    (r"<answer>\boxed{2:30 pm}</answer>", "2.5"),
    (r"<answer>\boxed{6,277}</answer>", "6277"),                       # d1 reads 6
    (r"<answer>\boxed{6{,}277}</answer>", "6277"),
    (r"<answer>\boxed{6\,277}</answer>", "6277"),
    (r"<answer>\boxed{1,000,000}</answer>", "1000000"),
    (r"<answer>\boxed{\frac{7}{2}}</answer>", "3.5"),
    (r"<answer>\boxed{\dfrac{1}{3}}</answer>", "1/3"),
    (r"<answer>7/2</answer>", "3.5"),
    (r"<answer>\boxed{x = 18}</answer>", "18"),
    (r"<answer>\boxed{5 \times 3 = 15}</answer>", "15"),
    (r"<answer>\boxed{12 \text{ m}^2}</answer>", "12"),
    (r"<answer>\boxed{\$18.00}</answer>", "18"),
    (r"<answer>\boxed{-4}</answer>", "-4"),
    (r"<answer>\boxed{18</answer>", "18"),                             # unclosed box
    ("<answer>\n\\boxed{18\n", "18"),                                  # unclosed box and block
    (r"<reasoning>\boxed{9}</reasoning><answer>\boxed{18}</answer>", "18"),
    (r"<answer>\boxed{1} then \boxed{18}</answer>", "18"),             # the last box
    (r"<answer>\boxed{}</answer>", None),
    (r"<answer>\boxed{none} 18</answer>", "18"),                       # a box without a number: the block's last number
    (r"no tags, \boxed{18} dollars and 3 cents", "18"),
    ("9 * 2 = 18.\n</reasoning>\n</answer>\n18\n</", "18"),             # stray </answer>
])
def test_boxed_answers(completion, expected):
    assert predicted_number(completion) == expected


def test_gold_comparison_is_exact():
    task = GSM8KTask()
    from dlmdistill.tasks.base import Example

    half = Example(prompt="", meta={"answer": "3.5"})
    assert task.score(half, r"<answer>\boxed{\frac{7}{2}}</answer>") == 1.0
    assert task.score(half, r"<answer>\boxed{3.50}</answer>") == 1.0
    assert task.score(half, r"<answer>\boxed{3.51}</answer>") == 0.0
    third = Example(prompt="", meta={"answer": "0.33"})
    assert task.score(third, r"<answer>\boxed{\frac{1}{3}}</answer>") == 0.0   # no rounding
