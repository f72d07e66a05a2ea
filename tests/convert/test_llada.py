"""LLaDA -> LlamaForCausalLM: exact logits against an independent LLaDA forward, names, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dlm_reference import llada_config, llada_forward, llada_state_dict, write_hf_checkpoint, write_word_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlmdistill.convert import ConversionError, convert_llada

ATOL = 1e-4


def make_source(folder: Path, n_shards: int = 2, tokenizer: bool = True, **overrides) -> tuple[dict, dict]:
    cfg = llada_config(**overrides)
    sd = llada_state_dict(cfg)
    write_hf_checkpoint(folder, cfg, sd, n_shards=n_shards)
    if tokenizer:
        write_word_tokenizer(folder, cfg["vocab_size"], {0: "[UNK]", 1: "<s>", 2: "</s>", cfg["mask_token_id"]: "<|mdm_mask|>"})
    return cfg, sd


def load(folder: Path, attn: str = "eager") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[dict, dict, Path]:
    root = tmp_path_factory.mktemp("llada")
    cfg, sd = make_source(root / "src")
    convert_llada(root / "src", root / "dst")
    return cfg, sd, root / "dst"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_reference(converted, attn):
    cfg, sd, dst = converted
    ids = torch.randint(0, cfg["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(1))
    ids[:, 4] = cfg["mask_token_id"]
    with torch.no_grad():
        got = load(dst, attn)(input_ids=ids).logits
        want = llada_forward(sd, cfg, ids)
    assert got.shape == want.shape == (3, 11, cfg["embedding_size"])
    assert (got - want).abs().max().item() < ATOL


def test_config_and_names(converted):
    cfg, sd, dst = converted
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["is_causal"] is False
    assert config["mask_token_id"] == cfg["mask_token_id"] == 58
    assert config["dlm_shift_logits"] is False
    assert config["vocab_size"] == cfg["embedding_size"]  # padded rows kept
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 8
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.layers.1.mlp.gate_proj.weight" in names and "lm_head.weight" in names
    assert not any("transformer" in n for n in names)
    assert len(names) == len(sd)
    shard = dst / index["weight_map"]["model.layers.0.mlp.gate_proj.weight"]
    with safe_open(str(shard), framework="pt") as f:  # ff_proj is the gate, up_proj the up projection
        assert torch.equal(f.get_tensor("model.layers.0.mlp.gate_proj.weight"), sd["model.transformer.blocks.0.ff_proj.weight"])


def test_tokenizer_has_mask_token(converted):
    cfg, _, dst = converted
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.mask_token == "<|mdm_mask|>"
    assert tok.mask_token_id == cfg["mask_token_id"]
    assert tok("w5 <|mdm_mask|>")["input_ids"] == [5, cfg["mask_token_id"]]


def test_bidirectional(converted):
    cfg, _, dst = converted
    model = load(dst, "sdpa")
    ids = torch.randint(3, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = cfg["mask_token_id"]
    with torch.no_grad():
        delta = (model(input_ids=ids).logits[0, 0] - model(input_ids=changed).logits[0, 0]).abs().max()
    assert delta > 1e-3


def test_padding_mask(converted):
    """With an attention_mask, LLaDA masks padded keys and keeps RoPE positions 0..T-1; the converted
    model does the same when given the mask and no position_ids."""
    cfg, sd, dst = converted
    model = load(dst, "sdpa")
    ids = torch.randint(3, cfg["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = llada_forward(sd, cfg, ids, attention_mask=mask)
    assert (got - want).abs().max().item() < ATOL


def test_left_padding_with_positions_matches_unpadded(converted):
    """Given position_ids = cumsum(mask) - 1 as well, left-padded logits equal the unpadded ones."""
    cfg, sd, dst = converted
    model = load(dst, "sdpa")
    ids = torch.randint(3, cfg["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.full((1, 3), 2), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
        want = llada_forward(sd, cfg, ids)
    assert (got - want).abs().max().item() < ATOL


def test_weight_tying_and_single_file(tmp_path):
    cfg, sd = make_source(tmp_path / "src", n_shards=1, tokenizer=False, weight_tying=True)
    convert_llada(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["tie_word_embeddings"] is True
    ids = torch.randint(0, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (load(tmp_path / "dst")(input_ids=ids).logits - llada_forward(sd, cfg, ids)).abs().max() < ATOL


def test_dtype_conversion(tmp_path):
    make_source(tmp_path / "src", tokenizer=False)
    convert_llada(tmp_path / "src", tmp_path / "dst", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.dtype == torch.bfloat16


def test_mask_token_id_override_and_required(tmp_path):
    cfg = llada_config()
    del cfg["mask_token_id"]
    write_hf_checkpoint(tmp_path / "src", cfg, llada_state_dict(cfg))
    with pytest.raises(ConversionError, match="mask_token_id"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    convert_llada(tmp_path / "src", tmp_path / "dst", mask_token_id=57)
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["mask_token_id"] == 57


REFUSED = [
    ("alibi", True),
    ("rope", False),
    ("include_bias", True),
    ("include_qkv_bias", True),
    ("bias_for_layer_norm", True),
    ("layer_norm_type", "default"),
    ("layer_norm_type", "gemma_rms"),
    ("layer_norm_with_affine", False),
    ("activation_type", "swiglu"),
    ("block_type", "sequential"),
    ("attention_layer_norm", True),
    ("input_emb_norm", True),
    ("scale_logits", True),
    ("clip_qkv", 8.0),
    ("block_group_size", 2),
    ("embedding_size", 32),
]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f"{f}={v}" for f, v in REFUSED])
def test_refuses_unsupported_config(tmp_path, field, value):
    cfg = llada_config(**{field: value})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=field):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_refuses_missing_field_default():
    """A field absent from config.json takes LLaDA's ModelConfig default (block_type 'sequential')."""
    from dlmdistill.convert.llada import llada_to_llama_config

    cfg = llada_config()
    del cfg["block_type"]
    with pytest.raises(ConversionError, match="block_type"):
        llada_to_llama_config(cfg)


def test_refuses_mismatched_weights(tmp_path):
    cfg = llada_config()
    sd = llada_state_dict(cfg)
    del sd["model.transformer.blocks.1.up_proj.weight"]
    sd["model.transformer.blocks.0.extra.weight"] = torch.zeros(2)
    write_hf_checkpoint(tmp_path / "src", cfg, sd)
    with pytest.raises(ConversionError, match="unknown LLaDA tensor model.transformer.blocks.0.extra.weight"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    del sd["model.transformer.blocks.0.extra.weight"]
    write_hf_checkpoint(tmp_path / "src", cfg, sd)
    with pytest.raises(ConversionError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    write_hf_checkpoint(tmp_path / "src2", llada_config(d_model=16), llada_state_dict(cfg))
    with pytest.raises(ConversionError, match="shape"):
        convert_llada(tmp_path / "src2", tmp_path / "dst")


def test_refuses_non_empty_destination(tmp_path):
    make_source(tmp_path / "src", tokenizer=False)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
