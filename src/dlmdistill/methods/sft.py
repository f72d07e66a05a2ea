"""Masked-diffusion supervised fine-tuning (SMDM / LLaDA SFT): the baseline every method builds on.

Per batch: draw ``t ~ U(0, 1)`` per sequence, mask each response token with probability
``p_mask = (1 - eps) t + eps``, predict the masked tokens, and minimise the cross-entropy weighted
by ``1 / p_mask`` (normalised per token or per sequence). Optionally mask the whole prompt with
probability ``cfg_prob`` to train for classifier-free guidance.

    dlmdistill train sft --config configs/sft_countdown_tiny.yaml
"""

from __future__ import annotations

from typing import Any

import torch

from ..configs.methods import SFTConfig, SFTRunConfig  # noqa: F401 (re-exported)
from ..diffusion import EPS, ResponseRows, diffusion_loss_weights, forward_process, mask_prompts_for_cfg
from ..losses.diffusion import masked_diffusion_loss, masked_token_stats
from ..training.trainer import Trainer
from .common import finish, prepare, write_run_metadata


def diffusion_batch_loss(model, batch: dict[str, torch.Tensor], *, mask_id: int, normalization: str = "token",
                         cfg_prob: float = 0.0, eps: float = EPS, static_shapes: bool = False
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The masked-diffusion loss of one collated batch (see ``data.DiffusionCollator``).

    ``static_shapes``: the head runs at every response position of ``batch["response_index"]`` ([B, K],
    -1 = none) and the unmasked ones get weight 0: the same loss, with no data-dependent shape (no
    device-to-host sync). Otherwise it runs at the masked positions only (one ``nonzero``)."""
    ids, resp = batch["input_ids"], batch["response_mask"]
    noised = forward_process(ids, resp, mask_id, eps=eps)
    noisy = mask_prompts_for_cfg(noised.noisy_ids, batch["prompt_mask"], mask_id, cfg_prob)
    weights = diffusion_loss_weights(noised.masked, noised.p_mask, resp, normalization)
    if static_shapes:
        at = ResponseRows.of(batch["response_index"])
        logits = model(noisy, batch["attention_mask"], positions=at.index)
        targets = at.gather(ids)
        in_loss = at.gather(noised.masked) & at.valid
        weights = torch.where(in_loss, at.gather(weights), torch.zeros((), dtype=weights.dtype, device=ids.device))
    else:
        logits = model(noisy, batch["attention_mask"], positions=noised.masked)
        targets = ids[noised.masked]
        weights, in_loss = weights[noised.masked], None
    loss = masked_diffusion_loss(logits, targets, weights)
    metrics = masked_token_stats(logits.detach(), targets, in_loss)
    metrics["mask_ratio"] = noised.masked.sum() / resp.sum().clamp(min=1)
    return loss, metrics


class SFTTrainer(Trainer):
    method_name = "sft"

    def __init__(self, *args: Any, method: SFTConfig | None = None, **kwargs: Any):
        self.method = method or SFTConfig()
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, batch):
        return diffusion_batch_loss(model, batch, mask_id=self.unwrapped.mask_id,
                                    normalization=self.method.normalization, cfg_prob=self.method.cfg_prob,
                                    eps=self.method.eps, static_shapes=self.config.static_shapes)


def run(cfg: Any) -> dict[str, float]:
    """Train with masked-diffusion SFT; returns the final evaluation metrics."""
    prep = prepare(cfg)
    trainer = SFTTrainer(prep.model, prep.tokenizer, prep.train_items, cfg.training, collate_fn=prep.collator,
                         evaluator=prep.evaluator, run_config=cfg, method=cfg.method)
    write_run_metadata(cfg, prep.tokenizer, SFTTrainer.method_name, trainer.accelerator)
    return finish(trainer, trainer.train())
