"""transformers' habits: report_to none, bf16/fp16 flags, optim, resume_from_checkpoint."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from dlmdistill.cli import main
from dlmdistill.config import ConfigError, load_config
from dlmdistill.training.trainer import TrainingConfig, make_optimizer

TINY = ["--task", "countdown", "--train_limit", "64", "--per_device_train_batch_size", "8",
        "--preset_overrides", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1}",
        "--progress_bar", "false", "--eval.enabled", "false", "--learning_rate", "3e-3"]


def _config(*args):
    return load_config(TrainingConfig, None, list(args))


def test_flags_and_report_to_are_checked():
    assert _config("--bf16").mixed_precision == "bf16"
    assert _config("--fp16", "true").mixed_precision == "fp16"
    assert _config("--report_to", "none").report_to == ["none"]
    flag = _config("--resume_from_checkpoint")  # the flag alone: the latest checkpoint, as --resume
    assert flag.resume is True and flag.resume_from_checkpoint is None
    for args, words in [(["--bf16", "--fp16"], "exclude"), (["--bf16", "--mixed_precision", "fp16"], "contradicts"),
                        (["--report_to", "none", "tensorboard"], "cannot be combined"),
                        (["--report_to", "tensorbored"], "unknown tracker")]:
        with pytest.raises(ConfigError, match=words):
            _config(*args)


def test_a_missing_checkpoint_to_resume_from_is_a_clear_error_before_anything_is_written(capsys, tmp_path):
    # the filesystem is checked when the run starts (api.check_run_config), not by the configuration's values
    out = tmp_path / "r"
    rc = main(["train", "sft", "--resume_from_checkpoint", "/no/such/ckpt", "--output_dir", str(out), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "resume_from_checkpoint: /no/such/ckpt: no such folder" in err and not out.exists()


def test_a_tracker_that_is_not_installed_is_a_clear_error(capsys, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    rc = main(["train", "sft", "--report_to", "wandb", "--output_dir", str(tmp_path / "r"), "--max_steps", "1", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "wandb is not installed (pip install wandb)" in err and "Traceback" not in err


def test_optimizers():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer(_config("--optim", "sgd", "--learning_rate", "0.5"), [{"params": [w], "weight_decay": 0.0}])
    (w * torch.tensor([3.0, 4.0])).sum().backward()  # gradient (3, 4)
    opt.step()
    assert w.tolist() == [1.0 - 0.5 * 3.0, -2.0 - 0.5 * 4.0]
    fused = make_optimizer(_config("--optim", "adamw_torch_fused"), [{"params": [w], "weight_decay": 0.0}])
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    from transformers.optimization import Adafactor

    assert isinstance(make_optimizer(_config("--optim", "adafactor"), [{"params": [w]}]), Adafactor)


def test_report_to_none_keeps_the_jsonl_log_and_bf16_on_cpu_warns(tmp_path, caplog):
    out = tmp_path / "run"
    # (other runs of this process trained in float32 before, and the next ones do after: the trainer
    # lets each run set its own precision)
    assert main(["train", "sft", "--report_to", "none", "--max_steps", "1", "--output_dir", str(tmp_path / "fp32"),
                 "--use_cpu", *TINY]) == 0
    with caplog.at_level(logging.WARNING):
        rc = main(["train", "sft", "--report_to", "none", "--bf16", "--optim", "adafactor", "--max_steps", "2",
                   "--logging_steps", "1", "--output_dir", str(out), "--use_cpu", *TINY])
    assert rc == 0
    steps = [json.loads(x)["step"] for x in (out / "logs.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (out / "tb").exists()
    assert any("mixed_precision=bf16 on a CPU" in r.getMessage() for r in caplog.records)


def test_resume_from_checkpoint_matches_the_uninterrupted_run(tmp_path):
    common = ["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0", "--report_to", "none",
              "--logging_steps", "1", "--use_cpu", *TINY]
    first = tmp_path / "first"
    assert main(["train", "sft", "--output_dir", str(first), *common]) == 0
    second = tmp_path / "second"
    ckpt = first / "checkpoints" / "step-0000002"
    assert main(["train", "sft", "--output_dir", str(second), "--resume_from_checkpoint", str(ckpt), *common]) == 0
    steps = [json.loads(x)["step"] for x in (second / "logs.jsonl").read_text().splitlines()]
    assert steps == [3, 4]  # continued at step 3
    a = load_file(str(first / "checkpoints" / "step-0000004" / "model.safetensors"))
    b = load_file(str(second / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_run_folder_names_its_checkpoints(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-0000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json").write_text("{}")
    rc = main(["train", "sft", "--resume_from_checkpoint", str(tmp_path / "run"), "--output_dir", str(tmp_path / "o"),
               *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "is a run folder, not a checkpoint" in err and "step-0000002" in err
