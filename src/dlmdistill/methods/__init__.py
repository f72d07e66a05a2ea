"""Training recipes, one module per method (a ``*Config``, a ``*Trainer`` and ``run(cfg)`` each).

``METHODS`` maps the name used on the command line (``dlmdistill train NAME``) to the module and its
run-configuration class; modules are imported lazily so that ``dlmdistill --help`` stays fast. The
configuration classes are defined in ``dlmdistill.configs.methods`` (no torch), which
``config_class`` reads without importing the recipe: ``dlmdistill train NAME --help`` needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

#: method name -> (module, run-config class name, one-line description)
METHODS: dict[str, tuple[str, str, str]] = {
    "sft": ("dlmdistill.methods.sft", "SFTRunConfig", "masked-diffusion supervised fine-tuning"),
    "selffusion": ("dlmdistill.methods.selffusion", "SelfFusionRunConfig",
                   "self-distillation between easy and hard masking (SelfFusion)"),
    "kd": ("dlmdistill.methods.kd", "KDRunConfig", "logit-level KD from a DLM or autoregressive teacher"),
    "seqkd": ("dlmdistill.methods.seqkd", "SeqKDRunConfig", "sequence-level KD: SFT on teacher-generated responses"),
    "ar-sft": ("dlmdistill.methods.ar_sft", "ARSFTRunConfig", "causal-LM SFT of an autoregressive model (LLM baselines)"),
    "dopsd": ("dlmdistill.methods.dopsd", "DOPSDRunConfig", "on-policy self-distillation from the self-future (d-OPSD)"),
    "diffu-grpo": ("dlmdistill.methods.diffu_grpo", "DiffuGRPORunConfig", "d1's diffu-GRPO (RL with a verifier)"),
}


def config_class(name: str) -> type:
    """The run-configuration class of method ``name``, without importing its recipe (nor torch)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    from ..configs import methods as configs

    return getattr(configs, METHODS[name][1])


def get_method(name: str) -> tuple[type, Callable[[Any], dict[str, float]]]:
    """(run-config class, run function) of method ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls, _ = METHODS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), mod.run
