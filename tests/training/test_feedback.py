"""What a run tells its user while it works: evaluation lines, progress counted in prompts, greedy
evaluation run once, on-policy rollout counts and an early warning when nothing is accepted."""

import logging

import pytest

from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDTrainer
from dlmdistill.methods.onpolicy import WARN_AFTER_IDLE_BATCHES
from dlmdistill.sampling import GenerationConfig
from tests.conftest import tiny_model
from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

GEN = GenerationConfig(gen_length=8, steps=4, block_length=4, temperature=1.0, batch_size=8)


def _dopsd(tokenizer, out, verdict, **kw):
    model, tok = tiny_model(tokenizer)
    examples = stub_examples(4)
    return DOPSDTrainer(model.train(), tok, items_for(examples, tok, GEN.gen_length), training_config(out),
                        task=StubTask(verdict), examples=examples,
                        method=DOPSDConfig(rollout=GEN, pass_k=2, micro_batch_size=16), **kw)


def test_dopsd_counts_rollouts_and_warns_early_when_nothing_is_accepted(tokenizer, tmp_path, caplog):
    t = _dopsd(tokenizer, tmp_path, lambda i, c: 0.0)
    batch = [t.train_dataset[i] for i in range(4)]
    with caplog.at_level(logging.WARNING):
        for _ in range(WARN_AFTER_IDLE_BATCHES + 1):
            assert t.training_step(batch)[0] is False
    n = WARN_AFTER_IDLE_BATCHES + 1
    # 4 prompts x pass_k 2 attempts per batch, none accepted, every batch skipped
    assert t.rollout_counts == {"batches": n, "attempts": 8 * n, "accepted": 0, "skipped": n}
    assert t.progress_postfix({}) == {"rollouts": str(n), "attempts": str(8 * n), "accepted": "0", "skipped": str(n)}
    warnings = [r.getMessage() for r in caplog.records if "rollout batches had" in r.getMessage()]
    assert len(warnings) == 1  # once per streak, after WARN_AFTER_IDLE_BATCHES batches
    assert "no accepted trajectory" in warnings[0] and "SFT" in warnings[0] and "pass_k" in warnings[0]
    assert "accept_threshold" in warnings[0]


def test_accepted_batches_are_counted_and_reset_the_streak(tokenizer, tmp_path):
    t = _dopsd(tokenizer, tmp_path, lambda i, c: 1.0)
    stepped, _ = t.training_step([t.train_dataset[i] for i in range(4)])
    assert stepped and t.rollout_counts == {"batches": 1, "attempts": 4, "accepted": 4, "skipped": 0}
    assert t._idle_batches == 0


def test_evaluation_during_training_prints_one_line(tokenizer, tmp_path, capsys):
    t = _dopsd(tokenizer, tmp_path, lambda i, c: 1.0, evaluator=lambda trainer: {"accuracy": 0.25, "n": 4})
    assert t.evaluate() == {"accuracy": 0.25, "n": 4}
    assert "eval at step 0/2: accuracy 0.25, n 4" in capsys.readouterr().out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_greedy_evaluation_runs_once_for_several_seeds(tokenizer, monkeypatch, temperature):
    import importlib

    ev = importlib.import_module("dlmdistill.evaluation")
    calls = []
    real = ev.generate_all

    def counting(*args, **kwargs):
        calls.append(args[4])  # the seed
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "generate_all", counting)
    bars = []

    class Bar:  # records what the progress bar is told
        def __init__(self, total=None, unit="it", **kwargs):
            self.total, self.unit, self.updates = total, unit, []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    model, tok = tiny_model(tokenizer)
    examples = stub_examples(3)
    gen = GenerationConfig(gen_length=8, steps=4, temperature=temperature, batch_size=2)
    report = ev.evaluate_model(model, tok, StubTask(lambda i, c: float(i == 0)), examples, gen, [4], [10, 20, 30])
    per_seed = report["results"]["4"]["seeds"]
    if temperature == 0:
        assert calls == [10] and report["greedy_ran_once"] is True
        assert per_seed["10"] == per_seed["20"] == per_seed["30"]
        assert report["results"]["4"]["summary"]["accuracy"]["std"] == 0.0
    else:
        assert calls == [10, 20, 30] and "greedy_ran_once" not in report
    # the bar counts prompts: 3 prompts in batches of 2 advance it by 2 then 1, to 3/3 (not 2 batches)
    assert all(b.total == 3 and b.unit == "prompt" and b.updates == [2, 1] for b in bars)
    assert len(bars) == len(calls)
