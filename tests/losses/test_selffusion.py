import torch

from dlmdistill.losses.selffusion import (bidirectional_kd_loss, choose_direction, distillation_positions, student_masked,
                                          mode_loss_weights, selffusion_diagnostics)

NEG = -4.0


def row(v0, v1, v2=NEG, v3=NEG):
    return [v0, v1, v2, v3]


def hand_built_cases():
    """(easy logits, hard logits, target 0, expected easy_teaches, case)"""
    return [
        (row(3, 0), row(0, 3), True, "only easy correct"),
        (row(0, 3), row(3, 0), False, "only hard correct"),
        (row(4, 0), row(2, 0), True, "both correct, easy more confident"),
        (row(2, 0), row(4, 0), False, "both correct, hard more confident"),
        (row(0, 5), row(1, 2), False, "both wrong, hard closer to the truth (easy overconfident)"),
        (row(1, 2), row(0, 5), True, "both wrong, easy closer to the truth"),
        (row(3, 1), row(3, 1), True, "both correct, exact tie -> easy"),
        (row(0, 2), row(0, 2), True, "both wrong, exact tie -> easy"),
    ]


def test_direction_rule_on_hand_built_logits():
    cases = hand_built_cases()
    easy = torch.tensor([c[0] for c in cases])
    hard = torch.tensor([c[1] for c in cases])
    y = torch.zeros(len(cases), dtype=torch.long)
    d = choose_direction(easy, hard, y)
    for got, (_, _, want, name) in zip(d.easy_teaches.tolist(), cases):
        assert got == want, name
    assert d.easy_correct.tolist() == [True, False, True, True, False, False, True, False]
    assert d.hard_correct.tolist() == [False, True, True, True, False, False, True, False]


def test_both_wrong_compares_probability_of_the_truth_not_confidence():
    # easy: p(pred) high but p(y) tiny; hard: less confident overall but more mass on y
    easy = torch.tensor([[-2.0, 6.0, 0.0, 0.0]])
    hard = torch.tensor([[1.0, 1.5, 0.0, 0.0]])
    assert not choose_direction(easy, hard, torch.tensor([0])).easy_teaches.item()


def test_fixed_direction_ablations():
    easy, hard = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    assert choose_direction(easy, hard, y, "easy_to_hard").easy_teaches.all()
    assert not choose_direction(easy, hard, y, "hard_to_easy").easy_teaches.any()


def test_kd_zero_for_identical_modes_and_teacher_side_detached():
    easy = torch.randn(6, 9, requires_grad=True)
    hard = easy.detach().clone().requires_grad_(True)
    teaches = torch.tensor([True, False, True, False, True, False])
    loss = bidirectional_kd_loss(easy, hard, teaches, temperature=2.0)
    assert loss.abs().item() < 1e-6
    # non-identical: gradient reaches only the student row of each position
    easy = torch.randn(6, 9, requires_grad=True)
    hard = torch.randn(6, 9, requires_grad=True)
    bidirectional_kd_loss(easy, hard, teaches, temperature=2.0).backward()
    easy_rows_moved = easy.grad.abs().sum(-1) > 0
    hard_rows_moved = hard.grad.abs().sum(-1) > 0
    assert torch.equal(easy_rows_moved, ~teaches)
    assert torch.equal(hard_rows_moved, teaches)


def test_kd_is_t2_over_d_times_summed_kl():
    easy, hard = torch.randn(4, 7), torch.randn(4, 7)
    teaches = torch.tensor([True, True, False, False])
    t = 3.0
    pe, ph = torch.log_softmax(easy / t, -1), torch.log_softmax(hard / t, -1)
    kl_eh = (pe.exp() * (pe - ph)).sum(-1)
    kl_he = (ph.exp() * (ph - pe)).sum(-1)
    want = t ** 2 / 4 * (kl_eh[:2].sum() + kl_he[2:].sum())
    torch.testing.assert_close(bidirectional_kd_loss(easy, hard, teaches, t), want)


def test_distillation_positions():
    e = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    h = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    assert distillation_positions(e, h, "both").tolist() == [[True, False, False, False]]
    assert distillation_positions(e, h, "either").tolist() == [[True, True, True, False]]
    assert distillation_positions(e, h, "own").tolist() == [[True, True, True, False]]


def test_own_reading_keeps_a_pair_only_where_its_student_is_masked():
    # D = either = positions 0, 1, 2 of the test above: 0 masked in both, 1 only in easy, 2 only in hard
    easy_m = torch.tensor([True, True, False])
    hard_m = torch.tensor([True, False, True])
    # easy teaches at 0 and 1 (students: hard, masked at 0 only), hard teaches at 2 (student: easy, visible)
    assert student_masked(torch.tensor([True, True, False]), easy_m, hard_m).tolist() == [True, False, False]
    # hard teaches everywhere: the easy student is masked at 0 and 1
    assert student_masked(torch.tensor([False, False, False]), easy_m, hard_m).tolist() == [True, True, False]


def test_masked_normalisation_is_the_mean_over_masked_positions_of_nll_over_q():
    resp = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    masked = torch.tensor([[0, 1, 0, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    p = torch.tensor([0.5, 0.25])
    nll = torch.tensor([[0, 2.0, 0, 0, 0], [0, 1.0, 3.0, 0, 4.0]])
    # (2/0.5 + (1 + 3 + 4)/0.25) / 4 masked positions = 36 / 4
    w = mode_loss_weights(masked, p, resp, "masked")
    assert torch.isclose((w * nll).sum(), torch.tensor(9.0))
    # the other options are the foundation's (SMDM: / 6 response tokens)
    assert torch.isclose((mode_loss_weights(masked, p, resp, "token") * nll).sum(), torch.tensor(6.0))
    assert mode_loss_weights(torch.zeros_like(masked), p, resp).sum() == 0


def test_diagnostics_fractions():
    cases = hand_built_cases()
    easy = torch.tensor([c[0] for c in cases])
    hard = torch.tensor([c[1] for c in cases])
    d = choose_direction(easy, hard, torch.zeros(len(cases), dtype=torch.long))
    m = selffusion_diagnostics(easy, hard, d, easy_logits_uncalibrated=2 * easy)
    assert abs(m["kd/frac_easy_to_hard"] + m["kd/frac_hard_to_easy"] - 1) < 1e-6
    assert abs(m["kd/frac_one_correct"] + m["kd/frac_both_correct"] + m["kd/frac_both_wrong"] - 1) < 1e-6
    assert m["kd/frac_only_easy_correct"] == m["kd/frac_only_hard_correct"] == 1 / 8
    # sharper uncalibrated logits -> higher top-1 probability
    assert m["kd/easy_top1_both_wrong_uncal"] > m["kd/easy_top1_both_wrong"]
    assert selffusion_diagnostics(easy[:0], hard[:0], choose_direction(easy[:0], hard[:0], torch.zeros(0).long())) == {}
