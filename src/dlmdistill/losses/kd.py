"""Logit-level knowledge distillation: tempered KL divergences between row-aligned logits.

Every function takes logits already gathered at the N positions that are distilled (the model
wrappers compute the LM head only there), as ``[N, V]`` tensors whose row ``n`` of the teacher and
row ``n`` of the student describe the same token. These are thin wrappers over the package's one
divergence API (``losses.divergences``): the same keyword-only ``student_logits=...,
teacher_logits=...`` arguments, the same ``kind`` names (``forward_kl`` / ``reverse_kl``), float32
arithmetic, and the teacher side detached in ``divergences.divergence_terms``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..configs.choices import KLKind
from .divergences import distillation_divergence

__all__ = ["KLKind", "kl_per_row", "logit_kd_loss", "tempered_log_probs"]


def tempered_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)`` in float32. [N, V] -> [N, V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def kl_per_row(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               kind: KLKind = "forward_kl") -> torch.Tensor:
    """KL divergence per row between the tempered teacher and student distributions: [N, V] x2 -> [N] float32.

    * ``"forward_kl"``: ``KL(P_teacher,T || P_student,T)`` (Hinton et al.; SelfFusion eq. 6);
    * ``"reverse_kl"``: ``KL(P_student,T || P_teacher,T)`` (mode seeking, as in MiniLLM).

    Zero-probability entries contribute 0 (``0 log 0 = 0``), so a teacher logit of ``-inf`` is allowed
    under the forward KL. The teacher is detached.
    """
    if kind not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"unknown KL kind {kind!r}; expected 'forward_kl' or 'reverse_kl'")
    return distillation_divergence(student_logits=student_logits, teacher_logits=teacher_logits, kind=kind,
                                   clip_mode="off", temperature=temperature).divergence


def logit_kd_loss(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  kind: KLKind = "forward_kl") -> torch.Tensor:
    """``T^2 / N * sum_n KL_n``: the mean KL over the N rows, scaled by ``T^2`` (Hinton et al.) so the
    gradient magnitude does not shrink as ``1/T^2`` when the temperature grows.

    student_logits, teacher_logits: [N, V]. Returns a float32 scalar; 0 (with a graph) when N = 0.
    """
    kl = kl_per_row(student_logits=student_logits, teacher_logits=teacher_logits, temperature=temperature, kind=kind)
    return temperature ** 2 * kl.sum() / max(kl.shape[0], 1)
