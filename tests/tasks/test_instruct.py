import json

import pytest

from dlmdistill.tasks.base import Example
from dlmdistill.tasks.instruct import InstructTask, build_prompt, rouge_l
from dlmdistill.tasks.io import DataError, read_records

EVAL_SETS = ["dolly", "self-inst", "vicuna", "sinst", "uinst"]


# ROUGE-L by hand. rouge_score lowercases, splits on anything outside [a-z0-9] and Porter-stems
# tokens longer than 3 characters; F = 2PR / (P + R) with P = LCS/len(pred), R = LCS/len(ref).
@pytest.mark.parametrize("prediction, reference, expected", [
    # LCS "the cat on the mat" = 5 of 6 and 6 tokens: P = R = 5/6
    ("the cat sat on the mat", "the cat is on the mat", 100 * 5 / 6),
    # LCS "a c" = 2; P = 2/4, R = 2/3, F = 4/7
    ("a b c d", "a c e", 100 * 4 / 7),
    # stems: dogs->dog, running->run, runs->run; LCS "the dog run" = 3; P = 3/4, R = 1, F = 6/7
    ("The dogs were running", "the dog runs", 100 * 6 / 7),
    # case and punctuation are not tokens
    ("Hello, World!", "hello world", 100.0),
    # LCS is a subsequence, not a substring: "a c e" in "a b c d e" = 3; P = 3/5, R = 1, F = 3/4
    ("a b c d e", "a c e", 75.0),
    ("", "anything at all", 0.0),
    ("no overlap here", "completely different words", 0.0),
])
def test_rouge_l_hand_checked(prediction, reference, expected):
    assert rouge_l(prediction, [reference]) == pytest.approx(expected)


def test_rouge_l_is_the_max_over_references():
    refs = ["a c e", "the cat is on the mat", "zzz"]
    assert rouge_l("the cat sat on the mat", refs) == pytest.approx(100 * 5 / 6)
    assert rouge_l("the cat sat on the mat", refs[::-1]) == pytest.approx(100 * 5 / 6)
    with pytest.raises(ValueError):
        rouge_l("x", [])


def test_prompt_templates_exact():
    assert build_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert build_prompt("Summarise.", "Some text.") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Summarise.\n\n### Input:\nSome text.\n\n### Response:\n")


def test_load_dolly_format_and_score(tmp_path):
    f = tmp_path / "train.jsonl"
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Title it.", "context": "A text.", "response": ["A title", "Another title"]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = InstructTask()
    a, b = task.load(str(tmp_path), split="train")
    assert a.prompt == build_prompt("Name a colour.") and a.target == "Blue." and a.references == ["Blue."]
    assert b.prompt == build_prompt("Title it.", "A text.") and b.references == ["A title", "Another title"]
    assert a.source == f"{f}:1"
    assert task.metric == "rouge_l"
    assert task.score(a, " blue \n") == pytest.approx(100.0)
    assert task.score(b, "another title") == pytest.approx(100.0)
    assert task.score(a, "red") == 0.0
    assert task.details(b, "another title")["rouge_l_per_reference"] == pytest.approx([50.0, 100.0])  # LCS "title" = 1 of 2 and 2
    assert task.aggregate([100.0, 50.0]) == {"rouge_l": 75.0}


def test_load_errors_name_the_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    with pytest.raises(DataError, match="d.jsonl:2: missing required field 'output' or 'response'"):
        InstructTask().load(str(f))
    g = tmp_path / "e.jsonl"
    g.write_text('{"instruction": "x", "output": []}\n')
    with pytest.raises(DataError, match="e.jsonl:1: field 'output' must be"):
        InstructTask().load(str(g))
    with pytest.raises(DataError, match="needs a source"):
        InstructTask().load()


@pytest.mark.parametrize("name", EVAL_SETS)
def test_template_reproduces_minillm_prompts_byte_for_byte(shared_data, name):
    folder = shared_data / "minillm_eval" / name
    records = read_records(folder, "test")
    examples = InstructTask().load(str(folder), split="test")
    assert len(examples) == len(records) > 0
    for (record, where), example in zip(records, examples):
        assert example.prompt == record["prompt"], where
        assert example.references == (record["output"] if isinstance(record["output"], list) else [record["output"]])


def test_minillm_training_set_loads(shared_data):
    examples = InstructTask().load(str(shared_data / "dolly" / "train_minillm_decoded.jsonl"), split="train")
    assert len(examples) == 11435
    assert all(ex.target for ex in examples)


def test_reference_scores_itself_100():
    ex = Example(prompt="p", references=["Virgin Australia commenced services on 31 August 2000."])
    assert InstructTask().score(ex, ex.references[0]) == pytest.approx(100.0)
