"""`dlmdistill convert` on tiny checkpoints in the published layouts, then the converted model trains
and generates through the product."""

import json

import torch

from dlm_reference import (llada_config, llada_state_dict, smdm_config, smdm_state_dict, write_hf_checkpoint,
                           write_word_tokenizer)
from dlmdistill.cli import main
from dlmdistill.models import load_model
from dlmdistill.sampling import GenerationConfig, generate


def test_convert_llada_from_the_command_line(tmp_path):
    cfg = llada_config()
    write_hf_checkpoint(tmp_path / "src", cfg, llada_state_dict(cfg))
    write_word_tokenizer(tmp_path / "src", cfg["vocab_size"],
                         {0: "[UNK]", 1: "<s>", 2: "</s>", cfg["mask_token_id"]: "<|mdm_mask|>"})
    assert main(["convert", "llada", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    model, tok = load_model(str(tmp_path / "dst"))
    assert model.mask_id == cfg["mask_token_id"] and model.config.is_causal is False
    out = generate(model.eval(), [[1, 2, 3]], GenerationConfig(gen_length=8, steps=4))
    assert not (out.responses == model.mask_id).any()


def test_convert_smdm_with_a_config_file(tmp_path):
    from dlmdistill.convert.smdm import resolve_smdm_config

    cfg = smdm_config()
    torch.save(smdm_state_dict(resolve_smdm_config(cfg)), tmp_path / "model.pth")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["convert", "smdm", str(tmp_path / "model.pth"), str(tmp_path / "dst"),
                 "--smdm-config", str(tmp_path / "cfg.json")]) == 0
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["is_causal"] is False and written["mask_token_id"] == resolve_smdm_config(cfg)["padded_vocab_size"]


def test_convert_refuses_an_empty_option(tmp_path, capsys):
    """An option given as '' is refused, not read as "not given" (issue 25); nothing is written."""
    assert main(["convert", "ar", str(tmp_path / "src"), str(tmp_path / "dst"), "--mask-token", ""]) == 2
    assert "--mask-token is an empty string" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
