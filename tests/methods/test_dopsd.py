import json

import pytest
import torch

from dlmdistill.methods.dopsd import (DOPSDConfig, DOPSDRunConfig, DOPSDTrainer, confident_positions,
                                      current_block_mask, flatten_trajectories, self_future_teacher_states,
                                      step_logits)
from dlmdistill.sampling import GenerationConfig, generate
from dlmdistill.training import latest_checkpoint
from tests.conftest import ROOT, tiny_model
from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

GEN = GenerationConfig(gen_length=16, steps=8, block_length=4, temperature=1.0, batch_size=8)


def block_states(final: torch.Tensor, mask_id: int, block_length: int, rng: torch.Generator):
    """Step-like states: blocks before the current one decoded, the current one partly decoded."""
    n, g = final.shape
    blocks = torch.randint(0, g // block_length, (n,), generator=rng)
    states = torch.full_like(final, mask_id)
    for r in range(n):
        lo = int(blocks[r]) * block_length
        filled = int(torch.randint(0, block_length, (1,), generator=rng))
        states[r, :lo + filled] = final[r, :lo + filled]
    return states, blocks


def test_self_future_teacher_reveals_rho_of_the_masked_positions_outside_the_current_block():
    rng = torch.Generator().manual_seed(0)
    mask, g, block = 99, 32, 8
    final = torch.randint(0, 50, (64, g), generator=rng)
    states, blocks = block_states(final, mask, block, rng)
    student = states.clone()
    teacher = self_future_teacher_states(states, final, blocks, block_length=block, mask_id=mask, rho=0.25,
                                         generator=rng)
    assert torch.equal(states, student)  # the student input is untouched
    revealed = teacher != states
    current = current_block_mask(blocks, block, g)
    assert not (revealed & current).any()  # never the current block
    assert not (revealed & (states != mask)).any()  # only still-masked positions
    assert torch.equal(teacher[revealed], final[revealed])  # revealed tokens are y_0's
    eligible = (states == mask) & ~current
    assert torch.equal(revealed.sum(1), torch.div(eligible.sum(1), 4, rounding_mode="floor"))  # floor(rho * n)
    assert revealed.sum() > 0


def test_teacher_rounding_and_eos_exclusion():
    mask, eos = 99, 7
    states = torch.full((1, 110), mask)
    final = torch.arange(110)[None] % 5 + 10
    blocks = torch.zeros(1, dtype=torch.long)
    t = self_future_teacher_states(states, final, blocks, block_length=10, mask_id=mask, rho=0.29)
    assert int((t != mask).sum()) == 29  # floor(0.29 * 100), not 28 from float error
    final[0, 60] = eos
    t = self_future_teacher_states(states, final, blocks, block_length=10, mask_id=mask, rho=1.0, eos_id=eos)
    revealed = (t != mask).nonzero(as_tuple=True)[1]
    assert revealed.min() == 10 and revealed.max() == 60  # up to and including the first EOS


def test_confidence_ranks_by_probability_not_raw_logit():
    # position 0: flat logits of 5 (top probability 1/3); position 1: one logit of 1, others -10 (~1.0)
    logits = torch.tensor([[5.0, 5.0, 5.0], [1.0, -10.0, -10.0]])
    cand = torch.tensor([[True, True]])
    chosen = confident_positions(logits, cand, torch.tensor([1]))
    assert chosen.tolist() == [[False, True]]


@pytest.mark.parametrize("select", ["teacher", "student", "committed"])
def test_step_positions_cover_the_answer_once_within_the_current_block(tokenizer, select):
    model, tok = tiny_model(tokenizer)
    prompts = [tok(ex.prompt).input_ids for ex in stub_examples(3)]
    out = generate(model, prompts, GEN, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    steps = flatten_trajectories(out.trajectory, [0, 1, 2], block_length=4, mask_id=model.mask_id)
    steps.teacher = self_future_teacher_states(steps.states, out.responses[steps.rows],
                                               out.trajectory.block[steps.step], block_length=4,
                                               mask_id=model.mask_id, rho=0.5)
    fn = lambda ids, attn, pos: model(ids, attn, positions=pos)  # noqa: E731
    rows = steps.rows.tolist()
    res = step_logits(fn, fn, steps, [prompts[r] for r in rows], [prompts[r] for r in rows],
                      pad_id=tok.pad_token_id, select=select)
    assert res.student.shape == res.teacher.shape == (int(steps.k.sum()), model.vocab_size)
    assert torch.equal(res.positions.sum(1), steps.k)  # |K_t| = tokens committed at the step, per sample
    assert not (res.positions & ~steps.candidates).any()  # masked positions of the current block only
    per_traj = torch.zeros(3, dtype=torch.long).index_add_(0, steps.rows, res.positions.sum(1))
    assert per_traj.tolist() == [GEN.gen_length] * 3  # sum_t |K_t| = L (eq. 10)
    if select == "teacher":  # the chosen ones are the teacher's most confident candidates
        t_ids = torch.cat([torch.tensor([prompts[r] for r in rows]), steps.teacher], 1)
        probs = torch.softmax(model(t_ids)[:, len(prompts[0]):].float(), -1).amax(-1)
        for r in range(len(steps)):
            chosen, other = probs[r][res.positions[r]], probs[r][steps.candidates[r] & ~res.positions[r]]
            assert other.numel() == 0 or chosen.min() >= other.max() - 1e-6


def make_trainer(tokenizer, out, verdict, *, model=None, method=None, **train_kw):
    if model is None:
        model, tokenizer = tiny_model(tokenizer)
    examples = stub_examples(4)
    method = method or DOPSDConfig(rollout=GEN, pass_k=2, micro_batch_size=16)
    return DOPSDTrainer(model.train(), tokenizer, items_for(examples, tokenizer, GEN.gen_length),
                        training_config(out, **train_kw), task=StubTask(verdict), examples=examples, method=method)


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped.named_parameters()}


def test_rejected_batch_takes_no_step_and_changes_nothing(tokenizer, tmp_path):
    t = make_trainer(tokenizer, tmp_path, lambda i, c: 0.0)
    before = params(t)
    batch = [t.train_dataset[i] for i in range(4)]
    stepped, m = t.training_step(batch)
    assert not stepped and m["skipped"] == 1.0 and m["accepted"] == 0.0 and m["attempts"] == 2.0
    assert "loss" not in m
    after = params(t)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(t.optimizer.state) == 0 and all(p.grad is None for p in t.unwrapped.parameters())
    assert t.state.global_step == 0 and t.state.skipped_steps == 1
    t.method.max_consecutive_skips = 3
    with pytest.raises(RuntimeError, match="3 rollout batches in a row"):
        t.train()
    assert t.state.global_step == 0


def test_only_accepted_trajectories_are_trained(tokenizer, tmp_path):
    t = make_trainer(tokenizer, tmp_path, lambda i, c: float(i == 0))
    seen = []
    orig = t.step_states
    t.step_states = lambda roll, rows: seen.append(orig(roll, rows)) or seen[-1]
    stepped, m = t.training_step([t.train_dataset[i] for i in range(4)])
    assert stepped and m["trained_trajectories"] == 1.0 and m["accepted"] == 0.25
    assert m["attempts"] == pytest.approx((1 + 2 + 2 + 2) / 4) and m["reward"] == 0.25
    assert set(seen[0].rows.tolist()) == {0} and len(seen[0]) == GEN.steps
    assert len(t.optimizer.state) > 0
    for key in ("loss", "clip_ratio", "topk_overlap", "completion_length", "accuracy", "grad_norm"):
        assert key in m
    # correct_only=false trains on every prompt's kept trajectory
    t.method.correct_only = False
    stepped, m = t.training_step([t.train_dataset[i] for i in range(4)])
    assert stepped and m["trained_trajectories"] == 4.0


def probe(trainer, tok):
    ids = torch.tensor([tok(stub_examples(1)[0].prompt).input_ids + [trainer.unwrapped.mask_id] * GEN.gen_length])
    pos = ids == trainer.unwrapped.mask_id
    attn = torch.ones_like(ids)
    with torch.no_grad():
        teacher = trainer.initial_policy_logits(ids, attn, pos)
        student = trainer.current_policy_logits(ids, attn, pos)
    return teacher, student


@pytest.mark.parametrize("lora", [True, False])
def test_fixed_teacher_stays_the_initial_policy_while_the_student_moves(tokenizer, tmp_path, lora):
    from dlmdistill.models import ModelConfig, build_model

    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                           "num_attention_heads": 4},
                                         lora_r=4 if lora else 0, lora_dropout=0.0), tokenizer=tokenizer)
    t = make_trainer(tok, tmp_path, lambda i, c: 1.0, model=model, learning_rate=5e-2)
    assert (t.frozen_policy is None) == lora  # LoRA: adapters disabled, no copy
    t0, s0 = probe(t, tok)
    torch.testing.assert_close(t0, s0)  # both start as the initial policy
    t.train()
    assert t.state.global_step == 2
    t1, s1 = probe(t, tok)
    torch.testing.assert_close(t1, t0, rtol=0, atol=0)
    assert (s1 - s0).abs().max() > 1e-3


def test_current_teacher_and_options_train(tokenizer, tmp_path):
    method = DOPSDConfig(rollout=GEN, pass_k=1, micro_batch_size=5, teacher="current", positions="student",
                         divergence="jsd", vocab_top_k=5, clip_mode="per_token",
                         teacher_context="reference_prefix", correct_only=False)
    model, tok = tiny_model(tokenizer)
    examples = stub_examples(4)
    t = DOPSDTrainer(model.train(), tok, items_for(examples, tok, GEN.gen_length, "{prompt}{target}\n"),
                     training_config(tmp_path), task=StubTask(lambda i, c: 0.0), examples=examples, method=method)
    assert t.frozen_policy is None
    t.train()
    assert t.state.global_step == 2


def countdown_config(out, evaluate=True, **training):
    from dlmdistill.data import DataConfig
    from dlmdistill.methods.common import TrainEvalConfig
    from dlmdistill.models import ModelConfig

    small = GenerationConfig(gen_length=16, steps=8, block_length=4, batch_size=8)
    return DOPSDRunConfig(
        model=ModelConfig(tokenizer="char", preset_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                              "num_attention_heads": 4}),
        data=DataConfig(task="countdown", train_limit=8, max_length=64),
        training=training_config(out, per_device_train_batch_size=4, save_steps=1, eval_steps=1, **training),
        eval=TrainEvalConfig(enabled=evaluate, limit=4, generation=small),
        method=DOPSDConfig(rollout=GEN, pass_k=2, micro_batch_size=16))


def test_short_countdown_run_logs_and_resumes(tmp_path, monkeypatch):
    from dlmdistill.methods import get_method
    from dlmdistill.tasks.countdown import CountdownTask

    # an untrained model never solves Countdown: accept completions of even length instead
    monkeypatch.setattr(CountdownTask, "score", lambda self, ex, c: float(len(c) % 2 == 0))
    cls, run = get_method("dopsd")
    assert cls is DOPSDRunConfig
    torch.manual_seed(0)  # a preset model is initialised from the global RNG
    metrics = run(countdown_config(tmp_path / "run"))
    assert "accuracy" in metrics
    logs = [json.loads(line) for line in open(tmp_path / "run" / "logs.jsonl")]
    train_logs = [r for r in logs if "loss" in r]
    for key in ("loss", "clip_ratio", "topk_overlap", "completion_length", "attempts", "reward", "accuracy",
                "accepted", "lr"):
        assert key in train_logs[-1], key
    assert any("eval/accuracy" in r for r in logs)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000002"
    run(countdown_config(tmp_path / "run", evaluate=False, max_steps=3, resume=True))
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"
    # an uninterrupted 3-step run ends with the same weights
    torch.manual_seed(0)
    run(countdown_config(tmp_path / "ref", evaluate=False, max_steps=3))
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_toy_regeneration_from_the_self_teacher(tokenizer):
    from dlmdistill.methods.dopsd import regenerate_from_self_teacher

    model, tok = tiny_model(tokenizer)
    examples = stub_examples(3)
    report = regenerate_from_self_teacher(model, tok, StubTask(lambda i, c: float(i == 0)), examples, GEN,
                                          rhos=(0.0, 0.5, 1.0), pass_k=2)
    assert report["n"] == 3 and report["student"] == pytest.approx(100 / 3) and report["pass@2"] == pytest.approx(100 / 3)
    outside_first_block = (GEN.gen_length - 4) / GEN.gen_length
    assert report["revealed_fraction"] == pytest.approx({0.0: 0.0, 0.5: outside_first_block / 2,
                                                         1.0: outside_first_block})
    assert set(report["self_teacher"]) == {0.0, 0.5, 1.0}


def test_overlap_is_one_when_the_teacher_sees_what_the_student_sees(tokenizer):
    from dlmdistill.methods.dopsd import compare_teacher_overlap

    model, tok = tiny_model(tokenizer)
    task = StubTask(lambda i, c: 1.0)
    same = compare_teacher_overlap(model, tok, task, stub_examples(2), GEN, rho=0.0, reference_template="{prompt}")
    for name in ("self_future", "reference_prefix"):
        assert same[name]["mean"] == pytest.approx(1.0) and len(same[name]["per_step"]) == GEN.steps
    diff = compare_teacher_overlap(model, tok, task, stub_examples(2), GEN, rho=1.0, k=5)
    assert 0.0 <= diff["self_future"]["mean"] <= 1.0 and 0.0 <= diff["reference_prefix"]["mean"] <= 1.0


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("dopsd_*.yaml")))
def test_example_configs_parse(path):
    from dlmdistill.config import load_config

    cfg = load_config(DOPSDRunConfig, ROOT / "configs" / path)
    assert cfg.method.rollout.num_blocks > 1  # the self-future teacher needs blocks
