"""Fast decoding: key/value caching (none / prefix / dual) and threshold parallel decoding.

    python benchmarks/bench_decoding.py                 # two model sizes, generation length 256, blocks of 32
    python benchmarks/bench_decoding.py --quick         # batch 1, 64 steps, one repeat: a smoke run on a CPU
    python benchmarks/bench_decoding.py --model RUN_OR_PATH --tasks sudoku countdown --limit 200
                                                        # + accuracy of a trained model per setting

Per setting: tokens/s (generated tokens over wall time, median over repeats after a warm-up),
model forwards per sample (``GenerationOutput.forwards``) and the throughput ratio to the uncached
sampler at the same schedule (``cache: none``, no threshold). The random-weight models measure
speed only: their confidences stay far below 0.9, so threshold decoding commits one token per step
there (its forward count is the number of generated tokens). Accuracy is measured only with
``--model`` (a trained checkpoint; its table times one pass over the examples per setting, without
a warm-up); ``--step_time`` also times one d-OPSD and one diffu-GRPO training step (tiny preset)
with cached rollouts against uncached ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlmdistill.models import ModelConfig, build_model, count_parameters  # noqa: E402
from dlmdistill.models.tokenizer import char_tokenizer  # noqa: E402
from dlmdistill.sampling import GenerationConfig, decode_responses, generate  # noqa: E402

SIZES = {
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8},
    "base": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8},
}
SETTINGS = [("none", None), ("prefix", None), ("dual", None), ("none", 0.9), ("prefix", 0.9), ("dual", 0.9)]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1, 64 steps, one repeat")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--gen_length", type=int, default=256)
    ap.add_argument("--block_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="schedule steps (default: gen_length; --quick: 64)")
    ap.add_argument("--prompt_length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=None, help="prompts per batch (default 8; --quick: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; --quick: 1)")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--model", default=None, help="a trained checkpoint (run folder or path) for accuracy")
    ap.add_argument("--tasks", nargs="+", default=["sudoku", "countdown"])
    ap.add_argument("--task_kwargs", type=json.loads, default={}, help="task options as JSON, the ones the model "
                    "was trained with, e.g. '{\"reasoning\": false}'")
    ap.add_argument("--limit", type=int, default=200, help="held-out examples per task")
    ap.add_argument("--task_gen_length", type=int, default=None, help="gen_length for the accuracy runs "
                    "(default --gen_length)")
    ap.add_argument("--step_time", action="store_true", help="also time d-OPSD / diffu-GRPO steps")
    ap.add_argument("--no_speed", action="store_true", help="skip the throughput tables")
    a = ap.parse_args()
    a.steps = a.steps or (64 if a.quick else a.gen_length)
    a.batch = a.batch or (1 if a.quick else 8)
    a.repeats = a.repeats or (1 if a.quick else 3)
    print(f"device: {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    return a


def timed(fn, repeats: int, warmup: bool = True):
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def label(cache: str, threshold: float | None) -> str:
    return f"{cache}" + (f" + threshold {threshold}" if threshold is not None else "")


def bench_speed(a) -> None:
    tok = char_tokenizer(["0123456789abcdefghijklmnopqrstuvwxyz"])
    g = torch.Generator().manual_seed(0)
    print(f"## Throughput (gen_length {a.gen_length}, block {a.block_length}, schedule {a.steps} steps, "
          f"prompt {a.prompt_length} tokens, batch {a.batch}, greedy, random weights, median of {a.repeats}"
          f"{'' if a.quick else ' after a warm-up'})\n")
    if a.quick:  # one short warm-up per process instead of one per setting
        torch.manual_seed(0)
        warm, _ = build_model(ModelConfig(preset_overrides=SIZES["small"]), tokenizer=tok)
        for cache in ("none", "prefix", "dual"):
            generate(warm.to(a.device), torch.randint(5, 30, (1, 8)), GenerationConfig(gen_length=8, steps=2,
                                                                                       cache=cache))
    for name in a.sizes:
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(preset_overrides=SIZES[name]), tokenizer=tok)
        model = model.to(a.device).eval()
        prompts = torch.randint(5, len(tok), (a.batch, a.prompt_length), generator=g).to(a.device)
        base_cfg = GenerationConfig(gen_length=a.gen_length, steps=a.steps, block_length=a.block_length,
                                    batch_size=a.batch)
        print(f"### {name}: {count_parameters(model) / 1e6:.1f}M parameters\n")
        print("| setting | tokens/s | forwards per sample | speed-up vs uncached | tokens equal to uncached (%) |")
        print("|---|---:|---:|---:|---:|")
        ref_tps, ref_tokens = None, None
        for cache, thr in SETTINGS:
            cfg = replace(base_cfg, cache=cache, threshold=thr if thr is None else a.threshold)
            sec, out = timed(lambda: generate(model, prompts, cfg), a.repeats, warmup=not a.quick)
            tps = a.batch * a.gen_length / sec
            if ref_tps is None:
                ref_tps, ref_tokens = tps, out.responses
            same = (out.responses == ref_tokens).double().mean().item() * 100
            print(f"| {label(cache, cfg.threshold)} | {tps:.1f} | {int(out.forwards[0])} | {tps / ref_tps:.2f}x "
                  f"| {same:.1f} |", flush=True)
        print()


def bench_accuracy(a) -> None:
    from dlmdistill.evaluation import encode_prompts, resolve_model_path
    from dlmdistill.tasks.registry import get_task

    model, tok = build_model(ModelConfig(name_or_path=resolve_model_path(a.model)))
    model = model.to(a.device).eval()
    gl = a.task_gen_length or a.gen_length
    print(f"## Accuracy of {a.model} (gen_length {gl}, block {a.block_length}, schedule {min(a.steps, gl)} steps, "
          f"greedy, {a.limit} held-out examples per task)\n")
    print("| task | setting | accuracy (%) | tokens/s | forwards per sample | speed-up vs uncached |")
    print("|---|---|---:|---:|---:|---:|")
    for task_name in a.tasks:
        task = get_task(task_name, **a.task_kwargs)
        examples = task.load(None, split="test", limit=a.limit)
        base_cfg = GenerationConfig(gen_length=gl, steps=min(a.steps, gl), block_length=min(a.block_length, gl),
                                    batch_size=a.batch if not a.quick else 32)
        prompts = encode_prompts(tok, examples, "plain", base_cfg, None)
        ref = None
        for cache, thr in SETTINGS:
            cfg = replace(base_cfg, cache=cache, threshold=thr if thr is None else a.threshold)
            t0, texts, forwards = time.perf_counter(), [], []
            for s in range(0, len(prompts), cfg.batch_size):
                out = generate(model, prompts[s:s + cfg.batch_size], cfg)
                texts += decode_responses(tok, out.responses.cpu(), model.eos_id)
                forwards += out.forwards.tolist()
            sec = time.perf_counter() - t0
            scores = [float(task.score(e, t)) for e, t in zip(examples, texts)]
            acc = 100 * sum(task.is_correct(s) for s in scores) / len(scores)
            tps = len(prompts) * gl / sec
            ref = ref or tps
            print(f"| {task_name} | {label(cache, cfg.threshold)} | {acc:.1f} | {tps:.1f} | "
                  f"{statistics.mean(forwards):.1f} | {tps / ref:.2f}x |", flush=True)
    print()


def bench_step_time(a) -> None:
    """One training step of d-OPSD and diffu-GRPO (tiny preset, stub verifier) per rollout setting."""
    import tempfile

    from dlmdistill.methods.diffu_grpo import DiffuGRPOConfig, DiffuGRPOTrainer
    from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDTrainer
    from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

    tok = char_tokenizer(["0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:\n"])
    gl = 64 if a.quick else 128
    print(f"## Training step time (tiny preset, 4 prompts, rollouts of {gl} tokens in blocks of 32, "
          f"{gl // 2} schedule steps, temperature 1, median of {a.repeats})\n")
    print("| method | rollout setting | step time (s) | speed-up vs uncached |")
    print("|---|---|---:|---:|")
    for method in ("d-OPSD", "diffu-GRPO"):
        ref = None
        for cache, thr in [("none", None), ("prefix", None), ("dual", None), ("dual", 0.9)]:
            gen = GenerationConfig(gen_length=gl, steps=gl // 2, block_length=32, temperature=1.0, batch_size=4,
                                   cache=cache, threshold=thr if thr is None else a.threshold)
            torch.manual_seed(0)
            model, t2 = build_model(ModelConfig(name_or_path="preset:tiny"), tokenizer=tok)
            examples = stub_examples(4)
            with tempfile.TemporaryDirectory() as out:
                common = dict(task=StubTask(lambda i, c: 1.0), examples=examples)
                if method == "d-OPSD":
                    trainer = DOPSDTrainer(model.train(), t2, items_for(examples, t2, gl), training_config(out),
                                           method=DOPSDConfig(rollout=gen, pass_k=1, micro_batch_size=64), **common)
                else:
                    trainer = DiffuGRPOTrainer(model.train(), t2, items_for(examples, t2, gl), training_config(out),
                                               method=DiffuGRPOConfig(rollout=gen, num_generations=2,
                                                                      num_iterations=1), **common)
                batch = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))][:4]
                sec, _ = timed(lambda: trainer.training_step(batch), a.repeats, warmup=not a.quick)
            ref = ref or sec
            print(f"| {method} | {label(cache, gen.threshold)} | {sec:.2f} | {ref / sec:.2f}x |", flush=True)
    print()


def main() -> None:
    a = parse_args()
    if a.model:
        bench_accuracy(a)
    else:
        print("accuracy: not measured (no --model given; the random-weight models below measure speed only)\n")
    if not a.no_speed:
        bench_speed(a)
    if a.step_time:
        bench_step_time(a)


if __name__ == "__main__":
    main()
