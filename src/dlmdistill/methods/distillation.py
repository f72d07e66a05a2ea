"""What the distillation recipes (selffusion, kd, seqkd) share: teachers, tokenizer checks, costs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..configs.choices import TeacherKind
from ..evaluation import resolve_model_path
from ..flops import cost_table, format_cost_table, save_cost_table
from ..models.autoregressive import CausalLM, is_autoregressive_checkpoint, load_causal_lm
from ..models.backbone import DiffusionModel
from ..models.loading import DTYPES, ModelConfig, build_model

log = logging.getLogger(__name__)


def load_teacher(path: str, kind: TeacherKind = "auto", *, dtype: str = "float32",
                 device: torch.device | str = "cpu") -> tuple[DiffusionModel | CausalLM, Any]:
    """A frozen teacher in eval mode on ``device``, with its tokenizer.

    path: a run folder (its ``final/`` export is used), a model folder or a hub id. ``kind="auto"``
    decides with ``models.autoregressive.is_autoregressive_checkpoint``: a causal LM is loaded with
    ``AutoModelForCausalLM`` (an AR teacher), anything else with ``models.loading`` (a DLM teacher).
    """
    if dtype not in DTYPES:
        raise ValueError(f"teacher dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(path)
    if kind == "auto":
        kind = "ar" if is_autoregressive_checkpoint(path) else "dlm"
    if kind == "ar":
        teacher, tok = load_causal_lm(ModelConfig(name_or_path=path, dtype=dtype))
    else:
        teacher, tok = build_model(ModelConfig(name_or_path=path, dtype=dtype))
    teacher.to(device).eval().requires_grad_(False)
    log.info("loaded %s teacher %s", kind.upper(), path)
    return teacher, tok


def check_same_tokenizer(student_tok, teacher_tok, student_name: str, teacher_name: str) -> None:
    """Raise unless every token of the teacher's tokenizer has the same id in the student's.

    The student may have extra tokens (a DLM adds its mask token to an AR vocabulary); their logits are
    not distilled. Logit distillation compares distributions id by id, so anything else is an error.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    bad = [tok for tok, i in t_vocab.items() if s_vocab.get(tok) != i]
    if bad:
        raise ValueError(
            f"logit distillation needs the same tokenizer for student and teacher, but the student tokenizer "
            f"({student_name}, {len(s_vocab)} tokens) and the teacher tokenizer ({teacher_name}, {len(t_vocab)} "
            f"tokens) disagree on {len(bad)} tokens, e.g. {sorted(bad)[:5]}. Train the student with the teacher's "
            f"tokenizer (model.tokenizer: <teacher folder>).")


def write_costs(trainer, rows: dict[str, dict[str, float]]) -> dict:
    """Turn per-micro-batch FLOPs into the run's cost table; save ``flops.json`` and print it."""
    acc = trainer.accelerator
    table = cost_table(rows, trainer.state.global_step, trainer.config.gradient_accumulation_steps * acc.num_processes)
    if acc.is_main_process:
        save_cost_table(table, trainer.output_dir)
        print(format_cost_table(table))
    return table
