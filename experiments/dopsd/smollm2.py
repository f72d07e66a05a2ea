"""d-OPSD with a pretrained student: SmolLM2-135M-Instruct adapted to a masked-diffusion LM, taught Countdown
with reasoning traces, then post-trained with d-OPSD against continued SFT.

    python experiments/dopsd/smollm2.py --scale gpu-8min   # every stage on one GPU in bf16 (a plumbing check)
    python experiments/dopsd/smollm2.py --scale cpu        # the CPU go/no-go: the base and the gate only
    python experiments/dopsd/smollm2.py --scale smoke --out /tmp/x   # a tiny random model (test suite)

Stages, each skipped when its output exists (rerun the same command to continue):

1. ``convert``: ``convert_ar`` of SmolLM2-135M-Instruct (the GGUF, de-quantised) into a bidirectional DLM
   with Dream-style shifted logits; the smoke scale converts a tiny random Llama instead.
2. ``base``: masked-diffusion SFT of the whole converted model on generated Countdown puzzles in the trace
   layout (``<reasoning>12+11=23, 23+41=64</reasoning><answer>(12+11)+41</answer>``: 34-44 SmolLM2 tokens,
   the first step of the solution in block 0, the final expression in block 2), evaluated on held-out
   puzzles decoding 48 tokens in 3 blocks of 16, two tokens per step, greedy (every evaluation here).
3. ``gate``: the paper's toy verification on the base, as ``run.py``'s gate stage (the official toy's
   choices; go/no-go: the self-teacher at rho 0.25 beats the student's greedy answer by 5 points).
4. ``compare`` (not at the ``cpu`` scale): from the base, with one LoRA adapter scaled from the official
   recipe's (r 128 of LLaDA-8B's width 4,096 is r 16 of SmolLM2's 576; alpha / r 0.5; the official
   targets, which in Llama's names are all seven projections), for the same number of optimizer steps:
   d-OPSD with the official recipe, the same with per-position clipping, and continued SFT. The 8-minute
   scale runs it whatever the gate says (its numbers check the plumbing and carry no claim); a scale with
   ``require_gate`` runs it only where the gate passed.

Results: ``OUT/results.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import (GGUF_DIR, GGUF_FILE, convert_smollm2, convert_tiny_llama, eval_curve,  # noqa: E402
                    evaluate_once, fmt, markdown_table, read_logs, setup_logging, stage, stopped, train_once)

_spec = importlib.util.spec_from_file_location("dopsd_run", HERE / "run.py")
dopsd_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dopsd_run)

TASK = "countdown"
LAYOUT = "trace"

#: ``base_*``: the Countdown SFT of the converted model (full fine-tuning); ``post_*``: each row of the
#: comparison; ``eval_items`` held-out puzzles (test_seed 1234) for every accuracy; ``gate_items`` training
#: prompts for the toy. Decoding: 48 tokens, blocks of 16, 24 steps (two tokens per step), greedy.
SCALES: dict[str, dict[str, Any]] = {
    # one GPU, bf16 autocast, estimated at about 5 minutes (docs/benchmarks.md): 300 SFT steps of 64 puzzles,
    # the gate on 100 prompts, 32 optimizer steps per row (d-OPSD: 8 rollout batches of 4 prompts)
    "gpu-8min": dict(base_steps=300, base_batch=64, base_lr=1e-4, base_eval_every=100, train_examples=50000,
                     eval_items=200, gate_items=100, post_steps=32, post_eval_every=16, post_lr=1e-4,
                     dopsd_batch=4, sft_batch=64, mixed_precision="bf16", threads=None, require_gate=False,
                     compare=True, eval_batch=200),
    # the CPU go/no-go (2 cores, fp32): does the pretrained model learn the trace layout, and does the
    # premise hold for it (the gate)? No post-training: d-OPSD's rollouts of a 135M model take hours here
    # (measured with nothing else running: an SFT step of 16 puzzles 4.3 s, decoding 100 puzzles 3.2 minutes).
    "cpu": dict(base_steps=400, base_batch=16, base_lr=1e-4, base_eval_every=200, train_examples=50000,
                eval_items=100, gate_items=100, mixed_precision="no", threads=2, require_gate=True,
                compare=False, eval_batch=100),
    "smoke": dict(base_steps=4, base_batch=8, base_lr=1e-3, base_eval_every=2, train_examples=200,
                  eval_items=4, gate_items=4, post_steps=4, post_eval_every=4, post_lr=1e-3, dopsd_batch=2,
                  sft_batch=8, mixed_precision="no", threads=None, require_gate=False, compare=True, eval_batch=8,
                  accept=0.0, tiny={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2}, vocab=300),
}
#: decoding of every evaluation, the gate and the rollouts (the rollouts at temperature 0.9)
DECODING: dict[str, int] = {"gen_length": 48, "block_length": 16, "steps": 24}
#: the official LoRA (r 128, alpha 64 on LLaDA-8B's 4,096) scaled to SmolLM2's width 576
LORA: dict[str, Any] = {"lora_r": 16, "lora_alpha": 8.0, "lora_dropout": 0.05,
                        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]}
#: label -> (method, run name, method overrides)
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "d-OPSD (official recipe)": ("dopsd", "dopsd", {}),
    "d-OPSD (official recipe, per-position clipping)": ("dopsd", "dopsd_perpos", {"clip_mode": "per_position"}),
    "continued SFT": ("sft", "sft", {}),
}


def settings(scale: str) -> dict[str, Any]:
    """The scale's settings plus what ``run.py``'s gate reads (decoding, layout, acceptance)."""
    return {"accept": None, **SCALES[scale], **DECODING, "layout": LAYOUT, "scale": scale}


def task_kwargs() -> dict[str, Any]:
    return dopsd_run.task_kwargs(TASK, LAYOUT)


def generation(s: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**DECODING, "batch_size": s["eval_batch"], **extra}


# ------------------------------------------------------------------------------------------ stages
def convert(root: Path, s: dict[str, Any], gguf_dir: Path) -> Path:
    """``root/converted``: SmolLM2 as a DLM, or (smoke) a tiny random Llama with a BPE trained on puzzles."""
    if "tiny" in s:
        from dlmdistill.tasks.registry import get_task

        examples = get_task(TASK, **task_kwargs()).load(None, split="train", limit=s["train_examples"], seed=0)
        return convert_tiny_llama(root / "converted", [e.prompt + e.target for e in examples], s["vocab"], s["tiny"])
    return convert_smollm2(root / "converted", gguf_dir)


def train_config(out: Path, s: dict[str, Any], *, model: str, steps: int, batch: int, lr: float, seed: int,
                 eval_every: int) -> dict[str, Any]:
    """What every run here shares: the Countdown trace data, held-out evaluations, the scale's precision."""
    return {
        "model": {"name_or_path": model},
        "data": {"task": TASK, "task_kwargs": task_kwargs(), "train_limit": s["train_examples"], "max_length": 72,
                 "response_length": DECODING["gen_length"], "seed": seed},
        "training": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": batch,
                     "learning_rate": lr, "seed": seed, "save_steps": 100, "save_total_limit": 1,
                     "logging_steps": 1, "report_to": ["jsonl"], "eval_steps": eval_every, "progress_bar": False,
                     "mixed_precision": s["mixed_precision"]},
        "eval": {"enabled": True, "limit": s["eval_items"], "seed": 0, "generation": generation(s)},
    }


def base(root: Path, s: dict[str, Any], converted: Path) -> Path:
    """Masked-diffusion SFT of the whole converted model on Countdown with traces."""
    cfg = train_config(root / "base", s, model=str(converted), steps=s["base_steps"], batch=s["base_batch"],
                       lr=s["base_lr"], seed=0, eval_every=s["base_eval_every"])
    cfg["training"].update(lr_scheduler_type="cosine_with_min_lr", min_lr_ratio=0.1, warmup_ratio=0.05,
                           weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
                           logging_steps=max(s["base_steps"] // 40, 1))
    return train_once("sft", cfg)


def row_config(method: str, root: Path, name: str, s: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison from ``root/base/final``, with the scaled official LoRA."""
    from dlmdistill.configs.methods.dopsd import OFFICIAL_DOPSD, OFFICIAL_DOPSD_TRAINING

    per_step = OFFICIAL_DOPSD["batch_divide"] if method == "dopsd" else 1  # optimizer steps per training step
    cfg = train_config(root / name, s, model=str(root / "base" / "final"), steps=s["post_steps"] // per_step,
                       batch=s["dopsd_batch"] if method == "dopsd" else s["sft_batch"], lr=s["post_lr"], seed=0,
                       eval_every=max(s["post_eval_every"] // per_step, 1))
    cfg["model"].update(LORA)
    cfg["training"].update({**OFFICIAL_DOPSD_TRAINING, "learning_rate": s["post_lr"]})
    if method == "dopsd":
        cfg["method"] = {**OFFICIAL_DOPSD, "rollout": generation(s, temperature=0.9, batch_size=64),
                         "micro_batch_size": 64, "max_consecutive_skips": 0, **overrides}
        if s["accept"] is not None:
            cfg["method"]["accept_threshold"] = s["accept"]
    return cfg


def compare(root: Path, s: dict[str, Any], ignore_gate: bool) -> dict[str, Path]:
    passed = dopsd_run.gate_passed(root)
    if s["require_gate"] and not passed and not ignore_gate:
        return {}
    runs = {}
    for label, (method, name, over) in ROWS.items():
        runs[label] = train_once(method, row_config(method, root, name, s, over))
    return runs


# ------------------------------------------------------------------------------------------ report
def curve(run: Path) -> tuple[list[float], list[float]]:
    """Accuracy against optimizer steps (d-OPSD logs ``optimizer_steps``; SFT's steps are optimizer steps)."""
    xs, ys = eval_curve(run, "eval/accuracy", x_key="optimizer_steps")
    if not xs or all(x == 0 for x in xs):
        xs, ys = eval_curve(run, "eval/accuracy")
    return xs, ys


def seconds(run: Path) -> float | None:
    path = run / "wall_seconds.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def report(root: Path, scale: str, s: dict[str, Any], base_acc: float | None, gate_text: str | None,
           runs: dict[str, Path]) -> tuple[str, dict[str, Any]]:
    xs, ys = eval_curve(root / "base", "eval/accuracy")
    parts = [f"# d-OPSD with a SmolLM2-135M DLM student on Countdown with traces (scale {scale})", "",
             f"## Base: masked-diffusion SFT of the converted model ({s['base_steps']} steps, batch "
             f"{s['base_batch']}, {s['base_lr']:g} cosine)", "",
             f"Accuracy (%) on {s['eval_items']} held-out puzzles, {DECODING['gen_length']} tokens in blocks of "
             f"{DECODING['block_length']}, {DECODING['steps']} steps, greedy; wall {seconds(root / 'base') or 0:.0f} s.",
             "", markdown_table(["SFT step", *(f"{x:.0f}" for x in xs)], [["accuracy (%)", *(f"{y:.1f}" for y in ys)]])]
    out: dict[str, Any] = {"scale": s, "base_curve": [xs, ys], "base_accuracy": base_acc,
                           "base_seconds": seconds(root / "base")}
    if gate_text is not None:
        parts += ["", "## Toy verification as a gate (the official toy's choices)", "", gate_text]
        out["gate_passed"] = dopsd_run.gate_passed(root)
    if s["compare"] and not runs:
        parts += ["", "The comparison did not run: this scale requires the gate to pass (`--ignore-gate` runs it anyway, "
                  "not as a result)."]
    if runs:
        rows, out["rows"] = [], {}
        for label, run in runs.items():
            rx, ry = curve(run)
            logs = read_logs(run)
            clip = [r["clip_ratio"] for r in logs if "clip_ratio" in r]
            res = {"steps": rx, "accuracy": ry, "seconds": seconds(run), "stopped": stopped(run),
                   "clip_ratio": sum(clip) / len(clip) if clip else None}
            out["rows"][label] = res
            rows.append([label, " / ".join(f"{y:.1f}" for y in ry) or "-", fmt(ry[-1:]) if ry else "-",
                         f"{res['seconds']:.0f}" if res["seconds"] is not None else "-",
                         "-" if res["clip_ratio"] is None else f"{res['clip_ratio']:.4f}"])
        steps = " / ".join(f"{x:.0f}" for x in curve(next(iter(runs.values())))[0])
        parts += ["", f"## From the base ({base_acc:.1f}%): LoRA r {LORA['lora_r']}, lr {s['post_lr']:g}, "
                  f"{s['post_steps']} optimizer steps", "",
                  markdown_table(["row", f"accuracy (%) at optimizer steps {steps}", "final (%)", "wall (s)",
                                  "mean clip ratio"], rows)]
    text = "\n".join(parts) + "\n"
    return text, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(SCALES), default="gpu-8min")
    ap.add_argument("--out", default=None, help="output folder (default runs/exp_dopsd_smollm2_<scale>)")
    ap.add_argument("--gguf-dir", default=str(GGUF_DIR), help=f"folder holding {GGUF_FILE}")
    ap.add_argument("--ignore-gate", action="store_true",
                    help="run the comparison where the scale requires the gate and it did not pass (not a result)")
    a = ap.parse_args(argv)
    setup_logging()
    s = settings(a.scale)
    if s["threads"]:
        import torch

        torch.set_num_threads(s["threads"])
    root = Path(a.out or f"runs/exp_dopsd_smollm2_{a.scale}")
    root.mkdir(parents=True, exist_ok=True)
    converted = stage("convert", lambda: convert(root, s, Path(a.gguf_dir)))
    stage("base", lambda: base(root, s, converted))
    rep = evaluate_once(root / "base", TASK, steps=[DECODING["steps"]], seeds=[0], generation=generation(s),
                        limit=s["eval_items"], task_kwargs=task_kwargs(), name="held_out")
    base_acc = rep["results"][str(DECODING["steps"])]["seeds"]["0"]["accuracy"]
    gate_text, _ = stage("gate", lambda: dopsd_run.gate(root, s, TASK, root / "base" / "final"))
    runs = stage("compare", lambda: compare(root, s, a.ignore_gate)) if s["compare"] else {}
    text, results = report(root, a.scale, s, base_acc, gate_text, runs)
    (root / "results.md").write_text(text)
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
