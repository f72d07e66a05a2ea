"""Sequence-level KD (Kim & Rush 2016): masked-diffusion SFT on teacher-generated responses.

1. The teacher answers every training prompt: a DLM teacher with the diffusion sampler (the
   paper uses 64 steps for its DLM teacher: ``method.generation.steps``), an AR teacher by
   left-to-right sampling (transformers ``generate``; greedy at temperature 0). The responses are
   appended, batch by batch, to ``<output_dir>/seqkd_data.jsonl`` (``index``, ``prompt``,
   ``response``); a run that finds the file reuses it and generates only what is missing, so an
   interrupted run resumes without regenerating. ``seqkd_data.json`` beside it records what
   generated the answers (teacher, its type and dtype, sampler settings, seed, prompt format, chunk
   size); a run with other settings is refused rather than trained on another teacher's answers, and
   ``--overwrite_output_dir`` deletes both files.
2. The student is trained with the ``sft`` recipe on (prompt, teacher response) pairs.

Generation runs on the main process (the others wait), before training starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from ..configs.methods import SeqKDConfig, SeqKDRunConfig  # noqa: F401 (re-exported)
from ..data import DataError, encode_prompt
from ..evaluation import generate_all
from ..flops import ModelShape, PassCounter
from ..models.autoregressive import CausalLM
from ..models.backbone import DiffusionModel
from ..sampling import GenerationConfig
from .common import finish, prepare, record_data_stats, tokenize_for_training, write_run_metadata
from .distillation import load_teacher, write_costs
from .sft import SFTTrainer

log = logging.getLogger(__name__)

DATA_FILE = "seqkd_data.jsonl"
#: what generated DATA_FILE (written beside it)
SOURCE_FILE = "seqkd_data.json"


def read_responses(path: Path, prompts: Sequence[str]) -> list[str]:
    """The responses already in ``path`` for the first prompts of ``prompts`` (a torn last line is
    dropped). Raises if the file was generated for other prompts."""
    out: list[str] = []
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # an interrupted append; regenerated from here
        if n >= len(prompts) or rec.get("index") != n or rec.get("prompt") != prompts[n]:
            raise DataError(f"{path}:{n + 1}: generated for a different prompt list; delete the file or use "
                            f"another training.output_dir")
        out.append(rec["response"])
    return out


def check_source(path: Path, source: dict[str, Any]) -> None:
    """Record ``source`` (what generates the answers in ``path``) beside ``path``, or, if answers are
    already there, check that they came from the same source. Raises :class:`DataError` naming the
    settings that differ, or when answers exist without a record of their source."""
    meta = path.with_suffix(".json")
    source = json.loads(json.dumps(source))  # as it reads back (tuples -> lists, ...)
    if path.exists() and path.stat().st_size > 0:
        fix = f"delete {path.name} and {meta.name} to regenerate them, or use another training.output_dir"
        if not meta.exists():
            raise DataError(f"{path}: teacher answers without a record of the teacher that wrote them ({meta.name}); "
                            f"{fix}")
        try:
            old = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta}: not valid JSON ({e.msg}); {fix}") from None
        differ = sorted(k for k in set(old) | set(source) if old.get(k) != source.get(k))
        if differ:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {source.get(k)!r} now" for k in differ)
            raise DataError(f"{path} holds answers generated with other settings ({shown}); {fix}")
        return
    meta.write_text(json.dumps(source, indent=2) + "\n")


def generate_teacher_responses(teacher: DiffusionModel | CausalLM, tokenizer, prompts: Sequence[str],
                               gen: GenerationConfig, path: Path, *, prompt_format: str = "plain", seed: int = 0,
                               chunk_size: int = 256, source: dict[str, Any] | None = None) -> list[str]:
    """The teacher's response to every prompt, generated in chunks of ``chunk_size`` prompts (chunk c
    sampled with seed ``seed + c``) and appended to the JSONL ``path``; complete chunks already in the
    file are reused, so an interrupted run gives the same file as an uninterrupted one. ``source``
    names the teacher (e.g. ``{"teacher": path}``); with the sampler settings, seed, prompt format and
    chunk size it is recorded beside ``path`` and checked before answers are reused (:func:`check_source`)."""
    check_source(path, {**(source or {}), "generation": dataclasses.asdict(gen), "seed": seed,
                        "prompt_format": prompt_format, "chunk_size": chunk_size})
    done = read_responses(path, prompts)
    if len(done) < len(prompts):
        done = done[: len(done) // chunk_size * chunk_size]  # a partly written chunk is redone whole
        log.info("seqkd: generating %d teacher responses into %s (%d reused)", len(prompts) - len(done), path,
                 len(done))
    with open(path, "w") as f:  # keep the reusable prefix only
        f.writelines(_record(i, prompts[i], r) for i, r in enumerate(done))
    for start in range(len(done), len(prompts), chunk_size):
        ids = [encode_prompt(tokenizer, p, prompt_format) for p in prompts[start:start + chunk_size]]
        texts = generate_all(teacher, tokenizer, ids, gen, seed + start // chunk_size, False, "teacher")
        with open(path, "a") as f:
            f.writelines(_record(i, prompts[i], t) for i, t in enumerate(texts, start=start))
        done.extend(texts)
    return done


def _record(index: int, prompt: str, response: str) -> str:
    return json.dumps({"index": index, "prompt": prompt, "response": response}) + "\n"


class SeqKDTrainer(SFTTrainer):
    """The SFT trainer, with its passes counted for the cost table."""

    method_name = "seqkd"

    def __init__(self, *args: Any, **kwargs: Any):
        self.passes = {"student": PassCounter(), "ar_teacher_sft": PassCounter()}
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, batch):
        loss, metrics = super().compute_loss(model, batch)
        b, length = batch["input_ids"].shape
        responses = batch["response_mask"].sum()  # (device tensors: counted without a host read)
        self.passes["student"].add(b, length, torch.round(metrics["mask_ratio"] * responses))
        self.passes["ar_teacher_sft"].add(b, length, responses)
        return loss, metrics

    def cost_rows(self, teacher: ModelShape, teacher_is_ar: bool) -> dict[str, dict[str, float]]:
        """SFT of the student, and seq-KD = that + training the teacher on the same batches (the
        student's token counts; teacher generation excluded, as in the paper's Table 2)."""
        kind = "lora" if self.unwrapped.is_peft else "train"
        sft = self.passes["student"].flops_per_micro_batch(ModelShape.of(self.unwrapped), kind)
        teacher_passes = self.passes["ar_teacher_sft" if teacher_is_ar else "student"]
        return {"sft": {"student_training": sft},
                "seqkd": {"student_training": sft,
                          "teacher_training": teacher_passes.flops_per_micro_batch(teacher, "train")}}


def run(cfg: Any) -> dict[str, float]:
    """Generate teacher responses for the training prompts (or reuse them), then SFT the student on them."""
    from accelerate import PartialState

    m = cfg.method
    out = Path(cfg.training.output_dir)
    prep = prepare(cfg, need_targets=False)  # it trains on the teacher's answers, tokenized below
    state = PartialState()
    teacher, teacher_tok = load_teacher(m.teacher, m.teacher_type, dtype=m.teacher_dtype, device=state.device)
    teacher_shape, teacher_is_ar = ModelShape.of(teacher), isinstance(teacher, CausalLM)
    prompts = [ex.prompt for ex in prep.train_examples]
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        generate_teacher_responses(teacher, teacher_tok, prompts, m.generation, out / DATA_FILE,
                                   prompt_format=cfg.data.prompt_format, seed=m.seed, chunk_size=m.chunk_size,
                                   source={"teacher": str(Path(m.teacher).resolve()) if Path(m.teacher).exists()
                                           else m.teacher, "teacher_type": m.teacher_type,
                                           "teacher_dtype": m.teacher_dtype})
    state.wait_for_everyone()
    del teacher
    responses = read_responses(out / DATA_FILE, prompts)
    examples = [dataclasses.replace(ex, target=r) for ex, r in zip(prep.train_examples, responses)]
    items, stats = tokenize_for_training(cfg, examples, prep.tokenizer)  # the teacher's answers are trained on
    record_data_stats(cfg, {**prep.data_stats, **stats})
    trainer = SeqKDTrainer(prep.model, prep.tokenizer, items, cfg.training, collate_fn=prep.collator,
                           evaluator=prep.evaluator, run_config=cfg, method=m.sft)
    write_run_metadata(cfg, prep.tokenizer, SeqKDTrainer.method_name, trainer.accelerator)
    metrics = trainer.train()
    write_costs(trainer, trainer.cost_rows(teacher_shape, teacher_is_ar))
    return finish(trainer, metrics)
