"""End to end through the command line: train, generate, evaluate, report, demo (tiny sizes)."""

import json
import logging

import pytest

from dlmdistill.cli import main

TINY = ["--preset_overrides", "{hidden_size: 32, intermediate_size: 64}", "--progress_bar", "false"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "sft"
    rc = main(["train", "sft", "--task", "countdown", "--train_limit", "200", "--max_steps", "6",
               "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--save_steps", "3",
               "--eval_steps", "3", "--eval.limit", "8", "--eval.generation.gen_length", "48",
               "--eval.generation.steps", "12", "--output_dir", str(out), "--report_to", "jsonl", *TINY])
    assert rc == 0
    return out


def test_train_writes_a_complete_run_folder(sft_run):
    for name in ("config.yaml", "logs.jsonl", "final/config.json", "final/model.safetensors", "tokenizer",
                 "checkpoints/step-0000006/trainer_state.json", "final_metrics.json"):
        assert (sft_run / name).exists(), name
    logs = [json.loads(x) for x in (sft_run / "logs.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in rec for rec in logs)
    cfg = json.loads((sft_run / "final" / "config.json").read_text())
    assert cfg["is_causal"] is False and isinstance(cfg["mask_token_id"], int)


def test_resume_continues_to_more_steps(sft_run, tmp_path):
    import shutil

    run = tmp_path / "sft"
    shutil.copytree(sft_run, run)
    rc = main(["train", "sft", "--config", str(run / "config.yaml"), "--output_dir", str(run), "--max_steps", "8",
               "--resume", "--eval.enabled", "false"])
    assert rc == 0
    steps = [json.loads(x)["step"] for x in (run / "logs.jsonl").read_text().splitlines()]
    assert max(steps) == 8


def test_generate_and_evaluate(sft_run, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(sft_run), "--prompt", "numbers: 1 2 3 target: 6\n",
                 "--gen_length", "32", "--steps", "8", "--output", str(out), "--trajectory",
                 str(tmp_path / "traj.safetensors")]) == 0
    rec = json.loads(out.read_text())
    assert set(rec) == {"prompt", "completion"}
    from safetensors.torch import load_file

    traj = load_file(str(tmp_path / "traj.safetensors"))
    assert traj["states"].shape[0] == 8 and traj["committed"].sum() == 32
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(sft_run), "--task", "countdown", "--limit", "6", "--steps", "8", "16",
                 "--seeds", "10", "20", "--gen_length", "32", "--output_dir", str(ev), "--progress_bar", "false"]) == 0
    report = json.loads((ev / "metrics.json").read_text())
    assert set(report["results"]) == {"8", "16"} and set(report["results"]["8"]["seeds"]) == {"10", "20"}
    lines = (ev / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 6
    assert "| 8 |" in capsys.readouterr().out


def test_evaluate_checks_the_blocks_with_the_step_counts_it_runs(sft_run, tmp_path, capsys):
    # 3 blocks: the step counts 6 and 12 divide them, generation.steps' default 8 does not (it is replaced)
    ev = tmp_path / "ev"
    args = ["evaluate", "--model", str(sft_run), "--task", "countdown", "--limit", "2", "--gen_length", "24",
            "--block_length", "8", "--seeds", "0", "--output_dir", str(ev), "--progress_bar", "false"]
    assert main([*args, "--steps", "6", "12"]) == 0
    assert set(json.loads((ev / "metrics.json").read_text())["results"]) == {"6", "12"}
    capsys.readouterr()
    assert main([*args, "--steps", "6", "8"]) == 2  # a step count the blocks do not divide is still refused
    assert "steps (8) must be a multiple of the number of blocks (3)" in capsys.readouterr().err


def test_evaluate_a_run_with_its_own_settings(sft_run, tmp_path, capsys):
    """Without generation options, a run is evaluated as it was during training (its config.yaml: 48
    tokens, 12 steps, its task options); what the command line gives wins; another task drops the run's
    task options."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["task_kwargs"] = {"style": "d1", "solution": "ordered"}  # 'solution': countdown only
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    common = ["--limit", "2", "--seeds", "0", "--progress_bar", "false"]
    assert main(["evaluate", "--model", str(run / "final"), "--output_dir", str(tmp_path / "a"), *common]) == 0
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(report["results"]) == {"12"} and report["generation"]["gen_length"] == 48
    rows = [json.loads(x) for x in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("Using the numbers") for r in rows)  # the run's d1-style prompts
    assert "evaluation settings of the run" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(run), "--gen_length", "32", "--steps", "8", "--task_kwargs", "{style: compact}",
                 "--output_dir", str(tmp_path / "b"), *common]) == 0
    report = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert set(report["results"]) == {"8"} and report["generation"]["gen_length"] == 32
    rows = [json.loads(x) for x in (tmp_path / "b" / "generations.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("numbers:") for r in rows)
    assert main(["evaluate", "--model", str(run), "--task", "sudoku", "--output_dir", str(tmp_path / "c"),
                 *common]) == 0  # the run's countdown options are not handed to sudoku


def test_the_python_api_evaluates_a_run_with_its_own_settings_as_the_command_line_does(sft_run, tmp_path):
    import shutil

    import yaml

    import dlmdistill as dd

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["task_kwargs"] = {"style": "d1"}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    report = dd.evaluate(str(run / "final"), seeds=[0], limit=2, output_dir=str(tmp_path / "a"))
    assert set(report["results"]) == {"12"} and report["generation"]["gen_length"] == 48  # no task given either
    rows = [json.loads(x) for x in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("Using the numbers") for r in rows)
    report = dd.evaluate(str(run), steps=[8], seeds=[0], limit=2, gen_length=32, task_kwargs={"style": "compact"},
                         output_dir=str(tmp_path / "b"))
    assert set(report["results"]) == {"8"} and report["generation"]["gen_length"] == 32


def test_the_python_api_generates_with_the_runs_decoding(sft_run, monkeypatch):
    import dlmdistill as dd
    import dlmdistill.sampling as sampling

    seen = []
    real = sampling.generate_texts
    monkeypatch.setattr(sampling, "generate_texts", lambda m, t, p, gen, **kw: seen.append(gen) or real(m, t, p, gen, **kw))
    dd.generate(str(sft_run), ["numbers: 1 2 3 target: 6\n"])
    dd.generate(str(sft_run), ["numbers: 1 2 3 target: 6\n"], gen_length=32, steps=8)
    assert (seen[0].gen_length, seen[0].steps) == (48, 12) and (seen[1].gen_length, seen[1].steps) == (32, 8)


def test_generate_uses_the_runs_decoding_unless_told(sft_run, tmp_path):
    from safetensors.torch import load_file

    base = ["generate", "--model", str(sft_run), "--prompt", "numbers: 1 2 3 target: 6\n", "--output",
            str(tmp_path / "g.jsonl"), "--trajectory", str(tmp_path / "t.safetensors")]
    assert main(base) == 0  # the run evaluated with 48 tokens in 12 steps
    traj = load_file(str(tmp_path / "t.safetensors"))
    assert traj["states"].shape[0] == 12 and traj["committed"].sum() == 48
    assert main([*base, "--gen_length", "16", "--steps", "4"]) == 0
    traj = load_file(str(tmp_path / "t.safetensors"))
    assert traj["states"].shape[0] == 4 and traj["committed"].sum() == 16


def test_toy_check_on_a_run_folder(sft_run, tmp_path, capsys):
    out = tmp_path / "toy.json"
    assert main(["toy-check", "--model", str(sft_run), "--limit", "4", "--pass_k", "2", "--rhos", "0.5",
                 "--gen_length", "48", "--block_length", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Gate (" in printed and "| self-teacher, rho = 0.25 |" in printed
    report = json.loads(out.read_text())
    assert report["n"] == 4 and set(report["self_teacher"]) == {"0.5", "0.25"}
    assert report["settings"] == {"pass_k": 2, "retry_temperature": 1.0, "pass_k_mode": "first_accepted",
                                  "reveal": "content", "gen_length": 48, "block_length": 16, "steps": 24,
                                  "temperature": 0.0}
    assert report["task"]["name"] == "countdown" and len(report["blocks"]) == 3
    # a model folder that is not a run names the missing task
    assert main(["toy-check", "--model", str(sft_run / "final"), "--gen_length", "48", "--limit", "2", "--pass_k", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["toy-check", "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "name the task with --task" in capsys.readouterr().err


def test_report(sft_run, tmp_path):
    out = tmp_path / "report.md"
    assert main(["report", str(sft_run), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Summary" in text and "loss" in text
    assert (tmp_path / "report_figures" / "loss.png").exists()


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  learning_rat: 1e-3\n")
    assert main(["train", "sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml.training: unknown key 'learning_rat'" in err and "learning_rate" in err


def test_malformed_data_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n{not json\n')
    rc = main(["train", "sft", "--task", "instruct", "--train_source", str(data), "--eval.enabled", "false",
               "--output_dir", str(tmp_path / "r"), *TINY])
    assert rc == 2
    assert f"{data}:2" in capsys.readouterr().err


def test_help_lists_options(capsys):
    assert main(["train", "sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--training.learning_rate" in out and "--method.normalization" in out


def test_demo_quick(tmp_path):
    from dlmdistill.demo import run_demo

    res = run_demo(str(tmp_path / "demo"), "quick")
    assert "base" in res["accuracy"] and "sft" in res["accuracy"]
    assert (tmp_path / "demo" / "results.png").exists() and (tmp_path / "demo" / "results.md").exists()


def test_generate_with_an_autoregressive_run(tmp_path):
    out = tmp_path / "ar"
    assert main(["train", "ar-sft", "--task", "countdown", "--train_limit", "50", "--max_steps", "2",
                 "--per_device_train_batch_size", "8", "--eval.enabled", "false", "--output_dir", str(out),
                 "--report_to", "jsonl", *TINY]) == 0
    gen = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(out), "--prompt", "numbers: 1 2 3 target: 6\n", "--gen_length", "12",
                 "--steps", "12", "--temperature", "0", "--output", str(gen)]) == 0
    assert json.loads(gen.read_text())["prompt"].startswith("numbers")


def test_report_plots_evaluation_against_optimizer_steps(tmp_path):
    from dlmdistill.report import load_run, series

    run = tmp_path / "r"
    run.mkdir()
    (run / "logs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "optimizer_steps": 4, "loss": 1.0},
        {"step": 2, "optimizer_steps": 8, "loss": 0.5},
        {"step": 2, "optimizer_steps": 8, "eval/accuracy": 30.0},
    ]) + "\n")
    assert series(load_run(run), "eval/accuracy") == ([8], [30.0])
    assert series(load_run(run), "loss") == ([4, 8], [1.0, 0.5])


def _python(code_or_args: list[str]):
    """Run ``python ARGS`` with this checkout's package first on the path; (completed process, seconds)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import dlmdistill

    env = dict(os.environ, PYTHONPATH=str(Path(dlmdistill.__file__).parents[1]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env, timeout=120)
    return proc, time.perf_counter() - start


def test_top_level_help_is_fast_and_lists_every_command():
    from dlmdistill.cli import COMMANDS

    proc, seconds = _python(["-m", "dlmdistill.cli", "--help"])
    print(f"dlmdistill --help: {seconds:.2f} s")
    assert proc.returncode == 0, proc.stderr
    # torch alone takes several seconds to import here; the help must not wait for it
    assert seconds < 3.0, f"dlmdistill --help took {seconds:.2f} s"
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and line.strip()]
    assert listed == list(COMMANDS)  # one line each, every command
    assert "``" not in proc.stdout and "llada|dream|smdm|ar" in proc.stdout


@pytest.mark.parametrize("command", ["train", "report", "score", "convert", "demo"])
def test_command_help_without_torch_is_fast(command):
    # (every other command's help, train METHOD's included: test_every_help_renders_without_torch)
    proc, seconds = _python(["-m", "dlmdistill.cli", command, "--help"])
    print(f"dlmdistill {command} --help: {seconds:.2f} s")
    assert proc.returncode == 0, proc.stderr
    assert seconds < 3.0, f"dlmdistill {command} --help took {seconds:.2f} s"
    assert "usage" in proc.stdout.lower()


def test_importing_the_cli_does_not_import_torch():
    code = ("import sys, dlmdistill, dlmdistill.cli, dlmdistill.config; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc, _ = _python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


#: ``--help`` of every command and sub-command, rendered in one fresh process; the modules it loaded after each
_HELP_SCRIPT = """
import contextlib, io, json, sys
from dlmdistill.cli import COMMANDS, main
from dlmdistill.methods import METHODS

cmds = [[]] + [[c] for c in COMMANDS] + [["train", m] for m in METHODS] + [["train", "bogus"]]
cmds += [["convert", f] for f in ("llada", "dream", "smdm", "ar")]
out = {}
for cmd in cmds:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = main([*cmd, "--help"])
        except SystemExit as e:  # argparse's --help
            rc = e.code
    out[" ".join(cmd)] = {"rc": rc, "out": stdout.getvalue(), "err": stderr.getvalue(),
                          "loaded": sorted(m for m in ("torch", "transformers") if m in sys.modules)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
    proc, seconds = _python(["-c", _HELP_SCRIPT])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    print(f"{len(out)} help texts in {seconds:.2f} s")
    return out


def test_every_help_renders_without_torch(helps):
    # the oracle is sys.modules, not the clock: torch and transformers take seconds to import
    for name in ("", "train", "generate", "evaluate", "train sft", "train selffusion", "train kd", "train seqkd",
                 "train ar-sft", "train dopsd", "train diffu-grpo", "convert ar", "estimate", "report", "score"):
        assert name in helps, name
    for name, h in helps.items():
        assert h["loaded"] == [], f"dlmdistill {name} --help imported {h['loaded']}"
        if name == "train bogus":
            assert h["rc"] == 2 and "unknown method 'bogus'" in h["err"]
        else:
            assert h["rc"] == 0 and h["out"].strip(), f"dlmdistill {name} --help: rc {h['rc']}, {h['err']}"


#: every option of each method's own section (``method.*``), as the recipes define them
METHOD_FIELDS = {
    "sft": ["normalization", "cfg_prob", "eps"],
    "selffusion": ["direction", "calibration", "kd_weight", "temperature", "distill_positions", "normalization", "eps",
                   "uncalibrated_diagnostics_every"],
    "kd": ["teacher", "teacher_type", "teacher_dtype", "kd_weight", "ce_weight", "temperature", "divergence",
           "normalization", "eps", "ar_skip_eos_padding"],
    "seqkd": ["teacher", "teacher_type", "teacher_dtype", "generation.gen_length", "generation.steps", "seed",
              "chunk_size", "sft.normalization", "sft.cfg_prob", "sft.eps"],
    "ar-sft": ["normalization"],
    "dopsd": ["rollout.gen_length", "rollout.temperature", "pass_k", "accept_threshold", "correct_only",
              "teacher_context", "rho", "reveal", "reference_template", "teacher", "positions", "confidence",
              "kt_reduction", "divergence", "jsd_beta", "vocab_top_k", "clip", "clip_mode", "train_steps",
              "batch_divide", "pass_k_mode", "rejected", "student_dropout", "micro_batch_size", "overlap_k",
              "max_consecutive_skips"],
    "diffu-grpo": ["rollout.gen_length", "num_generations", "num_iterations", "epsilon", "beta", "p_mask_prompt",
                   "scale_rewards", "random_masking", "micro_batch_size"],
}


@pytest.mark.parametrize("method", list(METHOD_FIELDS))
def test_method_help_lists_the_method_options(helps, method):
    import dataclasses

    from dlmdistill.api import get_method

    text = helps[f"train {method}"]["out"]
    for name in METHOD_FIELDS[method]:
        assert f"  --method.{name} (" in text, f"train {method} --help lacks --method.{name}"
    for section in ("model", "data", "training", "eval", "method"):
        assert f"\n[{section}]" in text
    # the help describes the class the recipe runs with (imported here with its torch code)
    run_cls, _ = get_method(method)
    method_cls = {f.name: f.type for f in dataclasses.fields(run_cls)}["method"]
    for f in dataclasses.fields(method_cls):
        assert f"  --method.{f.name} " in text or f"\n[method.{f.name}]" in text, f.name


def test_help_shows_the_defaults_in_effect(helps):
    # hand-checked against the recipes: d-OPSD's paper rollout, SFT's eps, the evaluate/generate samplers
    assert "--method.rollout.gen_length (int, default 256)" in helps["train dopsd"]["out"]
    assert "--method.rollout.temperature (float, default 0.9)" in helps["train dopsd"]["out"]
    assert "--method.eps (float, default 0.001)" in helps["train sft"]["out"]
    assert "--training.learning_rate (float, default 5e-05)" in helps["train sft"]["out"]
    assert "--eval.generation.steps (int, default 32)" in helps["train sft"]["out"]
    assert "--generation.steps (int, default 8)" in helps["evaluate"]["out"]
    assert "--steps (list[int], default [8, 16, 32])" in helps["evaluate"]["out"]
    assert "--generation.gen_length (int, default 64)" in helps["generate"]["out"]
    assert "--show_delay (float, default 0.05)" in helps["generate"]["out"]


def test_config_classes_keep_their_old_import_paths():
    import dlmdistill.configs as c
    from dlmdistill.data import DataConfig
    from dlmdistill.evaluation import EvalRunConfig
    from dlmdistill.methods.common import TrainEvalConfig, run_config_class
    from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDRunConfig
    from dlmdistill.methods.sft import SFTConfig, SFTRunConfig
    from dlmdistill.models import ModelConfig
    from dlmdistill.sampling import GenerationConfig
    from dlmdistill.training import TrainingConfig

    assert (GenerationConfig, DataConfig, ModelConfig, TrainingConfig, TrainEvalConfig, EvalRunConfig) == (
        c.GenerationConfig, c.DataConfig, c.ModelConfig, c.TrainingConfig, c.TrainEvalConfig, c.EvalRunConfig)
    assert (SFTConfig, SFTRunConfig, DOPSDConfig, DOPSDRunConfig, run_config_class) == (
        c.SFTConfig, c.SFTRunConfig, c.DOPSDConfig, c.DOPSDRunConfig, c.run_config_class)


def test_help_lists_choices_and_real_task_options(capsys):
    assert main(["train", "sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--training.mixed_precision (one of 'no', 'bf16', 'fp16', default 'no')" in out
    assert "text" in out.split("--data.task ", 1)[1].split("\n")[1]  # the task list names the text task
    assert "prompt_style" not in out


def test_task_kwargs_example_in_the_help_is_accepted(tmp_path):
    from dlmdistill.config import load_config
    from dlmdistill.data import DataConfig

    cfg = load_config(DataConfig, None, ["--task", "countdown", "--task_kwargs", "{style: d1}"])
    assert cfg.task_kwargs == {"style": "d1"}
    cfg = load_config(DataConfig, None, ["--task", "text", "--task_kwargs", "{fields: [instruction, output]}"])
    assert cfg.task_kwargs == {"fields": ["instruction", "output"]}


# ------------------------------------------------------------------------------------ your own data (issue 25)
def chat_records(n):
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                            {"role": "assistant", "content": f"{i}"}]}) + "\n" for i in range(n))


OWN = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--eval.generation.gen_length", "8",
       "--eval.generation.steps", "8", "--report_to", "jsonl", *TINY]


def test_own_chat_file_trains_with_one_flag(tmp_path, caplog):
    """The README's example: a chat file and nothing else. The task is told from the records, and the run
    evaluates on a held-out slice of the file, whose size the log states."""
    data, out = tmp_path / "chat.jsonl", tmp_path / "run"
    data.write_text(chat_records(30))
    with caplog.at_level(logging.INFO):
        assert main(["train", "sft", "--model.name_or_path", "preset:tiny", "--data.train_source", str(data),
                     "--output_dir", str(out), *OWN]) == 0
    err = caplog.text
    assert "the records are 'messages' data, so the task is 'instruct'" in err
    assert "holding out 3 of the 30 training records" in err
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["task"] == "instruct"
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["kept"] == 27 and stats["evaluation"]["held_out_records"] == 3
    logs = [json.loads(x) for x in (out / "logs.jsonl").read_text().splitlines()]
    assert any("eval/rouge_l" in rec for rec in logs)


def test_own_data_without_evaluation_gives_one_notice(tmp_path, caplog):
    data, out = tmp_path / "chat.jsonl", tmp_path / "run"
    data.write_text(chat_records(10))
    with caplog.at_level(logging.INFO):
        assert main(["train", "sft", "--model.name_or_path", "preset:tiny", "--data.train_source", str(data),
                     "--eval.when_missing", "skip", "--output_dir", str(out), *OWN]) == 0
    err = caplog.text
    assert err.count("no evaluation during training") == 1 and "eval.when_missing=skip" in err
    assert json.loads((out / "data_stats.json").read_text())["kept"] == 10
    assert not any(k.startswith("eval/") for x in (out / "logs.jsonl").read_text().splitlines() for k in json.loads(x))


def test_train_errors_name_the_default_they_come_from(tmp_path, capsys):
    # 16 evaluation tokens and the default 32 steps: the error says where 32 came from and how to change it
    assert main(["train", "sft", "--task", "countdown", "--eval.generation.gen_length", "16", "--output_dir",
                 str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "steps (32) cannot exceed gen_length (16)" in err
    assert "; steps 32 is the default of eval.generation.steps (--steps overrides it)" in err


def test_evaluate_uses_a_single_step_count_over_the_runs(sft_run, tmp_path, capsys):
    """The run decoded 48 tokens in 12 steps; --gen_length 8 --steps 8 is what the user asked for and runs
    (before, a single --steps value did not replace the run's 12, which 8 tokens cannot take)."""
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(sft_run), "--limit", "2", "--seeds", "0", "--gen_length", "8",
                 "--steps", "8", "--output_dir", str(ev), "--progress_bar", "false"]) == 0
    report = json.loads((ev / "metrics.json").read_text())
    assert set(report["results"]) == {"8"} and report["generation"]["gen_length"] == 8
