"""The Python API (dlmdistill.api): training on your own data file in each supported format."""

import json

import pytest
import torch
import yaml

import dlmdistill as dd

TINY = {"preset_overrides": {"hidden_size": 32, "intermediate_size": 64}, "progress_bar": False,
        "report_to": ["jsonl"], "max_steps": 2, "per_device_train_batch_size": 4, "gen_length": 8, "steps": 8}
RECORDS = {
    "messages": ({"messages": [{"role": "user", "content": "say {i}"}, {"role": "assistant", "content": "{i}"}]},
                 "instruct"),
    "prompt_completion": ({"prompt": "say {i}", "completion": "{i}"}, "instruct"),
    "alpaca": ({"instruction": "say {i}", "input": "", "output": "{i}"}, "instruct"),
    "text": ({"text": "say {i}"}, "text"),
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_train_on_your_own_file(tmp_path, fmt):
    """``dd.train("sft", train_source=FILE)``: no task and no evaluation set needed. The task is told from
    the records; a task with a metric is evaluated on held-out records, plain text is not evaluated."""
    template, task = RECORDS[fmt]
    data, out = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(template).replace("{i}", str(i)) + "\n" for i in range(20)))
    dd.train("sft", name_or_path="preset:tiny", train_source=str(data), output_dir=str(out), **TINY)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["task"] == task
    stats = json.loads((out / "data_stats.json").read_text())
    logged = {k for line in (out / "logs.jsonl").read_text().splitlines() for k in json.loads(line)}
    if task == "text":
        assert stats["kept"] == 20 and "evaluation" not in stats and not any(k.startswith("eval/") for k in logged)
    else:
        assert stats["kept"] == 18 and stats["evaluation"]["held_out_records"] == 2 and "eval/rouge_l" in logged


def test_device_of_a_model_given_by_path(tmp_path, monkeypatch):
    """``dd.evaluate`` / ``dd.generate`` load a model given by path onto ``device`` (default: cuda if there
    is one, as the command line does); a device this machine lacks is a clear error before anything loads,
    and a (model, tokenizer) pair stays where its owner put it."""
    from dlmdistill.errors import UserError
    from dlmdistill.models import loading

    out = tmp_path / "run"
    dd.train("sft", task="countdown", name_or_path="preset:tiny", output_dir=str(out), train_limit=32,
             **{**TINY, "eval.enabled": False})
    built = []
    real_build = loading.build_model
    monkeypatch.setattr(loading, "build_model", lambda cfg, *a, **k: built.append(cfg) or real_build(cfg, *a, **k))
    with pytest.raises(UserError, match=r"device 'cuda:7': this machine has \d+ CUDA device"):
        dd.evaluate(str(out), limit=2, steps=[8], seeds=[0], device="cuda:7")
    with pytest.raises(UserError, match="device 'gpu'"):
        dd.generate(str(out), ["numbers: 1 2 3 target: 6\n"], device="gpu")
    assert built == []  # refused before loading

    moved = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or real_to(self, *a, **k))
    report = dd.evaluate(str(out), limit=2, steps=[8], seeds=[0])
    assert moved[-1] == (loading.resolve_device(),) and "accuracy" in report["results"]["8"]["seeds"]["0"]
    pair = dd.load_model(str(out / "final"))
    moved.clear()
    dd.generate(pair, ["numbers: 1 2 3 target: 6\n"], gen_length=8, steps=8)
    assert moved == []
