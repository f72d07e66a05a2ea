"""experiments/common.py: a run that stops with nothing left to train is recorded, not retried."""

import importlib.util
import json
from pathlib import Path

import pytest

from dlmdistill.methods.dopsd import NothingToTrainError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("common", ROOT / "experiments" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_collapsed_run_is_recorded_and_not_retried(common, tmp_path, monkeypatch):
    import dlmdistill.api

    calls = []

    def collapses(method, config):
        calls.append(method)
        out = Path(config["training"]["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs.jsonl").write_text(json.dumps({"step": 10, "optimizer_steps": 10, "eval/accuracy": 40.4}) + "\n")
        raise NothingToTrainError("d-OPSD: 100 rollout batches in a row had nothing to train")

    monkeypatch.setattr(dlmdistill.api, "train", collapses)
    config = {"training": {"output_dir": str(tmp_path / "run")}}
    run = common.train_once("dopsd", config)
    assert common.stopped(run) == "d-OPSD: 100 rollout batches in a row had nothing to train"
    assert common.eval_curve(run, "eval/accuracy", x_key="optimizer_steps") == ([10.0], [40.4])
    assert common.train_once("dopsd", config) == run and calls == ["dopsd"]  # not trained again


def test_other_errors_still_fail(common, tmp_path, monkeypatch):
    import dlmdistill.api

    def broken(method, config):
        raise ValueError("a bug")

    monkeypatch.setattr(dlmdistill.api, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        common.train_once("dopsd", {"training": {"output_dir": str(tmp_path / "run")}})
    assert common.stopped(tmp_path / "run") is None
