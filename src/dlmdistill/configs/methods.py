"""The configurations of the training recipes: each method's own section (``SFTConfig``, ...), the
evaluation section every recipe shares, and each method's run configuration (``SFTRunConfig``, ...:
sections ``model``, ``data``, ``training``, ``eval``, ``method``). The recipes (``dlmdistill.methods.*``)
re-export them; ``dlmdistill.methods.config_class(name)`` returns a method's run configuration without
importing its recipe (which imports torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from ..config import ConfigError, field
from .choices import (EPS, DirectionRule, DistillPositions, DivergenceKind, KLKind, ModeNormalization,
                      RevealScope, TeacherKind, TrainSteps, check_clip_mode)
from .data import DataConfig
from .generation import GenerationConfig
from .model import ModelConfig
from .training import TrainingConfig


# -------------------------------------------------------------------------------------------- shared sections
#: What a run does when its task has no evaluation data of its own and ``data.eval_source`` is not set.
WHEN_EVAL_MISSING = ("holdout", "skip", "error")


@dataclass
class TrainEvalConfig:
    enabled: bool = field(True, help="evaluate the task metric during/after training")
    limit: int | None = field(200, help="evaluation items (a subset of data.eval_*)")
    seed: int = field(0, help="sampling seed for evaluation")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(gen_length=64, steps=32),
                                         help="sampler settings used for evaluation during training")
    when_missing: Literal["holdout", "skip", "error"] = field(
        "holdout", help="when data.eval_source is not set and the task has no evaluation data of its own (the "
        "instruct task: your own file): 'holdout' evaluates on a random slice of the training records, which are "
        "then not trained on (holdout_size; the log and data_stats.json give the sizes), 'skip' trains without "
        "evaluation (one notice), 'error' stops")
    holdout_size: float = field(0.1, help="size of that held-out slice: a fraction of the training records "
                                "(below 1) or a number of records (1 or more); at most eval.limit records")

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or null), got {self.limit}")
        if self.when_missing not in WHEN_EVAL_MISSING:
            raise ValueError(f"when_missing must be one of {', '.join(WHEN_EVAL_MISSING)}, got {self.when_missing!r}")
        size = self.holdout_size
        if not (0 < size < 1 or (size >= 1 and float(size).is_integer())):
            raise ValueError(f"holdout_size must be a fraction in (0, 1) or a whole number of records >= 1, "
                             f"got {size}")


def run_config_class(name: str, method_cls: type, doc: str = "") -> type:
    """The configuration tree of a recipe: model, data, training, eval and the method's own section."""
    cls = dataclasses.make_dataclass(name, [
        ("model", ModelConfig, field(default_factory=ModelConfig, help="backbone and how to load it")),
        ("data", DataConfig, field(default_factory=DataConfig, help="task and data")),
        ("training", TrainingConfig, field(default_factory=TrainingConfig, help="optimisation, logging, checkpoints")),
        ("eval", TrainEvalConfig, field(default_factory=TrainEvalConfig, help="evaluation during training")),
        ("method", method_cls, field(default_factory=method_cls, help=f"{method_cls.__name__} options")),
    ])
    cls.__doc__ = doc or f"Configuration of a {name} run."
    return cls


# -------------------------------------------------------------------------------------------- sft
@dataclass
class SFTConfig:
    normalization: Literal["token", "sequence"] = field("token", help="'token': sum / response tokens in the batch "
                                                        "(SMDM); 'sequence': per-sample mean, then batch mean (LLaDA)")
    cfg_prob: float = field(0.0, help="probability of masking the whole prompt (classifier-free guidance training)")
    eps: float = field(EPS, help="minimum masking probability: p_mask = (1 - eps) t + eps")


SFTRunConfig = run_config_class("SFTRunConfig", SFTConfig, "Configuration of a masked-diffusion SFT run.")


# -------------------------------------------------------------------------------------------- selffusion
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


# -------------------------------------------------------------------------------------------- kd
@dataclass
class KDConfig:
    teacher: str = field("", help="the teacher: a run folder, a model folder or a hub id (required)")
    teacher_type: TeacherKind = field("auto", help="'dlm' (sees the student's noisy input), 'ar' (next-token "
                                      "distribution from the clean prefix) or 'auto' (detect from the checkpoint)")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="teacher weights dtype")
    kd_weight: float = field(1.0, help="weight of the KD term")
    ce_weight: float = field(1.0, help="weight of the masked-diffusion cross-entropy on the ground truth")
    temperature: float = field(1.0, help="KD temperature T (the loss is scaled by T^2)")
    divergence: KLKind = field("forward_kl", help="'forward_kl': KL(teacher || student); 'reverse_kl': "
                               "KL(student || teacher) (renamed from 'forward' / 'reverse', the names d-OPSD uses)")
    normalization: ModeNormalization = field("token", help="L_diff normalisation: 'token' (SMDM SFT, as the "
                                             "sft method), 'sequence' (LLaDA) or 'masked' (SelfFusion eq. 3)")
    eps: float = field(EPS, help="minimum masking probability: p_mask = (1 - eps) t + eps")
    ar_skip_eos_padding: bool = field(True, help="AR teacher: no KD at the EOS padding after the response's first "
                                      "EOS (the teacher never continued past an EOS in training)")

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("method.teacher is required (a run folder, model folder or hub id)")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.kd_weight < 0 or self.ce_weight < 0:
            raise ValueError("kd_weight and ce_weight must be >= 0")


KDRunConfig = run_config_class("KDRunConfig", KDConfig, "Configuration of a logit-level KD run (DLM student).")


# -------------------------------------------------------------------------------------------- seqkd
@dataclass
class SeqKDConfig:
    teacher: str = field("", help="the teacher: a run folder, a model folder or a hub id (required)")
    teacher_type: TeacherKind = field("auto", help="'dlm', 'ar' or 'auto' (detect from the checkpoint)")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="teacher weights dtype")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(gen_length=128, steps=64),
                                         help="teacher sampling: gen_length new tokens; steps/block_length/"
                                         "remasking for a DLM teacher (paper: 64 steps); temperature (0 = greedy)")
    seed: int = field(0, help="sampling seed of the teacher (each chunk of prompts uses seed + chunk index)")
    chunk_size: int = field(256, help="prompts generated between two appends to the data file")
    sft: SFTConfig = field(default_factory=SFTConfig, help="options of the SFT stage")

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("method.teacher is required (a run folder, model folder or hub id)")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")


SeqKDRunConfig = run_config_class("SeqKDRunConfig", SeqKDConfig,
                                  "Configuration of a sequence-level KD run (SFT on teacher responses).")


# -------------------------------------------------------------------------------------------- ar-sft
@dataclass
class ARSFTConfig:
    normalization: Literal["token", "sequence"] = field("token", help="'token': mean over the response tokens of "
                                                        "the batch; 'sequence': per-sample mean, then batch mean")


ARSFTRunConfig = run_config_class("ARSFTRunConfig", ARSFTConfig,
                                  "Configuration of causal-LM SFT of an autoregressive model.")


# -------------------------------------------------------------------------------------------- dopsd
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


# -------------------------------------------------------------------------------------------- diffu-grpo
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
