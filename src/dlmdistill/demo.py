"""``dlmdistill demo``: the point of the product, small enough for a laptop CPU.

1. Train a tiny DLM (a ~0.5M-parameter bidirectional Llama with a character vocabulary) from
   scratch with masked-diffusion SFT on 4x4 Sudoku puzzles the product generates itself (test
   puzzles come from grids never seen in training): the base.
2. Post-train copies of the base with every available method (more SFT, SelfFusion, d-OPSD) for
   the same number of optimizer steps.
3. Evaluate the base and every post-trained model on held-out puzzles, print a table, and save the
   table, the metrics and a plot in the run folder.

Everything goes through the same public recipes and configs as ``dlmdistill train``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .methods import METHODS

#: demo sizes; "quick" is what the test suite runs
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(train_examples=20000, base_steps=700, post_steps=20, eval_items=500, batch=128, eval_batch=250,
                 gen_length=64, block_length=16, steps=64, rollout_steps=32, preset_overrides={}),
    "quick": dict(train_examples=500, base_steps=8, post_steps=2, eval_items=16, batch=16, eval_batch=16,
                  gen_length=64, block_length=16, steps=16, rollout_steps=16,
                  preset_overrides={"hidden_size": 32, "intermediate_size": 64}),
}

POST_METHODS = ["sft", "selffusion", "dopsd"]
#: post-training learning rates, chosen on validation puzzles the demo never reports
#: (experiments/demo_lr_validation.py: of 1e-4, 3e-5 and 1e-5, the best validation accuracy per method)
POST_LR = {"sft": 1e-5, "selffusion": 3e-5, "dopsd": 1e-5}
#: answer-only targets: a tiny model learns them in minutes (the reasoning trace doubles the length)
TASK_KWARGS = {"reasoning": False}


def base_config(out: Path, size: dict[str, Any], task: str, seed: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "preset:tiny", "tokenizer": "char", "preset_overrides": size["preset_overrides"]},
        "data": {"task": task, "task_kwargs": TASK_KWARGS, "train_limit": size["train_examples"], "max_length": 160, "seed": seed},
        "training": {"output_dir": str(out / "base"), "max_steps": size["base_steps"], "learning_rate": 1e-3,
                     "per_device_train_batch_size": size["batch"], "weight_decay": 0.0, "warmup_ratio": 0.05,
                     "adam_beta2": 0.99, "logging_steps": max(size["base_steps"] // 20, 1), "save_steps": 0,
                     "seed": seed, "report_to": ["jsonl"], "overwrite_output_dir": True},  # a rerun replaces it
        "eval": {"enabled": False},
    }


def post_config(method: str, out: Path, size: dict[str, Any], task: str, seed: int) -> dict[str, Any]:
    cfg = {
        "model": {"name_or_path": str(out / "base" / "final")},
        "data": {"task": task, "task_kwargs": TASK_KWARGS, "train_limit": size["train_examples"], "max_length": 160, "seed": seed + 1},
        "training": {"output_dir": str(out / method), "max_steps": size["post_steps"],
                     "learning_rate": POST_LR.get(method, 1e-4),
                     "per_device_train_batch_size": size["batch"], "weight_decay": 0.0, "warmup_ratio": 0.0,
                     "lr_scheduler_type": "constant", "adam_beta2": 0.99, "seed": seed, "save_steps": 0,
                     "logging_steps": max(size["post_steps"] // 10, 1), "report_to": ["jsonl"],
                     "overwrite_output_dir": True},
        "eval": {"enabled": False},
    }
    if method == "dopsd":
        # d-OPSD's loss is ~100x smaller than SFT's and Adam's step does not shrink with it (lr 3e-4 once
        # collapsed an earlier base from 79% to 7% in 20 steps; docs/results.md section 1)
        cfg["training"].update(per_device_train_batch_size=max(size["batch"] // 16, 2), max_grad_norm=0.2)
        cfg["method"] = {"rollout": {"gen_length": size["gen_length"], "block_length": size["block_length"],
                                     "steps": size["rollout_steps"], "temperature": 0.9, "batch_size": 64},
                         "pass_k": 4, "accept_threshold": 0.25 if task == "sudoku" else None,
                         # per-term clipping collapses this tiny model (docs/methods/dopsd.md); formerly "per_token"
                         "clip_mode": "per_position"}
    return cfg


def run_demo(output_dir: str = "runs/demo", size_name: str = "full", task: str = "sudoku", seed: int = 0,
             methods: list[str] | None = None, threads: int = 2) -> dict[str, Any]:
    """Run the demo with ``threads`` CPU threads: the thread count changes the order of float
    additions, so a fixed count makes the table reproducible on one kind of CPU (not across CPUs)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, size_name, task, seed, methods, threads)
    finally:
        torch.set_num_threads(previous)


def _run_demo(output_dir: str, size_name: str, task: str, seed: int, methods: list[str] | None,
              threads: int) -> dict[str, Any]:
    from .api import train
    from .evaluation import evaluate_model
    from .models.loading import load_model
    from .sampling import GenerationConfig
    from .tasks.registry import get_task

    size = SIZES[size_name]
    out = Path(output_dir)
    methods = [m for m in (methods or POST_METHODS) if m in METHODS]
    timings: dict[str, float] = {}
    t0 = time.time()
    print(f"[1/3] training the base model from scratch on generated {task} puzzles ({size['base_steps']} steps)")
    train("sft", base_config(out, size, task, seed))
    timings["base"] = time.time() - t0
    for i, m in enumerate(methods):
        t = time.time()
        print(f"[2/3] post-training with {m} ({i + 1}/{len(methods)}, {size['post_steps']} steps)")
        train(m, post_config(m, out, size, task, seed))
        timings[m] = time.time() - t
    print("[3/3] evaluating on held-out puzzles")
    t_task = get_task(task, **TASK_KWARGS)
    examples = t_task.load(None, split="test", limit=size["eval_items"])
    gen = GenerationConfig(gen_length=size["gen_length"], block_length=size["block_length"], steps=size["steps"],
                           batch_size=size["eval_batch"])
    rows = {}
    for name in ["base", *methods]:
        model, tok = load_model(str(out / name / "final"))
        rep = evaluate_model(model, tok, t_task, examples, gen, [size["steps"]], [seed],
                             output_dir=out / name / "eval" / task, progress=True, model_name=name)
        rows[name] = rep["results"][str(size["steps"])]["summary"]["accuracy"]["mean"]
    table = format_demo_table(rows, timings, len(examples), task, threads)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"accuracy": rows, "seconds": timings, "threads": threads,
                                                  "items": len(examples)}, indent=2))
    plot_demo(rows, out / "results.png", task)
    print(f"\nsaved {out / 'results.md'}, {out / 'results.png'}; total {time.time() - t0:.0f} s")
    return {"accuracy": rows, "seconds": timings}


def format_demo_table(rows: dict[str, float], timings: dict[str, float], n: int, task: str, threads: int = 2) -> str:
    """The demo's table, with each accuracy's 95% interval (normal approximation over the n puzzles)."""
    lines = [f"{task}: accuracy on {n} held-out puzzles (greedy, one training seed, {threads} threads)", "",
             "| model | accuracy (%) | 95% interval | training time (s) |", "|---|---:|---:|---:|"]
    for name, acc in rows.items():
        label = "base (SFT from scratch)" if name == "base" else f"base + {name}"
        half = 196 * ((acc / 100) * (1 - acc / 100) / max(n, 1)) ** 0.5
        lines.append(f"| {label} | {acc:.1f} | ±{half:.1f} | {timings.get(name, 0):.0f} |")
    lines += ["", "Differences smaller than the intervals are not evidence that one method is better; the same "
              "command on another kind of CPU gives other numbers (float sums in another order)."]
    return "\n".join(lines)


def plot_demo(rows: dict[str, float], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(rows)
    ax.bar(names, [rows[n] for n in names], color=["#888"] + ["#3a7"] * (len(names) - 1))
    for i, n in enumerate(names):
        ax.text(i, rows[n], f"{rows[n]:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{task}: base vs post-training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlmdistill demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--size", choices=list(SIZES), default="full", help="'quick' is a seconds-long smoke version")
    p.add_argument("--task", choices=["countdown", "sudoku"], default="sudoku")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=None, help=f"post-training methods (default: {POST_METHODS})")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (fixed, so that a rerun on the same kind "
                   "of CPU gives the same table)")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    run_demo(a.output_dir, a.size, a.task, a.seed, a.methods, a.threads)
    return 0
