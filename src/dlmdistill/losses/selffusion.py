"""SelfFusion's losses (Lim et al., "SelfFusion: Self-distillation for Diffusion Language Models").

One model sees every training response twice: a *hard* copy masked with ``t_h ~ U(0, 1)`` and an
*easy* copy masked with ``t_e ~ U(0, t_h)``. The objective (eq. 7) is

    L = L_diff(hard) + L_diff(easy) + L_bkd

* ``L_diff(m)`` (eq. 3-4) is the masked-diffusion cross-entropy of mode ``m``; see
  ``mode_loss_weights`` for its normalisation options;
* ``L_bkd`` (eq. 6) = ``T^2 / |D| * sum_{i in D} KL(P_teacher,T || P_student,T)`` where, per
  position, the teacher is the mode chosen by the direction rule of eq. (1) (``choose_direction``)
  and the teacher side is detached.

Everything here is a pure function of logits gathered at the positions concerned (no model calls).
Shapes: B = batch, L = sequence length, V = vocabulary, N = gathered positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..configs.choices import DirectionRule, DistillPositions, ModeNormalization
from ..diffusion import diffusion_loss_weights
from .kd import kl_per_row, logit_kd_loss


def distillation_positions(easy_masked: torch.Tensor, hard_masked: torch.Tensor,
                           which: DistillPositions = "both") -> torch.Tensor:
    """The distillation set D as a [B, L] bool mask.

    easy_masked, hard_masked: [B, L] bool, the masked response positions of each mode. The paper
    defines ``L_bkd`` over "the set of distillation positions" D (Sec. 3.2) without saying which;
    its Appendix A.4 measures each mode on its own masked positions and notes that "a token masked
    in one mode may remain visible in the other mode", where "the counterpart mode may observe the
    ground truth token". The readings:

    * ``"both"`` (default): masked in both modes, where both predictions are genuine predictions;
    * ``"either"``: masked in at least one mode; at a position visible in one mode, that mode sees
      the answer token in its input (its prediction there is one it was never trained to make) and
      the direction rule may still make it the student;
    * ``"own"``: the same positions as ``either``, but each mode is a student only on its own masked
      positions (``student_masked`` drops the others after the direction rule): the KD of the
      A.4 reading, where the counterpart may teach from a position it sees.
    """
    if which == "both":
        return easy_masked & hard_masked
    if which in ("either", "own"):
        return easy_masked | hard_masked
    raise ValueError(f"unknown distillation set {which!r}; expected 'both', 'either' or 'own'")


def student_masked(easy_teaches: torch.Tensor, easy_masked: torch.Tensor, hard_masked: torch.Tensor) -> torch.Tensor:
    """[N] bool: the distillation positions where the student mode is masked (``distill_positions: own``).

    easy_teaches: [N] the direction (``DirectionDecision.easy_teaches``); easy_masked, hard_masked:
    [N] whether each mode is masked at the N positions. The student is the hard mode where the easy
    one teaches, else the easy mode."""
    return torch.where(easy_teaches, hard_masked, easy_masked)


def mode_loss_weights(masked: torch.Tensor, p_mask: torch.Tensor, response_mask: torch.Tensor,
                      normalization: ModeNormalization = "masked") -> torch.Tensor:
    """Weights ``w`` ([B, L], zero off ``masked``) such that ``L_diff = sum(w * nll)`` for one mode.

    masked: [B, L] bool; p_mask: [B]; response_mask: [B, L] bool.

    * ``"masked"`` (paper, eq. 3-4): ``1 / (q_i * |M|)``, the mean over the mode's |M| masked
      positions in the batch of ``-log p / q``;
    * ``"token"`` (SMDM SFT): ``1 / (q_i * N)``, N = response tokens in the batch (masked or not);
    * ``"sequence"`` (LLaDA): ``1 / (q_i * L_b * B)``, L_b = sample b's response length.

    ``"masked"`` equals ``"token"`` times ``N / |M|`` (about ``1 / E[q]``): 2 for the hard mode and 4
    for the easy one on average, so with it the easy mode's loss weighs more than the hard one's.
    """
    if normalization != "masked":
        return diffusion_loss_weights(masked, p_mask, response_mask, normalization)
    inv_p = (1.0 / p_mask)[:, None].expand_as(masked)
    w = inv_p / masked.sum().clamp(min=1).to(inv_p.dtype)
    return torch.where(masked, w, torch.zeros_like(w))


@dataclass
class DirectionDecision:
    """The outcome of the direction rule at the |D| distillation positions (all [|D|] bool).

    easy_teaches: True where the easy mode is the teacher (``e -> h``), False for ``h -> e``.
    easy_correct / hard_correct: the mode's argmax equals the ground truth (``c_e`` / ``c_h``).
    """

    easy_teaches: torch.Tensor
    easy_correct: torch.Tensor
    hard_correct: torch.Tensor


def target_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)[targets]`` in float32. logits [N, V], targets [N] -> [N]."""
    return torch.exp(-F.cross_entropy(logits.float(), targets, reduction="none"))


@torch.no_grad()
def choose_direction(easy_logits: torch.Tensor, hard_logits: torch.Tensor, targets: torch.Tensor,
                     rule: DirectionRule = "bidirectional") -> DirectionDecision:
    """Token-level distillation direction (eq. 1), from untempered (T = 1) probabilities.

    easy_logits, hard_logits: [N, V] at the same N positions; targets: [N] ground-truth tokens.
    See ``direction_from_stats`` for the rule; this computes its inputs from the logits.
    """
    return direction_from_stats(easy_logits.argmax(dim=-1) == targets, hard_logits.argmax(dim=-1) == targets,
                                target_probability(easy_logits, targets), target_probability(hard_logits, targets),
                                rule)


@torch.no_grad()
def direction_from_stats(easy_correct: torch.Tensor, hard_correct: torch.Tensor, easy_p_true: torch.Tensor,
                         hard_p_true: torch.Tensor, rule: DirectionRule = "bidirectional") -> DirectionDecision:
    """The direction rule from per-position statistics (all [N]): correctness (argmax == ground truth)
    and the probability of the ground truth ``p(y)``, both at T = 1.

    ``"bidirectional"``:

    * exactly one mode correct: that mode is the teacher;
    * both correct: the mode with the higher probability on its predicted token (which is then the
      ground truth, so this compares ``p_e(y)`` with ``p_h(y)``);
    * both wrong: the mode with the higher probability on the ground truth ``y``;
    * an exact tie of those probabilities: the easy mode is the teacher (it sees more context).

    The decision uses T = 1 because correctness and confidence are properties of the model's actual
    predictions; the temperature only shapes the distributions being matched. (The argmax, and so
    the correctness, is the same at any T; the probability comparison is not.)
    ``"easy_to_hard"`` / ``"hard_to_easy"`` fix the direction (the paper's Table 3 ablations).
    """
    if rule == "bidirectional":
        easy_teaches = torch.where(easy_correct != hard_correct, easy_correct, easy_p_true >= hard_p_true)
    elif rule == "easy_to_hard":
        easy_teaches = torch.ones_like(easy_correct)
    elif rule == "hard_to_easy":
        easy_teaches = torch.zeros_like(easy_correct)
    else:
        raise ValueError(f"unknown direction {rule!r}; expected bidirectional, easy_to_hard or hard_to_easy")
    return DirectionDecision(easy_teaches=easy_teaches, easy_correct=easy_correct, hard_correct=hard_correct)


def bidirectional_kd_loss(easy_logits: torch.Tensor, hard_logits: torch.Tensor, easy_teaches: torch.Tensor,
                          temperature: float = 1.0, in_d: torch.Tensor | None = None) -> torch.Tensor:
    """``L_bkd`` (eq. 6): ``T^2 / |D| * sum_i KL(P_teacher,T || P_student,T)``, teacher detached.

    easy_logits, hard_logits: [N, V] at the same N positions; easy_teaches: [N] bool
    (``DirectionDecision.easy_teaches``); in_d: [N] bool, the rows in D (default: every row, N = |D|;
    given, the other rows are computed and weighted 0, a fixed-shape step). Returns a float32 scalar
    (0 when D is empty).
    """
    sel = easy_teaches[:, None]
    teacher = torch.where(sel, easy_logits, hard_logits)
    student = torch.where(sel, hard_logits, easy_logits)
    if in_d is None:
        return logit_kd_loss(student_logits=student, teacher_logits=teacher, temperature=temperature,
                             kind="forward_kl")
    kl = kl_per_row(student_logits=student, teacher_logits=teacher, temperature=temperature, kind="forward_kl")
    w = in_d.to(kl.dtype)
    return temperature ** 2 * (kl * w).sum() / w.sum().clamp(min=1)


@torch.no_grad()
def selffusion_diagnostics(easy_logits: torch.Tensor, hard_logits: torch.Tensor, decision: DirectionDecision,
                           easy_logits_uncalibrated: torch.Tensor | None = None, in_d: torch.Tensor | None = None
                           ) -> dict[str, torch.Tensor]:
    """What the paper plots (Fig. 4-6, 8), measured on the distillation positions D.

    easy_logits, hard_logits: [N, V]; ``easy_logits_uncalibrated``: [N, V], the easy mode's logits
    without the calibration RMSNorm, when available; in_d: [N] bool, the rows in D (default: all).
    Returns fractions of D per direction and per correctness case, and the easy mode's mean top-1
    probability when both modes are right and when both are wrong (``_uncal``: without calibration),
    as 0-d tensors (no host read); a case absent from D gives NaN (left out of the trainer's logged
    means); no row at all gives no entry.
    """
    if decision.easy_teaches.numel() == 0:
        return {}
    w = torch.ones_like(decision.easy_teaches, dtype=torch.float32) if in_d is None else in_d.float()

    def mean(x: torch.Tensor, rows: torch.Tensor = w) -> torch.Tensor:
        return (x.float() * rows).sum() / rows.sum()

    ce, ch = decision.easy_correct, decision.hard_correct
    both_right, both_wrong = ce & ch, ~ce & ~ch
    out = {
        "kd/frac_easy_to_hard": mean(decision.easy_teaches),
        "kd/frac_hard_to_easy": mean(~decision.easy_teaches),
        "kd/frac_one_correct": mean(ce != ch),
        "kd/frac_only_easy_correct": mean(ce & ~ch),
        "kd/frac_only_hard_correct": mean(ch & ~ce),
        "kd/frac_both_correct": mean(both_right),
        "kd/frac_both_wrong": mean(both_wrong),
    }
    variants = [("", easy_logits)] + ([("_uncal", easy_logits_uncalibrated)]
                                      if easy_logits_uncalibrated is not None else [])
    for suffix, logits in variants:
        logits = logits.float()
        top1 = torch.exp(logits.amax(dim=-1) - torch.logsumexp(logits, dim=-1))
        for case, rows in (("both_correct", both_right), ("both_wrong", both_wrong)):
            out[f"kd/easy_top1_{case}{suffix}"] = mean(top1, rows.float() * w)  # NaN when the case is absent
    return out
