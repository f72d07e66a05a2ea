"""Pure loss functions with documented shapes, one module per family."""

from .diffusion import masked_diffusion_loss, masked_token_stats, token_nll

__all__ = ["token_nll", "masked_diffusion_loss", "masked_token_stats"]
