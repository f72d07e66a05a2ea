"""``dlmdistill report`` on two hand-made run folders: tables, settings flags, smoothing note, figures."""

import json

import pytest

from dlmdistill.cli import main
from dlmdistill.errors import UserError
from dlmdistill.report import load_run, smooth


def _metrics(n, gen, results):
    """An eval/<task>/metrics.json as dlmdistill evaluate writes it; results: {steps: [per-seed accuracy]}."""
    out = {}
    for s, accs in results.items():
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        out[s] = {"seeds": {str(10 * (i + 1)): {"accuracy": a} for i, a in enumerate(accs)},
                  "summary": {"accuracy": {"mean": mean, "std": std}}}
    return {"task": "countdown", "metric": "accuracy", "model": "m", "n": n, "generation": gen, "results": out}


GEN = {"gen_length": 64, "block_length": 32, "temperature": 0.0, "remasking": "low_confidence", "cfg_scale": 0.0,
       "batch_size": 8}


@pytest.fixture
def two_runs(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    for d in (a, b):
        (d / "eval" / "countdown").mkdir(parents=True)
    (a / "run.json").write_text(json.dumps({"method": "sft"}))
    (a / "logs.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 2.0 / i}) for i in range(1, 11)) + "\n")
    (a / "eval" / "countdown" / "metrics.json").write_text(json.dumps(
        _metrics(200, GEN, {"8": [10.0, 20.0], "16": [30.0, 30.0]})))
    (b / "run.json").write_text(json.dumps({"method": "selffusion"}))
    (b / "logs.jsonl").write_text(json.dumps({"step": 5, "loss": 0.7}) + "\n")  # a single logged point
    (b / "eval" / "countdown" / "metrics.json").write_text(json.dumps(
        _metrics(50, {**GEN, "temperature": 0.5}, {"8": [40.0], "32": [45.0]})))
    return a, b


def test_report_tables_flags_and_figures(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "rep" / "report.md"
    out.parent.mkdir()
    assert main(["report", str(a), str(b), "--out", str(out), "--smoothing", "3"]) == 0
    text = out.read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| run_")}
    head = next(line for line in text.splitlines() if line.startswith("| run | 8 steps"))
    cols = [c.strip() for c in head.split("|")[2:-1]]
    assert cols == ["8 steps", "16 steps", "32 steps", "n", "gen_length", "block_length", "temperature", "cfg_scale",
                    "remasking", "settings differ"]
    ra, rb = (dict(zip(cols, rows[name])) for name in ("run_a", "run_b"))
    # mean ± sample std of (10, 20) = 15 ± 7.07; a missing step count is "-"
    assert ra["8 steps"] == "15.00 ± 7.07" and ra["32 steps"] == "-" and rb["16 steps"] == "-"
    assert ra["n"] == "200" and rb["n"] == "50"
    assert ra["temperature"] == "0" and rb["temperature"] == "0.5" and ra["block_length"] == "32"
    assert ra["settings differ"] == "" and rb["settings differ"] == "**yes: n, temperature**"
    assert "not directly comparable" in text
    assert "moving averages over the last 3 logged points" in text and "raw logged values" in text
    figs = tmp_path / "rep" / "report_figures"
    assert (figs / "loss.png").stat().st_size > 0 and (figs / "eval_steps_countdown.png").stat().st_size > 0
    assert "report_figures/eval_steps_countdown.png" in text


def test_same_settings_are_not_flagged_and_null_block_is_one_block(tmp_path):
    runs = []
    for name, block in (("x", None), ("y", 64)):
        d = tmp_path / name / "eval" / "t"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(10, {**GEN, "block_length": block}, {"4": [1.0]})))
        runs.append(str(tmp_path / name))
    out = tmp_path / "r.md"
    assert main(["report", *runs, "--out", str(out)]) == 0
    text = out.read_text()
    assert "**yes" not in text and "not directly comparable" not in text
    assert "| x | 1.00 ± 0.00 | 10 | 64 | 64 |" in text


def test_autoregressive_results_are_a_column(tmp_path):
    d = tmp_path / "ar" / "eval" / "t"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(_metrics(10, GEN, {"ar": [5.0]})))
    out = tmp_path / "r.md"
    assert main(["report", str(tmp_path / "ar"), "--out", str(out)]) == 0
    assert "| run | ar | n |" in out.read_text()
    assert (tmp_path / "r_figures" / "eval_steps_t.png").exists()


def test_malformed_eval_metrics_name_the_file_and_field(tmp_path):
    d = tmp_path / "bad" / "eval" / "t"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"metric": "accuracy", "results": {"8": {"summary": {}}}}))
    with pytest.raises(UserError, match=r"metrics.json: results.8.summary.accuracy"):
        load_run(tmp_path / "bad")


def test_smoothing_is_a_trailing_moving_average():
    # hand-computed: window 2 over 1, 3, 5, 7 -> 1, 2, 4, 6
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
