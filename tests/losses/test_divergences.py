import math

import pytest
import torch

from dlmdistill.losses.divergences import distillation_divergence, divergence_terms, topk_overlap


def dd(student, teacher, kind="reverse_kl", **kw):
    return distillation_divergence(student_logits=student, teacher_logits=teacher, kind=kind, **kw)


def logits_of(*probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


KINDS = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1})]


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("clip_mode", ["per_term", "per_position", "per_position_scale", "off"])
def test_zero_for_identical_distributions(kind, kw, clip_mode):
    x = torch.randn(5, 11)
    out = dd(x, x.clone(), kind, clip_mode=clip_mode, **kw)
    assert out.divergence.shape == (5,)
    torch.testing.assert_close(out.divergence, torch.zeros(5), atol=1e-6, rtol=0)
    assert out.clip_ratio.item() == 0.0


def test_reverse_and_forward_kl_on_a_hand_built_pair():
    s, t = logits_of(0.5, 0.5)[None], logits_of(0.9, 0.1)[None]
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(s || t) = 0.5108
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(t || s) = 0.3681
    r = dd(s, t, "reverse_kl", clip_mode="off").divergence.item()
    f = dd(s, t, "forward_kl", clip_mode="off").divergence.item()
    assert r == pytest.approx(reverse, abs=1e-6) and f == pytest.approx(forward, abs=1e-6)
    assert r > f  # reverse KL punishes the student's mass on the teacher's unlikely token


def test_top_k_restricts_both_to_the_teachers_ids_and_renormalises():
    t = logits_of(0.4, 0.3, 0.2, 0.1)[None]
    s = logits_of(0.1, 0.2, 0.3, 0.4)[None]
    # teacher's top 2 = ids 0, 1 -> teacher (4/7, 3/7), student (1/3, 2/3)
    ps, pt = (1 / 3, 2 / 3), (4 / 7, 3 / 7)
    expected = sum(a * math.log(a / b) for a, b in zip(ps, pt))
    out = dd(s, t, "reverse_kl", top_k=2, clip_mode="off")
    assert out.divergence.item() == pytest.approx(expected, abs=1e-6)
    # top_k >= V is the full vocabulary
    full = dd(s, t, "reverse_kl", clip_mode="off").divergence
    torch.testing.assert_close(dd(s, t, "reverse_kl", top_k=10, clip_mode="off").divergence, full)


def test_per_term_clipping_caps_each_vocabulary_term_and_reports_the_ratio():
    s, t = logits_of(0.5, 0.3, 0.2)[None], logits_of(0.1, 0.3, 0.6)[None]
    terms = [a * math.log(a / b) for a, b in zip((0.5, 0.3, 0.2), (0.1, 0.3, 0.6))]  # 0.805, 0, -0.220
    out = dd(s, t, "reverse_kl", clip=0.05, clip_mode="per_term")
    assert out.divergence.item() == pytest.approx(sum(min(x, 0.05) for x in terms), abs=1e-6)
    assert out.clipped.item() == pytest.approx(1 / 3)
    # the capped term passes no gradient: with the first term capped, the gradient is that of the two
    # other terms alone, not that of the full KL
    x = s.clone().requires_grad_(True)
    dd(x, t, clip=0.05, clip_mode="per_term").divergence.sum().backward()
    x2 = s.clone().requires_grad_(True)
    terms = divergence_terms(student_logp=torch.log_softmax(x2, -1), teacher_logp=torch.log_softmax(t, -1))
    terms[:, 1:].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    x3 = s.clone().requires_grad_(True)
    dd(x3, t, clip_mode="off").divergence.sum().backward()
    assert (x3.grad - x.grad).abs().max() > 0.1


def test_per_token_was_renamed_and_is_rejected_with_the_new_names():
    s, t = logits_of(0.5, 0.5)[None], logits_of(0.9, 0.1)[None]
    with pytest.raises(ValueError, match="renamed 'per_position'.*'per_term'"):
        dd(s, t, clip_mode="per_token")
    with pytest.raises(ValueError, match="per_position_scale"):
        dd(s, t, clip_mode="per_tern")


def test_per_position_clipping_caps_the_position_divergence_and_drops_its_gradient():
    s = torch.stack([logits_of(0.5, 0.5), logits_of(0.9, 0.1)])
    t = torch.stack([logits_of(0.9, 0.1), logits_of(0.9, 0.1)])
    x = s.clone().requires_grad_(True)
    out = dd(x, t, "reverse_kl", clip=0.05, clip_mode="per_position")
    assert out.divergence.tolist() == pytest.approx([0.05, 0.0], abs=1e-6)
    assert out.clipped.tolist() == [1.0, 0.0] and out.clip_ratio.item() == 0.5
    out.divergence.sum().backward()
    assert x.grad[0].abs().max().item() == 0.0  # the over-threshold position is dropped from the update
    off = dd(s, t, "reverse_kl", clip_mode="off")
    assert off.divergence[0].item() > 0.5 and off.clip_ratio.item() == 0.0


def test_per_position_scale_keeps_the_direction_with_the_gradient_scaled_by_c_over_kl():
    s = torch.stack([logits_of(0.5, 0.5), logits_of(0.85, 0.15)])
    t = torch.stack([logits_of(0.9, 0.1), logits_of(0.9, 0.1)])
    kl0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.511 > c
    kl1 = 0.85 * math.log(0.85 / 0.9) + 0.15 * math.log(0.15 / 0.1)  # 0.0123 < c
    x = s.clone().requires_grad_(True)
    out = dd(x, t, clip=0.05, clip_mode="per_position_scale")
    assert out.divergence.tolist() == pytest.approx([0.05, kl1], abs=1e-6)  # same value as per_position
    assert out.clipped.tolist() == [1.0, 0.0]
    out.divergence.sum().backward()
    y = s.clone().requires_grad_(True)
    dd(y, t, clip_mode="off").divergence.sum().backward()
    torch.testing.assert_close(x.grad[0], y.grad[0] * (0.05 / kl0))
    torch.testing.assert_close(x.grad[1], y.grad[1])


def test_gradient_direction_under_each_clipping_mode_on_a_hand_example():
    # Teacher (0.5, 0.3, 0.2); the student over-weights token 2: (0.2, 0.3, 0.5). Reverse-KL terms
    # s_v log(s_v / t_v): -0.183, 0, +0.458; with c = 0.05 only token 2's term is capped.
    # d/dz_j sum_{v in U} s_v log(s_v/t_v) = [j in U] s_j (r_j + 1) - s_j S, S = sum_{v in U} s_v (r_v + 1),
    # r_v = log(s_v / t_v), U = the uncapped terms. For the capped token 2 that is -s_2 S < 0 whenever
    # S > 0: gradient descent RAISES the logit, and the mass, of the token the student already over-weights.
    ps, pt = (0.2, 0.3, 0.5), (0.5, 0.3, 0.2)
    r = [math.log(a / b) for a, b in zip(ps, pt)]
    big_s = ps[0] * (r[0] + 1) + ps[1] * (r[1] + 1)  # 0.3167
    expected = [ps[0] * (r[0] + 1) - ps[0] * big_s, ps[1] * (r[1] + 1) - ps[1] * big_s, -ps[2] * big_s]
    assert expected == pytest.approx([-0.0466, 0.2050, -0.1584], abs=1e-4)
    s, t = logits_of(*ps)[None], logits_of(*pt)[None]

    def step(mode, lr=0.5):
        x = s.clone().requires_grad_(True)
        dd(x, t, clip=0.05, clip_mode=mode).divergence.sum().backward()
        return x.grad[0], torch.softmax(s - lr * x.grad, -1)[0]

    grad, after = step("per_term")
    assert grad.tolist() == pytest.approx(expected, abs=1e-5)
    assert after[2] > 0.5  # per_term: one SGD step moves further from the teacher on token 2
    grad, after = step("off")
    assert grad[2] > 0 and after[2] < 0.5  # the plain KL lowers it, toward the teacher's 0.2
    grad, after = step("per_position_scale")
    assert grad[2] > 0 and after[2] < 0.5  # scaled, same direction as the plain KL
    grad, after = step("per_position")  # KL = 0.275 > c: the position is dropped
    assert grad.abs().max().item() == 0.0 and after[2].item() == pytest.approx(0.5)


def test_teacher_is_detached_and_arguments_are_keyword_only():
    s = torch.randn(3, 7, requires_grad=True)
    t = torch.randn(3, 7, requires_grad=True)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        dd(s, t, kind, clip_mode="off").divergence.sum().backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(TypeError):
        distillation_divergence(s, t)  # positional student/teacher would be easy to swap
    with pytest.raises(TypeError):
        topk_overlap(s, t)


def test_generalised_jsd_limits_and_symmetry():
    torch.manual_seed(0)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    fwd = dd(s, t, "forward_kl", clip_mode="off").divergence
    rev = dd(s, t, "reverse_kl", clip_mode="off").divergence
    b = 1e-3
    lo = dd(s, t, "jsd", beta=b, clip_mode="off").divergence / b
    hi = dd(s, t, "jsd", beta=1 - b, clip_mode="off").divergence / b
    torch.testing.assert_close(lo, fwd, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(hi, rev, rtol=1e-2, atol=1e-3)
    half = dd(s, t, "jsd", beta=0.5, clip_mode="off").divergence
    swapped = dd(t, s, "jsd", beta=0.5, clip_mode="off").divergence
    torch.testing.assert_close(half, swapped)
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()
    with pytest.raises(ValueError, match="0 < beta < 1"):
        dd(s, t, "jsd", beta=1.0)


def test_low_precision_inputs_are_computed_in_float32():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    ref = dd(s, t, clip_mode="off").divergence
    out = dd(s.bfloat16(), t.bfloat16(), clip_mode="off").divergence
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)


def test_topk_overlap_counts_shared_ids():
    t = torch.tensor([[5.0, 4, 3, 2, 1, 0]])
    assert topk_overlap(student_logits=t, teacher_logits=t, k=3).item() == 1.0
    assert topk_overlap(student_logits=-t, teacher_logits=t, k=3).item() == 0.0
    s = torch.tensor([[5.0, 0, 3, 2, 1, 4]])  # top-3 {0, 5, 2} vs teacher's {0, 1, 2}
    assert topk_overlap(student_logits=s, teacher_logits=t, k=3).item() == pytest.approx(2 / 3)
    assert topk_overlap(student_logits=s, teacher_logits=t, k=100).item() == 1.0  # K capped at V


def test_per_term_clipped_reverse_kl_is_not_minimised_at_the_teacher():
    # Documented property (docs/methods/dopsd.md): capping the positive terms lets a student that piles
    # mass on a token the teacher finds unlikely score below the teacher itself (value 0):
    # c - (1 - t*) / e with the other tokens at t_v / e.
    t = torch.tensor([0.5, 0.3, 0.15, 0.05])
    s = t / math.e
    s[3] = 1 - s[:3].sum()  # the teacher's least likely token gets the rest
    value = dd(s.log()[None], t.log()[None], clip=0.05, clip_mode="per_term").divergence.item()
    assert value == pytest.approx(0.05 - (1 - 0.05) / math.e, abs=1e-5) and value < 0
    assert dd(t.log()[None], t.log()[None], clip=0.05).divergence.item() == pytest.approx(0.0)
