"""SelfFusion vs SFT where a tiny model measurably learns: accuracy on 4x4 Sudoku.

At CPU scale the Dolly comparison (``run.py``) ends with ROUGE-L near 1, where differences are
noise. Here the same question, does SelfFusion's second mode and bidirectional KD beat plain
masked-diffusion SFT for the same number of optimizer steps, is asked on a task with an exact metric:

    python experiments/selffusion/sudoku.py --scale cpu                      # trains its own base
    python experiments/selffusion/sudoku.py --scale cpu --base runs/exp_dopsd_sudoku_cpu/base/final

Stages (each skipped when its outputs exist):

1. ``base``: masked-diffusion SFT from scratch to a partial accuracy (the d-OPSD experiment's base
   recipe, so ``--base`` may point at that run's ``final/`` to save its 15 minutes).
2. ``main``: from the base, continued SFT and SelfFusion (paper defaults), several seeds, the same
   optimizer steps, batch and learning rate, evaluated every ``eval_every`` steps on held-out puzzles.
3. ``ablations``: Table 3's rows (easy_to_hard, hard_to_easy, w/o RMSNorm), one seed.

Results: ``OUT/results.md``, ``OUT/accuracy_vs_steps.png``, ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import eval_curve, fmt, markdown_table, plot_curves, setup_logging, stage, train_once  # noqa: E402


def _dopsd_driver():
    """The d-OPSD driver, for its base recipe and scales (one base recipe for both experiments)."""
    spec = importlib.util.spec_from_file_location("dopsd_run", Path(__file__).resolve().parents[1] / "dopsd" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DOPSD = _dopsd_driver()


SCALES: dict[str, dict[str, Any]] = {
    "cpu": dict(steps=200, eval_every=25, batch=64, lr=1e-4, seeds=[0, 1, 2], ablation_seeds=[0]),
    "smoke": dict(steps=2, eval_every=1, batch=8, lr=1e-4, seeds=[0], ablation_seeds=[0]),
}

#: label -> (method, run-name prefix, method section, multiple of the step budget). A SelfFusion step
#: costs two SFT steps (two copies of the batch), so SFT at twice the steps is the compute-matched row.
MAIN_RUNS: dict[str, tuple[str, str, dict[str, Any] | None, int]] = {
    "SFT": ("sft", "sft", None, 1),
    "SelfFusion": ("selffusion", "selffusion", {}, 1),
    "SFT, 2x steps (same compute as SelfFusion)": ("sft", "sft_2x", None, 2),
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "easy_to_hard": {"direction": "easy_to_hard"},
    "hard_to_easy": {"direction": "hard_to_easy"},
    "no_rmsnorm": {"calibration": False},
}


def post_config(root: Path, name: str, base: Path, d: dict[str, Any], s: dict[str, Any], seed: int,
                method: dict[str, Any] | None, budget: int = 1) -> dict[str, Any]:
    cfg = DOPSD.common_config(root / name, d, "sudoku", seed, model=str(base), steps=s["steps"] * budget)
    cfg["training"].update(learning_rate=s["lr"], per_device_train_batch_size=s["batch"], eval_steps=s["eval_every"],
                           logging_steps=5)
    if method is not None:
        cfg["method"] = method
    return cfg


def accuracies(run: Path) -> list[float]:
    return eval_curve(run, "eval/accuracy")[1] or [float("nan")]


def best(run: Path) -> float:
    return max(accuracies(run))


def average(run: Path) -> float:
    """Mean accuracy over a run's evaluations: less noisy than its best (the max of noisy values)."""
    ys = accuracies(run)
    return sum(ys) / len(ys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--out", default=None, help="output folder (default runs/exp_selffusion_sudoku_<scale>)")
    ap.add_argument("--base", default=None, help="an existing base model folder (default: train one)")
    ap.add_argument("--stages", nargs="*", default=["main", "ablations"])
    a = ap.parse_args()
    setup_logging()
    s, d = SCALES[a.scale], DOPSD.SCALES[a.scale]
    root = Path(a.out or f"runs/exp_selffusion_sudoku_{a.scale}")
    root.mkdir(parents=True, exist_ok=True)
    if a.base:
        base = Path(a.base)
        if not (base / "config.json").exists():
            sys.exit(f"--base: {base} is not a model folder (no config.json)")
        metrics = base.parent / "final_metrics.json"
    else:
        stage("base", lambda: DOPSD.base_run(root, d, "sudoku"))
        base, metrics = root / "base" / "final", root / "base" / "final_metrics.json"
    base_acc = json.loads(metrics.read_text()).get("accuracy", float("nan")) if metrics.exists() else float("nan")
    parts = [f"# SelfFusion vs SFT on Sudoku (scale {a.scale})", "",
             f"Base `{base}`: {base_acc:.1f}% on {d['eval_items']} held-out puzzles. Every run: {s['steps']} "
             f"optimizer steps (the compute-matched SFT row: {2 * s['steps']}), batch {s['batch']}, lr {s['lr']}, constant schedule; accuracy every "
             f"{s['eval_every']} steps (gen {d['gen_length']}, block {d['block_length']}, {d['steps']} steps).", ""]
    results: dict[str, Any] = {"base_accuracy": base_acc, "scale": s}
    if "main" in a.stages:
        def main_runs() -> dict[str, list[Path]]:
            runs: dict[str, list[Path]] = {label: [] for label in MAIN_RUNS}
            for seed in s["seeds"]:
                for label, (method, prefix, section, budget) in MAIN_RUNS.items():
                    cfg = post_config(root, f"{prefix}_seed{seed}", base, d, s, seed, section, budget)
                    runs[label].append(train_once(method, cfg))
            return runs

        runs = stage("main", main_runs)
        logged = {label: [eval_curve(r, "eval/accuracy") for r in rs] for label, rs in runs.items()}
        curves = {label: [([0.0, *xs], [base_acc, *ys]) for xs, ys in cs] for label, cs in logged.items()}
        accs = {label: [ys or [float("nan")] for _, ys in cs] for label, cs in logged.items()}
        res = {label: {"best": [max(ys) for ys in v], "average": [sum(ys) / len(ys) for ys in v],
                       "final": [ys[-1] for ys in v]} for label, v in accs.items()}
        plot_curves(curves, root / "accuracy_vs_steps.png", xlabel="optimizer steps", ylabel="accuracy (%)",
                    title=f"Sudoku, from a base at {base_acc:.1f}%")
        rows = [[label, fmt(v["best"]), fmt(v["average"]), fmt(v["final"]), str(len(v["best"]))]
                for label, v in res.items()]
        header = ["method", "best accuracy (%)", "mean over evaluations (%)", "final accuracy (%)", "seeds"]
        parts += ["## Accuracy", "", markdown_table(header, rows), "", "![accuracy vs steps](accuracy_vs_steps.png)", ""]
        results["main"] = res
    if "ablations" in a.stages:
        def ablation_runs() -> dict[str, list[float]]:
            out = {}
            for name, section in ABLATIONS.items():
                out[name] = [best(train_once("selffusion", post_config(root, f"ablation_{name}_seed{seed}", base, d,
                                                                       s, seed, section)))
                             for seed in s["ablation_seeds"]]
            return out

        abl = stage("ablations", ablation_runs)
        seeds = s["ablation_seeds"]
        rows = [["SelfFusion (bidirectional, RMSNorm)", fmt([best(root / f"selffusion_seed{x}") for x in seeds]),
                 fmt([average(root / f"selffusion_seed{x}") for x in seeds])]]
        rows += [[f"{name} ({', '.join(f'{k}={v}' for k, v in ABLATIONS[name].items())})", fmt(v),
                  fmt([average(root / f"ablation_{name}_seed{x}") for x in seeds])] for name, v in abl.items()]
        parts += ["## Ablations (Table 3, one seed)", "",
                  markdown_table(["variant", "best accuracy (%)", "mean over evaluations (%)"], rows), ""]
        results["ablations"] = abl
    (root / "results.md").write_text("\n".join(parts) + "\n")
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
