import pytest
import torch

from dlmdistill.losses.kd import kl_per_row, logit_kd_loss


def kd(teacher, student, temperature=1.0, kind="forward_kl"):
    return logit_kd_loss(student_logits=student, teacher_logits=teacher, temperature=temperature, kind=kind)


def _logits(n=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


def test_kl_matches_definition_in_both_directions():
    t, s = _logits()
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    fwd = (p * (p.log() - q.log())).sum(-1)
    rev = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(kl_per_row(student_logits=s, teacher_logits=t, temperature=2.0, kind="forward_kl"), fwd)
    torch.testing.assert_close(kl_per_row(student_logits=s, teacher_logits=t, temperature=2.0, kind="reverse_kl"), rev)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_zero_for_identical_logits(kind):
    t, _ = _logits()
    assert kd(t, t.clone(), 3.0, kind).abs().item() < 1e-6


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_loss_scales_as_t_squared_for_fixed_tempered_distributions(temperature):
    # softmax(T * z / T) = softmax(z): the distributions compared are the same, only the T^2 factor changes
    t, s = _logits()
    base = kd(t, s, 1.0)
    scaled = kd(temperature * t, temperature * s, temperature)
    torch.testing.assert_close(scaled, temperature ** 2 * base, rtol=1e-5, atol=1e-6)


def test_gradient_magnitude_is_temperature_independent_at_high_temperature():
    # Hinton et al.: d/dz_s [T^2 KL] = T (q_s - p_t) -> ((z_s - mean z_s) - (z_t - mean z_t)) / V as T grows
    t, s = _logits(n=3, v=7)
    expected = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / 7 / 3
    for temperature in (200.0, 2000.0):
        s_ = s.clone().requires_grad_(True)
        kd(t, s_, temperature).backward()
        torch.testing.assert_close(s_.grad, expected, rtol=0.02, atol=1e-4)


def test_teacher_gets_no_gradient():
    t, s = _logits()
    t.requires_grad_(True)
    s.requires_grad_(True)
    kd(t, s, 2.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_float32_with_low_precision_inputs_and_masked_teacher_entries():
    t, s = _logits()
    t[:, -1] = float("-inf")  # e.g. a token the teacher's vocabulary lacks
    loss = kd(t.bfloat16(), s.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_empty_rows_give_zero_with_a_graph():
    s = torch.zeros(0, 5, requires_grad=True)
    loss = kd(torch.zeros(0, 5), s)
    assert loss.item() == 0.0 and loss.requires_grad


def test_the_kd_and_divergence_modules_agree():
    # one API: kl_per_row is distillation_divergence with a temperature and no clipping
    from dlmdistill.losses.divergences import distillation_divergence

    t, s = _logits()
    for kind in ("forward_kl", "reverse_kl"):
        want = distillation_divergence(student_logits=s / 2, teacher_logits=t / 2, kind=kind,
                                       clip_mode="off").divergence
        torch.testing.assert_close(kl_per_row(student_logits=s, teacher_logits=t, temperature=2.0, kind=kind), want)
    with pytest.raises(ValueError, match="forward_kl"):
        kl_per_row(student_logits=s, teacher_logits=t, kind="forward")
    with pytest.raises(TypeError):
        logit_kd_loss(t, s)
