"""Run the runs of an experiment in parallel: one process per run, N at a time, with a deadline.

The drivers train their runs one after another. With ``--only`` (a run's folder name, or a shell
pattern) one invocation trains one run, so a machine with many cores or one GPU that a tiny model
leaves mostly idle can train many runs at once; a last invocation without ``--only`` (or with stages
that only summarise) then writes the tables from every finished run.

    python experiments/parallel.py jobs.txt --jobs 16 --deadline 480 --logs logs/

``jobs.txt`` holds one shell command per line (blank lines and ``#`` comments are skipped), in
priority order: the first N start at once, the next one whenever one ends. No job starts after
``--deadline`` seconds; jobs still running at ``--kill-after`` seconds are stopped (the drivers resume
an interrupted run from its last checkpoint when invoked again). Each job's output goes to
``LOGS/job-<i>.log``; ``LOGS/jobs.json`` records every job's command, exit status and seconds.
Exits 1 if any job failed or was stopped, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def read_jobs(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def run_jobs(commands: list[str], *, jobs: int, deadline: float, kill_after: float, logs: Path,
             env: dict[str, str] | None = None) -> list[dict]:
    """Run ``commands`` ``jobs`` at a time; returns one record per command (status ``ok``, ``failed``,
    ``stopped`` at ``kill_after``, or ``not started`` after ``deadline``)."""
    logs.mkdir(parents=True, exist_ok=True)
    records = [{"command": c, "status": "not started", "returncode": None, "seconds": None} for c in commands]
    pending = list(range(len(commands)))
    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    t0 = time.time()

    def write() -> None:
        (logs / "jobs.json").write_text(json.dumps(records, indent=2))

    while pending or running:
        now = time.time() - t0
        while pending and len(running) < jobs and now < deadline:
            i = pending.pop(0)
            out = open(logs / f"job-{i}.log", "w")
            # a new process group: stopping a job stops what it started (accelerate, torchrun)
            proc = subprocess.Popen(commands[i], shell=True, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)
            running[i] = (proc, time.time(), out)
            records[i]["status"] = "running"
            print(f"[{now:6.0f} s] start job {i}: {commands[i]}", flush=True)
        if now >= deadline:
            pending.clear()
        for i, (proc, started, out) in list(running.items()):
            code = proc.poll()
            if code is None and time.time() - t0 >= kill_after:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    code = proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    code = proc.wait()
                records[i]["status"] = "stopped"
            elif code is None:
                continue
            else:
                records[i]["status"] = "ok" if code == 0 else "failed"
            out.close()
            records[i].update(returncode=code, seconds=round(time.time() - started, 1))
            del running[i]
            print(f"[{time.time() - t0:6.0f} s] job {i} {records[i]['status']} ({records[i]['seconds']} s)",
                  flush=True)
            write()
        time.sleep(0.5)
    write()
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs_file", type=Path, help="one shell command per line, in priority order")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="jobs at once (default: CPU count)")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="start no job after this many seconds")
    ap.add_argument("--kill-after", type=float, default=float("inf"),
                    help="stop the jobs still running after this many seconds")
    ap.add_argument("--logs", type=Path, default=Path("parallel-logs"), help="folder for job logs and jobs.json")
    a = ap.parse_args()
    if not a.jobs_file.is_file():
        ap.error(f"{a.jobs_file}: no such file")
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    records = run_jobs(read_jobs(a.jobs_file), jobs=a.jobs, deadline=a.deadline, kill_after=a.kill_after,
                       logs=a.logs)
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "stopped", "not started")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    sys.exit(0 if counts["ok"] == len(records) else 1)


if __name__ == "__main__":
    main()
