"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: a short SFT run, then each rank
writes a fingerprint of its weights so the test can check they are identical."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dlmdistill.data import DiffusionCollator  # noqa: E402
from dlmdistill.methods.sft import SFTTrainer  # noqa: E402
from dlmdistill.models import char_tokenizer  # noqa: E402
from dlmdistill.training import TrainingConfig  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.methods.test_sft import reverse_items  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = char_tokenizer(["0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:\n"])
    model, tok = tiny_model(tok, seed=0)
    cfg = TrainingConfig(output_dir=out, max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3,
                         progress_bar=False, report_to=["jsonl"], save_steps=3, export_final=False)
    trainer = SFTTrainer(model.train(), tok, reverse_items(tok, 64), cfg,
                         collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))
    trainer.train()
    acc = trainer.accelerator
    flat = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps({
        "world": acc.num_processes, "type": str(acc.distributed_type), "sum": flat.double().sum().item(),
        "first": flat[:16].tolist(), "changed": bool((flat != 0).any()),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
