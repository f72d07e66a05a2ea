"""The masked-diffusion cross-entropy (the SFT loss every DLM method starts from)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``targets`` in float32.

    logits: [N, V]; targets: [N] -> [N].
    """
    return F.cross_entropy(logits.float(), targets, reduction="none")


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * -log p(target_i)`` over the masked positions.

    logits:  [N, V] at the N masked positions (``DiffusionModel(..., positions=masked)``);
    targets: [N] clean tokens; weights: [N], e.g. ``1 / (p_mask * normaliser)`` from
    ``diffusion.diffusion_loss_weights(...)[masked]``. Returns a scalar.
    """
    return (weights.to(torch.float32) * token_nll(logits, targets)).sum()


@torch.no_grad()
def masked_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean probability of the ground truth at masked positions (for logs)."""
    if logits.shape[0] == 0:
        return {}
    probs = torch.softmax(logits.float(), dim=-1)
    return {
        "masked_acc": (probs.argmax(-1) == targets).float().mean().item(),
        "p_true": probs.gather(-1, targets[:, None]).mean().item(),
    }
