"""Checkpoint state in safetensors and JSON only: nothing in a checkpoint folder is ever unpickled.

A checkpoint ``checkpoints/step-N`` holds

* ``model.safetensors`` (or ``partial_model.safetensors``: the trainable parameters only, with LoRA or
  frozen teachers);
* ``optimizer.safetensors`` (the per-parameter state tensors) and ``optimizer.json`` (the parameter
  groups' hyper-parameters and any non-tensor state);
* ``scheduler.json`` (the learning-rate schedule's ``state_dict``), ``scaler.json`` (fp16 only);
* ``rng_state_<rank>.safetensors`` / ``rng_state_<rank>.json`` (torch, CUDA, numpy and Python RNGs);
* ``trainer_state.json``, written last, with the loop position and the size of every file above, so
  a truncated file is detected before anything is loaded.

Files of any other name in the folder (such as a planted ``custom_checkpoint_0.pkl``) are ignored.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_FILE = "model.safetensors"
PARTIAL_FILE = "partial_model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng_state_{rank}.safetensors", f"rng_state_{rank}.json"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON; fails (``ValueError``) on anything JSON cannot hold exactly."""
    path.write_text(json.dumps(obj, allow_nan=True))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------- optimizer
def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """``optimizer.state_dict()`` as tensors (safetensors) + everything else (JSON)."""
    save_optimizer_state(optimizer.state_dict(), folder)


def save_optimizer_state(sd: dict[str, Any], folder: Path) -> None:
    """An optimizer state dict (``{"state": {index: {...}}, "param_groups": [...]}``) as
    ``optimizer.safetensors`` + ``optimizer.json`` (FSDP runs pass the gathered full state)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    write_json(folder / OPTIMIZER_JSON, {"param_groups": groups, "scalars": scalars,
                                         "tuples": sorted({k for g in sd["param_groups"] for k, v in g.items()
                                                           if isinstance(v, tuple)})})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    optimizer.load_state_dict(read_optimizer_state(folder))


def read_optimizer_state(folder: Path) -> dict[str, Any]:
    """The state dict written by ``save_optimizer_state`` (tensors from safetensors, the rest from JSON)."""
    from safetensors.torch import load_file

    meta = read_json(folder / OPTIMIZER_JSON)
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    tuples = set(meta.get("tuples", []))
    groups = [{k: (tuple(v) if k in tuples else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------- RNG
def save_rng(folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    name_t, name_j = rng_files(rank)
    save_file(tensors, str(folder / name_t))
    np_state = np.random.get_state()
    py_state = random.getstate()
    write_json(folder / name_j, {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    })


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this process's RNG states; False if the checkpoint has none for ``rank``."""
    from safetensors.torch import load_file

    name_t, name_j = rng_files(rank)
    if not (folder / name_t).exists() or not (folder / name_j).exists():
        return False
    tensors = load_file(str(folder / name_t))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    meta = read_json(folder / name_j)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


# ---------------------------------------------------------------------------------- validation
def file_sizes(folder: Path, names: list[str]) -> dict[str, int]:
    return {n: (folder / n).stat().st_size for n in names if (folder / n).is_file()}


def checkpoint_problem(folder: Path, state_file: str) -> str | None:
    """Why ``folder`` cannot be resumed from, or None if it is complete and intact.

    Checks that ``trainer_state.json`` parses, every file it lists exists with the recorded size, and
    every safetensors file's header parses and covers the file."""
    from safetensors import safe_open

    try:
        state = read_json(folder / state_file)
    except (OSError, ValueError) as e:
        return f"{state_file} unreadable ({e})"
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return (f"{state_file} lists no files: written by an older dlmdistill (pickle-based state, "
                "no longer loaded)")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), "pt") as f:
                    f.keys()
            except Exception as e:  # noqa: BLE001 - any parse failure means damaged
                return f"{name} is damaged ({type(e).__name__}: {e})"
        elif name.endswith(".json"):
            try:
                read_json(path)
            except ValueError as e:
                return f"{name} is damaged ({e})"
    return None


# ---------------------------------------------------------------------------------- logs
def trim_log(path: Path, max_step: int) -> int:
    """Keep only the rows of the JSONL log ``path`` with ``step <= max_step`` (and drop a torn or
    malformed line); rewritten atomically. Returns the number of rows removed."""
    if not path.exists():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = rec["step"]
        except (ValueError, KeyError, TypeError):
            removed += 1
            continue
        if isinstance(step, (int, float)) and step <= max_step:
            kept.append(line)
        else:
            removed += 1
    if removed:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(k + "\n" for k in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return removed
