"""The GPU check runs end to end at its CPU smoke-test size, and its FLOP meter counts what the formula says."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, load_script, tiny_model


def _gpu_check():
    return load_script(ROOT / "benchmarks" / "gpu_check.py")


def test_flop_meter_counts_body_attention_and_head(tokenizer):
    gc = _gpu_check()
    model, _ = tiny_model(tokenizer)
    hf = model.hf_model
    b, length, rows = 3, 10, 4
    body = sum(p.numel() for p in hf.model.parameters()) - hf.model.embed_tokens.weight.numel()
    layers, hidden, vocab = hf.config.num_hidden_layers, hf.config.hidden_size, model.vocab_size
    x = torch.randint(0, vocab, (b, length))
    positions = torch.zeros(b, length, dtype=torch.bool)
    positions[0, :rows] = True
    forward = 2 * body * b * length + 4 * layers * hidden * b * length**2 + 2 * hidden * vocab * rows
    with torch.no_grad(), gc.FlopMeter(vocab) as meter:
        model(x, positions=positions)
    assert meter.flops == forward
    with gc.FlopMeter(vocab) as meter:  # with gradients: forward + backward = 3 forwards
        model(x, positions=positions).sum().backward()
    assert meter.flops == 3 * forward


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path, shared_data, capsys):
    gc = _gpu_check()
    out = tmp_path / "out"
    rc = gc.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--data", str(shared_data / "gsm8k" / "train.jsonl"),
                  "--out", str(out), "--strict", "--items", *gc.ITEMS])  # the on-request items too
    assert rc == 0
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {r["item"]: r for r in report["rows"]}
    for item in ("model", "sft", "sft_static", "selffusion", "selffusion_static", "dopsd", "dopsd_static", "diffu_grpo",
                 "sample (cache none, 16 steps)",
                 "sample (cache prefix, 16 steps)", "sample (cache dual, 16 steps)",
                 "sample (cache dual, threshold 0.9, 16 steps)", "sample (cache none, static shapes, 16 steps)",
                 "sample (cache dual, static shapes, 16 steps)", "sample (cache none, static shapes, eager, 16 steps)",
                 "sample (cache none, static shapes, compiled, 16 steps)"):
        assert rows[item]["status"] == "ok", rows[item]
    assert rows["sample (cache none, 16 steps)"]["forwards_per_sample"] == 16
    for item in ("sft", "selffusion", "dopsd", "diffu_grpo"):
        assert rows[item]["steps"] == 2 and rows[item]["tflop_per_step"] > 0
    # SelfFusion runs two masked copies of every sequence: about twice SFT's FLOPs per step
    assert 1.5 < rows["selffusion"]["tflop_per_step"] / rows["sft"]["tflop_per_step"] < 2.5
    # static shapes: the head at every response position, so more head FLOPs than at the masked ones only
    assert not set(gc.ON_REQUEST) & set(gc.DEFAULT_ITEMS)  # the 8 minutes
    for item in ("sft_compiled", "selffusion_compiled"):
        assert rows[item]["status"] == "ok" and rows[item]["steps"] == 2, rows[item]
    for item in ("sft", "selffusion"):
        assert rows[f"{item}_static"]["steps"] == 2
        assert rows[f"{item}_static"]["tflop_per_step"] > rows[item]["tflop_per_step"]
    assert rows["fsdp"]["status"].startswith("skipped")
    assert "| sft | ok |" in (out / "gpu_check.md").read_text()
    # never over a previous report
    assert gc.main(["--size", "tiny", "--items", "model", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
