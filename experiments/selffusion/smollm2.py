"""SelfFusion's Table 1 (SFT vs SelfFusion on Dolly, ROUGE-L on the five MiniLLM sets) with a student
that writes sentences: SmolLM2-135M-Instruct adapted to a masked-diffusion LM.

    python experiments/selffusion/smollm2.py --scale gpu      # the whole comparison, one GPU, bf16
    python experiments/selffusion/smollm2.py --scale gpu-8min # the same stages in about 5 minutes of one GPU
    python experiments/selffusion/smollm2.py --scale cpu      # the CPU go/no-go: adaptation only
    python experiments/selffusion/smollm2.py --scale smoke --out /tmp/x   # a tiny random model (test suite)

Stages, each skipped when its output exists (rerun the same command to continue):

1. ``data``: the MiniLLM Dolly training split (``max_chars`` caps instruction + input + output for the
   CPU scale), and a fixed subset of each of the five MiniLLM evaluation sets: the items whose
   instruction + input have at most ``eval_chars`` characters, shuffled with seed 0, the first
   ``eval_items`` (S-NI, whose prompts are long, falls back to its shortest items).
2. ``base``: ``convert_ar`` of SmolLM2-135M-Instruct (the GGUF file, de-quantised) into a bidirectional
   DLM with Dream-style shifted logits (token i predicted at position i-1, which keeps the AR
   model's alignment). The smoke scale converts a tiny random Llama instead (SmolLM2's architecture).
3. ``adapt``: masked-diffusion SFT of the converted model on Dolly in the SelfFusion A.2 template,
   with prompt dropout ``cfg_prob`` (so that CFG has an unconditional model to contrast with);
   ROUGE-L on the ``adapt_eval_items`` first Dolly evaluation items before training (step 0) and
   every ``adapt_eval_every`` steps. This is the go/no-go: an adapted student under 10 ROUGE-L on
   Dolly makes the comparison meaningless.
4. ``students`` (not at the ``cpu`` scale): from the adapted model, SFT, SFT for twice the epochs and
   SelfFusion (the paper's defaults: bidirectional, RMSNorm calibration, KD weight 1), each per seed.
   None of them drops prompts (SelfFusion has no such option, so SFT does not either): both keep the
   unconditional model that the adaptation's prompt dropout trained, which CFG uses.
5. ``eval``: ROUGE-L of every student on the five sets at ``eval_steps`` (8 and 16) with CFG scale
   1.0 (the paper's setting for every DLM) and evaluation seeds ``eval_seeds``.

Results: ``OUT/results.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (GGUF_DIR, GGUF_FILE, convert_smollm2, convert_tiny_llama, evaluate_once,  # noqa: E402
                    markdown_table, mean_std, read_logs, rouge, rouge_tables, setup_logging, stage, train_once)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
EVAL_SETS = ["dolly", "self-inst", "vicuna", "sinst", "uinst"]
DOLLY_FIELDS = ["instruction", "input", "output"]

# Generation for every ROUGE-L number: temperature 0.7 (MiniLLM's and SelfFusion's sampling), CFG scale
# 1.0. ``cache`` is GenerationConfig's Fast-dLLM key/value caching: prefix caching keeps the prompt's
# keys and values between refreshes (approximate: they were computed with more masks in the response),
# the step count, and so the comparison at 8 and 16 steps, is unchanged. It cut 20% of the decoding time
# of the converted model on the CPU (8 prompts, 64 tokens, 16 steps: 216 s -> 173 s); the GPU scale
# decodes exactly (evaluation is a small part of its time), ``--cache prefix`` switches it on.
# ``threshold`` (parallel commits) is not used: it replaces the fixed step counts the table compares.
SCALES: dict[str, dict[str, Any]] = {
    # one GPU, bf16 autocast: MiniLLM's Dolly split (11,435 examples), 512 tokens; eval 100 items per set
    "gpu": dict(max_chars=None, eval_chars=None, eval_items=100, max_length=512, batch=32, accumulation=2,
                mixed_precision="bf16", threads=None, gradient_checkpointing=False,
                adapt_epochs=3, adapt_lr=5e-5, adapt_eval_items=100, adapt_eval_every=200, cfg_prob=0.1,
                epochs=3, lr=2e-5, seeds=[3407, 1, 2], eval_seeds=[10, 20, 30], eval_steps=[8, 16],
                gen_length=128, eval_batch=64, cache="none", cfg_scale=1.0, students=True),
    # the whole pipeline with real weights in one call of an offline GPU machine (under 8 minutes; see
    # docs/benchmarks.md): 200 adaptation steps, 60 optimizer steps per student (SFT x2: 120), one seed,
    # 20 items per set. 8,192 tokens per step, as in gpu_check's SFT row (0.49 s per step on an H200), so
    # about 440 steps x 0.5 s of training, 15 small evaluations and the conversion: about 5 minutes.
    # A plumbing check of the real model on a GPU, not the comparison: its ROUGE-L carries no claim.
    "gpu-8min": dict(max_chars=1000, eval_chars=400, eval_items=20, max_length=256, batch=32, accumulation=1,
                     mixed_precision="bf16", threads=None, gradient_checkpointing=False,
                     adapt_max_steps=200, adapt_lr=5e-5, adapt_eval_items=20, adapt_eval_every=100, cfg_prob=0.1,
                     student_steps=60, lr=2e-5, seeds=[3407], eval_seeds=[10], eval_steps=[8, 16],
                     gen_length=64, eval_batch=64, cache="none", cfg_scale=1.0, students=True),
    # the CPU go/no-go (2 cores, fp32): adaptation only, a short run, 20 short Dolly items at 16 steps
    "cpu": dict(max_chars=400, eval_chars=200, eval_items=20, max_length=128, batch=2, accumulation=1,
                mixed_precision="no", threads=2, gradient_checkpointing=False,
                adapt_max_steps=60, adapt_lr=1e-4, adapt_eval_items=20, adapt_eval_every=30, cfg_prob=0.1,
                eval_steps=[16], gen_length=64, eval_batch=20, cache="none", cfg_scale=0.0, students=False),
    "smoke": dict(max_chars=300, eval_chars=300, eval_items=2, max_length=96, batch=4, accumulation=1,
                  mixed_precision="no", threads=None, gradient_checkpointing=False,
                  adapt_max_steps=4, adapt_lr=1e-3, adapt_eval_items=2, adapt_eval_every=2, cfg_prob=0.1,
                  train_limit=40, epochs=1, lr=1e-3, seeds=[3407], eval_seeds=[10], eval_steps=[8],
                  gen_length=8, eval_batch=8, cache="prefix", cfg_scale=1.0, students=True,
                  tiny={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2},
                  vocab=400),
}


# ------------------------------------------------------------------------------------------ data
def prepare_data(root: Path, s: dict[str, Any], shared: Path = SHARED) -> dict[str, Path]:
    data = root / "data"
    files = {"train": data / "train.jsonl", "adapt_eval": data / "adapt_eval_dolly.jsonl",
             **{name: data / f"eval_{name}.jsonl" for name in EVAL_SETS}}
    if all(f.exists() for f in files.values()):
        return files
    data.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(shared / "dolly" / "train_minillm_decoded.jsonl")
    if s["max_chars"]:
        rows = [r for r in rows if sum(len(r.get(f) or "") for f in DOLLY_FIELDS) <= s["max_chars"]]
    random.Random(0).shuffle(rows)
    write_jsonl(files["train"], rows[: s.get("train_limit")])
    for name in EVAL_SETS:
        recs = read_jsonl(shared / "minillm_eval" / name / "valid.jsonl")
        size = lambda r: len(r.get("instruction", "")) + len(r.get("input") or "")  # noqa: E731
        fit = [r for r in recs if not s["eval_chars"] or size(r) <= s["eval_chars"]]
        random.Random(0).shuffle(fit)
        if len(fit) < s["eval_items"]:  # sets of long prompts (S-NI): their shortest items
            fit = sorted(recs, key=size)
        write_jsonl(files[name], fit[: s["eval_items"]])
    write_jsonl(files["adapt_eval"], read_jsonl(files["dolly"])[: s["adapt_eval_items"]])
    return files


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------ base model
def build_base(root: Path, s: dict[str, Any], files: dict[str, Path], gguf_dir: Path) -> Path:
    """The converted DLM (``root/base``): SmolLM2-135M-Instruct, or a tiny random Llama at the smoke scale."""
    if "tiny" in s:
        texts = [r.get(f) or "" for r in read_jsonl(files["train"]) for f in DOLLY_FIELDS]
        return convert_tiny_llama(root / "base", texts, s["vocab"], s["tiny"])
    return convert_smollm2(root / "base", gguf_dir)


# ------------------------------------------------------------------------------------------ training
def config(out: Path, s: dict[str, Any], *, base: str, files: dict[str, Path], lr: float, seed: int,
           epochs: float | None = None, max_steps: int = -1, method: dict[str, Any] | None = None,
           eval_every: int = 0) -> dict[str, Any]:
    cfg = {
        "model": {"name_or_path": base, "gradient_checkpointing": s["gradient_checkpointing"]},
        "data": {"task": "instruct", "train_source": str(files["train"]), "max_length": s["max_length"],
                 "long_examples": "drop", "long_answers": "truncate", "seed": seed},
        "training": {"output_dir": str(out), "num_train_epochs": epochs or 1.0, "max_steps": max_steps,
                     "per_device_train_batch_size": s["batch"], "gradient_accumulation_steps": s["accumulation"],
                     "learning_rate": lr, "lr_scheduler_type": "cosine_with_min_lr", "min_lr_ratio": 0.1,
                     "warmup_ratio": 0.05, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95,
                     "max_grad_norm": 1.0, "seed": seed, "logging_steps": 5, "save_steps": 100,
                     "save_total_limit": 1, "mixed_precision": s["mixed_precision"], "eval_steps": eval_every,
                     "report_to": ["jsonl"], "progress_bar": False},
        "eval": {"enabled": False},
    }
    if eval_every:
        cfg["data"].update(eval_source=str(files["adapt_eval"]), eval_split="test")
        cfg["eval"] = {"enabled": True, "limit": s["adapt_eval_items"], "seed": 10, "generation": generation(s)}
    if method:
        cfg["method"] = method
    return cfg


def generation(s: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    return {"gen_length": s["gen_length"], "steps": steps or s["eval_steps"][-1], "temperature": 0.7,
            "cfg_scale": s["cfg_scale"], "batch_size": s["eval_batch"], "cache": s["cache"]}


def adapt(root: Path, s: dict[str, Any], files: dict[str, Path], base: Path) -> Path:
    """Step-0 ROUGE-L of the converted model, then masked-diffusion SFT with periodic ROUGE-L."""
    evaluate_once(base, "instruct", steps=[s["eval_steps"][-1]], seeds=[10], generation=generation(s),
                  source=str(files["adapt_eval"]), name="rouge_adapt_eval")
    if "adapt_max_steps" in s:
        cfg = config(root / "adapt", s, base=str(base), files=files, lr=s["adapt_lr"], seed=0,
                     max_steps=s["adapt_max_steps"], method={"cfg_prob": s["cfg_prob"]},
                     eval_every=s["adapt_eval_every"])
    else:
        cfg = config(root / "adapt", s, base=str(base), files=files, lr=s["adapt_lr"], seed=0,
                     epochs=s["adapt_epochs"], method={"cfg_prob": s["cfg_prob"]}, eval_every=s["adapt_eval_every"])
    return train_once("sft", cfg)


def adapt_curve(root: Path) -> list[tuple[int, float]]:
    """(optimizer step, ROUGE-L on the adaptation subset), step 0 being the converted model."""
    out = []
    step0 = root / "base" / "eval" / "rouge_adapt_eval" / "metrics.json"
    if step0.exists():
        out.append((0, _first_rouge(json.loads(step0.read_text()))))
    for rec in read_logs(root / "adapt"):
        for k, v in rec.items():
            if k.startswith("eval") and "rouge" in k and v is not None:
                out.append((int(rec["step"]), float(v)))
    return out


def _first_rouge(report: dict[str, Any]) -> float:
    res = next(iter(report["results"].values()))
    return mean_std([m["rouge_l"] for m in res["seeds"].values()])[0]


STUDENTS = {"sft": ("sft", 1), "sft_2x": ("sft", 2), "selffusion": ("selffusion", 1)}


def student_length(s: dict[str, Any], multiple: int) -> dict[str, Any]:
    """How long a student trains: ``student_steps`` x ``multiple`` optimizer steps where the scale sets
    them, else ``epochs`` x ``multiple`` epochs."""
    if "student_steps" in s:
        return {"max_steps": s["student_steps"] * multiple}
    return {"epochs": s["epochs"] * multiple}


def students(root: Path, s: dict[str, Any], files: dict[str, Path], on_result: Any) -> None:
    base = str(root / "adapt" / "final")
    for seed in s["seeds"]:
        for name, (method, mult) in STUDENTS.items():
            run = train_once(method, config(root / f"{name}_seed{seed}", s, base=base, files=files, lr=s["lr"],
                                            seed=seed, method={}, **student_length(s, mult)))
            for es in EVAL_SETS:
                evaluate_once(run, "instruct", steps=s["eval_steps"], seeds=s["eval_seeds"], generation=generation(s),
                              source=str(files[es]), name=f"rouge_{es}")
            on_result()


def collect(root: Path, s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for seed in s.get("seeds", []):
        for name in STUDENTS:
            reports = {es: root / f"{name}_seed{seed}" / "eval" / f"rouge_{es}" / "metrics.json" for es in EVAL_SETS}
            if all(p.exists() for p in reports.values()):
                out[f"{name}_seed{seed}"] = {es: json.loads(p.read_text()) for es, p in reports.items()}
    return out


def write_results(root: Path, scale: str, s: dict[str, Any]) -> str:
    curve = adapt_curve(root)
    evals = collect(root, s)
    parts = [f"# SelfFusion with a SmolLM2-135M DLM student (scale {scale})", "",
             "## Adaptation (masked-diffusion SFT of the converted model)", "",
             f"ROUGE-L on the first {s['adapt_eval_items']} Dolly evaluation items, {s['gen_length']} tokens, "
             f"{s['eval_steps'][-1]} steps, temperature 0.7, CFG scale {s['cfg_scale']}, seed 10.", "",
             markdown_table(["step", "ROUGE-L"], [[str(a), f"{b:.2f}"] for a, b in curve]), ""]
    if evals:
        parts += ["## SFT vs SelfFusion (Table 1)", "", rouge_tables(evals, s["eval_steps"], EVAL_SETS, f" (CFG scale {s['cfg_scale']})"), ""]
    text = "\n".join(parts) + "\n"
    (root / "results.md").write_text(text)
    (root / "results.json").write_text(json.dumps(
        {"scale": s, "adapt_curve": curve,
         "rouge": {r: {es: {st: rouge(rep, st) for st in s["eval_steps"]} for es, rep in v.items()}
                   for r, v in evals.items()}}, indent=2))
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(SCALES), default="gpu")
    ap.add_argument("--out", default=None, help="output folder (default runs/exp_selffusion_smollm2_<scale>)")
    ap.add_argument("--gguf-dir", default=str(GGUF_DIR), help=f"folder holding {GGUF_FILE}")
    ap.add_argument("--cache", choices=["none", "prefix", "dual"], default=None,
                    help="key/value caching for every evaluation (Fast-dLLM, approximate; default: the scale's)")
    ap.add_argument("--data-dir", default=str(SHARED), help="folder holding dolly/ and minillm_eval/ (default: "
                    "the shared data beside the checkout)")
    a = ap.parse_args(argv)
    setup_logging()
    shared = Path(a.data_dir)
    if not (shared / "dolly" / "train_minillm_decoded.jsonl").exists():
        sys.exit(f"the data folder {shared} lacks dolly/train_minillm_decoded.jsonl (the shared data: see its README)")
    s = SCALES[a.scale] if a.cache is None else {**SCALES[a.scale], "cache": a.cache}
    if s["threads"]:
        import torch

        torch.set_num_threads(s["threads"])
    root = Path(a.out or f"runs/exp_selffusion_smollm2_{a.scale}")
    root.mkdir(parents=True, exist_ok=True)
    files = stage("data", lambda: prepare_data(root, s, shared))
    base = stage("base", lambda: build_base(root, s, files, Path(a.gguf_dir)))
    stage("adapt", lambda: adapt(root, s, files, base))
    write_results(root, a.scale, s)
    if s["students"]:
        stage("students", lambda: students(root, s, files, lambda: write_results(root, a.scale, s)))
    print(write_results(root, a.scale, s))


if __name__ == "__main__":
    main()
