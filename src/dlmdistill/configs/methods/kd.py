"""Knowledge distillation from an external teacher: logit-level KD, sequence-level KD and the causal-LM SFT
of the teachers (``dlmdistill.methods.kd``, ``seqkd``, ``ar_sft`` are the recipes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...config import field
from ..choices import EPS, KLKind, ModeNormalization, TeacherKind
from ..generation import GenerationConfig
from .run import run_config_class
from .sft import SFTConfig


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
