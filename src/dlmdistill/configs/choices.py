"""What the configuration classes share with the code that implements them: the choices of options
(``Literal`` types) and default constants. They live here, without torch, so that the configurations
(and ``--help``) need no torch; ``dlmdistill.diffusion``, ``dlmdistill.losses`` and
``dlmdistill.methods.distillation`` import them from here."""

from __future__ import annotations

from typing import Literal

#: minimum masking probability of the forward process: ``p_mask = (1 - eps) t + eps`` (``dlmdistill.diffusion``)
EPS = 1e-3

# dlmdistill.losses.selffusion
DirectionRule = Literal["bidirectional", "easy_to_hard", "hard_to_easy"]
DistillPositions = Literal["both", "either", "own"]
ModeNormalization = Literal["masked", "token", "sequence"]

# dlmdistill.losses.kd
KLKind = Literal["forward_kl", "reverse_kl"]

# dlmdistill.losses.divergences
DivergenceKind = Literal["reverse_kl", "forward_kl", "jsd"]
ClipMode = Literal["per_term", "per_position", "per_position_scale", "off"]
CLIP_MODES = ("per_term", "per_position", "per_position_scale", "off")


def check_clip_mode(clip_mode: str) -> None:
    """Raise ``ValueError`` for an unknown clip mode, with the rename of ``per_token`` spelled out."""
    if clip_mode == "per_token":
        raise ValueError("clip_mode 'per_token' was renamed 'per_position' (it drops the gradient of a position "
                         "whose divergence exceeds clip). The d-OPSD paper's 'per-token pointwise clipping' is "
                         "'per_term'; 'per_position_scale' scales an over-threshold position instead of dropping it")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"unknown clip_mode {clip_mode!r}; choose one of {', '.join(CLIP_MODES)}")

# dlmdistill.methods.dopsd
RevealScope = Literal["after_block", "before_eos", "official"]
TrainSteps = Literal["all", "informative", "official"]

# dlmdistill.methods.distillation
TeacherKind = Literal["auto", "dlm", "ar"]
