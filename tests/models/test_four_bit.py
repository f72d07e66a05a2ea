"""``model.load_in_4bit``: a checkpoint's decoder linears in 4-bit NF4 (bitsandbytes), trained through LoRA."""

from __future__ import annotations

import json

import pytest
import torch

import dlmdistill as dd
from dlmdistill.configs.model import ModelConfig
from dlmdistill.errors import UserError
from dlmdistill.models.loading import build_model

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small trained model folder (2 SFT steps of the tiny preset)."""
    out = tmp_path_factory.mktemp("base")
    dd.train("sft", model={"name_or_path": "preset:tiny", "tokenizer": "char"},
             data={"task": "countdown", "train_limit": 32, "max_length": 128},
             training={"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 8, "save_steps": 0,
                       "report_to": ["none"], "progress_bar": False}, eval={"enabled": False})
    return out / "final"


def test_the_base_is_nf4_the_adapters_train_and_the_logits_stay_close(checkpoint):
    full, tok = build_model(ModelConfig(name_or_path=str(checkpoint)))
    quant, _ = build_model(ModelConfig(name_or_path=str(checkpoint), load_in_4bit=True, lora_r=4))
    layer = quant.hf_model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert not isinstance(quant.hf_model.get_output_embeddings(), bnb.nn.Linear4bit)  # the head keeps its dtype
    trainable = [n for n, p in quant.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, len(tok) - 1, (2, 24))
    with torch.no_grad():
        a, b = full.eval()(ids), quant.eval()(ids)
    # NF4 rounding moves the logits a little, not the model: close in direction, same argmax mostly
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert cos.mean() > 0.95
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.7


def test_lora_sft_on_a_4bit_base_trains_checkpoints_resumes_and_exports(checkpoint, tmp_path):
    over = dict(model={"name_or_path": str(checkpoint), "load_in_4bit": True, "lora_r": 4},
                data={"task": "countdown", "train_limit": 32, "max_length": 128},
                training={"output_dir": str(tmp_path), "max_steps": 4, "per_device_train_batch_size": 8,
                          "save_steps": 2, "logging_steps": 1, "report_to": ["none"], "progress_bar": False},
                eval={"enabled": False})
    dd.train("sft", **over)
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in logs)
    over["training"].update(max_steps=6, resume=True)
    dd.train("sft", **over)
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
    model, tok = dd.load_model(str(tmp_path / "final"))  # the export: adapters merged into the 4-bit base
    assert isinstance(model.hf_model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("kw, match", [({"lora_r": 0}, "lora_r > 0"),
                                       ({"lora_r": 4, "name_or_path": "preset:tiny"}, "no trained weights"),
                                       ({"lora_r": 4, "gguf_file": "x.gguf"}, "dequantized")])
def test_4bit_settings_that_cannot_work_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{"name_or_path": "some/model", "load_in_4bit": True, **kw}).validate()


def test_missing_bitsandbytes_is_a_clear_error(checkpoint, monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "bitsandbytes" else real(name, *a, **k))
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_model(ModelConfig(name_or_path=str(checkpoint), load_in_4bit=True, lora_r=4))


def test_what_stays_unquantized_is_float32_as_the_estimate_counts(checkpoint):
    """peft's k-bit preparation upcasts the non-quantized weights (embeddings, norms, head) to fp32, even when
    the checkpoint is loaded in bf16; dlmdistill.estimate counts them so."""
    quant, _ = build_model(ModelConfig(name_or_path=str(checkpoint), load_in_4bit=True, lora_r=4, dtype="bfloat16"))
    other = {p.dtype for n, p in quant.named_parameters() if "lora_" not in n and p.__class__.__name__ != "Params4bit"}
    assert other == {torch.float32}


def test_bitsandbytes_kernel_hub_notice_is_not_printed():
    """With bitsandbytes installed, importing it (peft does, in every run) must not print its notice about a
    Hub kernel it could not fetch (it falls back to its own)."""
    import subprocess
    import sys

    code = "import dlmdistill, peft, bitsandbytes, logging; logging.getLogger('x').warning('still logged')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "still logged" in proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr
