"""Logit-level knowledge distillation: KL divergences between row-aligned logits.

Every function takes logits already gathered at the N positions that are distilled (the model
wrappers compute the LM head only there), as ``[N, V]`` tensors whose row ``n`` of the teacher and
row ``n`` of the student describe the same token. All arithmetic is in float32 whatever the
logits' dtype: a bf16 KL is dominated by rounding at the small probabilities that carry most of
its terms. The teacher side is always detached here, so a caller cannot leak gradient into it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward", "reverse"]


def tempered_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)`` in float32. [N, V] -> [N, V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def kl_per_row(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
               divergence: Divergence = "forward") -> torch.Tensor:
    """KL divergence per row between the tempered teacher and student distributions.

    teacher_logits: [N, V] (detached here); student_logits: [N, V]. Returns [N] float32.

    * ``"forward"``: ``KL(P_teacher,T || P_student,T)`` (Hinton et al.; SelfFusion eq. 6);
    * ``"reverse"``: ``KL(P_student,T || P_teacher,T)`` (mode seeking, as in MiniLLM).

    Zero-probability entries contribute 0 (``0 log 0 = 0``), so a teacher logit of ``-inf`` is allowed
    under the forward KL.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher and student logits differ in shape: {tuple(teacher_logits.shape)} vs "
                         f"{tuple(student_logits.shape)}")
    log_t = tempered_log_probs(teacher_logits.detach(), temperature)
    log_s = tempered_log_probs(student_logits, temperature)
    if divergence == "forward":
        p, log_p, log_q = log_t.exp(), log_t, log_s
    elif divergence == "reverse":
        p, log_p, log_q = log_s.exp(), log_s, log_t
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected 'forward' or 'reverse'")
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def logit_kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                  divergence: Divergence = "forward") -> torch.Tensor:
    """``T^2 / N * sum_n KL_n``: the mean KL over the N rows, scaled by ``T^2`` (Hinton et al.) so the
    gradient magnitude does not shrink as ``1/T^2`` when the temperature grows.

    teacher_logits, student_logits: [N, V]. Returns a float32 scalar; 0 (with a graph) when N = 0.
    """
    kl = kl_per_row(teacher_logits, student_logits, temperature, divergence)
    return temperature ** 2 * kl.sum() / max(kl.shape[0], 1)
