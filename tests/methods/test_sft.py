import json
import random

import pytest
import torch

from dlmdistill.data import DiffusionCollator
from dlmdistill.methods.sft import SFTConfig, SFTTrainer
from dlmdistill.training import NonFiniteLossError, TrainingConfig, latest_checkpoint
from tests.conftest import tiny_model


def reverse_items(tok, n=256, seed=0):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        s = "".join(rng.choice("abcdef") for _ in range(5))
        items.append({"prompt_ids": tok(s + "=", add_special_tokens=False).input_ids,
                      "response_ids": tok(s[::-1], add_special_tokens=False).input_ids + [tok.eos_token_id]})
    return items


def make_trainer(tokenizer, out, cls=SFTTrainer, **kw):
    model, tok = tiny_model(tokenizer, seed=0)
    cfg = TrainingConfig(output_dir=str(out), per_device_train_batch_size=32, learning_rate=3e-3,
                         weight_decay=0.0, logging_steps=5, progress_bar=False, report_to=["jsonl"],
                         export_final=False, **kw)
    return cls(model.train(), tok, reverse_items(tok), cfg,
               collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))


def test_short_sft_run_lowers_the_loss(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=60, warmup_ratio=0.0)
    trainer.train()
    logs = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    assert logs[0]["step"] == 5 and logs[-1]["step"] == 60
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    assert logs[-1]["masked_acc"] > logs[0]["masked_acc"]
    assert latest_checkpoint(tmp_path).name == "step-0000060"


class Crash(RuntimeError):
    pass


class CrashingTrainer(SFTTrainer):
    crash_at = 7

    def compute_loss(self, model, batch):
        if self.state.global_step + 1 == self.crash_at:
            raise Crash("simulated failure")
        return super().compute_loss(model, batch)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def test_resume_after_a_crash_gives_the_same_weights(tokenizer, tmp_path):
    common = dict(max_steps=12, save_steps=6, gradient_accumulation_steps=2)
    ref = make_trainer(tokenizer, tmp_path / "ref", **common)
    ref.train()
    crashed = make_trainer(tokenizer, tmp_path / "run", cls=CrashingTrainer, **common)
    with pytest.raises(Crash):
        crashed.train()
    assert latest_checkpoint(tmp_path / "run").name == "step-0000006"
    resumed = make_trainer(tokenizer, tmp_path / "run", resume=True, **common)
    resumed.train()
    assert resumed.state.global_step == 12
    a, b = _weights(ref), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_incomplete_checkpoint_is_ignored(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=4, save_steps=2)
    trainer.train()
    # a crash during a save leaves only a temporary folder behind
    (tmp_path / "checkpoints" / ".tmp-step-0000006").mkdir()
    (tmp_path / "checkpoints" / "step-0000008").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step-0000004"


class NaNTrainer(SFTTrainer):
    def compute_loss(self, model, batch):
        loss, m = super().compute_loss(model, batch)
        return (loss * float("nan") if self.state.global_step == 3 else loss), m


def test_non_finite_loss_names_the_step_and_keeps_checkpoints(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, cls=NaNTrainer, max_steps=10, save_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*step-0000002"):
        trainer.train()
    assert latest_checkpoint(tmp_path).name == "step-0000002"


def test_sequence_normalisation_and_cfg_options_train(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3)
    trainer.method = SFTConfig(normalization="sequence", cfg_prob=0.5)
    trainer.train()
    assert trainer.state.global_step == 3


def test_lora_checkpoint_holds_only_trainable_weights_and_resumes(tokenizer, tmp_path):
    from dlmdistill.models import ModelConfig, build_model
    from safetensors import safe_open

    def run(out, resume=False, steps=4):
        torch.manual_seed(0)
        model, tok = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64}, lora_r=4),
                                 tokenizer=tokenizer)
        cfg = TrainingConfig(output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=16,
                             progress_bar=False, report_to=[], export_final=True, resume=resume)
        t = SFTTrainer(model, tok, reverse_items(tok, 64), cfg,
                       collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))
        t.train()
        return t

    run(tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    with safe_open(str(ckpt / "partial_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert not (ckpt / "model.safetensors").exists()
    t2 = run(tmp_path, resume=True, steps=6)
    assert t2.state.global_step == 6
    assert (tmp_path / "final" / "config.json").exists()
