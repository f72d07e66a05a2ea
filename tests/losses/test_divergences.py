import math

import pytest
import torch

from dlmdistill.losses.divergences import distillation_divergence, divergence_terms, topk_overlap


def logits_of(*probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


KINDS = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1})]


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("clip_mode", ["per_term", "per_token", "off"])
def test_zero_for_identical_distributions(kind, kw, clip_mode):
    x = torch.randn(5, 11)
    out = distillation_divergence(x, x.clone(), kind, clip_mode=clip_mode, **kw)
    assert out.divergence.shape == (5,)
    torch.testing.assert_close(out.divergence, torch.zeros(5), atol=1e-6, rtol=0)
    assert out.clip_ratio.item() == 0.0


def test_reverse_and_forward_kl_on_a_hand_built_pair():
    s, t = logits_of(0.5, 0.5)[None], logits_of(0.9, 0.1)[None]
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(s || t) = 0.5108
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(t || s) = 0.3681
    r = distillation_divergence(s, t, "reverse_kl", clip_mode="off").divergence.item()
    f = distillation_divergence(s, t, "forward_kl", clip_mode="off").divergence.item()
    assert r == pytest.approx(reverse, abs=1e-6) and f == pytest.approx(forward, abs=1e-6)
    assert r > f  # reverse KL punishes the student's mass on the teacher's unlikely token


def test_top_k_restricts_both_to_the_teachers_ids_and_renormalises():
    t = logits_of(0.4, 0.3, 0.2, 0.1)[None]
    s = logits_of(0.1, 0.2, 0.3, 0.4)[None]
    # teacher's top 2 = ids 0, 1 -> teacher (4/7, 3/7), student (1/3, 2/3)
    ps, pt = (1 / 3, 2 / 3), (4 / 7, 3 / 7)
    expected = sum(a * math.log(a / b) for a, b in zip(ps, pt))
    out = distillation_divergence(s, t, "reverse_kl", top_k=2, clip_mode="off")
    assert out.divergence.item() == pytest.approx(expected, abs=1e-6)
    # top_k >= V is the full vocabulary
    full = distillation_divergence(s, t, "reverse_kl", clip_mode="off").divergence
    torch.testing.assert_close(distillation_divergence(s, t, "reverse_kl", top_k=10, clip_mode="off").divergence, full)


def test_per_term_clipping_caps_each_vocabulary_term_and_reports_the_ratio():
    s, t = logits_of(0.5, 0.3, 0.2)[None], logits_of(0.1, 0.3, 0.6)[None]
    terms = [a * math.log(a / b) for a, b in zip((0.5, 0.3, 0.2), (0.1, 0.3, 0.6))]  # 0.805, 0, -0.220
    out = distillation_divergence(s, t, "reverse_kl", clip=0.05, clip_mode="per_term")
    assert out.divergence.item() == pytest.approx(sum(min(x, 0.05) for x in terms), abs=1e-6)
    assert out.clipped.item() == pytest.approx(1 / 3)
    # every term respects the bound, and a capped term passes no gradient
    x = s.clone().requires_grad_(True)
    raw = divergence_terms(torch.log_softmax(x, -1), torch.log_softmax(t, -1))
    assert (raw.clamp(max=0.05) <= 0.05).all()
    distillation_divergence(x, t, clip=1e-9, clip_mode="per_term").divergence.sum().backward()
    assert x.grad is not None


def test_per_token_clipping_caps_the_position_divergence():
    s = torch.stack([logits_of(0.5, 0.5), logits_of(0.9, 0.1)])
    t = torch.stack([logits_of(0.9, 0.1), logits_of(0.9, 0.1)])
    out = distillation_divergence(s, t, "reverse_kl", clip=0.05, clip_mode="per_token")
    assert out.divergence.tolist() == pytest.approx([0.05, 0.0], abs=1e-6)
    assert out.clipped.tolist() == [1.0, 0.0] and out.clip_ratio.item() == 0.5
    off = distillation_divergence(s, t, "reverse_kl", clip_mode="off")
    assert off.divergence[0].item() > 0.5 and off.clip_ratio.item() == 0.0


def test_generalised_jsd_limits_and_symmetry():
    torch.manual_seed(0)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    fwd = distillation_divergence(s, t, "forward_kl", clip_mode="off").divergence
    rev = distillation_divergence(s, t, "reverse_kl", clip_mode="off").divergence
    b = 1e-3
    lo = distillation_divergence(s, t, "jsd", beta=b, clip_mode="off").divergence / b
    hi = distillation_divergence(s, t, "jsd", beta=1 - b, clip_mode="off").divergence / b
    torch.testing.assert_close(lo, fwd, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(hi, rev, rtol=1e-2, atol=1e-3)
    half = distillation_divergence(s, t, "jsd", beta=0.5, clip_mode="off").divergence
    swapped = distillation_divergence(t, s, "jsd", beta=0.5, clip_mode="off").divergence
    torch.testing.assert_close(half, swapped)
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()
    with pytest.raises(ValueError, match="0 < beta < 1"):
        distillation_divergence(s, t, "jsd", beta=1.0)


def test_low_precision_inputs_are_computed_in_float32():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    ref = distillation_divergence(s, t, clip_mode="off").divergence
    out = distillation_divergence(s.bfloat16(), t.bfloat16(), clip_mode="off").divergence
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)


def test_topk_overlap_counts_shared_ids():
    t = torch.tensor([[5.0, 4, 3, 2, 1, 0]])
    assert topk_overlap(t, t, k=3).item() == 1.0
    assert topk_overlap(-t, t, k=3).item() == 0.0
    s = torch.tensor([[5.0, 0, 3, 2, 1, 4]])  # top-3 {0, 5, 2} vs teacher's {0, 1, 2}
    assert topk_overlap(s, t, k=3).item() == pytest.approx(2 / 3)
    assert topk_overlap(s, t, k=100).item() == 1.0  # K capped at V


def test_per_term_clipped_reverse_kl_is_not_minimised_at_the_teacher():
    # Documented property (docs/methods/dopsd.md): capping the positive terms lets a student that piles
    # mass on a token the teacher finds unlikely score below the teacher itself (value 0):
    # c - (1 - t*) / e with the other tokens at t_v / e.
    t = torch.tensor([0.5, 0.3, 0.15, 0.05])
    s = t / math.e
    s[3] = 1 - s[:3].sum()  # the teacher's least likely token gets the rest
    value = distillation_divergence(s.log()[None], t.log()[None], clip=0.05, clip_mode="per_term").divergence.item()
    assert value == pytest.approx(0.05 - (1 - 0.05) / math.e, abs=1e-5) and value < 0
    assert distillation_divergence(t.log()[None], t.log()[None], clip=0.05).divergence.item() == pytest.approx(0.0)
