"""The SmolLM2 d-OPSD driver (experiments/dopsd/smollm2.py): its smoke scale end to end (a tiny random Llama
converted like SmolLM2, Countdown SFT with traces, the toy gate, d-OPSD x2 and continued SFT), and the
settings the 8-minute GPU scale trains with. The real GGUF is never needed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "experiments" / "dopsd" / "smollm2.py"


def load_driver():
    spec = importlib.util.spec_from_file_location("dopsd_smollm2_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(DRIVER), "--scale", "smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def logs(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "logs.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_dopsd_smollm2_driver_smoke(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the student: a causal Llama converted into a bidirectional DLM with shifted logits
    conf = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["dlm_shift_logits"] is True and conf["is_causal"] is False

    # the base learns the trace layout: every target fits the 48 decoded tokens, nothing dropped
    stats = json.loads((tmp_path / "base" / "data_stats.json").read_text())
    assert stats["dropped"] == 0 and stats["longest_response"] <= 48 and stats["max_response_length"] == 48
    base_cfg = yaml.safe_load((tmp_path / "base" / "config.yaml").read_text())
    assert base_cfg["data"]["task_kwargs"] == {"style": "compact", "reasoning": True, "solution": "ordered"}
    assert base_cfg["model"]["lora_r"] == 0
    assert [r["step"] for r in logs(tmp_path / "base") if "eval/accuracy" in r] == [2, 4]

    # the gate ran on the base with the official toy's choices
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert set(gate["self_teacher"]) == {"0.1", "0.25", "0.5"} and "passed" in gate["gate"]

    # every row starts from the base, with the same scaled LoRA, for the same optimizer steps
    for name in ("dopsd", "dopsd_perpos", "sft"):
        cfg = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert cfg["model"]["name_or_path"] == str(tmp_path / "base" / "final")
        assert (cfg["model"]["lora_r"], cfg["model"]["lora_alpha"]) == (16, 8.0)
    clip = {n: yaml.safe_load((tmp_path / n / "config.yaml").read_text())["method"]["clip_mode"]
            for n in ("dopsd", "dopsd_perpos")}
    assert clip == {"dopsd": "per_term", "dopsd_perpos": "per_position"}
    assert max(r.get("optimizer_steps", 0) for r in logs(tmp_path / "dopsd")) == 4
    assert max(r["step"] for r in logs(tmp_path / "sft") if "step" in r) == 4

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rows"]) == {"d-OPSD (official recipe)", "d-OPSD (official recipe, per-position clipping)",
                                    "continued SFT"}
    assert all(r["steps"] == [4] for r in results["rows"].values())
    assert "Gate (" in (tmp_path / "results.md").read_text()

    # resumable: a rerun trains and analyses nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "dopsd" / "wall_seconds.json", tmp_path / "gate.json")}
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip sft (done)" in proc.stderr and "skip dopsd (done)" in proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_gpu_8min_rows():
    """The 8-minute scale: 32 optimizer steps per row (d-OPSD: 8 rollout batches of 4 optimizer steps), bf16,
    the official recipe around the scaled LoRA, evaluations every 16 optimizer steps."""
    d = load_driver()
    s = d.settings("gpu-8min")
    dopsd = d.row_config("dopsd", Path("/r"), "dopsd", s, {})
    sft = d.row_config("sft", Path("/r"), "sft", s, {})
    assert dopsd["training"]["max_steps"] * dopsd["method"]["batch_divide"] == sft["training"]["max_steps"] == 32
    assert dopsd["training"]["eval_steps"] * 4 == sft["training"]["eval_steps"] == 16
    assert dopsd["method"]["clip_mode"] == "per_term" and dopsd["method"]["pass_k"] == 8
    assert dopsd["method"]["rollout"]["temperature"] == 0.9
    for cfg in (dopsd, sft):
        assert cfg["training"]["mixed_precision"] == "bf16" and cfg["model"]["lora_r"] == 16
        assert cfg["model"]["name_or_path"] == "/r/base/final" and cfg["training"]["learning_rate"] == 1e-4


def test_cpu_scale_waits_for_the_gate(tmp_path):
    """Where the scale requires the gate, a base that failed it (or was never gated) trains no row."""
    d = load_driver()
    s = {**d.settings("cpu"), "compare": True}
    assert d.compare(tmp_path, s, ignore_gate=False) == {}
    (tmp_path / "gate.json").write_text(json.dumps({"gate": {"passed": False}}))
    assert d.compare(tmp_path, s, ignore_gate=False) == {}
    assert not any(p.is_dir() for p in tmp_path.iterdir())
