import pytest
import torch

from dlmdistill.models import DiffusionModel, ModelConfig, build_model, load_model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bidirectional_later_token_changes_earlier_logits(tokenizer, attn):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64},
                                       attn_implementation=attn), tokenizer=tokenizer)
    model.eval()
    x = torch.randint(5, len(tokenizer), (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1 - 5) % (len(tokenizer) - 5) + 5
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_does_not_change_real_positions(tokenizer, attn):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64},
                                       attn_implementation=attn), tokenizer=tokenizer)
    model.eval()
    x = torch.randint(5, len(tokenizer), (1, 9))
    pad = torch.full((1, 4), tokenizer.pad_token_id)
    xp = torch.cat([pad, x], 1)
    am = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(x)
        b = model(xp, am)[:, 4:]
        # and padding is really masked: changing a pad token changes nothing
        xp2 = xp.clone()
        xp2[0, 0] = 7
        c = model(xp2, am)[:, 4:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-6)


def test_selected_positions_equal_full_logits(model_and_tok):
    model, tok = model_and_tok
    x = torch.randint(5, len(tok), (3, 10))
    pos = torch.rand(3, 10) < 0.3
    with torch.no_grad():
        full = model(x)
        sel = model(x, positions=pos)
    assert sel.shape == (int(pos.sum()), model.vocab_size)
    torch.testing.assert_close(full[pos], sel)


def test_shifted_logits_predict_from_previous_position(model_and_tok):
    model, _ = model_and_tok
    shifted = DiffusionModel(model.model, model.mask_id, shift_logits=True)
    x = torch.randint(5, 30, (2, 8))
    pos = torch.zeros(2, 8, dtype=torch.bool)
    pos[:, 3] = True
    with torch.no_grad():
        plain = model(x)
        out = shifted(x, positions=pos)
        full = shifted(x)
    torch.testing.assert_close(out, plain[:, 2])
    torch.testing.assert_close(full[:, 1:], plain[:, :-1])
    pos0 = torch.zeros(2, 8, dtype=torch.bool)
    pos0[:, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        shifted(x, positions=pos0)


def test_calibration_applies_only_to_flagged_rows(model_and_tok):
    model, _ = model_and_tok
    cal = model.add_calibration()
    with torch.no_grad():
        cal.weight.mul_(0.5)
    x = torch.randint(5, 30, (2, 6))
    pos = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        plain = model(x, positions=pos)
        mixed = model(x, positions=pos, calibrate=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[6:], plain[6:])
    assert (mixed[:6] - plain[:6]).abs().max() > 1e-4


def test_save_load_round_trip(model_and_tok, tmp_path):
    model, tok = model_and_tok
    model.add_calibration()
    model.save_pretrained(tmp_path / "m", tok)
    assert not any("calibration" in k for k in _keys(tmp_path / "m"))
    loaded, tok2 = load_model(str(tmp_path / "m"))
    assert loaded.mask_id == model.mask_id == tok2.mask_token_id
    assert loaded.config.is_causal is False
    x = torch.randint(5, 30, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


def test_lora_model_round_trip_and_adapters_disabled(tokenizer, tmp_path):
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64}, lora_r=4),
                             tokenizer=tokenizer)
    assert model.is_peft
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # make the adapters non-trivial
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.randint(5, 30, (2, 7))
    model.eval()
    with torch.no_grad():
        with_lora = model(x)
        with model.adapters_disabled():
            base = model(x)
    assert (with_lora - base).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "merged", tok, merge_lora=True)
    merged, _ = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), with_lora, atol=1e-5, rtol=1e-5)


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())
