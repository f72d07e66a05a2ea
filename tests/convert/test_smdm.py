"""SMDM (lit-gpt TransEncoder) -> LlamaForCausalLM: fused-QKV split, exact logits, mask row, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dlm_reference import smdm_config, smdm_forward, smdm_state_dict, write_word_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlmdistill.convert import ConversionError, convert_smdm
from dlmdistill.convert.smdm import SMDM_CONFIGS, resolve_smdm_config, split_qkv

ATOL = 1e-4
FC_NAMES = ("fc_1", "fc_2", "proj")

# Non-embedding parameter counts (millions) that SMDM's pretrain/train_mdm.py lists per model size.
SMDM_PUBLISHED_PARAMS = {
    "6M": 6.294784, "19M": 18.880896, "34M": 33.563136, "48M": 47.786688, "66M": 65.54944,
    "85M": 85.21408, "75M": 75.38752, "113M": 113.265408, "142M": 141.581568, "170M": 169.897728,
    "180M": 179.856768, "206M": 205.550464, "231M": 231.24416, "268M": 268.469248, "302M": 302.027776,
    "336M": 335.586304, "472M": 471.90656, "551M": 550.55744, "571M": 571.001728, "629M": 629.20832,
    "666M": 666.168448, "717M": 717.285888, "761M": 761.335168, "831M": 830.541312, "944M": 943.796736,
    "1028M": 1027.677952, "1233M": 1233.213184, "1476M": 1476.487168, "1678M": 1677.826048, "2121M": 2121.39328,
}


def load(folder: Path, attn: str = "eager") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[dict, dict, Path]:
    """A Fabric-style .pth ({"model": state_dict, ...}) with GQA and a padded vocabulary, plus a tokenizer."""
    root = tmp_path_factory.mktemp("smdm")
    cfg = resolve_smdm_config(smdm_config())
    sd = smdm_state_dict(cfg)
    torch.save({"model": sd, "iter_num": 10, "hparams": {"lr": 1e-4}}, root / "iter-000010-ckpt.pth")
    write_word_tokenizer(root / "tok", cfg["padded_vocab_size"], {0: "<unk>", 1: "<s>", 2: "</s>"})
    convert_smdm(root / "iter-000010-ckpt.pth", root / "dst", smdm_config(), tokenizer=root / "tok")
    return cfg, sd, root / "dst"


def test_split_qkv_follows_lit_gpt_group_layout():
    """Rows are labelled (group, slot, dim): slots 0..q-1 are the group's queries, then k, then v."""
    n_head, groups, hs, c = 6, 2, 3, 1
    q_per_kv = n_head // groups
    labels = torch.tensor([[g * 100 + slot * 10 + d] for g in range(groups) for slot in range(q_per_kv + 2)
                           for d in range(hs)], dtype=torch.float)
    q, k, v = split_qkv(labels, n_head, groups, hs)
    assert q.shape == (n_head * hs, c) and k.shape == v.shape == (groups * hs, c)
    expected_q = [g * 100 + j * 10 + d for g in range(groups) for j in range(q_per_kv) for d in range(hs)]
    assert q[:, 0].tolist() == expected_q  # query head g*q_per_kv + j
    assert k[:, 0].tolist() == [g * 100 + q_per_kv * 10 + d for g in range(groups) for d in range(hs)]
    assert v[:, 0].tolist() == [g * 100 + (q_per_kv + 1) * 10 + d for g in range(groups) for d in range(hs)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_reference(converted, attn):
    cfg, sd, dst = converted
    mask_id = cfg["padded_vocab_size"]
    ids = torch.randint(0, cfg["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(1))
    ids[:, ::3] = mask_id
    with torch.no_grad():
        got = load(dst, attn)(input_ids=ids).logits
        want = smdm_forward(sd, cfg, ids)
    assert got.shape == (3, 12, mask_id + 1) and want.shape == (3, 12, mask_id)
    assert (got[..., :mask_id] - want).abs().max().item() < ATOL
    assert torch.all(got[..., mask_id] == 0)  # the padded head row: the mask logit is exactly zero


def test_config_names_and_tokenizer(converted):
    cfg, sd, dst = converted
    mask_id = cfg["padded_vocab_size"]
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["is_causal"] is False and config["dlm_shift_logits"] is False
    assert config["mask_token_id"] == mask_id == 56  # vocab 50 padded to a multiple of 8
    assert config["vocab_size"] == mask_id + 1
    assert config["num_key_value_heads"] == 2 and config["rope_parameters"]["rope_theta"] == 10000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (mask_id + 1, cfg["n_embd"])
        assert torch.equal(f.get_tensor("model.layers.1.mlp.down_proj.weight"), sd["transformer.h.1.mlp.swiglu.w3.weight"])
    assert len(names) == len(sd) + 2 * cfg["n_layer"]  # fused QKV becomes three tensors
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.mask_token == "<|mdm_mask|>" and tok.mask_token_id == mask_id and len(tok) == mask_id + 1


def test_bidirectional(converted):
    cfg, _, dst = converted
    model = load(dst, "sdpa")
    ids = torch.randint(3, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = cfg["padded_vocab_size"]
    with torch.no_grad():
        assert (model(input_ids=ids).logits[0, 0] - model(input_ids=changed).logits[0, 0]).abs().max() > 1e-3


def test_safetensors_source_with_lit_gpt_mlp_names(tmp_path):
    """The released mdm_safetensors/*.safetensors form, with lit-gpt's fc_1/fc_2/proj MLP names and MHA."""
    raw = smdm_config(n_query_groups=4, vocab_size=64, padding_multiple=64)
    cfg = resolve_smdm_config(raw)
    sd = smdm_state_dict(cfg, mlp_names=FC_NAMES)
    save_file(sd, str(tmp_path / "mdm-tiny.safetensors"))
    convert_smdm(tmp_path / "mdm-tiny.safetensors", tmp_path / "dst", raw)
    ids = torch.randint(0, 65, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = load(tmp_path / "dst", "sdpa")(input_ids=ids).logits[..., :64]
        want = smdm_forward(sd, cfg, ids, mlp_names=FC_NAMES)
    assert (got - want).abs().max().item() < ATOL


def test_bf16_rope_cache_gap_is_rounding_level(converted):
    """SMDM rounds its cos/sin cache to bfloat16; the converted model uses float32 cos/sin. Their
    logits differ by no more than that rounding propagates (documented, not a mapping error)."""
    cfg, sd, dst = converted
    ids = torch.randint(0, cfg["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = load(dst)(input_ids=ids).logits[..., : cfg["padded_vocab_size"]]
        bf16_cache = smdm_forward(sd, cfg, ids, rope_cache_dtype=torch.bfloat16)
    gap = (got - bf16_cache).abs().max().item()
    assert 0 < gap < 0.05 * bf16_cache.abs().max().item()


def test_named_configs_match_smdm():
    assert set(SMDM_PUBLISHED_PARAMS) == {name.removeprefix("Diff_LLaMA_") for name in SMDM_CONFIGS}
    for size, millions in SMDM_PUBLISHED_PARAMS.items():
        c = resolve_smdm_config(f"Diff_LLaMA_{size}")
        d, f, L = c["n_embd"], c["intermediate_size"], c["n_layer"]
        kv = c["n_query_groups"] * d // c["n_head"]
        per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
        assert L * per_layer + d == round(millions * 1e6), size
    c472 = resolve_smdm_config("Diff_LLaMA_472M")
    assert (c472["n_layer"], c472["n_head"], c472["n_embd"], c472["intermediate_size"], c472["n_query_groups"]) \
        == (18, 10, 1280, 5120, 10)
    assert c472["padded_vocab_size"] == 32000 and c472["norm_eps"] == 1e-5
    c1476 = resolve_smdm_config("Diff_LLaMA_1476M")
    assert (c1476["n_layer"], c1476["n_head"], c1476["n_embd"], c1476["intermediate_size"]) == (22, 16, 2048, 8192)


def test_named_config_builds_the_expected_llama():
    from dlmdistill.convert.common import expected_parameters
    from dlmdistill.convert.smdm import smdm_to_llama_config
    from transformers import LlamaForCausalLM

    shapes = expected_parameters(LlamaForCausalLM, smdm_to_llama_config(resolve_smdm_config("Diff_LLaMA_472M")))
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (32001, 1280)
    assert shapes["model.layers.17.self_attn.k_proj.weight"] == (1280, 1280)
    assert shapes["model.layers.17.mlp.gate_proj.weight"] == (5120, 1280)


REFUSED = [
    ("parallel_residual", True),
    ("bias", True),
    ("shared_attention_norm", True),
    ("_norm_class", "LayerNorm"),
    ("_mlp_class", "GptNeoxMLP"),
    ("rotary_percentage", 0.25),
    ("condense_ratio", 2),
    ("rope_base", 500000),
]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f"{f}={v}" for f, v in REFUSED])
def test_refuses_unsupported_config(tmp_path, field, value):
    torch.save({}, tmp_path / "ckpt.pth")
    with pytest.raises(ConversionError, match=field):
        convert_smdm(tmp_path / "ckpt.pth", tmp_path / "dst", smdm_config(**{field: value}))
    assert not (tmp_path / "dst").exists()


def test_refuses_unknown_config_name(tmp_path):
    with pytest.raises(ConversionError, match="Diff_LLaMA_228M"):
        convert_smdm(tmp_path / "ckpt.pth", tmp_path / "dst", "Diff_LLaMA_228M")


def test_refuses_checkpoint_of_another_size(tmp_path):
    cfg = resolve_smdm_config(smdm_config())
    torch.save(smdm_state_dict(cfg), tmp_path / "ckpt.pth")
    with pytest.raises(ConversionError, match="fused QKV weight has shape"):
        convert_smdm(tmp_path / "ckpt.pth", tmp_path / "dst", smdm_config(n_query_groups=4))
    with pytest.raises(ConversionError, match="shape"):
        convert_smdm(tmp_path / "ckpt.pth", tmp_path / "dst", smdm_config(intermediate_size=64))
