import torch

from dlmdistill.diffusion import (EPS, apply_mask, diffusion_loss_weights, forward_process, mask_probability,
                                  mask_prompts_for_cfg, sample_t)
from dlmdistill.losses.diffusion import masked_diffusion_loss


def test_masking_rate_matches_p_mask_on_average():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (4, 4000), generator=g)
    resp = torch.ones_like(ids, dtype=torch.bool)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9])
    out = apply_mask(ids, resp, t, mask_id=1, generator=g)
    rate = out.masked.float().mean(dim=1)
    expected = mask_probability(t)
    assert torch.allclose(rate, expected, atol=0.025), (rate, expected)
    assert torch.equal(out.noisy_ids == 1, out.masked)


def test_prompt_never_masked_and_unmasked_tokens_kept():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (64, 20), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 8:] = True
    out = forward_process(ids, resp, mask_id=1, generator=g)
    assert not out.masked[:, :8].any()
    assert torch.equal(out.noisy_ids[:, :8], ids[:, :8])
    assert torch.equal(out.noisy_ids[~out.masked], ids[~out.masked])
    assert out.masked[:, 8:].any()


def test_t_is_uniform_and_p_mask_floor():
    t = sample_t(20000, generator=torch.Generator().manual_seed(2))
    assert 0.48 < t.mean() < 0.52 and t.min() >= 0 and t.max() <= 1
    assert mask_probability(torch.tensor(0.0)) == EPS
    easy = sample_t(20000, high=t, generator=torch.Generator().manual_seed(3))
    assert (easy <= t).all()


def test_loss_weights_token_and_sequence_normalisation_by_hand():
    # two sequences, response lengths 2 and 4; masked positions as below
    resp = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    masked = torch.tensor([[0, 1, 0, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    p = torch.tensor([0.5, 0.25])
    nll = torch.tensor([[0, 2.0, 0, 0, 0], [0, 1.0, 3.0, 0, 4.0]])
    # token: sum(nll / p) / N, N = 6 response tokens -> (2/0.5 + (1+3+4)/0.25) / 6 = (4 + 32) / 6 = 6
    w = diffusion_loss_weights(masked, p, resp, "token")
    assert torch.isclose((w * nll).sum(), torch.tensor(6.0))
    # sequence: mean_b (sum_b nll/p / L_b) = ((4 / 2) + (32 / 4)) / 2 = 5
    w = diffusion_loss_weights(masked, p, resp, "sequence")
    assert torch.isclose((w * nll).sum(), torch.tensor(5.0))
    assert (w[~masked] == 0).all()


def test_masked_diffusion_loss_matches_weighted_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    weights = torch.tensor([0.5, 2.0])
    lse = torch.logsumexp(logits, -1)
    expected = 0.5 * (lse[0] - 2.0) + 2.0 * (lse[1] - 0.0)
    assert torch.isclose(masked_diffusion_loss(logits, targets, weights), expected)


def test_cfg_prompt_masking():
    ids = torch.arange(10).repeat(100, 1) + 5
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :4] = True
    out = mask_prompts_for_cfg(ids, prompt, mask_id=1, prob=0.3, generator=torch.Generator().manual_seed(0))
    dropped = (out[:, :4] == 1).all(dim=1)
    assert 15 < dropped.sum() < 45
    assert ((out[:, :4] == 1).any(dim=1) == dropped).all()  # all or nothing per sequence
    assert torch.equal(out[:, 4:], ids[:, 4:])


def test_response_rows_by_hand():
    """The collator's response_index and ResponseRows: row 0 = prompt of 2 + response of 3, row 1 = prompt of 3 +
    response of 1 (no EOS padding): positions 2, 3, 4 and 3, then -1 padding (position 0, not valid)."""
    from dlmdistill.data import DiffusionCollator
    from dlmdistill.diffusion import ResponseRows

    batch = DiffusionCollator(pad_id=0, eos_id=9, pad_response_with_eos=False)(
        [{"prompt_ids": [5, 6], "response_ids": [7, 8, 9]}, {"prompt_ids": [5, 6, 7], "response_ids": [9]}])
    assert batch["response_index"].tolist() == [[2, 3, 4], [3, -1, -1]]
    at = ResponseRows.of(batch["response_index"])
    assert at.rows.tolist() == [0, 0, 0, 1, 1, 1] and at.cols.tolist() == [2, 3, 4, 3, 0, 0]
    assert at.valid.tolist() == [True, True, True, True, False, False]
    assert at.gather(batch["input_ids"]).tolist() == [7, 8, 9, 9, 5, 5]
    assert at.gather(batch["response_mask"]).tolist() == at.valid.tolist()
