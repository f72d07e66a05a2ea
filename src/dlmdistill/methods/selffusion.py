"""SelfFusion: self-distillation between an easy and a hard masking of the same response.

Per training example (paper Sec. 3, appendix A.3): a hard copy masked with ``t_h ~ U(0, 1)`` and an
easy copy masked with ``t_e ~ U(0, t_h)``, positions drawn independently for the two. Both copies
go through the model in ONE forward pass (a 2B batch); the easy half passes through the
calibration RMSNorm (``DiffusionModel.add_calibration``) between the final hidden state and the LM
head, which is trained and checkpointed with the run but never used at inference nor exported.
The LM head is computed only at each copy's masked positions (plus the distillation set D when D
is "either"). Loss (eq. 7): ``L_diff(hard) + L_diff(easy) + kd_weight * L_bkd``; see
``losses.selffusion`` for the terms and the direction rule.

Diagnostics, logged with the loss (``logs.jsonl``): per mode ``{easy,hard}/masked_acc``,
``/p_true`` (mean probability of the ground truth on the mode's own masked positions) and
``/mask_ratio``; on D ``kd/frac_*`` (per direction and per correctness case) and
``kd/easy_top1_both_{correct,wrong}`` (the easy mode's mean top-1 probability), with ``_uncal``
variants without the calibration RMSNorm every ``uncalibrated_diagnostics_every`` micro-batches.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..configs.methods import SelfFusionConfig, SelfFusionRunConfig  # noqa: F401 (re-exported)
from ..diffusion import EPS, NoisedBatch, ResponseRows, apply_mask, sample_t
from ..flops import ModelShape, PassCounter
from ..losses.diffusion import token_nll
from ..losses.selffusion import (bidirectional_kd_loss, direction_from_stats, distillation_positions, mode_loss_weights,
                                 selffusion_diagnostics, student_masked)
from ..models.backbone import DiffusionModel
from ..training.trainer import Trainer
from .common import finish, prepare, write_run_metadata
from .distillation import write_costs


def sample_modes(input_ids: torch.Tensor, response_mask: torch.Tensor, mask_id: int, *, eps: float = EPS,
                 generator: torch.Generator | None = None) -> tuple[NoisedBatch, NoisedBatch]:
    """The easy and hard copies of a batch (appendix A.3): ``t_h ~ U(0, 1)``, ``t_e ~ U(0, t_h)`` per
    sequence, so ``p_mask(t_e) <= p_mask(t_h)``; masked positions drawn independently per mode.

    input_ids, response_mask: [B, L]. Returns ``(easy, hard)``.
    """
    b = input_ids.shape[0]
    t_hard = sample_t(b, device=input_ids.device, generator=generator)
    t_easy = sample_t(b, device=input_ids.device, generator=generator, high=t_hard)
    hard = apply_mask(input_ids, response_mask, t_hard, mask_id, eps=eps, generator=generator)
    easy = apply_mask(input_ids, response_mask, t_easy, mask_id, eps=eps, generator=generator)
    return easy, hard


@contextmanager
def uncalibrated_logits(model: DiffusionModel, rows: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Capture, during the next forward, the LM head's logits *without* calibration at ``rows``.

    rows: [K] indices into the rows the forward gathers (``positions`` in row-major order). A pre-hook
    on the calibration module applies the head (no grad) to its input at those rows, inside the
    forward, so it also works when the model is wrapped (DDP/FSDP). The yielded dict gets ``"logits"``
    ([K, V]) once the forward has run.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            store["logits"] = model.head()(args[0][rows].detach())

    handle = model.calibration.register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@dataclass
class SelfFusionStep:
    """One batch's result.

    loss: ``terms["diff_hard"] + terms["diff_easy"] + kd_weight * terms["kd"]`` (scalar).
    terms: the loss terms with their graphs (``"kd"`` only when ``kd_weight > 0``).
    metrics: diagnostics for the logs (0-d device tensors).
    head_rows / sft_head_rows: LM-head rows of this pass and of an SFT pass on the hard copy (costs; the
    latter a device tensor).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    head_rows: int
    sft_head_rows: torch.Tensor


def selffusion_batch_loss(model: torch.nn.Module, dm: DiffusionModel, batch: dict[str, torch.Tensor],
                          config: SelfFusionConfig, *, calibrated: bool, uncalibrated_diagnostics: bool = False,
                          generator: torch.Generator | None = None, static_shapes: bool = False) -> SelfFusionStep:
    """SelfFusion's loss on one collated batch (``data.DiffusionCollator`` layout).

    model: what to call (possibly the Accelerate-wrapped model); dm: the unwrapped ``DiffusionModel``
    behind it (mask id, calibration module, head).

    Cost: one forward over the 2B copies with the LM head at ``N = N_easy + N_hard`` rows; one
    cross-entropy over all N rows gives both diffusion losses and the ``p(y)`` / correctness the
    direction rule needs; the D rows of both modes are gathered once ([2|D|, V]) for the KD.
    ``static_shapes``: the head runs at every response position of both copies instead (``2K`` rows,
    ``batch["response_index"]``), rows off a mode's mask or off D weighted 0: the same loss with no
    data-dependent shape (no device-to-host sync).
    """
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    b = ids.shape[0]
    easy, hard = sample_modes(ids, resp, dm.mask_id, eps=config.eps, generator=generator)
    distill = distillation_positions(easy.masked, hard.masked, config.distill_positions)
    if static_shapes:  # every response position of both copies, rows aligned: easy row j <-> hard row K + j
        at = ResponseRows.of(batch["response_index"])
        positions, n_easy = torch.cat([at.index, at.index]), at.rows.numel()
        targets = torch.cat([at.gather(ids), at.gather(ids)])
        zero = torch.zeros((), device=ids.device)
        weights = torch.cat([torch.where(at.valid, at.gather(mode_loss_weights(m.masked, m.p_mask, resp,
                                                                                config.normalization)), zero)
                             for m in (easy, hard)])
        in_mask = torch.cat([at.gather(easy.masked) & at.valid, at.gather(hard.masked) & at.valid])
        kd_rows = torch.arange(2 * n_easy, device=ids.device)
        in_d = at.gather(distill) & at.valid
    else:  # rows gathered per copy: its masked positions, or D when D reaches beyond them ("either")
        pos_easy, pos_hard = (easy.masked, hard.masked) if config.distill_positions == "both" else (distill, distill)
        positions, n_easy = torch.cat([pos_easy, pos_hard]), int(pos_easy.sum())
        targets = torch.cat([ids[pos_easy], ids[pos_hard]])
        weights = torch.cat([mode_loss_weights(m.masked, m.p_mask, resp, config.normalization)[pos]
                             for m, pos in ((easy, pos_easy), (hard, pos_hard))])
        in_mask = torch.cat([easy.masked[pos_easy], hard.masked[pos_hard]])
        kd_rows = torch.cat([distill[pos_easy].nonzero(as_tuple=True)[0],
                             n_easy + distill[pos_hard].nonzero(as_tuple=True)[0]])  # easy D rows, then hard D rows
        in_d = None
    calibrate = torch.arange(2 * b, device=ids.device) < b if calibrated else None
    want_uncal = calibrated and uncalibrated_diagnostics
    capture = uncalibrated_logits(dm, kd_rows[: kd_rows.shape[0] // 2]) if want_uncal else nullcontext({})
    with capture as captured:
        logits = model(torch.cat([easy.noisy_ids, hard.noisy_ids]), torch.cat([attn, attn]), positions=positions,
                       calibrate=calibrate)

    # per gathered row: ground truth, NLL, correctness, and the mode's L_diff weight (0 off its mask)
    nll = token_nll(logits, targets)
    correct = logits.detach().argmax(dim=-1) == targets
    weighted = weights * nll
    mode_rows = {"easy": slice(0, n_easy), "hard": slice(n_easy, logits.shape[0])}
    terms = {f"diff_{m}": weighted[rows].sum() for m, rows in mode_rows.items()}
    # diagnostics as device tensors (read back once per logging interval; NaN = no such position)
    metrics: dict[str, torch.Tensor] = {}
    for m, noised in (("easy", easy), ("hard", hard)):
        own = in_mask[mode_rows[m]].float()
        metrics[f"{m}/masked_acc"] = (correct[mode_rows[m]].float() * own).sum() / own.sum()
        metrics[f"{m}/p_true"] = (torch.exp(-nll[mode_rows[m]].detach()) * own).sum() / own.sum()
        metrics[f"{m}/mask_ratio"] = noised.masked.sum() / resp.sum().clamp(min=1)

    easy_d, hard_d = logits[kd_rows].chunk(2)
    e_rows, h_rows = kd_rows.chunk(2)
    p_true = torch.exp(-nll.detach())
    decision = direction_from_stats(correct[e_rows], correct[h_rows], p_true[e_rows], p_true[h_rows],
                                    config.direction)
    loss = terms["diff_hard"] + terms["diff_easy"]
    if config.kd_weight > 0:
        kd_easy, kd_hard, teaches, kd_in_d = easy_d, hard_d, decision.easy_teaches, in_d
        if config.distill_positions == "own":  # each mode a student only where it is masked itself
            keep = student_masked(teaches, in_mask[e_rows], in_mask[h_rows])
            if in_d is None:
                kd_easy, kd_hard, teaches = easy_d[keep], hard_d[keep], teaches[keep]
            else:
                kd_in_d = in_d & keep
        terms["kd"] = bidirectional_kd_loss(kd_easy, kd_hard, teaches, config.temperature, in_d=kd_in_d)
        loss = loss + config.kd_weight * terms["kd"]
    metrics.update({f"loss/{k}": v.detach() for k, v in terms.items()})
    metrics["kd/frac_of_response"] = distill.sum() / resp.sum().clamp(min=1)
    metrics.update(selffusion_diagnostics(easy_d.detach(), hard_d.detach(), decision, captured.get("logits"), in_d))
    return SelfFusionStep(loss=loss, terms=terms, metrics=metrics, head_rows=logits.shape[0],
                          sft_head_rows=hard.masked.sum())


class SelfFusionTrainer(Trainer):
    method_name = "selffusion"

    def __init__(self, *args: Any, method: SelfFusionConfig | None = None, **kwargs: Any):
        self.method = method or SelfFusionConfig()
        self.passes = {"sft": PassCounter(), "selffusion": PassCounter()}
        self.micro_batches = 0
        super().__init__(*args, **kwargs)

    def setup_model(self, model: DiffusionModel) -> None:
        if self.method.calibration and model.calibration is None:
            model.add_calibration()

    def compute_loss(self, model, batch):
        every = self.method.uncalibrated_diagnostics_every
        step = selffusion_batch_loss(model, self.unwrapped, batch, self.method, calibrated=self.method.calibration,
                                     uncalibrated_diagnostics=every > 0 and self.micro_batches % every == 0,
                                     static_shapes=self.config.static_shapes)
        self.micro_batches += 1
        b, length = batch["input_ids"].shape
        self.passes["sft"].add(b, length, step.sft_head_rows)
        self.passes["selffusion"].add(2 * b, length, step.head_rows)
        return step.loss, step.metrics

    def cost_rows(self) -> dict[str, dict[str, float]]:
        """FLOPs per micro-batch: this run, and SFT on the same batches (one copy, hard-mode masking)."""
        shape = ModelShape.of(self.unwrapped)
        kind = "lora" if self.unwrapped.is_peft else "train"
        return {name: {"student_training": c.flops_per_micro_batch(shape, kind)} for name, c in self.passes.items()}


def run(cfg: Any) -> dict[str, float]:
    """Train with SelfFusion; returns the final evaluation metrics."""
    prep = prepare(cfg)
    trainer = SelfFusionTrainer(prep.model, prep.tokenizer, prep.train_items, cfg.training, collate_fn=prep.collator,
                                evaluator=prep.evaluator, run_config=cfg, method=cfg.method)
    write_run_metadata(cfg, prep.tokenizer, SelfFusionTrainer.method_name, trainer.accelerator)
    metrics = trainer.train()
    write_costs(trainer, trainer.cost_rows())
    return finish(trainer, metrics)
