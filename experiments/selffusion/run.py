"""SelfFusion vs SFT vs logit/sequence KD (DLM and AR teachers), its ablations, and DLM vs AR latency.

    python experiments/selffusion/run.py --scale cpu              # the documented experiment (hours, 2 cores)
    python experiments/selffusion/run.py --scale smoke --out /tmp/x   # minutes; what the test suite runs

The paper's regime is post-training a *pretrained* DLM on a small instruction set for many epochs.
The CPU analogue, every stage skipped when its outputs exist (rerun to continue):

1. ``data``: Dolly training examples short enough for a CPU model (``max_chars``) and the five
   MiniLLM evaluation sets, subsampled (``eval_items`` each, prompts that fit the context).
2. ``pretrain``: masked-diffusion pretraining of the student-size DLM and of a larger DLM teacher on
   the Dolly text itself (the ``text`` task: instruction, input and output as one unconditional
   document), and causal-LM pretraining of an AR teacher of the teacher's size; one byte-level BPE
   tokenizer for all three.
3. ``teachers``: SFT of the DLM teacher and of the AR teacher on the instruction subset.
4. ``students``: from the pretrained student, on ``sft_examples`` instructions for ``epochs`` epochs:
   SFT, SelfFusion (seeds), logit KD from each teacher, sequence KD from each teacher (the DLM teacher
   decodes with 64 steps, the paper's setting), and the Table 3 ablations (easy->hard, hard->easy,
   no RMSNorm).
5. ``eval``: ROUGE-L on the five sets at 8/16/32 steps (Tables 1 and 4) and seeds 10/20/30, and the
   per-sample latency of the DLM at 1..64 steps against the AR teacher-size model (Table 5).

Results: ``OUT/results.md``, ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (evaluate_once, markdown_table, rouge, rouge_tables, setup_logging, stage,  # noqa: E402
                    train_once)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
EVAL_SETS = ["dolly", "self-inst", "vicuna", "sinst", "uinst"]

SCALES: dict[str, dict[str, Any]] = {
    "cpu": dict(max_chars=700, eval_chars=500, sft_examples=1000, epochs=6, pretrain_epochs=3, eval_items=50, vocab=2048,
                teacher_pretrain_epochs=2, student={"num_hidden_layers": 4},
                teacher={"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 6},
                batch=32, seeds=[3407, 1, 2], eval_seeds=[10, 20, 30], eval_steps=[8, 16, 32], gen_length=64,
                seqkd_steps=64, ablation_seed=3407, latency_items=20),
    "smoke": dict(max_chars=300, eval_chars=300, sft_examples=40, epochs=1, pretrain_epochs=1, eval_items=3, vocab=400,
                  teacher_pretrain_epochs=1,
                  student={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
                  teacher={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
                           "num_attention_heads": 4},
                  batch=8, seeds=[3407], eval_seeds=[10], eval_steps=[8], gen_length=16, seqkd_steps=16,
                  ablation_seed=3407, latency_items=2),
}

DOLLY_FIELDS = ["instruction", "input", "output"]


# ------------------------------------------------------------------------------------------ data
def prepare_data(root: Path, s: dict[str, Any]) -> dict[str, Path]:
    data = root / "data"
    files = {"train": data / "train_short.jsonl", "sft": data / "sft_subset.jsonl",
             **{name: data / f"eval_{name}.jsonl" for name in EVAL_SETS}}
    if all(f.exists() for f in files.values()):
        return files
    data.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (SHARED / "dolly" / "train_minillm_decoded.jsonl").read_text().splitlines() if x]
    short = [r for r in rows if sum(len(r.get(f) or "") for f in DOLLY_FIELDS) <= s["max_chars"]]
    random.Random(0).shuffle(short)
    write_jsonl(files["train"], short)
    write_jsonl(files["sft"], short[: s["sft_examples"]])
    for name in EVAL_SETS:
        recs = [json.loads(x) for x in (SHARED / "minillm_eval" / name / "valid.jsonl").read_text().splitlines() if x]
        size = lambda r: len(r.get("instruction", "")) + len(r.get("input") or "")  # noqa: E731
        fit = [r for r in recs if size(r) <= s["eval_chars"]]
        random.Random(0).shuffle(fit)
        if len(fit) < s["eval_items"]:  # sets of long prompts (S-NI): their shortest items
            fit = sorted(recs, key=size)
        write_jsonl(files[name], fit[: s["eval_items"]])
    return files


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------ configs
def config(out: Path, s: dict[str, Any], *, model: dict[str, Any], data: dict[str, Any], epochs: float, lr: float,
           seed: int, method: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = {
        "model": {"max_position_embeddings": 1024, **model},
        "data": {"max_length": 512, "long_examples": "drop", "long_answers": "truncate", "seed": seed, **data},
        "training": {"output_dir": str(out), "num_train_epochs": epochs, "per_device_train_batch_size": s["batch"],
                     "learning_rate": lr, "lr_scheduler_type": "cosine_with_min_lr", "min_lr_ratio": 0.1,
                     "warmup_ratio": 0.05, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95,
                     "max_grad_norm": 1.0, "seed": seed, "logging_steps": 10, "save_steps": 100,
                     "save_total_limit": 1,
                     "report_to": ["jsonl"], "progress_bar": False},
        "eval": {"enabled": False},
    }
    if method:
        cfg["method"] = method
    return cfg


def text_data(files: dict[str, Path]) -> dict[str, Any]:
    return {"task": "text", "task_kwargs": {"fields": DOLLY_FIELDS}, "train_source": str(files["train"])}


def sft_data(files: dict[str, Path]) -> dict[str, Any]:
    return {"task": "instruct", "train_source": str(files["sft"])}


def pretrain_student(root: Path, s: dict[str, Any], files: dict[str, Path]) -> None:
    train_once("sft", config(root / "pretrain_student", s,
                             model={"name_or_path": "preset:tiny", "tokenizer": f"bpe:{s['vocab']}",
                                    "preset_overrides": s["student"]},
                             data=text_data(files), epochs=s["pretrain_epochs"], lr=1e-3, seed=0))


def build_teachers(root: Path, s: dict[str, Any], files: dict[str, Path]) -> None:
    """Pretrain a larger DLM and an AR model of the same size and tokenizer, then SFT both."""
    tok = str(root / "pretrain_student" / "tokenizer")
    for method, name in [("sft", "dlm"), ("ar-sft", "ar")]:
        train_once(method, config(root / f"pretrain_{name}_teacher", s,
                                  model={"name_or_path": "preset:tiny", "tokenizer": tok,
                                         "preset_overrides": s["teacher"]},
                                  data=text_data(files), epochs=s["teacher_pretrain_epochs"], lr=5e-4, seed=0))
        train_once(method, config(root / f"teacher_{name}", s,
                                  model={"name_or_path": str(root / f"pretrain_{name}_teacher" / "final")},
                                  data=sft_data(files), epochs=s["epochs"], lr=2e-4, seed=3407))
        evaluate_run(root / f"teacher_{name}", s, files, headline=True)


def student_runs(root: Path, s: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any] | None, list[int]]]:
    """name -> (method, method section, seeds)."""
    dlm_t, ar_t = str(root / "teacher_dlm"), str(root / "teacher_ar")
    one = [s["ablation_seed"]]
    return {
        "sft": ("sft", None, s["seeds"]),
        "selffusion": ("selffusion", {}, s["seeds"]),
        "selffusion_easy_to_hard": ("selffusion", {"direction": "easy_to_hard"}, one),
        "selffusion_hard_to_easy": ("selffusion", {"direction": "hard_to_easy"}, one),
        "selffusion_no_rmsnorm": ("selffusion", {"calibration": False}, one),
        "kd_dlm": ("kd", {"teacher": dlm_t, "teacher_type": "dlm"}, one),
        "kd_ar": ("kd", {"teacher": ar_t, "teacher_type": "ar"}, one),
        "seqkd_dlm": ("seqkd", {"teacher": dlm_t, "teacher_type": "dlm",
                                "generation": {"gen_length": s["gen_length"], "steps": s["seqkd_steps"],
                                               "batch_size": 64}}, one),
        "seqkd_ar": ("seqkd", {"teacher": ar_t, "teacher_type": "ar",
                               "generation": {"gen_length": s["gen_length"], "steps": s["gen_length"],
                                              "temperature": 1.0, "batch_size": 64}}, one),
    }


def student_names(root: Path, s: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None, int]]:
    """(run name, method, method section, seed), the headline runs first."""
    return [(f"{name}_seed{seed}", method, section, seed)
            for name, (method, section, seeds) in student_runs(root, s).items() for seed in seeds]


def evaluate_run(run: Path, s: dict[str, Any], files: dict[str, Path], *, headline: bool) -> dict[str, Any]:
    """ROUGE-L of one run on the five sets (temperature 0.7, so that evaluation seeds differ). DLMs are
    sampled with CFG scale 1.0, the paper's setting for every DLM (Sec. 4.1); an AR model ignores it."""
    gen = {"gen_length": s["gen_length"], "steps": s["gen_length"], "batch_size": 64, "temperature": 0.7,
           "cfg_scale": 1.0}
    seeds = s["eval_seeds"] if headline else s["eval_seeds"][:1]
    return {es: evaluate_once(run, "instruct", steps=s["eval_steps"], seeds=seeds, generation=gen,
                              source=str(files[es]), name=f"rouge_{es}") for es in EVAL_SETS}


def students(root: Path, s: dict[str, Any], files: dict[str, Path], on_result: Any,
             only: list[str] | None = None) -> None:
    """Train and evaluate every student run (or those named in ``only``, in that order);
    ``on_result()`` refreshes the results after each."""
    base = str(root / "pretrain_student" / "final")
    runs = {r[0]: r for r in student_names(root, s)}
    unknown = sorted(set(only or []) - set(runs))
    if unknown:
        raise SystemExit(f"--runs: unknown run names {unknown}; known: {sorted(runs)}")
    for run_name, method, section, seed in [runs[n] for n in only] if only else runs.values():
        if section and "teacher" in section:
            build_teachers(root, s, files)  # skipped once done
        run = train_once(method, config(root / run_name, s, model={"name_or_path": base}, data=sft_data(files),
                                        epochs=s["epochs"], lr=5e-4, seed=seed, method=section))
        evaluate_run(run, s, files, headline=run_name.startswith(("sft_", "selffusion_seed")))
        on_result()


def collect(root: Path, s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """run name -> eval set -> metrics report, for every run evaluated so far."""
    names = ["teacher_dlm", "teacher_ar"] + [n for n, *_ in student_names(root, s)]
    out = {}
    for name in names:
        reports = {es: root / name / "eval" / f"rouge_{es}" / "metrics.json" for es in EVAL_SETS}
        if all(p.exists() for p in reports.values()):
            out[name] = {es: json.loads(p.read_text()) for es, p in reports.items()}
    return out


def latency(root: Path, s: dict[str, Any], files: dict[str, Path]) -> str:
    """Per-sample latency of the DLM student at 1..64 steps vs the AR teacher (Table 5), batch 1."""
    from dlmdistill.models.autoregressive import load_for_inference
    from dlmdistill.models.loading import ModelConfig
    from dlmdistill.sampling import GenerationConfig, generate_texts
    from dlmdistill.tasks.registry import get_task

    path = root / "latency.json"
    if not path.exists():
        examples = get_task("instruct").load(str(files["dolly"]), split="test", limit=s["latency_items"])
        prompts = [e.prompt for e in examples]
        res = {}
        dlm, tok = load_for_inference(ModelConfig(name_or_path=str(root / "sft_seed3407" / "final")))
        for steps in [1, 2, 4, 8, 16, 32, 64]:
            if steps > s["gen_length"]:
                continue
            t0 = time.perf_counter()
            generate_texts(dlm, tok, prompts, GenerationConfig(gen_length=s["gen_length"], steps=steps, batch_size=1))
            res[f"DLM {steps} steps"] = (time.perf_counter() - t0) / len(prompts)
        ar, atok = load_for_inference(ModelConfig(name_or_path=str(root / "teacher_ar" / "final")))
        ids = [atok(p, add_special_tokens=False).input_ids for p in prompts]
        t0 = time.perf_counter()
        for x in ids:  # greedy, stops at EOS (at most gen_length tokens)
            ar.generate_responses([x], GenerationConfig(gen_length=s["gen_length"], steps=1, temperature=0.0))
        res["AR (teacher size)"] = (time.perf_counter() - t0) / len(prompts)
        path.write_text(json.dumps(res, indent=2))
    res = json.loads(path.read_text())
    ar_t = res["AR (teacher size)"]
    rows = [[k, f"{1000 * v:.1f}", f"{ar_t / v:.2f}x"] for k, v in res.items()]
    return markdown_table(["model", "latency per sample (ms)", "speed-up vs AR"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--out", default=None, help="output folder (default runs/exp_selffusion_<scale>)")
    ap.add_argument("--stages", nargs="*", default=["train", "latency"], help="train (and evaluate), latency")
    ap.add_argument("--runs", nargs="*", default=None,
                    help="student runs to train, in this order (e.g. sft_seed3407 selffusion_seed3407); default all")
    a = ap.parse_args()
    setup_logging()
    if not SHARED.exists():
        sys.exit(f"the shared data folder is missing: {SHARED}")
    s = SCALES[a.scale]
    root = Path(a.out or f"runs/exp_selffusion_{a.scale}")
    root.mkdir(parents=True, exist_ok=True)
    files = stage("data", lambda: prepare_data(root, s))
    n_texts = sum(1 for _ in open(files["train"]))

    def write_results() -> str:
        evals = collect(root, s)
        parts = [f"# SelfFusion experiment (scale {a.scale})", "",
                 f"Student: preset tiny + {s['student']}; teachers: {s['teacher']}; BPE {s['vocab']}; "
                 f"{s['sft_examples']} instructions x {s['epochs']} epochs after {s['pretrain_epochs']} epochs of "
                 f"masked-diffusion pretraining on {n_texts} Dolly texts. ROUGE-L on {s['eval_items']} items per set, "
                 f"temperature 0.7; mean ± std over training seeds x evaluation seeds.", ""]
        if evals:
            parts += ["## ROUGE-L (Tables 1, 3, 4)", "", rouge_tables(evals, s["eval_steps"], EVAL_SETS), ""]
        if (root / "latency.json").exists():
            parts += ["## Latency (Table 5)", "", latency(root, s, files), ""]
        text = "\n".join(parts) + "\n"
        (root / "results.md").write_text(text)
        (root / "results.json").write_text(json.dumps(
            {"scale": s, "rouge": {r: {es: {st: rouge(rep, st) for st in s["eval_steps"]} for es, rep in v.items()}
                                   for r, v in evals.items()}}, indent=2))
        return text

    if "train" in a.stages:
        stage("pretrain student", lambda: pretrain_student(root, s, files))
        stage("students", lambda: students(root, s, files, write_results, a.runs))
    if "latency" in a.stages and (root / "teacher_ar" / "final").exists():
        stage("latency", lambda: latency(root, s, files))
    print(write_results())


if __name__ == "__main__":
    main()
