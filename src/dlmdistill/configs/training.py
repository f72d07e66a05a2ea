"""``TrainingConfig``: optimisation, logging, checkpoints (the loop: ``dlmdistill.training.trainer``, which
re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import check_ranges, field

#: Accelerate's trackers and the package each needs (any one of several; whether it is installed is checked when
#: a run starts, ``training.run_folder.check_trackers_installed``)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",),
            "swanlab": ("swanlab",), "trackio": ("trackio",)}


def check_tracker_names(report_to: list[str]) -> list[str]:
    """``report_to`` checked: every name is ``jsonl`` (always on anyway), ``none`` (alone) or a tracker of
    ``TRACKERS``. Returns the names in lower case; raises ``ValueError`` naming the problem."""
    names = [r.strip().lower() for r in report_to]
    if "none" in names and len(set(names) - {"jsonl"}) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with other trackers, got {report_to}")
    for name in names:
        if name not in ("jsonl", "none") and name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; choose from none, jsonl, {', '.join(TRACKERS)}")
    return names


@dataclass
class TrainingConfig:
    output_dir: str = field("runs/run", help="run folder: config, logs, checkpoints, final model")
    seed: int = field(3407, help="random seed (model init, data order, masking)")
    num_train_epochs: float = field(1.0, help="passes over the training data (ignored when max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps to run (> 0); -1 = train for num_train_epochs")
    per_device_train_batch_size: int = field(16, help="examples (offline methods) or prompts (on-policy) per device")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step (offline methods)")
    learning_rate: float = field(5e-5, help="peak learning rate")
    lr_scheduler_type: str = field("cosine_with_min_lr", help="transformers scheduler name: constant, "
                                   "constant_with_warmup, linear, cosine, cosine_with_min_lr, ...")
    min_lr_ratio: float = field(0.1, help="final LR / peak LR for cosine_with_min_lr (SelfFusion: LR/10)")
    warmup_ratio: float = field(0.05, help="fraction of the steps used for linear warm-up")
    warmup_steps: int = field(0, help="warm-up steps; > 0 overrides warmup_ratio")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"] = field(
        "adamw_torch", help="optimizer (names as in transformers): torch AdamW, its fused kernel (CUDA, and CPU "
        "in recent torch), transformers' Adafactor with a fixed learning rate, or plain SGD")
    weight_decay: float = field(0.1, help="weight decay (not applied to norms and biases)")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.95, help="AdamW beta2")
    adam_epsilon: float = field(1e-8, help="AdamW epsilon")
    max_grad_norm: float = field(1.0, help="gradient clipping norm; 0 = off")
    mixed_precision: Literal["no", "bf16", "fp16"] = field("no", help="autocast precision (on a CPU, autocast "
                                                            "can be much slower than float32: a warning says so)")
    bf16: bool = field(False, help="same as mixed_precision: bf16 (transformers' flag)")
    fp16: bool = field(False, help="same as mixed_precision: fp16 (transformers' flag)")
    logging_steps: int = field(10, help="log every N optimizer steps")
    save_steps: int = field(500, help="checkpoint every N optimizer steps (0 = only at the end)")
    save_total_limit: int = field(2, help="keep at most this many checkpoints (0 = all)")
    eval_steps: int = field(0, help="evaluate every N optimizer steps (0 = only at the end, if an evaluator is set)")
    resume: bool = field(False, help="continue from the latest complete checkpoint in output_dir")
    resume_from_checkpoint: bool | str | None = field(
        None, help="continue from this checkpoint folder (output_dir/checkpoints/step-N, or one of another run's "
        "with the same model and method); true (the flag alone) = the latest in output_dir, as resume")
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"],
                                 help="trackers besides logs.jsonl, which is always written: tensorboard, wandb, "
                                 "mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (any Accelerate "
                                 "tracker, installed), or none")
    progress_bar: bool = field(True, help="show a progress bar")
    dataloader_num_workers: int = field(0, help="DataLoader worker processes")
    export_final: bool = field(True, help="export the final model (transformers format) to output_dir/final")
    merge_lora_on_export: bool = field(True, help="merge LoRA adapters into the exported model")
    static_shapes: bool = field(
        False, help="no data-dependent shapes in a training update, so that it reads the device once (the finiteness "
        "check): SFT, SelfFusion and logit KD apply the LM head at every response position (unmasked ones weighted 0, "
        "about twice the head's rows); d-OPSD at every position of the current block (K_t weighted 1, the rest 0) "
        "with prompts padded once per rollout batch; on-policy rollouts use the sampler's fixed-shape step "
        "(generation.static_shapes); every forward gives SDPA a ready 4-D attention mask (see docs/benchmarks.md)")
    compile: bool = field(False, help="train the model through torch.compile (inductor): the first steps pay the "
                          "compilation; best with static_shapes (fixed shapes compile once, no graph breaks at "
                          "boolean indexing)")
    use_cpu: bool = field(False, help="train on the CPU even when an accelerator is present (multi-process CPU "
                          "runs under torchrun/accelerate launch use gloo automatically when no GPU exists)")
    on_nonfinite_loss: Literal["error", "skip"] = field("error", help="NaN/inf loss: stop with an error, or skip the batch")
    nonfinite_grad: Literal["stop", "skip"] = field(
        "stop", help="NaN/inf gradient norm, checked before every optimizer step: stop with an error naming the "
        "step and the last good checkpoint, or skip the update (no optimizer or schedule step; counted in "
        "skipped_steps). Under fp16 the gradient scaler skips overflowing updates itself; they are counted in "
        "skipped_steps too, without a schedule step")
    overwrite_output_dir: bool = field(
        False, help="allow training into an output_dir that already holds a run (without resume): its "
        "checkpoints/, logs.jsonl, final/, final_metrics.json, eval/, tb/, flops.json and tokenizer/ are "
        "deleted first (checkpoints first, so a stale one can never be resumed); other files are left alone. "
        "Without it such a folder is refused")

    def validate(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be > 0, or -1 to train for num_train_epochs; got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be > 0 when max_steps is -1; got {self.num_train_epochs}")
        check_ranges(self, at_least={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                                     "logging_steps": 1, "learning_rate": 0, "warmup_steps": 0, "weight_decay": 0,
                                     "adam_epsilon": 0, "max_grad_norm": 0, "save_steps": 0, "save_total_limit": 0,
                                     "eval_steps": 0, "dataloader_num_workers": 0},
                     unit={"min_lr_ratio": True, "warmup_ratio": True, "adam_beta1": False, "adam_beta2": False})
        if isinstance(self.resume_from_checkpoint, bool):  # transformers' spelling of resume
            self.resume = self.resume or self.resume_from_checkpoint
            self.resume_from_checkpoint = None
        if (self.resume or self.resume_from_checkpoint) and self.overwrite_output_dir:
            raise ValueError("resume (or resume_from_checkpoint) and overwrite_output_dir exclude each other: pick one")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 exclude each other: pick one")
        for flag in ("bf16", "fp16"):
            if getattr(self, flag):
                if self.mixed_precision not in ("no", flag):
                    raise ValueError(f"{flag}: true contradicts mixed_precision: {self.mixed_precision}")
                self.mixed_precision = flag  # type: ignore[assignment]
        self.report_to = check_tracker_names(self.report_to)
