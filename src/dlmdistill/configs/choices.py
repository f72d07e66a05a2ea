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

# dlmdistill.methods.dopsd
RevealScope = Literal["after_block", "before_eos", "official"]
TrainSteps = Literal["all", "informative", "official"]

# dlmdistill.methods.distillation
TeacherKind = Literal["auto", "dlm", "ar"]
