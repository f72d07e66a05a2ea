"""Divergences between a student and a teacher distribution at a set of positions.

On-policy distillation (d-OPSD, GKD, OPSD) compares, at each supervised position, the student's
predictive distribution ``P_s`` with the teacher's ``P_t``. Every function here takes logits of
shape ``[N, V]`` (N positions, V vocabulary entries) in any floating dtype and computes in
float32; logits must be finite. Nothing is detached here: pass teacher logits computed under
``torch.no_grad()`` (or detached) to distil into the student only.

Definitions (sums over the vocabulary ``v``):

* reverse KL ``KL(P_s || P_t) = sum_v P_s(v) (log P_s(v) - log P_t(v))`` (mode seeking; d-OPSD's default);
* forward KL ``KL(P_t || P_s) = sum_v P_t(v) (log P_t(v) - log P_s(v))`` (mode covering);
* generalised JSD of GKD (Agarwal et al., 2024, eq. 1), with ``M = beta P_t + (1 - beta) P_s``:
  ``JSD(beta) = beta KL(P_t || M) + (1 - beta) KL(P_s || M)``, for ``0 < beta < 1``. It vanishes at
  both ends; ``JSD(beta) / beta -> KL(P_t || P_s)`` as ``beta -> 0`` and
  ``JSD(beta) / (1 - beta) -> KL(P_s || P_t)`` as ``beta -> 1`` (TRL's GKD trainer and the d-OPSD
  reference code special-case ``beta = 0 / 1`` as those two KLs; here they are separate kinds).

Options used by d-OPSD (following OPSD, Zhao et al., 2026):

* ``top_k > 0``: both distributions are restricted to the teacher's ``top_k`` most probable ids and
  renormalised over them (the same ids for both);
* pointwise clipping at ``clip``: ``per_term`` caps each vocabulary term of the sum at ``clip``
  (the d-OPSD/OPSD reference code: ``terms.clamp(max=clip)``; a capped term has zero gradient),
  ``per_token`` caps the per-position divergence, ``off`` disables clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

DivergenceKind = Literal["reverse_kl", "forward_kl", "jsd"]
ClipMode = Literal["per_term", "per_token", "off"]

__all__ = ["ClipMode", "DivergenceKind", "DivergenceOutput", "divergence_terms", "distillation_divergence",
           "restrict_to_teacher_topk", "topk_overlap"]


@dataclass
class DivergenceOutput:
    """divergence: [N] float32, the (clipped) divergence at each position.
    clipped:    [N] float32, per position: the fraction of its vocabulary terms that were capped
                (``per_term``), 1.0 / 0.0 whether the position's divergence was capped
                (``per_token``), or 0.0 (``off``)."""

    divergence: torch.Tensor
    clipped: torch.Tensor

    @property
    def clip_ratio(self) -> torch.Tensor:
        """Mean of ``clipped`` over positions (a scalar; 0 when there are no positions)."""
        return self.clipped.mean() if self.clipped.numel() else self.clipped.new_zeros(())


def restrict_to_teacher_topk(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of both models at the teacher's ``k`` highest-scoring ids: [N, V] x2 -> [N, k] x2.

    A softmax over the result renormalises each distribution on those ``k`` ids.
    """
    k = min(k, teacher_logits.shape[-1])
    ids = teacher_logits.topk(k, dim=-1).indices
    return student_logits.gather(-1, ids), teacher_logits.gather(-1, ids)


def divergence_terms(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: DivergenceKind = "reverse_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """The per-vocabulary terms of a divergence: log-probabilities [N, V] x2 -> [N, V] (sum over V = divergence)."""
    if kind == "reverse_kl":
        return student_logp.exp() * (student_logp - teacher_logp)
    if kind == "forward_kl":
        return teacher_logp.exp() * (teacher_logp - student_logp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1 (got {beta}); use forward_kl / reverse_kl for the limits")
        mixture = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
        return (beta * teacher_logp.exp() * (teacher_logp - mixture)
                + (1.0 - beta) * student_logp.exp() * (student_logp - mixture))
    raise ValueError(f"unknown divergence {kind!r}; choose reverse_kl, forward_kl or jsd")


def distillation_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            kind: DivergenceKind = "reverse_kl", *, beta: float = 0.5, top_k: int = 0,
                            clip: float = 0.05, clip_mode: ClipMode = "per_term") -> DivergenceOutput:
    """Per-position divergence between student and teacher, with optional top-K restriction and clipping.

    student_logits, teacher_logits: [N, V] (any float dtype; computed in float32).
    kind: ``reverse_kl`` = KL(student || teacher), ``forward_kl`` = KL(teacher || student), ``jsd`` = GKD's JSD(beta).
    top_k: > 0 restricts both distributions to the teacher's top-k ids, renormalised; 0 = full vocabulary.
    clip, clip_mode: see the module docstring.
    Returns a ``DivergenceOutput`` with ``divergence`` [N] and ``clipped`` [N].
    """
    if clip_mode not in ("per_term", "per_token", "off"):
        raise ValueError(f"unknown clip_mode {clip_mode!r}; choose per_term, per_token or off")
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if top_k > 0:
        student_logits, teacher_logits = restrict_to_teacher_topk(student_logits, teacher_logits, top_k)
    terms = divergence_terms(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), kind, beta)
    if clip_mode == "per_term":
        clipped = (terms > clip).float().mean(-1)
        return DivergenceOutput(terms.clamp(max=clip).sum(-1), clipped)
    divergence = terms.sum(-1)
    if clip_mode == "per_token":
        return DivergenceOutput(divergence.clamp(max=clip), (divergence > clip).float())
    return DivergenceOutput(divergence, torch.zeros_like(divergence))


@torch.no_grad()
def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Overlap of the two top-K vocabularies (d-OPSD eq. 13, per position): [N, V] x2 -> [N] float32.

    ``|TopK(P_s) ∩ TopK(P_t)| / K`` at each position (ties broken by ``torch.topk``); K is capped at V.
    """
    k = min(k, student_logits.shape[-1])
    s = student_logits.float().topk(k, dim=-1).indices
    t = teacher_logits.float().topk(k, dim=-1).indices
    return (s[:, :, None] == t[:, None, :]).any(-1).float().sum(-1) / k
