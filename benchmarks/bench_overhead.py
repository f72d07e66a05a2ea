"""The trainer's overhead: one ``Trainer.training_step`` against a bare PyTorch loop doing the same work.

Both sides train a copy of the same model on the same collated batch with the method's own loss function
(``diffusion_batch_loss`` for SFT, ``selffusion_batch_loss`` for SelfFusion, metrics included), AdamW with
the same learning rate and weight-decay groups, and gradient-norm clipping at 1.0:

* bare: ``loss, _ = loss_fn(model, batch); loss.backward(); clip_grad_norm_; opt.step(); opt.zero_grad()``;
* trainer: ``trainer.training_step(batch)`` (Accelerate's accumulation context, the non-finite guards, the
  schedule, the metrics) plus the loop's per-step bookkeeping, logging every 100 steps.

Blocks of steps are interleaved and timed in process CPU time (single-threaded by default; far steadier
than wall time on a shared machine); the ratio of the medians is printed per method and preset. The target
is at most 1.10x.

    PYTHONPATH=src python benchmarks/bench_overhead.py [--presets tiny small] [--steps 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dlmdistill.data import DiffusionCollator
from dlmdistill.methods.selffusion import SelfFusionConfig, SelfFusionTrainer, selffusion_batch_loss
from dlmdistill.methods.sft import SFTTrainer, diffusion_batch_loss
from dlmdistill.models import ModelConfig, build_model, train_bpe_tokenizer
from dlmdistill.training import TrainingConfig
from dlmdistill.training.trainer import _decay_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selffusion import make_batch  # noqa: E402  (the same random batch as the SelfFusion benchmark)


def cpu_seconds(fn: Callable[[], None], steps: int) -> float:
    t0 = time.process_time()
    for _ in range(steps):
        fn()
    return (time.process_time() - t0) / steps


def measure(method: str, preset: str, *, batch: int, prompt_len: int, response_len: int, steps: int,
            repeats: int, out_dir: str) -> dict[str, Any]:
    tok = train_bpe_tokenizer(["0123456789 +-*/()=<>abcdefghijklmnopqrstuvwxyz"] * 4, vocab_size=512)
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(name_or_path=f"preset:{preset}"), tokenizer=tok)
    bare_model = copy.deepcopy(model).train()
    data = make_batch(tok, batch, prompt_len, response_len)
    lr, wd = 1e-4, 0.0
    cfg = TrainingConfig(output_dir=out_dir, per_device_train_batch_size=batch, learning_rate=lr, weight_decay=wd,
                         lr_scheduler_type="constant", warmup_ratio=0.0, max_grad_norm=1.0, logging_steps=100,
                         progress_bar=False, report_to=["jsonl"], save_steps=0, export_final=False,
                         max_steps=10 ** 6)
    collate = DiffusionCollator(tok.pad_token_id, tok.eos_token_id)
    items = [{"prompt_ids": [11] * prompt_len, "response_ids": [12] * response_len}] * batch
    if method == "sft":
        trainer = SFTTrainer(model.train(), tok, items, cfg, collate_fn=collate)

        def bare_loss() -> torch.Tensor:
            return diffusion_batch_loss(bare_model, data, mask_id=bare_model.mask_id)[0]
    else:
        sf = SelfFusionConfig(uncalibrated_diagnostics_every=0)
        trainer = SelfFusionTrainer(model.train(), tok, items, cfg, collate_fn=collate, method=sf)
        bare_model.add_calibration()

        def bare_loss() -> torch.Tensor:
            return selffusion_batch_loss(bare_model, bare_model, data, sf, calibrated=True).loss
    opt = torch.optim.AdamW(_decay_groups(bare_model, wd), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_epsilon)

    def bare_step() -> None:
        bare_loss().backward()
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def trainer_step() -> None:  # training_step and what the loop does around it on a non-logging step
        stepped, metrics = trainer.training_step(data)
        trainer.state.batches_in_epoch += 1
        if stepped:
            trainer.state.global_step += 1

    for fn in (bare_step, trainer_step):  # warm-up
        cpu_seconds(fn, 2)
    bare, train = [], []
    for _ in range(repeats):
        bare.append(cpu_seconds(bare_step, steps))
        train.append(cpu_seconds(trainer_step, steps))
    b, t = statistics.median(bare), statistics.median(train)
    return {"method": method, "preset": preset, "bare_ms": 1000 * b, "trainer_ms": 1000 * t, "ratio": t / b,
            "bare_min_ms": 1000 * min(bare), "trainer_min_ms": 1000 * min(train)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--methods", nargs="+", default=["sft", "selffusion"], choices=["sft", "selffusion"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--response_len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks per side (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            for method in a.methods:
                rows.append(measure(method, preset, batch=a.batch, prompt_len=a.prompt_len,
                                    response_len=a.response_len, steps=a.steps, repeats=a.repeats,
                                    out_dir=f"{tmp}/{preset}-{method}"))
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"batch {a.batch}, {a.prompt_len}+{a.response_len} tokens, {a.threads} thread(s), medians of "
              f"{a.repeats} blocks of {a.steps} steps (process CPU time)\n")
        print("| method | preset | bare loop (ms/step) | trainer (ms/step) | trainer / bare |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['preset']} | {r['bare_ms']:.1f} | {r['trainer_ms']:.1f} | {r['ratio']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
