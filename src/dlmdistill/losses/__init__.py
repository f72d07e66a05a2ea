"""Pure loss functions with documented shapes, one module per family."""

from .diffusion import masked_diffusion_loss, masked_token_stats, token_nll
from .divergences import DivergenceOutput, distillation_divergence, divergence_terms, restrict_to_teacher_topk, topk_overlap
from .policy import PolicyLossOutput, group_advantages, k3_kl, ppo_clip_loss

__all__ = ["token_nll", "masked_diffusion_loss", "masked_token_stats", "DivergenceOutput", "distillation_divergence",
           "divergence_terms", "restrict_to_teacher_topk", "topk_overlap", "PolicyLossOutput", "group_advantages",
           "k3_kl", "ppo_clip_loss"]
