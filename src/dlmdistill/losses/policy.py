"""Policy-gradient losses (GRPO / PPO-clip) with documented shapes.

Per-token quantities are flat ``[M]`` tensors over the M scored completion tokens of a batch;
per-sequence ones ``[N]``. Log-probabilities are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PolicyLossOutput", "group_advantages", "k3_kl", "ppo_clip_loss"]


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward minus the mean of its group, optionally divided by the group's std.

    rewards: [N] with N = groups * group_size, groups contiguous (the G completions of a prompt
    side by side). ``scale`` divides by the unbiased standard deviation plus ``eps`` (TRL/DeepSeek);
    d1 does not scale. Returns [N] float32.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: [M] x2 -> [M] (>= 0).

    ``exp(ref - logp) - (ref - logp) - 1``, unbiased for tokens sampled from the policy.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@dataclass
class PolicyLossOutput:
    """per_token: [M] loss per token (to be averaged by the caller); kl: [M] k3 KL (zeros when
    beta = 0); clipped: [M] bool, tokens whose gradient the clip removed."""

    per_token: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, epsilon: float,
                  ref_logp: torch.Tensor | None = None, beta: float = 0.0) -> PolicyLossOutput:
    """The clipped surrogate of PPO/GRPO plus ``beta`` times the k3 KL to a reference, per token.

    logp: [M] current log-probabilities (with gradient); old_logp: [M] those of the policy that
    sampled (detached; equal to ``logp.detach()`` on the first update); advantages: [M] (the
    sequence's advantage repeated over its tokens); ref_logp: [M] or None.
    ``per_token = -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta * k3`` with ``r = exp(logp - old)``.
    """
    logp, old_logp, advantages = logp.float(), old_logp.float(), advantages.float()
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta != 0.0:
        kl = k3_kl(logp, ref_logp.float())
        per_token = per_token + beta * kl
    was_clipped = ((ratio > 1.0 + epsilon) & (advantages > 0)) | ((ratio < 1.0 - epsilon) & (advantages < 0))
    return PolicyLossOutput(per_token, kl, was_clipped)
