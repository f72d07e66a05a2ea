"""``training.compile``: the model trains through torch.compile; checkpoints and exports hold the plain
model's weights (no ``_orig_mod.`` prefix) and resume without compiling."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dlmdistill as dd


def _train(out, **training):
    dd.train("sft", "configs/sft_countdown_tiny.yaml",
             training={"output_dir": str(out), "max_steps": 3, "logging_steps": 1, "save_steps": 2, "eval_steps": 0,
                       "report_to": ["jsonl"], "progress_bar": False, "static_shapes": True,
                       "per_device_train_batch_size": 8, "seed": 0, **training},
             eval={"enabled": False}, data={"train_limit": 48})
    return [json.loads(line)["loss"] for line in (out / "logs.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.slow  # compiles (tens of seconds on a CPU)
def test_compiled_training_matches_eager_and_checkpoints_the_plain_model(tmp_path):
    torch.manual_seed(0)
    eager = _train(tmp_path / "eager")
    compiled = _train(tmp_path / "compiled", compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    ckpt = load_file(str(tmp_path / "compiled" / "checkpoints" / "step-0000002" / "model.safetensors"))
    final = load_file(str(tmp_path / "compiled" / "final" / "model.safetensors"))
    plain = load_file(str(tmp_path / "eager" / "final" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in ckpt) and set(final) == set(plain)
    for k in plain:
        torch.testing.assert_close(final[k], plain[k], rtol=1e-3, atol=1e-4)
    # the compiled run's checkpoint resumes in an eager run
    resumed = _train(tmp_path / "compiled", max_steps=4, resume=True)
    assert len(resumed) >= 1
