"""Analysis helpers for d-OPSD: the paper's toy verification (Table 3) and teacher overlap (Figure 3).

They use the trainer's pure pieces (``methods.dopsd``) on a model without a trainer:

* ``regenerate_from_self_teacher``: can the self-teacher recover the answer from part of it?
* ``compare_teacher_overlap``: the top-K overlap (eq. 13) of the student with the self-future
  teacher and with the AR-style (reference-prefix) teacher, measured only on informative steps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Sequence

import torch

from ..data import encode_prompt
from ..losses.divergences import topk_overlap
from ..methods.dopsd import flatten_trajectories, informative_steps, self_future_teacher_states, step_logits
from ..methods.onpolicy import LogitsFn, micro_batches
from ..models.backbone import DiffusionModel
from ..sampling import GenerationConfig, Trajectory, decode_responses, generate
from ..tasks.base import Example, Task

__all__ = ["compare_teacher_overlap", "regenerate_from_self_teacher"]


def _no_grad_logits(model: DiffusionModel) -> LogitsFn:
    def fn(ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, attn, positions=positions)
    return fn


def _pass_at_k(model: DiffusionModel, tokenizer, task: Task, examples: Sequence[Example], prompts: list[list[int]],
               gen: GenerationConfig, generator: torch.Generator, pass_k: int, threshold: float | None,
               trajectory: bool) -> dict[str, Any]:
    """Pass@k sampling without a trainer: kept answers (and trajectories), first/any correctness."""
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
                            exclude_after_eos: bool = False, informative_only: bool = True,
                            micro_batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Top-K overlap (eq. 13) of the student with the d-OPSD teacher vs the AR-style teacher (Figure 3).

    Samples one trajectory per example (pass@``pass_k``), then compares at K_t the student's
    top-``k`` vocabulary with that of the self-future teacher (``rho``) and of the reference-prefix
    teacher (``reference_template``; examples need a ``target``). The teacher is ``model`` itself,
    i.e. the initial policy.

    Steps measured (``informative_only``, default): only those where the self-future teacher sees
    at least one revealed position and masks remain before the first EOS of the final answer
    (``methods.dopsd.informative_steps``); both constructions are measured on the same steps. The
    other steps -- the whole last block, the EOS tail -- give the self-future teacher exactly the
    student's input, so their overlap is 1 by construction and would inflate its mean.

    Returns, per construction, ``{"mean": mean over the measured steps, "per_step": [mean at step
    t, None where no trajectory's step t was measured], "steps_used": measured (trajectory, step)
    pairs, "steps_total": recorded pairs with a committed token}``.
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
        finals = res["finals"][steps.rows]
        future = self_future_teacher_states(steps.states, finals, res["trajectory"].block[steps.step],
                                            block_length=block, mask_id=model.mask_id, rho=rho, generator=gen,
                                            eos_id=model.eos_id if exclude_after_eos else None)
        total_steps = len(steps)
        if informative_only:
            keep = informative_steps(steps.states, future, finals, mask_id=model.mask_id, eos_id=model.eos_id)
            steps, future = steps.part(keep), future[keep]
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
                per_pos = topk_overlap(student_logits=out.student, teacher_logits=out.teacher, k=k).double().cpu()
                # a trajectory-step's mean over K_t = sum of its positions' overlap / k_t
                w = (1.0 / part.k[out.row].double()).cpu()
                total.index_add_(0, part.step[out.row].cpu(), per_pos * w)
                count.index_add_(0, part.step.cpu(), torch.ones(len(part), dtype=torch.float64))
            per_step = [float(t / c) if c > 0 else None for t, c in zip(total.tolist(), count.tolist())]
            mean = float(total.sum() / count.sum()) if count.sum() > 0 else float("nan")
            report[name] = {"mean": mean, "per_step": per_step, "steps_used": len(steps), "steps_total": total_steps}
        return report
    finally:
        model.train(was_training)
