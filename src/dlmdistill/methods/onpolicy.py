"""What the on-policy recipes (d-OPSD, diffu-GRPO) share.

* prompt items: the training examples' prompts, tokenized once (the same template as evaluation);
* rollouts through ``sampling.generate`` in eval mode, batched, with a generator seeded from the
  run seed and the loop position (a resumed run draws the same rollouts);
* verifier scores from the task;
* the frozen initial policy, used as d-OPSD's fixed teacher and diffu-GRPO's KL reference: with
  LoRA it is the same model with its adapters disabled (no copy); with full fine-tuning a frozen
  deep copy made in ``setup_model`` (before the optimizer and Accelerate see the model);
* lock-step across processes: every rank must run the same number of forward passes (FSDP
  all-gathers parameters inside each forward), so counts are reduced over ranks and ranks with
  less work run padding passes.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data import encode_prompt
from ..models.backbone import DiffusionModel
from ..sampling import GenerationConfig, Trajectory, decode_responses, generate, left_pad
from ..tasks.base import Example, Task
from ..training.trainer import Trainer, TrainingConfig

log = logging.getLogger(__name__)

#: rollout batches in a row without anything to learn from before a warning says so
WARN_AFTER_IDLE_BATCHES = 5

#: ``fn(input_ids [B, L], attention_mask [B, L], positions [B, L] bool) -> logits [N, V]``
LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def prompt_items(examples: Sequence[Example], tokenizer, *, prompt_format: str = "plain", gen_length: int,
                 max_positions: int | None = None, teacher_template: str | None = None) -> list[dict[str, Any]]:
    """One training item per example: ``{"index", "prompt_ids"}`` and, with ``teacher_template``
    (a ``str.format`` pattern over ``prompt`` and ``target``), ``"teacher_prompt_ids"``.

    Raises ``ValueError`` when a prompt plus ``gen_length`` exceeds ``max_positions``, or when a
    teacher template needs a target the example lacks.
    """
    items = []
    for i, ex in enumerate(examples):
        where = ex.source or f"example {i}"
        item: dict[str, Any] = {"index": i, "prompt_ids": encode_prompt(tokenizer, ex, prompt_format)}
        if teacher_template is not None:
            if ex.target is None:
                raise ValueError(f"{where}: the reference-prefix teacher needs a reference solution (target)")
            text = teacher_template.format(prompt=ex.prompt, target=ex.target)
            item["teacher_prompt_ids"] = encode_prompt(tokenizer, text, prompt_format)
        longest = max(len(item["prompt_ids"]), len(item.get("teacher_prompt_ids", ())))
        if max_positions is not None and longest + gen_length > max_positions:
            raise ValueError(f"{where}: prompt of {longest} tokens + gen_length {gen_length} exceeds the model's "
                             f"{max_positions} positions")
        items.append(item)
    return items


def response_lengths(responses: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Tokens before the first EOS of each response: [B, G] -> [B] long (G when there is no EOS)."""
    g = responses.shape[1]
    if eos_id is None:
        return torch.full((responses.shape[0],), g, dtype=torch.long, device=responses.device)
    is_eos = responses == eos_id
    first = is_eos.long().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, g))


def prompt_and_response_inputs(prompts: Sequence[Sequence[int]], responses: torch.Tensor, pad_id: int
                               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts followed by responses: ``(input_ids [B, P + G], attention_mask, P)``."""
    ids, mask = left_pad(prompts, pad_id, responses.device)
    ones = torch.ones_like(responses, dtype=mask.dtype)
    return torch.cat([ids, responses], 1), torch.cat([mask, ones], 1), ids.shape[1]


def with_prompt_columns(response_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """A [B, G] response-position mask widened to [B, P + G] (False on the prompt columns)."""
    pad = torch.zeros((response_mask.shape[0], prompt_length), dtype=torch.bool, device=response_mask.device)
    return torch.cat([pad, response_mask], 1)


def seed_from(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def dropout_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Every dropout module under ``module`` (``torch.nn.Dropout`` and its relatives, LoRA dropout
    included) at ``p = 0`` inside the block, restored afterwards.

    Unlike ``module.eval()`` this leaves the train/eval flags alone, so gradient checkpointing
    (active only in train mode) keeps working and a ``train()`` call inside the block (e.g. after a
    no-grad teacher pass in eval mode) does not switch dropout back on. Functional dropout that a
    model applies from its config (``attention_dropout``) is not affected.
    """
    saved = [(m, m.p) for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    try:
        for m, _ in saved:
            m.p = 0.0
        yield
    finally:
        for m, p in saved:
            m.p = p


class OnPolicyTrainer(Trainer):
    """Base of the on-policy recipes: one rollout batch of prompts per ``training_step``.

    Items are ``prompt_items`` dicts; ``examples[item["index"]]`` is what the task scores.
    Subclasses set ``uses_frozen_policy`` (before ``super().__init__``) when they need the
    initial policy, and implement ``training_step``.
    """

    uses_frozen_policy: bool = False

    def __init__(self, model: DiffusionModel, tokenizer, train_items: list[dict[str, Any]], config: TrainingConfig, *,
                 task: Task, examples: Sequence[Example], **kwargs: Any):
        self.task = task
        self.examples = list(examples)
        self.frozen_policy: DiffusionModel | None = None
        # progress: rollout batches, attempts (completions sampled), accepted ones, batches skipped
        self.rollout_counts = {"batches": 0, "attempts": 0, "accepted": 0, "skipped": 0}
        self._idle_batches = 0
        super().__init__(model, tokenizer, train_items, config, **kwargs)

    # ------------------------------------------------------------------ feedback
    def count_rollouts(self, attempts: float, accepted: float, *, idle: bool, skipped: bool = False,
                       why: str = "", advice: str = "") -> None:
        """Count one rollout batch (totals over ranks) for the progress bar; after
        ``WARN_AFTER_IDLE_BATCHES`` batches in a row with nothing to learn from (``idle``), warn once
        per such streak, saying ``why`` and what to do (``advice``)."""
        c = self.rollout_counts
        c["batches"] += 1
        c["attempts"] += int(round(attempts))
        c["accepted"] += int(round(accepted))
        c["skipped"] += int(skipped)
        self._idle_batches = self._idle_batches + 1 if idle else 0
        if self._idle_batches == WARN_AFTER_IDLE_BATCHES and self.accelerator.is_main_process:
            log.warning("%s: the last %d rollout batches had %s%s. %s", self.method_name, self._idle_batches, why,
                        " (the progress bar counts optimizer steps, so it does not move)" if skipped else "", advice)

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        c = self.rollout_counts
        return {"rollouts": str(c["batches"]), "attempts": str(c["attempts"]), "accepted": str(c["accepted"]),
                "skipped": str(c["skipped"])}

    # ------------------------------------------------------------------ hooks
    def accumulation_steps(self) -> int:
        return 1

    def setup_model(self, model: DiffusionModel) -> None:
        if self.uses_frozen_policy and not model.is_peft:
            frozen = copy.deepcopy(model).requires_grad_(False).eval()
            frozen.static_attention_mask = self.config.static_shapes  # its mask as the policy's
            self.frozen_policy = frozen.to(self.accelerator.device)

    @property
    def pad_id(self) -> int:
        """The id left-padding prompts (the mask id when the tokenizer has no pad token)."""
        model = self.unwrapped
        return model.pad_id if model.pad_id is not None else model.mask_id

    # ------------------------------------------------------------------ models as logit functions
    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The policy in eval mode (no dropout) inside the block, restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def policy_logits(self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The trained policy's logits at ``positions`` (with gradient, in the current train/eval mode)."""
        return self.model(ids, attn, positions=positions)

    @torch.no_grad()
    def current_policy_logits(self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The current policy as a teacher: no gradient, eval mode."""
        with self.eval_mode():
            return self.model(ids, attn, positions=positions)

    @torch.no_grad()
    def initial_policy_logits(self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The initial policy (LoRA adapters disabled, or the frozen copy): no gradient, eval mode."""
        if self.frozen_policy is None:
            with self.unwrapped.adapters_disabled(), self.eval_mode():
                return self.model(ids, attn, positions=positions)
        with self.accelerator.autocast():
            return self.frozen_policy(ids, attn, positions=positions)

    # ------------------------------------------------------------------ randomness
    def generator(self, salt: Any) -> torch.Generator:
        """A generator seeded by the run seed, this rollout batch's position in the data, the rank
        and ``salt``: reruns and resumed runs draw the same numbers."""
        seed = seed_from(self.config.seed, self.state.epoch, self.state.batches_in_epoch,
                         self.accelerator.process_index, salt)
        return torch.Generator(device=self.unwrapped.device).manual_seed(seed)

    # ------------------------------------------------------------------ cross-rank agreement
    def global_sum(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, float64, on this rank's device."""
        t = torch.as_tensor(values, dtype=torch.float64).to(self.accelerator.device)
        return self.accelerator.reduce(t.clone(), reduction="sum") if self.accelerator.num_processes > 1 else t

    def global_totals(self, values: Sequence[float | torch.Tensor], local: Sequence[float | torch.Tensor] = ()
                      ) -> list[float]:
        """``values`` (numbers or one-element tensors, on any device) summed over ranks, then ``local`` as this
        rank has them, as host floats, with one device-to-host read for them all; on one process, numbers and
        CPU tensors read no device."""
        one = self.accelerator.num_processes == 1
        values, local = list(values), list(local)
        on_cpu = one and all(not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in values + local)
        device = torch.device("cpu") if on_cpu else self.accelerator.device
        out = torch.stack([torch.as_tensor(v).to(device, torch.float64).reshape(()) for v in values + local])
        if not one:
            out = torch.cat([self.accelerator.reduce(out[:len(values)], reduction="sum"), out[len(values):]])
        return out.tolist()

    def global_max(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if self.accelerator.num_processes == 1:
            return int(value)
        t = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        return int(self.accelerator.gather(t).max())

    # ------------------------------------------------------------------ rollouts and rewards
    def rollout(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig, generator: torch.Generator, *,
                filler: Sequence[int], trajectory: bool = False) -> tuple[torch.Tensor, Trajectory | None]:
        """Sample responses for ``prompts`` in chunks of ``gen.batch_size``: ``(responses [n, G], trajectory)``.

        Every rank runs as many ``generate`` calls as the busiest rank; a rank with fewer prompts
        decodes ``filler`` (one of its prompts) and drops the result. ``n`` may be 0. Under
        ``training.static_shapes`` the sampler's steps are fixed-shape too (``gen.static_shapes``).
        """
        model = self.unwrapped
        if self.config.static_shapes and not gen.static_shapes:
            gen = replace(gen, static_shapes=True)
        chunks = [list(prompts[i:i + gen.batch_size]) for i in range(0, len(prompts), gen.batch_size)]
        n_calls = self.global_max(len(chunks))
        responses, states, committed, blocks = [], [], [], None
        for c in range(n_calls):
            real = c < len(chunks)
            out = generate(model, chunks[c] if real else [list(filler)], gen, generator=generator,
                           return_trajectory=trajectory, forward=self.sampling_forward)
            if not real:
                continue
            responses.append(out.responses)
            if trajectory:
                states.append(out.trajectory.states)
                committed.append(out.trajectory.committed)
                blocks = out.trajectory.block
        device = model.device
        if not responses:
            empty = torch.empty((0, gen.gen_length), dtype=torch.long, device=device)
            s = gen.trajectory_steps
            traj = Trajectory(torch.empty((s, 0, gen.gen_length), dtype=torch.long, device=device),
                              torch.empty((s, 0, gen.gen_length), dtype=torch.bool, device=device),
                              torch.arange(s, device=device) // gen.trajectory_steps_per_block) if trajectory else None
            return empty, traj
        traj = Trajectory(torch.cat(states, 1), torch.cat(committed, 1), blocks) if trajectory else None
        return torch.cat(responses), traj

    def score(self, indices: Sequence[int], responses: torch.Tensor) -> torch.Tensor:
        """Verifier scores of ``responses`` [n, G] for the examples ``indices``: [n] float32 (CPU)."""
        texts = decode_responses(self.tokenizer, responses.cpu(), self.unwrapped.eos_id)
        return torch.tensor([float(self.task.score(self.examples[i], t)) for i, t in zip(indices, texts)],
                            dtype=torch.float32)

    def correct(self, scores: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """[n] bool: ``task.is_correct`` of each score (the task's own threshold when None)."""
        return torch.tensor([self.task.is_correct(s, threshold) for s in scores.tolist()], dtype=torch.bool)


def micro_batches(n: int, size: int) -> list[slice]:
    """``ceil(n / size)`` consecutive slices covering ``range(n)``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] if n else []
