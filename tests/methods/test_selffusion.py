import json

import pytest
import torch

from dlmdistill.data import DiffusionCollator
from dlmdistill.methods.selffusion import (SelfFusionConfig, SelfFusionTrainer, sample_modes, selffusion_batch_loss,
                                           uncalibrated_logits)
from dlmdistill.models import load_model
from dlmdistill.sampling import GenerationConfig, generate
from dlmdistill.training import TrainingConfig, latest_checkpoint
from tests.conftest import tiny_model
from tests.methods.test_sft import reverse_items



def _batch(tok, n=16):
    return DiffusionCollator(tok.pad_token_id, tok.eos_token_id)(reverse_items(tok, n))


def _step(model, batch, seed=0, **cfg):
    return selffusion_batch_loss(model, model, batch, SelfFusionConfig(**cfg), calibrated=model.calibration is not None,
                                 generator=torch.Generator().manual_seed(seed))


def test_easy_masking_never_exceeds_hard_and_positions_are_independent():
    ids = torch.randint(5, 30, (4000, 24))
    resp = torch.ones_like(ids, dtype=torch.bool)
    easy, hard = sample_modes(ids, resp, mask_id=1, generator=torch.Generator().manual_seed(0))
    assert (easy.p_mask <= hard.p_mask).all()
    # E[t_h] = 1/2, E[t_e] = E[t_h] / 2 = 1/4
    assert abs(hard.masked.float().mean() - 0.5) < 0.02 and abs(easy.masked.float().mean() - 0.25) < 0.02
    # independent draws: the easy mask is not a subset of the hard one
    assert (easy.masked & ~hard.masked).any()


def test_calibration_gets_gradient_only_through_the_easy_mode(tokenizer):
    model, tok = tiny_model(tokenizer)
    model.add_calibration()
    batch = _batch(tok)

    def grads(term, **cfg):
        model.zero_grad(set_to_none=True)
        _step(model, batch, **cfg).terms[term].backward()
        g = model.calibration.weight.grad
        return 0.0 if g is None else g.abs().sum().item()

    assert grads("diff_hard") == 0.0
    assert grads("diff_easy") > 0
    assert grads("kd", direction="easy_to_hard") == 0.0  # the easy mode is the (detached) teacher
    assert grads("kd", direction="hard_to_easy") > 0


def test_uncalibrated_capture_equals_a_forward_without_calibration(tokenizer):
    model, tok = tiny_model(tokenizer)
    model.add_calibration()
    with torch.no_grad():
        model.calibration.weight.mul_(3.0)
    x = torch.randint(5, 30, (2, 9))
    pos = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) < 0.5
    rows = torch.tensor([0, 2])
    with torch.no_grad(), uncalibrated_logits(model, rows) as got:
        calibrated = model(x, positions=pos, calibrate=torch.tensor([True, True]))
        plain = model(x, positions=pos)
    torch.testing.assert_close(got["logits"], plain[rows])
    assert (calibrated[rows] - plain[rows]).abs().max() > 1e-3


def test_ablation_flags_change_which_terms_exist(tokenizer):
    model, tok = tiny_model(tokenizer)
    batch = _batch(tok)
    full = _step(model, batch)
    assert set(full.terms) == {"diff_hard", "diff_easy", "kd"}
    assert not any(k.endswith("_uncal") for k in full.metrics)  # no calibration module attached
    no_kd = _step(model, batch, kd_weight=0.0)
    assert set(no_kd.terms) == {"diff_hard", "diff_easy"} and "loss/kd" not in no_kd.metrics
    torch.testing.assert_close(no_kd.loss, full.terms["diff_hard"] + full.terms["diff_easy"])
    e2h = _step(model, batch, direction="easy_to_hard").metrics
    assert e2h["kd/frac_easy_to_hard"] == 1.0 and e2h["kd/frac_hard_to_easy"] == 0.0
    either = _step(model, batch, distill_positions="either")
    # "either" gathers the union of both masks for both copies: more head rows than "both"
    assert either.head_rows > full.head_rows
    assert either.metrics["kd/frac_of_response"] > full.metrics["kd/frac_of_response"]
    model.add_calibration()
    cal = selffusion_batch_loss(model, model, batch, SelfFusionConfig(), calibrated=True,
                                uncalibrated_diagnostics=True, generator=torch.Generator().manual_seed(0))
    assert any(k.endswith("_uncal") for k in cal.metrics)


def test_loss_is_the_sum_of_its_terms_and_uses_one_forward(tokenizer):
    model, tok = tiny_model(tokenizer)
    batch = _batch(tok)
    calls = []
    handle = model.hf_model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]),
                                                            with_kwargs=True)
    step = _step(model, batch, kd_weight=0.5)
    handle.remove()
    assert calls == [2 * batch["input_ids"].shape[0]]  # easy and hard copies in one 2B batch
    torch.testing.assert_close(step.loss, step.terms["diff_hard"] + step.terms["diff_easy"] + 0.5 * step.terms["kd"])


B, LENGTH = 8, 16


def position_coding_model(ids, attn, positions, calibrate=None):
    """A stub model whose logit row at (copy row, column) is one-hot at ``row * LENGTH + column``: easy copy
    rows 0..B-1, hard B..2B-1, so a gathered row tells where it came from."""
    rows, cols = positions.nonzero(as_tuple=True)
    return torch.nn.functional.one_hot(rows * LENGTH + cols, 2 * B * LENGTH).float() * 20.0


def stub_batch(prompt: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 30, (B, LENGTH), generator=torch.Generator().manual_seed(0))
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, prompt:] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp}


@pytest.mark.parametrize("which", ["both", "either"])
def test_easy_and_hard_rows_of_the_distillation_set_are_aligned_position_by_position(which, monkeypatch):
    import dlmdistill.methods.selffusion as sf

    b, length, model, batch = B, LENGTH, position_coding_model, stub_batch()
    dm = type("DM", (), {"mask_id": 1})()
    seen = {}
    real_d, real_kd = sf.distillation_positions, sf.bidirectional_kd_loss
    monkeypatch.setattr(sf, "distillation_positions", lambda *a, **k: seen.setdefault("D", real_d(*a, **k)))
    monkeypatch.setattr(sf, "bidirectional_kd_loss",
                        lambda e, h, *a, **k: seen.update(easy=e, hard=h) or real_kd(e, h, *a, **k))
    sf.selffusion_batch_loss(model, dm, batch, SelfFusionConfig(distill_positions=which), calibrated=False,
                             generator=torch.Generator().manual_seed(0))
    d_rows, d_cols = seen["D"].nonzero(as_tuple=True)
    assert d_rows.numel() > 5 and d_rows.unique().numel() > 1
    easy_code, hard_code = seen["easy"].argmax(-1), seen["hard"].argmax(-1)
    # row n of both sides is the same (sample, column) of D, in row-major order; easy from the easy copy
    assert torch.equal(easy_code, d_rows * length + d_cols)
    assert torch.equal(hard_code, (d_rows + b) * length + d_cols)


def test_own_distillation_set_trains_each_mode_only_where_it_is_masked(monkeypatch):
    import dlmdistill.methods.selffusion as sf

    length, model, batch = LENGTH, position_coding_model, stub_batch()
    dm = type("DM", (), {"mask_id": 1})()
    seen = {}
    real_modes, real_kd = sf.sample_modes, sf.bidirectional_kd_loss
    monkeypatch.setattr(sf, "sample_modes", lambda *a, **k: seen.setdefault("modes", real_modes(*a, **k)))
    monkeypatch.setattr(sf, "bidirectional_kd_loss",
                        lambda e, h, t, *a, **k: seen.update(easy=e, teaches=t) or real_kd(e, h, t, *a, **k))
    sf.selffusion_batch_loss(model, dm, batch, SelfFusionConfig(distill_positions="own"), calibrated=False,
                             generator=torch.Generator().manual_seed(0))
    easy, hard = seen["modes"]
    code = seen["easy"].argmax(-1)
    rows, cols = code // length, code % length
    student = torch.where(seen["teaches"], hard.masked[rows, cols], easy.masked[rows, cols])
    assert bool(student.all())  # every kept pair's student is masked there
    union = easy.masked | hard.masked
    both = easy.masked & hard.masked
    assert both.sum() <= code.numel() < union.sum()  # positions masked in both always kept; some dropped
    kept = torch.zeros_like(union)
    kept[rows, cols] = True
    assert not (both & ~kept).any()


def make_trainer(tokenizer, out, method=None, cls=SelfFusionTrainer, **kw):
    model, tok = tiny_model(tokenizer, seed=0)
    cfg = TrainingConfig(output_dir=str(out), per_device_train_batch_size=32, learning_rate=3e-3, weight_decay=0.0,
                         logging_steps=5, progress_bar=False, report_to=["jsonl"], export_final=True, **kw)
    return cls(model.train(), tok, reverse_items(tok), cfg, method=method or SelfFusionConfig(),
               collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))


def test_short_run_lowers_the_loss_logs_diagnostics_and_exports_without_calibration(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=40, warmup_ratio=0.0,
                           method=SelfFusionConfig(uncalibrated_diagnostics_every=2))
    trainer.train()
    logs = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    assert logs[-1]["hard/masked_acc"] > logs[0]["hard/masked_acc"]
    keys = ("loss/kd", "easy/p_true", "kd/frac_easy_to_hard", "kd/frac_both_wrong", "kd/easy_top1_both_wrong_uncal")
    for key in keys:
        assert any(key in entry for entry in logs), key
    # the calibration RMSNorm trained and is in the checkpoint ...
    from safetensors import safe_open

    with safe_open(str(latest_checkpoint(tmp_path) / "model.safetensors"), "pt") as f:
        assert "calibration.weight" in f.keys()
    assert (trainer.unwrapped.calibration.weight - 1).abs().max() > 0
    # ... but neither exported nor used at inference
    exported, _ = load_model(str(tmp_path / "final"))
    assert exported.calibration is None
    model = trainer.unwrapped.eval()
    prompts = [x["prompt_ids"] for x in reverse_items(trainer.tokenizer, 4, seed=1)]
    gen = GenerationConfig(gen_length=6, steps=6)
    with torch.no_grad():
        a = generate(model, prompts, gen).sequences
        b = generate(exported.eval(), prompts, gen).sequences
    assert torch.equal(a, b)


class Crash(RuntimeError):
    pass


class CrashingTrainer(SelfFusionTrainer):
    def compute_loss(self, model, batch):
        if self.state.global_step + 1 == 5:
            raise Crash("simulated failure")
        return super().compute_loss(model, batch)


def test_resume_gives_the_same_weights_including_calibration(tokenizer, tmp_path):
    common = dict(max_steps=6, save_steps=3)
    ref = make_trainer(tokenizer, tmp_path / "ref", **common)
    ref.train()
    with pytest.raises(Crash):
        make_trainer(tokenizer, tmp_path / "run", cls=CrashingTrainer, **common).train()
    resumed = make_trainer(tokenizer, tmp_path / "run", resume=True, **common)
    resumed.train()
    a, b = ref.unwrapped.state_dict(), resumed.unwrapped.state_dict()
    assert "calibration.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_lora_run_trains_and_checkpoints_the_calibration(tokenizer, tmp_path):
    from safetensors import safe_open

    from dlmdistill.models import ModelConfig, build_model

    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64}, lora_r=4),
                             tokenizer=tokenizer)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16, progress_bar=False,
                         report_to=[], export_final=True)
    trainer = SelfFusionTrainer(model, tok, reverse_items(tok, 32), cfg,
                                collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))
    trainer.train()
    with safe_open(str(latest_checkpoint(tmp_path) / "partial_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "calibration.weight" in keys and all("lora_" in k or k == "calibration.weight" for k in keys)
    assert trainer.cost_rows()["selffusion"]["student_training"] > 0
    assert load_model(str(tmp_path / "final"))[0].calibration is None
