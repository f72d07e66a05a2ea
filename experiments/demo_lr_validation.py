"""Choose the demo's post-training learning rates on a validation split that the demo never reports.

    python experiments/demo_lr_validation.py --demo runs/demo          # after `dlmdistill demo`

From the demo's base model (``DEMO/base/final``), each post-training method of the demo runs with
every learning rate of ``--lrs`` (otherwise the demo's own config), and is scored on validation
puzzles: held-out-grid Sudoku puzzles generated with another seed than the demo's test puzzles,
with every puzzle that also occurs in the test set removed. Writes ``OUT/results.md`` and
``results.json``; the demo's test puzzles are never evaluated here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VALIDATION_SEED = 4321  # the demo's test puzzles use the task's default test_seed (1234)


def validation_examples(limit: int):
    """Validation puzzles: the held-out grids, another puzzle seed, minus any puzzle of the test set."""
    from dlmdistill.demo import TASK_KWARGS
    from dlmdistill.tasks.registry import get_task

    test = get_task("sudoku", **TASK_KWARGS).load(None, split="test")
    seen = {e.prompt for e in test}
    task = get_task("sudoku", **TASK_KWARGS, test_seed=VALIDATION_SEED, num_test=limit + len(test))
    examples = [e for e in task.load(None, split="test") if e.prompt not in seen][:limit]
    return task, examples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="runs/demo", help="the demo's output folder (holds base/final)")
    ap.add_argument("--out", default="runs/demo_lr_validation")
    ap.add_argument("--methods", nargs="+", default=["dopsd", "sft", "selffusion"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-5, 1e-5])
    ap.add_argument("--items", type=int, default=500, help="validation puzzles")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", choices=["full", "quick"], default="full", help="the demo size (quick: the test suite)")
    a = ap.parse_args(argv)

    import torch

    from dlmdistill.api import train
    from dlmdistill.demo import SIZES, post_config
    from dlmdistill.evaluation import evaluate_model
    from dlmdistill.models.loading import load_model
    from dlmdistill.sampling import GenerationConfig

    torch.set_num_threads(a.threads)
    size, demo, out = SIZES[a.size], Path(a.demo), Path(a.out)
    if not (demo / "base" / "final").exists():
        raise SystemExit(f"{demo / 'base' / 'final'}: no demo base model; run `dlmdistill demo` first")
    task, examples = validation_examples(a.items)
    gen = GenerationConfig(gen_length=size["gen_length"], block_length=size["block_length"], steps=size["steps"],
                           batch_size=size["eval_batch"])
    results: dict[str, dict[str, float]] = {}
    base, tok = load_model(str(demo / "base" / "final"))
    rep = evaluate_model(base, tok, task, examples, gen, [size["steps"]], [0], progress=False)
    results["base"] = {"-": rep["results"][str(size["steps"])]["summary"]["accuracy"]["mean"]}
    for method in a.methods:
        results[method] = {}
        for lr in a.lrs:
            run = out / f"{method}_lr{lr:g}"
            cfg = post_config(method, demo, size, "sudoku", 0)  # the demo's own recipe, only the lr changes
            cfg["training"].update(output_dir=str(run), learning_rate=lr)
            if not (run / "final").exists():
                train(method, cfg)
            model, tok = load_model(str(run / "final"))
            rep = evaluate_model(model, tok, task, examples, gen, [size["steps"]], [0], progress=False)
            results[method][f"{lr:g}"] = rep["results"][str(size["steps"])]["summary"]["accuracy"]["mean"]
            print(f"{method} lr {lr:g}: {results[method][f'{lr:g}']:.1f}% on {len(examples)} validation puzzles",
                  flush=True)
    lines = [f"Validation accuracy (%) on {len(examples)} puzzles (held-out grids, puzzle seed {VALIDATION_SEED}, "
             f"none of them in the demo's test set), {size['post_steps']} post-training steps from the demo's base", "",
             "| model | " + " | ".join(f"lr {lr:g}" for lr in a.lrs) + " |", "|---|" + "---:|" * len(a.lrs),
             f"| base | {results['base']['-']:.1f} |" + " |" * (len(a.lrs) - 1)]
    for method in a.methods:
        lines.append(f"| {method} | " + " | ".join(f"{results[method][f'{lr:g}']:.1f}" for lr in a.lrs) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"items": len(examples), "accuracy": results}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
