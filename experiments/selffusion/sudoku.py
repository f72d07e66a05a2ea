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
4. ``teachers``: Table 1's teachers, trained from scratch with the base recipe and tokenizer: a
   deeper DLM (``teacher`` overrides) and an AR model of the same size.
5. ``kd``: Table 1's baselines from the same base, with the main runs' steps, batch and lr: logit KD
   and sequence KD from each teacher (sequence KD trains on ``seqkd_examples`` teacher answers, one
   epoch: the SFT rows see as many examples; the answers are generated once per teacher, by the
   first seed, and reused by the others).
6. ``steps``: every finished run's final model at 8, 16 (Table 1) and 32 (Table 4) denoising steps.
7. ``latency``: Table 5, per-puzzle latency (batch 1) and accuracy of the DLM teacher at 4..64
   steps against the AR teacher of the same size.

Two processes can share the work: ``--only`` names the teacher/KD runs one invocation trains
(shell patterns), e.g. ``--stages teachers kd --only teacher_ar 'kd_ar_*' 'seqkd_ar_*'`` in one
shell and the ``dlm`` runs in another; a last invocation without ``--only`` writes the full tables.

Results: ``OUT/results.md``, ``OUT/accuracy_vs_steps.png``, ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import shutil
import sys
from functools import cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (eval_curve, evaluate_once, fmt, markdown_table, plot_curves, setup_logging,  # noqa: E402
                    stage, train_once)


def _dopsd_driver():
    """The d-OPSD driver, for its base recipe and scales (one base recipe for both experiments)."""
    spec = importlib.util.spec_from_file_location("dopsd_run", Path(__file__).resolve().parents[1] / "dopsd" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DOPSD = _dopsd_driver()


SCALES: dict[str, dict[str, Any]] = {
    "cpu": dict(steps=200, eval_every=25, batch=64, lr=1e-4, seeds=[0, 1, 2], ablation_seeds=[0],
                teacher={"num_hidden_layers": 4}, seqkd_examples=12800, latency_items=50,
                latency_steps=[4, 8, 16, 32, 64], final_steps=[8, 16, 32]),
    "smoke": dict(steps=2, eval_every=1, batch=8, lr=1e-4, seeds=[0, 1], ablation_seeds=[0],
                  teacher={"num_hidden_layers": 2}, seqkd_examples=16, latency_items=2, latency_steps=[2, 8],
                  final_steps=[8, 16]),
}

#: label -> (method, run-name prefix, method section, multiple of the step budget). A SelfFusion step
#: costs two SFT steps (two copies of the batch), so SFT at twice the steps is the compute-matched row.
MAIN_RUNS: dict[str, tuple[str, str, dict[str, Any] | None, int]] = {
    "SFT": ("sft", "sft", None, 1),
    "SelfFusion": ("selffusion", "selffusion", {}, 1),
    "SFT, 2x steps (same compute as SelfFusion)": ("sft", "sft_2x", None, 2),
    # issue 12: SelfFusion's default normalisation ('masked', the paper's eq. 3-4) differs from SFT's
    # ('token'); these rows match SFT's, and the last drops the KD term, so that a difference between
    # SelfFusion and SFT can be attributed to the normalisation, the second mode or the distillation
    "SelfFusion, token normalisation (as SFT)": ("selffusion", "selffusion_token", {"normalization": "token"}, 1),
    "SelfFusion, token normalisation, kd_weight 0 (two modes, no KD)":
        ("selffusion", "selffusion_token_kd0", {"normalization": "token", "kd_weight": 0.0}, 1),
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "easy_to_hard": {"direction": "easy_to_hard"},
    "hard_to_easy": {"direction": "hard_to_easy"},
    "no_rmsnorm": {"calibration": False},
}


#: Table 1's baselines: label -> (method, run-name prefix, teacher). Sequence KD decodes greedily with
#: the evaluation sampler (DLM) or left to right (AR).
KD_RUNS: dict[str, tuple[str, str, str]] = {
    "Logit KD, DLM teacher": ("kd", "kd_dlm", "dlm"),
    "Logit KD, AR teacher": ("kd", "kd_ar", "ar"),
    "Sequence KD, DLM teacher": ("seqkd", "seqkd_dlm", "dlm"),
    "Sequence KD, AR teacher": ("seqkd", "seqkd_ar", "ar"),
}
TEACHERS = {"dlm": ("sft", "DLM teacher"), "ar": ("ar-sft", "AR teacher (same size)")}


def kd_section(method: str, teacher: str, root: Path, d: dict[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = {"teacher": str(root / f"teacher_{teacher}"), "teacher_type": teacher}
    if method == "seqkd":
        gen = DOPSD.generation(d, batch=256) if teacher == "dlm" else \
            {"gen_length": d["gen_length"], "steps": d["gen_length"], "batch_size": 256}
        section["generation"] = {**gen, "temperature": 0.0}
    return section


def post_config(root: Path, name: str, base: Path, d: dict[str, Any], s: dict[str, Any], seed: int,
                method: dict[str, Any] | None, budget: int = 1) -> dict[str, Any]:
    cfg = DOPSD.common_config(root / name, d, "sudoku", seed, model=str(base), steps=s["steps"] * budget)
    cfg["training"].update(learning_rate=s["lr"], per_device_train_batch_size=s["batch"], eval_steps=s["eval_every"],
                           logging_steps=5)
    if method is not None:
        cfg["method"] = method
    return cfg


def done(run: Path) -> bool:
    return (run / "final" / "config.json").exists()


def reuse_answers(first: Path, run: Path) -> None:
    """Copy the first seed's teacher answers (sequence KD) into ``run`` unless it has its own. Only
    from a finished run: a file still being written would be copied part-way (the rest regenerated)."""
    from dlmdistill.methods.seqkd import DATA_FILE, SOURCE_FILE

    if first != run and done(first) and not (run / DATA_FILE).exists():
        run.mkdir(parents=True, exist_ok=True)
        for name in (SOURCE_FILE, DATA_FILE):  # with the record of what generated them (checked on reuse)
            shutil.copyfile(first / name, run / name)


@cache
def accuracy_curve(run: Path) -> tuple[list[float], list[float]]:
    """(steps, accuracy) of a finished run's periodic evaluations, read from its log once."""
    return eval_curve(run, "eval/accuracy")


def accuracies(run: Path) -> list[float]:
    return accuracy_curve(run)[1] or [float("nan")]


def best(run: Path) -> float:
    return max(accuracies(run))


def average(run: Path) -> float:
    """Mean accuracy over a run's evaluations: less noisy than its best (the max of noisy values)."""
    ys = accuracies(run)
    return sum(ys) / len(ys)


def summarize(runs: dict[str, list[Path]]) -> dict[str, dict[str, list[float]]]:
    """label -> best / mean-over-evaluations / final accuracy of each of its runs."""
    accs = {label: [accuracies(r) for r in rs] for label, rs in runs.items() if rs}
    return {label: {"best": [max(ys) for ys in v], "average": [sum(ys) / len(ys) for ys in v],
                    "final": [ys[-1] for ys in v]} for label, v in accs.items()}


def final_accuracy(run: Path) -> float:
    path = run / "final_metrics.json"
    return json.loads(path.read_text()).get("accuracy", float("nan")) if path.exists() else float("nan")


def latency(root: Path, d: dict[str, Any], s: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Table 5: accuracy (batched) and seconds per puzzle (batch 1, ``latency_items`` puzzles) of the DLM
    teacher at each step count and of the AR teacher of the same size."""
    from dlmdistill.evaluation import evaluate_model
    from dlmdistill.models.autoregressive import load_for_inference
    from dlmdistill.models.loading import ModelConfig
    from dlmdistill.sampling import GenerationConfig
    from dlmdistill.tasks.registry import get_task

    task = get_task("sudoku", **DOPSD.task_kwargs("sudoku"))
    puzzles = task.load(None, split="test", limit=d["eval_items"])

    def measure(model, tok, gen: dict[str, Any]) -> dict[str, float]:
        def one(examples, batch: int) -> dict[str, Any]:
            rep = evaluate_model(model, tok, task, examples, GenerationConfig(**{**gen, "batch_size": batch}),
                                 [gen["steps"]], [0], progress=False)
            return next(iter(rep["results"].values()))["summary"]
        return {"accuracy": one(puzzles, 200)[task.metric]["mean"],
                "seconds": one(puzzles[: s["latency_items"]], 1)["seconds_per_sample"]["mean"]}

    out: dict[str, dict[str, float]] = {}
    dlm, tok = load_for_inference(ModelConfig(name_or_path=str(root / "teacher_dlm" / "final")))
    for steps in s["latency_steps"]:
        out[f"DLM teacher, {steps} steps"] = measure(dlm, tok, {**DOPSD.generation(d), "steps": steps})
    ar, tok = load_for_inference(ModelConfig(name_or_path=str(root / "teacher_ar" / "final")))
    out["AR teacher (same size), greedy"] = measure(ar, tok, {"gen_length": d["gen_length"], "steps": d["gen_length"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--out", default=None, help="output folder (default runs/exp_selffusion_sudoku_<scale>)")
    ap.add_argument("--base", default=None, help="an existing base model folder (default: train one)")
    ap.add_argument("--stages", nargs="*", default=["main", "ablations", "teachers", "kd", "steps", "latency"],
                    help="main, ablations, teachers, kd, steps, latency (the tables show every finished run)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="train only the runs whose folder names match these shell patterns (e.g. teacher_ar "
                         "'kd_ar_*'), so that two processes can share a study")
    a = ap.parse_args()
    setup_logging()
    s, d = SCALES[a.scale], DOPSD.SCALES[a.scale]
    root = Path(a.out or f"runs/exp_selffusion_sudoku_{a.scale}")
    root.mkdir(parents=True, exist_ok=True)
    if a.base:
        base = Path(a.base)
        if not (base / "config.json").exists():
            sys.exit(f"--base: {base} is not a model folder (no config.json)")
    else:
        stage("base", lambda: DOPSD.base_run(root, d, "sudoku"))
        base = root / "base" / "final"
    base_acc = final_accuracy(base.parent)

    def wanted(run_name: str) -> bool:
        return not a.only or any(fnmatch.fnmatchcase(run_name, pat) for pat in a.only)

    def train(method: str, cfg: dict[str, Any]) -> None:
        """Train the run unless ``--only`` leaves it to another process."""
        if wanted(Path(cfg["training"]["output_dir"]).name):
            train_once(method, cfg)

    def seeded(prefix: str, seeds: list[int]) -> list[Path]:
        """The finished runs of a row."""
        return [root / f"{prefix}_seed{x}" for x in seeds if done(root / f"{prefix}_seed{x}")]

    if "main" in a.stages:
        def main_runs() -> None:
            for seed in s["seeds"]:
                for method, prefix, section, budget in MAIN_RUNS.values():
                    train(method, post_config(root, f"{prefix}_seed{seed}", base, d, s, seed, section, budget))
        stage("main", main_runs)
    if "ablations" in a.stages:
        def ablation_runs() -> None:
            for name, section in ABLATIONS.items():
                for seed in s["ablation_seeds"]:
                    train("selffusion", post_config(root, f"ablation_{name}_seed{seed}", base, d, s, seed, section))
        stage("ablations", ablation_runs)
    if "teachers" in a.stages or "kd" in a.stages:
        def teachers() -> None:
            for kind, (method, _) in TEACHERS.items():
                if wanted(f"teacher_{kind}"):
                    DOPSD.base_run(root, d, "sudoku", name=f"teacher_{kind}", method=method, tokenizer=str(base),
                                   overrides=s["teacher"])
        stage("teachers", teachers)
    if "kd" in a.stages:
        def kd_runs() -> None:
            for seed in s["seeds"]:
                for method, prefix, teacher in KD_RUNS.values():
                    name = f"{prefix}_seed{seed}"
                    cfg = post_config(root, name, base, d, s, seed, kd_section(method, teacher, root, d))
                    if method == "seqkd":  # the same prompts for every seed: the teacher answers them once
                        cfg["data"].update(train_limit=s["seqkd_examples"], seed=0)
                        if wanted(name):  # never touch a folder another process trains
                            reuse_answers(root / f"{prefix}_seed{s['seeds'][0]}", root / name)
                    train(method, cfg)
        stage("kd", kd_runs)
    if "latency" in a.stages and all(done(root / f"teacher_{k}") for k in TEACHERS) \
            and not (root / "latency.json").exists():
        (root / "latency.json").write_text(json.dumps(stage("latency", lambda: latency(root, d, s)), indent=2))

    # ---- the report: every finished run, whichever invocation trained it
    parts = [f"# SelfFusion vs SFT and KD on Sudoku (scale {a.scale})", "",
             f"Base `{base}`: {base_acc:.1f}% on {d['eval_items']} held-out puzzles. Every run: {s['steps']} "
             f"optimizer steps (the compute-matched SFT row: {2 * s['steps']}), batch {s['batch']}, lr {s['lr']}, "
             f"constant schedule; accuracy every {s['eval_every']} steps (gen {d['gen_length']}, block "
             f"{d['block_length']}, {d['steps']} steps).", ""]
    results: dict[str, Any] = {"base_accuracy": base_acc, "scale": s}
    teachers_done = {label: final_accuracy(root / f"teacher_{k}") for k, (_, label) in TEACHERS.items()
                     if done(root / f"teacher_{k}")}
    if teachers_done:
        parts += ["## Teachers (Table 1)", "", f"Trained from scratch with the base recipe ({d['base_steps']} steps), "
                  f"overrides {s['teacher']}.", "",
                  markdown_table(["teacher", "accuracy (%)"], [[k, f"{v:.1f}"] for k, v in teachers_done.items()]), ""]
        results["teachers"] = teachers_done
    rows_runs = {label: seeded(prefix, s["seeds"]) for label, (_, prefix, _, _) in MAIN_RUNS.items()}
    rows_runs |= {label: seeded(prefix, s["seeds"]) for label, (_, prefix, _) in KD_RUNS.items()}
    rows_runs = {label: runs for label, runs in rows_runs.items() if runs}
    if rows_runs:
        res = summarize(rows_runs)
        curves = {label: [([0.0, *xs], [base_acc, *ys]) for xs, ys in map(accuracy_curve, rs)]
                  for label, rs in rows_runs.items()}
        plot_curves(curves, root / "accuracy_vs_steps.png", xlabel="optimizer steps", ylabel="accuracy (%)",
                    title=f"Sudoku, from a base at {base_acc:.1f}%")
        rows = [[label, fmt(v["best"]), fmt(v["average"]), fmt(v["final"]), str(len(v["best"]))]
                for label, v in res.items()]
        header = ["method", "best accuracy (%)", "mean over evaluations (%)", "final accuracy (%)", "seeds"]
        parts += ["## Accuracy (Tables 1 and 4)", "", markdown_table(header, rows), "",
                  "![accuracy vs steps](accuracy_vs_steps.png)", ""]
        results["main"] = res
    if rows_runs and "steps" in a.stages:
        def at_steps(run: Path) -> dict[str, float]:
            rep = evaluate_once(run, "sudoku", steps=s["final_steps"], seeds=[0], generation=DOPSD.generation(d),
                                limit=d["eval_items"], task_kwargs=DOPSD.task_kwargs("sudoku"), name="final_steps")
            return {k: v["summary"]["accuracy"]["mean"] for k, v in rep["results"].items()}

        by_steps = stage("steps", lambda: {label: [at_steps(r) for r in rs] for label, rs in rows_runs.items()})
        rows = [[label, *(fmt([x[str(n)] for x in v]) for n in s["final_steps"]), str(len(v))]
                for label, v in by_steps.items()]
        parts += ["## Final models at several denoising steps (Tables 1 and 4)", "",
                  markdown_table(["method", *(f"{n} steps (%)" for n in s["final_steps"]), "seeds"], rows), ""]
        results["final_steps"] = by_steps
    abl = {name: seeded(f"ablation_{name}", s["ablation_seeds"]) for name in ABLATIONS}
    abl = {name: runs for name, runs in abl.items() if runs}
    if abl:
        full = seeded("selffusion", s["ablation_seeds"])
        rows = [["SelfFusion (bidirectional, RMSNorm)", fmt([best(r) for r in full]), fmt([average(r) for r in full])]]
        rows += [[f"{name} ({', '.join(f'{k}={v}' for k, v in ABLATIONS[name].items())})", fmt([best(r) for r in runs]),
                  fmt([average(r) for r in runs])] for name, runs in abl.items()]
        parts += ["## Ablations (Table 3, one seed)", "",
                  markdown_table(["variant", "best accuracy (%)", "mean over evaluations (%)"], rows), ""]
        results["ablations"] = {name: [best(r) for r in runs] for name, runs in abl.items()}
    if (root / "latency.json").exists():
        lat = json.loads((root / "latency.json").read_text())
        ar = next(v["seconds"] for k, v in lat.items() if k.startswith("AR"))
        rows = [[k, f"{1000 * v['seconds']:.1f}", f"{ar / v['seconds']:.2f}x", f"{v['accuracy']:.1f}"]
                for k, v in lat.items()]
        parts += [f"## Latency (Table 5): batch 1, {s['latency_items']} puzzles; accuracy on {d['eval_items']}", "",
                  markdown_table(["model", "ms per puzzle", "speed-up vs AR", "accuracy (%)"], rows), ""]
        results["latency"] = lat
    (root / "results.md").write_text("\n".join(parts) + "\n")
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
