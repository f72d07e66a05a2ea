"""The ``dlmdistill`` command line (``dlmdistill --help`` lists the commands).

Options after the sub-command are configuration keys: dotted (``--training.learning_rate 1e-4``)
or a unique leaf name (``--learning_rate 1e-4``). ``dlmdistill train sft --help`` lists them all.

A mistake in the input (a bad option or value, a missing or malformed file, an unknown name) is
reported as one line, ``dlmdistill: error: ...``, with exit status 2. Any other failure is a bug
and prints its traceback (exit status 1). ``dlmdistill --debug COMMAND ...`` shows the traceback
of input errors too.

torch and transformers are imported when a command runs, not when this module is imported nor for
``--help``: the options come from the configuration classes of ``dlmdistill.configs``, which need no torch.

Why one file of this length: one short function per command (parsing and printing only; the work is
in the modules they call), so that every command's interface is in one place.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from .config import ConfigError, deep_merge, format_help, load_config, load_yaml, parse_overrides
from .errors import UserError, describe, is_user_error

USAGE = """usage: dlmdistill [--debug] COMMAND [ARGS ...]   (dlmdistill COMMAND --help for a command's options)

commands:
{commands}

Options after the command are configuration keys: dotted (--training.learning_rate 1e-4) or a unique
leaf name (--learning_rate 1e-4); --config FILE.yaml loads a file first. An input mistake is one line
"dlmdistill: error: ..." with exit status 2; --debug shows its traceback."""


def _setup_logging(verbose: bool = False, *, hf: bool = True) -> None:
    """Log lines with the time; quiet third-party loggers. ``hf``: also silence transformers' progress
    bars (imports transformers, which takes seconds: skipped for ``--help``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "fsspec", "accelerate",
                  "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not hf:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _split_config_arg(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """Pull ``--config FILE`` and ``--help`` out of a sub-command's arguments."""
    config, rest, want_help = None, [], False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            want_help = True
        elif a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name")
            config = argv[i + 1]
            i += 1
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return config, rest, want_help


def _aliases(argv: list[str], table: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        key = a.split("=", 1)[0]
        if key in table:
            a = table[key] + a[len(key):]
        out.append(a)
    return out


# ------------------------------------------------------------------------------------ train
def cmd_train(argv: list[str]) -> int:
    """train METHOD [--config FILE] [--key value ...]: train or post-train a model (sft, selffusion, dopsd, ...)"""
    from .api import check_run_config, get_config_class, get_method
    from .methods import METHODS

    if not argv or argv[0].startswith("-"):
        print("usage: dlmdistill train METHOD [--config FILE] [--key value ...]\n\nmethods:")
        for name, (_, _, desc) in METHODS.items():
            print(f"  {name:12s} {desc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    method, argv = argv[0], argv[1:]
    cfg_cls = get_config_class(method)  # an unknown method is an error here, before --help
    config, rest, want_help = _split_config_arg(argv)
    if want_help:
        print(f"dlmdistill train {method} [--config FILE] [--key value ...]\n")
        print(format_help(cfg_cls))
        return 0
    cfg_cls, run = get_method(method)  # the recipe (imports torch); the same configuration class
    cfg = load_config(cfg_cls, config, _aliases(rest, {"--init-from": "--model.name_or_path"}))
    check_run_config(cfg)
    metrics = run(cfg)
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0


# ------------------------------------------------------------------------------------ generate
def _read_prompts(path: str) -> list[tuple[str, str]]:
    """``(prompt, source)`` pairs from a JSONL/JSON file (field ``prompt``) or a text file (one per line)."""
    from .tasks.io import read_records, read_text, require

    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts_file {path}: " + ("is a folder, not a file" if p.is_dir() else "no such file"))
    if p.suffix in (".jsonl", ".json"):
        prompts = [(str(require(rec, "prompt", src)), src) for rec, src in read_records(p)]
    else:
        lines = io.StringIO(read_text(p), newline=None)  # numbered as an editor does (\n, \r\n or \r)
        prompts = [(line.rstrip("\n"), f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise UserError(f"prompts_file {path}: no prompts in it")
    return prompts


def cmd_generate(argv: list[str]) -> int:
    """generate --model M --prompt TEXT [--key value ...]: sample completions with the diffusion sampler"""
    from .configs import GenerateRunConfig

    config, rest, want_help = _split_config_arg(_aliases(argv, {"--model": "--model.name_or_path"}))
    if want_help:
        print("dlmdistill generate --model M --prompt TEXT [--key value ...]\n")
        print(format_help(GenerateRunConfig))
        return 0
    import torch

    from .data import encode_prompt
    from .evaluation import check_prompt_fits, context_limit, resolve_model_path, run_config_name, run_eval_defaults
    from .models.autoregressive import CausalLM, load_for_inference
    from .models.loading import resolve_device
    from .sampling import decode_responses, generate_batches

    # a training run's own decoding and prompt format, under what the config file and the command line give
    named = _given_model(_given(GenerateRunConfig, config, rest))
    from_run = run_eval_defaults(named)
    defaults = {k: v for k, v in (("generation", from_run.get("generation")),
                                  ("prompt_format", from_run.get("data", {}).get("prompt_format"))) if v}
    cfg = load_config(GenerateRunConfig, config, rest, under=defaults, under_name=run_config_name(named))
    sourced = [(p, f"--prompt {i + 1}") for i, p in enumerate(cfg.prompt)]
    sourced += _read_prompts(cfg.prompts_file) if cfg.prompts_file is not None else []
    if not sourced:
        raise ConfigError("give at least one --prompt or a --prompts_file")
    prompts = [p for p, _ in sourced]
    device = resolve_device(cfg.device)
    cfg.model.name_or_path = resolve_model_path(cfg.model.name_or_path)
    model, tok = load_for_inference(cfg.model)
    all_ids = [encode_prompt(tok, p, cfg.prompt_format) for p in prompts]
    for x, (_, where) in zip(all_ids, sourced):  # every prompt checked before anything is generated or written
        check_prompt_fits(len(x), cfg.generation.gen_length, context_limit(model), where)
    model.to(device)
    torch.manual_seed(cfg.seed)  # an AR model samples from the global generator
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed)
    out = open(cfg.output, "w") if cfg.output is not None else None
    show = cfg.show and not isinstance(model, CausalLM)
    if cfg.show and not show:
        print("--show: an autoregressive model has no denoising steps to show; printing the completions",
              file=sys.stderr)
    # (a causal LM samples left to right: sampler settings other than length and temperature are unused)
    batches = generate_batches(model, all_ids, cfg.generation, generator=gen,
                               trajectory=lambda n: show or (cfg.trajectory is not None and n == 0))
    for idx, responses, res in batches:
        chunk = [prompts[i] for i in idx]
        if res is not None and cfg.trajectory is not None and idx[0] == 0:
            from safetensors.torch import save_file

            t = res.trajectory
            save_file({"states": t.states.cpu().contiguous(), "committed": t.committed.cpu().contiguous(),
                       "block": t.block.cpu(), "sequences": res.sequences.cpu()}, cfg.trajectory)
        texts = decode_responses(tok, responses)
        if show:  # replays the sampler's recorded states, then prints the completion in their place
            from .show import show_batch

            show_batch(res.trajectory.states, texts, chunk, model.mask_id,
                       lambda t: tok.decode(t, skip_special_tokens=True), eos_id=tok.eos_token_id,
                       delay=cfg.show_delay, every=cfg.show_every)
        for p, c in zip(chunk, texts):
            if out:
                out.write(json.dumps({"prompt": p, "completion": c}) + "\n")
            elif not show:
                print(f"### prompt\n{p}\n### completion\n{c}\n")
    if out:
        out.close()
        print(f"wrote {len(prompts)} completions to {cfg.output}")
    return 0


# ------------------------------------------------------------------------------------ evaluate
def cmd_evaluate(argv: list[str]) -> int:
    """evaluate --model M --task T [--steps N ...] [--seeds S ...]: accuracy over denoising steps and seeds"""
    from .configs import EvalRunConfig

    argv = _aliases(argv, {"--model": "--model.name_or_path", "--task": "--data.task",
                           "--source": "--data.eval_source", "--split": "--data.eval_split",
                           "--limit": "--data.eval_limit"})
    config, rest, want_help = _split_config_arg(argv)
    if want_help:
        print("dlmdistill evaluate --model M --task T [--steps 8 16 32] [--seeds 10 20 30] [--key value ...]\n")
        print(format_help(EvalRunConfig))
        return 0
    from .data import resolve_task
    from .evaluation import for_task, format_table, run_config_name, run_eval_defaults, run_evaluation
    from .models.loading import resolve_device

    # a training run's own evaluation settings, under what the config file and the command line give
    given = _given(EvalRunConfig, config, rest)
    if "steps" in (given.get("generation") or {}):
        raise ConfigError("generation.steps: evaluate runs each step count of --steps (steps), which replace "
                          "generation.steps; give the step counts with --steps")
    named = _given_model(given)
    from_run = for_task(run_eval_defaults(named), given)
    cfg = load_config(EvalRunConfig, config, rest, prepare=EvalRunConfig.prepare, under=from_run,
                      under_name=run_config_name(named))
    cfg.data.task = resolve_task(cfg.data, "eval")
    if from_run:
        print(f"evaluation settings of the run ({Path(cfg.model.name_or_path)}), where not given: task "
              f"{cfg.data.task} {cfg.data.task_kwargs or ''}, gen_length {cfg.generation.gen_length}, block_length "
              f"{cfg.generation.block_length}, steps {' '.join(map(str, cfg.steps))}", file=sys.stderr)
    report, out_dir = run_evaluation(cfg, device=resolve_device(cfg.device))
    print(format_table(report))
    print(f"\ngenerations: {out_dir}/generations.jsonl\nmetrics:     {out_dir}/metrics.json")
    return 0


def _given(cls: type, config: str | None, rest: list[str]) -> dict[str, Any]:
    """What the config file and the command line give, before the configuration is built (its defaults
    depend on it)."""
    return deep_merge(load_yaml(config) if config else {}, parse_overrides(cls, rest))


def _given_model(given: dict[str, Any]) -> str:
    """The model named in ``given``; '' if none."""
    name = (given.get("model") or {}).get("name_or_path")
    return "" if name is None else str(name)


# ------------------------------------------------------------------------------------ toy-check
def cmd_toy_check(argv: list[str]) -> int:
    """toy-check --model RUN [--limit 500] [--rhos 0.1 0.25 0.5]: d-OPSD's toy verification (Table 3) as a go/no-go gate"""
    p = argparse.ArgumentParser(
        prog="dlmdistill toy-check",
        description="The d-OPSD paper's toy verification (Table 3, appendix D.2) with the official code's choices: "
        "the student's first attempt (greedy), pass@k with retries at temperature 1.0, then regeneration from a "
        "teacher input holding rho of the kept answer's content tokens, each block cleared when decoding reaches "
        "it, greedy, two tokens per step. Go/no-go: the self-teacher beats the student by at least --margin "
        "points at rho 0.25. Prints the table and a per-block diagnostic; writes the report as JSON.")
    p.add_argument("--model", required=True, help="a run folder (its task, task options, prompt format and "
                   "decoding blocks are used) or a model folder with --task")
    p.add_argument("--task", default=None, help="the task (default: the run's)")
    p.add_argument("--task_kwargs", default=None, help="task options as YAML/JSON, e.g. '{reasoning: true}' "
                   "(default: the run's, for its own task)")
    p.add_argument("--limit", type=int, default=500, help="training prompts (the paper: 500)")
    p.add_argument("--data_seed", type=int, default=99, help="seed of generated training prompts")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="revealed fractions")
    p.add_argument("--pass_k", type=int, default=8)
    p.add_argument("--retry_temperature", type=float, default=1.0, help="temperature of attempts 2..k")
    p.add_argument("--pass_k_mode", choices=["first_accepted", "best_of_k"], default=None,
                   help="default: best_of_k for sudoku (the official code), else first_accepted")
    p.add_argument("--accept_threshold", type=float, default=None, help="acceptance score (default: the task's; "
                   "0.25 for sudoku as the official code)")
    p.add_argument("--reveal", choices=["content", "after_block", "before_eos"], default="content",
                   help="content: rho of the answer's tokens before its EOS, anywhere (the official toy)")
    p.add_argument("--gen_length", type=int, default=None, help="default: the run's eval.generation")
    p.add_argument("--block_length", type=int, default=None, help="default: the run's eval.generation")
    p.add_argument("--steps", type=int, default=None, help="default: gen_length / 2 (two tokens per step)")
    p.add_argument("--margin", type=float, default=5.0, help="points the self-teacher must gain at rho 0.25")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=None, help="JSON report (default: RUN/eval/toy_check.json, or "
                   "toy_check.json here for a model folder)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    import yaml

    from .analysis.dopsd import format_self_teacher_check, self_teacher_check
    from .configs import DataConfig
    from .data import load_examples
    from .evaluation import resolve_model_path, run_eval_defaults, run_folder_of
    from .models.loading import load_model, resolve_device
    from .tasks.registry import get_task

    for name in ("limit", "pass_k", "batch_size"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.out == "":
        raise UserError("--out is an empty string; give a file name or leave --out out for the default")
    run = run_eval_defaults(a.model)
    data = dict(run.get("data") or {})
    if a.task is not None and a.task != data.get("task"):
        data = {"task": a.task}
    if a.task_kwargs is not None:
        kwargs = yaml.safe_load(a.task_kwargs)
        if not isinstance(kwargs, dict):
            raise UserError(f"--task_kwargs: expected a mapping such as '{{reasoning: true}}', got {a.task_kwargs!r}")
        data["task_kwargs"] = kwargs
    if data.get("task") is None:
        raise UserError(f"--model {a.model}: not a run folder with a config.yaml; name the task with --task")
    gen = _toy_check_decoding(a, run.get("generation") or {})
    task = get_task(data["task"], **(data.get("task_kwargs") or {}))
    cfg = DataConfig(task=data["task"], task_kwargs=data.get("task_kwargs") or {},
                     prompt_format=data.get("prompt_format", "plain"), train_limit=a.limit, seed=a.data_seed)
    examples = load_examples(cfg, "train")
    sudoku = task.name == "sudoku"
    threshold = a.accept_threshold if a.accept_threshold is not None else (0.25 if sudoku else None)
    model, tok = load_model(resolve_model_path(a.model))
    model.to(resolve_device(a.device))
    report = self_teacher_check(model, tok, task, examples, gen, rhos=tuple(a.rhos), pass_k=a.pass_k,
                                retry_temperature=a.retry_temperature, accept_threshold=threshold,
                                pass_k_mode=a.pass_k_mode or ("best_of_k" if sudoku else "first_accepted"),
                                reveal=a.reveal, prompt_format=cfg.prompt_format, gate_margin=a.margin, seed=a.seed)
    report["task"] = {"name": task.name, "task_kwargs": cfg.task_kwargs, "model": a.model}
    print(format_self_teacher_check(report))
    run_dir = run_folder_of(a.model)
    out = Path(a.out) if a.out is not None else (run_dir / "eval" / "toy_check.json" if run_dir else
                                                  Path("toy_check.json"))
    if out.exists() and a.out is None:
        out = out.with_name(f"toy_check_{a.reveal}_{gen.gen_length}_{gen.block_length}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nreport: {out}")
    return 0


def _toy_check_decoding(a: argparse.Namespace, saved: dict[str, Any]):
    """toy-check's greedy decoding: ``--gen_length`` and ``--block_length``, else the run's ``eval.generation``
    (``saved``); ``--steps``, else two tokens per step. A value it refuses is named with where it came from."""
    from .sampling import GenerationConfig

    g = a.gen_length if a.gen_length is not None else saved.get("gen_length")
    if g is None:
        raise UserError("--gen_length: the model is not a run folder with eval.generation; give --gen_length")
    block = a.block_length if a.block_length is not None else saved.get("block_length")
    steps = a.steps if a.steps is not None else max(g // 2, 1)
    gen = GenerationConfig(gen_length=g, block_length=block, steps=steps, temperature=0.0, batch_size=a.batch_size)
    try:
        gen.validate()
    except ValueError as e:
        from .evaluation import run_config_name

        run = run_config_name(a.model) if saved else ""
        origins = {"gen_length": run, "block_length": run, "steps": "the default gen_length / 2"}
        notes = [f"{name} {value} {'is' if name == 'steps' else 'comes from'} {origins[name]} (--{name} overrides it)"
                 for name, value in (("gen_length", g), ("block_length", block), ("steps", steps))
                 if getattr(a, name) is None and re.search(rf"\b{name}\b", str(e))]
        raise UserError(f"decoding: {e}" + (f"; {'; '.join(notes)}" if notes else "")) from None
    return gen


# ------------------------------------------------------------------------------------ others
def cmd_demo(argv: list[str]) -> int:
    """demo: a tiny DLM on Sudoku, post-trained with SFT, SelfFusion and d-OPSD and compared, on a CPU"""
    from .demo import main as demo_main

    return demo_main(argv)


def cmd_report(argv: list[str]) -> int:
    """report RUN_DIR ... [--out report.md]: tables and plots from run folders"""
    from .report import main as report_main

    return report_main(argv)


def cmd_score(argv: list[str]) -> int:
    """score --task T FILE [--out PATH]: re-score saved generations (ours or d1's)"""
    from .score import main as score_main

    return score_main(argv)


def cmd_convert(argv: list[str]) -> int:
    """convert llada|dream|smdm|ar SRC DST: a published checkpoint or any decoder -> a native DLM folder"""
    p = argparse.ArgumentParser(prog="dlmdistill convert", description="convert a published checkpoint into a "
                                "native transformers DLM folder (see docs/backbones/)")
    p.add_argument("family", choices=["llada", "dream", "smdm", "ar"],
                   help="ar: adapt any transformers decoder (hub id or folder) into a bidirectional DLM")
    p.add_argument("src", help="source checkpoint folder (llada, dream), .pth/.safetensors file (smdm), or hub "
                   "id / folder of a decoder (ar)")
    p.add_argument("dst", help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--mask-token-id", type=int, default=None, help="override the mask id (llada, dream)")
    p.add_argument("--smdm-config", default="Diff_LLaMA_472M",
                   help="SMDM model name (e.g. Diff_LLaMA_1476M) or a JSON/YAML file with its config (smdm)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder/id to save alongside (smdm; e.g. TinyLlama's)")
    p.add_argument("--mask-token", default=None, help="mask token string, added if new (ar; default: the "
                   "tokenizer's own mask token, else <|mdm_mask|>)")
    p.add_argument("--shift-logits", action="store_true", help="keep the AR alignment, Dream style (ar)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside SRC, de-quantised on load (ar)")
    p.add_argument("--revision", default=None, help="hub revision (ar)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code (ar)")
    a = p.parse_args(argv)
    ar_only = (a.mask_token, a.gguf_file, a.revision)
    if a.family != "ar" and (any(v is not None for v in ar_only) or a.shift_logits or a.trust_remote_code):
        p.error("--mask-token, --shift-logits, --gguf-file, --revision and --trust-remote-code are for 'ar'")
    for flag, value in (("--mask-token", a.mask_token), ("--gguf-file", a.gguf_file), ("--revision", a.revision),
                        ("--tokenizer", a.tokenizer), ("--smdm-config", a.smdm_config)):
        if value == "":
            raise UserError(f"{flag} is an empty string; give a value or leave {flag} out for its default")
    import torch

    from . import convert

    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.family == "ar":
        from .convert.ar import convert_ar
        from .convert.common import ConversionError

        try:
            model, tok = convert_ar(a.src, a.dst, dtype=a.dtype, mask_token=a.mask_token, shift_logits=a.shift_logits,
                                    gguf_file=a.gguf_file, revision=a.revision, trust_remote_code=a.trust_remote_code)
        except ConversionError as e:
            raise SystemExit(f"convert: {e}") from None
        print(f"wrote {a.dst} (mask id {model.mask_id}, vocabulary {len(tok)}, bidirectional"
              f"{', shifted logits' if model.shift_logits else ''})")
        return 0
    if a.family == "llada":
        convert.convert_llada(a.src, a.dst, dtype, mask_token_id=a.mask_token_id)
    elif a.family == "dream":
        convert.convert_dream(a.src, a.dst, dtype, mask_token_id=a.mask_token_id)
    else:
        cfg: str | dict = a.smdm_config
        if Path(a.smdm_config).suffix == ".json":
            cfg = json.loads(Path(a.smdm_config).read_text())
        elif Path(a.smdm_config).suffix in (".yaml", ".yml"):
            from .config import load_yaml

            cfg = load_yaml(a.smdm_config)
        convert.convert_smdm(a.src, a.dst, cfg, tokenizer=a.tokenizer, dtype=dtype)
    print(f"wrote {a.dst}")
    return 0


def cmd_estimate(argv: list[str]) -> int:
    """estimate --model M --method METHOD [--gpus N ...]: parameters and memory per device, from the config alone"""
    from .estimate import (DEFAULT_LORA_TARGETS, DTYPE_BYTES, METHODS, EstimateError, Workload, estimate,
                           format_estimate, resolve_model)

    p = argparse.ArgumentParser(prog="dlmdistill estimate", description="parameters and memory per device of a "
                                "training step (weights, gradients, optimizer state, activations) under DDP, "
                                "ZeRO-2, ZeRO-3 and FSDP, from the model's config alone (see dlmdistill/estimate.py)")
    p.add_argument("--model", required=True, help="preset:NAME, llada-8b, dream-7b (or their hub ids), a folder "
                   "with config.json, or a config JSON file")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_LORA_TARGETS), help="adapted linears")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="0 removes dropout's saved masks")
    p.add_argument("--gpus", type=int, default=1, help="devices the model is sharded/replicated over")
    p.add_argument("--gpu_memory", type=float, default=None, help="GiB per device: say whether each engine fits")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward with gradient (d-OPSD: step "
                   "states per micro-batch; diffu-GRPO: completions per micro-batch)")
    p.add_argument("--seq_len", type=int, default=512, help="prompt + response tokens")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16", help="bf16: mixed precision (fp32 master)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--load_in_4bit", action="store_true", help="the LoRA base's decoder linears in 4-bit NF4 "
                   "(model.load_in_4bit)")
    p.add_argument("--mask_fraction", type=float, default=0.5, help="masked share of the tokens (offline methods)")
    p.add_argument("--gen_length", type=int, default=None, help="on-policy: generated tokens (default seq_len/2)")
    p.add_argument("--block_length", type=int, default=32, help="on-policy: the sampler's block length")
    p.add_argument("--rollout_batch", type=int, default=None, help="on-policy: sequences sampled together")
    p.add_argument("--diffusion_steps", type=int, default=None, help="d-OPSD: rollout steps (K_t = gen/steps)")
    p.add_argument("--beta", type=float, default=0.04, help="diffu-GRPO: KL weight (> 0 runs a reference)")
    p.add_argument("--teacher", default=None, help="KD: the teacher (same forms as --model; default: the student)")
    p.add_argument("--vocab_size", type=int, default=None, help="vocabulary (presets: default 32001)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    a = p.parse_args(argv)
    try:
        if a.teacher == "":
            raise EstimateError("--teacher is an empty string; give a model or leave --teacher out (the student)")
        for name in ("vocab_size", "gpu_memory"):
            if getattr(a, name) is not None and not getattr(a, name) > 0:
                raise EstimateError(f"--{name} must be > 0, got {getattr(a, name)}")
        arch = resolve_model(a.model, a.vocab_size)
        teacher = resolve_model(a.teacher, a.vocab_size) if a.teacher is not None else None
        w = Workload(method=a.method, batch=a.batch, seq_len=a.seq_len, dtype=a.dtype, lora_r=a.lora_r,
                     lora_targets=tuple(a.lora_targets), lora_dropout=a.lora_dropout > 0,
                     gradient_checkpointing=a.gradient_checkpointing, mask_fraction=a.mask_fraction,
                     gen_length=a.gen_length, block_length=a.block_length, rollout_batch=a.rollout_batch,
                     diffusion_steps=a.diffusion_steps,
                     teacher=teacher, beta=a.beta, load_in_4bit=a.load_in_4bit)
        est = estimate(arch, w, gpus=a.gpus)
    except EstimateError as e:
        print(f"estimate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if a.json else format_estimate(est, a.gpu_memory))
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "report": cmd_report, "convert": cmd_convert, "score": cmd_score, "estimate": cmd_estimate,
            "toy-check": cmd_toy_check}


def usage() -> str:
    """The top-level help: one line per command in ``COMMANDS`` (the first line of its docstring)."""
    rows = []
    for name, fn in COMMANDS.items():  # docstrings read "NAME ARGS: what it does"
        first = ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        synopsis, sep, what = first.partition(": ")
        if not sep or synopsis.split(" ", 1)[0] != name:
            synopsis, what = name, first
        rows.append((synopsis, what))
    width = max(len(s) for s, _ in rows)
    lines = [f"  {s:{width}s}   {w}".rstrip() for s, w in rows]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    if debug:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"dlmdistill: error: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _setup_logging(hf=not ({"-h", "--help"} & set(argv[1:])))
    try:
        return COMMANDS[cmd](argv[1:])
    except KeyboardInterrupt:
        if debug:
            raise
        print("dlmdistill: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns exceptions into messages
        if debug:
            raise
        if is_user_error(e):
            print(f"dlmdistill: error: {describe(e)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"dlmdistill: internal error ({type(e).__name__}): this is a bug in dlmdistill; please report it "
              f"with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
