"""Foundation benchmarks: SFT and sampling throughput, sampler vs LLaDA's own loop, and what
computing the LM head only at masked positions saves at a 32k vocabulary.

    python benchmarks/bench_foundation.py            # prints tables of tokens/s and ratios
    python benchmarks/bench_foundation.py --quick    # smaller, for a smoke run

Memory is the peak tensor memory of a forward + backward (``measure.peak_bytes``: the torch
profiler's memory timeline on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Times are medians
over repeats after a warm-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dlmdistill.diffusion import forward_process
from dlmdistill.losses.diffusion import masked_diffusion_loss
from dlmdistill.models import ModelConfig, build_model
from dlmdistill.models.tokenizer import char_tokenizer
from dlmdistill.sampling import GenerationConfig, generate

from measure import bench_args, median_time, peak_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.llada_reference import llada_generate  # noqa: E402  (LLaDA's generate(), the tests' oracle)

SIZES = {
    "tiny (0.5M)": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small (6M)": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8},
}


def model_of(arch: dict, vocab: int, device: str):
    tok = char_tokenizer(["0123456789abcdefghijklmnopqrstuvwxyz"])
    torch.manual_seed(0)
    m, _ = build_model(ModelConfig(preset_overrides=arch), tokenizer=tok)
    if vocab > m.vocab_size:  # enlarge the vocabulary for the head benchmark
        m.hf_model.resize_token_embeddings(vocab, mean_resizing=False)
    return m.to(device)


def sft_step(model, ids, resp, full_logits: bool):
    noised = forward_process(ids, resp, model.mask_id)
    if full_logits:
        logits = model(noised.noisy_ids)[noised.masked]
    else:
        logits = model(noised.noisy_ids, positions=noised.masked)
    w = (1.0 / noised.p_mask)[:, None].expand_as(noised.masked)[noised.masked] / resp.sum()
    loss = masked_diffusion_loss(logits, ids[noised.masked], w)
    loss.backward()
    model.zero_grad(set_to_none=True)


def bench_sft(device: str, batch: int, length: int, repeats: int) -> list[str]:
    rows = ["| model | SFT step (tokens/s) |", "|---|---:|"]
    for name, arch in SIZES.items():
        m = model_of(arch, 0, device).train()
        ids = torch.randint(5, m.vocab_size, (batch, length), device=device)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        resp[:, length // 4:] = True
        t = median_time(lambda: sft_step(m, ids, resp, False), repeats)
        rows.append(f"| {name} | {batch * length / t:,.0f} |")
    return rows


def bench_sampling(device: str, batch: int, prompt: int, gen: int, steps: int, repeats: int, vocab: int) -> list[str]:
    rows = [f"| model ({vocab:,} vocab, {batch} prompts, {gen} tokens, {steps} steps) | ours (tokens/s) | "
            "LLaDA's loop (tokens/s) | time ratio ours / LLaDA |", "|---|---:|---:|---:|"]
    cfg = GenerationConfig(gen_length=gen, steps=steps, block_length=gen // 4)
    for name, arch in SIZES.items():
        m = model_of(arch, vocab, device).eval()
        p = torch.randint(5, m.vocab_size, (batch, prompt), device=device)
        record = []  # the same greedy states at every step
        final = llada_generate(m, p, cfg, record=record)
        out = generate(m, p, cfg, return_trajectory=True)
        assert torch.equal(out.trajectory.states, torch.stack(record)[:, :, prompt:])
        assert torch.equal(out.sequences, final)
        ours = median_time(lambda: generate(m, p, cfg), repeats)
        plain = median_time(lambda: llada_generate(m, p, cfg), repeats)
        rows.append(f"| {name} | {batch * gen / ours:,.0f} | {batch * gen / plain:,.0f} | {ours / plain:.2f} |")
    return rows


def bench_head(device: str, batch: int, length: int, vocab: int, repeats: int) -> list[str]:
    """SFT step with the LM head at every position vs only at the masked ones. The saving is the
    logits' share of the step, so it is shown for a head-dominated (tiny body) and a larger body."""
    rows = [f"| model, LM head ({vocab:,} vocab, batch {batch}x{length}) | step time (s) | peak tensor memory (MB) |",
            "|---|---:|---:|"]
    for name, arch in SIZES.items():
        m = model_of(arch, vocab, device).train()
        ids = torch.randint(5, vocab, (batch, length), device=device)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        resp[:, length // 4:] = True
        res = {}
        for label, full in [("all positions", True), ("masked positions only", False)]:
            torch.manual_seed(0)
            t = median_time(lambda: sft_step(m, ids, resp, full), repeats)
            torch.manual_seed(0)
            mem = peak_bytes(lambda: sft_step(m, ids, resp, full), device)
            res[label] = (t, mem)
            rows.append(f"| {name}, {label} | {t:.3f} | {mem / 2**20:,.0f} |")
        (tf, mf), (tm, mm) = res["all positions"], res["masked positions only"]
        rows.append(f"| {name}, ratio masked / all | {tm / tf:.2f} | {mm / mf:.2f} |")
    return rows


def main() -> None:
    a = bench_args(__doc__)
    reps = 2 if a.quick else 5
    print("\n".join(bench_sft(a.device, 16 if a.quick else 64, 128, reps)), "\n")
    print("\n".join(bench_sampling(a.device, 8 if a.quick else 32, 32, 64, 32, reps, 32000)), "\n")
    print("\n".join(bench_head(a.device, 8 if a.quick else 16, 256, 32000, reps)))


if __name__ == "__main__":
    main()
