"""d-OPSD benchmarks: memory of a step-level update with the LM head only at K_t vs full logits,
and the wall time of a d-OPSD optimizer step vs a diffu-GRPO step with the same number of rollouts.

    python benchmarks/bench_dopsd.py            # prints both tables
    python benchmarks/bench_dopsd.py --quick    # smaller, for a smoke run

Memory. One micro-batch of step states (student + teacher forward, divergence at K_t, backward)
of a small Llama (hidden 64) with a 32,000-token vocabulary and 256 generated tokens. Measured as
the peak of PyTorch's tensor memory during the forward and backward minus its value before
(the torch profiler's memory timeline on CPU: every tensor the CPU allocator hands out,
activations, logits, gradients; not Python objects or allocator caching); with CUDA,
``torch.cuda.max_memory_allocated`` over the same span. The optimizer step is excluded: it is the
same for both. "Full logits" is what the reference code does: logits at every position of
student and teacher, then a gather at K_t.

Time. The same number of rollouts for both methods: B prompts x k samples. d-OPSD with pass@k and
a verifier that accepts only the k-th attempt (its worst case: k rollouts per prompt, B
trajectories trained, one optimizer step); diffu-GRPO with k completions per prompt and mu = 1
(one optimizer step) or mu = 12 (d1's setting: 12 optimizer steps on the same rollouts). For
reference, d-OPSD's best case (every first attempt accepted: B rollouts). Medians over repeats,
the setups interleaved; rollout time reported separately.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dlmdistill.losses.divergences import distillation_divergence
from dlmdistill.methods import onpolicy
from dlmdistill.methods.diffu_grpo import DiffuGRPOConfig, DiffuGRPOTrainer
from dlmdistill.methods.dopsd import (DOPSDConfig, DOPSDTrainer, StepStates, confident_positions,
                                      flatten_trajectories, self_future_teacher_states, step_logits)
from dlmdistill.models import ModelConfig, build_model
from dlmdistill.models.tokenizer import char_tokenizer
from dlmdistill.sampling import GenerationConfig, generate
from dlmdistill.tasks.base import Example, Task
from dlmdistill.training import TrainingConfig

from measure import bench_args, peak_bytes


def small_model(vocab: int, hidden: int, device: str):
    tok = char_tokenizer(["0123456789abcdefghijklmnopqrstuvwxyz +-*/()=:\n<>"])
    torch.manual_seed(0)
    arch = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": 2, "num_attention_heads": 4}
    model, tok = build_model(ModelConfig(preset_overrides=arch), tokenizer=tok)
    if vocab > model.vocab_size:
        model.hf_model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.to(device), tok


# ------------------------------------------------------------------------------------ memory
def full_logits_step(model, steps: StepStates, prompt: list[int], pad_id: int) -> None:
    """The reference code's way: logits at every position for student and teacher, then gather."""
    n = len(steps)
    s_ids, s_attn, p = onpolicy.prompt_and_response_inputs([prompt] * n, steps.states, pad_id)
    t_ids, t_attn, _ = onpolicy.prompt_and_response_inputs([prompt] * n, steps.teacher, pad_id)
    with torch.no_grad():
        teacher_all = model(t_ids, t_attn)[:, p:]                     # [n, G, V]
    chosen = confident_positions(teacher_all[steps.candidates], steps.candidates, steps.k)
    student_all = model(s_ids, s_attn)[:, p:]                         # [n, G, V] with grad
    div = distillation_divergence(student_logits=student_all[chosen], teacher_logits=teacher_all[chosen]).divergence
    div.sum().backward()


def head_at_k_step(model, steps: StepStates, prompt: list[int], pad_id: int) -> None:
    """dlmdistill's way: the head only at the teacher's candidates (no grad) and the student's K_t."""
    fn = lambda ids, attn, pos: model(ids, attn, positions=pos)  # noqa: E731

    def teacher(ids, attn, pos):
        with torch.no_grad():
            return fn(ids, attn, pos)
    out = step_logits(fn, teacher, steps, [prompt] * len(steps), [prompt] * len(steps), pad_id=pad_id)
    distillation_divergence(student_logits=out.student, teacher_logits=out.teacher).divergence.sum().backward()


def bench_memory(device: str, vocab: int, gen_length: int, states: int) -> list[str]:
    model, tok = small_model(vocab, 64, device)
    model.train()
    cfg = GenerationConfig(gen_length=gen_length, steps=gen_length // 2, block_length=32, temperature=1.0)
    prompt = tok("numbers: 12 34 56 target: 78\n").input_ids
    prompt = (prompt * 4)[:32]
    g = torch.Generator(device=device).manual_seed(0)
    out = generate(model, [prompt], cfg, generator=g, return_trajectory=True)
    steps = flatten_trajectories(out.trajectory, [0], block_length=32, mask_id=model.mask_id)
    steps.teacher = self_future_teacher_states(steps.states, out.responses[steps.rows], out.trajectory.block[steps.step],
                                               block_length=32, mask_id=model.mask_id, rho=0.25, generator=g)
    # states spread over the whole trajectory (early, middle, late blocks)
    part = steps.part(torch.linspace(0, len(steps) - 1, states).long().to(steps.rows.device))
    rows = [f"| one micro-batch of {states} step states ({vocab:,} vocab, {gen_length} generated + 32 prompt "
            f"tokens, hidden 64) | peak tensor memory (MB) |", "|---|---:|"]
    res = {}
    for label, fn in [("full logits at every position (reference code)", full_logits_step),
                      ("LM head at teacher candidates + K_t (dlmdistill)", head_at_k_step)]:
        model.zero_grad(set_to_none=True)
        fn(model, part, prompt, model.pad_id)  # warm-up (and gradient buffers)
        model.zero_grad(set_to_none=True)
        res[label] = peak_bytes(lambda: fn(model, part, prompt, model.pad_id), device)
        rows.append(f"| {label} | {res[label] / 2**20:,.0f} |")
    full, ours = res.values()
    rows.append(f"| ratio dlmdistill / full | {ours / full:.3f} |")
    return rows


# ------------------------------------------------------------------------------------ time
class AcceptAtAttempt(Task):
    """Accepts a prompt's k-th completion only (counts calls per example)."""

    name, metric = "bench", "accuracy"

    def __init__(self, k: int):
        self.k, self.calls = k, defaultdict(int)

    def score(self, example: Example, completion: str) -> float:
        self.calls[example.meta["i"]] += 1
        return float(self.calls[example.meta["i"]] % self.k == 0)


class RolloutClock:
    """Wraps a trainer's ``rollout`` to add up the time spent sampling."""

    def __init__(self, trainer):
        self.spent, self.original = 0.0, trainer.rollout
        trainer.rollout = self

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.spent += time.perf_counter() - t


def bench_time(device: str, prompts: int, k: int, gen_length: int, repeats: int) -> list[str]:
    gen = GenerationConfig(gen_length=gen_length, steps=gen_length // 2, block_length=16, temperature=1.0,
                           batch_size=prompts * k)
    examples = [Example(prompt=f"numbers: {i} {i + 7} {i + 3} target: {3 * i + 10}\n", meta={"i": i})
                for i in range(prompts)]
    setups = {  # label: (trainer class, method config, attempt at which the verifier accepts)
        f"d-OPSD, pass@{k}, accepted at attempt {k} ({prompts * k} rollouts)":
            (DOPSDTrainer, DOPSDConfig(rollout=gen, pass_k=k, micro_batch_size=32), k),
        "diffu-GRPO, mu = 1 (same rollouts, 1 optimizer step)":
            (DiffuGRPOTrainer, DiffuGRPOConfig(rollout=gen, num_generations=k, num_iterations=1,
                                               micro_batch_size=32), k),
        "diffu-GRPO, mu = 12 (d1; same rollouts, 12 optimizer steps)":
            (DiffuGRPOTrainer, DiffuGRPOConfig(rollout=gen, num_generations=k, num_iterations=12,
                                               micro_batch_size=32), k),
        f"d-OPSD, pass@{k}, accepted at attempt 1 ({prompts} rollouts)":
            (DOPSDTrainer, DOPSDConfig(rollout=gen, pass_k=k, micro_batch_size=32), 1),
    }
    trainers = {}
    with tempfile.TemporaryDirectory() as out:
        for i, (label, (cls, method, accept_at)) in enumerate(setups.items()):
            cfg = TrainingConfig(output_dir=str(Path(out) / str(i)), per_device_train_batch_size=prompts,
                                 report_to=[], progress_bar=False, export_final=False, max_steps=1)
            model, tok = small_model(0, 128, device)
            items = onpolicy.prompt_items(examples, tok, gen_length=gen_length)
            trainer = cls(model.train(), tok, items, cfg, task=AcceptAtAttempt(accept_at), examples=examples,
                          method=method)
            trainers[label] = (trainer, RolloutClock(trainer), [trainer.train_dataset[j] for j in range(prompts)])
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in trainers}
        for r in range(repeats + 1):  # interleaved, so all see the same machine load; round 0 warms up
            for label, (trainer, clock, batch) in trainers.items():
                clock.spent = 0.0
                t = time.perf_counter()
                stepped, _ = trainer.training_step(batch)
                assert stepped
                if r:
                    times[label].append((time.perf_counter() - t, clock.spent))
    res = {label: (statistics.median(s for s, _ in v), statistics.median(r for _, r in v))
           for label, v in times.items()}
    base = list(res.values())[1][0]
    rows = [f"| {prompts} prompts, {gen_length} tokens, {gen_length // 2} steps, hidden 128, median of {repeats} | "
            f"one rollout batch (s) | of which rollouts (s) | update (s) | optimizer steps | time / diffu-GRPO "
            f"mu=1 step |", "|---|---:|---:|---:|---:|---:|"]
    for label, (step, roll) in res.items():
        cls, method, _ = setups[label]
        n_steps = method.num_iterations if cls is DiffuGRPOTrainer else 1
        rows.append(f"| {label} | {step:.2f} | {roll:.2f} | {step - roll:.2f} | {n_steps} | {step / base:.2f} |")
    return rows


def main() -> None:
    a = bench_args(__doc__)
    print("\n".join(bench_memory(a.device, 32000, 256, 4 if a.quick else 8)), "\n")
    print("\n".join(bench_time(a.device, 2 if a.quick else 4, 4 if a.quick else 8, 32 if a.quick else 64,
                               2 if a.quick else 5)))


if __name__ == "__main__":
    main()
