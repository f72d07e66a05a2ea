"""Built-in backbone presets: transformers Llama configs with bidirectional attention.

A DLM needs no hand-written model: ``LlamaConfig(..., is_causal=False)`` attends bidirectionally
(transformers builds the mask through ``create_causal_mask``), survives save/load and works with
sdpa, eager and padding masks. The presets span a CPU-friendly ~0.5M model to the SMDM 472M shape
(Diff_LLaMA_472M: 18 layers, 10 heads, hidden 1280, FFN 5120, RoPE base 10000, RMSNorm eps 1e-5,
SwiGLU, untied head). The vocabulary size comes from the tokenizer.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

#: name -> architecture (vocab size excluded)
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.5M parameters with a character vocabulary: the CPU sweet spot for generated tasks
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    # ~1.6M
    "mini": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=6),
    # ~6M
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8),
    # ~25M (+ embeddings)
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
    # SMDM shapes (Nie et al. 2025a); vocab 32000 + mask id 32000 with the TinyLlama tokenizer
    "smdm-113m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "smdm-472m": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=18, num_attention_heads=10),
    "smdm-1028m": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=20, num_attention_heads=16),
    "smdm-1476m": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=16),
}


def preset_config(name: str, vocab_size: int, *, mask_token_id: int, pad_token_id: int | None = None,
                  bos_token_id: int | None = None, eos_token_id: int | None = None,
                  max_position_embeddings: int = 4096, overrides: dict[str, Any] | None = None) -> LlamaConfig:
    """A bidirectional ``LlamaConfig`` for preset ``name`` (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    arch = dict(PRESETS[name])
    arch.update(overrides or {})
    arch.setdefault("num_key_value_heads", arch["num_attention_heads"])
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        is_causal=False,
        **arch,
    )
    config.mask_token_id = mask_token_id
    config.dlm_shift_logits = False
    return config
