"""Convert an SMDM checkpoint (lit-gpt ``TransEncoder``, e.g. ``mdm-472M``) into a native ``LlamaForCausalLM``.

SMDM (ML-GSAI/SMDM, "Scaling up Masked Diffusion Models on Text") trains lit-gpt/TinyLlama-style
``Diff_LLaMA_*`` encoders (``lit_gpt/diffmodel.py``): pre-norm blocks with RMSNorm, RoPE over the
whole head, a SwiGLU MLP, no biases, an untied head and full bidirectional attention. The
embedding has ``padded_vocab_size + 1`` rows, the extra row being the mask token
(``mask_token_id = padded_vocab_size`` = 32000 for every ``Diff_LLaMA_*`` config: TinyLlama's
32000-token vocabulary plus the mask); the head has ``padded_vocab_size`` rows (no logit for the
mask). Checkpoints come as ``.safetensors`` state dicts (the released ``mdm_safetensors/*``) or as
lit-gpt/Fabric ``.pth`` files (a state dict, or ``{"model": state_dict, ...}``).

Parameter mapping (``i`` = block index; ``G`` = n_query_groups, ``q = n_head // G``)::

    transformer.wte.weight            [V+1, C]      -> model.embed_tokens.weight
    transformer.h.i.norm_1.weight                   -> model.layers.i.input_layernorm.weight
    transformer.h.i.attn.attn.weight  [(n_head+2G)*hs, C], per group g the rows are
                                      q query heads, then 1 key head, then 1 value head
                                      -> model.layers.i.self_attn.{q,k,v}_proj.weight
                                         (query head g*q + j, key/value head g)
    transformer.h.i.attn.proj.weight                -> model.layers.i.self_attn.o_proj.weight
    transformer.h.i.norm_2.weight                   -> model.layers.i.post_attention_layernorm.weight
    transformer.h.i.mlp.swiglu.w1 | mlp.fc_1        -> model.layers.i.mlp.gate_proj   (silu applied)
    transformer.h.i.mlp.swiglu.w2 | mlp.fc_2        -> model.layers.i.mlp.up_proj
    transformer.h.i.mlp.swiglu.w3 | mlp.proj        -> model.layers.i.mlp.down_proj
    transformer.ln_f.weight                         -> model.norm.weight
    lm_head.weight                    [V, C]        -> lm_head.weight [V+1, C], last row zero

(``swiglu.w1/w2/w3`` are the names of xformers' ``SwiGLU`` used by the published code; ``fc_1``,
``fc_2``, ``proj`` those of lit-gpt's plain ``LLaMAMLP``. Both compute ``w3(silu(w1 x) * w2 x)``.)

The mask logit. A ``LlamaForCausalLM`` has one vocabulary size for embedding and head, so the
head gets one extra row for the mask id and that row is zero: the mask logit is always exactly 0,
and the first ``V`` logits equal SMDM's. SMDM's softmax runs over ``V`` classes only; to reproduce
its probabilities exactly, drop (or set to ``-inf``) the logit at ``mask_token_id`` before the
softmax, as dlmdistill's sampler and losses should for every DLM, since the mask is never a target.
A bias cannot make that row strongly negative (Llama's head has none), hence the choice of zeros.

Numerics. SMDM computes RoPE with base 10000 (its ``build_rope_cache`` never receives a base) and
stores the cos/sin cache in bfloat16 whatever the model dtype; the converted model computes cos/sin
in float32. The two agree exactly up to that bfloat16 rounding of cos/sin (relative 2**-9).

Refused configs (:class:`ConversionError` naming the field): ``parallel_residual``, ``bias``,
``shared_attention_norm``, ``_norm_class`` other than RMSNorm/FusedRMSNorm, ``_mlp_class`` other
than LLaMAMLP, ``rotary_percentage != 1``, ``condense_ratio != 1``, and unknown config names or keys.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import LlamaConfig, LlamaForCausalLM

from .common import (
    ConversionError,
    Remap,
    Shard,
    expected_parameters,
    layer_index,
    staged_destination,
    safetensors_file,
    save_config,
    save_tokenizer,
    state_dict_shard,
    storage_dtype,
    validate_mapping,
    write_weights,
)

log = logging.getLogger(__name__)

# Defaults of lit-gpt's ``Config`` dataclass in SMDM's lit_gpt/config.py.
LIT_GPT_DEFAULTS: dict = {
    "org": "Lightning-AI",
    "name": "lit-GPT",
    "block_size": 4096,
    "vocab_size": 50254,
    "padding_multiple": 512,
    "padded_vocab_size": None,
    "n_layer": 16,
    "n_head": 32,
    "n_embd": 4096,
    "rotary_percentage": 0.25,
    "parallel_residual": True,
    "bias": True,
    "n_query_groups": None,
    "shared_attention_norm": False,
    "_norm_class": "LayerNorm",
    "norm_eps": 1e-5,
    "_mlp_class": "GptNeoxMLP",
    "intermediate_size": None,
    "condense_ratio": 1,
}

_DIFF_LLAMA_COMMON = {
    "block_size": 2048,
    "vocab_size": 32000,
    "padding_multiple": 64,
    "rotary_percentage": 1.0,
    "parallel_residual": False,
    "bias": False,
    "_norm_class": "FusedRMSNorm",
    "norm_eps": 1e-5,
    "_mlp_class": "LLaMAMLP",
}

# SMDM's ``Diff_LLaMA`` list: size -> (n_layer, n_head, n_embd, intermediate_size, n_query_groups).
_DIFF_LLAMA_SHAPES = {
    "6M": (6, 4, 256, 1024, 4),
    "19M": (8, 6, 384, 1536, 6),
    "34M": (8, 8, 512, 2048, 8),
    "48M": (9, 9, 576, 2304, 9),
    "66M": (10, 10, 640, 2560, 10),
    "85M": (13, 10, 640, 2560, 10),
    "75M": (16, 8, 640, 1600, 8),
    "113M": (12, 12, 768, 3072, 12),
    "142M": (15, 12, 768, 3072, 12),
    "170M": (18, 12, 768, 3072, 12),
    "180M": (14, 14, 896, 3584, 14),
    "206M": (16, 14, 896, 3584, 14),
    "231M": (18, 14, 896, 3584, 14),
    "268M": (16, 16, 1024, 4096, 16),
    "302M": (18, 16, 1024, 4096, 16),
    "336M": (20, 16, 1024, 4096, 16),
    "472M": (18, 10, 1280, 5120, 10),
    "551M": (21, 10, 1280, 5120, 10),
    "571M": (18, 11, 1408, 5632, 11),
    "629M": (24, 10, 1280, 5120, 10),
    "666M": (21, 11, 1408, 5632, 11),
    "717M": (19, 12, 1536, 6144, 12),
    "761M": (24, 11, 1408, 5632, 11),
    "831M": (22, 12, 1536, 6144, 12),
    "944M": (25, 12, 1536, 6144, 12),
    "1028M": (20, 14, 1792, 7168, 14),
    "1233M": (24, 14, 1792, 7168, 14),
    "1476M": (22, 16, 2048, 8192, 16),
    "1678M": (25, 16, 2048, 8192, 16),
    "2121M": (28, 17, 2176, 8704, 17),
}

SMDM_CONFIGS: dict[str, dict] = {
    f"Diff_LLaMA_{size}": {
        **_DIFF_LLAMA_COMMON,
        "name": f"Diff_LLaMA_{size}",
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "intermediate_size": intermediate_size,
        "n_query_groups": n_query_groups,
    }
    for size, (n_layer, n_head, n_embd, intermediate_size, n_query_groups) in _DIFF_LLAMA_SHAPES.items()
}
"""SMDM's named model configs (lit_gpt/config.py), as lit-gpt ``Config`` keyword arguments."""

# (field, value LlamaForCausalLM reproduces, why another value is refused)
_REQUIRED_VALUES = (
    ("parallel_residual", False, "Llama blocks are sequential"),
    ("bias", False, "the converted Llama has no biases"),
    ("shared_attention_norm", False, "Llama has separate attention and MLP norms"),
    ("_mlp_class", "LLaMAMLP", "the Llama MLP is SwiGLU"),
    ("rotary_percentage", 1.0, "Llama rotates the whole head"),
    ("condense_ratio", 1, "condensed RoPE positions are not reproduced"),
)

_MLP_NAMES = {
    "mlp.swiglu.w1.weight": "mlp.gate_proj.weight",
    "mlp.swiglu.w2.weight": "mlp.up_proj.weight",
    "mlp.swiglu.w3.weight": "mlp.down_proj.weight",
    "mlp.fc_1.weight": "mlp.gate_proj.weight",
    "mlp.fc_2.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}

_BLOCK_NAMES = {
    "norm_1.weight": "input_layernorm.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    **_MLP_NAMES,
}

SMDM_ROPE_BASE = 10000.0


def resolve_smdm_config(config: str | dict) -> dict:
    """The full lit-gpt config: a name from :data:`SMDM_CONFIGS`, or keyword arguments of lit-gpt's
    ``Config`` (missing keys take its defaults; ``padded_vocab_size`` and ``n_query_groups`` are
    derived as lit-gpt does). Unknown names or keys are a :class:`ConversionError`."""
    if isinstance(config, str):
        if config not in SMDM_CONFIGS:
            raise ConversionError(f"unknown SMDM config {config!r}; known: {', '.join(SMDM_CONFIGS)}")
        config = SMDM_CONFIGS[config]
    unknown = sorted(set(config) - set(LIT_GPT_DEFAULTS))
    if unknown:
        raise ConversionError(f"unknown SMDM config keys: {', '.join(unknown)}")
    cfg = {**LIT_GPT_DEFAULTS, **config}
    if cfg["padded_vocab_size"] is None:
        multiple = cfg["padding_multiple"]
        cfg["padded_vocab_size"] = math.ceil(cfg["vocab_size"] / multiple) * multiple
    if cfg["n_query_groups"] is None:
        cfg["n_query_groups"] = cfg["n_head"]
    return cfg


def smdm_to_llama_config(cfg: dict) -> LlamaConfig:
    """Build the ``LlamaConfig`` equivalent to a resolved SMDM config (see the module docstring)."""
    for field, allowed, why in _REQUIRED_VALUES:
        if cfg[field] != allowed:
            raise ConversionError(f"SMDM config {field}={cfg[field]!r} is not supported ({why}); need {allowed!r}")
    if cfg["_norm_class"] not in ("RMSNorm", "FusedRMSNorm"):
        raise ConversionError(f"SMDM config _norm_class={cfg['_norm_class']!r} is not supported; need RMSNorm")
    if cfg["intermediate_size"] is None:
        raise ConversionError("SMDM config needs intermediate_size for LLaMAMLP")
    n_embd, n_head, n_groups = cfg["n_embd"], cfg["n_head"], cfg["n_query_groups"]
    if n_embd % n_head or n_head % n_groups:
        raise ConversionError(f"SMDM config n_embd={n_embd}, n_head={n_head}, n_query_groups={n_groups} do not divide")
    return LlamaConfig(
        vocab_size=cfg["padded_vocab_size"] + 1,
        hidden_size=n_embd,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["n_layer"],
        num_attention_heads=n_head,
        num_key_value_heads=n_groups,
        head_dim=n_embd // n_head,
        hidden_act="silu",
        max_position_embeddings=cfg["block_size"],
        rms_norm_eps=cfg["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": SMDM_ROPE_BASE},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        use_cache=False,
        is_causal=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def split_qkv(weight: torch.Tensor, n_head: int, n_query_groups: int, head_size: int) -> tuple[torch.Tensor, ...]:
    """Split lit-gpt's fused, group-interleaved QKV weight into separate q, k, v weights.

    lit-gpt lays out the output rows as ``n_query_groups`` blocks of ``(q_per_kv + 2) * head_size``
    rows: the group's query heads, then its key head, then its value head. Query head ``j`` of
    group ``g`` becomes head ``g * q_per_kv + j``, and that head attends with key/value head ``g``,
    which is exactly how Hugging Face's ``repeat_kv`` pairs them.
    """
    q_per_kv = n_head // n_query_groups
    rows = (n_head + 2 * n_query_groups) * head_size
    if weight.dim() != 2 or weight.shape[0] != rows:
        raise ConversionError(f"fused QKV weight has shape {tuple(weight.shape)}, expected ({rows}, n_embd)")
    grouped = weight.view(n_query_groups, q_per_kv + 2, head_size, weight.shape[1])
    q = grouped[:, :q_per_kv].reshape(n_head * head_size, -1)
    k = grouped[:, q_per_kv].reshape(n_query_groups * head_size, -1)
    v = grouped[:, q_per_kv + 1].reshape(n_query_groups * head_size, -1)
    return q.clone(), k.clone(), v.clone()


def smdm_remap(cfg: dict) -> Remap:
    """The name mapping of the module docstring for a resolved SMDM config."""
    n_head, n_groups = cfg["n_head"], cfg["n_query_groups"]
    head_size = cfg["n_embd"] // n_head

    def remap(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name == "transformer.wte.weight":
            return {"model.embed_tokens.weight": tensor}
        if name == "transformer.ln_f.weight":
            return {"model.norm.weight": tensor}
        if name == "lm_head.weight":  # one zero row: the mask token's logit (see module docstring)
            return {"lm_head.weight": torch.cat([tensor, tensor.new_zeros(1, tensor.shape[1])])}
        split = layer_index(name, "transformer.h.")
        if split is not None:
            i, rest = split
            prefix = f"model.layers.{i}."
            if rest == "attn.attn.weight":
                q, k, v = split_qkv(tensor, n_head, n_groups, head_size)
                return {prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                        prefix + "self_attn.v_proj.weight": v}
            if rest in _BLOCK_NAMES:
                return {prefix + _BLOCK_NAMES[rest]: tensor}
        raise ConversionError(f"unknown SMDM tensor {name}")

    return remap


def _torch_load_reason(exc: BaseException) -> str:
    """The informative part of a ``torch.load`` error, on one line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return text[:300] or type(exc).__name__


def load_smdm_checkpoint(path: Path) -> Shard:
    """Open an SMDM checkpoint: ``.safetensors`` (streamed), or ``.pth``/``.pt`` loaded with
    ``torch.load(weights_only=True, mmap=True)``; a Fabric checkpoint's ``"model"`` entry is used."""
    if not path.is_file():
        raise ConversionError(f"{path} not found" if not path.exists() else f"{path} is a folder, not a checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return safetensors_file(path)
        except SafetensorError as e:
            raise ConversionError(f"{path} is not a valid safetensors checkpoint ({e})") from None
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # a checkpoint in torch's legacy (non-zip) format cannot be memory-mapped: read it whole
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load of arbitrary bytes raises many types (IndexError, ...)
        raise ConversionError(f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
                              f"({_torch_load_reason(e)})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"{path} does not hold a state dict")
    return state_dict_shard(path, checkpoint)


def convert_smdm(src_pth: str | Path, dst: str | Path, config_name: str | dict = "Diff_LLaMA_472M", *,
                 tokenizer: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Convert the SMDM checkpoint file ``src_pth`` into a native ``LlamaForCausalLM`` folder ``dst``.

    ``config_name`` is one of :data:`SMDM_CONFIGS` (``"Diff_LLaMA_472M"``, ...) or a dict of
    lit-gpt ``Config`` fields. SMDM checkpoints carry no tokenizer: pass ``tokenizer``, a local
    folder with SMDM's tokenizer (TinyLlama's), to save it alongside with ``<|mdm_mask|>`` added
    at the mask id; its bos/eos/pad ids then go into the config. ``dtype`` converts the weights
    (default: keep the stored dtype). The result has ``is_causal=False``,
    ``mask_token_id = padded_vocab_size`` (32000) and ``dlm_shift_logits=False``. Returns ``dst``.
    Raises :class:`ConversionError` (before writing anything) for unsupported configs or weights
    that do not match the config.
    """
    src_pth, dst = Path(src_pth), Path(dst)
    cfg = resolve_smdm_config(config_name)
    config = smdm_to_llama_config(cfg)
    mask_id = cfg["padded_vocab_size"]
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ConversionError(f"tokenizer folder {tokenizer} not found")
    shard = load_smdm_checkpoint(src_pth)
    remap = smdm_remap(cfg)
    validate_mapping([shard], remap, expected_parameters(LlamaForCausalLM, config))
    out_dtype = storage_dtype([shard], "transformer.wte.weight", dtype)

    with staged_destination(src_pth.parent, dst) as out:
        if tokenizer is not None:
            tok = save_tokenizer(Path(tokenizer), out, mask_id, fallback_class="LlamaTokenizer")
            if tok is None:
                raise ConversionError(f"no tokenizer files in {tokenizer}")
            config.bos_token_id, config.eos_token_id, config.pad_token_id = (
                tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        write_weights([shard], remap, out, dtype)
        save_config(config, out, architecture="LlamaForCausalLM", mask_token_id=mask_id,
                    shift_logits=False, dtype=out_dtype)
    return dst
