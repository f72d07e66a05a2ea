"""experiments/parallel.py: N jobs at a time, failures reported, a deadline and a stop time honoured."""

import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("parallel", ROOT / "experiments" / "parallel.py")
parallel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parallel)


def test_jobs_run_concurrently_and_failures_are_reported(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # each job records when it started and ended; two at a time must overlap
    cmds = [f"date +%s.%N > {marks}/{i}.start; sleep 1; date +%s.%N > {marks}/{i}.end" for i in range(3)]
    cmds.append("echo broken >&2; exit 3")
    records = parallel.run_jobs(cmds, jobs=2, deadline=float("inf"), kill_after=float("inf"), logs=tmp_path / "logs")
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "failed"]
    assert records[3]["returncode"] == 3
    assert "broken" in (tmp_path / "logs" / "job-3.log").read_text()
    start = {i: float((marks / f"{i}.start").read_text()) for i in range(3)}
    end = {i: float((marks / f"{i}.end").read_text()) for i in range(3)}
    assert start[1] < end[0]  # jobs 0 and 1 ran at the same time
    assert start[2] >= min(end[0], end[1]) - 0.05  # job 2 waited for a free slot
    assert json.loads((tmp_path / "logs" / "jobs.json").read_text()) == records


def test_no_job_starts_after_the_deadline_and_late_jobs_are_stopped(tmp_path):
    cmds = ["sleep 30", "true", "true"]
    t0 = time.time()
    records = parallel.run_jobs(cmds, jobs=1, deadline=0.5, kill_after=1.5, logs=tmp_path / "logs")
    assert time.time() - t0 < 10
    assert [r["status"] for r in records] == ["stopped", "not started", "not started"]


def test_read_jobs_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("# a comment\n\necho a\n  echo b  \n#echo c\n")
    assert parallel.read_jobs(path) == ["echo a", "echo b"]
