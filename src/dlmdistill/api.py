"""The Python API: the command line's ``train``, ``generate`` and ``evaluate`` for notebooks.

    import dlmdistill as dd
    dd.train("sft", "configs/sft_countdown_tiny.yaml", **{"training.max_steps": 200})
    texts = dd.generate("runs/sft_countdown", ["numbers: 3 5 7 target: 22\\n"], steps=32, gen_length=64)
    report = dd.evaluate("runs/sft_countdown", task="countdown", steps=[8, 16], seeds=[10])
    summary = dd.api.score_generations("runs/sft_countdown/eval/countdown", task="countdown")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, deep_merge, from_dict, leaf_paths, load_yaml, to_dict
from .errors import UserError


def _check_method(name: str) -> None:
    from .methods import METHODS

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def get_method(name: str):
    """``(run-config class, run function)`` of training method ``name``; an unknown name is a
    :class:`UserError` listing the valid ones."""
    from .methods import get_method as _get

    _check_method(name)
    return _get(name)


def get_config_class(name: str) -> type:
    """The run-configuration class of training method ``name``, without importing the recipe (no torch);
    an unknown name is a :class:`UserError` listing the valid ones."""
    from .methods import config_class

    _check_method(name)
    return config_class(name)


def check_run_config(cfg: Any) -> None:
    """The checks of a training run that need more than the configuration's values, once, before anything
    is written: the task and its options (the task is built), the trackers' packages, the checkpoint to
    resume from, and the output folder. (The values themselves were checked when the configuration was
    built, ``config.from_dict``.)"""
    from .tasks.registry import get_task
    from .training.run_folder import check_checkpoint_folder, check_trackers_installed

    if cfg.data.task is not None:
        get_task(cfg.data.task, **cfg.data.task_kwargs)
    t = cfg.training
    try:
        check_trackers_installed(t.report_to)
        if t.resume_from_checkpoint is not None:
            check_checkpoint_folder(t.resume_from_checkpoint)
    except ValueError as e:
        raise UserError(f"training.{e}") from None
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"training.output_dir {str(out)!r} is an existing file, not a folder; choose another path")


def _nest(flat: dict[str, Any], cls: type) -> dict[str, Any]:
    """``{"training.max_steps": 5, "learning_rate": 1e-4}`` -> nested mapping (leaf names must be unique)."""
    paths = leaf_paths(cls)
    by_leaf: dict[str, list[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, dict) and key in {f.name for f in dataclasses.fields(cls)}:
            out = deep_merge(out, {key: value})
            continue
        path = key if key in paths else (by_leaf.get(key, [None])[0] if len(by_leaf.get(key, [])) == 1 else None)
        if path is None:
            raise ConfigError(f"unknown or ambiguous option {key!r}")
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def make_config(method: str, config: str | Path | dict | Any | None = None, **overrides: Any) -> Any:
    """The run configuration of ``method`` from a YAML path, a mapping or a config object, plus overrides."""
    cls = get_config_class(method)
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, (str, Path)):
        data = load_yaml(config)
    elif isinstance(config, dict):
        data = config
    else:
        data = to_dict(config)
    where = str(config) if isinstance(config, (str, Path)) else "config"
    return from_dict(cls, deep_merge(data, _nest(overrides, cls)), where=where)


def train(method: str, config: str | Path | dict | Any | None = None, **overrides: Any) -> dict[str, float]:
    """Train with ``method`` (``sft``, ``selffusion``, ``kd``, ``dopsd``, ...); returns the final metrics."""
    _, run = get_method(method)
    cfg = make_config(method, config, **overrides)
    check_run_config(cfg)
    return run(cfg)


def _load(model: Any, device: str | None = None, **model_kwargs: Any):
    """``model`` as a (model, tokenizer) pair: a pair is returned as it is (it stays where its owner put
    it); a path or hub id is loaded onto ``device`` (default: cuda if available)."""
    from .evaluation import resolve_model_path
    from .models.loading import ModelConfig, build_model, resolve_device

    if isinstance(model, tuple):
        return model
    where = resolve_device(device)
    m, tok = build_model(ModelConfig(name_or_path=resolve_model_path(str(model)), **model_kwargs))
    return m.to(where), tok


def generate(model: Any, prompts: Sequence[str], *, seed: int = 0, prompt_format: str | None = None,
             device: str | None = None, **generation: Any) -> list[str]:
    """Completions for ``prompts``; ``model`` is a path/id (loaded onto ``device``, default cuda if
    available) or a ``(DiffusionModel, tokenizer)`` pair (used where it is). As ``dlmdistill generate``
    does, a run folder (or its ``final/``) starts from the run's own decoding (``eval.generation``) and
    prompt format, under what is given here."""
    from .data import format_prompt
    from .evaluation import check_prompt_fits, context_limit, run_eval_defaults
    from .sampling import GenerationConfig, generate_texts

    run = {} if isinstance(model, tuple) else run_eval_defaults(str(model))
    gen = from_dict(GenerationConfig, {**run.get("generation", {}), **generation}, where="generate")
    fmt = prompt_format or run.get("data", {}).get("prompt_format", "plain")
    m, tok = _load(model, device)
    texts = [format_prompt(tok, p, fmt) for p in prompts]
    for i, p in enumerate(texts):
        check_prompt_fits(len(tok(p, add_special_tokens=False).input_ids), gen.gen_length, context_limit(m),
                          f"prompt {i}")
    return generate_texts(m, tok, texts, gen, seed=seed)


def evaluate(model: Any, task: str | None = None, *, steps: Sequence[int] | None = None,
             seeds: Sequence[int] = (10, 20, 30), source: str | None = None, split: str | None = None,
             limit: int | None = None, output_dir: str | None = None, task_kwargs: dict | None = None,
             prompt_format: str | None = None, progress: bool = False, device: str | None = None,
             **generation: Any) -> dict[str, Any]:
    """Evaluate ``model`` at several step counts and seeds; returns the metrics report.

    As ``dlmdistill evaluate`` does: a run folder (or its ``final/``) starts from the run's own evaluation
    settings (its task and task options, prompt format, evaluation data, ``eval.generation`` and step
    count), under what is given here; another ``task`` drops the run's task options and data. ``model``
    may also be a model folder or hub id (then ``task`` is needed), or a ``(model, tokenizer)`` pair. A
    model given by path runs on ``device`` (default: cuda if available); a pair runs where it is."""
    from .configs import EvalRunConfig
    from .evaluation import for_task, run_evaluation, run_eval_defaults
    from .models.loading import resolve_device

    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1 (or None for every item), got {limit}")
    if source == "":
        raise UserError("source is an empty string; give a file, folder or dataset id, or None for the task's own")
    loaded = model if isinstance(model, tuple) else None
    where = None if loaded is not None else resolve_device(device)
    name = "" if loaded is not None else str(model)
    data = {k: v for k, v in (("task", task), ("task_kwargs", task_kwargs), ("eval_source", source),
                              ("eval_split", split), ("eval_limit", limit), ("prompt_format", prompt_format))
            if v is not None}
    given: dict[str, Any] = {"model": {"name_or_path": name}, "data": data, "seeds": list(seeds),
                             "progress_bar": progress, "output_dir": output_dir}
    if steps is not None:
        given["steps"] = list(steps)
    if generation:
        given["generation"] = generation
    from_run = for_task(run_eval_defaults(name), given) if name else {}
    cfg = from_dict(EvalRunConfig, EvalRunConfig.prepare(deep_merge(from_run, given)), where="evaluate")
    if cfg.data.task is None and loaded is not None:
        raise UserError("task: give the task to evaluate a model passed as (model, tokenizer)")
    return run_evaluation(cfg, loaded=loaded, device=where)[0]


def score_generations(path: str | Path, task: str, out: str | Path | None = None) -> dict[str, Any]:
    """Re-score saved generations (our ``generations.jsonl`` or d1's generation JSON) without a
    model, as ``dlmdistill score`` does; see :func:`dlmdistill.score.score_generations`."""
    from .score import score_generations as _score

    return _score(path, task, out)
