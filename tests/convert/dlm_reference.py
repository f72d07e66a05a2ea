"""Independent plain-torch forward passes of the source architectures, and tiny source checkpoints.

Each ``*_forward`` function reads a state dict in the *source* layout (published parameter names)
and computes the logits as the published remote code does, written from its equations:

* LLaDA (``modeling_llada.py``, ``LLaDALlamaBlock``): RMSNorm in float32 then ``weight * x``; RoPE
  from ``inv_freq = 1/theta**(arange(0, hd, 2)/hd)`` with ``rotate_half`` over the two halves;
  attention without mask, k/v ``repeat_interleave``-d for GQA; ``ff_out(silu(ff_proj(x)) * up_proj(x))``;
  ``ln_f`` then ``transformer.ff_out`` (or ``wte`` when weight tying).
* Dream (``modeling_dream.py``): Qwen2 with q/k/v biases, no o_proj bias, no causal mask; raw
  (unshifted) logits, plus :func:`dream_shift` as ``generation_utils.py`` applies it.
* SMDM (``lit_gpt/diffmodel.py``): fused QKV split per query group ``(q_per_kv, 1, 1)``, RoPE as the
  flash-attn kernel applies it (``x1*cos - x2*sin, x2*cos + x1*sin`` on the halves, cos/sin of shape
  ``(T, hd/2)`` with base 10000, optionally rounded to bfloat16 as SMDM's cache is), xformers SwiGLU
  ``w3(silu(w1 x) * w2 x)`` (or lit-gpt's ``proj(silu(fc_1 x) * fc_2 x)``).

None of this calls transformers, so a converted model agreeing with it is evidence of an exact mapping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def full_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Bidirectional attention. q: (B, H, T, D); k, v: (B, Hkv, T, D); key_mask: (B, T) bool."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


# --------------------------------------------------------------------------------------------
# LLaDA


def llada_rope(x: Tensor, theta: float) -> Tensor:
    """OLMo/LLaDA ``RotaryEmbedding``: x (B, H, T, D)."""
    d, t = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    freqs = torch.einsum("i,j->ij", torch.arange(t, dtype=torch.float), inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x.view(*x.shape[:-1], 2, d // 2).unbind(dim=-2)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * positions.cos() + rotated * positions.sin()


def llada_forward(sd: dict[str, Tensor], cfg: dict, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """LLaDA logits. ``attention_mask`` (B, T) masks keys only, and RoPE positions stay 0..T-1
    (padding included), as ``LLaDAModel.forward`` does."""
    n_heads = cfg["n_heads"]
    n_kv = cfg.get("n_kv_heads") or n_heads
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    hd = cfg["d_model"] // n_heads
    b, t = ids.shape
    x = sd["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms_norm(x, sd[p + "attn_norm.weight"], eps)
        q = (h @ sd[p + "q_proj.weight"].T).view(b, t, n_heads, hd).transpose(1, 2)
        k = (h @ sd[p + "k_proj.weight"].T).view(b, t, n_kv, hd).transpose(1, 2)
        v = (h @ sd[p + "v_proj.weight"].T).view(b, t, n_kv, hd).transpose(1, 2)
        key_mask = None if attention_mask is None else attention_mask.bool()
        att = full_attention(llada_rope(q, theta), llada_rope(k, theta), v, key_mask)
        x = x + att.transpose(1, 2).reshape(b, t, -1) @ sd[p + "attn_out.weight"].T
        h = rms_norm(x, sd[p + "ff_norm.weight"], eps)
        gate = torch.nn.functional.silu(h @ sd[p + "ff_proj.weight"].T)
        x = x + (gate * (h @ sd[p + "up_proj.weight"].T)) @ sd[p + "ff_out.weight"].T
    x = rms_norm(x, sd["model.transformer.ln_f.weight"], eps)
    head = sd["model.transformer.wte.weight"] if cfg.get("weight_tying") else sd["model.transformer.ff_out.weight"]
    return x @ head.T


def llada_config(**overrides) -> dict:
    """A tiny config.json in LLaDA-8B's form (GQA and embedding_size > vocab_size exercised)."""
    cfg = {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": 32,
        "embedding_dropout": 0.0,
        "embedding_size": 64,
        "eos_token_id": 2,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": 58,
        "max_sequence_length": 128,
        "mlp_hidden_size": 48,
        "mlp_ratio": 4,
        "multi_query_attention": None,
        "n_heads": 4,
        "n_kv_heads": 2,
        "n_layers": 2,
        "pad_token_id": 2,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-5,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": 60,
        "weight_tying": False,
    }
    cfg.update(overrides)
    return cfg


def llada_state_dict(cfg: dict, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, n_heads = cfg["d_model"], cfg["n_heads"]
    hd = d // n_heads
    kv = (cfg.get("n_kv_heads") or n_heads) * hd
    f, rows = cfg["mlp_hidden_size"], cfg["embedding_size"]
    sd = {"model.transformer.wte.weight": _randn(g, rows, d, std=1.0),
          "model.transformer.ln_f.weight": _norm_weight(g, d)}
    if not cfg.get("weight_tying"):
        sd["model.transformer.ff_out.weight"] = _randn(g, rows, d)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        sd |= {
            p + "attn_norm.weight": _norm_weight(g, d),
            p + "q_proj.weight": _randn(g, d, d),
            p + "k_proj.weight": _randn(g, kv, d),
            p + "v_proj.weight": _randn(g, kv, d),
            p + "attn_out.weight": _randn(g, d, d),
            p + "ff_norm.weight": _norm_weight(g, d),
            p + "ff_proj.weight": _randn(g, f, d),
            p + "up_proj.weight": _randn(g, f, d),
            p + "ff_out.weight": _randn(g, d, f),
        }
    return sd


# --------------------------------------------------------------------------------------------
# Dream


def dream_rope(x: Tensor, position_ids: Tensor, theta: float) -> Tensor:
    """Qwen2/Dream ``apply_rotary_pos_emb`` with explicit positions. x (B, H, T, D), positions (B, T)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def dream_forward(sd: dict[str, Tensor], cfg: dict, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Raw Dream logits. With ``attention_mask`` (B, T), keys at 0 are masked and positions are
    ``cumsum(mask) - 1`` as Dream's ``generation_utils`` builds them for left padding."""
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    hd = cfg["hidden_size"] // n_heads
    b, t = ids.shape
    if attention_mask is None:
        positions, key_mask = torch.arange(t).expand(b, t), None
    else:
        positions, key_mask = (attention_mask.cumsum(-1) - 1).clamp(min=0), attention_mask.bool()
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)

        def proj(name: str, heads: int) -> Tensor:
            y = h @ sd[p + f"self_attn.{name}.weight"].T + sd[p + f"self_attn.{name}.bias"]
            return y.view(b, t, heads, hd).transpose(1, 2)

        q = dream_rope(proj("q_proj", n_heads), positions, theta)
        k = dream_rope(proj("k_proj", n_kv), positions, theta)
        att = full_attention(q, k, proj("v_proj", n_kv), key_mask)
        x = x + att.transpose(1, 2).reshape(b, t, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, sd["model.norm.weight"], eps)
    head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else sd["lm_head.weight"]
    return x @ head.T


def dream_shift(logits: Tensor) -> Tensor:
    """Dream's sampler: the prediction for token i is the logits at i-1 (position 0 keeps its own)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def dream_config(**overrides) -> dict:
    cfg = {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "mask_token_id": 40,
        "max_position_embeddings": 128,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": 48,
    }
    cfg.update(overrides)
    return cfg


def dream_state_dict(cfg: dict, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * (d // n_heads)
    f, v = cfg["intermediate_size"], cfg["vocab_size"]
    sd = {"model.embed_tokens.weight": _randn(g, v, d, std=1.0), "model.norm.weight": _norm_weight(g, d)}
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = _randn(g, v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": _norm_weight(g, d),
            p + "self_attn.q_proj.weight": _randn(g, d, d),
            p + "self_attn.q_proj.bias": _randn(g, d),
            p + "self_attn.k_proj.weight": _randn(g, kv, d),
            p + "self_attn.k_proj.bias": _randn(g, kv),
            p + "self_attn.v_proj.weight": _randn(g, kv, d),
            p + "self_attn.v_proj.bias": _randn(g, kv),
            p + "self_attn.o_proj.weight": _randn(g, d, d),
            p + "post_attention_layernorm.weight": _norm_weight(g, d),
            p + "mlp.gate_proj.weight": _randn(g, f, d),
            p + "mlp.up_proj.weight": _randn(g, f, d),
            p + "mlp.down_proj.weight": _randn(g, d, f),
        }
    return sd


# --------------------------------------------------------------------------------------------
# SMDM


def smdm_rope(x: Tensor, base: float = 10000.0, cache_dtype: torch.dtype = torch.float32) -> Tensor:
    """lit-gpt ``build_rope_cache`` + flash-attn ``apply_rotary`` (non-interleaved). x (B, T, H, D)."""
    t, d = x.shape[1], x.shape[-1]
    theta = 1.0 / (base ** (torch.arange(0, d, 2) / d))
    idx_theta = torch.outer(torch.arange(t).float(), theta)
    cos = idx_theta.cos().to(cache_dtype).float()[:, None, :]
    sin = idx_theta.sin().to(cache_dtype).float()[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def smdm_forward(sd: dict[str, Tensor], cfg: dict, ids: Tensor, rope_cache_dtype: torch.dtype = torch.float32,
                 mlp_names: tuple[str, str, str] = ("swiglu.w1", "swiglu.w2", "swiglu.w3")) -> Tensor:
    """SMDM ``TransEncoder.forward`` (lm_head has ``padded_vocab_size`` rows: no mask logit)."""
    n_head, n_groups, c = cfg["n_head"], cfg["n_query_groups"], cfg["n_embd"]
    hs, q_per_kv, eps = c // n_head, n_head // n_groups, cfg["norm_eps"]
    w1, w2, w3 = mlp_names
    b, t = ids.shape
    x = sd["transformer.wte.weight"][ids]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        n1 = rms_norm(x, sd[p + "norm_1.weight"], eps)
        qkv = (n1 @ sd[p + "attn.attn.weight"].T).view(b, t, n_groups, q_per_kv + 2, hs)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=-2)
        q = smdm_rope(q.reshape(b, t, -1, hs), cache_dtype=rope_cache_dtype)
        k = smdm_rope(k.reshape(b, t, -1, hs), cache_dtype=rope_cache_dtype)
        v = v.reshape(b, t, -1, hs)
        y = full_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        x = x + y.reshape(b, t, c) @ sd[p + "attn.proj.weight"].T
        n2 = rms_norm(x, sd[p + "norm_2.weight"], eps)
        hidden = torch.nn.functional.silu(n2 @ sd[p + f"mlp.{w1}.weight"].T) * (n2 @ sd[p + f"mlp.{w2}.weight"].T)
        x = x + hidden @ sd[p + f"mlp.{w3}.weight"].T
    return rms_norm(x, sd["transformer.ln_f.weight"], eps) @ sd["lm_head.weight"].T


def smdm_config(**overrides) -> dict:
    """A tiny lit-gpt config in the Diff_LLaMA form, with GQA and a padded vocabulary."""
    cfg = {
        "name": "Diff_LLaMA_tiny",
        "block_size": 64,
        "vocab_size": 50,
        "padding_multiple": 8,
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 32,
        "rotary_percentage": 1.0,
        "parallel_residual": False,
        "bias": False,
        "_norm_class": "FusedRMSNorm",
        "norm_eps": 1e-5,
        "_mlp_class": "LLaMAMLP",
        "intermediate_size": 48,
        "n_query_groups": 2,
    }
    cfg.update(overrides)
    return cfg


def smdm_state_dict(cfg: dict, seed: int = 0, mlp_names: tuple[str, str, str] = ("swiglu.w1", "swiglu.w2", "swiglu.w3")
                    ) -> dict[str, Tensor]:
    """Random weights in TransEncoder's layout; ``cfg`` must give ``padded_vocab_size``."""
    g = torch.Generator().manual_seed(seed)
    c, n_head = cfg["n_embd"], cfg["n_head"]
    hs, f, v = c // n_head, cfg["intermediate_size"], cfg["padded_vocab_size"]
    qkv_rows = (n_head + 2 * cfg["n_query_groups"]) * hs
    w1, w2, w3 = mlp_names
    sd = {"transformer.wte.weight": _randn(g, v + 1, c, std=1.0), "transformer.ln_f.weight": _norm_weight(g, c),
          "lm_head.weight": _randn(g, v, c)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        sd |= {
            p + "norm_1.weight": _norm_weight(g, c),
            p + "attn.attn.weight": _randn(g, qkv_rows, c),
            p + "attn.proj.weight": _randn(g, c, c),
            p + "norm_2.weight": _norm_weight(g, c),
            p + f"mlp.{w1}.weight": _randn(g, f, c),
            p + f"mlp.{w2}.weight": _randn(g, f, c),
            p + f"mlp.{w3}.weight": _randn(g, c, f),
        }
    return sd


# --------------------------------------------------------------------------------------------
# files


def write_hf_checkpoint(folder: Path, config: dict, state_dict: dict[str, Tensor], n_shards: int = 1) -> None:
    """config.json plus ``model.safetensors``, or ``n_shards`` shards and their index, as on the hub."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if n_shards == 1:
        save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state_dict)
    weight_map = {}
    for s in range(n_shards):
        file = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state_dict[n] for n in names[s::n_shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_word_tokenizer(folder: Path, size: int, specials: dict[int, str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``size`` tokens ``w{i}``, with ``specials`` at the given ids."""
    vocab = {f"w{i}": i for i in range(size)}
    for i, token in specials.items():
        del vocab[f"w{i}"]
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], bos_token=specials[1],
                                   eos_token=specials[2])
    fast.save_pretrained(folder)
    return fast


def _randn(g: torch.Generator, *shape: int, std: float = 0.3) -> Tensor:
    return torch.randn(*shape, generator=g) * std


def _norm_weight(g: torch.Generator, n: int) -> Tensor:
    return 1.0 + 0.2 * torch.randn(n, generator=g)
