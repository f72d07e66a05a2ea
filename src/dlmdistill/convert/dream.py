"""Convert a Dream checkpoint (``Dream-org/Dream-v0-*-7B`` layout) into a native ``Qwen2ForCausalLM``.

Dream is Qwen2.5 trained as a masked diffusion model and ships as remote code
(``modeling_dream.py``): a Qwen2 decoder (RMSNorm, RoPE, SwiGLU, q/k/v biases and no o_proj bias,
grouped-query attention) run without a causal mask. Its parameter names are already Qwen2's, so
the weights are copied unchanged. What differs is how the logits are read: Dream keeps the
autoregressive head alignment, so the token at position i is predicted by the logits at position
i-1 (``generation_utils.py`` shifts ``logits = cat([logits[:, :1], logits[:, :-1]], 1)``). The
converted config says so with ``dlm_shift_logits=True``; the model itself returns Dream's raw,
unshifted logits.

Parameter mapping (identity; ``i`` = layer index)::

    model.embed_tokens.weight                     -> same
    model.layers.i.input_layernorm.weight         -> same
    model.layers.i.self_attn.{q,k,v}_proj.{weight,bias} -> same
    model.layers.i.self_attn.o_proj.weight        -> same
    model.layers.i.post_attention_layernorm.weight -> same
    model.layers.i.mlp.{gate,up,down}_proj.weight -> same
    model.norm.weight                             -> same
    lm_head.weight                                -> same (dropped when tie_word_embeddings)

Config mapping: ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
``num_attention_heads``, ``num_key_value_heads``, ``max_position_embeddings``, ``rms_norm_eps``,
``tie_word_embeddings``, ``attention_dropout`` and the bos/eos/pad ids keep their names;
``rope_theta`` becomes ``rope_parameters = {rope_type: default, rope_theta}``; ``mask_token_id``
(151666 in Dream-7B) is required. Absent fields take the defaults of Dream's ``DreamConfig``.

Refused (:class:`ConversionError` naming the field): ``hidden_act`` other than ``silu``,
``rope_scaling`` other than none/default, ``use_sliding_window=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .common import (
    ConversionError,
    convert_folder,
    Remap,
    read_json,
)

# Defaults of Dream's ``DreamConfig`` (configuration_dream.py) for the fields read here.
DREAM_DEFAULTS: dict = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
}


def dream_to_qwen2_config(source: dict) -> Qwen2Config:
    """Build the ``Qwen2Config`` equivalent to a Dream ``config.json`` (see the module docstring).

    Raises :class:`ConversionError` for a feature the mapping does not cover.
    """
    cfg = {**DREAM_DEFAULTS, **source}
    if cfg["hidden_act"] != "silu":
        raise ConversionError(f"Dream config hidden_act={cfg['hidden_act']!r} is not supported; need 'silu'")
    scaling = cfg["rope_scaling"]
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ConversionError(f"Dream config rope_scaling={scaling!r} is not supported; need none")
    if cfg["use_sliding_window"]:
        raise ConversionError("Dream config use_sliding_window=True is not supported (bidirectional full attention only)")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConversionError("Dream config hidden_size is not divisible by num_attention_heads")
    return Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"] or cfg["num_attention_heads"],
        hidden_act="silu",
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        use_sliding_window=False,
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_dropout=cfg["attention_dropout"],
        use_cache=False,
        is_causal=False,
        bos_token_id=source.get("bos_token_id"),
        eos_token_id=source.get("eos_token_id"),
        pad_token_id=source.get("pad_token_id"),
    )


def dream_mask_token_id(source: dict, override: int | None = None) -> int:
    """The mask id: ``override`` if given, else the config's ``mask_token_id`` (151666 in Dream-7B)."""
    if override is not None:
        return override
    if source.get("mask_token_id") is None:
        raise ConversionError("Dream config has no mask_token_id; pass mask_token_id explicitly")
    return int(source["mask_token_id"])


def dream_remap(tied: bool) -> Remap:
    """The (identity) name mapping; with tied embeddings a stored ``lm_head.weight`` is dropped."""

    def remap(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if tied and name == "lm_head.weight":
            return {}
        return {name: tensor}

    return remap


def convert_dream(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, *,
                  mask_token_id: int | None = None) -> Path:
    """Convert the Dream checkpoint folder ``src`` into a native ``Qwen2ForCausalLM`` folder ``dst``.

    The result has ``is_causal=False``, ``dlm_shift_logits=True`` and Dream's ``mask_token_id``
    (or ``mask_token_id`` if given). ``dtype`` converts the weights (default: keep the stored
    dtype). Dream's remote ``DreamTokenizer`` is replaced by a native class reading the same files
    (``PreTrainedTokenizerFast`` from ``tokenizer.json``, else ``Qwen2Tokenizer`` from
    ``vocab.json``/``merges.txt``). Tensors are streamed one shard at a time. Returns ``dst``.
    Raises :class:`ConversionError` (before writing anything) for unsupported configs or weights
    that do not match the config.
    """
    src, dst = Path(src), Path(dst)
    source = read_json(src / "config.json")
    config = dream_to_qwen2_config(source)
    return convert_folder(src, dst, config=config, model_class=Qwen2ForCausalLM,
                          mask_id=dream_mask_token_id(source, mask_token_id),
                          remap=dream_remap(config.tie_word_embeddings), embedding_name="model.embed_tokens.weight",
                          shift_logits=True, dtype=dtype, new_mask_token="<|mask|>", fallback_class="Qwen2Tokenizer")
