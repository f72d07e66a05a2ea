"""diffu-GRPO (Zhao et al., 2025, "d1"): GRPO for masked diffusion LMs, the RL baseline of d-OPSD.

Per rollout batch of B prompts:

1. **Group rollouts.** Each prompt gets ``num_generations`` (G) completions from the diffusion
   sampler at ``rollout.temperature``; the verifier scores them.
2. **Advantages.** ``A = reward - mean of the prompt's group`` (``scale_rewards`` also divides by
   the group's standard deviation; d1 does not).
3. **One-step log-probability estimate.** ``log pi(y | x)`` of a completion is estimated in ONE
   forward pass in which every completion token is masked and each real prompt token is masked
   with probability ``p_mask_prompt``; the log-probability of each completion token (up to and
   including its first EOS) is read at its position. The prompt masking is drawn from a fresh
   ``torch.Generator`` seeded per inner iteration (never the global RNG): a given seed gives the
   same estimate, and different iterations see different prompt masks.
4. **mu inner iterations** (``num_iterations``) on the same rollouts, each one optimizer step on the
   PPO-clipped surrogate with ``epsilon`` plus ``beta`` times the k3 KL to the reference policy
   (the initial policy: LoRA adapters disabled, or a frozen copy under full fine-tuning). The ratio
   is taken against the log-probabilities the rollout policy gives under the same iteration's
   mask (computed before the first update; on iteration 0 they equal the current ones).
   The loss is the mean over all completion tokens of the global batch.

Step counting: one ``training_step`` is one rollout batch and ``num_iterations`` optimizer steps,
so ``training.max_steps`` / ``eval_steps`` / ``save_steps`` count rollout batches; the logged
``optimizer_steps`` counts gradient updates (what d-OPSD's sample-efficiency comparison uses),
and the learning-rate schedule spans ``max_steps * num_iterations`` updates. Checkpoints fall
between rollout batches, so a resumed run continues exactly.

    dlmdistill train diffu-grpo --config configs/diffu_grpo_countdown_tiny.yaml
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..configs.methods import DiffuGRPOConfig, DiffuGRPORunConfig
from ..losses.diffusion import token_nll
from ..losses.policy import group_advantages, ppo_clip_loss
from .common import finish, prepare, write_run_metadata
from .onpolicy import (LogitsFn, OnPolicyTrainer, micro_batches, prompt_and_response_inputs, prompt_items,
                       response_lengths, seed_from, with_prompt_columns)

log = logging.getLogger(__name__)


def mask_for_estimate(input_ids: torch.Tensor, prompt_mask: torch.Tensor, response_mask: torch.Tensor, *,
                      mask_id: int, p_mask_prompt: float, generator: torch.Generator) -> torch.Tensor:
    """d1's estimator input: every response token masked, each prompt token masked with ``p_mask_prompt``.

    input_ids, prompt_mask (real prompt tokens), response_mask: [N, L]. The prompt mask is drawn
    from ``generator`` alone (one uniform per position of the whole [N, L] batch, so micro-batching
    does not change it). Returns [N, L].
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = response_mask | (prompt_mask & (u < p_mask_prompt))
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)


def token_logps(logits_fn: LogitsFn, noisy: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """log p(target) at ``positions`` of the noisy input: [M] float32, row-major. ``positions``: [N, L] bool,
    or the (row, position) index pair of its True entries (no data-dependent shape: no device sync)."""
    picked = targets[positions] if isinstance(positions, torch.Tensor) else targets[positions[0], positions[1]]
    return -token_nll(logits_fn(noisy, attention_mask, positions), picked)


@dataclass
class UpdateBatch:
    """What the inner iterations of one rollout batch share. ids, attn, prompt_mask, response_mask: [N, L];
    advantages: [N]; parts: the micro-batches (``n_real`` real ones, then zero-weight padding); where: each
    micro-batch's scored tokens as (row, position) indices; old: per later iteration, per micro-batch, the
    rollout policy's log-probs there; n_tokens: scored tokens over all ranks; scale: the loss factor."""

    ids: torch.Tensor
    attn: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    parts: list[slice]
    n_real: int
    where: list[tuple[torch.Tensor, torch.Tensor]]
    old: list[list[torch.Tensor]]
    n_tokens: float
    scale: float


class DiffuGRPOTrainer(OnPolicyTrainer):
    """diffu-GRPO (see the module docstring). ``train_items`` come from ``onpolicy.prompt_items``."""

    method_name = "diffu-grpo"

    def __init__(self, *args: Any, method: DiffuGRPOConfig | None = None, **kwargs: Any):
        self.method = method or DiffuGRPOConfig()  # checked when it was built (config.validate_tree by hand)
        self.uses_frozen_policy = self.method.beta > 0
        super().__init__(*args, **kwargs)
        r = self.method.rollout
        if self.method.num_generations > 1 and r.temperature == 0 and r.remasking == "low_confidence":
            log.warning("diffu-GRPO: greedy low-confidence rollouts make every completion of a prompt identical "
                        "(all advantages 0); set rollout.temperature > 0")

    def optimizer_steps_per_batch(self) -> int:
        return self.method.num_iterations

    def mask_seeds(self) -> list[int]:
        """One prompt-mask seed per inner iteration, drawn for this rollout batch."""
        m = self.method
        if not m.random_masking:
            return [seed_from(self.config.seed, "prompt-mask")] * m.num_iterations
        g = self.generator("mask-seeds")
        return torch.randint(0, 2**62, (m.num_iterations,), generator=g, device=g.device).tolist()

    def _noisy(self, ids: torch.Tensor, prompt_mask: torch.Tensor, response_mask: torch.Tensor, seed: int
               ) -> torch.Tensor:
        g = torch.Generator(device=ids.device).manual_seed(seed)
        return mask_for_estimate(ids, prompt_mask, response_mask, mask_id=self.unwrapped.mask_id,
                                 p_mask_prompt=self.method.p_mask_prompt, generator=g)

    def training_step(self, batch: list[dict[str, Any]]) -> tuple[bool, dict[str, float]]:
        m = self.method
        model = self.unwrapped
        device = model.device
        group = m.num_generations
        indices = [int(it["index"]) for it in batch for _ in range(group)]
        prompts = [list(it["prompt_ids"]) for it in batch for _ in range(group)]
        responses, _ = self.rollout(prompts, m.rollout, self.generator("rollout"), filler=prompts[0])
        rewards = self.score(indices, responses)
        advantages = group_advantages(rewards, group, scale=m.scale_rewards).to(device)
        ids, attn, p = prompt_and_response_inputs(prompts, responses, self.pad_id)
        prompt_mask = attn.bool() & ~with_prompt_columns(torch.ones_like(responses, dtype=torch.bool), p)
        response_mask = with_prompt_columns(torch.ones_like(responses, dtype=torch.bool), p)
        lengths = response_lengths(responses, model.eos_id)
        scored = torch.arange(responses.shape[1], device=device)[None, :] <= lengths[:, None]  # up to the first EOS
        positions = with_prompt_columns(scored, p)

        groups = rewards.view(-1, group)
        totals = self.global_totals([len(prompts), rewards.sum(), self.correct(rewards).sum(), lengths.sum(),
                                     scored.sum(), groups.shape[0],
                                     (groups.std(1) < 1e-6).sum() if group > 1 else groups.shape[0],
                                     groups.std(1).sum() if group > 1 else 0.0])
        n, n_tokens, n_groups = totals[0], totals[4], totals[5]
        metrics = {"reward": totals[1] / n, "accuracy": totals[2] / n, "completion_length": totals[3] / n,
                   "zero_std_ratio": totals[6] / n_groups, "reward_std": totals[7] / n_groups}
        self.count_rollouts(n, totals[2], idle=totals[6] == n_groups,
                            why="the same reward for every completion of each prompt (zero advantages: no "
                            "learning signal; each batch still takes an optimizer step, moved only by the KL term)",
                            advice="Start from a model that sometimes solves the task (e.g. after SFT), or raise "
                            f"method.num_generations (now {group}) or rollout.temperature "
                            f"(now {m.rollout.temperature})")

        seeds = self.mask_seeds()
        parts = micro_batches(len(prompts), m.micro_batch_size)
        n_parts = self.global_max(len(parts))
        sl = [parts[i] if i < len(parts) else slice(0, 1) for i in range(n_parts)]
        # each micro-batch's scored tokens as (row, position) indices, found once per rollout batch: the
        # inner iterations then gather them without a data-dependent shape (no device-to-host sync)
        where = [positions[part].nonzero(as_tuple=True) for part in sl]
        old = self._old_logps(ids, attn, prompt_mask, response_mask, where, seeds[1:], sl)
        update = UpdateBatch(ids, attn, prompt_mask, response_mask, advantages, sl, len(parts), where, old, n_tokens,
                             self.accelerator.num_processes / n_tokens)
        per_iter: dict[str, list[torch.Tensor]] = {"loss": [], "kl": [], "clip_fraction": [], "grad_norm": []}
        for it, seed in enumerate(seeds):
            with torch.profiler.record_function("diffu_grpo.iteration"):  # one optimizer step (profiles, tests)
                stop = self._iteration(it, seed, update, per_iter)
            if stop:  # a non-finite loss dropped the update (on_nonfinite_loss: skip): no later iteration
                return it > 0, metrics
        metrics.update({k: torch.stack([x.double() for x in v]).mean() for k, v in per_iter.items() if v})
        return True, metrics

    def _iteration(self, it: int, seed: int, u: "UpdateBatch", per_iter: dict[str, list[torch.Tensor]]) -> bool:
        """Inner iteration ``it``: the clipped surrogate over every micro-batch, then one optimizer step.
        Its only host read is the update's finiteness check. Returns True when the update was dropped for
        a non-finite loss."""
        m = self.method
        ids, attn, where, sl = u.ids, u.attn, u.where, u.parts
        n_parts = len(sl)
        noisy = self._noisy(ids, u.prompt_mask, u.response_mask, seed)
        sums = torch.zeros(3, dtype=torch.float64, device=ids.device)
        for j, part in enumerate(sl):
            weight = u.scale if j < u.n_real else 0.0  # zero-weight padding keeps ranks in lock-step
            with nullcontext() if j == n_parts - 1 else self.accelerator.no_sync(self.model):
                logp = token_logps(self.policy_logits, noisy[part], attn[part], ids[part], where[j])
                old_logp = logp.detach() if it == 0 else u.old[it - 1][j]
                ref = None
                if m.beta > 0:
                    ref = token_logps(self.initial_policy_logits, noisy[part], attn[part], ids[part], where[j])
                adv = u.advantages[part][where[j][0]]  # each token's sequence advantage
                out = ppo_clip_loss(logp, old_logp, adv, epsilon=m.epsilon, ref_logp=ref, beta=m.beta)
                self.backward(out.per_token.sum() * weight)
            if weight:
                sums += torch.stack([out.per_token.detach().sum(), out.kl.detach().sum(),
                                     out.clipped.float().sum()]).double()
        sums = self.global_sum(sums) / u.n_tokens
        self.note_loss(sums[0])  # read with the gradient norm, once, in optimizer_step
        grad_norm = self.optimizer_step()
        if self.last_loss_nonfinite:
            return True
        for key, value in zip(("loss", "kl", "clip_fraction"), sums):
            per_iter[key].append(value)
        if grad_norm is not None:
            per_iter["grad_norm"].append(grad_norm)
        return False

    @torch.no_grad()
    def _old_logps(self, ids: torch.Tensor, attn: torch.Tensor, prompt_mask: torch.Tensor, response_mask: torch.Tensor,
                   where: list[tuple[torch.Tensor, torch.Tensor]], seeds: list[int], parts: list[slice]
                   ) -> list[list[torch.Tensor]]:
        """The rollout policy's per-token log-probs under each later iteration's mask, before any
        update: per seed, one flat tensor per micro-batch (at its ``where`` indices)."""
        out = []
        for seed in seeds:
            noisy = self._noisy(ids, prompt_mask, response_mask, seed)
            out.append([token_logps(self.policy_logits, noisy[part], attn[part], ids[part], w)
                        for part, w in zip(parts, where)])
        return out


def run(cfg: Any) -> dict[str, float]:
    """Train with diffu-GRPO; returns the final evaluation metrics."""
    from ..tasks.registry import get_task

    m: DiffuGRPOConfig = cfg.method
    prep = prepare(cfg, need_targets=False)
    task = get_task(cfg.data.task, **cfg.data.task_kwargs)
    items = prompt_items(prep.train_examples, prep.tokenizer, prompt_format=cfg.data.prompt_format,
                         gen_length=m.rollout.gen_length,
                         max_positions=getattr(prep.model.config, "max_position_embeddings", None))
    trainer = DiffuGRPOTrainer(prep.model, prep.tokenizer, items, cfg.training, task=task,
                               examples=prep.train_examples, method=m, evaluator=prep.evaluator, run_config=cfg)
    write_run_metadata(cfg, prep.tokenizer, DiffuGRPOTrainer.method_name, trainer.accelerator)
    return finish(trainer, trainer.train())


__all__ = ["DiffuGRPOConfig", "DiffuGRPORunConfig", "DiffuGRPOTrainer", "mask_for_estimate", "run", "token_logps"]
