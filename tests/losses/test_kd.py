import pytest
import torch

from dlmdistill.losses.kd import kl_per_row, logit_kd_loss


def _logits(n=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


def test_kl_matches_definition_in_both_directions():
    t, s = _logits()
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    fwd = (p * (p.log() - q.log())).sum(-1)
    rev = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(kl_per_row(t, s, 2.0, "forward"), fwd)
    torch.testing.assert_close(kl_per_row(t, s, 2.0, "reverse"), rev)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_zero_for_identical_logits(divergence):
    t, _ = _logits()
    assert logit_kd_loss(t, t.clone(), 3.0, divergence).abs().item() < 1e-6


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_loss_scales_as_t_squared_for_fixed_tempered_distributions(temperature):
    # softmax(T * z / T) = softmax(z): the distributions compared are the same, only the T^2 factor changes
    t, s = _logits()
    base = logit_kd_loss(t, s, 1.0)
    scaled = logit_kd_loss(temperature * t, temperature * s, temperature)
    torch.testing.assert_close(scaled, temperature ** 2 * base, rtol=1e-5, atol=1e-6)


def test_gradient_magnitude_is_temperature_independent_at_high_temperature():
    # Hinton et al.: d/dz_s [T^2 KL] = T (q_s - p_t) -> ((z_s - mean z_s) - (z_t - mean z_t)) / V as T grows
    t, s = _logits(n=3, v=7)
    expected = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / 7 / 3
    for temperature in (200.0, 2000.0):
        s_ = s.clone().requires_grad_(True)
        logit_kd_loss(t, s_, temperature).backward()
        torch.testing.assert_close(s_.grad, expected, rtol=0.02, atol=1e-4)


def test_teacher_gets_no_gradient():
    t, s = _logits()
    t.requires_grad_(True)
    s.requires_grad_(True)
    logit_kd_loss(t, s, 2.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_float32_with_low_precision_inputs_and_masked_teacher_entries():
    t, s = _logits()
    t[:, -1] = float("-inf")  # e.g. a token the teacher's vocabulary lacks
    loss = logit_kd_loss(t.bfloat16(), s.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_empty_rows_give_zero_with_a_graph():
    s = torch.zeros(0, 5, requires_grad=True)
    loss = logit_kd_loss(torch.zeros(0, 5), s)
    assert loss.item() == 0.0 and loss.requires_grad
