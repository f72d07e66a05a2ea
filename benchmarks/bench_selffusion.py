"""Cost of one SelfFusion step relative to one SFT step on the same batch and model.

A step is forward + backward + AdamW update, timed without the trainer around it. The paper's
per-iteration cost ratio is 2.0x (Table 2); the target here is <= 2.0x. For reference, SFT on the
batch stacked twice (2B sequences, the size of SelfFusion's single forward) is timed as well.
Steps are interleaved and timed in process CPU time (single-threaded by default), which is far
less sensitive than wall time to other jobs on a shared machine; min and median are printed.
Also printed: the FLOPs estimate ratio (``dlmdistill.flops``) and the activation memory ratio,
measured as the bytes of the tensors autograd saves for backward (unique storages, mean over
masking draws), on any device.

    PYTHONPATH=src python benchmarks/bench_selffusion.py [--preset tiny] [--batch 16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from dlmdistill.data import DiffusionCollator
from dlmdistill.flops import ModelShape, estimate_flops
from dlmdistill.methods.selffusion import SelfFusionConfig, selffusion_batch_loss
from dlmdistill.methods.sft import diffusion_batch_loss
from dlmdistill.models import ModelConfig, build_model, train_bpe_tokenizer


def make_batch(tok, batch: int, prompt_len: int, response_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = 10, len(tok) - 1
    items = [{"prompt_ids": torch.randint(lo, hi, (prompt_len,), generator=g).tolist(),
              "response_ids": torch.randint(lo, hi, (response_len,), generator=g).tolist()} for _ in range(batch)]
    return DiffusionCollator(tok.pad_token_id, tok.eos_token_id)(items)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def cpu_seconds(step: Callable[[], None]) -> float:
    t0 = time.process_time()
    step()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    tok = train_bpe_tokenizer([" ".join(rng.choices(words, k=50)) for _ in range(2000)], vocab_size=args.vocab)
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(name_or_path=f"preset:{args.preset}"), tokenizer=tok)
    model.add_calibration()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(tok, args.batch, args.prompt_len, args.response_len)
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
    sf_cfg = SelfFusionConfig()

    def sft_loss(b: dict[str, torch.Tensor] = batch) -> torch.Tensor:
        return diffusion_batch_loss(model, b, mask_id=model.mask_id)[0]

    def sf_loss(uncal: bool = False) -> torch.Tensor:
        return selffusion_batch_loss(model, model, batch, sf_cfg, calibrated=True, uncalibrated_diagnostics=uncal).loss

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
        return run

    runs = {"sft": step(sft_loss), "sft on 2B sequences": step(lambda: sft_loss(doubled)),
            "selffusion": step(sf_loss), "selffusion + uncal. diag.": step(lambda: sf_loss(True))}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all alike
        for k, fn in runs.items():
            times[k].append(cpu_seconds(fn))
    low = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}

    # masking ratios are random: average the memory over several draws
    mem_sft = statistics.fmean(saved_bytes(sft_loss) for _ in range(args.repeats))
    mem_sf = statistics.fmean(saved_bytes(sf_loss) for _ in range(args.repeats))
    model.zero_grad(set_to_none=True)

    shape = ModelShape.of(model)
    b, length = batch["input_ids"].shape
    resp = int(batch["response_mask"].sum())
    # expected head rows: SFT E[q] = 1/2 of the response; SelfFusion 1/2 (hard) + 1/4 (easy)
    f_sft = estimate_flops(shape, tokens=b * length, head_rows=resp / 2, sum_sq_lengths=b * length ** 2)
    f_sf = estimate_flops(shape, tokens=2 * b * length, head_rows=3 * resp / 4, sum_sq_lengths=2 * b * length ** 2)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model preset:{args.preset} ({n_params / 1e6:.2f}M parameters, vocab {len(tok)}), batch {b} x {length} "
          f"tokens ({args.response_len} response), {args.threads} thread(s), CPU time over {args.repeats} steps")
    for k in runs:
        print(f"  {k:26s} min {low[k] * 1000:7.1f} ms  median {med[k] * 1000:7.1f} ms   ratio to SFT: "
              f"min {low[k] / low['sft']:.2f}x  median {med[k] / med['sft']:.2f}x")
    print(f"  FLOPs estimate ratio       {f_sf / f_sft:.2f}x  (SelfFusion {f_sf / 1e9:.2f} GFLOPs, "
          f"SFT {f_sft / 1e9:.2f})")
    print(f"  saved-activation memory    {mem_sf / mem_sft:.2f}x  (SelfFusion {mem_sf / 2**20:.1f} MiB, "
          f"SFT {mem_sft / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
