"""d-OPSD: on-policy self-distillation for diffusion LMs (Luo et al., 2026, "Learning from the Self-future").

Per rollout batch of prompts:

1. **Rollouts (pass@k).** The policy samples a trajectory per prompt with the diffusion sampler (eval
   mode, trajectory recorded). Prompts whose answer the verifier rejects are resampled, up to
   ``pass_k`` attempts in all. Only accepted trajectories are trained on (``correct_only``); a batch
   without any is skipped: no optimizer step, the global step does not advance.
2. **Teacher input (eq. 8).** For every recorded step ``t`` the student sees the state ``y_t``; the
   teacher sees ``y_t`` with a random fraction ``rho`` of the still-masked positions *outside the
   current block* filled from the trajectory's own final answer ``y_0`` (the self-future; the
   current block is never revealed). ``teacher_context=reference_prefix`` is AR-style OPSD instead:
   the teacher sees ``y_t`` after the prompt followed by the reference solution.
3. **Positions K_t (eq. 10-11).** The ``k_t`` masked positions of the current block where the
   teacher is most confident (probability of its argmax token), ``k_t`` = the number of tokens the
   sampler committed at that step for that sample, so ``sum_t |K_t| = gen_length``. Options: rank by
   the student's confidence, or take the positions the sampler actually committed.
4. **Loss (eq. 12).** ``L_t = mean_{i in K_t} D(P_student^i || P_teacher^i)`` (teacher detached;
   reverse KL by default, optional teacher top-K vocabulary and clipping), averaged over the
   trained steps of a trajectory (``train_steps``: all recorded steps, the last block included, or
   only the informative ones), then over the trained trajectories of the global batch. The step
   states of all trajectories are stacked into micro-batches of ``micro_batch_size`` states; each
   micro-batch is one student and one teacher forward with the LM head only at the needed
   positions, and one backward; one optimizer step per rollout batch.

The teacher is the initial policy (LoRA adapters disabled, or a frozen copy under full
fine-tuning) or, with ``teacher=current``, the current policy without gradient.

    dlmdistill train dopsd --config configs/dopsd_countdown_tiny.yaml

The analysis helpers of the paper's Table 3 toy and Figure 3 live in ``dlmdistill.analysis.dopsd``.

Why one file of this length: the method reads top to bottom in one place (its pure step functions,
then the trainer that uses them), as one recipe per method; the options are ``configs/methods/dopsd.py``.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch

from ..configs.choices import RevealScope
from ..configs.methods import ClipModeSetting, DOPSDConfig, DOPSDRunConfig  # noqa: F401 (re-exported)
from ..errors import UserError
from ..losses.divergences import distillation_divergence, topk_overlap
from ..models.backbone import DiffusionModel, left_pad
from ..sampling import Trajectory, candidate_scores, topk_mask
from ..training.trainer import TrainingConfig
from .common import finish, prepare, write_run_metadata
from .onpolicy import (LogitsFn, OnPolicyTrainer, dropout_disabled, micro_batches, prompt_and_response_inputs,
                       prompt_items, response_lengths, with_prompt_columns)

log = logging.getLogger(__name__)


class NothingToTrainError(UserError):
    """``max_consecutive_skips`` rollout batches in a row had nothing to train (no accepted trajectory,
    or no trainable step): the policy no longer solves what it is asked. The run stops here, at the
    step it reached; its logs and checkpoints stay as they are."""


#: learning rate from which docs/results.md saw per-term clipping collapse under full fine-tuning
COLLAPSE_LR = 1e-4


def collapse_warnings(method: DOPSDConfig, *, learning_rate: float, lora: bool) -> list[str]:
    """Settings our own measurements show collapsing (docs/results.md; docs/methods/dopsd.md).

    Per-term clipping at lr 1e-4 or more collapsed with full fine-tuning (every seed on Sudoku and
    Countdown, sections 2 and 5) and with LoRA (the official recipe with LoRA r 4 on the tiny
    Countdown model with traces: every learning rate from 1e-4 to 3e-3 lost accuracy, section "d-OPSD
    where its premise holds"); a moving teacher (``teacher: current``) with full fine-tuning at 1e-4
    collapsed in its one-seed ablations, with ``train_steps`` all and informative alike. Smaller
    learning rates (the paper's 5e-6) were not measured and get no warning. Returns the warnings to
    log at start-up (empty when none applies).
    """
    out = []
    if learning_rate < COLLAPSE_LR:
        return out
    if method.clip_mode == "per_term":
        out.append(f"d-OPSD: clip_mode per_term at learning_rate {learning_rate:g} (>= {COLLAPSE_LR:g}) collapsed in "
                   f"our runs, with full fine-tuning and with LoRA (docs/results.md): the per-term clipped KL is "
                   f"minimised away from the teacher (docs/methods/dopsd.md). Consider clip_mode per_position or "
                   f"per_position_scale, or a smaller learning rate")
    if method.teacher == "current" and not lora:
        out.append(f"d-OPSD: teacher current with full fine-tuning and learning_rate {learning_rate:g} collapsed "
                   f"in the one-seed ablations of docs/results.md section 2 (train_steps all and informative)")
    return out


# --------------------------------------------------------------------------------------------
# teacher construction and step states (pure)


def current_block_mask(blocks: torch.Tensor, block_length: int, gen_length: int) -> torch.Tensor:
    """Response positions of each row's current block: blocks [N] -> [N, G] bool."""
    pos = torch.arange(gen_length, device=blocks.device)[None, :]
    start = blocks[:, None] * block_length
    return (pos >= start) & (pos < start + block_length)


def self_future_teacher_states(states: torch.Tensor, final: torch.Tensor, blocks: torch.Tensor, *, block_length: int,
                               mask_id: int, rho: float, generator: torch.Generator | None = None,
                               eos_id: int | None = None, scope: RevealScope = "after_block") -> torch.Tensor:
    """The teacher's response state (eq. 8): ``y_t`` with part of the self-generated future revealed.

    states: [N, G] the student's states ``y_t``; final: [N, G] the answers ``y_0``; blocks: [N] the
    block decoded at each state. Eligible positions: still masked in ``y_t`` and outside the
    current block, and by ``scope`` (``eos_id`` needed for the last two):

    * ``after_block``: nothing more (in block decoding: every position after the current block,
      the answer's EOS tail included);
    * ``before_eos``: not after the first ``eos_id`` of ``y_0``;
    * ``official``: none at all in a row whose next block starts at or after the first EOS of
      ``y_0`` (the official code; the EOS tail stays eligible otherwise).

    Of the ``n`` eligible positions of a row, ``floor(rho * n)`` chosen uniformly at random take
    their ``y_0`` token; everything else is ``y_t``. Returns [N, G].
    """
    g = states.shape[1]
    eligible = (states == mask_id) & ~current_block_mask(blocks, block_length, g)
    if scope != "after_block":
        if eos_id is None:
            raise ValueError(f"reveal scope {scope!r} needs the EOS id")
        first_eos = response_lengths(final, eos_id)  # index of the first EOS (G if none)
        if scope == "before_eos":
            eligible &= torch.arange(g, device=states.device)[None, :] <= first_eos[:, None]
        elif scope == "official":
            eligible &= ((blocks + 1) * block_length < first_eos)[:, None]
        else:
            raise ValueError(f"unknown reveal scope {scope!r}; choose after_block, before_eos or official")
    count = torch.floor(rho * eligible.sum(1).double() + 1e-9).long()  # guard 0.29 * 100 -> 28.999...
    noise = torch.rand(states.shape, generator=generator, device=states.device)
    reveal = topk_mask(torch.where(eligible, noise, torch.full_like(noise, -1.0)), count) & eligible
    return torch.where(reveal, final, states)


@dataclass
class StepStates:
    """The recorded steps of a set of trajectories, one row per (trajectory, step) with k_t > 0.

    rows:       [R] long, trajectory index (into the rollout batch) of each step state.
    step:       [R] long, step index t within the trajectory.
    states:     [R, G] the student's response state ``y_t``.
    teacher:    [R, G] the teacher's response state (``y_t`` with revealed future, or ``y_t``).
    candidates: [R, G] bool, masked positions of the current block.
    committed:  [R, G] bool, positions the sampler committed at the step.
    k:          [R] long, tokens committed at the step.
    weights:    [R] float32, ``1 / (T_j * k)``: a position's share of its trajectory's loss
                (``T_j`` = steps of the trajectory with k > 0), so each trajectory sums to 1.
    chunk:      [R] long, the optimizer step of the rollout batch that trains the row (``chunked``).
    loss_weights: [R] float32, a position's weight in its chunk's loss: ``1 / (T_jc * k)`` with
                ``T_jc`` the trajectory's rows in that chunk (``1 / T_jc`` when K_t is summed).
    """

    rows: torch.Tensor
    step: torch.Tensor
    states: torch.Tensor
    teacher: torch.Tensor
    candidates: torch.Tensor
    committed: torch.Tensor
    k: torch.Tensor
    weights: torch.Tensor
    chunk: torch.Tensor
    loss_weights: torch.Tensor

    def __len__(self) -> int:
        return self.rows.shape[0]

    def part(self, index: slice | torch.Tensor) -> "StepStates":
        """The rows ``index`` selects (a slice, indices, or a [R] bool mask, turned into indices once)."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            index = index.nonzero(as_tuple=True)[0]
        return StepStates(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def flatten_trajectories(trajectory: Trajectory, rows: Sequence[int], *, block_length: int, mask_id: int) -> StepStates:
    """Step states of the trajectories ``rows`` of a batch (``trajectory.states`` [S, B, G]).

    ``teacher`` is left equal to ``states``; set it with ``self_future_teacher_states``.
    """
    s, _, g = trajectory.states.shape
    device = trajectory.states.device
    rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=device)
    states = trajectory.states[:, rows_t].transpose(0, 1).reshape(-1, g)      # [n*S, G], trajectory-major
    committed = trajectory.committed[:, rows_t].transpose(0, 1).reshape(-1, g)
    step = torch.arange(s, device=device).repeat(len(rows_t))
    blocks = trajectory.block.to(device)[step]
    k = committed.sum(1)
    per_traj = (k.view(len(rows_t), s) > 0).sum(1).clamp(min=1)
    weights = 1.0 / (per_traj.repeat_interleave(s).float() * k.clamp(min=1).float())
    candidates = (states == mask_id) & current_block_mask(blocks, block_length, g)
    keep = k > 0
    out = StepStates(rows_t.repeat_interleave(s), step, states, states, candidates, committed, k, weights,
                     torch.zeros_like(step), weights)
    return out.part(keep)


def informative_steps(states: torch.Tensor, teacher: torch.Tensor, finals: torch.Tensor, *, mask_id: int,
                      eos_id: int | None, require_reveal: bool = True) -> torch.Tensor:
    """[R] bool: the step states that carry a self-distillation signal.

    states, teacher: [R, G] the student's and the teacher's response states; finals: [R, G] each
    row's final answer ``y_0``. A step is informative when some position *before* the first EOS of
    ``y_0`` (all of ``y_0`` when it has none) is still masked in ``y_t`` and, with
    ``require_reveal``, the teacher's input differs from the student's in at least one position.
    The others -- every step of the last block, steps that only decode the EOS tail, and steps
    where ``floor(rho * n)`` rounds to 0 -- compare the model with itself on the same input.
    """
    g = states.shape[1]
    first_eos = response_lengths(finals, eos_id)
    before_eos = torch.arange(g, device=states.device)[None, :] < first_eos[:, None]
    keep = ((states == mask_id) & before_eos).any(1)
    if require_reveal:
        keep &= (teacher != states).any(1)
    return keep


def official_steps(states: torch.Tensor, blocks: torch.Tensor, *, num_blocks: int, mask_id: int,
                   eos_id: int | None) -> torch.Tensor:
    """[R] bool: the step states the official code trains (``train_steps: official``).

    states: [R, G] the student's states ``y_t``; blocks: [R] the block each decodes. The official
    sampler records a state only outside the last block and while a mask remains before the first
    EOS of the state itself (all of it when it has no EOS yet): its recorded steps are its trained
    steps. (It then also leaves the last recorded state out, an indexing artefact not copied here.)
    """
    g = states.shape[1]
    first_eos = response_lengths(states, eos_id)
    before_eos = torch.arange(g, device=states.device)[None, :] < first_eos[:, None]
    return (blocks < num_blocks - 1) & ((states == mask_id) & before_eos).any(1)


def reweighted(steps: StepStates) -> StepStates:
    """``steps`` with ``weights = 1 / (T_j * k)`` recomputed, ``T_j`` = the rows of trajectory j left."""
    if not len(steps):
        return steps
    _, inverse, counts = torch.unique(steps.rows, return_inverse=True, return_counts=True)
    weights = 1.0 / (counts[inverse].float() * steps.k.clamp(min=1).float())
    return replace(steps, weights=weights, loss_weights=weights)


def chunked(steps: StepStates, batch_divide: int, kt_reduction: Literal["mean", "sum"] = "mean") -> StepStates:
    """``steps`` with each trajectory's rows split, in step order, into ``batch_divide`` chunks.

    Rows must be grouped by trajectory (``flatten_trajectories`` order). A trajectory of ``T`` rows
    puts its ``r``-th row in chunk ``floor(r * batch_divide / T)``: contiguous chunks whose sizes
    differ by at most one (fewer than ``batch_divide`` when ``T < batch_divide``). ``loss_weights``
    become ``1 / (T_jc * k)`` -- the mean over the chunk's steps of the mean over K_t -- or
    ``1 / T_jc`` with ``kt_reduction="sum"`` (the official code: the sum over K_t divided by the
    steps in the chunk). ``batch_divide=1`` with ``mean`` leaves ``loss_weights == weights``.
    """
    if not len(steps):
        return steps
    _, counts = torch.unique_consecutive(steps.rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    n = len(steps)  # the size of every repeat below, given so that none reads its sum back
    total = counts.repeat_interleave(counts, output_size=n)
    rank = torch.arange(n, device=steps.rows.device) - starts.repeat_interleave(counts, output_size=n)
    chunk = torch.div(rank * batch_divide, total, rounding_mode="floor")
    key = steps.rows * batch_divide + chunk  # (trajectory, chunk), consecutive like the rows
    _, per_chunk = torch.unique_consecutive(key, return_counts=True)
    size = per_chunk.repeat_interleave(per_chunk, output_size=n).float()
    k = steps.k.clamp(min=1).float()
    loss_weights = 1.0 / (size * k) if kt_reduction == "mean" else 1.0 / size
    return replace(steps, chunk=chunk, loss_weights=loss_weights)


def loss_scale(num_processes: int, n_trained_global: float) -> float:
    """The factor of each rank's summed loss ``sum_rows w * D``: DDP averages gradients over the
    ranks, so ``num_processes / N_global`` makes the update the gradient of the mean, over the
    ``N_global`` trained trajectories of all ranks, of each trajectory's step-averaged loss (eq. 12)."""
    return num_processes / n_trained_global


@dataclass
class StepLogits:
    """Logits at the positions of a micro-batch where the loss is taken (M of them).

    student: [M, V] (with gradient); teacher: [M, V] (no gradient); positions: [n, G] bool, K_t per
    row; row: [M] long, the step-state row of each of the M positions (row-major order); selected:
    [M] bool, which of them are in K_t (None: all, as ``step_logits`` gives them; ``block_step_logits``
    gives every position of the current block)."""

    student: torch.Tensor
    teacher: torch.Tensor
    positions: torch.Tensor
    row: torch.Tensor
    selected: torch.Tensor | None = None


def confident_positions(logits: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor,
                        by: Literal["probability", "max_logit"] = "probability") -> torch.Tensor:
    """The ``k[r]`` candidates of each row where the model is most confident.

    logits: [C, V] at the True entries of candidates [n, G] (row-major), or [n * G, V] at every entry
    (a fixed shape: no data-dependent indexing; when every entry is a candidate the two agree); k: [n].
    ``by``: the probability of the argmax token (softmax in float32), or the raw maximum logit (the
    official code; not a confidence: a flat row of large logits outranks a peaked one). Returns [n, G] bool.
    """
    logits = logits.detach().float()
    conf = torch.softmax(logits, dim=-1).amax(dim=-1) if by == "probability" else logits.amax(dim=-1)
    return topk_mask(candidate_scores(conf, candidates), torch.minimum(k, candidates.sum(1))) & candidates


def step_logits(student: LogitsFn, teacher: LogitsFn, steps: StepStates, prompts: Sequence[Sequence[int]],
                teacher_prompts: Sequence[Sequence[int]], *, pad_id: int,
                select: Literal["teacher", "student", "committed"] = "teacher",
                confidence: Literal["probability", "max_logit"] = "probability") -> StepLogits:
    """One student and one teacher forward over a micro-batch of step states.

    ``prompts`` / ``teacher_prompts`` hold each row's prompt tokens. The LM head runs only at the
    candidate positions of the model that ranks them (by ``confidence``) and at K_t for the other one.
    """
    s_ids, s_attn, p = prompt_and_response_inputs(prompts, steps.states, pad_id)
    t_ids, t_attn, tp = prompt_and_response_inputs(teacher_prompts, steps.teacher, pad_id)
    cand = steps.candidates
    if select == "teacher":
        ranked = teacher(t_ids, t_attn, with_prompt_columns(cand, tp))
        chosen = confident_positions(ranked, cand, steps.k, confidence)
        t_logits = ranked[chosen[cand]]
        s_logits = student(s_ids, s_attn, with_prompt_columns(chosen, p))
    elif select == "student":
        ranked = student(s_ids, s_attn, with_prompt_columns(cand, p))
        chosen = confident_positions(ranked, cand, steps.k, confidence)
        s_logits = ranked[chosen[cand]]
        t_logits = teacher(t_ids, t_attn, with_prompt_columns(chosen, tp))
    elif select == "committed":
        chosen = steps.committed & cand
        t_logits = teacher(t_ids, t_attn, with_prompt_columns(chosen, tp))
        s_logits = student(s_ids, s_attn, with_prompt_columns(chosen, p))
    else:
        raise ValueError(f"unknown position selection {select!r}; choose teacher, student or committed")
    return StepLogits(s_logits, t_logits.detach(), chosen, chosen.nonzero(as_tuple=True)[0])


PromptInputs = tuple[torch.Tensor, torch.Tensor]  # (ids [n, P], attention mask [n, P]), left-padded


def block_step_logits(student: LogitsFn, teacher: LogitsFn, steps: StepStates, blocks: torch.Tensor,
                      prompts: PromptInputs, teacher_prompts: PromptInputs, *, block_length: int,
                      select: Literal["teacher", "student", "committed"] = "teacher",
                      confidence: Literal["probability", "max_logit"] = "probability") -> StepLogits:
    """``step_logits`` with fixed shapes (``training.static_shapes``): both LM heads run at every position of
    each row's current block, where K_t lies, and the loss weighs the positions off K_t by 0. Nothing has a
    data-dependent shape, so no device-to-host read happens; the heads see ``block_length`` positions per
    row instead of K_t and the candidates.

    blocks: [n] the block each step state decodes; prompts / teacher_prompts: each row's prompt, left-padded
    to a common width. Returns ``StepLogits`` over the n * block_length block positions (row-major), with
    ``selected`` marking K_t.
    """
    n, length = blocks.shape[0], block_length
    cols = blocks[:, None] * length + torch.arange(length, device=blocks.device)[None, :]  # [n, L] response columns

    def inputs(prompt: PromptInputs, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = prompt
        return (torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response, dtype=mask.dtype)], 1),
                cols + ids.shape[1])

    s_ids, s_attn, s_pos = inputs(prompts, steps.states)
    t_ids, t_attn, t_pos = inputs(teacher_prompts, steps.teacher)
    cand = steps.candidates.gather(1, cols)
    if select == "teacher":
        t_logits = teacher(t_ids, t_attn, t_pos)
        chosen = confident_positions(t_logits, cand, steps.k, confidence)
        s_logits = student(s_ids, s_attn, s_pos)
    elif select == "student":
        s_logits = student(s_ids, s_attn, s_pos)
        chosen = confident_positions(s_logits, cand, steps.k, confidence)
        t_logits = teacher(t_ids, t_attn, t_pos)
    elif select == "committed":
        chosen = steps.committed.gather(1, cols) & cand
        t_logits = teacher(t_ids, t_attn, t_pos)
        s_logits = student(s_ids, s_attn, s_pos)
    else:
        raise ValueError(f"unknown position selection {select!r}; choose teacher, student or committed")
    positions = torch.zeros_like(steps.candidates).scatter(1, cols, chosen)
    row = torch.arange(n, device=blocks.device).repeat_interleave(length)
    return StepLogits(s_logits, t_logits.detach(), positions, row, chosen.reshape(-1))


# --------------------------------------------------------------------------------------------
# the trainer


@dataclass
class Rollout:
    """A rollout batch after pass@k (B prompts; S steps; G = gen_length).

    indices: example index per prompt; prompts / teacher_prompts: token lists per prompt;
    trajectory: the kept trajectory per prompt (states and committed [S, B, G]); finals: [B, G] its
    answer; scores: [B] its score; accepted: [B] bool; attempts: [B] attempts used;
    first_scores / first_correct / first_lengths: [B] score, task-level correctness and tokens
    before the first EOS of the first attempt."""

    indices: list[int]
    prompts: list[list[int]]
    teacher_prompts: list[list[int]]
    trajectory: Trajectory
    finals: torch.Tensor
    scores: torch.Tensor
    accepted: torch.Tensor
    attempts: torch.Tensor
    first_scores: torch.Tensor
    first_correct: torch.Tensor
    first_lengths: torch.Tensor


class DOPSDTrainer(OnPolicyTrainer):
    """d-OPSD (see the module docstring). ``train_items`` come from ``onpolicy.prompt_items``."""

    method_name = "dopsd"

    def __init__(self, model: DiffusionModel, tokenizer, train_items: list[dict[str, Any]], config: TrainingConfig, *,
                 method: DOPSDConfig | None = None, **kwargs: Any):
        self.method = m = method or DOPSDConfig()  # checked when it was built (config.validate_tree for one made by hand)
        if m.teacher_context == "reference_prefix" and not all("teacher_prompt_ids" in it for it in train_items):
            raise ValueError("teacher_context=reference_prefix needs items with teacher_prompt_ids "
                             "(prompt_items(..., teacher_template=method.reference_template))")
        self.uses_frozen_policy = m.teacher == "fixed"
        self._consecutive_skips = 0
        super().__init__(model, tokenizer, train_items, config, **kwargs)
        if m.teacher_context == "self_future" and m.rollout.num_blocks == 1:
            log.warning("d-OPSD: the self-future teacher reveals only positions outside the current block; with a "
                        "single block (rollout.block_length null) the teacher sees exactly the student's input")
        for warning in collapse_warnings(m, learning_rate=self.config.learning_rate, lora=self.unwrapped.is_peft):
            log.warning(warning)
        if m.pass_k > 1 and m.rollout.temperature == 0 and m.rollout.remasking == "low_confidence":
            log.warning("d-OPSD: greedy low-confidence rollouts are deterministic, so pass@k resamples repeat "
                        "the first attempt; set rollout.temperature > 0")

    # ------------------------------------------------------------------ rollouts
    def sample(self, batch: list[dict[str, Any]]) -> Rollout:
        """Pass@k rollouts. ``first_accepted``: resample the prompts not accepted yet while any rank still
        has one; a rejected prompt keeps its best attempt (the earliest among ties), or its last one with
        ``rejected: zero_weight``. ``best_of_k``: every prompt draws ``pass_k`` attempts and keeps the
        highest-scoring one, ties to the later."""
        m, gen = self.method, self.method.rollout
        best_of_k = m.pass_k_mode == "best_of_k"
        keep_last = m.rejected == "zero_weight"
        indices = [int(it["index"]) for it in batch]
        prompts = [list(it["prompt_ids"]) for it in batch]
        key = "teacher_prompt_ids" if m.teacher_context == "reference_prefix" else "prompt_ids"
        teacher_prompts = [list(it[key]) for it in batch]
        b, s, g = len(prompts), gen.trajectory_steps, gen.gen_length  # threshold decoding: one slot per position
        device = self.unwrapped.device
        states = torch.full((s, b, g), self.unwrapped.mask_id, dtype=torch.long, device=device)
        committed = torch.zeros((s, b, g), dtype=torch.bool, device=device)
        finals = torch.zeros((b, g), dtype=torch.long, device=device)
        scores, accepted, attempts = [float("-inf")] * b, [False] * b, [0] * b  # host lists: no read per prompt
        first = None
        generator = self.generator("rollout")
        pending = list(range(b))
        for attempt in range(1, m.pass_k + 1):
            if self.global_totals([len(pending)])[0] == 0:
                break
            responses, traj = self.rollout([prompts[i] for i in pending], gen, generator, filler=prompts[0],
                                           trajectory=True)
            sc = self.score([indices[i] for i in pending], responses)
            ok = self.correct(sc, m.accept_threshold)
            if first is None:
                first = (sc, self.correct(sc), response_lengths(responses, self.unwrapped.eos_id).cpu())
            for p, (i, score, correct) in enumerate(zip(pending, sc.tolist(), ok.tolist())):
                attempts[i] = attempt
                keep = score >= scores[i] if best_of_k else correct or keep_last or score > scores[i]
                if keep:
                    states[:, i], committed[:, i] = traj.states[:, p], traj.committed[:, p]
                    finals[i], scores[i], accepted[i] = responses[p], score, correct
            if not best_of_k:
                pending = [i for i in pending if not accepted[i]]
        blocks = torch.arange(s, device=device) // gen.trajectory_steps_per_block
        return Rollout(indices, prompts, teacher_prompts, Trajectory(states, committed, blocks), finals,
                       torch.tensor(scores, dtype=torch.float32), torch.tensor(accepted, dtype=torch.bool),
                       torch.tensor(attempts, dtype=torch.long), *first)

    def step_states(self, roll: Rollout, rows: Sequence[int]) -> StepStates:
        """The step states of the trained trajectories, with the teacher's states filled in; with
        ``train_steps`` informative or official only those steps (``informative_steps``,
        ``official_steps``), re-weighted so that each trajectory's kept steps still average to its loss;
        then split into ``batch_divide`` chunks (``chunked``)."""
        m = self.method
        block = m.rollout.block_length or m.rollout.gen_length
        mask_id, eos_id = self.unwrapped.mask_id, self.unwrapped.eos_id
        steps = flatten_trajectories(roll.trajectory, rows, block_length=block, mask_id=mask_id)
        if not len(steps):
            return steps
        blocks = roll.trajectory.block[steps.step]
        if m.teacher_context == "self_future":
            steps.teacher = self_future_teacher_states(
                steps.states, roll.finals[steps.rows], blocks, block_length=block, mask_id=mask_id, rho=m.rho,
                generator=self.generator("teacher"), eos_id=eos_id, scope=m.reveal)
        if m.train_steps == "informative":
            keep = informative_steps(steps.states, steps.teacher, roll.finals[steps.rows], mask_id=mask_id,
                                     eos_id=eos_id, require_reveal=m.teacher_context == "self_future")
            steps = reweighted(steps.part(keep))
        elif m.train_steps == "official":
            keep = official_steps(steps.states, blocks, num_blocks=m.rollout.num_blocks, mask_id=mask_id,
                                  eos_id=eos_id)
            steps = reweighted(steps.part(keep))
        return chunked(steps, m.batch_divide, m.kt_reduction)

    def padding_steps(self, roll: Rollout) -> StepStates:
        """A zero-weight step state (a fully masked response, one position) for ranks with less work."""
        g = self.method.rollout.gen_length
        block = self.method.rollout.block_length or g
        device = self.unwrapped.device
        states = torch.full((1, g), self.unwrapped.mask_id, dtype=torch.long, device=device)
        cand = current_block_mask(torch.zeros(1, dtype=torch.long, device=device), block, g)
        committed = torch.zeros_like(cand)
        committed[0, 0] = True
        one = torch.ones(1, dtype=torch.long, device=device)
        zero = torch.zeros(1, device=device)
        return StepStates(one * 0, one * 0, states, states, cand, committed, one, zero, one * 0, zero)

    # ------------------------------------------------------------------ loss
    def teacher_logits_fn(self) -> LogitsFn:
        return self.initial_policy_logits if self.method.teacher == "fixed" else self.current_policy_logits

    def micro_batch_loss(self, steps: StepStates, roll: Rollout, scale: float,
                         prompts: tuple[PromptInputs, PromptInputs] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, sums)``: the scaled loss of a micro-batch (``loss_weights``) and the detached sums, weighted
        by ``weights``, of (divergence, clip fraction, top-K overlap) for the logs. With ``prompts`` (the
        rollout batch's left-padded student and teacher prompts) the heads run on fixed shapes
        (``block_step_logits``); without, at the selected positions only (``step_logits``)."""
        m = self.method
        if prompts is None:
            rows = steps.rows.tolist()
            out = step_logits(self.policy_logits, self.teacher_logits_fn(), steps, [roll.prompts[r] for r in rows],
                              [roll.teacher_prompts[r] for r in rows], pad_id=self.pad_id, select=m.positions,
                              confidence=m.confidence)
        else:
            (ids, mask), (t_ids, t_mask) = prompts
            out = block_step_logits(self.policy_logits, self.teacher_logits_fn(), steps,
                                    roll.trajectory.block[steps.step], (ids[steps.rows], mask[steps.rows]),
                                    (t_ids[steps.rows], t_mask[steps.rows]),
                                    block_length=m.rollout.block_length or m.rollout.gen_length,
                                    select=m.positions, confidence=m.confidence)
        div = distillation_divergence(student_logits=out.student, teacher_logits=out.teacher, kind=m.divergence,
                                      beta=m.jsd_beta, top_k=m.vocab_top_k, clip=m.clip, clip_mode=m.clip_mode)
        overlap = topk_overlap(student_logits=out.student.detach(), teacher_logits=out.teacher, k=m.overlap_k)
        w, lw = steps.weights[out.row], steps.loss_weights[out.row]
        terms = (div.divergence.detach(), div.clipped, overlap)
        loss_terms = lw * div.divergence
        if out.selected is not None:  # positions off K_t count 0 (where, not a product: no NaN leaks in)
            terms = tuple(torch.where(out.selected, w * x, 0.0) for x in terms)
            loss_terms = torch.where(out.selected, loss_terms, 0.0)
        else:
            terms = tuple(w * x for x in terms)
        sums = torch.stack([x.sum() for x in terms])
        return loss_terms.sum() * scale, sums.double()

    # ------------------------------------------------------------------ one rollout batch
    def training_step(self, batch: list[dict[str, Any]]) -> tuple[bool, dict[str, float]]:
        m = self.method
        zero_weight = m.correct_only and m.rejected == "zero_weight"
        roll = self.sample(batch)
        trained = roll.accepted if m.correct_only else torch.ones_like(roll.accepted)
        rows = trained.nonzero(as_tuple=True)[0].tolist()
        totals = self.global_totals([len(batch), roll.first_scores.sum(), roll.first_correct.sum(), roll.accepted.sum(),
                                     roll.attempts.sum(), roll.first_lengths.sum(), len(rows)])
        n, n_train = totals[0], totals[6]
        metrics = {"reward": totals[1] / n, "accuracy": totals[2] / n, "accepted": totals[3] / n,
                   "attempts": totals[4] / n, "completion_length": totals[5] / n}
        nothing = n_train == 0
        self.count_rollouts(totals[4], totals[3], idle=nothing, skipped=nothing and not zero_weight,
                            why=f"no accepted trajectory (up to pass_k={m.pass_k} attempts per prompt), so "
                            + ("only zero-weight optimizer steps" if zero_weight else "no optimizer step"),
                            advice=f"The model does not solve these prompts yet: start from a model that sometimes "
                            f"does (e.g. after SFT), raise method.pass_k (now {m.pass_k}) or lower "
                            f"method.accept_threshold (now {m.accept_threshold}); the run stops after "
                            f"method.max_consecutive_skips={m.max_consecutive_skips} such batches")
        if nothing and not zero_weight:
            return self._skip(metrics, "no accepted trajectory")
        steps = self.step_states(roll, rows)
        d = m.batch_divide
        # the counts for the logs, the skip rule and the update plan, kept on the device and read once: which
        # (chunk, trajectory) pairs have a trained step, and this rank's step states per chunk
        device = steps.rows.device
        has = torch.zeros(d, len(batch), dtype=torch.bool, device=device)
        has[steps.chunk, steps.rows] = True
        per_chunk = torch.zeros(d, dtype=torch.long, device=device).index_add_(0, steps.chunk,
                                                                                torch.ones_like(steps.chunk))
        recorded = roll.trajectory.committed[:, rows].any(-1).sum() if rows else 0  # steps with k_t > 0
        counts = self.global_totals([has.any(0).sum(), len(steps), recorded, *has.sum(1)], local=per_chunk)
        n_train = counts[0]  # trajectories with at least one trained step
        metrics.update(trained_steps=counts[1] / max(n_train, 1.0), trained_step_fraction=counts[1] / max(counts[2], 1.0))
        if n_train == 0 and not zero_weight:
            self.rollout_counts["skipped"] += 1
            return self._skip(metrics, "no informative step in any accepted trajectory")
        self._consecutive_skips = 0
        # the update plan, fixed here (the rollout phase's host reads): per chunk, its rows, micro-batches and
        # trajectory count; under static_shapes, the prompts left-padded once for the whole rollout batch
        plan = []
        by_chunk = torch.argsort(steps.chunk, stable=True)  # the rows of chunk 0, then 1, ..., each in row order
        ends = [int(x) for x in itertools.accumulate(counts[3 + d:])]
        for c in range(d):
            # the mean over the trajectories this optimizer step trains (zero_weight: over every prompt, the
            # rejected ones adding 0, as the official code's loss * 0 does under DDP's gradient average)
            n_chunk = n if zero_weight else counts[3 + c]
            if n_chunk == 0:
                continue  # no trajectory has a step in this chunk anywhere: no optimizer step
            part_rows = by_chunk[(ends[c - 1] if c else 0):ends[c]]
            parts = micro_batches(len(part_rows), m.micro_batch_size)
            plan.append((part_rows, parts, self.global_max(len(parts)), n_chunk))
        prompts = None
        if self.config.static_shapes:
            device = self.unwrapped.device
            prompts = (left_pad(roll.prompts, self.pad_id, device), left_pad(roll.teacher_prompts, self.pad_id, device))
        sums = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)
        grad_norms, stepped = [], False
        for part_rows, parts, n_parts, n_chunk in plan:
            with torch.profiler.record_function("dopsd.update"):  # one optimizer step (profiles, tests)
                chunk_sums, grad_norm = self._update(steps, roll, part_rows, parts, n_parts, n_chunk, prompts)
            stepped = stepped or not self.last_update_skipped
            if self.last_loss_nonfinite:  # the update was dropped (on_nonfinite_loss: skip): no later chunk
                return stepped, metrics
            sums += chunk_sums
            if grad_norm is not None:
                grad_norms.append(grad_norm)
        n_metric = max(n_train, 1.0)
        metrics.update(loss=sums[0] / n_metric, clip_ratio=sums[1] / n_metric, topk_overlap=sums[2] / n_metric,
                       trained_trajectories=n_train, skipped=0.0)
        if grad_norms:
            metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return stepped, metrics

    def _update(self, steps: StepStates, roll: Rollout, part_rows: torch.Tensor, parts: list[slice], n_parts: int,
                n_chunk: float, prompts: tuple[PromptInputs, PromptInputs] | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over the rows ``part_rows`` of ``steps`` (``n_parts`` micro-batches on every rank,
        zero-weight padding where this rank has fewer): ``(the summed log terms over all ranks, the gradient
        norm)``. With ``prompts`` (fixed shapes) its only host read is the update's finiteness check."""
        scale = loss_scale(self.accelerator.num_processes, n_chunk)
        chunk_sums = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)
        with self.student_mode():
            for i in range(n_parts):
                with nullcontext() if i == n_parts - 1 else self.accelerator.no_sync(self.model):
                    part = steps.part(part_rows[parts[i]]) if i < len(parts) else self.padding_steps(roll)
                    loss, part_sums = self.micro_batch_loss(part, roll, scale, prompts)
                    self.backward(loss)
                chunk_sums += part_sums
        chunk_sums = self.global_sum(chunk_sums)
        self.note_loss(chunk_sums[0])  # read with the gradient norm, once, in optimizer_step
        if n_parts == 0:  # zero_weight and nothing trained anywhere: a zero gradient still steps AdamW
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        return chunk_sums, self.optimizer_step()

    def optimizer_steps_per_batch(self) -> int:
        return self.method.batch_divide

    def student_mode(self):
        """Context of the student's loss forwards and backwards: dropout modules at p = 0 unless
        ``student_dropout`` (the module stays in train mode, so gradient checkpointing still works;
        the backward is inside, so a checkpoint's recomputation sees the same p)."""
        return nullcontext() if self.method.student_dropout else dropout_disabled(self.model)

    def _skip(self, metrics: dict[str, float], reason: str) -> tuple[bool, dict[str, float]]:
        """Nothing to train anywhere: no forward, no optimizer step, the global step stays."""
        self.state.skipped_steps += 1
        self._consecutive_skips += 1
        limit = self.method.max_consecutive_skips
        if limit and self._consecutive_skips >= limit:
            raise NothingToTrainError(f"d-OPSD: {self._consecutive_skips} rollout batches in a row had nothing to train "
                               f"(last: {reason}; pass_k={self.method.pass_k}, accept_threshold="
                               f"{self.method.accept_threshold}, train_steps={self.method.train_steps}). Start from a "
                               f"model that sometimes solves the task (e.g. after SFT), raise pass_k, or lower "
                               f"accept_threshold")
        metrics.update(skipped=1.0, skipped_batches=float(self.state.skipped_steps))
        return False, metrics

def run(cfg: Any) -> dict[str, float]:
    """Train with d-OPSD; returns the final evaluation metrics."""
    from ..tasks.registry import get_task

    m: DOPSDConfig = cfg.method
    prep = prepare(cfg, need_targets=False)
    task = get_task(cfg.data.task, **cfg.data.task_kwargs)
    template = m.reference_template if m.teacher_context == "reference_prefix" else None
    items = prompt_items(prep.train_examples, prep.tokenizer, prompt_format=cfg.data.prompt_format,
                         gen_length=m.rollout.gen_length,
                         max_positions=getattr(prep.model.config, "max_position_embeddings", None),
                         teacher_template=template)
    trainer = DOPSDTrainer(prep.model, prep.tokenizer, items, cfg.training, task=task, examples=prep.train_examples,
                           method=m, evaluator=prep.evaluator, run_config=cfg)
    write_run_metadata(cfg, prep.tokenizer, DOPSDTrainer.method_name, trainer.accelerator)
    return finish(trainer, trainer.train())


__all__ = ["COLLAPSE_LR", "NothingToTrainError", "DOPSDConfig", "DOPSDRunConfig", "DOPSDTrainer", "PromptInputs",
           "Rollout", "StepLogits", "StepStates", "block_step_logits", "chunked", "collapse_warnings",
           "confident_positions", "current_block_mask", "flatten_trajectories",
           "informative_steps", "loss_scale", "official_steps", "reweighted", "run", "self_future_teacher_states",
           "step_logits"]
