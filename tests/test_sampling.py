import pytest
import torch

from dlmdistill.sampling import (GenerationConfig, generate, generate_reference, gumbel_argmax, left_pad,
                                 num_transfer_tokens, topk_mask)


def _prompts(n=3, length=6, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n, length), generator=g)


@pytest.mark.parametrize("block_length,steps", [(None, 8), (8, 8), (4, 16), (8, 4)])
def test_all_masks_filled_with_scheduled_commits(model_and_tok, block_length, steps):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=16, steps=steps, block_length=block_length)
    prompt = _prompts()
    out = generate(model, prompt, cfg, return_trajectory=True)
    assert not (out.responses == model.mask_id).any()
    assert torch.equal(out.sequences[:, :6], prompt)
    traj = out.trajectory
    assert traj.num_steps == steps
    per_step = traj.committed.sum(-1)  # [S, B]
    block = cfg.block_length or cfg.gen_length
    expected = num_transfer_tokens(torch.tensor([block]), cfg.steps_per_block)[0].repeat(cfg.num_blocks)
    assert torch.equal(per_step, expected[:, None].expand_as(per_step))
    # every position is committed exactly once
    assert torch.equal(traj.committed.sum(0), torch.ones_like(out.responses))


def test_blocks_decoded_in_order_and_trajectory_consistent(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=16, steps=8, block_length=4)
    out = generate(model, _prompts(), cfg, return_trajectory=True)
    t = out.trajectory
    for s in range(t.num_steps):
        blk = int(t.block[s])
        cols = t.committed[s].any(0).nonzero().flatten()
        assert ((cols // 4) == blk).all(), "commits outside the current block"
        # blocks before the current one are complete, blocks after are untouched
        assert not (t.states[s][:, : blk * 4] == model.mask_id).any()
        assert (t.states[s][:, (blk + 1) * 4:] == model.mask_id).all()
        # state s + committed tokens of step s == state s + 1
        nxt = t.states[s + 1] if s + 1 < t.num_steps else out.responses
        assert torch.equal(torch.where(t.committed[s], nxt, t.states[s]), nxt)
        assert (t.states[s][t.committed[s]] == model.mask_id).all()
    assert torch.equal(t.block, torch.arange(4).repeat_interleave(2))


def test_matches_reference_llada_loop_greedy(model_and_tok):
    model, _ = model_and_tok
    for cfg in [GenerationConfig(gen_length=12, steps=6), GenerationConfig(gen_length=12, steps=12, block_length=4)]:
        p = _prompts(4, 5)
        assert torch.equal(generate(model, p, cfg).sequences, generate_reference(model, p, cfg))


def test_greedy_is_deterministic_and_padding_does_not_change_a_sample(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=12, steps=6, block_length=6)
    prompts = [[7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
    batched = generate(model, prompts, cfg).responses
    assert torch.equal(batched, generate(model, prompts, cfg).responses)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], cfg).responses[0]
        assert torch.equal(alone, batched[i])


def test_temperature_sampling_reproducible_with_generator(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=8, steps=4, temperature=1.0)
    p = _prompts()
    a = generate(model, p, cfg, generator=torch.Generator().manual_seed(3)).sequences
    b = generate(model, p, cfg, generator=torch.Generator().manual_seed(3)).sequences
    c = generate(model, p, cfg, generator=torch.Generator().manual_seed(4)).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_remasking_and_cfg_fill_everything(model_and_tok):
    model, _ = model_and_tok
    for cfg in [GenerationConfig(gen_length=8, steps=4, remasking="random"),
                GenerationConfig(gen_length=8, steps=8, cfg_scale=1.5)]:
        out = generate(model, [[6, 7, 8], [9]], cfg, generator=torch.Generator().manual_seed(0))
        assert not (out.responses == model.mask_id).any()


def test_init_response_keeps_given_tokens(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=8, steps=4)
    init = torch.full((2, 8), model.mask_id)
    init[:, [1, 5]] = 9
    out = generate(model, _prompts(2), cfg, init_response=init, return_trajectory=True)
    assert (out.responses[:, [1, 5]] == 9).all()
    assert not (out.responses == model.mask_id).any()
    # 6 masked positions over 4 steps: 2, 2, 1, 1
    assert out.trajectory.committed.sum(-1)[:, 0].tolist() == [2, 2, 1, 1]


def test_gumbel_argmax_samples_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(60000, 3)
    g = torch.Generator().manual_seed(0)
    draws = gumbel_argmax(logits, 1.0, g)
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.01, rtol=0)
    hot = gumbel_argmax(logits[:1000], 0.5, g)
    assert (torch.bincount(hot, minlength=3).double() / 1000)[2] > torch.softmax(logits[0].double(), -1)[2]
    assert (gumbel_argmax(logits[:5], 0.0) == 2).all()


def test_schedule_and_topk_helpers():
    assert num_transfer_tokens(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]
    m = topk_mask(torch.tensor([[0.1, 0.9, float("-inf"), 0.5], [1.0, 2.0, 3.0, 4.0]]), torch.tensor([2, 1]))
    assert m.tolist() == [[False, True, False, True], [False, False, False, True]]
    ids, am = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and am.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="multiple of block_length"):
        GenerationConfig(gen_length=10, steps=5, block_length=4).validate()
    with pytest.raises(ValueError, match="number of blocks"):
        GenerationConfig(gen_length=16, steps=6, block_length=4).validate()
