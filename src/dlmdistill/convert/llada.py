"""Convert a LLaDA checkpoint (``GSAI-ML/LLaDA-8B-*`` layout) into a native ``LlamaForCausalLM``.

LLaDA ships as remote code (``modeling_llada.py``, an OLMo derivative) whose ``LLaDALlamaBlock`` is
a Llama block with other names: RMSNorm, RoPE over the whole head, SwiGLU with ``ff_proj`` as the
gate (``ff_out(act(ff_proj(x)) * up_proj(x))``, ``activation_type="silu"``), no biases, and
attention without a causal mask. The converted folder is a ``LlamaForCausalLM`` with
``is_causal=False`` whose logits equal LLaDA's (``mask_token_id`` from LLaDA's config, 126336 for
LLaDA-8B; ``dlm_shift_logits=False``: the logits at position i predict token i).

Parameter mapping (``i`` = block index)::

    model.transformer.wte.weight              -> model.embed_tokens.weight
    model.transformer.blocks.i.attn_norm      -> model.layers.i.input_layernorm
    model.transformer.blocks.i.q_proj         -> model.layers.i.self_attn.q_proj
    model.transformer.blocks.i.k_proj         -> model.layers.i.self_attn.k_proj
    model.transformer.blocks.i.v_proj         -> model.layers.i.self_attn.v_proj
    model.transformer.blocks.i.attn_out       -> model.layers.i.self_attn.o_proj
    model.transformer.blocks.i.ff_norm        -> model.layers.i.post_attention_layernorm
    model.transformer.blocks.i.ff_proj        -> model.layers.i.mlp.gate_proj
    model.transformer.blocks.i.up_proj        -> model.layers.i.mlp.up_proj
    model.transformer.blocks.i.ff_out         -> model.layers.i.mlp.down_proj
    model.transformer.ln_f.weight             -> model.norm.weight
    model.transformer.ff_out.weight           -> lm_head.weight   (absent when weight_tying)

Config mapping (LLaDA field -> ``LlamaConfig`` field; a field absent from ``config.json`` takes
LLaDA's own ``ModelConfig`` default, exactly as the remote code would)::

    d_model                              -> hidden_size
    n_heads                              -> num_attention_heads (head_dim = d_model // n_heads)
    n_kv_heads / multi_query_attention   -> num_key_value_heads (LLaDA's effective_n_kv_heads)
    n_layers                             -> num_hidden_layers
    mlp_hidden_size or mlp_ratio*d_model -> intermediate_size
    embedding_size or vocab_size         -> vocab_size (all embedding rows are kept)
    rope_theta                           -> rope_parameters = {rope_type: default, rope_theta}
    rms_norm_eps                         -> rms_norm_eps
    max_sequence_length                  -> max_position_embeddings
    weight_tying                         -> tie_word_embeddings
    eos/pad/bos_token_id                 -> same (when present)
    mask_token_id                        -> mask_token_id (required)

Refused (:class:`ConversionError` naming the field), because ``LlamaForCausalLM`` cannot reproduce
them exactly: ``block_type`` other than ``llama``, ``activation_type`` other than ``silu``,
``layer_norm_type`` other than ``rms``, ``layer_norm_with_affine=False``, ``alibi``, ``rope=False``,
``attention_layer_norm`` (QK norm), ``include_bias``, ``include_qkv_bias``, ``bias_for_layer_norm``,
``input_emb_norm``, ``scale_logits``, ``clip_qkv``, ``block_group_size != 1``,
``embedding_size < vocab_size``. Ignored because they do not change the forward pass at inference:
dropouts, ``flash_attention``, ``init_*``, ``precision``, ``rope_full_precision`` (RoPE in float32
vs. the activation dtype: identical in float32, rounding-level differences in bfloat16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .common import (
    ConversionError,
    convert_folder,
    layer_index,
    read_json,
)

# Defaults of LLaDA's ``ModelConfig`` (configuration_llada.py) for the fields read here, plus OLMo's
# ``clip_qkv``, which LLaDA lacks: a config that sets it comes from another OLMo derivative.
LLADA_DEFAULTS: dict = {
    "d_model": 768,
    "n_heads": 12,
    "n_kv_heads": None,
    "n_layers": 12,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "activation_type": "swiglu",
    "block_type": "sequential",
    "block_group_size": 1,
    "alibi": False,
    "rope": False,
    "rope_theta": 10000.0,
    "multi_query_attention": None,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "layer_norm_type": "default",
    "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-5,
    "max_sequence_length": 1024,
    "include_qkv_bias": False,
    "include_bias": False,
    "bias_for_layer_norm": None,
    "scale_logits": False,
    "clip_qkv": None,
    "vocab_size": 50257,
    "embedding_size": 50304,
    "weight_tying": True,
}

# (field, value LlamaForCausalLM reproduces, why another value is refused)
_REQUIRED_VALUES = (
    ("block_type", "llama", "only LLaDALlamaBlock maps onto a Llama decoder layer"),
    ("activation_type", "silu", "the Llama MLP computes silu(gate) * up"),
    ("layer_norm_type", "rms", "Llama uses RMSNorm"),
    ("layer_norm_with_affine", True, "Llama's RMSNorm has a weight"),
    ("alibi", False, "ALiBi position biases have no Llama equivalent"),
    ("rope", True, "Llama always applies RoPE"),
    ("attention_layer_norm", False, "QK layer norms have no Llama equivalent"),
    ("include_bias", False, "Llama's linear layers and norms have no biases here"),
    ("include_qkv_bias", False, "the converted Llama has no q/k/v biases"),
    ("input_emb_norm", False, "Llama does not scale the input embeddings"),
    ("scale_logits", False, "Llama does not scale the logits"),
    ("clip_qkv", None, "Llama does not clip q/k/v"),
    ("block_group_size", 1, "grouped blocks use other parameter names"),
)

_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}

_GLOBAL_NAMES = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}

_BLOCK_PREFIX = "model.transformer.blocks."


def llada_to_llama_config(source: dict) -> LlamaConfig:
    """Build the ``LlamaConfig`` equivalent to a LLaDA ``config.json`` (see the module docstring).

    Raises :class:`ConversionError` for a feature the mapping does not cover.
    """
    cfg = {**LLADA_DEFAULTS, **source}
    for field, allowed, why in _REQUIRED_VALUES:
        if cfg[field] != allowed:
            raise ConversionError(f"LLaDA config {field}={cfg[field]!r} is not supported ({why}); need {allowed!r}")
    if cfg["bias_for_layer_norm"]:
        raise ConversionError("LLaDA config bias_for_layer_norm=True is not supported (Llama's RMSNorm has no bias)")

    d_model, n_heads = cfg["d_model"], cfg["n_heads"]
    if d_model % n_heads:
        raise ConversionError(f"LLaDA config d_model={d_model} is not divisible by n_heads={n_heads}")
    embedding_size = cfg["embedding_size"] or cfg["vocab_size"]
    if embedding_size < cfg["vocab_size"]:
        raise ConversionError(
            f"LLaDA config embedding_size={embedding_size} is smaller than vocab_size={cfg['vocab_size']}"
        )
    return LlamaConfig(
        vocab_size=embedding_size,
        hidden_size=d_model,
        intermediate_size=cfg["mlp_hidden_size"] or cfg["mlp_ratio"] * d_model,
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=_effective_n_kv_heads(cfg),
        head_dim=d_model // n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg["max_sequence_length"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=bool(cfg["weight_tying"]),
        use_cache=False,
        is_causal=False,
        bos_token_id=source.get("bos_token_id"),
        eos_token_id=source.get("eos_token_id"),
        pad_token_id=source.get("pad_token_id"),
    )


def llada_mask_token_id(source: dict, override: int | None = None) -> int:
    """The mask id: ``override`` if given, else the config's ``mask_token_id`` (126336 in LLaDA-8B).

    LLaDA's ``ModelConfig`` default (50256, GPT-2's EOS) is never used: a config without
    ``mask_token_id`` is a :class:`ConversionError` unless ``override`` is given.
    """
    if override is not None:
        return override
    if source.get("mask_token_id") is None:
        raise ConversionError("LLaDA config has no mask_token_id; pass mask_token_id explicitly")
    return int(source["mask_token_id"])


def _effective_n_kv_heads(cfg: dict) -> int:
    """LLaDA's ``ModelConfig.effective_n_kv_heads``: ``n_kv_heads``, or 1 / ``n_heads`` from
    ``multi_query_attention``; setting both inconsistently is an error there and here."""
    n_kv, mqa, n_heads = cfg["n_kv_heads"], cfg["multi_query_attention"], cfg["n_heads"]
    if n_kv is None:
        return 1 if mqa else n_heads
    if mqa is not None and n_kv != (1 if mqa else n_heads):
        raise ConversionError(f"LLaDA config sets both n_kv_heads={n_kv} and multi_query_attention={mqa}")
    return n_kv


def llada_remap(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Map one LLaDA tensor to its Llama name (see the module docstring)."""
    if name in _GLOBAL_NAMES:
        return {_GLOBAL_NAMES[name]: tensor}
    split = layer_index(name, _BLOCK_PREFIX)
    if split is not None and split[1] in _BLOCK_NAMES:
        return {f"model.layers.{split[0]}.{_BLOCK_NAMES[split[1]]}": tensor}
    raise ConversionError(f"unknown LLaDA tensor {name}")


def convert_llada(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, *,
                  mask_token_id: int | None = None) -> Path:
    """Convert the LLaDA checkpoint folder ``src`` into a native ``LlamaForCausalLM`` folder ``dst``.

    ``src`` holds LLaDA's ``config.json`` and ``model.safetensors`` (or shards with their index),
    and optionally its tokenizer files. ``dst`` must be empty or absent. ``dtype`` converts the
    weights (default: keep the stored dtype). ``mask_token_id`` overrides the config's.

    Tensors are streamed one source shard at a time (peak memory about one shard). Returns ``dst``.
    Raises :class:`ConversionError` if the config uses a feature the mapping cannot reproduce or the
    weights do not match the config; nothing is written in that case.
    """
    src, dst = Path(src), Path(dst)
    source = read_json(src / "config.json")
    return convert_folder(src, dst, config=llada_to_llama_config(source), model_class=LlamaForCausalLM,
                          mask_id=llada_mask_token_id(source, mask_token_id), remap=llada_remap,
                          embedding_name="model.transformer.wte.weight", shift_logits=False, dtype=dtype)
