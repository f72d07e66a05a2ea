"""What every training recipe does before its own loop: data, tokenizer, model, evaluator, run folder.

A recipe's configuration is a tree with the sections ``model``, ``data``, ``training``, ``eval``
and ``method`` (its own ``*Config``); ``run_config_class`` builds that tree for a method so each
recipe declares only what is its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, save_yaml
from ..configs.methods import TrainEvalConfig, run_config_class  # noqa: F401 (re-exported)
from ..data import DiffusionCollator, holdout_split, load_examples, resolve_task, tokenize_examples
from ..evaluation import TaskEvaluator
from ..models.loading import ModelConfig, build_model, is_preset
from ..models.tokenizer import char_tokenizer, train_bpe_tokenizer
from ..tasks.base import Example

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


#: Data counts per run folder (long examples dropped/truncated, the held-out evaluation records), from
#: ``prepare`` to ``write_run_metadata``, which writes them to ``data_stats.json``.
_DATA_STATS: dict[str, dict[str, Any]] = {}


@dataclass
class Prepared:
    model: Any
    tokenizer: Any
    train_examples: list[Example]
    train_items: list[dict[str, Any]]
    eval_examples: list[Example]
    collator: DiffusionCollator
    evaluator: TaskEvaluator | None
    data_stats: dict[str, Any]  # what goes to data_stats.json


def build_tokenizer(model_cfg: ModelConfig, texts: list[str], output_dir: Path):
    """For a preset model: the run's saved tokenizer (on resume), or one built from ``texts``."""
    from transformers import AutoTokenizer

    saved = output_dir / TOKENIZER_DIR
    if (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(saved))
    spec = model_cfg.tokenizer or "char"
    if spec == "char":
        return char_tokenizer(texts)
    if spec.startswith("bpe:"):
        return train_bpe_tokenizer(texts, vocab_size=int(spec[4:]))
    return AutoTokenizer.from_pretrained(spec)


def example_texts(*groups: list[Example]) -> list[str]:
    out = []
    for g in groups:
        for ex in g:
            out.append(ex.prompt)
            if ex.target:
                out.append(ex.target)
            out.extend(r for r in ex.references if isinstance(r, str))
    return out


@dataclass
class RunData:
    """A run's training and evaluation examples, and how the evaluation examples were chosen."""

    train: list[Example]
    eval: list[Example]
    eval_info: dict[str, Any]


def load_run_data(cfg: Any) -> RunData:
    """The training and evaluation examples of a run. A task not given (``data.task`` null) is told from the
    training records and set in ``cfg.data.task``, so the run's ``config.yaml`` names it. The evaluation
    examples: none when ``eval.enabled`` is off or the task has no metric (with a notice); else
    ``data.eval_source`` or the task's own; else what ``eval.when_missing`` says (see :func:`missing_eval_data`)."""
    from ..tasks.registry import get_task

    cfg.data.task = resolve_task(cfg.data, "train")
    log.info("loading the training data (task %s, %s) ...", cfg.data.task,
             cfg.data.train_source or "its default source")
    train = load_examples(cfg.data, "train")
    if not cfg.eval.enabled:
        return RunData(train, [], {})
    task = get_task(cfg.data.task, **cfg.data.task_kwargs)
    if task.metric == "none":
        log.warning("no evaluation during training: the %s task has no metric (evaluate the model on a downstream "
                    "task; eval.enabled: false silences this notice)", task.name)
        return RunData(train, [], {})
    if cfg.data.eval_source is None and not task.has_default_eval_data:
        return missing_eval_data(cfg, task.name, train)
    return RunData(train, load_examples(dataclasses.replace(cfg.data, eval_limit=cfg.eval.limit), "eval"), {})


def missing_eval_data(cfg: Any, task: str, train: list[Example]) -> RunData:
    """No ``data.eval_source`` and no evaluation data of the task's own: ``eval.when_missing`` decides
    between a held-out slice of the training records (:func:`~dlmdistill.data.holdout_split`), no
    evaluation, and an error."""
    missing = f"data.eval_source is not set and the {task} task has no evaluation data of its own"
    policy = cfg.eval.when_missing
    if policy == "error":
        raise ConfigError(f"{missing}: give one (--data.eval_source FILE), or set --eval.when_missing to holdout "
                          f"(evaluate on a held-out slice of the training records) or skip, or --eval.enabled false")
    if policy == "skip":
        log.warning("no evaluation during training: %s (eval.when_missing=skip; give data.eval_source, or "
                    "eval.when_missing: holdout to evaluate on a held-out slice of the training records)", missing)
        return RunData(train, [], {"source": "none"})
    kept, held, info = holdout_split(train, cfg.eval.holdout_size, cfg.eval.limit, cfg.data.seed,
                                     name=str(cfg.data.train_source))
    copies = f" ({info['duplicates_removed']} copies of held-out records removed)" if info["duplicates_removed"] else ""
    log.info("evaluation: %s, so holding out %d of the %d training records (%d examples; eval.holdout_size=%g, "
             "data.seed=%d, never trained on) and training on the other %d examples%s (eval.when_missing=holdout; "
             "'skip' trains without evaluation)", missing, info["held_out_records"], info["records"], len(held),
             cfg.eval.holdout_size, cfg.data.seed, len(kept), copies)
    return RunData(kept, held, info)


def tokenize_for_training(cfg: Any, examples: list[Example], tokenizer, need_targets: bool = True
                          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``tokenize_examples`` with the run's ``data`` settings; returns the items and their counts."""
    stats: dict[str, Any] = {}
    items = tokenize_examples(examples, tokenizer, max_length=cfg.data.max_length,
                              prompt_format=cfg.data.prompt_format, require_target=need_targets,
                              max_prompt_length=cfg.data.max_prompt_length,
                              max_response_length=cfg.data.response_length, long_examples=cfg.data.long_examples,
                              long_answers=cfg.data.long_answers, stats=stats)
    return items, stats


def record_data_stats(cfg: Any, stats: dict[str, Any]) -> None:
    """Keep ``stats`` for the run's ``data_stats.json`` (written by :func:`write_run_metadata`)."""
    _DATA_STATS[str(Path(cfg.training.output_dir).resolve())] = stats


def prepare(cfg: Any, *, model=None, tokenizer=None, need_targets: bool = True, data: RunData | None = None
            ) -> Prepared:
    """Load data (unless ``data`` is given), build or load the tokenizer and model, tokenize, and set up the
    evaluator. ``need_targets=False`` (the on-policy methods, which train on prompts and their own samples, and
    seqkd, which trains on its teacher's answers): the training targets are not tokenized, so nothing is
    dropped or cut for them."""
    from transformers import set_seed

    from ..tasks.registry import get_task
    from ..training.run_folder import prepare_output_dir

    prepare_output_dir(cfg.training)  # refuse (or clear) a previous run's folder before reading anything from it
    set_seed(cfg.training.seed)  # a new preset model's weights depend on training.seed only
    out = Path(cfg.training.output_dir)
    t0 = time.time()
    data = data or load_run_data(cfg)
    train_examples, eval_examples = data.train, data.eval
    log.info("%d training and %d evaluation examples (%.1f s)", len(train_examples), len(eval_examples),
             time.time() - t0)
    if model is None:
        if is_preset(cfg.model) and tokenizer is None:
            log.info("building the tokenizer (%s) and the model (%s) ...", cfg.model.tokenizer or "char",
                     cfg.model.name_or_path)
            tokenizer = build_tokenizer(cfg.model, example_texts(train_examples, eval_examples), out)
        else:
            log.info("loading the model %s ...", cfg.model.name_or_path)
        model, tokenizer = build_model(cfg.model, tokenizer)
    items: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    if need_targets:
        t0 = time.time()
        log.info("tokenizing %d training examples ...", len(train_examples))
        items, stats = tokenize_for_training(cfg, train_examples, tokenizer)
        log.info("tokenized (%.1f s)", time.time() - t0)
    if data.eval_info:
        stats["evaluation"] = data.eval_info
    record_data_stats(cfg, stats)  # written by write_run_metadata, once the run is under way
    collator = DiffusionCollator(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                 response_length=cfg.data.response_length,
                                 pad_response_with_eos=cfg.data.pad_response_with_eos)
    evaluator = None
    if eval_examples:
        task = get_task(cfg.data.task, **cfg.data.task_kwargs)
        evaluator = TaskEvaluator(task, eval_examples, cfg.eval.generation, prompt_format=cfg.data.prompt_format,
                                  seed=cfg.eval.seed)
    return Prepared(model, tokenizer, train_examples, items, eval_examples, collator, evaluator, stats)


def write_run_metadata(cfg: Any, tokenizer, method: str, accelerator=None) -> None:
    """Save the resolved config and the tokenizer in the run folder (main process only)."""
    if accelerator is not None and not accelerator.is_main_process:
        return
    out = Path(cfg.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    (out / "run.json").write_text(json.dumps({"method": method}))
    stats = _DATA_STATS.pop(str(out.resolve()), None)
    if stats:
        (out / "data_stats.json").write_text(json.dumps(stats, indent=2))
    if not (out / TOKENIZER_DIR / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))


def finish(trainer, metrics: dict[str, float]) -> dict[str, float]:
    """Write final metrics next to the run and return them."""
    if trainer.accelerator.is_main_process and metrics:
        (Path(trainer.config.output_dir) / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
