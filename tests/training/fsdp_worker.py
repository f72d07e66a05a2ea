"""Run by test_fsdp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo) with ``ACCELERATE_USE_FSDP=true``;
the offline runs are also called in-process (one process, twice the batch) as the reference.

    torchrun --nproc_per_node 2 fsdp_worker.py offline OUT_DIR     # SFT and SelfFusion, FSDP2
    torchrun --nproc_per_node 2 fsdp_worker.py onpolicy OUT_DIR    # d-OPSD and diffu-GRPO, DDP then FSDP2

Offline runs draw their masking noise from the global RNG, which each rank seeds differently
(``set_seed(device_specific=True)``), so a 2-process run and a 1-process run of the same global batch
would mask different tokens. ``Pinned`` fixes that for the comparison: it splits the global batch
into the two per-rank halves (a rank holds one, the single process both), seeds the noise of each
half from (step, half) alone, and averages the two halves' losses, which is what data-parallel
gradient averaging computes. Everything else (model, optimizer, schedule, clipping, data order) is
the production code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dlmdistill.data import DiffusionCollator  # noqa: E402
from dlmdistill.methods.onpolicy import seed_from  # noqa: E402
from dlmdistill.methods.selffusion import SelfFusionConfig, SelfFusionTrainer  # noqa: E402
from dlmdistill.methods.sft import SFTTrainer  # noqa: E402
from dlmdistill.models import char_tokenizer  # noqa: E402
from dlmdistill.sampling import GenerationConfig, generate  # noqa: E402
from dlmdistill.training import TrainingConfig  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.methods.test_sft import reverse_items  # noqa: E402

CHARS = "0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:\n"
GLOBAL_BATCH = 8
STEPS = 4
SAMPLE = GenerationConfig(gen_length=8, steps=4, block_length=4, temperature=1.0, batch_size=2)


def pinned(base: type) -> type:
    class Pinned(base):
        def compute_loss(self, model, batch):
            world = self.accelerator.num_processes
            halves = 2 // world  # per-rank halves of the global batch held by this process
            size = len(batch) // halves
            losses, metrics = [], {}
            for j in range(halves):
                part = batch[j * size:(j + 1) * size]
                torch.manual_seed(seed_from("pinned", self.state.global_step, self.accelerator.process_index * halves + j))
                loss, metrics = super().compute_loss(model, self.collate(part))
                losses.append(loss)
            return sum(losses) / len(losses), metrics

    Pinned.__name__ = f"Pinned{base.__name__}"
    return Pinned


def offline_trainer(method: str, out: Path, world: int, **kw):
    tok = char_tokenizer([CHARS])
    model, tok = tiny_model(tok, seed=0)
    cfg = TrainingConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
                         learning_rate=3e-3, warmup_steps=1, max_grad_norm=0.5, progress_bar=False,
                         report_to=["jsonl"], logging_steps=1, save_steps=1, save_total_limit=0, **kw)
    items = reverse_items(tok, 16)
    if method == "sft":
        trainer = pinned(SFTTrainer)(model.train(), tok, items, cfg, collate_fn=list)
    else:
        trainer = pinned(SelfFusionTrainer)(model.train(), tok, items, cfg, collate_fn=list,
                                            method=SelfFusionConfig(uncalibrated_diagnostics_every=2))
    trainer.collate = DiffusionCollator(tok.pad_token_id, tok.eos_token_id)
    return trainer


def sample(trainer) -> list[list[list[int]]]:
    """Samples for two prompts through the model (the sharded one under FSDP: every rank calls), without
    and with the dual key/value cache."""
    tok = trainer.tokenizer
    prompts = [tok("abcde=", add_special_tokens=False).input_ids, tok("fedcb=", add_special_tokens=False).input_ids]
    return [generate(trainer.unwrapped, prompts, dataclasses.replace(SAMPLE, cache=cache),
                     generator=torch.Generator().manual_seed(0), forward=trainer.sampling_forward).responses.tolist()
            for cache in ("none", "dual")]


def offline(method: str, out: Path, world: int) -> dict:
    """Train STEPS steps (a checkpoint after every step), export; then resume from step 1 into a second
    folder and train to STEPS again. Returns what the test compares."""
    trainer = offline_trainer(method, out / "full", world)
    trainer.accelerator.end_training = lambda: None  # keep the process group for the runs that follow
    trainer.train()
    report = {"samples": sample(trainer), "fsdp": getattr(trainer, "fsdp_direct", False),
              "local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                 for p in trainer.model.parameters()),
              "numel": sum(p.numel() for p in trainer.model.parameters()),
              "grad_norms": [r.get("grad_norm") for r in map(json.loads, open(out / "full" / "logs.jsonl"))]
              if trainer.accelerator.is_main_process else None}
    resumed = offline_trainer(method, out / "resumed", world,
                              resume_from_checkpoint=str(out / "full" / "checkpoints" / "step-0000001"))
    resumed.accelerator.end_training = lambda: None
    resumed.train()
    report["resumed_samples"] = sample(resumed)
    return report


def nonfinite_guard(out: Path) -> dict:
    """A NaN planted in rank 1's shard of one gradient, at the second step: with nonfinite_grad skip both
    ranks drop that update (the norm is reduced over ranks); with stop both ranks raise."""
    from dlmdistill.training.trainer import NonFiniteLossError

    class Planted(SFTTrainer):
        def backward(self, loss):
            super().backward(loss)
            if self.accelerator.process_index == 1 and (self.state.epoch, self.state.batches_in_epoch) == (0, 1):
                grad = next(self.model.parameters()).grad
                grad.to_local().view(-1)[0] = float("nan")

    report = {}
    for mode in ("skip", "stop"):
        tok = char_tokenizer([CHARS])
        model, tok = tiny_model(tok, seed=0)
        cfg = TrainingConfig(output_dir=str(out / mode), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             progress_bar=False, report_to=["jsonl"], save_steps=1, export_final=False,
                             nonfinite_grad=mode)
        trainer = Planted(model.train(), tok, reverse_items(tok, 16), cfg,
                          collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))
        trainer.accelerator.end_training = lambda: None
        try:
            trainer.train()
            report[mode] = {"step": trainer.state.global_step, "skipped": trainer.state.skipped_steps}
        except NonFiniteLossError as e:
            report[mode] = {"error": str(e), "step": trainer.state.global_step}
    return report


def onpolicy(out: Path, rank: int) -> dict:
    from accelerate import Accelerator

    from dlmdistill.methods.diffu_grpo import DiffuGRPOConfig, DiffuGRPOTrainer
    from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDTrainer
    from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

    gen = GenerationConfig(gen_length=8, steps=4, block_length=4, temperature=1.0, batch_size=2)
    report = {}

    def run(name: str, engine: str, folder: Path, **kw) -> dict:
        os.environ["ACCELERATE_USE_FSDP"] = "true" if engine == "fsdp" else "false"
        tok = char_tokenizer([CHARS])
        examples = stub_examples(8)
        model, tok = tiny_model(tok, seed=0)
        calls = [0]
        model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        cfg = training_config(folder, per_device_train_batch_size=2, save_steps=1, save_total_limit=0, max_steps=3,
                              learning_rate=3e-3, export_final=True, **kw)
        common = dict(task=StubTask(lambda i, c: float((i + len(c)) % 2)), examples=examples,
                      accelerator=Accelerator(cpu=True))
        items = items_for(examples, tok, gen.gen_length)
        if name == "dopsd":
            trainer = DOPSDTrainer(model.train(), tok, items, cfg, method=DOPSDConfig(rollout=gen, pass_k=2,
                                                                                      micro_batch_size=3), **common)
        else:
            trainer = DiffuGRPOTrainer(model.train(), tok, items, cfg, method=DiffuGRPOConfig(
                rollout=gen, num_generations=2, num_iterations=2, micro_batch_size=3), **common)
        trainer.accelerator.end_training = lambda: None
        trainer.train()
        return {"fsdp": trainer.fsdp_direct, "step": trainer.state.global_step, "forwards": calls[0],
                "rollouts": dict(trainer.rollout_counts)}

    for name in ("dopsd", "grpo"):
        report[name] = {
            "ddp": run(name, "ddp", out / name / "ddp"),
            "fsdp": run(name, "fsdp", out / name / "fsdp"),
            "resumed": run(name, "fsdp", out / name / "resumed",
                           resume_from_checkpoint=str(out / name / "fsdp" / "checkpoints" / "step-0000001")),
        }
    return report


def main(mode: str, out: str) -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGTERM, chain=True)  # the launcher stops the other rank: its stack too
    faulthandler.dump_traceback_later(int(os.environ.get("FSDP_WORKER_TIMEOUT", "150")), exit=True)  # a hang: stacks, exit
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if mode == "offline":
        report = {m: offline(m, Path(out) / m, int(os.environ["WORLD_SIZE"])) for m in ("sft", "selffusion")}
        report["guard"] = nonfinite_guard(Path(out) / "guard")
    else:
        report = onpolicy(Path(out), rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
