"""Saving, rotating and resuming a run's checkpoints: the part of ``Trainer`` that writes and reads
``checkpoints/step-N`` (file formats: :mod:`dlmdistill.training.checkpoint`; the folder's layout:
:mod:`dlmdistill.training.run_folder`).

A checkpoint is written to a temporary folder and renamed when complete; ``trainer_state.json``, written
last, lists every file with its size. ``resume`` checks those sizes and every safetensors header and falls
back to the previous checkpoint, with a warning, when the newest is damaged; it restores model, optimizer,
schedule, gradient scaler, RNG states and the loop position, and drops the log rows written after it.
Nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from ..config import ConfigError
from ..errors import UserError
from . import checkpoint as ckio
from . import fsdp
from .checkpoint import MODEL_FILE, PARTIAL_FILE
from .run_folder import CHECKPOINT_DIR, LOG_FILE, STATE_FILE, complete_checkpoints
from .state import NonFiniteLossError, TrainerState

log = logging.getLogger(__name__)


class CheckpointMixin:
    """``save_checkpoint`` and ``resume`` of :class:`~dlmdistill.training.trainer.Trainer`, which provides
    ``accelerator``, ``model``, ``optimizer``, ``scheduler``, ``state``, ``config``, ``output_dir``,
    ``fsdp_direct``, ``train_loader``, ``method_name``, ``unwrapped`` and ``_last_good``."""

    def _sharded(self) -> bool:
        return self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")

    def _trainable_only(self) -> set[str] | None:
        """Names of the trainable parameters when some are frozen (LoRA, frozen teachers), else None."""
        named = list(self.unwrapped.named_parameters())
        if all(p.requires_grad for _, p in named):
            return None
        return {n for n, p in named if p.requires_grad}

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # inside Accelerate's wrapper

    def _check_weights_finite(self) -> None:
        if self.fsdp_direct:  # (a collective: every rank checks its shards)
            bad = fsdp.nonfinite_parameters(self.model)
        else:
            bad = [n for n, p in self.unwrapped.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise NonFiniteLossError(
                f"non-finite weights at optimizer step {self.state.global_step} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); no checkpoint written for this step; {self._last_good()}. "
                "Lower the learning rate.")

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (temporary folder + rename) and rotate old ones.

        Every file is safetensors or JSON (see :mod:`dlmdistill.training.checkpoint`); ``trainer_state.json``
        is written last and lists every file with its size. Weights that are not finite are refused
        (:class:`NonFiniteLossError`), so a checkpoint on disk is always one to resume from."""
        acc = self.accelerator
        self._check_weights_finite()
        root = self.output_dir / CHECKPOINT_DIR
        final = root / f"step-{self.state.global_step:07d}"
        tmp = root / f".tmp-step-{self.state.global_step:07d}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        if self._sharded():
            # FSDP/DeepSpeed shard model and optimizer: Accelerate writes them (model as safetensors; it
            # reads its files back with torch.load(weights_only=True)); nothing is registered with it
            acc.save_state(str(tmp), safe_serialization=True)
        elif self.fsdp_direct:
            # full (unsharded) state gathered on rank 0, written in the single-process layout
            from safetensors.torch import save_file

            keep = self._trainable_only()
            sd = fsdp.full_model_state_dict(self.model, keep)
            osd = fsdp.full_optimizer_state_dict(self.model, self._base_optimizer())
            if acc.is_main_process:
                save_file(_unshared(sd), str(tmp / (MODEL_FILE if keep is None else PARTIAL_FILE)))
                ckio.save_optimizer_state(osd, tmp)
        elif acc.is_main_process:
            from safetensors.torch import save_file, save_model

            keep = self._trainable_only()
            if keep is None:
                save_model(self.unwrapped, str(tmp / MODEL_FILE), force_contiguous=True)
            else:
                sd = self.unwrapped.state_dict()
                save_file({k: v.detach().contiguous() for k, v in sd.items() if k in keep}, str(tmp / PARTIAL_FILE))
            ckio.save_optimizer(self.optimizer, tmp)
        ckio.save_rng(tmp, acc.process_index)
        acc.wait_for_everyone()  # every rank has written its files (RNG states) before the rename
        if acc.is_main_process:
            ckio.write_json(tmp / ckio.SCHEDULER_FILE, self.scheduler.state_dict())
            if acc.scaler is not None:
                ckio.write_json(tmp / ckio.SCALER_FILE, acc.scaler.state_dict())
            names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            ckio.write_json(tmp / STATE_FILE, {**self.state.__dict__, "method": self.method_name,
                                               "accelerator_step": acc.step,
                                               "files": ckio.file_sizes(tmp, names)})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate(root)
        acc.wait_for_everyone()
        return final

    def _rotate(self, root: Path) -> None:
        limit = self.config.save_total_limit
        if limit <= 0:
            return
        ckpts = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
        for old in ckpts[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _resumable_checkpoint(self) -> Path | None:
        """The newest intact checkpoint; damaged newer ones are renamed ``damaged-step-N`` (kept for
        inspection) with a warning naming the problem. Raises if checkpoints exist but none is intact."""
        complete = complete_checkpoints(self.output_dir)
        damaged = []
        for ckpt in reversed(complete):
            problem = ckio.checkpoint_problem(ckpt, STATE_FILE)
            if problem is None:
                break
            log.warning("checkpoint %s cannot be resumed from: %s; falling back to the previous one", ckpt, problem)
            damaged.append(ckpt)
        else:
            if complete:
                raise ConfigError(f"training.output_dir {self.output_dir}: no intact checkpoint to resume from "
                                  f"({', '.join(p.name for p in complete)} are damaged; see the warnings)")
            return None
        self.accelerator.wait_for_everyone()  # every rank has judged the same folders
        if self.accelerator.is_main_process:
            for bad in damaged:
                os.replace(bad, bad.with_name("damaged-" + bad.name))
        self.accelerator.wait_for_everyone()
        return ckpt

    def resume(self, checkpoint: Path | None = None) -> None:
        """Continue from ``checkpoint`` (a checkpoint folder) or else the latest intact one in output_dir."""
        acc = self.accelerator
        if checkpoint is not None:
            problem = ckio.checkpoint_problem(checkpoint, STATE_FILE)
            if problem is not None:
                raise ConfigError(f"training.resume_from_checkpoint {checkpoint}: cannot resume from it: {problem}")
            ckpt = checkpoint
        else:
            ckpt = self._resumable_checkpoint()
        if ckpt is None:
            log.warning("resume requested but %s has no complete checkpoint; starting from scratch", self.output_dir)
            self._trim_log(0)
            return
        if self._sharded():
            acc.load_state(str(ckpt))
        elif self.fsdp_direct:
            from safetensors.torch import load_file

            keep = self._trainable_only()
            path = ckpt / (MODEL_FILE if keep is None else PARTIAL_FILE)
            fsdp.load_model_state_dict(self.model, load_file(str(path)), strict=keep is None)
            fsdp.load_optimizer_state_dict(self.model, self._base_optimizer(), ckio.read_optimizer_state(ckpt))
        else:
            from safetensors.torch import load_file, load_model

            device = str(self.unwrapped.device)
            keep = self._trainable_only()
            if keep is None:
                load_model(self.unwrapped, str(ckpt / MODEL_FILE), strict=True, device=device)
            else:
                path = ckpt / PARTIAL_FILE
                missing, unexpected = self.unwrapped.load_state_dict(load_file(str(path), device=device), strict=False)
                bad = [k for k in missing if k in keep]
                if bad or unexpected:
                    raise UserError(f"{path}: checkpoint does not match the model (missing trainable {bad[:5]}, "
                                       f"unexpected {list(unexpected)[:5]})")
            ckio.load_optimizer(self.optimizer, ckpt)
        self.scheduler.load_state_dict(ckio.read_json(ckpt / ckio.SCHEDULER_FILE))
        if acc.scaler is not None and (ckpt / ckio.SCALER_FILE).exists():
            acc.scaler.load_state_dict(ckio.read_json(ckpt / ckio.SCALER_FILE))
        if not ckio.load_rng(ckpt, acc.process_index):
            log.warning("%s has no RNG state for process %d; the run continues but not bit-exactly", ckpt,
                        acc.process_index)
        saved = ckio.read_json(ckpt / STATE_FILE)
        acc.step = saved.pop("accelerator_step", acc.step)
        for extra in ("method", "files"):
            saved.pop(extra, None)
        self.state = TrainerState(**saved)
        if self.state.batches_in_epoch >= len(self.train_loader):
            self.state.epoch += 1
            self.state.batches_in_epoch = 0
        self._trim_log(self.state.global_step)
        log.info("resumed from %s at step %d", ckpt, self.state.global_step)

    def _trim_log(self, step: int) -> None:
        """Drop the log rows written after ``step`` (they will be logged again), atomically."""
        if self.accelerator.is_main_process:
            removed = ckio.trim_log(self.output_dir / LOG_FILE, step)
            if removed:
                log.info("%s: removed %d rows logged after step %d", self.output_dir / LOG_FILE, removed, step)
        self.accelerator.wait_for_everyone()


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with tensors that share memory (tied weights) copied, as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out
