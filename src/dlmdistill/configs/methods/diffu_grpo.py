"""d1's diffu-GRPO: its options (``dlmdistill.methods.diffu_grpo`` is the recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import field
from ..generation import GenerationConfig
from .run import run_config_class


def _d1_rollout() -> GenerationConfig:
    return GenerationConfig(gen_length=256, steps=128, block_length=32, temperature=0.9, batch_size=8)


@dataclass
class DiffuGRPOConfig:
    rollout: GenerationConfig = field(default_factory=_d1_rollout, help="sampler of the group completions "
                                      "(d1: 256 tokens, blocks of 32, temperature 0.9)")
    num_generations: int = field(6, help="completions per prompt, G (d1's training config: 6)")
    num_iterations: int = field(12, help="mu: optimizer steps on each rollout batch (d1: 12)")
    epsilon: float = field(0.5, help="PPO clip range (d1's training config: 0.5)")
    beta: float = field(0.04, help="weight of the k3 KL to the reference (initial) policy; 0 = no reference")
    p_mask_prompt: float = field(0.15, help="probability of masking each prompt token in the log-prob estimate")
    scale_rewards: bool = field(False, help="divide advantages by the group's reward std (d1: no)")
    random_masking: bool = field(True, help="a fresh prompt mask per inner iteration (d1's random_masking); "
                                 "false = the same mask for all iterations")
    micro_batch_size: int = field(8, help="completions per forward pass; gradients are accumulated over "
                                  "micro-batches into one optimizer step per inner iteration")

    def validate(self) -> None:
        if self.num_generations < 1 or self.num_iterations < 1 or self.micro_batch_size < 1:
            raise ValueError("num_generations, num_iterations and micro_batch_size must be >= 1")
        if not 0.0 <= self.p_mask_prompt <= 1.0:
            raise ValueError("p_mask_prompt must be in [0, 1]")
        if self.epsilon <= 0 or self.beta < 0:
            raise ValueError("epsilon must be > 0 and beta >= 0")


DiffuGRPORunConfig = run_config_class("DiffuGRPORunConfig", DiffuGRPOConfig, "Configuration of a diffu-GRPO run.")
