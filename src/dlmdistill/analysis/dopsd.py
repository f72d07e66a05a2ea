"""Analysis helpers for d-OPSD: the paper's toy verification (Table 3) and teacher overlap (Figure 3).

They use the trainer's pure pieces (``methods.dopsd``) on a model without a trainer:

* ``self_teacher_check``: can the self-teacher recover the answer from part of it? The toy as a
  go/no-go gate for d-OPSD on a task layout, with a per-block diagnostic of where the decisions sit
  and what the teacher sees there;
* ``compare_teacher_overlap``: the top-K overlap (eq. 13) of the student with the self-future
  teacher and with the AR-style (reference-prefix) teacher, measured only on informative steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch

from ..data import encode_prompt
from ..losses.divergences import topk_overlap
from ..methods.dopsd import flatten_trajectories, informative_steps, self_future_teacher_states, step_logits
from ..methods.onpolicy import LogitsFn, micro_batches, response_lengths
from ..models.backbone import DiffusionModel
from ..sampling import GenerationConfig, Trajectory, decode_responses, generate, topk_mask
from ..tasks.base import Example, Task

__all__ = ["PassAtK", "compare_teacher_overlap", "content_reveal", "format_self_teacher_check", "pass_at_k",
           "self_teacher_check"]

#: the gate of ``self_teacher_check``: the self-teacher must beat the student by this many points at GATE_RHO
GATE_MARGIN = 5.0
GATE_RHO = 0.25


def _no_grad_logits(model: DiffusionModel) -> LogitsFn:
    def fn(ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, attn, positions=positions)
    return fn


@dataclass
class PassAtK:
    """What ``pass_at_k`` kept for n prompts (G = gen_length, S = trajectory steps).

    finals: [n, G] the kept answers ``y_0``; first: [n, G] the first attempts; scores: [n] the kept
    answers' scores; accepted: [n] bool, kept answer accepted; first_correct: [n] bool, first
    attempt correct (the task's own threshold); trajectory: the kept trajectories (or None)."""

    finals: torch.Tensor
    first: torch.Tensor
    scores: torch.Tensor
    accepted: torch.Tensor
    first_correct: torch.Tensor
    trajectory: Trajectory | None


def _scores(task: Task, tokenizer, model: DiffusionModel, examples: Sequence[Example], responses: torch.Tensor
            ) -> list[float]:
    texts = decode_responses(tokenizer, responses.cpu(), model.eos_id)
    return [float(task.score(ex, t)) for ex, t in zip(examples, texts)]


def pass_at_k(model: DiffusionModel, tokenizer, task: Task, examples: Sequence[Example], prompts: list[list[int]],
              generation: GenerationConfig, generator: torch.Generator, *, pass_k: int,
              accept_threshold: float | None = None, retry_temperature: float | None = None,
              mode: Literal["first_accepted", "best_of_k"] = "first_accepted",
              keep_rejected: Literal["best", "last"] = "best", trajectory: bool = False) -> PassAtK:
    """Pass@k sampling without a trainer.

    The first attempt samples with ``generation`` (its temperature; 0 = greedy), later ones at
    ``retry_temperature`` (None: the same). ``first_accepted``: a prompt stops at its first accepted
    attempt; a rejected prompt keeps its ``best`` attempt (the earliest among ties) or its ``last``
    one (the official code). ``best_of_k``: every prompt draws ``pass_k`` attempts and keeps the
    highest-scoring one, ties to the later (the official code's Sudoku).
    """
    n, g = len(prompts), generation.gen_length
    s = generation.trajectory_steps
    device = model.device
    finals = torch.full((n, g), model.mask_id, dtype=torch.long, device=device)
    first = finals.clone()
    states = torch.zeros((s, n, g), dtype=torch.long, device=device) if trajectory else None
    committed = torch.zeros((s, n, g), dtype=torch.bool, device=device) if trajectory else None
    best = torch.full((n,), float("-inf"))
    accepted = torch.zeros(n, dtype=torch.bool)
    first_correct = torch.zeros(n, dtype=torch.bool)
    retry = generation if retry_temperature is None else replace(generation, temperature=retry_temperature)
    pending = list(range(n))
    for attempt in range(pass_k):
        gen = generation if attempt == 0 else retry
        for c in range(0, len(pending), gen.batch_size):
            chunk = pending[c:c + gen.batch_size]
            out = generate(model, [prompts[i] for i in chunk], gen, generator=generator, return_trajectory=trajectory)
            for p, (i, score) in enumerate(zip(chunk, _scores(task, tokenizer, model, [examples[i] for i in chunk],
                                                                  out.responses))):
                ok = task.is_correct(score, accept_threshold)
                if attempt == 0:
                    first_correct[i] = task.is_correct(score)
                    first[i] = out.responses[p]
                if mode == "best_of_k":
                    keep = score >= best[i]
                else:
                    keep = ok or score > best[i] or keep_rejected == "last"
                if keep:
                    finals[i], best[i], accepted[i] = out.responses[p], score, ok
                    if trajectory:
                        states[:, i], committed[:, i] = out.trajectory.states[:, p], out.trajectory.committed[:, p]
        if mode == "first_accepted":
            pending = [i for i in pending if not accepted[i]]
        if not pending:
            break
    traj = None
    if trajectory:
        traj = Trajectory(states, committed, torch.arange(s, device=device) // generation.trajectory_steps_per_block)
    return PassAtK(finals, first, best, accepted, first_correct, traj)


def content_reveal(finals: torch.Tensor, rho: float, *, mask_id: int, eos_id: int | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The official toy's teacher input: ``floor(rho * n)`` of the ``n`` content tokens of each answer
    (the tokens before its first EOS), chosen uniformly at random anywhere in the answer, hold their
    token; every other position is masked. finals: [N, G] -> [N, G]."""
    g = finals.shape[1]
    content = torch.arange(g, device=finals.device)[None, :] < response_lengths(finals, eos_id)[:, None]
    count = torch.floor(rho * content.sum(1).double() + 1e-9).long()
    noise = torch.rand(finals.shape, generator=generator, device=finals.device)
    reveal = topk_mask(torch.where(content, noise, torch.full_like(noise, -1.0)), count) & content
    return torch.where(reveal, finals, torch.full_like(finals, mask_id))


def _answer_start(tokenizer, tokens: list[int], marker: str) -> int | None:
    """The index of the first token after ``marker`` in the decoded answer (None if absent)."""
    for i in range(len(tokens)):
        if marker in tokenizer.decode(tokens[:i + 1]):
            return i + 1
    return None


@torch.no_grad()
def self_teacher_check(model: DiffusionModel, tokenizer, task: Task, examples: Sequence[Example],
                       generation: GenerationConfig, *, rhos: Sequence[float] = (0.1, 0.25, 0.5), pass_k: int = 8,
                       retry_temperature: float | None = 1.0,
                       pass_k_mode: Literal["first_accepted", "best_of_k"] = "first_accepted",
                       accept_threshold: float | None = None,
                       reveal: Literal["content", "after_block", "before_eos"] = "content",
                       prompt_format: str = "plain", answer_marker: str | None = "<answer>",
                       gate_rho: float = GATE_RHO, gate_margin: float = GATE_MARGIN, seed: int = 0) -> dict[str, Any]:
    """The paper's toy verification (Table 3, appendix D.2) as a go/no-go gate for d-OPSD on a layout.

    ``generation`` is the decoding of the student and of the regeneration (the official toy: greedy,
    2 tokens per step, blocks of 32). For each example: the student's first attempt with
    ``generation``; pass@``pass_k`` with retries at ``retry_temperature`` (the official toy: 1.0;
    a rejected prompt keeps its last attempt, as there); then, for each ``rho``, regeneration from a
    teacher input that holds part of the kept answer ``y_0``, each block re-masked when decoding
    reaches it (the paper: "everytime we move to a new block, we clear all unmasked tokens in this
    block"). ``reveal``: ``content`` = ``floor(rho * n)`` of the answer's ``n`` content tokens (EOS
    stripped) anywhere in it (the official toy, ``eval/generate.py``); ``after_block`` /
    ``before_eos`` = ``floor(rho * n)`` of the positions outside the first block (the EOS tail
    included / up to the first EOS), the training-time reading of eq. 8.

    **Gate**: passed when the self-teacher's accuracy at ``gate_rho`` is at least ``gate_margin``
    points above the student's first attempt.

    **Per-block diagnostic** (at ``gate_rho``), for block b of ``generation``'s blocks: ``content``,
    the mean content tokens of ``y_0`` in it; ``deciding``, the share of the *fixable* prompts
    (student wrong, ``y_0`` correct) whose first difference between the student's answer and ``y_0``
    lies in it; ``visible``, the mean revealed positions the teacher sees while decoding it (revealed
    positions of later blocks; earlier ones are decided, its own are cleared); ``contradicting``, of
    those, the mean that differ from the student's own answer (the information the student lacked);
    ``fixed``, the share of the fixable prompts deciding in it that the self-teacher gets right.
    ``layout``: where the answers end (first EOS) and, with ``answer_marker``, where the final answer
    starts (the first token after the marker), as token positions.

    Returns ``{"n", "student", "pass@k", "self_teacher": {rho: %}, "revealed_fraction": {rho: mean
    revealed / gen_length}, "gate": {"rho", "margin", "delta", "delta_se", "passed"}, "blocks": [...],
    "layout": {...}, "settings": {...}}`` (accuracies in %, the task's own notion of correct).
    """
    if gate_rho not in rhos:
        rhos = (*rhos, gate_rho)
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    prompts = [encode_prompt(tokenizer, ex.prompt, prompt_format) for ex in examples]
    kept = pass_at_k(model, tokenizer, task, examples, prompts, generation, gen, pass_k=pass_k,
                     accept_threshold=accept_threshold, retry_temperature=retry_temperature, mode=pass_k_mode,
                     keep_rejected="last")
    n, g = len(examples), generation.gen_length
    block = generation.block_length or g
    num_blocks = generation.num_blocks
    final_correct = torch.tensor([task.is_correct(sc) for sc in kept.scores.tolist()], dtype=torch.bool)
    report: dict[str, Any] = {"n": n, "student": 100.0 * kept.first_correct.float().mean().item(),
                              f"pass@{pass_k}": 100.0 * kept.accepted.float().mean().item(),
                              "self_teacher": {}, "revealed_fraction": {}}
    masked = torch.full((n, g), model.mask_id, dtype=torch.long, device=device)
    teacher_correct: dict[float, torch.Tensor] = {}
    inits: dict[float, torch.Tensor] = {}
    for rho in rhos:
        if reveal == "content":
            init = content_reveal(kept.finals, rho, mask_id=model.mask_id, eos_id=model.eos_id, generator=gen)
        else:
            init = self_future_teacher_states(masked, kept.finals, torch.zeros(n, dtype=torch.long, device=device),
                                              block_length=block, mask_id=model.mask_id, rho=rho, generator=gen,
                                              eos_id=model.eos_id, scope=reveal)
        ok = torch.zeros(n, dtype=torch.bool)
        for c in range(0, n, generation.batch_size):
            sl = slice(c, c + generation.batch_size)
            out = generate(model, prompts[sl], generation, init_response=init[sl], clear_block_on_entry=True,
                           generator=gen)
            scores = _scores(task, tokenizer, model, examples[sl], out.responses)
            ok[sl] = torch.tensor([task.is_correct(sc) for sc in scores], dtype=torch.bool)
        teacher_correct[rho], inits[rho] = ok, init
        report["self_teacher"][rho] = 100.0 * ok.float().mean().item()
        report["revealed_fraction"][rho] = (init != model.mask_id).float().mean().item()
    diff = teacher_correct[gate_rho].float() - kept.first_correct.float()
    delta = 100.0 * diff.mean().item()
    delta_se = 100.0 * (diff.std().item() / math.sqrt(n)) if n > 1 else float("nan")
    report["gate"] = {"rho": gate_rho, "margin": gate_margin, "delta": delta, "delta_se": delta_se,
                      "passed": delta >= gate_margin}
    report["blocks"] = _block_diagnostic(kept, final_correct, teacher_correct[gate_rho], inits[gate_rho],
                                         mask_id=model.mask_id, eos_id=model.eos_id, block=block,
                                         num_blocks=num_blocks)
    report["layout"] = _layout(tokenizer, kept.finals, model.eos_id, answer_marker, block)
    report["settings"] = {"pass_k": pass_k, "retry_temperature": retry_temperature, "pass_k_mode": pass_k_mode,
                          "reveal": reveal, "gen_length": g, "block_length": block, "steps": generation.steps,
                          "temperature": generation.temperature}
    return report


def _block_diagnostic(kept: PassAtK, final_correct: torch.Tensor, teacher_ok: torch.Tensor, init: torch.Tensor, *,
                      mask_id: int, eos_id: int | None, block: int, num_blocks: int) -> list[dict[str, Any]]:
    """The per-block rows of ``self_teacher_check`` (see there)."""
    finals, first = kept.finals.cpu(), kept.first.cpu()
    init = init.cpu()
    g = finals.shape[1]
    pos = torch.arange(g)
    content = pos[None, :] < response_lengths(finals, eos_id)[:, None]
    fixable = ~kept.first_correct & final_correct
    differs = first != finals
    first_diff = torch.where(differs.any(1), differs.float().argmax(1), torch.full((finals.shape[0],), g))
    deciding_block = torch.div(first_diff, block, rounding_mode="floor")
    revealed = init != mask_id
    rows = []
    n_fix = int(fixable.sum())
    for b in range(num_blocks):
        later = pos >= (b + 1) * block
        visible = (revealed & later[None, :]).sum(1).float()
        contradicting = (revealed & later[None, :] & differs).sum(1).float()
        here = fixable & (deciding_block == b)
        rows.append({"block": b, "positions": f"{b * block}-{(b + 1) * block - 1}",
                     "content": content[:, b * block:(b + 1) * block].sum(1).float().mean().item(),
                     "deciding": int(here.sum()) / n_fix if n_fix else float("nan"),
                     "visible": visible.mean().item(),
                     "contradicting": contradicting[fixable].mean().item() if n_fix else float("nan"),
                     "fixed": teacher_ok[here].float().mean().item() if bool(here.any()) else float("nan"),
                     "n_deciding": int(here.sum())})
    return rows


def _layout(tokenizer, finals: torch.Tensor, eos_id: int | None, marker: str | None, block: int) -> dict[str, Any]:
    """Token positions of the answers' first EOS and of the start of the final answer (after ``marker``)."""
    ends = response_lengths(finals, eos_id).cpu()
    out: dict[str, Any] = {"first_eos": {"min": int(ends.min()), "mean": float(ends.float().mean()),
                                         "max": int(ends.max())}}
    if marker:
        starts = [s for s in (_answer_start(tokenizer, row[:int(e)].tolist(), marker)
                              for row, e in zip(finals.cpu(), ends)) if s is not None]
        if starts:
            out["answer_start"] = {"min": min(starts), "mean": sum(starts) / len(starts), "max": max(starts),
                                   "found": len(starts)}
            out["answer_blocks"] = sorted({s // block for s in starts})
    return out


@torch.no_grad()
def compare_teacher_overlap(model: DiffusionModel, tokenizer, task: Task, examples: Sequence[Example],
                            generation: GenerationConfig, *, rho: float = 0.25, k: int = 20, pass_k: int = 1,
                            accept_threshold: float | None = None, accepted_only: bool = False,
                            reference_template: str = "{prompt}{target}\n", prompt_format: str = "plain",
                            select: Literal["teacher", "student", "committed"] = "teacher",
                            reveal: Literal["after_block", "before_eos", "official"] = "after_block",
                            informative_only: bool = True, micro_batch_size: int = 32,
                            seed: int = 0) -> dict[str, Any]:
    """Top-K overlap (eq. 13) of the student with the d-OPSD teacher vs the AR-style teacher (Figure 3).

    Samples one trajectory per example (pass@``pass_k``; with ``accepted_only`` only the accepted
    trajectories are measured, as d-OPSD trains), then compares at K_t the student's top-``k``
    vocabulary with that of the self-future teacher (``rho``, ``reveal`` as the trainer's option)
    and of the reference-prefix teacher (``reference_template``; examples need a ``target``). The
    teacher is ``model`` itself, i.e. the initial policy.

    Steps measured (``informative_only``, default): only those where the self-future teacher sees
    at least one revealed position and masks remain before the first EOS of the final answer
    (``methods.dopsd.informative_steps``); both constructions are measured on the same steps. The
    other steps -- the whole last block, the EOS tail -- give the self-future teacher exactly the
    student's input, so their overlap is 1 by construction and would inflate its mean.

    Returns, per construction, ``{"mean": mean over the measured steps, "per_step": [mean at step
    t, None where no trajectory's step t was measured], "steps_used": measured (trajectory, step)
    pairs, "steps_total": recorded pairs with a committed token}``, and ``"trajectories"``: how many
    trajectories were measured.
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
        res = pass_at_k(model, tokenizer, task, examples, prompts, generation, gen, pass_k=pass_k,
                        accept_threshold=accept_threshold, trajectory=True)
        rows = [i for i in range(len(examples)) if res.accepted[i] or not accepted_only]
        block = generation.block_length or generation.gen_length
        steps = flatten_trajectories(res.trajectory, rows, block_length=block, mask_id=model.mask_id)
        finals = res.finals[steps.rows]
        future = self_future_teacher_states(steps.states, finals, res.trajectory.block[steps.step],
                                            block_length=block, mask_id=model.mask_id, rho=rho, generator=gen,
                                            eos_id=model.eos_id, scope=reveal)
        total_steps = len(steps)
        if informative_only:
            keep = informative_steps(steps.states, future, finals, mask_id=model.mask_id, eos_id=model.eos_id)
            steps, future = steps.part(keep), future[keep]
        fn = _no_grad_logits(model)
        pad = model.pad_id if model.pad_id is not None else model.mask_id
        report: dict[str, Any] = {"trajectories": len(rows)}
        for name, teacher_states, t_prompts in [("self_future", future, prompts),
                                                ("reference_prefix", steps.states, teacher_prompts)]:
            total = torch.zeros(generation.steps, dtype=torch.float64)
            count = torch.zeros(generation.steps, dtype=torch.float64)
            for sl in micro_batches(len(steps), micro_batch_size):
                part = replace(steps.part(sl), teacher=teacher_states[sl])
                prompt_rows = part.rows.tolist()
                out = step_logits(fn, fn, part, [prompts[r] for r in prompt_rows],
                                  [t_prompts[r] for r in prompt_rows], pad_id=pad, select=select)
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


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.0f}%"


def _num(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"


def format_self_teacher_check(report: dict[str, Any]) -> str:
    """Markdown tables of a ``self_teacher_check`` report: accuracies, the gate's verdict, the blocks."""
    k = report["settings"]["pass_k"]
    n = report["n"]
    lines = ["| decoder | accuracy (%) |", "|---|---:|",
             f"| student, first attempt | {report['student']:.1f} |", f"| student, pass@{k} | {report[f'pass@{k}']:.1f} |"]
    for rho, acc in sorted(report["self_teacher"].items(), key=lambda kv: float(kv[0])):
        lines.append(f"| self-teacher, rho = {float(rho):g} | {acc:.1f} |")
    g = report["gate"]
    verdict = "PASSED" if g["passed"] else "NOT PASSED"
    lines += ["", f"{n} prompts. Gate ({verdict}): the self-teacher at rho = {g['rho']:g} is {g['delta']:+.1f} points "
              f"(paired standard error {g['delta_se']:.1f}) from the student; it must be at least +{g['margin']:g}.", ""]
    lay = report["layout"]
    eos = lay["first_eos"]
    text = f"Layout of the kept answers (token positions from 0): first EOS at {eos['min']}-{eos['max']} (mean {eos['mean']:.1f})"
    if "answer_start" in lay:
        a = lay["answer_start"]
        text += (f"; the final answer starts at {a['min']}-{a['max']} (mean {a['mean']:.1f}), in block(s) "
                 f"{', '.join(map(str, lay['answer_blocks']))}")
    lines += [text + ".", "",
              "| block | positions | content tokens of y_0 | fixable prompts deciding here | revealed tokens the teacher "
              "sees while decoding it | of which contradict the student | self-teacher fixes |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["blocks"]:
        lines.append(f"| {r['block']} | {r['positions']} | {r['content']:.1f} | {_pct(r['deciding'])} "
                     f"({r['n_deciding']}) | {r['visible']:.1f} | {_num(r['contradicting'])} | {_pct(r['fixed'])} |")
    return "\n".join(lines)
