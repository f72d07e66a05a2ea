"""Shared fixtures: tiny models and tokenizers built in memory (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dlmdistill.models import ModelConfig, build_model, char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DLMDISTILL_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(1)  # tests are small: one thread is faster and fair to a shared machine


@pytest.fixture
def shared_data() -> Path:
    d = SHARED / "data"
    if not d.exists():
        pytest.skip(f"shared data folder not found at {d} (set DLMDISTILL_SHARED)")
    return d


def load_script(path: Path, name: str | None = None):
    """A script that is not part of the package (``benchmarks/``, ``experiments/``) loaded as a module; registered
    in ``sys.modules`` under ``name`` (default: the file's stem) so that its dataclasses and pickling work."""
    import importlib.util
    import sys

    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tokenizer():
    return char_tokenizer(["0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:\n"])


def tiny_model(tokenizer, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(name_or_path="preset:tiny", preset_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                                    "num_attention_heads": 4, **overrides})
    model, tok = build_model(cfg, tokenizer=tokenizer)
    return model.eval(), tok


@pytest.fixture
def model_and_tok(tokenizer):
    return tiny_model(tokenizer)
