"""Pure loss functions with documented shapes, one module per family."""

from .diffusion import masked_diffusion_loss, masked_token_stats, token_nll
from .divergences import DivergenceOutput, distillation_divergence, divergence_terms, restrict_to_teacher_topk, topk_overlap

__all__ = ["token_nll", "masked_diffusion_loss", "masked_token_stats", "DivergenceOutput", "distillation_divergence",
           "divergence_terms", "restrict_to_teacher_topk", "topk_overlap"]
