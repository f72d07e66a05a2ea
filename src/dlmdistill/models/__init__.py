"""Backbones: the ``DiffusionModel`` interface, built-in presets, loading and tokenizers."""

from .backbone import DiffusionModel, RMSNorm
from .loading import ModelConfig, build_model, count_parameters, load_model
from .presets import PRESETS, preset_config
from .tokenizer import char_tokenizer, ensure_mask_token, train_bpe_tokenizer

__all__ = ["DiffusionModel", "RMSNorm", "ModelConfig", "build_model", "load_model", "count_parameters", "PRESETS",
           "preset_config", "char_tokenizer", "train_bpe_tokenizer", "ensure_mask_token"]
