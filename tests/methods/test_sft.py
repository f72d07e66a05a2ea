import json
import random

import pytest
import torch

from dlmdistill.data import DiffusionCollator
from dlmdistill.methods.sft import SFTTrainer
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


def _hand_noised(ids, masked, p_mask, mask_id):
    from dlmdistill.diffusion import NoisedBatch

    return NoisedBatch(torch.where(masked, torch.full_like(ids, mask_id), ids), masked, p_mask, p_mask)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_loss_normalisation_by_hand(monkeypatch, normalization):
    import math

    import dlmdistill.methods.sft as sft

    # two samples: response lengths 4 and 2; masked positions 2 + 1 (sample 0) and 1 (sample 1)
    ids = torch.tensor([[7, 8, 3, 4, 5, 6], [7, 8, 3, 4, 0, 0]])
    resp = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    masked = torch.tensor([[0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    p_mask = torch.tensor([0.5, 0.25])
    monkeypatch.setattr(sft, "forward_process", lambda *a, **k: _hand_noised(ids, masked, p_mask, 1))
    vocab = 10
    model = lambda x, attn, positions: torch.zeros(int(positions.sum()), vocab)  # noqa: E731  uniform: nll = log V
    batch = {"input_ids": ids, "response_mask": resp, "attention_mask": torch.ones_like(ids),
             "prompt_mask": ~resp & (ids != 0)}
    loss, _ = sft.diffusion_batch_loss(model, batch, mask_id=1, normalization=normalization)
    nll = math.log(vocab)
    if normalization == "token":  # SMDM: sum_i nll_i / p_i over masked, / response tokens in the batch (6)
        want = (3 * nll / 0.5 + nll / 0.25) / 6
    else:  # LLaDA: per sample, sum / (p * L_b), then the mean over the 2 samples
        want = ((3 * nll / 0.5) / 4 + (nll / 0.25) / 2) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("cfg_prob", [0.0, 1.0])
def test_cfg_training_masks_the_whole_prompt(monkeypatch, cfg_prob):
    import dlmdistill.methods.sft as sft

    ids = torch.tensor([[0, 7, 8, 3, 4, 5], [7, 8, 9, 3, 4, 6]])  # sample 0 has one left-padding position
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 3:] = True
    masked = torch.zeros_like(resp)
    masked[:, 4] = True
    monkeypatch.setattr(sft, "forward_process", lambda *a, **k: _hand_noised(ids, masked, torch.ones(2), 1))
    seen = []
    model = lambda x, attn, positions: seen.append(x) or torch.zeros(int(positions.sum()), 10)  # noqa: E731
    batch = {"input_ids": ids, "response_mask": resp, "attention_mask": (ids != 0).long(),
             "prompt_mask": ~resp & (ids != 0)}
    sft.diffusion_batch_loss(model, batch, mask_id=1, cfg_prob=cfg_prob)
    x = seen[0]
    want = ids.clone()
    want[:, 4] = 1
    if cfg_prob == 1.0:  # every prompt token masked, padding and response untouched
        want[0, 1:3] = 1
        want[1, :3] = 1
    assert torch.equal(x, want)


def test_cfg_sampling_mixes_conditional_and_unconditional_logits_as_un_plus_w1_times_the_difference(tokenizer):
    # Stub logits over the tokens a, b, c: conditional (1.0, 0, 1.2), unconditional (prompt masked) (0, 0, 1.5).
    # Guided, by hand: un + (w + 1)(cond - un) = (1 + w, 0, 1.2 - 0.3 w), so token a wins iff w > 2 / 13 = 0.154.
    # Other mixes differ: un + w (cond - un) = (w, 0, 1.5 - 0.3 w) would still pick c at w = 1.
    from dlmdistill.sampling import GenerationConfig, generate

    model, tok = tiny_model(tokenizer)
    a, b, c = 10, 11, 12
    prompt = tok("abc=", add_special_tokens=False).input_ids

    def forward(x, attn, positions):
        rows = positions.nonzero(as_tuple=True)[0]
        uncond = (x[:, :len(prompt)] == model.mask_id).all(1)[rows]
        out = torch.full((rows.numel(), model.vocab_size), -30.0)
        out[:, a] = torch.where(uncond, 0.0, 1.0)
        out[:, b] = 0.0
        out[:, c] = torch.where(uncond, 1.5, 1.2)
        return out

    def first_token(w):
        gen = GenerationConfig(gen_length=2, steps=2, temperature=0.0, cfg_scale=w)
        return int(generate(model, [prompt], gen, forward=forward).responses[0, 0])

    assert first_token(0.0) == c  # no guidance: the conditional logits alone
    assert first_token(0.1) == c  # (1.1, 0, 1.17)
    assert first_token(0.2) == a  # (1.2, 0, 1.14)
    assert first_token(1.0) == a  # w = 1, SelfFusion's evaluation setting: (2.0, 0, 0.9)


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
