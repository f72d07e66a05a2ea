import json

import torch

from dlmdistill.evaluation import evaluate_model, format_table, generate_all, summarize
from dlmdistill.sampling import GenerationConfig
from dlmdistill.tasks.registry import get_task


def test_generate_all_keeps_order_is_reproducible_and_leaves_the_global_rng_alone(model_and_tok):
    model, tok = model_and_tok
    prompts = [[7, 8, 9, 10, 11], [12], [13, 14, 15]]
    gen = GenerationConfig(gen_length=8, steps=4, temperature=1.0, batch_size=2)
    state = torch.random.get_rng_state()
    a = generate_all(model, tok, prompts, gen, seed=5, progress=False, desc="")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate_all(model, tok, prompts, gen, seed=5, progress=False, desc="")
    # order: each completion equals the one generated for that prompt alone (greedy, so no RNG involved)
    greedy = GenerationConfig(gen_length=8, steps=4, batch_size=2)
    together = generate_all(model, tok, prompts, greedy, seed=0, progress=False, desc="")
    alone = [generate_all(model, tok, [p], greedy, seed=0, progress=False, desc="")[0] for p in prompts]
    assert together == alone


def test_evaluate_model_writes_generations_metrics_and_a_table(model_and_tok, tmp_path):
    model, tok = model_and_tok
    task = get_task("countdown")
    examples = task.load(None, split="test", limit=3)
    report = evaluate_model(model, tok, task, examples, GenerationConfig(gen_length=16, batch_size=4), [4, 8], [1, 2],
                            output_dir=tmp_path, model_name="tiny")
    assert set(report["results"]) == {"4", "8"}
    summary = report["results"]["4"]["summary"]["accuracy"]
    assert 0.0 <= summary["mean"] <= 100.0 and summary["std"] >= 0.0
    rows = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3 and {"steps", "seed", "completion", "score", "reason"} <= set(rows[0])
    assert json.loads((tmp_path / "metrics.json").read_text())["task"] == "countdown"
    table = format_table(report)
    assert "| 4 |" in table and "| 8 |" in table


def test_summarize_mean_and_sample_std():
    out = summarize({"1": {"accuracy": 10.0}, "2": {"accuracy": 20.0}, "3": {"accuracy": 30.0}})
    assert out["accuracy"]["mean"] == 20.0 and abs(out["accuracy"]["std"] - 10.0) < 1e-9
