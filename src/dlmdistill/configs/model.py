"""``ModelConfig``: the backbone and how to load it (building and loading: ``dlmdistill.models.loading``,
which re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import field
from .presets import PRESETS


@dataclass
class ModelConfig:
    name_or_path: str = field("preset:tiny", help="'preset:NAME' (tiny, mini, small, base, smdm-113m, smdm-472m, "
                              "smdm-1028m, smdm-1476m), a local folder, a run folder, or a Hugging Face id")
    tokenizer: str | None = field(None, help="tokenizer path/id; for presets also 'char' (character vocabulary "
                                  "built from the training data) or 'bpe:N' (byte-level BPE of N tokens trained on it)")
    preset_overrides: dict = field(default_factory=dict, help="architecture overrides for a preset, e.g. "
                                   "{num_hidden_layers: 4}")
    max_position_embeddings: int = field(4096, help="context size of a new preset model")
    gguf_file: str | None = field(None, help="GGUF file name inside name_or_path (needs the gguf package)")
    revision: str | None = field(None, help="hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="weights dtype")
    attn_implementation: str | None = field("sdpa", help="'sdpa', 'eager', 'flash_attention_2' or null for the default")
    trust_remote_code: bool = field(False, help="allow remote modeling code (LLaDA/Dream on old transformers); off unless asked")
    mask_token: str | None = field(None, help="mask token string; added to the vocabulary if new. Default: the "
                                   "tokenizer's own mask token, else '<|mdm_mask|>'")
    shift_logits: bool | None = field(None, help="predict token i at position i-1 (Dream style); null = from the checkpoint")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass to save memory")
    load_in_4bit: bool = field(False, help="load the base weights in 4-bit NF4 (bitsandbytes; computing in model.dtype), "
                               "as the official d-OPSD recipe loads LLaDA-8B; LoRA only (model.lora_r > 0), from a "
                               "checkpoint (not a new preset)")
    lora_r: int = field(0, help="LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = field(16.0, help="LoRA alpha")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="module names LoRA adapts ('all-linear' for every linear layer)")

    def validate(self) -> None:
        if self.name_or_path.startswith("preset:") and self.name_or_path[7:] not in PRESETS:
            raise ValueError(f"name_or_path: unknown preset {self.name_or_path[7:]!r}; choose one of {', '.join(PRESETS)}")
        if self.lora_r < 0:
            raise ValueError("lora_r must be >= 0")
        if self.load_in_4bit and self.lora_r == 0:
            raise ValueError("load_in_4bit: 4-bit weights are frozen, so they train only through LoRA adapters: set "
                             "model.lora_r > 0 (e.g. 8), or load_in_4bit false for full fine-tuning")
        if self.load_in_4bit and self.name_or_path.startswith("preset:"):
            raise ValueError("load_in_4bit: a new preset model has no trained weights to quantize; quantize a "
                             "checkpoint (a run's final/ folder, a converted model or a hub id)")
        if self.load_in_4bit and self.gguf_file:
            raise ValueError("load_in_4bit and gguf_file: a GGUF checkpoint is dequantized to train; convert it "
                             "first ('dlmdistill convert ar'), then load the converted folder in 4-bit")
