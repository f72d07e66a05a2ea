"""The training loop shared by every method, on Hugging Face Accelerate.

Accelerate provides the distributed engine (DDP, FSDP, DeepSpeed through ``accelerate launch`` or
``torchrun``; FSDP on a multi-process CPU launch, which Accelerate does not drive, is FSDP2 applied
by :mod:`dlmdistill.training.fsdp`), mixed precision, gradient accumulation and checkpoint state;
this module adds the loop a researcher expects around it, readable top to bottom:

* AdamW (or ``optim``: fused AdamW, Adafactor, SGD) with the schedule of ``TrainingConfig`` (names
  follow ``transformers.TrainingArguments``, including ``bf16``/``fp16``, ``report_to: none`` and
  ``resume_from_checkpoint``);
* gradient clipping, a non-finite-loss guard that names the step, JSONL + TensorBoard logs, a
  progress bar, periodic evaluation;
* checkpoints every ``save_steps`` and ``resume`` (:mod:`dlmdistill.training.checkpointing`: atomic,
  safetensors and JSON only, the latest intact one resumed), and the run folder prepared before
  anything is written (:mod:`dlmdistill.training.run_folder`: a folder holding another run is refused
  unless ``resume`` or ``overwrite_output_dir``); a non-finite gradient is never applied.

Methods subclass ``Trainer`` (TRL style). Offline methods (SFT, SelfFusion, KD) implement
``compute_loss(model, batch) -> (loss, metrics)``; on-policy methods (d-OPSD, diffu-GRPO) override
``training_step(batch)`` and call ``backward`` / ``optimizer_step`` themselves, so one rollout
batch is exactly one optimizer step (or none, if nothing is trainable).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import ConfigError
from ..configs.training import TrainingConfig
from ..errors import UserError
from ..models.backbone import DiffusionModel
from ..models.loading import count_parameters
from . import fsdp
from .checkpointing import CheckpointMixin
from .metrics import MetricWindow
from .run_folder import LOG_FILE, latest_checkpoint, prepare_output_dir
from .state import NonFiniteLossError, TrainerState

log = logging.getLogger(__name__)

def use_cpu(config: TrainingConfig) -> bool:
    """Accelerate only builds a multi-process CPU (gloo) setup when told to use the CPU."""
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return config.use_cpu or (multi_process and not torch.cuda.is_available())


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same data.

    The epoch is set by the trainer through ``use_epoch`` (deliberately not ``set_epoch``: Accelerate's
    data loaders call ``set_epoch`` with their own iteration counter, which restarts at 0 on resume).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + 1000003 * self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _allow_precision(mixed_precision: str) -> None:
    """Accelerate keeps one mixed precision per process: a second run in the same process (the Python
    API, a notebook, tests) with another ``mixed_precision`` fails inside Accelerate ("restart your
    runtime"). In a single process its shared ``AcceleratorState`` is cleared so the new run can set
    its own (a private Accelerate call; the process state and any process group are kept); under a
    distributed launch that is unsafe, so it is a clear error instead."""
    from accelerate.state import AcceleratorState

    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is None or previous == mixed_precision:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"this process already trained with mixed_precision={previous}; Accelerate cannot change it "
                        f"within a distributed launch: start a new launch for mixed_precision={mixed_precision}")
    AcceleratorState._reset_state()


def make_optimizer(config: TrainingConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer ``config.optim`` names, over parameter ``groups`` (each with its weight decay)."""
    lr = config.learning_rate
    if config.optim in ("adamw_torch", "adamw_torch_fused"):
        fused = config.optim == "adamw_torch_fused"
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                     eps=config.adam_epsilon, fused=fused or None)
        except RuntimeError as e:  # fused kernels exist for some devices and dtypes only
            raise ConfigError(f"training.optim: adamw_torch_fused is not available here ({e}); use adamw_torch") from None
    if config.optim == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed learning rate (the schedule of lr_scheduler_type applies), as transformers' Trainer does
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if config.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    raise ConfigError(f"training.optim: unknown optimizer {config.optim!r}")


class Trainer(CheckpointMixin):
    """Base trainer. Subclasses implement ``compute_loss`` or override ``training_step``."""

    #: name used in logs and the run folder's metadata
    method_name = "base"

    def __init__(self, model: DiffusionModel, tokenizer, train_dataset: list[Any], config: TrainingConfig, *,
                 collate_fn: Callable | None = None, evaluator: Callable[["Trainer"], dict[str, float]] | None = None,
                 run_config: Any = None, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.tokenizer = tokenizer
        self.evaluator = evaluator
        self.run_config = run_config
        self.output_dir = Path(config.output_dir)
        if accelerator is None:
            _allow_precision(config.mixed_precision)
        self.accelerator = accelerator or Accelerator(
            cpu=use_cpu(config),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=self.accumulation_steps(),
            log_with=[r for r in config.report_to if r not in ("jsonl", "none")] or None,
            project_dir=str(self.output_dir),
        )
        prepare_output_dir(config)
        if config.mixed_precision != "no" and self.accelerator.device.type == "cpu":
            log.warning("mixed_precision=%s on a CPU: autocast there is slow on CPUs without native %s support "
                        "(fp16 autocast was 14x slower than float32 for a small MLP here); use --mixed_precision no "
                        "for CPU runs unless you have measured otherwise", config.mixed_precision,
                        config.mixed_precision)
        set_seed(config.seed, device_specific=True)
        if len(train_dataset) == 0:
            raise ValueError("the training set is empty")
        self.train_dataset = list(train_dataset)  # a list is a map-style dataset
        self.sampler = EpochSampler(len(self.train_dataset), config.seed)
        loader = DataLoader(self.train_dataset, batch_size=config.per_device_train_batch_size, sampler=self.sampler,
                            collate_fn=collate_fn or (lambda x: x), num_workers=config.dataloader_num_workers,
                            drop_last=False, generator=torch.Generator().manual_seed(config.seed))
        # (a private generator: creating a DataLoader iterator must not consume the global RNG, or a
        # resumed run would draw different masks than an uninterrupted one)
        self.setup_model(model)
        model.static_attention_mask = config.static_shapes
        n_all, n_train = count_parameters(model), count_parameters(model, trainable_only=True)
        log.info("%s: %s parameters, %s trainable; %d training examples", self.method_name, f"{n_all:,}",
                 f"{n_train:,}", len(self.train_dataset))
        #: FSDP2 applied by dlmdistill (fsdp.py): a multi-process CPU launch that asks for FSDP, which
        #: Accelerate only drives on accelerator devices
        self.fsdp_direct = fsdp.requested() and self.accelerator.distributed_type.value == "MULTI_CPU"
        if fsdp.requested() and self.accelerator.distributed_type.value == "NO":
            log.warning("ACCELERATE_USE_FSDP is set but this is a single process on %s: training without FSDP "
                        "(on a CPU, launch several processes to shard)", self.accelerator.device)
        if self.fsdp_direct:
            fsdp.check_version()
            fsdp.shard(model, mixed_precision=config.mixed_precision)  # before the optimizer: it must hold the sharded (DTensor) parameters
        self.optimizer = make_optimizer(config, _decay_groups(model, config.weight_decay))
        if self.fsdp_direct:  # Accelerate must not wrap the sharded model in DDP
            self.optimizer, self.train_loader = self.accelerator.prepare(self.optimizer, loader)
            self.model = model
        else:
            self.model, self.optimizer, self.train_loader = self.accelerator.prepare(model, self.optimizer, loader)
        if config.compile:  # here, not through Accelerate's dynamo plugin: its state is per process, set once
            self.model = torch.compile(self.model)
        self.total_steps = self._total_steps()
        self.scheduler = self._make_scheduler()
        # (not registered with Accelerate's checkpointing: it would pickle the schedule and unpickle it on
        # resume; every piece of checkpoint state is written as safetensors or JSON by save_checkpoint)
        self.state = TrainerState()
        self._jsonl, self._skipped_update = None, False
        self.last_loss_nonfinite = False  # the last optimizer_step dropped its update for a non-finite loss
        self._loss_finite: torch.Tensor | None = None  # see note_loss
        self._last_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ hooks for methods
    def accumulation_steps(self) -> int:
        """Gradient accumulation handled by Accelerate (on-policy methods accumulate themselves: 1)."""
        return self.config.gradient_accumulation_steps

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one ``training_step`` takes (diffu-GRPO: its inner iterations); the
        learning-rate schedule spans ``total_steps`` times this many steps."""
        return 1

    def setup_model(self, model: DiffusionModel) -> None:
        """Called before the optimizer is built: attach auxiliary modules, freeze parts, build teachers."""

    def compute_loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """Shown in the progress bar after every ``training_step`` (on-policy methods: rollout counts, so
        a run whose batches are skipped without an optimizer step is not silent)."""
        return {}

    @property
    def unwrapped(self) -> DiffusionModel:
        # under training.compile, what torch.compile wrapped (unwrapping the compiled module itself would need an
        # Accelerate that knows keep_torch_compile, and keeping it would re-point it past DDP)
        return self.accelerator.unwrap_model(self.model._orig_mod if self.config.compile else self.model)

    @property
    def sampling_forward(self) -> torch.nn.Module | None:
        """What the sampler should call during training: the wrapped model under FSDP (its parameters
        are sharded; every rank must then run the same number of forward passes), else ``None``
        (the unwrapped model: under DDP the wrapper's forward could synchronise buffers)."""
        return self.model if self.accelerator.distributed_type.value == "FSDP" or self.fsdp_direct else None

    # ------------------------------------------------------------------ schedule
    def updates_per_epoch(self) -> int:
        return max(math.ceil(len(self.train_loader) / self.accumulation_steps()), 1)

    def _total_steps(self) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        return max(int(math.ceil(self.config.num_train_epochs * self.updates_per_epoch())), 1)

    def _make_scheduler(self):
        from transformers import get_scheduler

        steps = self.total_steps * self.optimizer_steps_per_batch()
        warmup = self.config.warmup_steps or int(round(self.config.warmup_ratio * steps))
        kwargs = {"min_lr_rate": self.config.min_lr_ratio} if "min_lr" in self.config.lr_scheduler_type else None
        return get_scheduler(self.config.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                             num_training_steps=steps, scheduler_specific_kwargs=kwargs)

    # ------------------------------------------------------------------ steps
    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def _nonfinite_loss(self, loss: torch.Tensor | None) -> bool:
        shown = f" ({loss.item()})" if loss is not None and loss.numel() == 1 and not torch.isfinite(loss) else ""
        msg = (f"non-finite loss{shown} at optimizer step {self.state.global_step + 1} "
               f"(epoch {self.state.epoch}, batch {self.state.batches_in_epoch}); ")
        if self.config.on_nonfinite_loss == "error":
            raise NonFiniteLossError(msg + self._last_good() + ". Lower the learning rate or use float32/bf16.")
        log.warning(msg + "skipping the batch")
        return False

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember whether ``loss`` is finite, on the device (no host read): ``optimizer_step`` reads it
        together with the gradient norm, once per update."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._last_loss = loss.detach()

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, check, step the optimizer and the schedule, zero the gradients; returns the gradient norm
        (before clipping) as a device tensor, or None without clipping.

        One host read per update: the gradient norm's finiteness, together with that of the losses given to
        ``note_loss`` since the last update. A non-finite loss is handled per ``on_nonfinite_loss`` (the
        update is dropped, or the run stops); a non-finite gradient norm is never applied: per
        ``nonfinite_grad`` the run stops with :class:`NonFiniteLossError`, or the update is skipped
        (``self.last_update_skipped`` is then True). Under fp16 the gradient scaler skips overflowing steps
        itself (and lowers its scale); such a step is handled like a skipped one: no schedule step, counted
        in ``skipped_steps``."""
        acc = self.accelerator
        self._skipped_update = self.last_loss_nonfinite = False
        loss_finite, self._loss_finite = self._loss_finite, None
        # an infinite clipping norm measures without changing the gradients (they are scaled by exactly 1)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        if self.fsdp_direct:  # DTensor gradients: the norm is reduced over ranks
            gn = torch.tensor(fsdp.clip_grad_norm_(self.model.parameters(), max_norm))  # (already a host float)
        else:
            gn = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_finite = torch.isfinite(gn) if isinstance(gn, torch.Tensor) and acc.scaler is None else None
        flags = [f for f in (loss_finite, grad_finite) if f is not None]
        if flags and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):  # the one host read
            if loss_finite is not None and not bool(loss_finite):
                self._drop_update()
                self.last_loss_nonfinite = True
                if not self._nonfinite_loss(self._last_loss):
                    return gn
            if grad_finite is not None and not bool(grad_finite):
                msg = (f"non-finite gradient norm ({float(gn)}) at optimizer step {self.state.global_step + 1} "
                       f"(epoch {self.state.epoch}, batch {self.state.batches_in_epoch}); ")
                if self.config.nonfinite_grad == "stop":
                    raise NonFiniteLossError(msg + self._last_good() + ". The update was not applied. Lower the "
                                             "learning rate, or set nonfinite_grad: skip.")
                log.warning(msg + "update skipped")
                self._drop_update()
                self.state.skipped_steps += 1
                return gn
        self.optimizer.step()
        if acc.scaler is not None and acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler dropped it
            log.info("optimizer step %d: fp16 gradient overflow, update skipped by the gradient scaler (scale now "
                     "%g)", self.state.global_step + 1, acc.scaler.get_scale())
            self._drop_update()
            self.state.skipped_steps += 1
            return gn
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.optimizer_steps += 1
        return gn if self.config.max_grad_norm > 0 and isinstance(gn, torch.Tensor) else None

    def _drop_update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._skipped_update = True

    @property
    def last_update_skipped(self) -> bool:
        """True when the last ``optimizer_step`` dropped its update (a non-finite loss or gradient, skipped)."""
        return self._skipped_update

    def _last_good(self) -> str:
        last = latest_checkpoint(self.output_dir)
        return f"last good checkpoint: {last}" if last else "no checkpoint was written yet"

    def training_step(self, batch: Any) -> tuple[bool, dict[str, float | torch.Tensor]]:
        """One micro-batch. Returns (an optimizer step happened, metrics); metrics may be device tensors,
        read back once per logging interval (``MetricWindow``)."""
        with self.accelerator.accumulate(self.model):
            loss, metrics = self.compute_loss(self.model, batch)
            self.note_loss(loss)
            self.backward(loss)
            stepped = self.accelerator.sync_gradients
            if stepped:
                gn = self.optimizer_step()
                if self.last_update_skipped:
                    return False, {}
                if gn is not None:
                    metrics["grad_norm"] = gn.detach()
        metrics.setdefault("loss", loss.detach())
        return stepped, metrics

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, float]:
        cfg = self.config
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume_from_checkpoint:
            self.resume(Path(cfg.resume_from_checkpoint))
        elif cfg.resume:
            self.resume()
        acc.init_trackers("tb", config=_flat_scalars(self.run_config)) if acc.log_with else None
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc=f"train {self.method_name}",
                   unit="step", disable=not (cfg.progress_bar and acc.is_local_main_process), dynamic_ncols=True)
        window = MetricWindow()
        shown: dict[str, str] = {}  # the progress bar's postfix
        t0 = time.time()
        final_metrics: dict[str, float] = {}
        self.model.train()
        while self.state.global_step < self.total_steps:
            self.sampler.use_epoch(self.state.epoch)
            loader = self.train_loader
            if self.state.batches_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, self.state.batches_in_epoch)
            for batch in loader:
                stepped, metrics = self.training_step(batch)
                self.state.batches_in_epoch += 1
                window.add(metrics)
                extra = self.progress_postfix(metrics)
                if extra:
                    shown.update(extra)
                    bar.set_postfix(shown)
                if not stepped:
                    continue
                self.state.global_step += 1
                bar.update(1)
                step = self.state.global_step
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    logs = window.means()  # the interval's one host read of the metrics
                    logs.update(lr=self.scheduler.get_last_lr()[0], epoch=self.state.epoch,
                                elapsed_s=round(time.time() - t0, 2))
                    self.log(logs)
                    shown.update({k: f"{logs[k]:.4g}" for k in ("loss", "reward", "accuracy") if k in logs})
                    bar.set_postfix(shown)
                    window = MetricWindow()
                if self.evaluator is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < self.total_steps:
                    self.evaluate()
                if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < self.total_steps:
                    self.save_checkpoint()
                if step >= self.total_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                continue
            break
        bar.close()
        if self.evaluator is not None:
            final_metrics = self.evaluate()
        self.save_checkpoint()
        if cfg.export_final:
            self.export(self.output_dir / "final")
        acc.wait_for_everyone()
        acc.end_training()
        return final_metrics

    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        metrics = self.evaluator(self) if self.evaluator else {}
        self.model.train(was_training)
        if metrics:
            self.log({f"eval/{k}": v for k, v in metrics.items()})
            if self.accelerator.is_main_process:
                from tqdm.auto import tqdm

                # printed (above the progress bar), not only written to logs.jsonl
                tqdm.write(f"eval at step {self.state.global_step}/{self.total_steps}: " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ logging
    def log(self, metrics: dict[str, float]) -> None:
        step = self.state.global_step
        acc = self.accelerator
        if acc.log_with:
            acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if acc.is_main_process:  # logs.jsonl is always written, whatever report_to says
            if self._jsonl is None:
                self._jsonl = open(self.output_dir / LOG_FILE, "a", buffering=1)
            record = {"step": step, "optimizer_steps": self.state.optimizer_steps, "method": self.method_name,
                      **_round(metrics)}
            # strict JSON: a non-finite value is written as null (see _round)
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")

    def export(self, path: Path) -> None:
        """Export the trained model (transformers format) and tokenizer; auxiliary modules are left out."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model) if acc.distributed_type.value in ("FSDP", "DEEPSPEED") else None
        if self.fsdp_direct:
            state_dict = fsdp.full_model_state_dict(self.model)
        if acc.is_main_process:
            self.unwrapped.save_pretrained(path, self.tokenizer, merge_lora=self.config.merge_lora_on_export,
                                           state_dict=state_dict)
        acc.wait_for_everyone()


def _round(value: Any) -> Any:
    """Round floats for the log; NaN and infinities become None (JSON null: logs.jsonl stays strict JSON)."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    return value


def _flat_scalars(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    from ..config import to_dict

    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                out[f"{prefix}{k}"] = v
            else:
                out[f"{prefix}{k}"] = str(v)

    walk(to_dict(cfg), "")
    return out

