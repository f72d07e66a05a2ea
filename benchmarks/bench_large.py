"""Large shapes on CPU: optimizer steps of every method on the ``smdm-472m`` preset, peak RSS and time.

    python benchmarks/bench_large.py                       # the measured table (docs/benchmarks.md), ~15 min
    python benchmarks/bench_large.py --preset tiny --vocab 512 --steps 1   # smoke test, a minute
    python benchmarks/bench_large.py --items sft_lora kd_lora --json out.json

Every item runs in a fresh Python process (``subprocess``), one at a time, and reports that process's
peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), which never decreases, so
it includes everything the item did: importing torch, building the model, the optimizer steps.
Two idle processes give the baselines:

- ``baseline_import``: imported torch, transformers and dlmdistill, built the tokenizer; nothing else.
- ``baseline_model``:  the same, plus the fp32 model built as the training items build it (LoRA
  wrapped, gradient checkpointing on), then idle.

``peak - baseline_import`` is what the training item added on top of the interpreter and libraries:
weights, gradients, optimizer state, activations, the LM-head buffers and the allocator's slack.
That is what ``dlmdistill estimate`` predicts (its total per device), so the table puts them side
by side.

Items (all through the public API ``dlmdistill.train`` with a config dict, fp32 weights, no mixed
precision (a CPU), gradient checkpointing on, eval and checkpoints off, ``--steps`` optimizer steps):

- ``sft_full``       masked-diffusion SFT, full fine-tuning (AdamW over every parameter);
- ``sft_lora``       the same with LoRA (rank ``--lora_r`` on q/k/v/o/gate/up/down);
- ``selffusion_lora``, ``kd_lora`` (a frozen fp32 teacher of the same shape, saved once to a
  temporary folder), ``dopsd_lora`` and ``diffu_grpo_lora`` (both roll out with the sampler first).

Data: generated Countdown puzzles (compact prompts). Offline items pad every response with trained
EOS to ``--seq_len`` tokens in all (``data.response_length``), so each batch is ``--batch`` x
``--seq_len``. On-policy items roll out ``--gen_length`` tokens in ``--rollout_steps`` steps for
one prompt (d-OPSD: one trajectory, ``pass_k 1``, trained even if wrong; diffu-GRPO: ``--batch``
completions of one prompt, mu = 1, beta 0.04 so the reference policy (adapters disabled) runs).

Tokenizer: SMDM's real vocabulary has 32,000 tokens (TinyLlama's) plus the mask. The LM head and
the embeddings are 2 x 41M parameters of the 554M at that size, and the head's logits are the
largest activation of a step, so the benchmark uses a character tokenizer padded with unused
entries to ``--vocab`` ids (32,000 by default) plus the mask token: the shapes of SMDM's model,
the speed of a character vocabulary (the unused ids are never produced by the text).

Allocator: with glibc's default malloc the peak RSS is the heap's high-water mark, well above the
live tensors when gradient checkpointing frees and reallocates a layer's activations many times
(docs/benchmarks.md); ``--mmap_threshold 131072`` sets ``MALLOC_MMAP_THRESHOLD_`` in the children so
that large blocks go back to the system when freed and the peak RSS follows the tensors.

Time per step: the trainer's ``elapsed_s`` log of the last step minus that of the step before
(rollouts included for the on-policy items), or of the single step when ``--steps 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ITEMS = ("baseline_import", "baseline_model", "sft_lora", "selffusion_lora", "kd_lora", "dopsd_lora",
         "diffu_grpo_lora", "sft_full")


# ----------------------------------------------------------------------------- the child side
def make_tokenizer(folder: Path, vocab: int) -> None:
    """A character tokenizer over printable ASCII padded with unused entries to ``vocab`` ids (+ the mask)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dlmdistill.models.tokenizer import BOS, EOS, MASK, PAD, UNK

    specials = [PAD, EOS, UNK, BOS]
    table = {t: i for i, t in enumerate(specials)}
    for c in sorted(set(string.printable)):
        table.setdefault(c, len(table))
    i = 0
    while len(table) < vocab:
        table[f"<unused{i}>"] = len(table)
        i += 1
    table[MASK] = len(table)
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials + [MASK])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, mask_token=MASK,
                                   unk_token=UNK, bos_token=BOS, model_max_length=4096, padding_side="left")
    fast.save_pretrained(str(folder))


def model_section(a: argparse.Namespace, lora: bool) -> dict:
    return {"name_or_path": f"preset:{a.preset}", "tokenizer": str(a.tokenizer), "dtype": "float32",
            "gradient_checkpointing": True, "lora_r": a.lora_r if lora else 0}


def run_config(item: str, a: argparse.Namespace, out: Path) -> tuple[str, dict]:
    """The method and the config dict of a training item."""
    method = item.rsplit("_", 1)[0].replace("diffu_grpo", "diffu-grpo")
    prompt_room = 28  # compact Countdown prompts: up to ~28 characters
    cfg: dict = {
        "model": model_section(a, lora=item.endswith("_lora")),
        "data": {"task": "countdown", "task_kwargs": {"style": "compact"}, "train_limit": 64,
                 "max_length": a.seq_len, "response_length": a.seq_len - prompt_room},
        "training": {"output_dir": str(out), "max_steps": a.steps, "per_device_train_batch_size": a.batch,
                     "learning_rate": 1e-5, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                     "logging_steps": 1, "save_steps": 0, "export_final": False, "report_to": ["jsonl"],
                     "mixed_precision": "no", "progress_bar": False, "seed": 0, "use_cpu": True},
        "eval": {"enabled": False},
    }
    rollout = {"gen_length": a.gen_length, "steps": a.rollout_steps, "block_length": a.gen_length // 2,
               "temperature": 0.9}
    if method == "kd":
        cfg["method"] = {"teacher": str(a.teacher), "teacher_dtype": "float32"}
    elif method == "dopsd":
        cfg["data"].pop("response_length")
        cfg["training"]["per_device_train_batch_size"] = 1
        cfg["method"] = {"rollout": {**rollout, "batch_size": 1}, "pass_k": 1, "correct_only": False,
                         "micro_batch_size": a.rollout_steps}
    elif method == "diffu-grpo":
        cfg["data"].pop("response_length")
        cfg["training"]["per_device_train_batch_size"] = 1
        cfg["method"] = {"rollout": {**rollout, "batch_size": a.batch}, "num_generations": a.batch,
                         "num_iterations": 1, "beta": 0.04, "micro_batch_size": a.batch}
    return method, cfg


class ShapeLog:
    """Shapes [B, L] of the token batches the transformer bodies see, split by gradient mode."""

    def __init__(self) -> None:
        self.grad: set[tuple[int, int]] = set()
        self.no_grad: set[tuple[int, int]] = set()

    def __enter__(self) -> "ShapeLog":
        import torch
        from torch.nn.modules.module import register_module_forward_pre_hook

        def hook(module, args):
            if isinstance(module, torch.nn.Embedding) and args and args[0].dim() == 2:
                (self.grad if torch.is_grad_enabled() else self.no_grad).add(tuple(args[0].shape))

        self._h = register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._h.remove()


def child(item: str, a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    import dlmdistill as dd
    from dlmdistill.models.loading import ModelConfig, build_model, count_parameters

    torch.set_num_threads(a.threads)
    row: dict = {"item": item}
    if item == "make_teacher":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(a.tokenizer))
        torch.manual_seed(1)
        model, tok = build_model(ModelConfig(**model_section(a, lora=False) | {"gradient_checkpointing": False}),
                                 tokenizer=tok)
        model.save_pretrained(a.teacher, tok)
        row["params"] = count_parameters(model)
    elif item == "baseline_import":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(a.tokenizer))
    elif item == "baseline_model":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(a.tokenizer))
        model, _ = build_model(ModelConfig(**model_section(a, lora=True)), tokenizer=tok)
        row["params"] = count_parameters(model)
        row["trainable"] = count_parameters(model, trainable_only=True)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_large_") as tmp:
            out = Path(tmp) / item
            method, cfg = run_config(item, a, out)
            with ShapeLog() as shapes:
                dd.train(method, cfg)
            logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines() if line.strip()]
            times = {r["step"]: r["elapsed_s"] for r in logs if "elapsed_s" in r}
            last = max(times)
            row["s_per_step"] = round(times[last] - times.get(last - 1, 0.0), 1)
            row["steps"] = last
            row["loss"] = next((r.get("loss") for r in reversed(logs) if "loss" in r), None)
            row["grad_shapes"] = sorted(shapes.grad)
            row["no_grad_shapes"] = sorted(shapes.no_grad)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


# ----------------------------------------------------------------------------- the parent side
def run_item(item: str, a: argparse.Namespace, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", item, "--tokenizer", str(a.tokenizer),
           "--teacher", str(a.teacher)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    if a.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.item_timeout)
    except subprocess.TimeoutExpired:
        return {"item": item, "error": f"timed out after {a.item_timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_ROW ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"item": item, "error": f"exit {p.returncode}: {' | '.join(tail)}",
                "wall_s": round(time.perf_counter() - t, 1)}
    return json.loads(lines[-1][len("BENCH_ROW "):])


def table(rows: list[dict], base: float | None) -> str:
    head = ("| item | peak RSS (MiB) | peak - baseline_import (MiB) | s / step | steps | batches with grad [B, L] "
            "| no-grad batches [B, L] |\n|---|---:|---:|---:|---:|---|---|")
    out = [head]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['item']} | failed: {r['error']} | | | | | |")
            continue
        inc = f"{r['peak_rss_mib'] - base:.0f}" if base is not None else ""
        grad = ", ".join(f"{b}x{n}" for b, n in r.get("grad_shapes", []))
        nog = ", ".join(f"{b}x{n}" for b, n in r.get("no_grad_shapes", []))
        out.append(f"| {r['item']} | {r['peak_rss_mib']:.0f} | {inc} | {r.get('s_per_step', '')} | "
                   f"{r.get('steps', '')} | {grad} | {nog} |")
    return "\n".join(out)


def workload_of(row: dict, a: argparse.Namespace):
    """The ``dlmdistill.estimate`` workload of a measured training item (shapes from its logged batches)."""
    from dlmdistill.estimate import Workload

    item = row["item"]
    method = item.rsplit("_", 1)[0].replace("diffu_grpo", "diffu-grpo")
    b, length = max(row["grad_shapes"], key=lambda s: s[0] * s[1])
    common = dict(seq_len=length, dtype="fp32", lora_r=a.lora_r if item.endswith("_lora") else 0,
                  gradient_checkpointing=True)
    if method == "selffusion":
        b //= 2  # the logged forward holds both copies
    if method in ("dopsd", "diffu-grpo"):
        common.update(gen_length=a.gen_length, block_length=a.gen_length // 2, diffusion_steps=a.rollout_steps,
                      rollout_batch=1 if method == "dopsd" else a.batch, beta=0.04)
    return Workload(method=method, batch=b, **common)


def compare(rows: list[dict], a: argparse.Namespace) -> str:
    """Markdown table: each measured increment over ``baseline_import`` next to the estimate's total."""
    from dlmdistill.estimate import estimate, resolve_model

    base = next((r["peak_rss_mib"] for r in rows if r["item"] == "baseline_import" and "error" not in r), None)
    if base is None:
        return "(no baseline_import row: nothing to compare)"
    arch = resolve_model(f"preset:{a.preset}", vocab_size=a.vocab + 1)
    out = ["| item | measured: peak - baseline_import (MiB) | estimate total (MiB) | weights | grads + optim "
           "| activations | estimate / measured |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r or not r.get("grad_shapes"):
            continue
        est = estimate(arch, workload_of(r, a))
        e = est.engines["ddp"]
        measured = r["peak_rss_mib"] - base
        mib = 2**20
        out.append(f"| {r['item']} | {measured:.0f} | {e['total'] / mib:.0f} | {e['weights'] / mib:.0f} | "
                   f"{(e['gradients'] + e['optimizer']) / mib:.0f} | {e['activations'] / mib:.0f} | "
                   f"{e['total'] / mib / measured:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smdm-472m")
    p.add_argument("--vocab", type=int, default=32000, help="tokenizer ids before the mask token")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--gen_length", type=int, default=128, help="on-policy rollout length")
    p.add_argument("--rollout_steps", type=int, default=8)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per item (2: the second one has "
                   "optimizer state during its backward, as every later step does)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--items", nargs="+", default=list(ITEMS), choices=ITEMS)
    p.add_argument("--item_timeout", type=int, default=900)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--mmap_threshold", type=int, default=None, help="set glibc's MALLOC_MMAP_THRESHOLD_ in the "
                   "children (e.g. 131072): freed large blocks go back to the system, so the peak RSS follows "
                   "the live tensors instead of the heap's high-water mark")
    p.add_argument("--compare", default=None, help="only print the estimate comparison of a saved --json file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("BENCH_ROW " + json.dumps(child(a.child, a)), flush=True)
        return 0
    if a.compare:
        saved = json.loads(Path(a.compare).read_text())
        for k, v in saved["args"].items():
            if k in ("preset", "vocab", "batch", "gen_length", "rollout_steps", "lora_r"):
                setattr(a, k, v)
        print(compare(saved["rows"], a))
        return 0
    shared = [x for i, x in enumerate(argv) if not _in_items(argv, i)]
    with tempfile.TemporaryDirectory(prefix="bench_large_") as tmp:
        a.tokenizer, a.teacher = Path(tmp) / "tokenizer", Path(tmp) / "teacher"
        make_tokenizer(a.tokenizer, a.vocab)
        rows = []
        if "kd_lora" in a.items:
            r = run_item("make_teacher", a, shared)
            print(f"teacher: {json.dumps(r)}", flush=True)
        for item in a.items:
            r = run_item(item, a, shared)
            rows.append(r)
            print(json.dumps(r), flush=True)
    base = next((r["peak_rss_mib"] for r in rows if r["item"] == "baseline_import" and "error" not in r), None)
    print(f"\n{a.preset}, vocab {a.vocab} + mask, batch {a.batch}, seq_len {a.seq_len}, LoRA r {a.lora_r}, "
          f"gradient checkpointing, fp32, {a.threads} threads, {a.steps} optimizer steps per item\n")
    print(table(rows, base))
    print("\nagainst dlmdistill estimate (DDP, one device, fp32, the logged batch shapes):\n")
    print(compare(rows, a))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: v for k, v in vars(a).items()
                                                     if k not in ("child", "tokenizer", "teacher")}, "rows": rows},
                                           indent=2, default=str))
    return 0


def _in_items(argv: list[str], i: int) -> bool:
    """Whether ``argv[i]`` is ``--items`` or one of its values (the children get one item each)."""
    j = i
    while j >= 0 and not argv[j].startswith("--"):
        j -= 1
    return j >= 0 and argv[j] in ("--items", "--json", "--compare")


if __name__ == "__main__":
    sys.exit(main())
