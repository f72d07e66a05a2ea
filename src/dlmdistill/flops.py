"""Training cost accounting in estimated FLOPs (SelfFusion's Table 2).

``estimate_flops`` is the formula; ``PassCounter`` records what a run's passes actually processed
(sequences, their padded lengths, the rows the LM head was applied to), so that the estimate
follows the real batches, masking and padding instead of nominal sizes; ``cost_table`` turns the
counts of a run into FLOPs per iteration and in total, and ``format_cost_table`` prints them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

PassKind = Literal["train", "lora", "frozen"]

#: FLOPs of a pass as a multiple of its forward FLOPs
PASS_MULTIPLIER: dict[str, int] = {"train": 3, "lora": 2, "frozen": 1}

FORMULA = ("forward = 2*N_body*tokens + 2*N_head*head_rows + 4*layers*hidden*sum(L^2); "
           "train = 3*forward, lora = 2*forward, frozen = forward")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs of a transformer depend on.

    body_params: parameters applied at every position: all but the input embedding table and the
        LM head (an embedding lookup costs no FLOPs; the head is applied only where needed).
    head_params: the LM head's weight (hidden x vocab).
    """

    body_params: int
    head_params: int
    num_layers: int
    hidden_size: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        """The shape of a ``DiffusionModel``, a ``CausalLM`` or a transformers model (LoRA included)."""
        hf = getattr(model, "hf_model", model)
        emb = hf.get_input_embeddings().weight
        head = hf.get_output_embeddings().weight
        total = sum(p.numel() for p in hf.parameters())
        tied = head.data_ptr() == emb.data_ptr()
        body = total - emb.numel() - (0 if tied else head.numel())
        return cls(body_params=body, head_params=head.numel(), num_layers=int(hf.config.num_hidden_layers),
                   hidden_size=int(hf.config.hidden_size))


def estimate_flops(shape: ModelShape, *, tokens: float, head_rows: float, sum_sq_lengths: float,
                   kind: PassKind = "train") -> float:
    """Estimated FLOPs of passes over some sequences.

    forward = 2 * N_body * tokens                (every matmul: one multiply-add per weight per token)
            + 2 * N_head * head_rows             (the LM head, only at the rows it is applied to)
            + 4 * layers * hidden * sum_b L_b^2  (attention scores Q K^T and the weighted sum A V)

    and a pass costs ``3 x forward`` when trained (the backward pass is ~2 forwards), ``2 x forward``
    with LoRA (the backward computes activation gradients; the adapters' weight gradients are
    negligible), ``1 x forward`` when frozen (a teacher). Norms, activations and the softmax are
    left out (a few percent at these sizes).

    tokens: sum of the (padded) sequence lengths; head_rows: LM-head rows; sum_sq_lengths: sum of
    squared sequence lengths.
    """
    forward = (2.0 * shape.body_params * tokens + 2.0 * shape.head_params * head_rows
               + 4.0 * shape.num_layers * shape.hidden_size * sum_sq_lengths)
    return PASS_MULTIPLIER[kind] * forward


@dataclass
class PassCounter:
    """Running totals of what one kind of pass processed, for ``estimate_flops``."""

    tokens: int = 0
    head_rows: int = 0
    sum_sq_lengths: int = 0
    micro_batches: int = 0

    def add(self, batch_size: int, seq_len: int, head_rows: Any) -> None:
        """Record one pass over ``batch_size`` sequences of padded length ``seq_len``; ``head_rows`` may be
        a device tensor (summed there, read back once by ``flops_per_micro_batch``: no sync per step)."""
        self.tokens += batch_size * seq_len
        self.sum_sq_lengths += batch_size * seq_len * seq_len
        if isinstance(head_rows, torch.Tensor):
            self.head_rows = head_rows.detach().long() + self.head_rows
        else:
            self.head_rows += int(head_rows)
        self.micro_batches += 1

    def flops_per_micro_batch(self, shape: ModelShape, kind: PassKind) -> float:
        if self.micro_batches == 0:
            return 0.0
        total = estimate_flops(shape, tokens=self.tokens, head_rows=int(self.head_rows),
                               sum_sq_lengths=self.sum_sq_lengths, kind=kind)
        return total / self.micro_batches


def cost_table(rows: dict[str, dict[str, float]], iterations: int, micro_batches_per_iteration: int) -> dict:
    """Table 2 from per-micro-batch FLOPs.

    rows: ``{method: {"student_training": F, "teacher_training": F}}``, FLOPs per micro-batch of one
    process; an iteration (optimizer step) is ``micro_batches_per_iteration`` of them (gradient
    accumulation x processes). Returns per-iteration and total FLOPs per row, and each row's
    per-iteration student-training cost relative to the ``"sft"`` row when there is one.
    """
    out: dict = {"formula": FORMULA, "iterations": iterations,
                 "micro_batches_per_iteration": micro_batches_per_iteration, "rows": {}}
    for name, parts in rows.items():
        per_it = {k: v * micro_batches_per_iteration for k, v in parts.items()}
        per_it["total"] = sum(per_it.values())
        out["rows"][name] = {"per_iteration": per_it, "run_total": {k: v * iterations for k, v in per_it.items()}}
    sft = out["rows"].get("sft", {}).get("per_iteration", {}).get("student_training")
    if sft:
        for r in out["rows"].values():
            r["student_training_ratio_to_sft"] = r["per_iteration"].get("student_training", 0.0) / sft
    return out


def format_cost_table(table: dict) -> str:
    """A Markdown rendering of ``cost_table`` (TFLOPs over the run, like the paper's Table 2)."""
    lines = [f"estimated training cost, {table['iterations']} iterations (TFLOPs; {table['formula']})", "",
             "| method | student training | teacher training | total | student training / SFT |",
             "|---|---:|---:|---:|---:|"]
    for name, r in table["rows"].items():
        t = r["run_total"]
        ratio = r.get("student_training_ratio_to_sft")
        student, teacher = t.get("student_training", 0) / 1e12, t.get("teacher_training", 0) / 1e12
        lines.append(f"| {name} | {student:.4g} | {teacher:.4g} | {t['total'] / 1e12:.4g} "
                     f"| {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def save_cost_table(table: dict, output_dir: str | Path) -> Path:
    """Write ``flops.json`` into the run folder and return its path."""
    path = Path(output_dir) / "flops.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))
    return path
