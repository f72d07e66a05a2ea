"""``dlmdistill score``: re-scoring saved generations (ours and d1's) without a model.

The expected verdicts are those of the hand-written fixtures (tests/tasks/fixtures/); the d1 files
follow the layout of d1's ``eval/eval.py`` output (a top-level ``generations`` list of
``question`` / ``generations`` / ``ground_truth`` items, text decoded with special tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dlmdistill.cli import main
from dlmdistill.score import score_generations

FIXTURES = Path(__file__).parent / "tasks" / "fixtures"


def run(argv, capsys):
    rc = main(["score", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_d1_gsm8k_file(tmp_path, capsys):
    src = tmp_path / "gsm8k_instruct_256_128_0_generations.json"
    shutil.copy(FIXTURES / "d1_gsm8k_generations.json", src)
    rc, out, err = run(["--task", "gsm8k", str(src)], capsys)
    assert rc == 0, err
    # 18 (boxed), 6,277 (d1 reads 6), 17 (wrong), a box in the reasoning then 18 (d1 reads 9)
    assert "accuracy 75.00% (3/4)" in out
    verdicts = tmp_path / "gsm8k_instruct_256_128_0_generations.scored.jsonl"
    rows = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, False, True]
    assert [r["predicted"] for r in rows] == ["18", "6277", "17", "18"]
    assert rows[1]["gold"] == "6277" and rows[0]["source"].endswith("generations[0]")
    assert str(verdicts) in out


def test_d1_countdown_file(tmp_path):
    result = score_generations(FIXTURES / "d1_countdown_generations.json", "countdown", out=tmp_path / "v.jsonl")
    assert result["format"] == "d1" and result["n"] == 3 and result["changed"] is None
    assert result["metrics"]["accuracy"] == pytest.approx(200 / 3)
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, False]
    assert rows[1]["expression"] == "(30 + 93) - 100"     # after a stray </answer>, before a cut-off tag


def test_d1_sudoku_and_math_files(tmp_path):
    puzzle, solution = "3102200002100320", "3142243142131324"
    d1 = {"generations": [
        {"question": f"Solve the following Sudoku puzzle: {puzzle}\n", "ground_truth": solution,
         "generations": f"Fill the blanks.\n</reasoning>\n<answer>\n{solution}\n</answer><|eot_id|><|endoftext|>"},
        {"question": f"Solve the following Sudoku puzzle: {puzzle}\n", "ground_truth": solution,
         "generations": "Stuck.\n</reasoning>\n<answer>\n3112243142131324\n</answer><|eot_id|>"}]}
    f = tmp_path / "sudoku_generations.json"
    f.write_text(json.dumps(d1))
    result = score_generations(f, "sudoku")
    assert result["metrics"]["accuracy"] == 50.0                          # one solved
    assert result["metrics"]["mean_reward"] == pytest.approx((1 + 7 / 8) / 2)   # 7 of 8 blanks in the other
    math = {"generations": [
        {"question": "q", "ground_truth": "\\frac{3}{4}", "generations": "x\n</reasoning>\n<answer>\n\\boxed{0.75}\n</answer>"},
        {"question": "q", "ground_truth": "5", "generations": "x\n</reasoning>\n<answer>\n\\boxed{6}\n</answer>"}]}
    g = tmp_path / "math_generations.json"
    g.write_text(json.dumps(math))
    assert score_generations(g, "math500")["metrics"]["accuracy"] == 50.0


def _own_rows():
    """Rows as ``evaluate_model`` writes them (keys: steps, seed, index, prompt, completion,
    references, score, correct, task details), with the scores an older verifier gave."""
    rows = []
    for seed, completions, old in [(10, ["<answer>\\boxed{30 + 93 - 100}</answer>", "<answer>30+93+100</answer>"], [0.0, 0.0]),
                                   (20, ["<answer>(30+93)-100</answer>", "</answer>\n(30+93)-100\n</"], [1.0, 0.0])]:
        for i, c in enumerate(completions):
            prompt = ("numbers: 30 100 93 target: 23\n" if i == 0 else
                      "Using the numbers 30, 100, 93, write an arithmetic expression that equals 23. Use each ...")
            rows.append({"steps": 8, "seed": seed, "index": i, "prompt": prompt, "completion": c,
                         "references": ["(30+93)-100"], "score": old[i], "correct": old[i] == 1.0})
    return rows


def test_own_eval_folder(tmp_path, capsys):
    folder = tmp_path / "eval" / "countdown"
    folder.mkdir(parents=True)
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _own_rows()))
    rc, out, err = run(["--task", "countdown", str(folder)], capsys)
    assert rc == 0, err
    assert "accuracy 75.00% (3/4)" in out
    assert "steps=8 seed=10: accuracy 50.00%" in out and "steps=8 seed=20: accuracy 100.00%" in out
    assert "differ from the scores stored in the file: 2" in out
    rows = [json.loads(line) for line in (folder / "generations.scored.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["index"], r["correct"], r["previous_score"]) for r in rows] == [
        (10, 0, True, 0.0), (10, 1, False, 0.0), (20, 0, True, 1.0), (20, 1, True, 0.0)]


def test_own_sudoku_and_gsm8k_rows(tmp_path):
    puzzle, solution = "3102200002100320", "3142243142131324"
    grid = "\n".join(puzzle[r * 4:(r + 1) * 4] for r in range(4))
    rows = [{"prompt": f"sudoku: {puzzle}\n", "completion": f"<answer>{solution}</answer>", "references": [solution]},
            {"prompt": f"Solve this 4x4 Sudoku. ... The grid, row by row:\n{grid}\nThink step by step ...",
             "completion": "<answer>3112243142131324</answer>", "references": [solution]}]
    f = tmp_path / "generations.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score_generations(f, "sudoku")["metrics"]["mean_reward"] == pytest.approx((1 + 7 / 8) / 2)
    g = tmp_path / "gsm.jsonl"
    g.write_text(json.dumps({"prompt": "q", "completion": "<answer>\\boxed{6,277}</answer>", "references": ["6277"]}) + "\n")
    assert score_generations(g, "gsm8k")["metrics"]["accuracy"] == 100.0


def test_never_overwrites(tmp_path, capsys):
    src = tmp_path / "g.json"
    shutil.copy(FIXTURES / "d1_gsm8k_generations.json", src)
    existing = tmp_path / "g.scored.jsonl"
    existing.write_text("the user's own file\n")
    rc, out, err = run(["--task", "gsm8k", str(src)], capsys)
    assert rc == 2 and "already exists; not overwriting" in err and str(existing) in err
    assert existing.read_text() == "the user's own file\n"
    mine = tmp_path / "mine.txt"
    mine.write_text("keep\n")
    rc, out, err = run(["--task", "gsm8k", str(src), "--out", str(mine)], capsys)
    assert rc == 2 and mine.read_text() == "keep\n"
    rc, out, err = run(["--task", "gsm8k", str(src), "--out", str(src)], capsys)   # not even the input
    assert rc == 2 and src.read_bytes() == (FIXTURES / "d1_gsm8k_generations.json").read_bytes()


@pytest.mark.parametrize("content, task, message", [
    (None, "gsm8k", "no such file or folder"),
    ("", "gsm8k", "the file is empty"),
    (b"\xff\xfe\x00bad", "gsm8k", "not UTF-8 text"),
    ("not json at all\n", "gsm8k", ":1: malformed JSON line"),
    ('{"results": []}', "gsm8k", "without a top-level 'generations' list"),
    ('{"generations": []}', "gsm8k", "no generations to score"),
    ('{"generations": [{"question": "q", "generations": "<answer>1</answer>"}]}', "gsm8k",
     "generations[0]: missing required field 'ground_truth'"),
    ('{"generations": [{"question": "q", "ground_truth": 3}]}', "gsm8k", "generations[0]: missing text field 'generations'"),
    ('{"generations": [{"question": "q", "generations": "x", "ground_truth": "abc"}]}', "gsm8k", "is not a number"),
    ('{"generations": ["text"]}', "gsm8k", "generations[0]: expected an object"),
    ('{"prompt": "q", "completion": "x"}\n{"prompt": "q", "completion": "y", "references": ["1"]}\n', "gsm8k",
     ":1: missing gold answer"),
    ('{"prompt": "q", "references": ["1"]}\n{"prompt": "q"}\n', "gsm8k", ":1: missing text field 'completion'"),
    ('{"prompt": "no puzzle here", "completion": "x", "references": ["1"]}\n', "countdown",
     ":1: no Countdown numbers and target"),
    ('{"question": "q", "generations": [{"question": "Numbers: [1, 2]", "generations": "x", "ground_truth": [[1, 2], 3]}]}',
     "sudoku", "generations[0]: no 16-digit Sudoku puzzle"),
    ('{"generations": [{"question": "Sudoku puzzle: 3102200002100320", "generations": "x", "ground_truth": "1234"}]}',
     "sudoku", "is not a valid completion of the puzzle"),
])
def test_bad_files_are_one_clear_line(tmp_path, capsys, content, task, message):
    f = tmp_path / "gen.json"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    rc, out, err = run(["--task", task, str(f)], capsys)
    assert rc == 2
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "gen.scored.jsonl").exists()


def test_folder_without_generations_and_unknown_task(tmp_path, capsys):
    rc, out, err = run(["--task", "gsm8k", str(tmp_path)], capsys)
    assert rc == 2 and "a folder without generations.jsonl" in err
    with pytest.raises(SystemExit) as e:    # argparse: usage line and exit status 2
        main(["score", "--task", "instruct", str(tmp_path)])
    assert e.value.code == 2
    assert "invalid choice: 'instruct'" in capsys.readouterr().err


def test_python_api(tmp_path):
    from dlmdistill import api

    result = api.score_generations(FIXTURES / "d1_gsm8k_generations.json", "gsm8k", out=tmp_path / "v.jsonl")
    assert result["n"] == 4 and result["metrics"]["accuracy"] == 75.0
    assert Path(result["verdicts"]).is_file()


def test_task_data_stored_by_evaluate_wins_over_the_prompt(tmp_path):
    """``evaluate`` stores each item's task data (``meta``); scoring uses it, whatever the prompt says."""
    row = {"prompt": "a prompt in a template score cannot parse", "completion": "<answer>(30+93)-100</answer>",
           "references": [], "meta": {"numbers": [30, 100, 93], "target": 23}}
    f = tmp_path / "generations.jsonl"
    f.write_text(json.dumps(row) + "\n")
    assert score_generations(f, "countdown")["metrics"]["accuracy"] == 100.0


def test_rescoring_evaluate_output_reproduces_its_verdicts(tmp_path, model_and_tok):
    from dlmdistill.evaluation import evaluate_model
    from dlmdistill.sampling import GenerationConfig
    from dlmdistill.tasks.registry import get_task

    model, tok = model_and_tok
    task = get_task("countdown")
    examples = task.load(None, split="test", limit=6)
    report = evaluate_model(model, tok, task, examples, GenerationConfig(gen_length=16, steps=4), [4], [10],
                            output_dir=tmp_path / "eval", progress=False)
    result = score_generations(tmp_path / "eval", "countdown")
    assert result["metrics"]["accuracy"] == report["results"]["4"]["seeds"]["10"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.scored.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["score"] == r["previous_score"] for r in rows)
