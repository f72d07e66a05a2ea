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
   reverse KL by default, optional teacher top-K vocabulary and pointwise clipping), averaged over
   all steps of a trajectory (the last block included), then over the accepted trajectories of
   the global batch. The step states of all trajectories are stacked into micro-batches of
   ``micro_batch_size`` states; each micro-batch is one student and one teacher forward with the LM
   head only at the needed positions, and one backward; one optimizer step per rollout batch.

The teacher is the initial policy (LoRA adapters disabled, or a frozen copy under full
fine-tuning) or, with ``teacher=current``, the current policy without gradient.

    dlmdistill train dopsd --config configs/dopsd_countdown_tiny.yaml

``regenerate_from_self_teacher`` (the paper's Table 3 toy) and ``compare_teacher_overlap``
(Figure 3) are the analysis helpers the experiments call.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch

from ..config import field
from ..data import encode_prompt
from ..losses.divergences import ClipMode, DivergenceKind, distillation_divergence, topk_overlap
from ..models.backbone import DiffusionModel
from ..sampling import GenerationConfig, Trajectory, generate, topk_mask
from ..tasks.base import Example, Task
from ..training.trainer import TrainingConfig
from .common import finish, prepare, run_config_class, write_run_metadata
from .onpolicy import (LogitsFn, OnPolicyTrainer, micro_batches, prompt_and_response_inputs, prompt_items,
                       response_lengths, with_prompt_columns)

log = logging.getLogger(__name__)


def _paper_rollout() -> GenerationConfig:
    return GenerationConfig(gen_length=256, steps=128, block_length=32, temperature=0.9, batch_size=8)


@dataclass
class DOPSDConfig:
    rollout: GenerationConfig = field(default_factory=_paper_rollout, help="sampler of the on-policy trajectories "
                                      "(paper: 256 tokens, 128 steps, blocks of 32; temperature 0.9 as in the "
                                      "reference code, so that pass@k resamples differ)")
    pass_k: int = field(8, help="attempts per prompt: resample rejected prompts until the verifier accepts, at "
                        "most this many times in all (1 = a single sample)")
    accept_threshold: float | None = field(None, help="score from which a trajectory is accepted; null = the "
                                           "task's own (1.0 = correct); the paper uses 0.25 for Sudoku")
    correct_only: bool = field(True, help="train only on accepted trajectories; false = train on every prompt's "
                               "kept trajectory (the accepted one, else the best-scoring attempt; Table 11)")
    teacher_context: Literal["self_future", "reference_prefix"] = field(
        "self_future", help="self_future: reveal part of the trajectory's own final answer outside the current "
        "block (d-OPSD); reference_prefix: prompt + reference solution as the teacher's prompt (AR-style OPSD)")
    rho: float = field(0.25, help="self_future: fraction of the still-masked positions outside the current block "
                       "revealed to the teacher (floor(rho * eligible))")
    exclude_after_eos: bool = field(False, help="self_future: never reveal positions after the first EOS of the "
                                    "final answer (the EOS itself may be revealed)")
    reference_template: str = field("{prompt}{target}\n", help="reference_prefix: the teacher's prompt, a "
                                    "str.format pattern over {prompt} and {target} (the reference solution)")
    teacher: Literal["fixed", "current"] = field("fixed", help="fixed: the initial policy (LoRA adapters "
                                                 "disabled / a frozen copy); current: the policy itself, no gradient")
    positions: Literal["teacher", "student", "committed"] = field(
        "teacher", help="K_t: the k_t masked positions of the current block with the highest teacher (or student) "
        "probability of its argmax token, or the positions the sampler committed at the step")
    divergence: DivergenceKind = field("reverse_kl", help="reverse_kl = KL(student || teacher), forward_kl, or "
                                       "jsd (GKD's generalised JSD with jsd_beta)")
    jsd_beta: float = field(0.5, help="beta of the generalised JSD (0 < beta < 1)")
    vocab_top_k: int = field(0, help="restrict both distributions to the teacher's top-K ids, renormalised; "
                             "0 = full vocabulary (the paper's text; the reference scripts use 20)")
    clip: float = field(0.05, help="pointwise clipping threshold of the divergence")
    clip_mode: ClipMode = field("per_term", help="per_term: cap each vocabulary term (reference code); "
                                "per_token: cap each position's divergence; off")
    micro_batch_size: int = field(8, help="step states per forward pass (student and teacher each); the "
                                  "gradient is accumulated over micro-batches, one optimizer step per rollout batch")
    overlap_k: int = field(20, help="K of the logged top-K overlap between student and teacher (eq. 13)")
    max_consecutive_skips: int = field(100, help="stop with an error after this many rollout batches in a row "
                                       "without an accepted trajectory (0 = never)")

    def validate(self) -> None:
        self.rollout.validate()
        if self.pass_k < 1 or self.micro_batch_size < 1 or self.overlap_k < 1:
            raise ValueError("pass_k, micro_batch_size and overlap_k must be >= 1")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError("rho must be in [0, 1]")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError("jsd_beta must be in (0, 1)")
        if self.clip_mode != "off" and self.clip <= 0:
            raise ValueError("clip must be > 0 (or clip_mode: off)")
        if self.vocab_top_k < 0 or self.max_consecutive_skips < 0:
            raise ValueError("vocab_top_k and max_consecutive_skips must be >= 0")


DOPSDRunConfig = run_config_class("DOPSDRunConfig", DOPSDConfig, "Configuration of a d-OPSD run.")


# --------------------------------------------------------------------------------------------
# teacher construction and step states (pure)


def current_block_mask(blocks: torch.Tensor, block_length: int, gen_length: int) -> torch.Tensor:
    """Response positions of each row's current block: blocks [N] -> [N, G] bool."""
    pos = torch.arange(gen_length, device=blocks.device)[None, :]
    start = blocks[:, None] * block_length
    return (pos >= start) & (pos < start + block_length)


def self_future_teacher_states(states: torch.Tensor, final: torch.Tensor, blocks: torch.Tensor, *, block_length: int,
                               mask_id: int, rho: float, generator: torch.Generator | None = None,
                               eos_id: int | None = None) -> torch.Tensor:
    """The teacher's response state (eq. 8): ``y_t`` with part of the self-generated future revealed.

    states: [N, G] the student's states ``y_t``; final: [N, G] the answers ``y_0``; blocks: [N] the
    block decoded at each state. Eligible positions: still masked in ``y_t`` and outside the
    current block (and, when ``eos_id`` is given, not after the first ``eos_id`` of ``y_0``). Of the
    ``n`` eligible positions of a row, ``floor(rho * n)`` chosen uniformly at random take their
    ``y_0`` token; everything else is ``y_t``. Returns [N, G].
    """
    g = states.shape[1]
    eligible = (states == mask_id) & ~current_block_mask(blocks, block_length, g)
    if eos_id is not None:
        last = response_lengths(final, eos_id)  # index of the first EOS (G if none)
        eligible &= torch.arange(g, device=states.device)[None, :] <= last[:, None]
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
    """

    rows: torch.Tensor
    step: torch.Tensor
    states: torch.Tensor
    teacher: torch.Tensor
    candidates: torch.Tensor
    committed: torch.Tensor
    k: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.rows.shape[0]

    def part(self, index: slice | torch.Tensor) -> "StepStates":
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
    out = StepStates(rows_t.repeat_interleave(s), step, states, states, candidates, committed, k, weights)
    return out.part(keep)


@dataclass
class StepLogits:
    """Logits at the selected positions K_t of a micro-batch (M = total selected positions).

    student: [M, V] (with gradient); teacher: [M, V] (no gradient); positions: [n, G] bool, K_t per
    row; row: [M] long, the step-state row of each selected position (row-major order)."""

    student: torch.Tensor
    teacher: torch.Tensor
    positions: torch.Tensor
    row: torch.Tensor


def confident_positions(logits: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k[r]`` candidates of each row where the model's top token is most probable.

    logits: [C, V] at the True entries of candidates [n, G] (row-major); k: [n]. Ranking is by the
    probability of the argmax token (softmax in float32), not by the raw logit. Returns [n, G] bool.
    """
    conf = torch.softmax(logits.detach().float(), dim=-1).amax(dim=-1)
    scores = torch.full(candidates.shape, float("-inf"), device=candidates.device)
    scores[candidates] = conf
    return topk_mask(scores, torch.minimum(k, candidates.sum(1))) & candidates


def step_logits(student: LogitsFn, teacher: LogitsFn, steps: StepStates, prompts: Sequence[Sequence[int]],
                teacher_prompts: Sequence[Sequence[int]], *, pad_id: int,
                select: Literal["teacher", "student", "committed"] = "teacher") -> StepLogits:
    """One student and one teacher forward over a micro-batch of step states.

    ``prompts`` / ``teacher_prompts`` hold each row's prompt tokens. The LM head runs only at the
    candidate positions of the model that ranks them and at K_t for the other one.
    """
    s_ids, s_attn, p = prompt_and_response_inputs(prompts, steps.states, pad_id)
    t_ids, t_attn, tp = prompt_and_response_inputs(teacher_prompts, steps.teacher, pad_id)
    cand = steps.candidates
    if select == "teacher":
        ranked = teacher(t_ids, t_attn, with_prompt_columns(cand, tp))
        chosen = confident_positions(ranked, cand, steps.k)
        t_logits = ranked[chosen[cand]]
        s_logits = student(s_ids, s_attn, with_prompt_columns(chosen, p))
    elif select == "student":
        ranked = student(s_ids, s_attn, with_prompt_columns(cand, p))
        chosen = confident_positions(ranked, cand, steps.k)
        s_logits = ranked[chosen[cand]]
        t_logits = teacher(t_ids, t_attn, with_prompt_columns(chosen, tp))
    elif select == "committed":
        chosen = steps.committed & cand
        t_logits = teacher(t_ids, t_attn, with_prompt_columns(chosen, tp))
        s_logits = student(s_ids, s_attn, with_prompt_columns(chosen, p))
    else:
        raise ValueError(f"unknown position selection {select!r}; choose teacher, student or committed")
    return StepLogits(s_logits, t_logits.detach(), chosen, chosen.nonzero(as_tuple=True)[0])


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
        self.method = m = method or DOPSDConfig()
        m.validate()
        if m.teacher_context == "reference_prefix" and not all("teacher_prompt_ids" in it for it in train_items):
            raise ValueError("teacher_context=reference_prefix needs items with teacher_prompt_ids "
                             "(prompt_items(..., teacher_template=method.reference_template))")
        self.uses_frozen_policy = m.teacher == "fixed"
        self._consecutive_skips = 0
        super().__init__(model, tokenizer, train_items, config, **kwargs)
        if m.teacher_context == "self_future" and m.rollout.num_blocks == 1:
            log.warning("d-OPSD: the self-future teacher reveals only positions outside the current block; with a "
                        "single block (rollout.block_length null) the teacher sees exactly the student's input")
        if m.pass_k > 1 and m.rollout.temperature == 0 and m.rollout.remasking == "low_confidence":
            log.warning("d-OPSD: greedy low-confidence rollouts are deterministic, so pass@k resamples repeat "
                        "the first attempt; set rollout.temperature > 0")

    # ------------------------------------------------------------------ rollouts
    def sample(self, batch: list[dict[str, Any]]) -> Rollout:
        """Pass@k rollouts: resample the prompts not accepted yet while any rank still has one."""
        m, gen = self.method, self.method.rollout
        indices = [int(it["index"]) for it in batch]
        prompts = [list(it["prompt_ids"]) for it in batch]
        key = "teacher_prompt_ids" if m.teacher_context == "reference_prefix" else "prompt_ids"
        teacher_prompts = [list(it[key]) for it in batch]
        b, s, g = len(prompts), gen.trajectory_steps, gen.gen_length  # threshold decoding: one slot per position
        device = self.unwrapped.device
        states = torch.full((s, b, g), self.unwrapped.mask_id, dtype=torch.long, device=device)
        committed = torch.zeros((s, b, g), dtype=torch.bool, device=device)
        finals = torch.zeros((b, g), dtype=torch.long, device=device)
        scores = torch.full((b,), float("-inf"))
        accepted = torch.zeros(b, dtype=torch.bool)
        attempts = torch.zeros(b, dtype=torch.long)
        first = None
        generator = self.generator("rollout")
        pending = list(range(b))
        for attempt in range(1, m.pass_k + 1):
            if self.global_sum([len(pending)])[0] == 0:
                break
            responses, traj = self.rollout([prompts[i] for i in pending], gen, generator, filler=prompts[0],
                                           trajectory=True)
            sc = self.score([indices[i] for i in pending], responses)
            ok = self.correct(sc, m.accept_threshold)
            if first is None:
                first = (sc, self.correct(sc), response_lengths(responses, self.unwrapped.eos_id).cpu())
            for p, i in enumerate(pending):
                attempts[i] = attempt
                if ok[p] or sc[p] > scores[i]:  # keep the accepted attempt, else the best so far
                    states[:, i], committed[:, i] = traj.states[:, p], traj.committed[:, p]
                    finals[i], scores[i], accepted[i] = responses[p], sc[p], ok[p]
            pending = [i for i in pending if not accepted[i]]
        blocks = torch.arange(s, device=device) // gen.trajectory_steps_per_block
        return Rollout(indices, prompts, teacher_prompts, Trajectory(states, committed, blocks), finals, scores,
                       accepted, attempts, *first)

    def step_states(self, roll: Rollout, rows: Sequence[int]) -> StepStates:
        """The step states of the trained trajectories, with the teacher's states filled in."""
        m = self.method
        block = m.rollout.block_length or m.rollout.gen_length
        mask_id = self.unwrapped.mask_id
        steps = flatten_trajectories(roll.trajectory, rows, block_length=block, mask_id=mask_id)
        if m.teacher_context == "self_future" and len(steps):
            blocks = roll.trajectory.block[steps.step]
            steps.teacher = self_future_teacher_states(
                steps.states, roll.finals[steps.rows], blocks, block_length=block, mask_id=mask_id, rho=m.rho,
                generator=self.generator("teacher"), eos_id=self.unwrapped.eos_id if m.exclude_after_eos else None)
        return steps

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
        return StepStates(one * 0, one * 0, states, states, cand, committed, one, torch.zeros(1, device=device))

    # ------------------------------------------------------------------ loss
    def teacher_logits_fn(self) -> LogitsFn:
        return self.initial_policy_logits if self.method.teacher == "fixed" else self.current_policy_logits

    def micro_batch_loss(self, steps: StepStates, roll: Rollout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, sums)``: the scaled loss of a micro-batch and the detached weighted sums of
        (divergence, clip fraction, top-K overlap) for the logs."""
        m = self.method
        rows = steps.rows.tolist()
        out = step_logits(self.policy_logits, self.teacher_logits_fn(), steps, [roll.prompts[r] for r in rows],
                          [roll.teacher_prompts[r] for r in rows], pad_id=self.pad_id, select=m.positions)
        div = distillation_divergence(out.student, out.teacher, m.divergence, beta=m.jsd_beta, top_k=m.vocab_top_k,
                                      clip=m.clip, clip_mode=m.clip_mode)
        w = steps.weights[out.row]
        overlap = topk_overlap(out.student.detach(), out.teacher, m.overlap_k)
        sums = torch.stack([(w * div.divergence.detach()).sum(), (w * div.clipped).sum(), (w * overlap).sum()])
        return (w * div.divergence).sum() * scale, sums.double()

    # ------------------------------------------------------------------ one rollout batch
    def training_step(self, batch: list[dict[str, Any]]) -> tuple[bool, dict[str, float]]:
        m = self.method
        roll = self.sample(batch)
        trained = roll.accepted if m.correct_only else torch.ones_like(roll.accepted)
        rows = trained.nonzero(as_tuple=True)[0].tolist()
        totals = self.global_sum([float(x) for x in (len(batch), roll.first_scores.sum(), roll.first_correct.sum(),
                                                     roll.accepted.sum(), roll.attempts.sum(),
                                                     roll.first_lengths.sum(), len(rows))])
        n, n_train = float(totals[0]), float(totals[6])
        metrics = {"reward": float(totals[1]) / n, "accuracy": float(totals[2]) / n, "accepted": float(totals[3]) / n,
                   "attempts": float(totals[4]) / n, "completion_length": float(totals[5]) / n}
        if n_train == 0:
            return self._skip(metrics)
        self._consecutive_skips = 0
        steps = self.step_states(roll, rows)
        parts = micro_batches(len(steps), m.micro_batch_size)
        n_parts = self.global_max(len(parts))
        scale = self.accelerator.num_processes / n_train  # DDP averages over ranks -> mean over trajectories
        sums = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)
        for i in range(n_parts):
            last = i == n_parts - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                part = steps.part(parts[i]) if i < len(parts) else self.padding_steps(roll)
                loss, part_sums = self.micro_batch_loss(part, roll, scale)
                self.backward(loss)
            sums += part_sums
        sums = self.global_sum(sums)
        if not self.check_finite(sums[0]):
            self.optimizer.zero_grad(set_to_none=True)
            return False, metrics
        metrics.update(loss=float(sums[0]) / n_train, clip_ratio=float(sums[1]) / n_train,
                       topk_overlap=float(sums[2]) / n_train, trained_trajectories=n_train, skipped=0.0)
        grad_norm = self.optimizer_step()
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return True, metrics

    def _skip(self, metrics: dict[str, float]) -> tuple[bool, dict[str, float]]:
        """No accepted trajectory anywhere: no forward, no optimizer step, the global step stays."""
        self.state.skipped_steps += 1
        self._consecutive_skips += 1
        limit = self.method.max_consecutive_skips
        if limit and self._consecutive_skips >= limit:
            raise RuntimeError(f"d-OPSD: {self._consecutive_skips} rollout batches in a row had no accepted "
                               f"trajectory (pass_k={self.method.pass_k}, accept_threshold="
                               f"{self.method.accept_threshold}). Start from a model that sometimes solves the "
                               f"task (e.g. after SFT), raise pass_k, or lower accept_threshold")
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


# --------------------------------------------------------------------------------------------
# analysis helpers (the paper's toy verification and Figure 3)


def _no_grad_logits(model: DiffusionModel) -> LogitsFn:
    def fn(ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, attn, positions=positions)
    return fn


def _pass_at_k(model: DiffusionModel, tokenizer, task: Task, examples: Sequence[Example], prompts: list[list[int]],
               gen: GenerationConfig, generator: torch.Generator, pass_k: int, threshold: float | None,
               trajectory: bool) -> dict[str, Any]:
    """Pass@k sampling without a trainer: kept answers (and trajectories), first/any correctness."""
    from ..sampling import decode_responses

    n, g, s = len(prompts), gen.gen_length, gen.steps
    device = model.device
    finals = torch.full((n, g), model.mask_id, dtype=torch.long, device=device)
    states = torch.zeros((s, n, g), dtype=torch.long, device=device)
    committed = torch.zeros((s, n, g), dtype=torch.bool, device=device)
    best = torch.full((n,), float("-inf"))
    accepted = torch.zeros(n, dtype=torch.bool)
    first_correct = torch.zeros(n, dtype=torch.bool)
    pending = list(range(n))
    for attempt in range(pass_k):
        for c in range(0, len(pending), gen.batch_size):
            chunk = pending[c:c + gen.batch_size]
            out = generate(model, [prompts[i] for i in chunk], gen, generator=generator, return_trajectory=trajectory)
            texts = decode_responses(tokenizer, out.responses.cpu(), model.eos_id)
            for p, i in enumerate(chunk):
                score = float(task.score(examples[i], texts[p]))
                ok = task.is_correct(score, threshold)
                if attempt == 0:
                    first_correct[i] = task.is_correct(score)
                if ok or score > best[i]:
                    finals[i], best[i], accepted[i] = out.responses[p], score, ok
                    if trajectory:
                        states[:, i], committed[:, i] = out.trajectory.states[:, p], out.trajectory.committed[:, p]
        pending = [i for i in pending if not accepted[i]]
        if not pending:
            break
    blocks = torch.arange(s, device=device) // gen.steps_per_block
    return {"finals": finals, "accepted": accepted, "first_correct": first_correct,
            "trajectory": Trajectory(states, committed, blocks) if trajectory else None}


@torch.no_grad()
def regenerate_from_self_teacher(model: DiffusionModel, tokenizer, task: Task, examples: Sequence[Example],
                                 generation: GenerationConfig, *, rhos: Sequence[float] = (0.1, 0.25, 0.5),
                                 pass_k: int = 8, accept_threshold: float | None = None,
                                 prompt_format: str = "plain", exclude_after_eos: bool = False,
                                 seed: int = 0) -> dict[str, Any]:
    """The paper's toy verification (Table 3, appendix D.2): can the self-teacher recover the answer?

    For each example: sample with pass@``pass_k`` (kept answer ``y_0``: the first accepted, else
    the best-scoring attempt); then, for each ``rho``, start from a fully masked response with
    ``floor(rho * n)`` of the ``n`` positions outside the first block (up to the first EOS with
    ``exclude_after_eos``) revealed from ``y_0``, and regenerate with ``clear_block_on_entry=True``
    (each block is re-masked when decoding reaches it, so the answer is never copied inside the
    block being decoded). Accuracy is the task's own notion of correct.

    Returns ``{"n", "student": first-attempt accuracy %, "pass@k": %, "self_teacher": {rho: %},
    "revealed_fraction": {rho: mean revealed / gen_length}}``.
    """
    from ..sampling import decode_responses

    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    prompts = [encode_prompt(tokenizer, ex.prompt, prompt_format) for ex in examples]
    res = _pass_at_k(model, tokenizer, task, examples, prompts, generation, gen, pass_k, accept_threshold, False)
    n, g = len(examples), generation.gen_length
    block = generation.block_length or g
    report: dict[str, Any] = {"n": n, "student": 100.0 * res["first_correct"].float().mean().item(),
                              f"pass@{pass_k}": 100.0 * res["accepted"].float().mean().item(),
                              "self_teacher": {}, "revealed_fraction": {}}
    masked = torch.full((n, g), model.mask_id, dtype=torch.long, device=device)
    for rho in rhos:
        init = self_future_teacher_states(masked, res["finals"], torch.zeros(n, dtype=torch.long, device=device),
                                          block_length=block, mask_id=model.mask_id, rho=rho, generator=gen,
                                          eos_id=model.eos_id if exclude_after_eos else None)
        correct = 0
        for c in range(0, n, generation.batch_size):
            sl = slice(c, c + generation.batch_size)
            out = generate(model, prompts[sl], generation, init_response=init[sl], clear_block_on_entry=True,
                           generator=gen)
            texts = decode_responses(tokenizer, out.responses.cpu(), model.eos_id)
            correct += sum(task.is_correct(float(task.score(ex, t))) for ex, t in zip(examples[sl], texts))
        report["self_teacher"][rho] = 100.0 * correct / n
        report["revealed_fraction"][rho] = (init != model.mask_id).float().mean().item()
    return report


@torch.no_grad()
def compare_teacher_overlap(model: DiffusionModel, tokenizer, task: Task, examples: Sequence[Example],
                            generation: GenerationConfig, *, rho: float = 0.25, k: int = 20, pass_k: int = 1,
                            accept_threshold: float | None = None,
                            reference_template: str = "{prompt}{target}\n", prompt_format: str = "plain",
                            select: Literal["teacher", "student", "committed"] = "teacher",
                            micro_batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Top-K overlap (eq. 13) of the student with the d-OPSD teacher vs the AR-style teacher (Figure 3).

    Samples one trajectory per example (pass@``pass_k``), then at every step compares the
    student's top-``k`` vocabulary at K_t with that of the self-future teacher (``rho``) and of the
    reference-prefix teacher (``reference_template``; examples need a ``target``). The teacher is
    ``model`` itself, i.e. the initial policy. Returns, per construction, ``{"mean": overall mean
    over trajectories and steps, "per_step": [mean at step t]}``.
    """
    for ex in examples:
        if ex.target is None:
            raise ValueError(f"{ex.source or 'an example'}: the AR-style teacher needs a reference solution (target)")
    was_training = model.training
    model.eval()
    try:
        device = model.device
        gen = torch.Generator(device=device).manual_seed(seed)
        prompts = [encode_prompt(tokenizer, ex.prompt, prompt_format) for ex in examples]
        teacher_prompts = [encode_prompt(tokenizer, reference_template.format(prompt=ex.prompt, target=ex.target),
                                         prompt_format) for ex in examples]
        res = _pass_at_k(model, tokenizer, task, examples, prompts, generation, gen, pass_k, accept_threshold, True)
        block = generation.block_length or generation.gen_length
        steps = flatten_trajectories(res["trajectory"], range(len(examples)), block_length=block,
                                     mask_id=model.mask_id)
        future = self_future_teacher_states(steps.states, res["finals"][steps.rows], res["trajectory"].block[steps.step],
                                            block_length=block, mask_id=model.mask_id, rho=rho, generator=gen)
        fn = _no_grad_logits(model)
        pad = model.pad_id if model.pad_id is not None else model.mask_id
        report = {}
        for name, teacher_states, t_prompts in [("self_future", future, prompts),
                                                ("reference_prefix", steps.states, teacher_prompts)]:
            total = torch.zeros(generation.steps, dtype=torch.float64)
            count = torch.zeros(generation.steps, dtype=torch.float64)
            for sl in micro_batches(len(steps), micro_batch_size):
                part = replace(steps.part(sl), teacher=teacher_states[sl])
                rows = part.rows.tolist()
                out = step_logits(fn, fn, part, [prompts[r] for r in rows], [t_prompts[r] for r in rows], pad_id=pad,
                                  select=select)
                per_pos = topk_overlap(out.student, out.teacher, k).double().cpu()
                # a trajectory-step's mean over K_t = sum of its positions' overlap / k_t
                w = (1.0 / part.k[out.row].double()).cpu()
                total.index_add_(0, part.step[out.row].cpu(), per_pos * w)
                count.index_add_(0, part.step.cpu(), torch.ones(len(part), dtype=torch.float64))
            per_step = (total / count.clamp(min=1)).tolist()
            report[name] = {"mean": float(total.sum() / count.sum().clamp(min=1)), "per_step": per_step}
        return report
    finally:
        model.train(was_training)


__all__ = ["DOPSDConfig", "DOPSDRunConfig", "DOPSDTrainer", "Rollout", "StepLogits", "StepStates",
           "compare_teacher_overlap", "confident_positions", "current_block_mask", "flatten_trajectories",
           "regenerate_from_self_teacher", "run", "self_future_teacher_states", "step_logits"]
