"""Shared fixtures: the read-only data folder of the project (optional)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("DLMDISTILL_SHARED", Path(__file__).parents[2] / "../shared")).resolve()


@pytest.fixture
def shared_data() -> Path:
    """``<shared>/data``; skips the test when the folder is absent (set DLMDISTILL_SHARED)."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared data folder not found at {data} (set DLMDISTILL_SHARED to the folder holding data/)")
    return data
