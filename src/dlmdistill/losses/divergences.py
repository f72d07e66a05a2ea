"""The one KL / divergence API of dlmdistill: a student and a teacher distribution at N positions.

Every distillation loss in the package (logit KD, SelfFusion's L_bkd, d-OPSD, AR-style OPSD) goes
through ``divergence_terms`` below, directly or through ``distillation_divergence`` /
``losses.kd.kl_per_row``. Conventions, the same in every function:

* arguments are **keyword-only**: ``student_logits=..., teacher_logits=...`` (or ``student_logp``,
  ``teacher_logp``), so the two sides cannot be swapped by position;
* the divergence is named by ``kind``: ``reverse_kl`` = KL(student || teacher), ``forward_kl`` =
  KL(teacher || student), ``jsd`` = GKD's generalised JSD(beta);
* **the teacher side is detached in one place**, ``divergence_terms`` (``teacher_logp.detach()``):
  no gradient ever reaches the teacher's logits through this API, whatever the caller passes;
* logits are ``[N, V]`` (N positions, V vocabulary entries) in any floating dtype; the arithmetic
  is float32 (a bf16 KL is dominated by rounding at the small probabilities).

Definitions (sums over the vocabulary ``v``):

* reverse KL ``KL(P_s || P_t) = sum_v P_s(v) (log P_s(v) - log P_t(v))`` (mode seeking; d-OPSD's default);
* forward KL ``KL(P_t || P_s) = sum_v P_t(v) (log P_t(v) - log P_s(v))`` (mode covering; KD, SelfFusion);
  a zero-probability entry of the weighting distribution contributes 0 (``0 log 0 = 0``), so a
  teacher logit of ``-inf`` is allowed under the forward KL;
* generalised JSD of GKD (Agarwal et al., 2024, eq. 1), with ``M = beta P_t + (1 - beta) P_s``:
  ``JSD(beta) = beta KL(P_t || M) + (1 - beta) KL(P_s || M)``, for ``0 < beta < 1``. It vanishes at
  both ends; ``JSD(beta) / beta -> KL(P_t || P_s)`` as ``beta -> 0`` and
  ``JSD(beta) / (1 - beta) -> KL(P_s || P_t)`` as ``beta -> 1`` (TRL's GKD trainer and the d-OPSD
  reference code special-case ``beta = 0 / 1`` as those two KLs; here they are separate kinds).

Options used by d-OPSD (following OPSD, Zhao et al., 2026):

* ``top_k > 0``: both distributions are restricted to the teacher's ``top_k`` most probable ids and
  renormalised over them (the same ids for both);
* clipping at ``clip`` (``clip_mode``):

  - ``per_term``: each vocabulary term of the sum is capped at ``clip`` (the d-OPSD / OPSD
    reference code, ``terms.clamp(max=clip)``; what the d-OPSD paper calls "per-token pointwise
    clipping"). A capped term passes no gradient; negative terms are never capped;
  - ``per_position``: a position's whole divergence is capped at ``clip``; a position above the
    cap passes no gradient at all (it is dropped from the update). Formerly ``per_token``;
  - ``per_position_scale``: the value is the same as ``per_position`` (``min(D, clip)``) but a
    position above the cap keeps its gradient direction, scaled by ``clip / D``:
    ``D * min(1, clip / D.detach())``;
  - ``off``: no clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..configs.choices import CLIP_MODES, ClipMode, DivergenceKind, check_clip_mode

__all__ = ["CLIP_MODES", "ClipMode", "DivergenceKind", "DivergenceOutput", "check_clip_mode", "divergence_terms",
           "distillation_divergence", "restrict_to_teacher_topk", "topk_overlap"]


@dataclass
class DivergenceOutput:
    """divergence: [N] float32, the (clipped) divergence at each position.
    clipped:    [N] float32, per position: the fraction of its vocabulary terms that were capped
                (``per_term``), 1.0 / 0.0 whether the position's divergence exceeded the cap
                (``per_position``, ``per_position_scale``), or 0.0 (``off``)."""

    divergence: torch.Tensor
    clipped: torch.Tensor

    @property
    def clip_ratio(self) -> torch.Tensor:
        """Mean of ``clipped`` over positions (a scalar; 0 when there are no positions)."""
        return self.clipped.mean() if self.clipped.numel() else self.clipped.new_zeros(())


def restrict_to_teacher_topk(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of both models at the teacher's ``k`` highest-scoring ids: [N, V] x2 -> [N, k] x2.

    A softmax over the result renormalises each distribution on those ``k`` ids.
    """
    k = min(k, teacher_logits.shape[-1])
    ids = teacher_logits.topk(k, dim=-1).indices
    return student_logits.gather(-1, ids), teacher_logits.gather(-1, ids)


def divergence_terms(*, student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: DivergenceKind = "reverse_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """The per-vocabulary terms of a divergence: log-probabilities [N, V] x2 -> [N, V] (sum over V = divergence).

    The teacher side is detached here (the single place in the package where that happens).
    """
    teacher_logp = teacher_logp.detach()
    if kind == "reverse_kl":
        return _weighted_log_ratio(student_logp, teacher_logp)
    if kind == "forward_kl":
        return _weighted_log_ratio(teacher_logp, student_logp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1 (got {beta}); use forward_kl / reverse_kl for the limits")
        mixture = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
        return (beta * _weighted_log_ratio(teacher_logp, mixture)
                + (1.0 - beta) * _weighted_log_ratio(student_logp, mixture))
    raise ValueError(f"unknown divergence {kind!r}; choose reverse_kl, forward_kl or jsd")


def _weighted_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` element-wise, 0 where ``p = 0`` (so ``log p = -inf`` is allowed)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def distillation_divergence(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            kind: DivergenceKind = "reverse_kl", beta: float = 0.5, top_k: int = 0,
                            clip: float = 0.05, clip_mode: ClipMode = "per_term",
                            temperature: float = 1.0) -> DivergenceOutput:
    """Per-position divergence between student and teacher, with optional top-K restriction and clipping.

    student_logits, teacher_logits: [N, V] (any float dtype; computed in float32; the teacher is detached).
    kind: ``reverse_kl`` = KL(student || teacher), ``forward_kl`` = KL(teacher || student), ``jsd`` = GKD's JSD(beta).
    top_k: > 0 restricts both distributions to the teacher's top-k ids, renormalised; 0 = full vocabulary.
    clip, clip_mode: see the module docstring. temperature: both logits are divided by it first.
    Returns a ``DivergenceOutput`` with ``divergence`` [N] and ``clipped`` [N].
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_logits, teacher_logits = student_logits.float(), teacher_logits.detach().float()
    if temperature != 1.0:
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    if top_k > 0:
        student_logits, teacher_logits = restrict_to_teacher_topk(student_logits=student_logits,
                                                                  teacher_logits=teacher_logits, k=top_k)
    terms = divergence_terms(student_logp=F.log_softmax(student_logits, -1),
                             teacher_logp=F.log_softmax(teacher_logits, -1), kind=kind, beta=beta)
    if clip_mode == "per_term":
        clipped = (terms > clip).float().mean(-1)
        return DivergenceOutput(terms.clamp(max=clip).sum(-1), clipped)
    divergence = terms.sum(-1)
    if clip_mode == "off":
        return DivergenceOutput(divergence, torch.zeros_like(divergence))
    over = divergence > clip
    if clip_mode == "per_position":
        return DivergenceOutput(torch.where(over, divergence.detach().clamp(max=clip), divergence), over.float())
    if clip_mode != "per_position_scale":
        check_clip_mode(clip_mode)  # raises: an unknown mode (the configuration checked it already)
    scale = torch.where(over, clip / divergence.detach().clamp(min=clip), torch.ones_like(divergence))
    return DivergenceOutput(divergence * scale, over.float())


@torch.no_grad()
def topk_overlap(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Overlap of the two top-K vocabularies (d-OPSD eq. 13, per position): [N, V] x2 -> [N] float32.

    ``|TopK(P_s) ∩ TopK(P_t)| / K`` at each position (ties broken by ``torch.topk``); K is capped at V.
    """
    k = min(k, student_logits.shape[-1])
    s = student_logits.float().topk(k, dim=-1).indices
    t = teacher_logits.float().topk(k, dim=-1).indices
    return (s[:, :, None] == t[:, None, :]).any(-1).float().sum(-1) / k
