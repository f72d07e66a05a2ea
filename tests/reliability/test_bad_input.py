"""The bad-input suite: every user mistake is one clear line, exit status 2, no traceback, and
nothing written or removed.

Each test feeds the command line (``dlmdistill.cli.main``, in-process; two cases through a real
subprocess at the end) one mistake a new user makes, and checks:

* the exit status is 2;
* stderr holds exactly one line, ``dlmdistill: error: ...``, that names the file, line, key or
  value at fault (the words each test expects), and no traceback;
* the working folder is unchanged: no file created, modified or removed (``Snapshot``).

The last tests cover the rest of the contract: ``--debug`` shows the traceback, a bug (not a user
error) still shows its traceback with exit status 1, and the README's Python API block runs as
written.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dlmdistill
from dlmdistill.cli import main
from dlmdistill.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset_overrides", "{hidden_size: 32, intermediate_size: 64}", "--progress_bar", "false",
        "--report_to", "jsonl", "--max_steps", "2", "--per_device_train_batch_size", "4"]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")  # logging output, not an error message


class Snapshot:
    """Every file under a folder with its size, modification time and content hash."""

    def __init__(self, root: Path):
        self.root = root
        self.files = self._take()

    def _take(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for p in sorted(self.root.rglob("*")):
            st = p.stat()
            out[str(p.relative_to(self.root)) + ("/" if p.is_dir() else "")] = (
                (0, 0, 0) if p.is_dir() else (st.st_size, st.st_mtime_ns, hash(p.read_bytes())))
        return out

    def assert_unchanged(self) -> None:
        now = self._take()
        assert set(now) - set(self.files) == set(), "files created"
        assert set(self.files) - set(now) == set(), "files removed"
        changed = [k for k in now if now[k] != self.files[k]]
        assert not changed, f"files modified: {changed}"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder (the current directory, so that default outputs land in it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def bad_input(capsys, work: Path, argv: list[str], *expected: str) -> str:
    """Run ``dlmdistill ARGV`` in-process on a bad input; check the contract; return the message."""
    snap = Snapshot(work)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1, err
    assert lines[0].startswith("dlmdistill: error: "), lines[0]
    for word in expected:
        assert word in lines[0], (word, lines[0])
    snap.assert_unchanged()
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny saved diffusion model with a 128-position context."""
    from dlmdistill.models import ModelConfig, build_model, char_tokenizer

    tok = char_tokenizer(["0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:\n"])
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(name_or_path="preset:tiny", max_position_embeddings=128, preset_overrides={
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}), tokenizer=tok)
    path = tmp_path_factory.mktemp("bad_input") / "model"
    model.save_pretrained(path, tok)
    return path


# ------------------------------------------------------------------------------------ data files
def test_empty_training_file(capsys, work):
    data = work / "train.jsonl"
    data.write_text("")
    bad_input(capsys, work, ["train", "sft", "--task", "instruct", "--train_source", str(data), "--eval.enabled",
                             "false", "--output_dir", str(work / "run"), *TINY], str(data), "no records")


def test_non_utf8_training_file(capsys, work):
    data = work / "train.jsonl"
    data.write_bytes(b'{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    bad_input(capsys, work, ["train", "sft", "--task", "instruct", "--train_source", str(data), "--eval.enabled",
                             "false", "--output_dir", str(work / "run"), *TINY], f"{data}:2", "not UTF-8", "0xe9")


def test_non_utf8_csv_names_the_line(capsys, work):
    data = work / "train.csv"
    data.write_bytes(b"instruction,input,output\na,,b\nc,,d\n\xff,,e\n")
    bad_input(capsys, work, ["train", "sft", "--task", "instruct", "--train_source", str(data), "--eval.enabled",
                             "false", "--output_dir", str(work / "run"), *TINY], f"{data}:4", "not UTF-8")


# ------------------------------------------------------------------------------------ configuration
def test_config_path_is_a_folder(capsys, work):
    (work / "configs").mkdir()
    bad_input(capsys, work, ["train", "sft", "--config", str(work / "configs")], str(work / "configs"), "folder")


def test_config_file_missing(capsys, work):
    bad_input(capsys, work, ["train", "sft", "--config", "nope.yaml"], "nope.yaml", "not found")


def test_config_file_is_not_yaml(capsys, work):
    cfg = work / "c.yaml"
    cfg.write_text("training:\n  max_steps: [1,\n")
    bad_input(capsys, work, ["train", "sft", "--config", str(cfg)], str(cfg), "invalid YAML", "line")


def test_config_file_not_utf8(capsys, work):
    cfg = work / "c.yaml"
    cfg.write_bytes(b"training:\n  output_dir: caf\xe9\n")
    bad_input(capsys, work, ["train", "sft", "--config", str(cfg)], f"{cfg}:2", "not UTF-8")


def test_unknown_method(capsys, work):
    bad_input(capsys, work, ["train", "sftt"], "'sftt'", "sft", "selffusion")


def test_unknown_command(capsys, work):
    bad_input(capsys, work, ["trian"], "'trian'", "train")


def test_unknown_task_in_train(capsys, work):
    bad_input(capsys, work, ["train", "sft", "--task", "countdwn", "--output_dir", str(work / "run"), *TINY],
              "'countdwn'", "countdown", "sudoku")


def test_unknown_task_in_evaluate(capsys, work, model_dir):
    bad_input(capsys, work, ["evaluate", "--model", str(model_dir), "--task", "gsm9k"], "'gsm9k'", "gsm8k")


def test_unknown_task_kwargs_key_lists_the_valid_ones(capsys, work):
    msg = bad_input(capsys, work, ["train", "sft", "--task", "countdown", "--task_kwargs", "{stlye: d1}",
                                   "--output_dir", str(work / "run"), *TINY], "'stlye'", "task_kwargs")
    assert "style" in msg.split("'stlye'", 1)[1] and "reasoning" in msg


def test_bad_task_kwargs_value(capsys, work):
    bad_input(capsys, work, ["train", "sft", "--task", "countdown", "--task_kwargs", "{style: fancy}",
                             "--train_limit", "16", "--output_dir", str(work / "run"), *TINY], "'fancy'", "compact")


def test_output_dir_is_an_existing_file(capsys, work):
    f = work / "run"
    f.write_text("my notes\n")
    bad_input(capsys, work, ["train", "sft", "--task", "countdown", "--train_limit", "16", "--output_dir", str(f),
                             *TINY], str(f), "existing file")
    assert f.read_text() == "my notes\n"


@pytest.mark.parametrize("option, value, words", [
    ("--max_steps", "-5", ["max_steps", "-5", "-1"]),
    ("--max_steps", "0", ["max_steps", "0"]),
    ("--learning_rate", "-1e-3", ["learning_rate", "-0.001"]),
    ("--learning_rate", "nan", ["learning_rate", "nan"]),
    ("--per_device_train_batch_size", "0", ["per_device_train_batch_size", "0"]),
    ("--gradient_accumulation_steps", "0", ["gradient_accumulation_steps"]),
    ("--warmup_ratio", "1.5", ["warmup_ratio", "1.5"]),
    ("--adam_beta2", "1", ["adam_beta2"]),
    ("--logging_steps", "0", ["logging_steps"]),
    ("--save_steps", "-10", ["save_steps", "-10"]),
    ("--weight_decay", "-0.1", ["weight_decay"]),
    ("--train_limit", "0", ["train_limit", "0"]),
    ("--max_length", "0", ["max_length", "0"]),
])
def test_nonsense_numbers_are_rejected(capsys, work, option, value, words):
    argv = ["train", "sft", "--task", "countdown", "--output_dir", str(work / "run"), *TINY, option, value]
    bad_input(capsys, work, argv, "command line.", *words)


def test_epochs_needed_when_max_steps_is_minus_one(capsys, work):
    argv = ["train", "sft", "--task", "countdown", "--output_dir", str(work / "run"), *TINY,
            "--max_steps", "-1", "--num_train_epochs", "0"]
    bad_input(capsys, work, argv, "num_train_epochs")


# ------------------------------------------------------------------------------------ models and prompts
def test_model_path_missing(capsys, work):
    msg = bad_input(capsys, work, ["generate", "--model", str(work / "runs" / "nope"), "--prompt", "hi"],
                    str(work / "runs" / "nope"), "no such model folder")
    assert "Repo id" not in msg


def test_model_path_relative_missing(capsys, work):
    bad_input(capsys, work, ["generate", "--model", "./runs/nope", "--prompt", "hi"], "./runs/nope", "no such")


def test_model_path_is_not_a_model(capsys, work):
    (work / "notes").mkdir()
    (work / "notes" / "a.txt").write_text("x")
    bad_input(capsys, work, ["evaluate", "--model", str(work / "notes"), "--task", "countdown"], str(work / "notes"),
              "not a model folder", "config.json")


def test_unfinished_run_folder_says_so(capsys, work):
    run = work / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text('{"method": "sft"}')
    bad_input(capsys, work, ["generate", "--model", str(run), "--prompt", "hi"], str(run), "final/", "--resume")


def test_model_path_is_a_file(capsys, work):
    (work / "model.safetensors").write_bytes(b"x")
    bad_input(capsys, work, ["generate", "--model", str(work / "model.safetensors"), "--prompt", "hi"],
              "model.safetensors", "is a file")


def test_preset_model_without_tokenizer(capsys, work):
    bad_input(capsys, work, ["generate", "--model", "preset:tiny", "--prompt", "hi"], "preset:tiny",
              "model.tokenizer")


def test_prompts_file_missing(capsys, work, model_dir):
    bad_input(capsys, work, ["generate", "--model", str(model_dir), "--prompts_file", "prompts.txt",
                             "--output", "out.jsonl"], "prompts.txt", "no such file")


def test_prompts_file_without_prompt_field(capsys, work, model_dir):
    f = work / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    bad_input(capsys, work, ["generate", "--model", str(model_dir), "--prompts_file", str(f)], f"{f}:2", "'prompt'")


def test_generate_prompt_longer_than_the_context(capsys, work, model_dir):
    # 300 prompt tokens (one character each) + 32 generated > 128 positions; nothing is generated or written
    bad_input(capsys, work, ["generate", "--model", str(model_dir), "--prompt", "1" * 300, "--gen_length", "32",
                             "--steps", "8", "--output", "out.jsonl"], "--prompt 1", "300", "332", "128")


def test_generate_long_prompt_in_a_file_names_its_line(capsys, work, model_dir):
    f = work / "p.txt"
    f.write_text("1 2 3\n" + "4" * 120 + "\n")
    bad_input(capsys, work, ["generate", "--model", str(model_dir), "--prompts_file", str(f), "--gen_length", "32",
                             "--steps", "8", "--output", "out.jsonl"], f"{f}:2", "120")


def test_api_generate_checks_the_context(model_dir):
    with pytest.raises(UserError, match="prompt 1: prompt of 300 tokens \\+ gen_length 32 = 332 exceeds the "
                                        "model's 128 positions"):
        dlmdistill.generate(str(model_dir), ["1 2", "1" * 300], gen_length=32, steps=8)


def test_evaluate_prompt_longer_than_the_context(capsys, work, model_dir):
    data = work / "test.jsonl"
    data.write_text(json.dumps({"instruction": "x" * 200, "output": "y"}) + "\n")
    bad_input(capsys, work, ["evaluate", "--model", str(model_dir), "--task", "instruct", "--source", str(data),
                             "--steps", "8", "--seeds", "1", "--gen_length", "32", "--output_dir", "ev"],
              f"{data}:1", "exceeds the model's 128 positions")


# ------------------------------------------------------------------------------------ convert and report
def test_convert_smdm_from_a_file_that_is_not_a_checkpoint(capsys, work):
    src = work / "model.pth"
    src.write_text("this is not a checkpoint\n")
    bad_input(capsys, work, ["convert", "smdm", str(src), str(work / "dst")], str(src), "not a PyTorch checkpoint")


def test_convert_smdm_from_a_broken_safetensors_file(capsys, work):
    src = work / "model.safetensors"
    src.write_bytes(b"\x00" * 4)
    bad_input(capsys, work, ["convert", "smdm", str(src), str(work / "dst")], str(src), "not a valid safetensors")


def test_report_on_a_missing_folder(capsys, work):
    bad_input(capsys, work, ["report", str(work / "runs" / "a")], str(work / "runs" / "a"), "no such run folder")


def test_report_on_an_empty_folder(capsys, work):
    (work / "runs").mkdir()
    bad_input(capsys, work, ["report", str(work / "runs"), "--out", "report.md"], str(work / "runs"),
              "not a run folder")


def test_report_on_a_malformed_log_line(capsys, work):
    run = work / "run"
    run.mkdir()
    (run / "logs.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n{"step": 3, "loss": 1.0}\n')
    bad_input(capsys, work, ["report", str(run)], f"{run / 'logs.jsonl'}:2", "malformed JSON")


def test_report_on_a_log_line_that_is_not_a_record(capsys, work):
    run = work / "run"
    run.mkdir()
    (run / "logs.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')
    bad_input(capsys, work, ["report", str(run)], f"{run / 'logs.jsonl'}:2", "'step'")


# ------------------------------------------------------------------------------------ the rest of the contract
def test_debug_flag_shows_the_traceback(work):
    with pytest.raises(UserError, match="unknown method 'sftt'"):
        main(["--debug", "train", "sftt"])


def test_a_bug_keeps_its_traceback(capsys, work, monkeypatch):
    import dlmdistill.cli as cli

    def broken(argv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    assert main(["report", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "this is a bug" in err


@pytest.mark.parametrize("argv, words", [
    (["train", "nosuch"], ["'nosuch'", "sft"]),
    (["report", "empty"], ["empty", "not a run folder"]),
])
def test_end_to_end_in_a_subprocess(tmp_path, argv, words):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "dlmdistill.cli", *argv], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("dlmdistill: error: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ------------------------------------------------------------------------------------ Python API
def test_evaluate_stays_the_api_function_after_the_submodule_is_imported():
    import importlib

    importlib.import_module("dlmdistill.evaluation")
    from dlmdistill.evaluation import evaluate_model  # the submodule still works  # noqa: F401

    # the implementation module is named ``evaluation``, so importing it cannot shadow the API function
    assert callable(dlmdistill.evaluate) and dlmdistill.evaluate.__module__ == "dlmdistill.api"
    assert dlmdistill.evaluation is sys.modules["dlmdistill.evaluation"]


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_block_runs_as_written(tmp_path, monkeypatch):
    """README's Python API block, executed in a fresh folder. To keep it fast, three numbers in it are
    made smaller (200 training steps -> 2, 100 evaluation items -> 4) and its YAML config is copied with
    smaller data and evaluation sizes; the statements themselves are unchanged."""
    import importlib

    importlib.import_module("dlmdistill.evaluation")  # what made dd.evaluate a module before the fix
    code = readme_python_block()
    assert "configs/sft_countdown_tiny.yaml" in code and "dd.evaluate(" in code
    for old, new in [("max_steps=200", "max_steps=2"), ("limit=100", "limit=4")]:
        assert old in code, old
        code = code.replace(old, new)
    cfg = yaml.safe_load((ROOT / "configs" / "sft_countdown_tiny.yaml").read_text())
    cfg["data"].update(train_limit=64, eval_limit=4)
    cfg["training"].update(per_device_train_batch_size=8, report_to=["jsonl"], progress_bar=False)
    cfg["eval"].update(limit=4, generation={"gen_length": 16, "steps": 4, "batch_size": 4})
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sft_countdown_tiny.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    # run the block statement by statement, keeping the value of each bare expression (dd.train(...), ...)
    namespace: dict = {}
    values = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.Expr):
            values.append(eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace))  # noqa: S307
        else:
            exec(compile(ast.Module([node], type_ignores=[]), "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "runs" / "nb" / "final" / "config.json").exists()
    assert namespace["model"].mask_id is not None and len(namespace["tok"]) > 10
    metrics, texts, report = values
    assert isinstance(metrics, dict)
    assert isinstance(texts, list) and len(texts) == 1 and isinstance(texts[0], str)
    assert report["task"] == "countdown" and report["n"] == 4 and set(report["results"]) == {"12", "24"}


# ------------------------------------------------------------------------------------ more cases found on the way
def test_kd_without_a_teacher(capsys, work):
    bad_input(capsys, work, ["train", "kd", "--task", "countdown", "--output_dir", str(work / "run"), *TINY],
              "method.teacher is required")


def test_a_required_value_may_come_from_the_command_line(work):
    from dlmdistill.api import get_method
    from dlmdistill.config import load_config

    (work / "kd.yaml").write_text("method:\n  temperature: 2.0\n")  # no teacher in the file
    cfg = load_config(get_method("kd")[0], work / "kd.yaml", ["--teacher", "runs/teacher"])
    assert cfg.method.teacher == "runs/teacher" and cfg.method.temperature == 2.0


def test_teacher_with_another_tokenizer(capsys, work, model_dir):
    # a check written as `raise ValueError(...)` in dlmdistill's code (methods/distillation.py) is a user error
    bad_input(capsys, work, ["train", "kd", "--task", "countdown", "--train_limit", "8", "--teacher", str(model_dir),
                             "--eval.enabled", "false", "--output_dir", str(work / "run"), *TINY],
              "same tokenizer", str(model_dir))


@pytest.mark.parametrize("device, words", [("gpu0", ["'gpu0'"]), ("cuda:99", ["'cuda:99'", "CUDA device"])])
def test_bad_device(capsys, work, model_dir, device, words):
    bad_input(capsys, work, ["generate", "--model", str(model_dir), "--prompt", "1 2", "--gen_length", "8",
                             "--steps", "8", "--device", device, "--output", "out.jsonl"], *words)


def test_evaluate_output_dir_is_an_existing_file(capsys, work, model_dir):
    (work / "ev").write_text("keep me\n")
    bad_input(capsys, work, ["evaluate", "--model", str(model_dir), "--task", "countdown", "--limit", "2",
                             "--steps", "8", "--seeds", "1", "--gen_length", "8", "--output_dir", "ev"],
              "'ev'", "existing file")


# ------------------------------------------------------------------------------------ issue 25: own data, values given
def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_own_data_whose_task_cannot_be_told_names_the_task(capsys, work):
    data = write_records(work / "qa.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}])
    bad_input(capsys, work, ["train", "sft", "--train_source", str(data), "--output_dir", str(work / "run"), *TINY],
              f"{data}:1", "data.task is not given", "gsm8k data", "--task gsm8k")
    other = write_records(work / "other.jsonl", [{"query": "a", "reply": "b"}])
    bad_input(capsys, work, ["train", "sft", "--train_source", str(other), "--output_dir", str(work / "run"), *TINY],
              f"{other}:1", "(query, reply)", "--task", "instruct for chat 'messages'", "text for 'text'")


def test_own_data_without_an_evaluation_set_when_told_to_stop(capsys, work):
    data = write_records(work / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "ok"}]}] * 4)
    bad_input(capsys, work, ["train", "sft", "--train_source", str(data), "--eval.when_missing", "error",
                             "--output_dir", str(work / "run"), *TINY],
              "data.eval_source is not set", "instruct task", "--eval.when_missing", "--data.eval_source")


def test_a_file_too_small_to_hold_records_out(capsys, work):
    data = write_records(work / "chat.jsonl", [{"prompt": "hi", "completion": "ok"}])
    bad_input(capsys, work, ["train", "sft", "--train_source", str(data), "--output_dir", str(work / "run"), *TINY],
              f"{data}: 1 training record(s)", "eval.when_missing", "data.eval_source")


def test_long_answer_with_long_examples_error(capsys, work):
    data = write_records(work / "pc.jsonl", [{"prompt": "hi", "completion": "ok"},
                                             {"prompt": "hi", "completion": "a very long answer " * 5}])
    bad_input(capsys, work, ["train", "sft", "--train_source", str(data), "--max_length", "32", "--long_examples",
                             "error", "--eval.enabled", "false", "--output_dir", str(work / "run"), *TINY],
              f"{data}:2", "answer has 96 tokens with its EOS", "the 30 that max_length=32 leaves", "long_examples")


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory) -> Path:
    """A run folder around the tiny model: its config.yaml decodes 48 tokens in blocks of 24, in 24 steps."""
    import shutil

    run = tmp_path_factory.mktemp("bad_input_run") / "run"
    shutil.copytree(model_dir, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": {"task": "countdown", "prompt_format": "plain"},
        "eval": {"generation": {"gen_length": 48, "steps": 24, "block_length": 24}}}))
    return run


def test_generate_names_the_runs_config_for_a_value_not_given(capsys, work, run_dir):
    bad_input(capsys, work, ["generate", "--model", str(run_dir), "--prompt", "1 2", "--gen_length", "32",
                             "--output", "out.jsonl"],
              "gen_length (32) must be a multiple of block_length (24)",
              f"block_length 24 comes from the run's config.yaml, {run_dir / 'config.yaml'}",
              "(--block_length overrides it)")


def test_evaluate_steps_zero_is_refused_not_replaced(capsys, work, run_dir):
    msg = bad_input(capsys, work, ["evaluate", "--model", str(run_dir), "--steps", "0", "--gen_length", "16",
                                   "--block_length", "16", "--limit", "2", "--seeds", "1", "--output_dir", "ev"],
                    "steps must be >= 1, got 0")
    assert "24" not in msg  # not the run's step count


def test_evaluate_names_the_runs_step_count(capsys, work, run_dir):
    bad_input(capsys, work, ["evaluate", "--model", str(run_dir), "--gen_length", "16", "--block_length", "16",
                             "--limit", "2", "--seeds", "1", "--output_dir", "ev"],
              "steps (24) cannot exceed gen_length (16)", "steps 24 comes from the run's config.yaml",
              "(--steps overrides it)")


def test_evaluate_refuses_generation_steps(capsys, work, run_dir):
    bad_input(capsys, work, ["evaluate", "--model", str(run_dir), "--generation.steps", "8", "--limit", "2",
                             "--output_dir", "ev"], "generation.steps", "--steps")


def test_toy_check_names_where_its_decoding_comes_from(capsys, work, run_dir):
    bad_input(capsys, work, ["toy-check", "--model", str(run_dir), "--gen_length", "32", "--out", "t.json"],
              "gen_length (32) must be a multiple of block_length (24)",
              "block_length 24 comes from the run's config.yaml", "(--block_length overrides it)")


@pytest.mark.parametrize("argv, words", [
    (["generate", "--prompt", "1 2", "--output", ""], ["output is an empty string"]),
    (["generate", "--prompt", "1 2", "--output", "out.jsonl", "--trajectory", ""], ["trajectory is an empty string"]),
    (["generate", "--prompts_file", "", "--output", "out.jsonl"], ["prompts_file is an empty string"]),
    (["generate", "--prompt", "1 2", "--output", "out.jsonl", "--device", ""], ["device is an empty string"]),
    (["generate", "--prompt", "1 2", "--output", "out.jsonl", "--block_length", "0"], ["block_length", "got 0"]),
    (["generate", "--prompt", "1 2", "--output", "out.jsonl", "--batch_size", "0"], ["batch_size", "got 0"]),
    (["evaluate", "--task", "countdown", "--limit", "2", "--output_dir", ""], ["output_dir is an empty string"]),
    (["evaluate", "--task", "countdown", "--output_dir", "ev", "--steps", "8", "0"], ["steps must be >= 1, got 0"]),
    (["toy-check", "--task", "countdown", "--gen_length", "0", "--out", "t.json"], ["gen_length must be >= 1, got 0"]),
    (["toy-check", "--task", "countdown", "--gen_length", "8", "--steps", "0", "--out", "t.json"],
     ["steps must be >= 1, got 0"]),
    (["toy-check", "--task", "countdown", "--gen_length", "8", "--limit", "0"], ["--limit must be >= 1, got 0"]),
    (["toy-check", "--task", "countdown", "--gen_length", "8", "--out", ""], ["--out is an empty string"]),
    (["toy-check", "--task", "", "--gen_length", "8", "--out", "t.json"], ["unknown task ''"]),
])
def test_a_falsy_value_given_is_used_or_refused(capsys, work, model_dir, argv, words):
    """A value given on the command line that reads as false (0, '') was replaced by a default before."""
    bad_input(capsys, work, [argv[0], "--model", str(model_dir), *argv[1:]], *words)


def test_api_evaluate_refuses_empty_steps_and_output_dir(model_dir, tmp_path):
    with pytest.raises(UserError, match=r"at least one step count \(steps\) and one seed"):
        dlmdistill.evaluate(str(model_dir), "countdown", steps=[], seeds=[1], limit=2, gen_length=8)
    with pytest.raises(UserError, match="output_dir is an empty string"):
        dlmdistill.evaluate(str(model_dir), "countdown", steps=[8], seeds=[1], limit=2, gen_length=8, output_dir="")
    with pytest.raises(UserError, match="limit must be >= 1"):
        dlmdistill.evaluate(str(model_dir), "countdown", steps=[8], seeds=[1], limit=0, gen_length=8)
