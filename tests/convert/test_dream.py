"""Dream -> Qwen2ForCausalLM: exact (unshifted) logits, shift flag, native tokenizer, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
from dlm_reference import dream_config, dream_forward, dream_shift, dream_state_dict, write_hf_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlmdistill.convert import ConversionError, convert_dream

ATOL = 1e-4


def mark_remote_tokenizer(folder: Path) -> None:
    """Make the tokenizer config look like Dream's: a remote-code DreamTokenizer."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "DreamTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    path.write_text(json.dumps(config))


def write_bpe_tokenizer(folder: Path, with_tokenizer_json: bool) -> tokenizers.Tokenizer:
    """A tiny byte-level BPE tokenizer (Qwen2's kind) saved as vocab.json/merges.txt (+ tokenizer.json)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "masked diffusion models denoise text"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    if with_tokenizer_json:
        tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "DreamTokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def load(folder: Path, attn: str = "eager") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[dict, dict, Path, tokenizers.Tokenizer]:
    root = tmp_path_factory.mktemp("dream")
    tok = write_bpe_tokenizer(root / "src", with_tokenizer_json=True)
    cfg = dream_config(vocab_size=320, mask_token_id=tok.get_vocab_size())
    sd = dream_state_dict(cfg)
    write_hf_checkpoint(root / "src", cfg, sd, n_shards=2)
    convert_dream(root / "src", root / "dst")
    return cfg, sd, root / "dst", tok


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_reference(converted, attn):
    cfg, sd, dst, _ = converted
    ids = torch.randint(0, cfg["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = load(dst, attn)(input_ids=ids).logits
        want = dream_forward(sd, cfg, ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < ATOL
    # what a Dream sampler reads at position i: the logits of position i-1
    assert (dream_shift(got) - dream_shift(want)).abs().max().item() < ATOL


def test_left_padding_matches_dream_generation(converted):
    """Dream's generate() masks padded keys and uses positions cumsum(mask)-1; so does the converted
    model when given attention_mask and position_ids."""
    cfg, sd, dst, _ = converted
    ids = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = load(dst, "sdpa")(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        want = dream_forward(sd, cfg, ids, attention_mask=mask)
    assert (got - want)[mask.bool()].abs().max().item() < ATOL


def test_config(converted):
    cfg, sd, dst, _ = converted
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["is_causal"] is False
    assert config["dlm_shift_logits"] is True
    assert config["mask_token_id"] == cfg["mask_token_id"]
    assert config["use_sliding_window"] is False
    assert config["rope_parameters"]["rope_theta"] == cfg["rope_theta"]
    assert "auto_map" not in config
    names = set(json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == set(sd)


def test_tokenizer_is_native_with_mask(converted):
    cfg, _, dst, source = converted
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.mask_token_id == cfg["mask_token_id"]
    assert tok.mask_token == "<|mask|>"
    text = "the cat denoises masked text"
    assert tok(text)["input_ids"] == source.encode(text).ids


def test_tokenizer_from_vocab_and_merges(tmp_path):
    """Without tokenizer.json, Dream's DreamTokenizer files load as a native Qwen2Tokenizer."""
    source = write_bpe_tokenizer(tmp_path / "src", with_tokenizer_json=False)
    cfg = dream_config(vocab_size=320, mask_token_id=source.get_vocab_size())
    write_hf_checkpoint(tmp_path / "src", cfg, dream_state_dict(cfg))
    convert_dream(tmp_path / "src", tmp_path / "dst")
    tok = AutoTokenizer.from_pretrained(tmp_path / "dst")
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.mask_token_id == cfg["mask_token_id"]
    assert tok("the cat sat")["input_ids"] == source.encode("the cat sat").ids


def test_bidirectional(converted):
    cfg, _, dst, _ = converted
    model = load(dst, "sdpa")
    ids = torch.randint(0, cfg["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, -1] = cfg["mask_token_id"]
    with torch.no_grad():
        assert (model(input_ids=ids).logits[0, 0] - model(input_ids=changed).logits[0, 0]).abs().max() > 1e-3


def test_tied_embeddings(tmp_path):
    cfg = dream_config(tie_word_embeddings=True)
    sd = dream_state_dict(cfg)
    write_hf_checkpoint(tmp_path / "src", cfg, sd)
    convert_dream(tmp_path / "src", tmp_path / "dst")
    ids = torch.randint(0, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (load(tmp_path / "dst")(input_ids=ids).logits - dream_forward(sd, cfg, ids)).abs().max() < ATOL


REFUSED = [
    ("hidden_act", "gelu"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("use_sliding_window", True),
    ("mask_token_id", None),
    ("mask_token_id", 48),
]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f"{f}={v}" for f, v in REFUSED])
def test_refuses_unsupported_config(tmp_path, field, value):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(dream_config(**{field: value})))
    with pytest.raises(ConversionError, match=field):
        convert_dream(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_refuses_missing_biases(tmp_path):
    cfg = dream_config()
    sd = {k: v for k, v in dream_state_dict(cfg).items() if not k.endswith(".bias")}
    write_hf_checkpoint(tmp_path / "src", cfg, sd)
    with pytest.raises(ConversionError, match="missing tensors: model.layers.0.self_attn.k_proj.bias"):
        convert_dream(tmp_path / "src", tmp_path / "dst")
