"""Logit-level KD into a DLM student (the paper's "Logit-level KD" rows, Tables 1, 4, 7).

The student is trained with ``ce_weight * L_diff + kd_weight * L_kd`` where ``L_kd`` is the mean,
over the student's masked positions, of ``T^2 * KL(P_teacher,T || P_student,T)`` (forward KL by
default; ``divergence: reverse_kl`` for ``KL(student || teacher)``). The teacher is frozen, in eval
mode, on the student's device, and its LM head is computed only where it is needed:

* a **DLM teacher** sees exactly the student's noisy input and predicts the same masked positions;
* an **AR teacher** sees the clean sequence; for a masked position ``i`` it contributes its
  next-token distribution computed at ``i - 1``, i.e. token ``i`` given the clean prefix ``y_<i``
  (``CausalLM.forward``). By default the KD term skips the trailing EOS padding of the response
  (positions after its first EOS): there the AR teacher would condition on a prefix ending in EOS,
  which it never saw in training (``ar_skip_eos_padding``); the CE term still trains them.

Logits are compared id by id, so the teacher's tokenizer must agree with the student's on every
teacher token (checked; the error names both). When the vocabularies differ in size (a DLM
student adds a mask token to an AR vocabulary), the KL runs over the first
``min(V_student, V_teacher)`` ids, both distributions renormalised there; the student's extra ids
are trained by ``L_diff`` only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..configs.methods import KDConfig, KDRunConfig  # noqa: F401 (re-exported)
from ..diffusion import ResponseRows, forward_process
from ..flops import ModelShape, PassCounter
from ..losses.diffusion import masked_diffusion_loss, masked_token_stats
from ..losses.kd import kl_per_row, logit_kd_loss
from ..losses.selffusion import mode_loss_weights
from ..models.autoregressive import CausalLM
from ..models.backbone import DiffusionModel
from ..training.trainer import Trainer
from .common import finish, prepare, write_run_metadata
from .distillation import check_same_tokenizer, load_teacher, write_costs

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_logits(teacher: DiffusionModel | CausalLM, input_ids: torch.Tensor, noisy_ids: torch.Tensor,
                   attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at ``positions`` ([B, L] bool, a subset of the student's masked positions),
    [N, V_teacher], rows aligned with ``student(noisy_ids, positions=positions)``.

    input_ids: [B, L] clean ids; noisy_ids: [B, L], the student's input. A ``DiffusionModel`` teacher
    reads ``noisy_ids``; a ``CausalLM`` teacher reads the clean ids, so row n is its distribution of
    token i given ``y_<i``.
    """
    if isinstance(teacher, CausalLM):
        return teacher(input_ids, attention_mask, positions=positions)
    return teacher(noisy_ids, attention_mask, positions=positions)


def eos_padding(input_ids: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, L] bool: response positions after the response's first EOS (the trained EOS padding)."""
    eos = (input_ids == eos_id) & response_mask
    return response_mask & ((eos.long().cumsum(dim=1) - eos.long()) > 0)


class KDTrainer(Trainer):
    """Logit KD. ``teacher`` is a frozen ``DiffusionModel`` or ``CausalLM`` (``distillation.load_teacher``)."""

    method_name = "kd"

    def __init__(self, *args: Any, teacher: DiffusionModel | CausalLM, method: KDConfig | None = None,
                 **kwargs: Any):
        self.method = method or KDConfig(teacher="(in memory)")
        self.teacher = teacher
        self.passes = {"student": PassCounter(), "teacher": PassCounter(), "teacher_sft": PassCounter()}
        super().__init__(*args, **kwargs)

    def setup_model(self, model: DiffusionModel) -> None:
        self.teacher.to(self.accelerator.device).eval().requires_grad_(False)
        # a ready mask, as the student's, under training.static_shapes (an AR teacher: its causal one)
        self.teacher.static_attention_mask = self.config.static_shapes
        if isinstance(self.teacher, DiffusionModel) and self.teacher.mask_id != model.mask_id:
            raise ValueError(f"the DLM teacher's mask id ({self.teacher.mask_id}) differs from the student's "
                             f"({model.mask_id}): a DLM teacher must read the student's noisy input")

    def compute_loss(self, model, batch):
        cfg = self.method
        ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        noised = forward_process(ids, resp, self.unwrapped.mask_id, eps=cfg.eps)
        skip_padding = isinstance(self.teacher, CausalLM) and cfg.ar_skip_eos_padding
        if self.config.static_shapes:
            return self._static_loss(model, batch, noised, skip_padding)
        logits = model(noised.noisy_ids, attn, positions=noised.masked)
        targets = ids[noised.masked]
        weights = mode_loss_weights(noised.masked, noised.p_mask, resp, cfg.normalization)[noised.masked]
        ce = masked_diffusion_loss(logits, targets, weights)
        kd_pos, s_logits = noised.masked, logits
        if skip_padding:
            kd_pos = noised.masked & ~eos_padding(ids, resp, self.tokenizer.eos_token_id)
            s_logits = logits[kd_pos[noised.masked]]
        with self.accelerator.autocast():
            t_logits = teacher_logits(self.teacher, ids, noised.noisy_ids, attn, kd_pos)
        v = min(s_logits.shape[-1], t_logits.shape[-1])
        kd = logit_kd_loss(student_logits=s_logits[:, :v], teacher_logits=t_logits[:, :v], temperature=cfg.temperature,
                           kind=cfg.divergence)
        loss = cfg.ce_weight * ce + cfg.kd_weight * kd
        metrics = {"loss/ce": ce.detach(), "loss/kd": kd.detach(),
                   "mask_ratio": noised.masked.sum() / resp.sum().clamp(min=1),
                   **masked_token_stats(logits.detach(), targets)}
        if t_logits.shape[0]:
            metrics.update({f"teacher/{k}": x for k, x in masked_token_stats(t_logits.float(), ids[kd_pos]).items()})
            metrics["kd/top1_agreement"] = (t_logits.argmax(-1) == s_logits.detach().argmax(-1)).float().mean()
        metrics["kd/frac_of_masked"] = t_logits.shape[0] / max(targets.numel(), 1)
        b, length = ids.shape
        n = noised.masked.sum()
        self.passes["student"].add(b, length, n)
        self.passes["teacher"].add(b, length, t_logits.shape[0])
        # SFT of the teacher itself: a DLM's head at the masked positions, an AR model's at every response token
        self.passes["teacher_sft"].add(b, length, resp.sum() if isinstance(self.teacher, CausalLM) else n)
        return loss, metrics

    def _static_loss(self, model, batch, noised, skip_padding: bool):
        """``training.static_shapes``: student and teacher at every response position
        (``batch["response_index"]``), rows off the mask (and, for an AR teacher, token 0 and the EOS
        padding when skipped) weighted 0: the same loss with no data-dependent shape."""
        cfg = self.method
        ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        at = ResponseRows.of(batch["response_index"])
        logits = model(noised.noisy_ids, attn, positions=at.index)
        targets = at.gather(ids)
        masked = at.gather(noised.masked) & at.valid
        weights = torch.where(masked, at.gather(mode_loss_weights(noised.masked, noised.p_mask, resp, cfg.normalization)),
                              torch.zeros((), device=ids.device))
        ce = masked_diffusion_loss(logits, targets, weights)
        in_kd = masked
        if isinstance(self.teacher, CausalLM):
            in_kd = in_kd & (at.cols > 0)  # token 0 has no prefix (the gathered path refuses it)
            if skip_padding:
                in_kd = in_kd & ~at.gather(eos_padding(ids, resp, self.tokenizer.eos_token_id))
        with self.accelerator.autocast():
            t_logits = teacher_logits(self.teacher, ids, noised.noisy_ids, attn, at.index)
        v = min(logits.shape[-1], t_logits.shape[-1])
        kl = kl_per_row(student_logits=logits[:, :v], teacher_logits=t_logits[:, :v], temperature=cfg.temperature,
                        kind=cfg.divergence)
        w = in_kd.to(kl.dtype)
        kd = cfg.temperature ** 2 * (kl * w).sum() / w.sum().clamp(min=1)
        loss = cfg.ce_weight * ce + cfg.kd_weight * kd
        agree = (t_logits.argmax(-1) == logits.detach().argmax(-1)).float()
        metrics = {"loss/ce": ce.detach(), "loss/kd": kd.detach(),
                   "mask_ratio": noised.masked.sum() / resp.sum().clamp(min=1),
                   **masked_token_stats(logits.detach(), targets, masked),
                   **{f"teacher/{k}": x for k, x in masked_token_stats(t_logits.float(), targets, in_kd).items()},
                   "kd/top1_agreement": (agree * w).sum() / w.sum(),
                   "kd/frac_of_masked": w.sum() / masked.sum().clamp(min=1)}
        b, length = ids.shape
        self.passes["student"].add(b, length, logits.shape[0])
        self.passes["teacher"].add(b, length, t_logits.shape[0])
        self.passes["teacher_sft"].add(b, length, resp.sum() if isinstance(self.teacher, CausalLM) else noised.masked.sum())
        return loss, metrics

    def cost_rows(self) -> dict[str, dict[str, float]]:
        """FLOPs per micro-batch: SFT of the student, KD (student training + teacher forward), and training
        the teacher on the same batches (Table 2's "teacher training": full fine-tuning assumed)."""
        student = ModelShape.of(self.unwrapped)
        teacher = ModelShape.of(self.teacher)
        kind = "lora" if self.unwrapped.is_peft else "train"
        sft = self.passes["student"].flops_per_micro_batch(student, kind)
        return {"sft": {"student_training": sft},
                "kd": {"student_training": sft + self.passes["teacher"].flops_per_micro_batch(teacher, "frozen"),
                       "teacher_training": self.passes["teacher_sft"].flops_per_micro_batch(teacher, "train")}}


def run(cfg: Any) -> dict[str, float]:
    """Train a DLM student with logit-level KD; returns the final evaluation metrics."""
    prep = prepare(cfg)
    m = cfg.method
    teacher, teacher_tok = load_teacher(m.teacher, m.teacher_type, dtype=m.teacher_dtype)
    check_same_tokenizer(prep.tokenizer, teacher_tok, cfg.model.tokenizer or cfg.model.name_or_path, m.teacher)
    trainer = KDTrainer(prep.model, prep.tokenizer, prep.train_items, cfg.training, collate_fn=prep.collator,
                        evaluator=prep.evaluator, run_config=cfg, method=m, teacher=teacher)
    write_run_metadata(cfg, prep.tokenizer, KDTrainer.method_name, trainer.accelerator)
    metrics = trainer.train()
    write_costs(trainer, trainer.cost_rows())
    return finish(trainer, metrics)
