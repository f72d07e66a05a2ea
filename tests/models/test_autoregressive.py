import pytest
import torch

from dlmdistill.models import ModelConfig
from dlmdistill.models.autoregressive import (CausalLM, is_autoregressive_checkpoint, load_causal_lm,
                                              load_for_inference)
from dlmdistill.sampling import GenerationConfig
from tests.conftest import tiny_model

SMALL = {"hidden_size": 32, "intermediate_size": 64}


def tiny_ar(tokenizer, seed=0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    model, _ = load_causal_lm(ModelConfig(preset_overrides=SMALL, **kw), tokenizer=tokenizer)
    return model.eval()


def test_preset_is_causal_and_rows_predict_the_next_token(tokenizer):
    model = tiny_ar(tokenizer)
    x = torch.randint(5, 30, (2, 10))
    pos = torch.zeros(2, 10, dtype=torch.bool)
    pos[:, 4] = True
    pos[1, 7] = True
    with torch.no_grad():
        rows = model(x, positions=pos)
        hf = model.hf_model(input_ids=x).logits
        y = x.clone()
        y[:, 4:] = (y[:, 4:] + 1 - 5) % 25 + 5  # change token 4 and everything after it
        same = model(y, positions=pos)
    torch.testing.assert_close(rows, torch.stack([hf[0, 3], hf[1, 3], hf[1, 6]]))
    torch.testing.assert_close(same[:2], rows[:2])  # token 4 is predicted from tokens < 4 only
    with pytest.raises(ValueError, match="token 0"):
        model(x, positions=torch.ones_like(pos))


def test_detection_save_load_and_dlm_checkpoints_are_not_ar(tokenizer, tmp_path):
    model = tiny_ar(tokenizer)
    model.save_pretrained(tmp_path / "ar", tokenizer)
    assert is_autoregressive_checkpoint(str(tmp_path / "ar"))
    loaded, tok = load_for_inference(ModelConfig(name_or_path=str(tmp_path / "ar")))
    assert isinstance(loaded, CausalLM) and loaded.config.is_causal is not False
    x = torch.randint(5, 30, (2, 7))
    pos = torch.zeros(2, 7, dtype=torch.bool)
    pos[:, 1:] = True
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, positions=pos), model(x, positions=pos))
    dlm, dtok = tiny_model(tokenizer)
    dlm.save_pretrained(tmp_path / "dlm", dtok)
    assert not is_autoregressive_checkpoint(str(tmp_path / "dlm"))
    with pytest.raises(ValueError, match="not a causal LM"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "dlm")))


def test_lora_merged_export(tokenizer, tmp_path):
    model = tiny_ar(tokenizer, lora_r=4)
    assert model.is_peft
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "m", tokenizer)
    merged, _ = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "m")))
    x = torch.randint(5, 30, (1, 6))
    pos = torch.zeros(1, 6, dtype=torch.bool)
    pos[0, 2:] = True
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x, positions=pos), model(x, positions=pos), atol=1e-5, rtol=1e-5)


def test_generation_greedy_is_deterministic_and_sampling_follows_the_seed(tokenizer):
    model = tiny_ar(tokenizer)
    prompts = [[7, 8, 9], [10, 11]]
    gen = GenerationConfig(gen_length=5, steps=5)
    a, b = model.generate_responses(prompts, gen), model.generate_responses(prompts, gen)
    assert a.shape == (2, 5) and torch.equal(a, b)
    # greedy left-padded generation equals unpadded greedy continuation of the short prompt
    alone = model.generate_responses([[10, 11]], gen)
    assert torch.equal(alone[0], a[1])
    hot = GenerationConfig(gen_length=5, steps=5, temperature=1.0)
    torch.manual_seed(3)
    s1 = model.generate_responses(prompts, hot)
    torch.manual_seed(3)
    assert torch.equal(s1, model.generate_responses(prompts, hot))


def test_evaluate_model_samples_an_ar_model_once_per_seed(tokenizer, tmp_path):
    from dlmdistill.evaluation import evaluate_model, format_table
    from dlmdistill.tasks.base import Example, Task

    class Echo(Task):
        name, metric = "echo", "rouge_l"

        def score(self, example, completion):
            return float(len(completion))

    model = tiny_ar(tokenizer)
    examples = [Example(prompt="ab="), Example(prompt="abc=")]
    report = evaluate_model(model, tokenizer, Echo(), examples, GenerationConfig(gen_length=4, steps=4),
                            steps=[8, 16], seeds=[1, 2], output_dir=tmp_path, progress=False)
    assert list(report["results"]) == ["ar"] and list(report["results"]["ar"]["seeds"]) == ["1", "2"]
    assert "| ar |" in format_table(report)


@pytest.mark.parametrize("side", ["left", "right"])
def test_ready_causal_mask_gives_transformers_logits_without_a_read(tokenizer, side):
    """``static_attention_mask``: the causal mask passed ready ([B, 1, L, L]) gives the logits transformers'
    own mask gives at every real position, finite ones at padding positions too, and no host read (the
    2-D mask makes transformers read it back to decide whether SDPA can drop it)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_ar(tokenizer)
    x = torch.randint(5, 30, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    pad = slice(0, 3) if side == "left" else slice(6, 9)
    mask[1, pad] = 0
    mask[2, pad.start:pad.start + 1] = 0
    x[mask == 0] = model.pad_id if model.pad_id is not None else 0
    every = torch.arange(9)[None].expand(3, -1)
    with torch.no_grad():
        model.static_attention_mask = False
        expected = model(x, mask, positions=every).view(3, 9, -1)
        model.static_attention_mask = True
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = model(x, mask, positions=every).view(3, 9, -1)
    assert torch.isfinite(got).all()
    real = (mask == 1)[:, (torch.arange(9) - 1).clamp(min=0), None]  # row i is computed at position i - 1 (0: at 0)
    torch.testing.assert_close(torch.where(real, got, 0.0), torch.where(real, expected, 0.0), rtol=1e-5, atol=1e-5)
    assert not any(e.name in ("aten::_local_scalar_dense", "aten::nonzero") for e in prof.events())
