"""benchmarks/bench_overhead.py at a smoke size: both sides train, and the ratio is reported (its target,
at most 1.10x, is the benchmark's to print, not a timed test's)."""

from __future__ import annotations

from tests.conftest import ROOT, load_script


def test_bench_overhead_smoke(capsys):
    bench = load_script(ROOT / "benchmarks" / "bench_overhead.py")
    rows = bench.main(["--presets", "tiny", "--batch", "4", "--steps", "1", "--repeats", "1"])
    assert [(r["method"], r["preset"]) for r in rows] == [("sft", "tiny"), ("selffusion", "tiny")]
    assert all(r["bare_ms"] > 0 and r["trainer_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| trainer / bare |" in capsys.readouterr().out
