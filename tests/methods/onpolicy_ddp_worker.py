"""Run by test_onpolicy_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Rank 0's verifier accepts everything, rank 1's nothing, so rank 1 keeps resampling while rank 0
has nothing left to sample, and rank 1 trains on no trajectory while rank 0 does. Each rank writes
its step count, the number of forward passes it ran and a fingerprint of its weights.

    torchrun --nproc_per_node 2 onpolicy_ddp_worker.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from dlmdistill.methods.diffu_grpo import DiffuGRPOConfig, DiffuGRPOTrainer  # noqa: E402
from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDTrainer  # noqa: E402
from dlmdistill.models import char_tokenizer  # noqa: E402
from dlmdistill.sampling import GenerationConfig  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.methods.stubs import StubTask, items_for, stub_examples, training_config  # noqa: E402

GEN = GenerationConfig(gen_length=16, steps=8, block_length=4, temperature=1.0, batch_size=2)


def train(name: str, out: Path, rank: int, last: bool) -> dict:
    tok = char_tokenizer(["0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:\n"])
    examples = stub_examples(8)
    model, tok = tiny_model(tok, seed=0)
    calls = [0]
    model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    cfg = training_config(out / name, per_device_train_batch_size=2, save_steps=0, max_steps=2)
    common = dict(task=StubTask(lambda i, c: float(rank == 0)), examples=examples, accelerator=Accelerator(cpu=True))
    items = items_for(examples, tok, GEN.gen_length)
    if name == "dopsd":
        method = DOPSDConfig(rollout=GEN, pass_k=3, micro_batch_size=3)
        trainer = DOPSDTrainer(model.train(), tok, items, cfg, method=method, **common)
    else:
        method = DiffuGRPOConfig(rollout=GEN, num_generations=2, num_iterations=2, micro_batch_size=3)
        trainer = DiffuGRPOTrainer(model.train(), tok, items, cfg, method=method, **common)
    if not last:  # keep the process group for the next run
        trainer.accelerator.end_training = lambda: None
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
    return {"world": trainer.accelerator.num_processes, "step": trainer.state.global_step, "forwards": calls[0],
            "sum": flat.double().sum().item(), "tail": flat[-8:].tolist()}


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    report = {name: train(name, Path(out), rank, last=name == "grpo") for name in ("dopsd", "grpo")}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
