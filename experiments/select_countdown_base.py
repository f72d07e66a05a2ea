"""Pick the Countdown base among candidate runs by accuracy on a validation split, never the test set.

    python experiments/select_countdown_base.py --candidates runs/v1 runs/v2 --out runs/exp/base --wait 300

Validation puzzles: 500 generated with another seed, none of them a held-out test puzzle or one of
the recipe's 50,000 training puzzles (same number multiset and target). Each candidate's final model
is decoded as in the experiment (greedy low-confidence, 64 tokens, 32 steps, no blocks). The best
candidate's run folder is copied to ``--out`` (through a temporary folder renamed at the end, so that
a reader waiting for ``OUT/final_metrics.json`` never sees half a copy); ``OUT.choice.json`` records
every candidate's validation accuracy. With ``--wait`` it waits up to that many seconds for the
candidates to finish and chooses among those that did.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VALIDATION_SEED = 4321
TRAIN_SEED, TRAIN_PUZZLES = 0, 50_000


def validation_examples(n: int = 500):
    from dlmdistill.tasks.countdown import CountdownTask, example_key, generate_countdown, ordered_solution

    task = CountdownTask(reasoning=False, solution="ordered")
    test = {example_key(ex) for ex in task.load(split="test")}
    train = {example_key(ex) for ex in task.load(split="train", limit=TRAIN_PUZZLES, seed=TRAIN_SEED)}
    exclude = train | test
    puzzles = generate_countdown(n, VALIDATION_SEED, task.max_number, task.max_target, exclude=exclude)
    return task, [task.example(ordered_solution(p.numbers, p.target), f"validation[{i}]") for i, p in enumerate(puzzles)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", nargs="+", type=Path, required=True, help="run folders (each with final/)")
    ap.add_argument("--out", type=Path, required=True, help="where the chosen run folder is copied")
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for unfinished candidates")
    a = ap.parse_args()
    if a.out.exists():
        sys.exit(f"{a.out} already exists; not overwriting it")
    t0 = time.time()
    while time.time() - t0 < a.wait and not all((c / "final_metrics.json").exists() for c in a.candidates):
        time.sleep(5)
    done = [c for c in a.candidates if (c / "final_metrics.json").exists()]
    if not done:
        sys.exit("no candidate finished")

    import torch

    from dlmdistill.evaluation import evaluate_model
    from dlmdistill.models.loading import load_model
    from dlmdistill.sampling import GenerationConfig

    task, examples = validation_examples()
    gen = GenerationConfig(gen_length=64, steps=32, block_length=64, batch_size=250)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = {}
    for c in done:
        model, tok = load_model(str(c / "final"))
        report = evaluate_model(model.to(device), tok, task, examples, gen, [32], [0], progress=False)
        scores[str(c)] = report["results"]["32"]["summary"]["accuracy"]["mean"]
        print(f"{c}: {scores[str(c)]:.1f}% on {len(examples)} validation puzzles", flush=True)
    best = max(done, key=lambda c: scores[str(c)])
    tmp = a.out.with_name(a.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best, tmp, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    tmp.rename(a.out)
    Path(str(a.out) + ".choice.json").write_text(json.dumps({"validation_accuracy": scores, "chosen": str(best),
                                                           "validation_seed": VALIDATION_SEED}, indent=2))
    print(f"chose {best}")


if __name__ == "__main__":
    main()
