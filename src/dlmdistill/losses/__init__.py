"""Pure loss functions with documented shapes, one module per family.

Divergences between a student and a teacher have one API (``divergences``; ``kd`` wraps it with a
temperature): keyword-only ``student_logits=..., teacher_logits=...``, ``kind`` = ``reverse_kl`` /
``forward_kl`` / ``jsd``, and the teacher detached in ``divergences.divergence_terms``.
"""

from .diffusion import masked_diffusion_loss, masked_token_stats, token_nll
from .divergences import (DivergenceOutput, check_clip_mode, distillation_divergence, divergence_terms,
                          restrict_to_teacher_topk, topk_overlap)
from .kd import KLKind, kl_per_row, logit_kd_loss, tempered_log_probs
from .policy import PolicyLossOutput, group_advantages, k3_kl, ppo_clip_loss
from .selffusion import (DirectionDecision, bidirectional_kd_loss, choose_direction, direction_from_stats,
                         distillation_positions, mode_loss_weights, selffusion_diagnostics)

__all__ = ["token_nll", "masked_diffusion_loss", "masked_token_stats", "tempered_log_probs", "kl_per_row",
           "logit_kd_loss", "DirectionDecision", "choose_direction", "direction_from_stats", "bidirectional_kd_loss",
           "distillation_positions", "mode_loss_weights", "selffusion_diagnostics", "DivergenceOutput",
           "distillation_divergence", "divergence_terms", "check_clip_mode", "KLKind", "restrict_to_teacher_topk",
           "topk_overlap",
           "PolicyLossOutput", "group_advantages", "k3_kl", "ppo_clip_loss"]
