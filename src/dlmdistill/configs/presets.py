"""The built-in backbone presets as declarations: the architecture of each ``preset:NAME`` (the vocabulary
size comes from the tokenizer). ``dlmdistill.models.presets`` builds them into transformers configs."""

from __future__ import annotations

from typing import Any

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
