"""d-OPSD: its options and the official code's recipe (``dlmdistill.methods.dopsd`` is the recipe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ...config import ConfigError, field
from ..choices import DivergenceKind, RevealScope, TrainSteps, check_clip_mode
from ..generation import GenerationConfig
from .run import run_config_class


#: ``clip_mode`` as a setting: the clip modes plus the old name ``per_token``, accepted by the config
#: loader only so that ``validate`` can reject it with an error that names its replacement
ClipModeSetting = Literal["per_term", "per_position", "per_position_scale", "off", "per_token"]


def _paper_rollout() -> GenerationConfig:
    return GenerationConfig(gen_length=256, steps=128, block_length=32, temperature=0.9, batch_size=8)


@dataclass
class DOPSDConfig:
    rollout: GenerationConfig = field(default_factory=_paper_rollout, help="sampler of the on-policy trajectories "
                                      "(paper: 256 tokens, 128 steps, blocks of 32; temperature 0.9 as in the "
                                      "reference code, so that pass@k resamples differ)")
    pass_k: int = field(8, help="attempts per prompt: resample rejected prompts until the verifier accepts, at "
                        "most this many times in all (1 = a single sample)")
    accept_threshold: float | None = field(None, help="score from which a trajectory is accepted; null = the "
                                           "task's own (1.0 = correct); the paper uses 0.25 for Sudoku")
    correct_only: bool = field(True, help="train only on accepted trajectories; false = train on every prompt's "
                               "kept trajectory (the accepted one, else the best-scoring attempt; Table 11)")
    teacher_context: Literal["self_future", "reference_prefix"] = field(
        "self_future", help="self_future: reveal part of the trajectory's own final answer outside the current "
        "block (d-OPSD); reference_prefix: prompt + reference solution as the teacher's prompt (AR-style OPSD)")
    rho: float = field(0.25, help="self_future: fraction of the still-masked positions outside the current block "
                       "revealed to the teacher (floor(rho * eligible))")
    reveal: RevealScope = field("after_block", help="self_future: which positions may be revealed. after_block: "
                                "every masked position after the current block, the EOS tail included; before_eos: "
                                "those up to the first EOS of the final answer; official: after_block, but none "
                                "once the next block starts at or after the answer's first EOS (the official code)")
    reference_template: str = field("{prompt}{target}\n", help="reference_prefix: the teacher's prompt, a "
                                    "str.format pattern over {prompt} and {target} (the reference solution)")
    teacher: Literal["fixed", "current"] = field("fixed", help="fixed: the initial policy (LoRA adapters "
                                                 "disabled / a frozen copy); current: the policy itself, no gradient")
    positions: Literal["teacher", "student", "committed"] = field(
        "teacher", help="K_t: the k_t masked positions of the current block where the teacher (or student) is "
        "most confident (see confidence), or the positions the sampler committed at the step")
    confidence: Literal["probability", "max_logit"] = field(
        "probability", help="how positions teacher/student rank K_t: the probability of the argmax token, or the "
        "raw maximum logit (the official code)")
    kt_reduction: Literal["mean", "sum"] = field("mean", help="a step's divergence over K_t: mean (the paper's "
                                                 "eq. 11) or sum (the official code)")
    divergence: DivergenceKind = field("reverse_kl", help="reverse_kl = KL(student || teacher), forward_kl, or "
                                       "jsd (GKD's generalised JSD with jsd_beta)")
    jsd_beta: float = field(0.5, help="beta of the generalised JSD (0 < beta < 1)")
    vocab_top_k: int = field(0, help="restrict both distributions to the teacher's top-K ids, renormalised; "
                             "0 = full vocabulary (the paper's text; the reference scripts use 20)")
    clip: float = field(0.05, help="clipping threshold c of the divergence (see clip_mode)")
    clip_mode: ClipModeSetting = field(
        "per_term", help="per_term: cap each vocabulary term at c (reference code; the paper's 'per-token "
        "pointwise clipping'); per_position: cap a position's divergence at c, dropping the gradient of positions "
        "above it (formerly 'per_token'); per_position_scale: same value, but positions above c keep their "
        "gradient scaled by c / D; off")
    train_steps: TrainSteps = field(
        "all", help="which recorded steps are trained: all; informative = steps where masks remain before the "
        "first EOS of the final answer and (self_future) the teacher sees at least one revealed position, so "
        "never a step whose teacher input equals the student's (e.g. the last block); official = the official "
        "code's: steps outside the last block while a mask remains before the first EOS of the state itself")
    batch_divide: int = field(1, help="optimizer steps per rollout batch: each trajectory's trained steps are "
                              "split, in order, into this many chunks and chunk c of every trajectory makes "
                              "optimizer step c (the official code: 4, or 8 on A100/H100)")
    pass_k_mode: Literal["first_accepted", "best_of_k"] = field(
        "first_accepted", help="first_accepted: stop a prompt's attempts at the first accepted one; best_of_k: "
        "always draw pass_k attempts and keep the highest-scoring one, ties to the later (the official code's "
        "Sudoku)")
    rejected: Literal["skip", "zero_weight"] = field(
        "skip", help="with correct_only, a prompt whose kept trajectory is not accepted: skip = left out of the "
        "loss, and a batch with none accepted takes no optimizer step; zero_weight = the official code's loss "
        "times 0: it counts in the mean, its kept trajectory is its last attempt, and every batch steps the "
        "optimizer")
    student_dropout: bool = field(False, help="keep dropout (e.g. LoRA dropout) on in the student's loss forward; "
                                  "false = dropout off, like the rollouts that produced the trajectories")
    micro_batch_size: int = field(8, help="step states per forward pass (student and teacher each); the "
                                  "gradient is accumulated over micro-batches, one optimizer step per rollout batch")
    overlap_k: int = field(20, help="K of the logged top-K overlap between student and teacher (eq. 13)")
    max_consecutive_skips: int = field(100, help="stop with an error after this many rollout batches in a row "
                                       "without an accepted trajectory (0 = never)")

    def validate(self) -> None:
        """Raise ``ConfigError`` (naming the field) for an invalid option (``rollout`` is a section of its own,
        checked as one)."""
        if self.pass_k < 1 or self.micro_batch_size < 1 or self.overlap_k < 1:
            raise ConfigError("pass_k, micro_batch_size and overlap_k must be >= 1")
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"rho must be in [0, 1] (got {self.rho})")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError(f"jsd_beta must be in (0, 1) (got {self.jsd_beta})")
        try:
            check_clip_mode(self.clip_mode)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.batch_divide < 1:
            raise ConfigError(f"batch_divide must be >= 1 (got {self.batch_divide})")
        for name, choices in (("train_steps", TrainSteps), ("reveal", RevealScope)):
            if getattr(self, name) not in get_args(choices):
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {list(get_args(choices))}")
        if self.clip_mode != "off" and self.clip <= 0:
            raise ConfigError(f"clip must be > 0 (or clip_mode: off; got {self.clip})")
        if self.vocab_top_k < 0 or self.max_consecutive_skips < 0:
            raise ConfigError("vocab_top_k and max_consecutive_skips must be >= 0")


DOPSDRunConfig = run_config_class("DOPSDRunConfig", DOPSDConfig, "Configuration of a d-OPSD run.")

#: The official d-OPSD code's choices (xingzhejun/d-OPSD at 1b55cf3: d-opsd/d_opsd_trainer.py, utils.py, opsd.yaml,
#: run/*/opsd.sh), where they are options here. ``configs/dopsd_official_*.yaml`` spell them out and
#: docs/methods/dopsd.md tabulates them beside the paper's text and our defaults. Its model and optimiser:
#: ``OFFICIAL_DOPSD_LORA`` and ``OFFICIAL_DOPSD_TRAINING``; for Sudoku also ``OFFICIAL_DOPSD_SUDOKU``.
OFFICIAL_DOPSD: dict = {
    "rho": 0.25, "reveal": "official", "teacher": "fixed", "positions": "teacher", "confidence": "max_logit",
    "kt_reduction": "sum", "divergence": "reverse_kl", "vocab_top_k": 20, "clip": 0.05, "clip_mode": "per_term",
    "train_steps": "official", "batch_divide": 4, "pass_k": 8, "pass_k_mode": "first_accepted",
    "correct_only": True, "rejected": "zero_weight", "student_dropout": True,
}
OFFICIAL_DOPSD_SUDOKU: dict = {"pass_k_mode": "best_of_k", "accept_threshold": 0.25}
#: LoRA r 128, alpha 64, dropout 0.05 (the official code's targets q,k,v,o,gate,up,down match only q, k, v and
#: up in LLaDA's own module names; a converted LLaDA and the built-in presets name all seven)
OFFICIAL_DOPSD_LORA: dict = {"lora_r": 128, "lora_alpha": 64.0, "lora_dropout": 0.05}
OFFICIAL_DOPSD_TRAINING: dict = {"learning_rate": 5e-6, "lr_scheduler_type": "constant_with_warmup",
                                 "warmup_ratio": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.99, "weight_decay": 0.1,
                                 "max_grad_norm": 0.2}
