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

from ..configs.presets import PRESETS


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
