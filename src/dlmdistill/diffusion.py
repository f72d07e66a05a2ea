"""The masked-diffusion forward process and its training loss.

For a prompt ``x`` and a response ``y`` of length L (prompt tokens are never masked):

* draw a noise level ``t ~ U(0, 1)`` per sequence and set ``p_mask = (1 - eps) * t + eps``;
* mask every response token independently with probability ``p_mask`` (replace it by the mask id);
* the loss is the cross-entropy at masked positions weighted by ``1 / p_mask``, normalised either
  per token over the batch (SMDM: sum / number of response tokens in the batch) or per sequence
  (LLaDA: each sample's sum / its response length, then the batch mean).

Shapes: B = batch, L = sequence length (prompt + response + padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .configs.choices import EPS  # the minimum masking probability (defined without torch, for the configs)

Normalization = Literal["token", "sequence"]


def mask_probability(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``p_mask(t) = (1 - eps) t + eps`` (same shape as ``t``)."""
    return (1.0 - eps) * t + eps


@dataclass
class NoisedBatch:
    """The output of the forward process.

    noisy_ids: [B, L] input ids with masked response tokens replaced by the mask id.
    masked:    [B, L] bool, True where a response token was masked (the loss positions).
    p_mask:    [B]    float, each sequence's masking probability.
    t:         [B]    float, each sequence's noise level.
    """

    noisy_ids: torch.Tensor
    masked: torch.Tensor
    p_mask: torch.Tensor
    t: torch.Tensor


def sample_t(batch_size: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
             low: torch.Tensor | float = 0.0, high: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``t ~ U(low, high)`` per sequence; ``low``/``high`` may be [B] tensors (SelfFusion's easy mode
    draws ``t_easy ~ U(0, t_hard)``)."""
    u = torch.rand(batch_size, device=device, generator=generator)
    return low + (high - low) * u


def apply_mask(input_ids: torch.Tensor, response_mask: torch.Tensor, t: torch.Tensor, mask_id: int, *,
               eps: float = EPS, generator: torch.Generator | None = None) -> NoisedBatch:
    """Mask each response token independently with probability ``p_mask(t)``.

    input_ids:     [B, L] clean token ids.
    response_mask: [B, L] bool, True at response positions (the only positions that may be masked).
    t:             [B] noise levels in [0, 1].
    """
    p = mask_probability(t, eps)
    u = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    masked = (u < p[:, None]) & response_mask
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return NoisedBatch(noisy_ids=noisy, masked=masked, p_mask=p, t=t)


def forward_process(input_ids: torch.Tensor, response_mask: torch.Tensor, mask_id: int, *, eps: float = EPS,
                    generator: torch.Generator | None = None) -> NoisedBatch:
    """Draw ``t ~ U(0,1)`` per sequence and mask the response (the standard SMDM/LLaDA recipe)."""
    t = sample_t(input_ids.shape[0], device=input_ids.device, generator=generator)
    return apply_mask(input_ids, response_mask, t, mask_id, eps=eps, generator=generator)


def mask_prompts_for_cfg(noisy_ids: torch.Tensor, prompt_mask: torch.Tensor, mask_id: int, prob: float, *,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """For classifier-free guidance training: with probability ``prob`` per sequence, mask the whole prompt.

    prompt_mask: [B, L] bool, True at (non-padding) prompt positions.
    """
    if prob <= 0:
        return noisy_ids
    drop = torch.rand(noisy_ids.shape[0], device=noisy_ids.device, generator=generator) < prob
    return torch.where(drop[:, None] & prompt_mask, torch.full_like(noisy_ids, mask_id), noisy_ids)


def diffusion_loss_weights(masked: torch.Tensor, p_mask: torch.Tensor, response_mask: torch.Tensor,
                           normalization: Normalization = "token") -> torch.Tensor:
    """Per-position weights ``w`` such that ``loss = sum(w * token_ce)`` is the masked-diffusion loss.

    masked:        [B, L] bool, masked response positions.
    p_mask:        [B] masking probabilities.
    response_mask: [B, L] bool, response positions (the normaliser counts them, masked or not).
    Returns [B, L] float weights, zero off ``masked``.

    * ``"token"``    (SMDM): ``w = 1 / (p_mask * N)`` with N = response tokens in the batch.
    * ``"sequence"`` (LLaDA): ``w = 1 / (p_mask * L_b * B)`` with L_b = sample b's response length.
    """
    inv_p = (1.0 / p_mask)[:, None].expand_as(masked)
    if normalization == "token":
        denom = response_mask.sum().clamp(min=1).to(inv_p.dtype)
        w = inv_p / denom
    elif normalization == "sequence":
        lengths = response_mask.sum(dim=1, keepdim=True).clamp(min=1).to(inv_p.dtype)
        w = inv_p / (lengths * masked.shape[0])
    else:  # pragma: no cover - guarded by config validation
        raise ValueError(f"unknown normalization {normalization!r}; expected 'token' or 'sequence'")
    return torch.where(masked, w, torch.zeros_like(w))



@dataclass
class ResponseRows:
    """Every response position of a batch as fixed-shape rows (``training.static_shapes``).

    index: [B, K] long, each row's response positions (``DiffusionCollator``'s ``response_index`` with its
           -1 padding replaced by 0), what the model's ``positions`` takes;
    rows, cols: [B * K] long, the batch row and the position of each flattened entry (``x[rows, cols]``
           gathers a [B, L] tensor in the order of the model's output rows);
    valid: [B * K] bool, False at the padding entries (weight them 0).
    """

    index: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, response_index: torch.Tensor) -> "ResponseRows":
        valid = (response_index >= 0).reshape(-1)
        index = response_index.clamp(min=0)
        rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index).reshape(-1)
        return cls(index=index, rows=rows, cols=index.reshape(-1), valid=valid)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, L] at the flattened entries: [B * K]."""
        return x[self.rows, self.cols]
