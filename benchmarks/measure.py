"""Measurement helpers shared by the benchmarks: command line, median wall time and peak tensor memory."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch


def bench_args(doc: str) -> argparse.Namespace:
    """``--quick`` and ``--device`` of a benchmark script; prints the device line every report starts with."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    print(f"device: {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    return a


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak tensor memory during ``fn()`` minus the memory before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the torch profiler's memory timeline, which
    records every tensor the CPU allocator hands out (transient ones such as full logits included).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline: the CPU timeline has no successor yet
        prof.export_memory_timeline(str(Path(d) / "timeline.json"), device="cpu")
        _, sizes = json.loads((Path(d) / "timeline.json").read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]
