import json
import math

import pytest
import torch

from dlmdistill.losses.policy import group_advantages, k3_kl, ppo_clip_loss
from dlmdistill.methods.diffu_grpo import (DiffuGRPOConfig, DiffuGRPORunConfig, DiffuGRPOTrainer, mask_for_estimate,
                                           token_logps)
from dlmdistill.sampling import GenerationConfig
from dlmdistill.training import latest_checkpoint
from tests.conftest import ROOT, tiny_model
from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

GEN = GenerationConfig(gen_length=16, steps=8, block_length=4, temperature=1.0, batch_size=16)


def test_group_advantages_on_a_hand_built_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert group_advantages(rewards, 4).tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    scaled = group_advantages(rewards, 4, scale=True)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    assert scaled[:4].tolist() == pytest.approx([a, -a, -a, a])
    assert scaled[4:].tolist() == [0.0] * 4  # a group with one reward has no signal
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_clipped_surrogate_and_k3_by_hand():
    logp = torch.log(torch.tensor([2.0, 0.2, 1.0]))
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 0.5])
    out = ppo_clip_loss(logp, old, adv, epsilon=0.5)
    # r = 2, A = 1 -> -min(2, 1.5) ; r = 0.2, A = -1 -> -min(-0.2, -0.5) ; r = 1 -> -A
    assert out.per_token.tolist() == pytest.approx([-1.5, 0.5, -0.5])
    assert out.clipped.tolist() == [True, True, False]
    assert k3_kl(logp, logp).abs().max() == 0
    # d = ref - logp: exp(d) - d - 1 = 0.5 + ln 2 - 1, 5 - ln 5 - 1, 0
    assert k3_kl(logp, old).tolist() == pytest.approx([math.log(2) - 0.5, 4 - math.log(5), 0.0], abs=1e-6)
    with_kl = ppo_clip_loss(logp, old, adv, epsilon=0.5, ref_logp=old, beta=0.04)
    torch.testing.assert_close(with_kl.per_token, out.per_token + 0.04 * k3_kl(logp, old))


def make_trainer(tokenizer, out, verdict=None, **method_kw):
    model, tok = tiny_model(tokenizer)
    examples = stub_examples(4)
    kw = dict(rollout=GEN, num_generations=4, num_iterations=2, micro_batch_size=6)
    kw.update(method_kw)
    return DiffuGRPOTrainer(model.train(), tok, items_for(examples, tok, GEN.gen_length),
                            training_config(out, per_device_train_batch_size=2),
                            task=StubTask(verdict or (lambda i, c: float(len(c) % 2 == 0))), examples=examples,
                            method=DiffuGRPOConfig(**kw))


def test_estimator_is_reproducible_per_seed_and_differs_across_iterations(tokenizer, tmp_path):
    t = make_trainer(tokenizer, tmp_path, num_iterations=3)
    seeds = t.mask_seeds()
    assert len(set(seeds)) == 3 and t.mask_seeds() == seeds  # fresh per iteration, same for this batch
    ids = torch.randint(5, 40, (6, 40))
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, 2:24] = True  # columns 0-1: left padding
    resp = torch.zeros_like(prompt)
    resp[:, 24:] = True
    before = torch.get_rng_state()
    noisy = [mask_for_estimate(ids, prompt, resp, mask_id=3, p_mask_prompt=0.15,
                               generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never touched
    again = mask_for_estimate(ids, prompt, resp, mask_id=3, p_mask_prompt=0.15,
                              generator=torch.Generator().manual_seed(seeds[0]))
    assert torch.equal(noisy[0], again)
    assert not torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[1], noisy[2])
    for x in noisy:
        assert (x[resp] == 3).all() and torch.equal(x[:, :2], ids[:, :2])  # responses masked, padding kept
    frac = torch.stack([(x[prompt] == 3).float().mean() for x in noisy]).mean()
    assert 0.05 < frac < 0.3
    model = t.unwrapped
    fn = lambda i, a, p: model(i, a, positions=p)  # noqa: E731
    attn = torch.ones_like(ids)
    with torch.no_grad():
        a, b = token_logps(fn, noisy[0], attn, ids, resp), token_logps(fn, again, attn, ids, resp)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mu", [1, 2])
def test_one_optimizer_step_per_inner_iteration(tokenizer, tmp_path, mu):
    t = make_trainer(tokenizer, tmp_path, num_iterations=mu, beta=0.04)
    t.train()
    assert t.state.global_step == 2
    assert t.scheduler.last_epoch == 2 * mu  # mu optimizer (and schedule) steps per rollout batch
    adam_steps = {int(s["step"]) for s in t.optimizer.state.values()}
    assert adam_steps == {2 * mu}
    logs = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    assert logs[-1]["optimizer_steps"] == 2 * mu
    for key in ("loss", "kl", "clip_fraction", "reward", "accuracy", "completion_length", "reward_std"):
        assert key in logs[-1], key


def countdown_config(out, evaluate=True, **training):
    from dlmdistill.data import DataConfig
    from dlmdistill.methods.common import TrainEvalConfig
    from dlmdistill.models import ModelConfig

    return DiffuGRPORunConfig(
        model=ModelConfig(tokenizer="char", preset_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                              "num_attention_heads": 4}),
        data=DataConfig(task="countdown", train_limit=8, max_length=64),
        training=training_config(out, per_device_train_batch_size=2, save_steps=1, eval_steps=1, **training),
        eval=TrainEvalConfig(enabled=evaluate, limit=4,
                             generation=GenerationConfig(gen_length=16, steps=8, block_length=4)),
        method=DiffuGRPOConfig(rollout=GEN, num_generations=4, num_iterations=2, micro_batch_size=8))


def test_short_countdown_run_logs_and_resumes(tmp_path, monkeypatch):
    from dlmdistill.methods import get_method
    from dlmdistill.tasks.countdown import CountdownTask

    monkeypatch.setattr(CountdownTask, "score", lambda self, ex, c: float(len(c) % 2 == 0))
    cls, run = get_method("diffu-grpo")
    assert cls is DiffuGRPORunConfig
    torch.manual_seed(0)
    run(countdown_config(tmp_path / "run"))
    logs = [json.loads(line) for line in open(tmp_path / "run" / "logs.jsonl")]
    assert "loss" in logs[-2] and "kl" in logs[-2] and any("eval/accuracy" in r for r in logs)
    run(countdown_config(tmp_path / "run", evaluate=False, max_steps=3, resume=True))
    torch.manual_seed(0)
    run(countdown_config(tmp_path / "ref", evaluate=False, max_steps=3))
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("diffu_grpo_*.yaml")))
def test_example_configs_parse(path):
    from dlmdistill.config import load_config

    assert load_config(DiffuGRPORunConfig, ROOT / "configs" / path).method.num_iterations >= 1


def test_ratio_is_taken_against_the_rollout_policy_under_the_same_mask(tokenizer, tmp_path, monkeypatch):
    import copy

    import dlmdistill.methods.diffu_grpo as dg

    t = make_trainer(tokenizer, tmp_path, num_iterations=3, micro_batch_size=64, beta=0.0)
    t.score = lambda indices, responses: torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0])  # non-zero advantages
    initial = copy.deepcopy(t.unwrapped).eval()
    calls, seeds = [], []
    real_loss, real_seeds = dg.ppo_clip_loss, t.mask_seeds
    monkeypatch.setattr(dg, "ppo_clip_loss", lambda logp, old, *a, **k: calls.append((logp.detach(), old))
                        or real_loss(logp, old, *a, **k))
    t.mask_seeds = lambda: seeds.extend(real_seeds()) or list(seeds)
    real_rollout = t.rollout
    t.rollout = lambda *a, **k: calls.append(real_rollout(*a, **k)[0]) or (calls[-1], None)
    stepped, _ = t.training_step([t.train_dataset[i] for i in range(2)])
    assert stepped
    responses, iters = calls[0], calls[1:]
    assert len(iters) == 3  # one micro-batch per inner iteration
    prompts = [list(t.train_dataset[i]["prompt_ids"]) for i in range(2) for _ in range(4)]
    ids, attn, p = dg.prompt_and_response_inputs(prompts, responses, t.pad_id)
    resp = dg.with_prompt_columns(torch.ones_like(responses, dtype=torch.bool), p)
    prompt_mask = attn.bool() & ~resp
    lengths = dg.response_lengths(responses, t.unwrapped.eos_id)
    scored = dg.with_prompt_columns(torch.arange(GEN.gen_length)[None] <= lengths[:, None], p)
    fn = lambda i, a, pos: initial(i, a, positions=pos)  # noqa: E731
    for it, (logp, old) in enumerate(iters):
        noisy = t._noisy(ids, prompt_mask, resp, seeds[it])
        with torch.no_grad():
            want = token_logps(fn, noisy, attn, ids, scored)
        torch.testing.assert_close(old, want, rtol=1e-5, atol=1e-5)  # the rollout policy, this iteration's mask
        ratio = torch.exp(logp - old)
        if it == 0:
            assert torch.equal(ratio, torch.ones_like(ratio))
        else:
            assert (ratio - 1).abs().max() > 1e-4  # the policy moved: the ratio is no longer 1


def test_tokens_after_the_first_eos_are_not_scored_in_a_trainer_step(tokenizer, tmp_path, monkeypatch):
    import dlmdistill.methods.diffu_grpo as dg

    t = make_trainer(tokenizer, tmp_path, num_iterations=1, micro_batch_size=64, beta=0.04)
    eos, g = t.unwrapped.eos_id, GEN.gen_length
    real_rollout = t.rollout

    def rollout(*a, **k):
        responses, traj = real_rollout(*a, **k)
        responses = torch.where(responses == eos, torch.full_like(responses, 10), responses)
        for r in range(responses.shape[0]):  # completion r ends at position 2 r (the last has no EOS)
            if 2 * r < g:
                responses[r, 2 * r] = eos
        return responses, traj

    t.rollout = rollout
    seen = []
    real_loss = dg.ppo_clip_loss
    monkeypatch.setattr(dg, "ppo_clip_loss",
                        lambda logp, *a, **k: seen.append(logp.numel()) or real_loss(logp, *a, **k))
    stepped, m = t.training_step([t.train_dataset[i] for i in range(2)])
    n = 8  # 2 prompts x 4 completions
    assert stepped and seen == [sum(2 * r + 1 for r in range(n))]  # tokens up to and including the first EOS
    assert m["completion_length"] == pytest.approx(sum(2 * r for r in range(n)) / n)
