"""Evaluation harness: generate with several step counts and seeds, score with the task's metric.

``evaluate_model`` writes every generation to ``generations.jsonl`` (prompt, completion, score,
references, task details) and the metrics to ``metrics.json``; ``format_table`` renders the
mean (and spread over seeds) per step count. ``TaskEvaluator`` is the same thing at a single
setting, used during training (``eval_steps``); under multi-process training it shards the items
over ranks and gathers the scores.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import load_yaml
from .configs.commands import EvalRunConfig
from .data import encode_prompt
from .errors import UserError
from .models.autoregressive import CausalLM
from .models.backbone import DiffusionModel, context_limit  # noqa: F401 (re-exported)
from .models.loading import check_model_source
from .sampling import GenerationConfig, decode_responses, generate_batches
from .tasks.base import Example, Task

log = logging.getLogger(__name__)


def resolve_model_path(path: str) -> str:
    """A run folder resolves to its exported ``final/`` model. A local path that cannot hold a model
    (missing, a file, a folder without ``config.json``) is a ``UserError`` naming it."""
    if path.startswith("preset:"):
        return path
    p = Path(path)
    if (p / "final" / "config.json").exists() or (p / "final" / "adapter_config.json").exists():
        return str(p / "final")
    check_model_source(path)
    return path


def score_completions(task: Task, examples: Sequence[Example], completions: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for ex, c in zip(examples, completions):
        s = float(task.score(ex, c))
        rows.append({"score": s, "correct": task.is_correct(s) if task.metric == "accuracy" else None,
                     **task.details(ex, c)})
    return rows


def generate_all(model: DiffusionModel | CausalLM, tokenizer, prompts: list[list[int]], gen: GenerationConfig,
                 seed: int, progress: bool, desc: str, forward: torch.nn.Module | None = None) -> list[str]:
    """Completions for token-id prompts, in batches of similar length, reproducible for ``seed``.

    The global RNG (used by AR sampling) is seeded inside a fork, so evaluating during training does
    not reset the training run's random stream.
    """
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        g = torch.Generator(device=model.device).manual_seed(seed)
        texts: dict[int, str] = {}
        # sorted by prompt length so that batches waste little padding; the order is restored below
        for idx, responses, _ in generate_batches(model, prompts, gen, generator=g, order="shortest_first",
                                                  forward=forward, progress=progress, desc=desc):
            texts.update(zip(idx, decode_responses(tokenizer, responses)))
    return [texts[i] for i in range(len(prompts))]


def check_prompt_fits(n_prompt: int, gen_length: int, limit: int | None, where: str) -> None:
    """A prompt of ``n_prompt`` tokens plus ``gen_length`` generated ones must fit the model's ``limit``
    positions; otherwise a ``UserError`` naming ``where`` (shared by evaluate, generate and the API)."""
    if limit is not None and n_prompt + gen_length > limit:
        raise UserError(f"{where}: prompt of {n_prompt} tokens + gen_length {gen_length} = {n_prompt + gen_length} "
                        f"exceeds the model's {limit} positions; shorten the prompt or lower gen_length")


def encode_prompts(tokenizer, examples: Sequence[Example], fmt: str, gen: GenerationConfig, limit: int | None
                   ) -> list[list[int]]:
    ids = []
    for i, ex in enumerate(examples):
        x = encode_prompt(tokenizer, ex, fmt)  # an Example: chat messages go through the chat template
        check_prompt_fits(len(x), gen.gen_length, limit, ex.source or f"example {i}")
        ids.append(x)
    return ids


def evaluate_model(model: DiffusionModel | CausalLM, tokenizer, task: Task, examples: Sequence[Example],
                   gen: GenerationConfig, steps: Sequence[int], seeds: Sequence[int], *,
                   output_dir: str | Path | None = None, prompt_format: str = "plain", progress: bool = True,
                   model_name: str = "") -> dict[str, Any]:
    """Evaluate at every (steps, seed); returns and (optionally) writes the metrics. A ``CausalLM`` is
    sampled left to right (``gen.gen_length`` new tokens at ``gen.temperature``) under the step key "ar".

    Greedy low-confidence decoding (``temperature: 0``, ``remasking: low_confidence``) draws no random
    numbers, so every seed would give the same completions: it is run once, with the first seed, and
    that result (metrics, timing and generations) is reported under every seed, the report saying so
    in ``"greedy_ran_once": true``; the spread over seeds is then 0 by construction."""
    if not examples:
        raise UserError("no evaluation examples")
    if not steps or not seeds:
        raise UserError(f"give at least one step count and one seed (steps {list(steps)}, seeds {list(seeds)})")
    if output_dir == "":
        raise UserError("output_dir is an empty string; give a folder, or None to write nothing")
    limit = context_limit(model)
    prompts = encode_prompts(tokenizer, examples, prompt_format, gen, limit)
    results: dict[str, dict[str, Any]] = {}
    out_dir = Path(output_dir) if output_dir is not None else None
    gen_file = None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        gen_file = open(out_dir / "generations.jsonl", "w")
    once = gen.temperature == 0 and gen.remasking == "low_confidence" and len(seeds) > 1 \
        and not isinstance(model, CausalLM)
    if once:
        log.info("greedy low-confidence decoding draws no random numbers: generating once (seed %s) and "
                 "reporting that result for every seed (%s)", seeds[0], ", ".join(map(str, seeds)))
    if isinstance(model, CausalLM):
        steps = ["ar"]  # an autoregressive model has no denoising steps: one row per seed
    try:
        for s in steps:
            cfg = gen
            if s != "ar":
                cfg = replace(gen, steps=s)
                cfg.validate()
            per_seed = {}
            for j, seed in enumerate(seeds):
                if once and j > 0:  # the first seed's result, copied (see the docstring)
                    per_seed[str(seed)] = dict(metrics)
                else:
                    t0 = time.time()
                    desc = f"steps={s} " + (f"seed={seed}" if not once else f"seeds={','.join(map(str, seeds))} (greedy)")
                    completions = generate_all(model, tokenizer, prompts, cfg, seed, progress, desc)
                    elapsed = time.time() - t0
                    rows = score_completions(task, examples, completions)
                    metrics = task.aggregate([r["score"] for r in rows], rows, examples)
                    metrics["seconds_per_sample"] = elapsed / len(examples)
                    per_seed[str(seed)] = metrics
                if gen_file:
                    for i, (ex, c, r) in enumerate(zip(examples, completions, rows)):
                        gen_file.write(json.dumps({"steps": s, "seed": seed, "index": i, "prompt": ex.prompt,
                                                   "completion": c, "references": ex.references, "meta": ex.meta,
                                                   **r}) + "\n")
            results[str(s)] = {"seeds": per_seed, "summary": summarize(per_seed)}
    finally:
        if gen_file:
            gen_file.close()
    report = {"task": task.name, "metric": task.metric, "model": model_name, "n": len(examples),
              "generation": {k: v for k, v in gen.__dict__.items() if k != "steps"}, "results": results}
    if once:
        report["greedy_ran_once"] = True
    if out_dir:
        (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def summarize(per_seed: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of every metric over seeds."""
    keys = next(iter(per_seed.values())).keys()
    out = {}
    for k in keys:
        vals = [m[k] for m in per_seed.values()]
        out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def primary_metric(report: dict[str, Any]) -> str:
    return "accuracy" if report["metric"] == "accuracy" else report["metric"]


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table: one row per step count, mean +- std over seeds of the task's metric."""
    key = primary_metric(report)
    lines = [f"{report['task']} ({report['n']} items, {report.get('model') or 'model'})", "",
             f"| steps | {key} (mean ± std over {len(next(iter(report['results'].values()))['seeds'])} seeds) | s/sample |",
             "|---:|---:|---:|"]
    for s, r in report["results"].items():
        m = r["summary"][key]
        lines.append(f"| {s} | {m['mean']:.2f} ± {m['std']:.2f} | {r['summary']['seconds_per_sample']['mean']:.4f} |")
    return "\n".join(lines)


class TaskEvaluator:
    """Evaluation during training at one generation setting; shards items across processes."""

    def __init__(self, task: Task, examples: Sequence[Example], gen: GenerationConfig, *, prompt_format: str = "plain",
                 seed: int = 0):
        self.task, self.examples, self.gen, self.fmt, self.seed = task, list(examples), gen, prompt_format, seed

    def __call__(self, trainer) -> dict[str, float]:
        acc = trainer.accelerator
        model = trainer.unwrapped
        n = len(self.examples)
        world, rank = acc.num_processes, acc.process_index
        per = math.ceil(n / world)
        idx = [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]  # pad so every rank does equal work
        exs = [self.examples[i] for i in idx]
        prompts = encode_prompts(trainer.tokenizer, exs, self.fmt, self.gen, None)
        completions = generate_all(model, trainer.tokenizer, prompts, self.gen, self.seed + rank, False, "eval",
                                   forward=trainer.sampling_forward)
        scores = torch.tensor([float(self.task.score(e, c)) for e, c in zip(exs, completions)], device=acc.device)
        ids = torch.tensor(idx, device=acc.device)
        scores, ids = acc.gather(scores), acc.gather(ids)
        seen: dict[int, float] = {}
        for i, s in zip(ids.tolist(), scores.tolist()):
            seen.setdefault(i, s)
        return self.task.aggregate([seen[i] for i in range(n)], examples=self.examples)


# ------------------------------------------------------------------------------------ a run's own settings
def run_folder_of(model: str) -> Path | None:
    """The run folder of ``model`` when it is a run folder (it has ``final/``) or its ``final/``; else None."""
    p = Path(model)
    return p if (p / "final").is_dir() else p.parent if p.name == "final" else None


def run_config_name(model: str) -> str:
    """How messages name the ``config.yaml`` of the run of ``model`` ('' when it is not a run)."""
    run = run_folder_of(model)
    return f"the run's config.yaml, {run / 'config.yaml'}" if run is not None else ""


def run_eval_defaults(model: str) -> dict[str, Any]:
    """The evaluation settings a training run used (its ``config.yaml``: ``data.task``, ``task_kwargs``,
    ``prompt_format``, the evaluation source and split, ``eval.generation``, its step count), when
    ``model`` is a run folder or its ``final/``; else {}. A model trained on 24-token answers is then
    evaluated on 24 tokens, and a run trained on d1-style prompts sees d1-style prompts. The command line
    and the Python API both start from these."""
    run = run_folder_of(model)
    if run is None or not (run / "config.yaml").is_file():
        return {}
    saved = load_yaml(run / "config.yaml")
    data, ev = saved.get("data") or {}, saved.get("eval") or {}
    gen = dict(ev.get("generation") or {})
    out: dict[str, Any] = {"data": {k: data[k] for k in ("task", "task_kwargs", "prompt_format", "eval_source",
                                                         "eval_split") if data.get(k) is not None}}
    if gen:
        out["generation"] = gen
        if gen.get("steps") is not None:
            out["steps"] = [gen["steps"]]
    return out


def for_task(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A run's ``defaults`` for what is ``given``: its task options and evaluation data only count for its own
    task."""
    task = (given.get("data") or {}).get("task")
    data = defaults.get("data") or {}
    if defaults and task is not None and task != data.get("task"):
        return {**defaults, "data": {k: v for k, v in data.items()
                                     if k not in ("task_kwargs", "eval_source", "eval_split")}}
    return defaults


def run_evaluation(cfg: EvalRunConfig, *, device: torch.device | str | None = None,
                   loaded: tuple[Any, Any] | None = None) -> tuple[dict[str, Any], str]:
    """``dlmdistill evaluate`` and ``dd.evaluate`` once their configuration is built: the model (``loaded``,
    or ``cfg.model``; a causal checkpoint is evaluated as an AR model), the task, its evaluation examples
    and ``evaluate_model``. Returns the report and the output folder (``cfg.output_dir``, else
    ``<run>/eval/<task>`` for a run folder, else ``eval/<task>``)."""
    from .data import load_examples, resolve_task
    from .models.autoregressive import load_for_inference
    from .tasks.registry import get_task

    cfg.data.task = resolve_task(cfg.data, "eval")
    run_dir = Path(cfg.model.name_or_path)
    name = "" if loaded is not None else str(run_dir)
    if loaded is None:
        cfg.model.name_or_path = resolve_model_path(cfg.model.name_or_path)
        loaded = load_for_inference(cfg.model)
    model, tok = loaded
    if device is not None:
        model.to(device)
    task = get_task(cfg.data.task, **cfg.data.task_kwargs)
    examples = load_examples(cfg.data, "eval")
    out_dir = cfg.output_dir if cfg.output_dir is not None else (
        str(run_dir / "eval" / task.name) if (run_dir / "final").exists() else str(Path("eval") / task.name))
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"output_dir {out_dir!r} is an existing file, not a folder; choose another path")
    report = evaluate_model(model, tok, task, examples, cfg.generation, cfg.steps, cfg.seeds, output_dir=out_dir,
                            prompt_format=cfg.data.prompt_format, progress=cfg.progress_bar,
                            model_name=name)
    return report, out_dir
