"""``dlmdistill report RUN_DIR ...``: compare runs in Markdown tables and PNG plots.

A run folder (written by ``dlmdistill train``) holds ``config.yaml``, ``run.json`` (method),
``logs.jsonl`` (training metrics per logging step, ``eval/*`` entries from periodic evaluation),
``final_metrics.json`` and, after ``dlmdistill evaluate``, ``eval/<task>/metrics.json``.

The report has:
* a summary table (method, steps, final training loss, final evaluation metrics);
* the evaluation table of every ``eval/<task>/metrics.json`` (mean ± std over seeds per step count);
* one figure per logged metric with every run that logged it on the same axes (training curves,
  method diagnostics such as SelfFusion's direction fractions or d-OPSD's clip ratio), and
  accuracy-vs-optimizer-steps from periodic evaluation (the d-OPSD paper's Figure 1).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .errors import UserError

#: metrics plotted first and in this order, when present
PREFERRED = ["eval/accuracy", "eval/rouge_l", "loss", "masked_acc", "reward", "accuracy"]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte offset {e.start})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def load_run(path: str | Path) -> dict[str, Any]:
    """A run folder's metadata, logs and metrics. A missing folder, a folder with none of the files
    ``dlmdistill train``/``evaluate`` write, and a malformed file are :class:`UserError` naming the
    path (and line)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run folder")
    if not path.is_dir():
        raise UserError(f"{path}: not a run folder (it is a file)")
    run: dict[str, Any] = {"path": str(path), "name": path.name, "logs": [], "evals": {}, "final": {}}
    meta = path / "run.json"
    run["method"] = "?"
    if meta.exists():
        info = _read_json(meta)
        run["method"] = info.get("method", "?") if isinstance(info, dict) else "?"
    logs = path / "logs.jsonl"
    if logs.exists():
        for i, line in enumerate(_read_text(logs).splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{logs}:{i}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                    raise UserError(f"{logs}:{i}: expected a JSON object with a numeric 'step', got {line.strip()[:80]}")
                run["logs"].append(rec)
    run["logs"] = dedupe_logs(run["logs"])
    final = path / "final_metrics.json"
    if final.exists():
        run["final"] = _read_json(final)
    for m in sorted(path.glob("eval/*/metrics.json")):
        run["evals"][m.parent.name] = _read_json(m)
    if not (meta.exists() or logs.exists() or final.exists() or run["evals"]):
        raise UserError(f"{path}: not a run folder (no run.json, logs.jsonl, final_metrics.json or "
                        f"eval/*/metrics.json in it)")
    return run


def dedupe_logs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (step, kind) -- kind: training metrics or ``eval/*`` -- the last one written wins
    (logs of runs resumed by older versions repeat the steps after the checkpoint); sorted by step.
    Non-finite values are written as null and are skipped by :func:`series`."""
    last: dict[tuple[Any, bool], dict[str, Any]] = {}
    for rec in rows:
        key = (rec.get("step"), any(k.startswith("eval/") for k in rec))
        last.pop(key, None)  # re-inserted: keeps the order of the last occurrence
        last[key] = rec
    return sorted(last.values(), key=lambda r: r["step"] if isinstance(r.get("step"), (int, float)) else -1)


def series(run: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of a logged metric; x = optimizer steps (gradient updates; diffu-GRPO takes mu per
    logged step), or the logged step for logs written before that field existed."""
    xs, ys = [], []
    for rec in run["logs"]:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(rec.get("optimizer_steps", rec["step"]))
            ys.append(float(v))
    return xs, ys


def metric_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys: set[str] = set()
    for r in runs:
        for rec in r["logs"]:
            keys.update(k for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    keys -= {"step", "optimizer_steps", "epoch", "elapsed_s", "lr"}
    return [k for k in PREFERRED if k in keys] + sorted(keys - set(PREFERRED))


def summary_table(runs: list[dict[str, Any]]) -> str:
    final_keys = sorted({k for r in runs for k in r["final"]})
    head = ["run", "method", "steps", "final loss"] + final_keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        steps = r["logs"][-1]["step"] if r["logs"] else 0
        _, loss = series(r, "loss")
        row = [r["name"], r["method"], str(steps), f"{loss[-1]:.4f}" if loss else "-"]
        row += [f"{r['final'][k]:.2f}" if isinstance(r["final"].get(k), (int, float)) else "-" for k in final_keys]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def eval_tables(runs: list[dict[str, Any]]) -> str:
    """One table per task: rows = runs, columns = step counts, cells = mean ± std over seeds."""
    tasks = sorted({t for r in runs for t in r["evals"]})
    out = []
    for task in tasks:
        reports = [(r["name"], r["evals"][task]) for r in runs if task in r["evals"]]
        steps = sorted({int(s) for _, rep in reports for s in rep["results"]})
        key = "accuracy" if reports[0][1]["metric"] == "accuracy" else reports[0][1]["metric"]
        out.append(f"### {task} ({key})\n")
        out.append("| run | " + " | ".join(f"{s} steps" for s in steps) + " |")
        out.append("|---|" + "---:|" * len(steps))
        for name, rep in reports:
            cells = []
            for s in steps:
                res = rep["results"].get(str(s))
                cells.append(f"{res['summary'][key]['mean']:.2f} ± {res['summary'][key]['std']:.2f}" if res else "-")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_metric(runs: list[dict[str, Any]], key: str, path: Path, smoothing: int = 1) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for r in runs:
        xs, ys = series(r, key)
        if xs:
            ax.plot(xs, smooth(ys, 1 if key.startswith("eval/") else smoothing), label=r["name"],
                    marker="o" if key.startswith("eval/") else None, markersize=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(run_dirs: list[str], out: str | Path, smoothing: int = 5, metrics: list[str] | None = None) -> Path:
    """Write ``out`` (Markdown) and its PNG figures next to it; returns the Markdown path."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    fig_dir = out.parent / (out.stem + "_figures")
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# dlmdistill report", "", "Runs: " + ", ".join(f"`{r['path']}`" for r in runs), "",
             "## Summary", "", summary_table(runs), ""]
    if any(r["evals"] for r in runs):
        parts += ["## Evaluation", "", eval_tables(runs)]
    keys = metrics or metric_keys(runs)
    figs = []
    for key in keys:
        png = fig_dir / (key.replace("/", "_") + ".png")
        if plot_metric(runs, key, png, smoothing):
            figs.append((key, png))
    if figs:
        parts += ["## Curves", ""]
        for key, png in figs:
            parts += [f"### {key}", "", f"![{key}]({png.relative_to(out.parent)})", ""]
    out.write_text("\n".join(parts) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlmdistill report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="report.md", help="Markdown file to write (figures go beside it)")
    p.add_argument("--smoothing", type=int, default=5, help="moving-average window for training curves")
    p.add_argument("--metrics", nargs="*", default=None, help="only these metrics (default: all logged)")
    a = p.parse_args(argv)
    path = render(a.runs, a.out, a.smoothing, a.metrics)
    print(f"wrote {path}")
    return 0
