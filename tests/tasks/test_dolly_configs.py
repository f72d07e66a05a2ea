"""The Dolly configs point at the public hub dataset, whose records the instruct task reads."""

from pathlib import Path

import pytest

from dlmdistill.config import load_config
from dlmdistill.methods import get_method
from dlmdistill.tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ROOT.glob("configs/*dolly*.yaml"))


def test_there_are_six_dolly_configs():
    assert len(CONFIGS) == 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dolly_config_uses_the_hub_dataset(path):
    import datasets

    method = path.name.split("_dolly")[0].replace("ar_sft", "ar-sft")
    cls, _ = get_method(method)
    cfg = load_config(cls, path, [])
    assert cfg.data.train_source == cfg.data.eval_source == "databricks/databricks-dolly-15k"
    settings = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any("shared/data" in line for line in settings)  # only the documented override mentions it
    assert cfg.data.long_examples == "drop"
    for split in (cfg.data.train_split, cfg.data.eval_split):
        datasets.ReadInstruction.from_spec(split)  # a split string datasets accepts


def test_hub_dolly_records_load_as_alpaca(monkeypatch):
    """The fields of databricks/databricks-dolly-15k (instruction, context, response, category), through
    the hub path of io.read_records, with the split string handed to datasets.load_dataset as is."""
    import datasets

    calls = []
    rows = [{"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia commenced "
             "services on 31 August 2000.", "response": "31 August 2000.", "category": "closed_qa"},
            {"instruction": "Which is a species of fish?", "context": "", "response": "Tope", "category": "classification"}]

    def fake_load(repo, config, split):
        calls.append((repo, config, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ex = get_task("instruct").load("databricks/databricks-dolly-15k", split="train[:500]")
    assert calls == [("databricks/databricks-dolly-15k", None, "train[:500]")]
    assert ex[0].target == "31 August 2000." and "### Input:\nVirgin Australia commenced" in ex[0].prompt
    assert ex[1].prompt.endswith("### Instruction:\nWhich is a species of fish?\n\n### Response:\n")
    assert ex[1].source == "databricks/databricks-dolly-15k:train[:500][1]"
