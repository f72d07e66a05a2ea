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

from ..config import save_yaml
from ..configs.methods import TrainEvalConfig, run_config_class  # noqa: F401 (re-exported)
from ..data import DiffusionCollator, load_examples, tokenize_examples
from ..evaluation import TaskEvaluator
from ..models.loading import ModelConfig, build_model, is_preset
from ..models.tokenizer import char_tokenizer, train_bpe_tokenizer
from ..tasks.base import Example

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


#: Tokenization counts (long examples dropped/truncated) per run folder, from ``prepare`` to
#: ``write_run_metadata``, which writes them to ``data_stats.json``.
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


def prepare(cfg: Any, *, model=None, tokenizer=None, need_targets: bool = True) -> Prepared:
    """Load data, build or load the tokenizer and model, tokenize, and set up the evaluator."""
    from transformers import set_seed

    from ..tasks.registry import get_task
    from ..training.trainer import check_output_dir

    check_output_dir(cfg.training)  # refuse (or clear) a previous run's folder before reading anything from it
    set_seed(cfg.training.seed)  # a new preset model's weights depend on training.seed only
    out = Path(cfg.training.output_dir)
    t0 = time.time()
    log.info("loading the training data (task %s, %s) ...", cfg.data.task, cfg.data.train_source or "its default source")
    train_examples = load_examples(cfg.data, "train")
    eval_examples: list[Example] = []
    if cfg.eval.enabled:
        data = dataclasses.replace(cfg.data, eval_limit=cfg.eval.limit)
        eval_examples = load_examples(data, "eval")
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
    stats: dict[str, Any] = {}
    t0 = time.time()
    log.info("tokenizing %d training examples ...", len(train_examples))
    items = tokenize_examples(train_examples, tokenizer, max_length=cfg.data.max_length,
                              prompt_format=cfg.data.prompt_format, require_target=need_targets,
                              max_prompt_length=cfg.data.max_prompt_length, long_examples=cfg.data.long_examples,
                              stats=stats)
    log.info("tokenized (%.1f s)", time.time() - t0)
    _DATA_STATS[str(out.resolve())] = stats  # written by write_run_metadata, once the run is under way
    collator = DiffusionCollator(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                 response_length=cfg.data.response_length,
                                 pad_response_with_eos=cfg.data.pad_response_with_eos)
    evaluator = None
    if eval_examples:
        task = get_task(cfg.data.task, **cfg.data.task_kwargs)
        evaluator = TaskEvaluator(task, eval_examples, cfg.eval.generation, prompt_format=cfg.data.prompt_format,
                                  seed=cfg.eval.seed)
    return Prepared(model, tokenizer, train_examples, items, eval_examples, collator, evaluator)


def write_run_metadata(cfg: Any, tokenizer, method: str, accelerator=None) -> None:
    """Save the resolved config and the tokenizer in the run folder (main process only)."""
    if accelerator is not None and not accelerator.is_main_process:
        return
    out = Path(cfg.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    (out / "run.json").write_text(json.dumps({"method": method}))
    stats = _DATA_STATS.pop(str(out.resolve()), None)
    if stats is not None:
        (out / "data_stats.json").write_text(json.dumps(stats, indent=2))
    if not (out / TOKENIZER_DIR / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))


def finish(trainer, metrics: dict[str, float]) -> dict[str, float]:
    """Write final metrics next to the run and return them."""
    if trainer.accelerator.is_main_process and metrics:
        (Path(trainer.config.output_dir) / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
