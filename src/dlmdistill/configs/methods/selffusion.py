"""SelfFusion: its options (``dlmdistill.methods.selffusion`` is the recipe, ``dlmdistill.losses.selffusion``
its losses)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import field
from ..choices import EPS, DirectionRule, DistillPositions, ModeNormalization
from .run import run_config_class


@dataclass
class SelfFusionConfig:
    direction: DirectionRule = field("bidirectional", help="distillation direction: 'bidirectional' (per token, "
                                     "eq. 1), or the Table 3 ablations 'easy_to_hard' / 'hard_to_easy'")
    calibration: bool = field(True, help="RMSNorm logit calibration on the easy mode (false: the 'w/o RMSNorm' "
                              "ablation)")
    kd_weight: float = field(1.0, help="weight of L_bkd (paper: 1; 0 = two diffusion losses only)")
    temperature: float = field(1.0, help="KD temperature T (the direction is always decided at T = 1)")
    distill_positions: DistillPositions = field("both", help="distillation set D: response positions masked in "
                                                "'both' modes (default), in 'either' mode, or 'own': either, "
                                                "each mode a student only on its own masked positions (App. A.4)")
    normalization: ModeNormalization = field("masked", help="each L_diff: 'masked' = mean over the mode's masked "
                                             "positions of -log p / q (paper eq. 3-4); 'token' = sum / response "
                                             "tokens (SMDM SFT); 'sequence' = per-sample mean (LLaDA)")
    eps: float = field(EPS, help="minimum masking probability: p_mask = (1 - eps) t + eps")
    uncalibrated_diagnostics_every: int = field(10, help="every N micro-batches also log the easy mode's top-1 "
                                                "probabilities without calibration (one extra no-grad LM-head "
                                                "pass over D); 0 = never")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.kd_weight < 0:
            raise ValueError("kd_weight must be >= 0")
        if self.uncalibrated_diagnostics_every < 0:
            raise ValueError("uncalibrated_diagnostics_every must be >= 0")


SelfFusionRunConfig = run_config_class("SelfFusionRunConfig", SelfFusionConfig,
                                       "Configuration of a SelfFusion run (self-distillation between masking levels).")
