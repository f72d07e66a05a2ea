"""Smoke-sized runs of the experiment drivers: every stage end to end in about a minute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: smoke-sized runs of whole experiment drivers (about 2.5 minutes together): python -m pytest -m slow
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("DLMDISTILL_SHARED", ROOT.parent / "shared"))


def run(script: str, out: Path, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--scale", "smoke", "--out", str(out),
                           *extra],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "results.md").read_text()


def test_dopsd_driver_smoke(tmp_path):
    text = run("dopsd/run.py", tmp_path)
    for section in ("## Accuracy", "## Ablations", "## Toy verification"):
        assert section in text
    for row in ("d-OPSD", "diffu-GRPO", "SFT", "forward_kl", "no_clipping", "self_future", "reference_prefix"):
        assert row in text
    assert (tmp_path / "accuracy_vs_steps.png").exists()


def test_dopsd_driver_trace_layout_gate_and_official_stage(tmp_path):
    text = run("dopsd/run.py", tmp_path, "--task", "countdown", "--layout", "trace", "--stages", "gate", "official")
    assert "## Toy verification as a gate" in text and "Gate (" in text
    gate = json.loads((tmp_path / "gate.json").read_text())
    if not gate["gate"]["passed"]:  # an untrained smoke model: the comparison is refused
        assert "the comparison is not run" in text and not (tmp_path / "dopsd_seed0").exists()
    text = run("dopsd/run.py", tmp_path, "--task", "countdown", "--layout", "trace", "--stages", "official",
               "--ignore_gate")
    for row in ("d-OPSD (official recipe)", "diffu-GRPO (d1 settings)", "continued SFT", "self_future"):
        assert row in text
    assert (tmp_path / "official_accuracy_vs_steps.png").exists() and (tmp_path / "val_dopsd_lr0.001_seed0").is_dir()
    import yaml

    cfg = yaml.safe_load((tmp_path / "dopsd_seed0" / "config.yaml").read_text())
    assert cfg["method"]["batch_divide"] == 4 and cfg["method"]["reveal"] == "official"
    assert cfg["model"]["lora_r"] == 4 and cfg["training"]["max_steps"] == 6  # 24 optimizer steps / batch_divide
    val = yaml.safe_load((tmp_path / "val_dopsd_lr0.001_seed0" / "config.yaml").read_text())
    assert val["data"]["task_kwargs"]["test_seed"] == 4321  # validation puzzles, not the test set


@pytest.mark.skipif(not (SHARED / "data").exists(), reason="needs the shared Dolly data")
def test_selffusion_driver_smoke(tmp_path):
    text = run("selffusion/run.py", tmp_path)
    assert "ROUGE-L at 8 steps" in text and "## Latency" in text
    for row in ("| sft |", "| selffusion |", "| kd_dlm |", "| kd_ar |", "| seqkd_dlm |", "| seqkd_ar |",
                "| selffusion_no_rmsnorm |", "| teacher_ar |"):
        assert row in text


def test_selffusion_sudoku_driver_smoke(tmp_path):
    # --only: one process trains the AR teacher and its students (a second one would train the rest in
    # parallel) and leaves every other run folder alone
    run("selffusion/sudoku.py", tmp_path, "--stages", "teachers", "kd", "--only", "teacher_ar", "*_ar_seed*")
    assert (tmp_path / "teacher_ar" / "final").exists() and (tmp_path / "seqkd_ar_seed1" / "final").exists()
    assert not any(p.name.endswith(("dlm", "dlm_seed0", "dlm_seed1")) for p in tmp_path.iterdir())
    text = run("selffusion/sudoku.py", tmp_path)
    for section in ("## Teachers", "## Accuracy", "## Final models at several", "## Ablations", "## Latency"):
        assert section in text
    for row in ("| SFT |", "| SelfFusion |", "| SFT, 2x steps", "easy_to_hard", "hard_to_easy", "no_rmsnorm",
                "| Logit KD, DLM teacher |", "| Logit KD, AR teacher |", "| Sequence KD, DLM teacher |",
                "| Sequence KD, AR teacher |", "| DLM teacher |", "| AR teacher (same size), greedy |"):
        assert row in text
    assert (tmp_path / "accuracy_vs_steps.png").exists()
    # sequence KD: the teacher answers once, every seed trains on the same answers
    answers = [(tmp_path / f"seqkd_dlm_seed{x}" / "seqkd_data.jsonl").read_text() for x in (0, 1)]
    assert answers[0] == answers[1] and len(answers[0].splitlines()) == 16
    steps = [json.loads(line).get("step", 0) for line in (tmp_path / "sft_2x_seed0" / "logs.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # twice the smoke scale's 2 steps: SelfFusion's compute
    # a second study can start from the first one's base; a folder without a model is refused
    again = run("selffusion/sudoku.py", tmp_path / "again", "--base", str(tmp_path / "base" / "final"))
    assert "| SelfFusion |" in again and not (tmp_path / "again" / "base").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "selffusion" / "sudoku.py"), "--scale", "smoke",
                           "--out", str(tmp_path / "bad"), "--base", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "not a model folder" in proc.stderr


def test_demo_lr_validation_never_scores_test_puzzles(tmp_path):
    import importlib.util

    from dlmdistill.demo import run_demo

    spec = importlib.util.spec_from_file_location("demo_lr_validation", ROOT / "experiments" / "demo_lr_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task, examples = module.validation_examples(20)
    from dlmdistill.demo import TASK_KWARGS
    from dlmdistill.tasks.registry import get_task

    test_prompts = {e.prompt for e in get_task("sudoku", **TASK_KWARGS).load(None, split="test")}
    assert len(examples) == 20 and not test_prompts & {e.prompt for e in examples}
    run_demo(str(tmp_path / "demo"), "quick", methods=["sft"])
    assert module.main(["--demo", str(tmp_path / "demo"), "--out", str(tmp_path / "val"), "--size", "quick",
                        "--methods", "sft", "--lrs", "1e-4", "3e-5", "--items", "8", "--threads", "1"]) == 0
    result = json.loads((tmp_path / "val" / "results.json").read_text())
    assert result["items"] == 8 and set(result["accuracy"]["sft"]) == {"0.0001", "3e-05"}


def test_selffusion_finite_driver_smoke(tmp_path):
    """The finite-data study: every run trains on the same puzzles whatever its seed, validates on puzzles
    that are not the test puzzles, and the main stage waits for the learning rates."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "selffusion" / "finite.py"), "--scale", "smoke",
                           "--out", str(tmp_path), "--stages", "main"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "run --stages lr first" in proc.stderr
    text = run("selffusion/finite.py", tmp_path, "--seeds", "0", "1")
    assert "Chosen: sft 0.001, selffusion 0.001" in text
    for row in ("| SFT |", "| SFT, 2x epochs", "D = both", "D = either mode", "(own)", "kd_weight 0", "easy -> hard",
                "hard -> easy", "without RMSNorm", "| Logit KD from a wider DLM teacher", "| SFT, wider model",
                "| SelfFusion, wider model"):
        assert row in text
    assert (tmp_path / "validation_curves.png").exists()
    data = [json.loads((tmp_path / f"sft_seed{x}" / "data_stats.json").read_text()) for x in (0, 1)]
    assert data[0] == data[1]  # the same training puzzles
    import yaml

    cfg = yaml.safe_load((tmp_path / "sft_seed1" / "config.yaml").read_text())
    assert cfg["data"]["seed"] == 0 and cfg["training"]["seed"] == 1
    assert cfg["data"]["task_kwargs"]["test_seed"] != 1234  # validation puzzles, not the test set
    test = json.loads((tmp_path / "sft_seed1" / "eval" / "test" / "metrics.json").read_text())
    assert test["results"]
    steps = [json.loads(x).get("step", 0) for x in (tmp_path / "sft_2x_seed0" / "logs.jsonl").read_text().splitlines()]
    assert max(steps) == 12  # twice SFT's 6 steps
    assert "## 4 epochs on the same puzzles" in text
    for name in ("sft_long_seed0", "sf_long_seed0", "sf_nokd_long_seed0"):
        assert (tmp_path / name / "final").exists()
    cfg = yaml.safe_load((tmp_path / "sf_wide_seed0" / "config.yaml").read_text())
    assert cfg["model"]["preset_overrides"]["hidden_size"] == 64  # the teacher's width
    cfg = yaml.safe_load((tmp_path / "sf_wide_nokd_seed0" / "config.yaml").read_text())
    assert cfg["model"]["preset_overrides"]["hidden_size"] == 64 and cfg["method"]["kd_weight"] == 0.0
    assert "| SelfFusion without the KD term, wider model |" in text
