"""The damage suite (issue 13, "Damage and security"): nothing planted in a run folder is executed,
nothing a user has is silently overwritten or mixed, a damaged or poisoned state is never resumed
from or named as good, and a failed conversion leaves nothing behind.

Every test states its oracle: an uninterrupted run (exact resume), a payload shown to execute under
``torch.load(weights_only=False)`` (no pickle), hand-written logs (report), or the file system as it
was before the command (nothing written or removed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmdistill.config import ConfigError
from dlmdistill.methods.sft import SFTTrainer
from dlmdistill.training import NonFiniteLossError, TrainingConfig, latest_checkpoint
from dlmdistill.data import DiffusionCollator
from tests.conftest import tiny_model
from tests.methods.test_sft import reverse_items

ROOT = Path(__file__).resolve().parents[2]


def make_trainer(tokenizer, out, cls=SFTTrainer, **kw):
    """A tiny SFT run (reverse a 5-letter string) writing only logs.jsonl and checkpoints."""
    model, tok = tiny_model(tokenizer, seed=0)
    settings = dict(output_dir=str(out), per_device_train_batch_size=32, learning_rate=3e-3, weight_decay=0.0,
                    logging_steps=5, progress_bar=False, report_to=["jsonl"], export_final=False)
    cfg = TrainingConfig(**{**settings, **kw})
    return cls(model.train(), tok, reverse_items(tok), cfg,
               collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _strict_rows(path: Path) -> list[dict]:
    """Parse a JSONL file as strict JSON (NaN / Infinity are rejected)."""
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Kill(RuntimeError):
    pass


class CrashAt(SFTTrainer):
    """Raises before optimizer step ``crash_at`` (a kill between checkpoints)."""
    crash_at = 7

    def compute_loss(self, model, batch):
        if self.state.global_step + 1 == self.crash_at:
            raise Kill("simulated kill")
        return super().compute_loss(model, batch)


def _run_with_crash(tokenizer, out: Path, **common):
    crashed = make_trainer(tokenizer, out, cls=CrashAt, **common)
    with pytest.raises(Kill):
        crashed.train()
    if crashed._jsonl is not None:
        crashed._jsonl.close()


# ---------------------------------------------------------------------------------------- 1. no pickle
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_loaded_and_resume_stays_exact(tokenizer, tmp_path):
    common = dict(max_steps=12, save_steps=6, gradient_accumulation_steps=2, logging_steps=1)
    ref = make_trainer(tokenizer, tmp_path / "ref", **common)
    ref.train()
    run = tmp_path / "run"
    _run_with_crash(tokenizer, run, **common)
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-0000006"
    # what a checkpoint holds: safetensors and JSON only
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    # the oracle: the payload is live (it runs under torch.load(weights_only=False), what Accelerate
    # used for custom_checkpoint_0.pkl)
    (tmp_path / "probe.pkl").write_bytes(payload)
    try:
        torch.load(tmp_path / "probe.pkl", weights_only=False)
    except Exception:  # noqa: BLE001 - the payload is not a valid checkpoint; it has run by then
        pass
    assert marker.exists()
    marker.unlink()
    # plant it under every name Accelerate's load_state reads
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                 "pytorch_model.bin", "scaler.pt", "sampler.bin"):
        (ckpt / name).write_bytes(payload)

    resumed = make_trainer(tokenizer, run, resume=True, **common)
    resumed.train()
    assert not marker.exists()
    assert resumed.state.global_step == 12
    _assert_bit_equal(_weights(ref), _weights(resumed))
    # the optimizer moments too (the next step after a resume depends on them)
    sa, sb = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert ref.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_no_code_path_unpickles_checkpoints():
    """Static guard: the library never asks for weights_only=False nor hands state to Accelerate's
    pickle-based custom checkpointing."""
    offenders = []
    for path in (ROOT / "src").rglob("*.py"):
        text = path.read_text()
        for needle in ("weights_only=False", "register_for_checkpointing", "pickle.load"):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []


# ---------------------------------------------------------------------------------------- 2. non-finite
class NaNGradAt(SFTTrainer):
    """A finite loss whose gradient is NaN at optimizer step ``bad_step`` (d sqrt(x)/dx at 0, times 0)."""
    bad_step = 3
    fired = False

    def compute_loss(self, model, batch):
        loss, m = super().compute_loss(model, batch)
        if self.state.global_step + 1 == self.bad_step and not self.fired:
            self.fired = True  # once: a skipped update does not advance the step
            p = next(q for q in model.parameters() if q.requires_grad)
            loss = loss + torch.sqrt(p.sum() * 0.0)  # value 0, gradient 0 * inf = NaN
        return loss, m


def _all_finite(sd: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in sd.values() if t.is_floating_point())


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nonfinite_gradient_stops_before_it_is_applied(tokenizer, tmp_path, max_grad_norm):
    t = make_trainer(tokenizer, tmp_path, cls=NaNGradAt, max_steps=6, save_steps=1, max_grad_norm=max_grad_norm)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm .* step 3 .*last good checkpoint: .*step-0000002"):
        t.train()
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    assert _all_finite(_weights(t))  # the NaN update was not applied in memory either
    assert _all_finite(load_file(str(tmp_path / "checkpoints" / "step-0000002" / "model.safetensors")))


def test_nonfinite_gradient_skip_drops_the_update_and_continues(tokenizer, tmp_path):
    t = make_trainer(tokenizer, tmp_path, cls=NaNGradAt, max_steps=6, nonfinite_grad="skip")
    t.train()
    assert t.state.global_step == 6 and t.state.skipped_steps == 1 and t.state.optimizer_steps == 6
    assert _all_finite(_weights(t))


def test_fp16_scaler_skip_is_a_skipped_update(tokenizer, tmp_path, monkeypatch):
    """Under fp16 the gradient scaler drops an overflowing update inside optimizer.step(). That step must
    count as skipped: no schedule step, no optimizer step counted, the global step not advanced. fp16
    needs a GPU, so the scaler and Accelerate's skip flag are stood in for (at optimizer step 3)."""
    from accelerate import Accelerator

    t = make_trainer(tokenizer, tmp_path, max_steps=6)
    calls = {"n": 0}

    class Scaler:
        def scale(self, loss):
            return loss

        def get_scale(self):
            return 1024.0

        def state_dict(self):
            return {"scale": 1024.0}

    def skipped(self):
        calls["n"] += 1
        return calls["n"] == 3

    monkeypatch.setattr(t.accelerator, "scaler", Scaler())
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    t.train()
    assert t.state.global_step == 6 and t.state.skipped_steps == 1 and t.state.optimizer_steps == 6
    assert t.scheduler.last_epoch == 6  # one schedule step per applied update


class PoisonWeightsAfter(SFTTrainer):
    """After optimizer step 2 a weight becomes NaN (a finite gradient norm can still overflow a weight)."""

    def optimizer_step(self):
        gn = super().optimizer_step()
        if self.state.optimizer_steps == 2:
            with torch.no_grad():
                next(self.unwrapped.parameters()).view(-1)[0] = float("nan")
        return gn


def test_checkpoint_with_nonfinite_weights_is_never_written(tokenizer, tmp_path):
    t = make_trainer(tokenizer, tmp_path, cls=PoisonWeightsAfter, max_steps=6, save_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights at optimizer step 2.*step-0000001"):
        t.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]


def test_huge_learning_rate_never_leaves_a_poisoned_checkpoint(tokenizer, tmp_path):
    """The issue's scenario: whatever step the run stops at, every checkpoint on disk (and the one the
    message names as good) holds finite weights."""
    t = make_trainer(tokenizer, tmp_path, max_steps=30, save_steps=1, learning_rate=1e30, max_grad_norm=0.0,
                     save_total_limit=0, logging_steps=1)
    with pytest.raises(NonFiniteLossError) as info:
        t.train()
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    for c in ckpts:
        assert _all_finite(load_file(str(c / "model.safetensors"))), c.name
    if ckpts:
        assert ckpts[-1].name in str(info.value)
    _strict_rows(tmp_path / "logs.jsonl")


class NaNMetric(SFTTrainer):
    def compute_loss(self, model, batch):
        loss, m = super().compute_loss(model, batch)
        return loss, {**m, "ratio": float("nan"), "peak": float("inf")}


def test_logs_stay_strict_json_and_report_reads_null(tokenizer, tmp_path):
    from dlmdistill.report import load_run, series

    make_trainer(tokenizer, tmp_path, cls=NaNMetric, max_steps=4, logging_steps=2).train()
    rows = _strict_rows(tmp_path / "logs.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["ratio"] is None and r["peak"] is None and isinstance(r["loss"], float) for r in rows)
    run = load_run(tmp_path)
    assert series(run, "ratio") == ([], []) and len(series(run, "loss")[0]) == 2


# ---------------------------------------------------------------------------------------- 3. overwrite
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "dlmdistill.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


TINY_SFT = ["--task", "countdown", "--train_limit", "64", "--per_device_train_batch_size", "16",
            "--preset_overrides", "{hidden_size: 32, intermediate_size: 64}", "--progress_bar", "false",
            "--report_to", "jsonl", "--eval.enabled", "false", "--export_final", "false"]


def test_cli_refuses_to_train_into_an_existing_run_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    first = _cli("train", "sft", *TINY_SFT, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out),
                 cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    again = _cli("train", "sft", *TINY_SFT, "--max_steps", "2", "--save_steps", "1", "--learning_rate", "1e-2",
                 "--output_dir", str(out), cwd=tmp_path)
    assert again.returncode != 0
    assert "Traceback" not in again.stderr
    err = [line for line in again.stderr.splitlines() if "already holds a run" in line]
    assert len(err) == 1 and str(out) in err[0] and "--overwrite_output_dir" in err[0] and "--resume" in err[0]
    assert _snapshot(out) == before  # nothing written, nothing removed
    (out / "notes.txt").write_text("mine")
    forced = _cli("train", "sft", *TINY_SFT, "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out),
                  "--overwrite_output_dir", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert max(r["step"] for r in _strict_rows(out / "logs.jsonl")) == 2 and (out / "notes.txt").exists()


def test_overwrite_output_dir_starts_clean_and_keeps_foreign_files(tokenizer, tmp_path):
    make_trainer(tokenizer, tmp_path, max_steps=8, save_steps=4, logging_steps=1).train()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run"):
        make_trainer(tokenizer, tmp_path, max_steps=3)
    t = make_trainer(tokenizer, tmp_path, max_steps=3, save_steps=3, logging_steps=1, overwrite_output_dir=True)
    t.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000003"]  # no stale step-8
    assert [r["step"] for r in _strict_rows(tmp_path / "logs.jsonl")] == [1, 2, 3]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_empty_or_foreign_folder_is_fine_and_resume_excludes_overwrite(tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    make_trainer(tokenizer, tmp_path / "empty", max_steps=1).train()
    with pytest.raises(ValueError, match="exclude each other"):
        TrainingConfig(output_dir=str(tmp_path), resume=True, overwrite_output_dir=True).validate()


# ---------------------------------------------------------------------------------------- 4. damaged checkpoint
@pytest.mark.parametrize("damage", ["truncate", "scramble_header"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tokenizer, tmp_path, caplog, damage):
    common = dict(max_steps=8, save_steps=2, save_total_limit=0)
    ref = make_trainer(tokenizer, tmp_path / "ref", **common)
    ref.train()
    run = tmp_path / "run"
    _run_with_crash(tokenizer, run, **common)
    bad = run / "checkpoints" / "step-0000006" / "model.safetensors"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    else:  # same size, unreadable header
        bad.write_bytes(b"\xff" * 16 + data[16:])
    with caplog.at_level(logging.WARNING, logger="dlmdistill"):
        resumed = make_trainer(tokenizer, run, resume=True, **common)
        resumed.train()
    warning = [r.getMessage() for r in caplog.records if "cannot be resumed from" in r.getMessage()]
    assert len(warning) == 1 and "step-0000006" in warning[0] and "model.safetensors" in warning[0]
    assert (run / "checkpoints" / "damaged-step-0000006").is_dir()  # kept for inspection, out of the way
    _assert_bit_equal(_weights(ref), _weights(resumed))


def test_no_intact_checkpoint_is_a_clear_error(tokenizer, tmp_path):
    make_trainer(tokenizer, tmp_path, max_steps=2, save_steps=1, save_total_limit=0).train()
    for c in (tmp_path / "checkpoints").glob("step-*"):
        (c / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        make_trainer(tokenizer, tmp_path, max_steps=4, resume=True).train()


# ---------------------------------------------------------------------------------------- 5. log after resume
def test_log_after_resume_has_each_step_once_and_matches_an_uninterrupted_run(tokenizer, tmp_path):
    common = dict(max_steps=12, save_steps=5, logging_steps=1)
    make_trainer(tokenizer, tmp_path / "ref", **common).train()
    run = tmp_path / "run"
    _run_with_crash(tokenizer, run, **common)  # logged steps 1-6, checkpoint at 5
    assert [r["step"] for r in _strict_rows(run / "logs.jsonl")] == [1, 2, 3, 4, 5, 6]
    make_trainer(tokenizer, run, resume=True, **common).train()
    ref_rows, rows = _strict_rows(tmp_path / "ref" / "logs.jsonl"), _strict_rows(run / "logs.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    drop = {"elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref_rows]


def test_report_deduplicates_old_logs_by_step_last_wins(tmp_path):
    from dlmdistill.report import load_run, series

    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0},
            {"step": 2, "eval/accuracy": 10.0},
            {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.5}, {"step": 4, "loss": None}]
    (tmp_path / "logs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(tmp_path)
    assert series(run, "loss") == ([1, 2, 3], [3.0, 2.5, 1.5])
    assert series(run, "eval/accuracy") == ([2], [10.0])


def test_resume_without_a_checkpoint_starts_over_with_an_empty_log(tokenizer, tmp_path):
    common = dict(max_steps=10, save_steps=0, logging_steps=1)
    _run_with_crash(tokenizer, tmp_path, **common)  # steps 1-6 logged, no checkpoint
    assert latest_checkpoint(tmp_path) is None and len(_strict_rows(tmp_path / "logs.jsonl")) == 6
    make_trainer(tokenizer, tmp_path, resume=True, **common).train()
    make_trainer(tokenizer, tmp_path / "ref", **common).train()
    drop = {"elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in _strict_rows(tmp_path / "logs.jsonl")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _strict_rows(tmp_path / "ref" / "logs.jsonl")]


# ---------------------------------------------------------------------------------------- 6. convert
def test_convert_ar_from_a_missing_source_creates_nothing(tmp_path):
    dst = tmp_path / "out" / "model"
    proc = _cli("convert", "ar", str(tmp_path / "no-such-model"), str(dst), cwd=tmp_path)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []  # neither the destination nor its parent was created


def test_a_conversion_failing_midway_leaves_no_destination(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests" / "convert"))
    try:
        from test_llada import make_source
    finally:
        sys.path.pop(0)
    from dlmdistill.convert import common, convert_llada

    make_source(tmp_path / "src")

    def disk_full(shards, remap, dst, dtype):
        (dst / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    real = common.write_weights  # the LLaDA converter writes through common.convert_folder
    monkeypatch.setattr(common, "write_weights", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dst, no temporary folder
    monkeypatch.setattr(common, "write_weights", real)
    convert_llada(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_every_converter_writes_through_a_staged_destination():
    """The llada, dream, smdm and ar converters all create their destination through
    staged_destination (never mkdir before the source is loaded)."""
    folder = ROOT / "src" / "dlmdistill" / "convert"
    common = (folder / "common.py").read_text()
    pipeline = common[common.index("def convert_folder("):]
    assert "with staged_destination(" in pipeline and ".mkdir(" not in pipeline  # the pipeline of llada, dream
    for name in ("llada", "dream", "smdm", "ar"):
        text = (folder / f"{name}.py").read_text()
        assert ("with staged_destination(" in text or "return convert_folder(" in text) and ".mkdir(" not in text, name
