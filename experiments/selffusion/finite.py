"""SelfFusion in the finite-data regime: a fixed training set, many epochs, cosine decay (issue 23).

The paper trains 20 epochs over Dolly's ~11k examples with cosine decay, a regime where SFT can overfit
and a self-distillation term can act as a regulariser. Our earlier SelfFusion comparisons (Sudoku,
Countdown) drew fresh generated puzzles every step, where no regulariser can help. Here every run of a
study trains on the same ``train_examples`` Countdown puzzles (``data.seed`` 0, whatever the run's seed),
from scratch (the ``tiny`` preset and a BPE built from those puzzles), for ``epochs`` epochs:

    python experiments/selffusion/finite.py --scale cpu --stages lr           # learning rates, seed 0
    python experiments/selffusion/finite.py --scale cpu --stages main         # the rows, every seed
    python experiments/selffusion/finite.py --scale cpu --stages main --only 'sft_*'   # a share of them

Stages (each run skipped when it has finished):

1. ``lr``: SFT and SelfFusion at each of ``lrs``, seed 0, evaluated during training on ``eval_items``
   *validation* puzzles (generated from ``VALIDATION_SEED``, never the test puzzles): each method's
   learning rate is the one with the best validation accuracy.
2. ``main``: the rows of ``ROWS`` at those learning rates and every seed; the validation curve during
   training, then the final model on the 500 test puzzles (the task's held-out set).
3. ``teacher``: the external DLM teacher of the logit-KD row, a wider model trained with SFT on the same
   puzzles for the same epochs at SFT's learning rate, and the logit-KD student from it.
4. ``size``: SelfFusion with and without its KD term at the teacher's width (seed 0); with the teacher (SFT at
   that width, seed 0) they make the size row: whether the gap between the methods moves with the model's size.
5. ``overfit``: SFT, SelfFusion and SelfFusion without its KD term at ``overfit_multiple`` times the epochs
   (seed 0): whether training longer on the same puzzles makes the validation accuracy fall (the regime
   where a regulariser could pay) and whether the KD term delays the fall.

Results: ``OUT/results.md`` (the tables, with the commands), ``OUT/validation_curves.png``, ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (eval_curve, evaluate_once, fmt, markdown_table, plot_curves, setup_logging,  # noqa: E402
                    stage, train_once)

#: the validation puzzles: generated like the test set, from another seed (the training puzzles leave them out)
VALIDATION_SEED = 4321
TASK_KWARGS = {"style": "compact", "reasoning": False, "solution": "ordered"}

SCALES: dict[str, dict[str, Any]] = {
    # 2,000 puzzles x 60 epochs at batch 64 = 1,875 optimizer steps (SelfFusion: two copies per step)
    "cpu": dict(train_examples=2000, epochs=60, batch=64, eval_times=12, eval_items=500, lrs=[1e-4, 3e-4, 1e-3, 3e-3],
                seeds=[0, 1, 2], teacher={"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8},
                overfit_multiple=4,
                gen={"gen_length": 24, "block_length": 24, "steps": 24, "batch_size": 250}),
    "smoke": dict(train_examples=24, epochs=2, batch=8, eval_times=2, eval_items=8, lrs=[1e-3], seeds=[0, 1],
                  overfit_multiple=2,
                  teacher={"hidden_size": 64, "intermediate_size": 128},
                  gen={"gen_length": 24, "block_length": 24, "steps": 4, "batch_size": 8}),
}

#: row label -> (method, run-name prefix, method section, which learning rate, multiple of the epochs)
ROWS: dict[str, tuple[str, str, dict[str, Any] | None, str, int]] = {
    "SFT": ("sft", "sft", None, "sft", 1),
    "SFT, 2x epochs (SelfFusion's compute)": ("sft", "sft_2x", None, "sft", 2),
    "SelfFusion, D = both modes masked (default)": ("selffusion", "sf_both", {"distill_positions": "both"},
                                                     "selffusion", 1),
    "SelfFusion, D = either mode masked": ("selffusion", "sf_either", {"distill_positions": "either"}, "selffusion", 1),
    "SelfFusion, D = either, students only where masked (own)": ("selffusion", "sf_own", {"distill_positions": "own"},
                                                                 "selffusion", 1),
    "SelfFusion without the KD term (kd_weight 0)": ("selffusion", "sf_nokd", {"kd_weight": 0.0}, "selffusion", 1),
    "SelfFusion, easy -> hard only": ("selffusion", "sf_e2h", {"direction": "easy_to_hard"}, "selffusion", 1),
    "SelfFusion, hard -> easy only": ("selffusion", "sf_h2e", {"direction": "hard_to_easy"}, "selffusion", 1),
    "SelfFusion without RMSNorm calibration": ("selffusion", "sf_normless", {"calibration": False}, "selffusion", 1),
}
KD_ROW = "Logit KD from a wider DLM teacher (same puzzles)"
#: the long runs of the ``overfit`` stage: run name -> (label, method, method section)
LONG_RUNS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "sft_long_seed0": ("SFT", "sft", None),
    "sf_long_seed0": ("SelfFusion", "selffusion", {}),
    "sf_nokd_long_seed0": ("SelfFusion without the KD term", "selffusion", {"kd_weight": 0.0}),
}


def steps_for(s: dict[str, Any], epochs_multiple: int = 1) -> int:
    return math.ceil(s["train_examples"] / s["batch"]) * s["epochs"] * epochs_multiple


def run_config(out: Path, s: dict[str, Any], *, seed: int, lr: float, epochs_multiple: int = 1,
               method: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> dict[str, Any]:
    steps = steps_for(s, epochs_multiple)
    cfg: dict[str, Any] = {
        "model": {"name_or_path": "preset:tiny", "tokenizer": "bpe:512", **(model or {})},
        "data": {"task": "countdown", "task_kwargs": {**TASK_KWARGS, "test_seed": VALIDATION_SEED},
                 "train_limit": s["train_examples"], "seed": 0, "max_length": 48, "response_length": 24},
        "training": {"output_dir": str(out), "max_steps": steps, "seed": seed, "per_device_train_batch_size": s["batch"],
                     "learning_rate": lr, "lr_scheduler_type": "cosine_with_min_lr", "min_lr_ratio": 0.1,
                     "warmup_ratio": 0.02, "weight_decay": 0.0, "adam_beta2": 0.99, "save_steps": 0,
                     "logging_steps": max(steps // 40, 1), "eval_steps": max(steps // (s["eval_times"] * epochs_multiple), 1),
                     "report_to": ["jsonl"], "progress_bar": False},
        "eval": {"enabled": True, "limit": s["eval_items"], "seed": 0, "generation": s["gen"]},
    }
    if method is not None:
        cfg["method"] = method
    return cfg


def done(run: Path) -> bool:
    return (run / "final" / "config.json").exists()


def validation_curve(run: Path, s: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(epoch, validation accuracy) of a run's evaluations during training (the last one: its final model)."""
    xs, ys = eval_curve(run, "eval/accuracy")
    per_epoch = math.ceil(s["train_examples"] / s["batch"])  # the last batch of an epoch is a short one
    return [x / per_epoch for x in xs], ys


def test_accuracy(run: Path, s: dict[str, Any]) -> float:
    """The final model on the task's 500 held-out test puzzles (greedy, the evaluation decoding)."""
    rep = evaluate_once(run, "countdown", steps=[s["gen"]["steps"]], seeds=[0], generation=s["gen"],
                        limit=s["eval_items"], task_kwargs=TASK_KWARGS, name="test")
    return next(iter(rep["results"].values()))["summary"]["accuracy"]["mean"]


def chosen_lrs(root: Path, s: dict[str, Any]) -> dict[str, float]:
    """Each method's learning rate: the best validation accuracy over its ``lr`` runs (seed 0)."""
    out = {}
    for method in ("sft", "selffusion"):
        scores = {lr: max(validation_curve(root / "lr" / f"{method}_lr{lr:g}", s)[1] or [float("nan")])
                  for lr in s["lrs"] if done(root / "lr" / f"{method}_lr{lr:g}")}
        scores = {lr: v for lr, v in scores.items() if not math.isnan(v)}
        if scores:
            out[method] = max(scores, key=lambda lr: (scores[lr], -lr))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--out", default=None, help="output folder (default runs/exp_selffusion_finite_<scale>)")
    ap.add_argument("--stages", nargs="*", default=["lr", "main", "teacher", "size", "overfit"], help="lr, main, teacher, size, overfit")
    ap.add_argument("--only", nargs="*", default=None,
                    help="train only the runs whose folder names match these shell patterns (e.g. 'sft_*' "
                         "'sf_both_seed0'), so that several processes can share a study")
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="the seeds of the main rows (default: the scale's)")
    a = ap.parse_args()
    setup_logging()
    s = SCALES[a.scale]
    seeds = a.seeds if a.seeds is not None else s["seeds"]
    root = Path(a.out or f"runs/exp_selffusion_finite_{a.scale}")
    root.mkdir(parents=True, exist_ok=True)

    def wanted(name: str) -> bool:
        return not a.only or any(fnmatch.fnmatchcase(name, pat) for pat in a.only)

    def train(method: str, cfg: dict[str, Any]) -> None:
        if wanted(Path(cfg["training"]["output_dir"]).name):
            train_once(method, cfg)

    if "lr" in a.stages:
        def lr_runs() -> None:
            for lr in s["lrs"]:
                for method in ("sft", "selffusion"):
                    train(method, run_config(root / "lr" / f"{method}_lr{lr:g}", s, seed=0, lr=lr,
                                             method={} if method == "selffusion" else None))
        stage("lr", lr_runs)
    lrs = chosen_lrs(root, s)
    if "main" in a.stages:
        if set(lrs) != {"sft", "selffusion"}:
            sys.exit("the main stage needs the learning rates: run --stages lr first (every lr run must finish)")

        def main_runs() -> None:
            for seed in seeds:
                for method, prefix, section, which, mult in ROWS.values():
                    train(method, run_config(root / f"{prefix}_seed{seed}", s, seed=seed, lr=lrs[which],
                                             epochs_multiple=mult, method=section))
        stage("main", main_runs)
    if "teacher" in a.stages and "sft" in lrs:
        def teacher_runs() -> None:
            teacher = root / "teacher_dlm"
            train("sft", run_config(teacher, s, seed=0, lr=lrs["sft"], model={"preset_overrides": s["teacher"]}))
            if not done(teacher):
                return
            for seed in seeds:
                train("kd", run_config(root / f"kd_dlm_seed{seed}", s, seed=seed, lr=lrs["sft"],
                                       model={"tokenizer": str(teacher / "tokenizer")},
                                       method={"teacher": str(teacher / "final")}))
        stage("teacher", teacher_runs)

    if "size" in a.stages and "selffusion" in lrs:
        def size_runs() -> None:
            for name, section in (("sf_wide_seed0", {}), ("sf_wide_nokd_seed0", {"kd_weight": 0.0})):
                train("selffusion", run_config(root / name, s, seed=0, lr=lrs["selffusion"],
                                               model={"preset_overrides": s["teacher"]}, method=section))
        stage("size", size_runs)
    if "overfit" in a.stages and set(lrs) == {"sft", "selffusion"}:
        def long_runs() -> None:
            for name, (_, method, section) in LONG_RUNS.items():
                train(method, run_config(root / name, s, seed=0, lr=lrs[method],
                                         epochs_multiple=s["overfit_multiple"], method=section))
        stage("overfit", long_runs)

    # ---- the report: every finished run
    rows = {label: [root / f"{prefix}_seed{x}" for x in seeds if done(root / f"{prefix}_seed{x}")]
            for label, (_, prefix, *_rest) in ROWS.items()}
    rows[KD_ROW] = [root / f"kd_dlm_seed{x}" for x in seeds if done(root / f"kd_dlm_seed{x}")]
    width = ", ".join(f"{k} {v}" for k, v in s["teacher"].items())
    rows[f"SFT, wider model ({width}; the KD teacher)"] = [r for r in [root / "teacher_dlm"] if done(r)]
    rows[f"SelfFusion, wider model ({width})"] = [r for r in [root / "sf_wide_seed0"] if done(r)]
    rows["SelfFusion without the KD term, wider model"] = [r for r in [root / "sf_wide_nokd_seed0"] if done(r)]
    rows = {k: v for k, v in rows.items() if v}
    cmd = f"python experiments/selffusion/finite.py --scale {a.scale}"
    parts = [f"# SelfFusion in the finite-data regime (Countdown, scale {a.scale})", "",
             f"Every run: the same {s['train_examples']} generated Countdown puzzles (answer-only), the `tiny` preset "
             f"from scratch, {s['epochs']} epochs ({steps_for(s)} optimizer steps at batch {s['batch']}), cosine decay "
             f"to 0.1x after 2% warm-up. Validation: {s['eval_items']} puzzles generated from seed {VALIDATION_SEED}; "
             f"test: the task's {s['eval_items']} held-out puzzles. Command: `{cmd}`.", ""]
    results: dict[str, Any] = {"scale": s, "learning_rates": lrs}
    lr_rows = []
    for method in ("sft", "selffusion"):
        for lr in s["lrs"]:
            run = root / "lr" / f"{method}_lr{lr:g}"
            if done(run):
                _, ys = validation_curve(run, s)
                lr_rows.append([method, f"{lr:g}", f"{max(ys):.1f}", f"{ys[-1]:.1f}"])
    if lr_rows:
        parts += ["## Learning rates (seed 0, validation accuracy %)", "",
                  markdown_table(["method", "lr", "best", "final"], lr_rows), "",
                  f"Chosen: {', '.join(f'{k} {v:g}' for k, v in lrs.items())}.", "",
                  "![validation accuracy of the learning-rate runs against epochs](lr_curves.png)", ""]
        plot_curves({f"{m} lr {lr:g}": [validation_curve(root / "lr" / f"{m}_lr{lr:g}", s)]
                     for m in ("sft", "selffusion") for lr in s["lrs"] if done(root / "lr" / f"{m}_lr{lr:g}")},
                    root / "lr_curves.png", xlabel="epoch", ylabel="validation accuracy (%)",
                    title=f"Countdown, {s['train_examples']} puzzles: learning rates (seed 0)")
    if rows:
        table, res = [], {}
        for label, runs in rows.items():
            curves = [validation_curve(r, s)[1] for r in runs]
            best, final = [max(c) for c in curves], [c[-1] for c in curves]
            test = [test_accuracy(r, s) for r in runs]
            res[label] = {"validation_best": best, "validation_final": final, "test_final": test,
                          "runs": [str(r) for r in runs]}
            table.append([label, fmt(best, 1), fmt(final, 1), fmt(test, 1), str(len(runs))])
        parts += ["## The comparison (mean ± std over seeds)", "",
                  markdown_table(["row", "validation, best (%)", "validation, final (%)", "test, final model (%)",
                                  "seeds"], table), "", "![validation accuracy against epochs](validation_curves.png)", ""]
        wide = {label for label in rows if "wider model" in label}
        plot_curves({label: [validation_curve(r, s) for r in runs] for label, runs in rows.items() if label not in wide},
                    root / "validation_curves.png", xlabel="epoch", ylabel="validation accuracy (%)",
                    title=f"Countdown, {s['train_examples']} puzzles, {s['epochs']} epochs")
        if wide:  # the size row beside the tiny model's SFT and SelfFusion
            tiny = [label for label in rows if label == "SFT" or label.startswith("SelfFusion, D = both")]
            plot_curves({(label.split(" (")[0] if label in wide else f"{label.split(',')[0]}, tiny"):
                         [validation_curve(r, s) for r in rows[label]] for label in [*tiny, *sorted(wide)]},
                        root / "size.png", xlabel="epoch", ylabel="validation accuracy (%)",
                        title=f"Countdown, {s['train_examples']} puzzles: the tiny model and a wider one")
            parts += ["![the wider model against the tiny one](size.png)", ""]
        results["rows"] = res
    long_curves = {name: validation_curve(root / name, s) for name in LONG_RUNS
                   if (root / name / "logs.jsonl").exists()}
    long_curves = {k: v for k, v in long_curves.items() if v[1]}
    if long_curves:
        epochs = s["overfit_multiple"] * s["epochs"]
        table = []
        for name, (xs, ys) in long_curves.items():
            peak = max(range(len(ys)), key=lambda j: ys[j])
            test = f"{test_accuracy(root / name, s):.1f}" if done(root / name) else f"(stopped at epoch {xs[-1]:.0f})"
            table.append([LONG_RUNS[name][0], f"{ys[peak]:.1f}", f"{xs[peak]:.0f}", f"{ys[-1]:.1f}", test])
        parts += [f"## {epochs} epochs on the same puzzles (seed 0)", "",
                  markdown_table(["method", "validation peak (%)", "at epoch", "validation, last (%)",
                                  "test, final model (%)"], table), "", "![training for longer](sft_long.png)", ""]
        results["long"] = {name: {"epochs": xs, "validation": ys} for name, (xs, ys) in long_curves.items()}
        main_sft = [validation_curve(root / f"sft_seed{x}", s) for x in seeds if done(root / f"sft_seed{x}")]
        plot_curves({**{f"{LONG_RUNS[name][0]}, {epochs} epochs": [c] for name, c in long_curves.items()},
                     f"SFT, {s['epochs']} epochs": main_sft}, root / "sft_long.png", xlabel="epoch",
                    ylabel="validation accuracy (%)", title="Countdown, the same puzzles for longer")
    (root / "results.md").write_text("\n".join(parts))
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
