"""A run folder's layout and the checks made on it before a run starts (no torch).

A run folder holds ``config.yaml``, ``logs.jsonl`` (and TensorBoard events in ``tb/``), atomic
checkpoints in ``checkpoints/step-N/``, the exported model in ``final/`` and evaluation outputs in
``eval/``. Here: which of those make a folder "an existing run", which checkpoints are complete, the
checks of ``resume_from_checkpoint`` and of the trackers named in ``report_to``, and
``prepare_output_dir``, which refuses a folder holding another run or, with ``overwrite_output_dir``,
deletes that run's outputs.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from ..config import ConfigError
from ..configs.training import TRACKERS, TrainingConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
LOG_FILE = "logs.jsonl"
#: what a previous run leaves in its folder; any of these makes output_dir "an existing run"
RUN_RESULTS = ("checkpoints", LOG_FILE, "tb", "final", "final_metrics.json")
#: what overwrite_output_dir deletes (in this order: checkpoints first, so a stale one is never resumed)
RUN_OUTPUTS = ("checkpoints", "final", "final_metrics.json", LOG_FILE, "eval", "tb", "flops.json", "tokenizer",
               "seqkd_data.jsonl", "seqkd_data.json")  # the last two: sequence-KD's teacher answers


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints (trainer_state.json written), oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer_state.json was written) or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def check_trackers_installed(report_to: list[str]) -> None:
    """Every tracker named in ``report_to`` (already checked by ``TrainingConfig``) has its package installed;
    else ``ValueError`` naming the package to install."""
    for name in report_to:
        if name in TRACKERS and not any(importlib.util.find_spec(pkg) for pkg in TRACKERS[name]):
            raise ValueError(f"report_to: {name} is not installed (pip install {TRACKERS[name][0]}); "
                             f"or drop it (--report_to none keeps only logs.jsonl)")


def check_checkpoint_folder(path: str) -> None:
    """``path`` is a complete checkpoint folder (``trainer_state.json`` in it); else ``ValueError`` saying
    what it is (a run folder: which checkpoints it has)."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return
    if not p.exists():
        raise ValueError(f"resume_from_checkpoint: {path}: no such folder")
    ckpts = complete_checkpoints(p)
    if ckpts:
        raise ValueError(f"resume_from_checkpoint: {path} is a run folder, not a checkpoint; pass one of "
                         f"{', '.join(str(c) for c in ckpts)} (or --output_dir {path} --resume for the latest)")
    raise ValueError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE} in it)")


def existing_run(output_dir: str | Path) -> list[str]:
    """The results of a previous run found in ``output_dir`` (empty: none, the folder may be used)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for name in RUN_RESULTS:
        p = out / name
        if p.is_dir() and any(p.iterdir()) or p.is_file():
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def prepare_output_dir(config: TrainingConfig) -> None:
    """Refuse to train into a folder holding a previous run unless ``resume`` (continue it) or
    ``overwrite_output_dir``: then **that run's outputs (``RUN_OUTPUTS``) are deleted here**, by the main
    process; other files in the folder are left alone.

    Raises :class:`ConfigError` with a one-line message. Safe to call more than once."""
    if config.resume or config.resume_from_checkpoint:
        return
    found = existing_run(config.output_dir)
    if not found:
        return
    out = Path(config.output_dir)
    if not config.overwrite_output_dir:
        raise ConfigError(f"training.output_dir {out} already holds a run ({', '.join(found)}); pass --resume to "
                          f"continue it, --overwrite_output_dir to replace it, or choose another output_dir")
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        for name in RUN_OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        log.warning("overwrite_output_dir: deleted the previous run's %s in %s", ", ".join(found), out)
    state.wait_for_everyone()
