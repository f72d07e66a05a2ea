"""Masked-diffusion SFT: its options (``dlmdistill.methods.sft`` is the recipe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...config import field
from ..choices import EPS
from .run import run_config_class


@dataclass
class SFTConfig:
    normalization: Literal["token", "sequence"] = field("token", help="'token': sum / response tokens in the batch "
                                                        "(SMDM); 'sequence': per-sample mean, then batch mean (LLaDA)")
    cfg_prob: float = field(0.0, help="probability of masking the whole prompt (classifier-free guidance training)")
    eps: float = field(EPS, help="minimum masking probability: p_mask = (1 - eps) t + eps")


SFTRunConfig = run_config_class("SFTRunConfig", SFTConfig, "Configuration of a masked-diffusion SFT run.")
