"""dlmdistill: post-training diffusion language models with self-distillation."""
__version__ = "0.1.0"
