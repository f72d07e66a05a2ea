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
def masked_token_stats(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
    """Accuracy and mean probability of the ground truth at masked positions (for logs).

    logits: [N, V]; targets: [N]; rows: [N] bool, the rows that count (default: all). Returns 0-d
    float tensors on the logits' device (no host read; NaN when no row counts, which the trainer's
    log leaves out of its means)."""
    probs = torch.softmax(logits.float(), dim=-1)
    correct = (probs.argmax(-1) == targets).float()
    p_true = probs.gather(-1, targets[:, None])[:, 0]
    if rows is None:
        return {"masked_acc": correct.mean(), "p_true": p_true.mean()}
    w = rows.float()
    n = w.sum()
    return {"masked_acc": (correct * w).sum() / n, "p_true": (p_true * w).sum() / n}
