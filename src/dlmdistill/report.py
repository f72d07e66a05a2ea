"""``dlmdistill report RUN_DIR ...``: compare runs in Markdown tables and PNG plots.

A run folder (written by ``dlmdistill train``) holds ``config.yaml``, ``run.json`` (method),
``logs.jsonl`` (training metrics per logging step, ``eval/*`` entries from periodic evaluation),
``final_metrics.json`` and, after ``dlmdistill evaluate``, ``eval/<task>/metrics.json``.

The report has:
* a summary table (method, steps, final training loss, final evaluation metrics);
* the evaluation table of every ``eval/<task>/metrics.json`` (mean ± std over seeds per step count,
  the number of items and the generation settings; rows whose settings differ from the first row's
  are flagged, since their numbers are not comparable) and a plot of the metric against the number
  of denoising steps;
* one figure per logged metric with every run that logged it on the same axes (training curves,
  method diagnostics such as SelfFusion's direction fractions or d-OPSD's clip ratio), and
  accuracy-vs-optimizer-steps from periodic evaluation (the d-OPSD paper's Figure 1). Training
  curves are a moving average (``--smoothing`` logged points) drawn over the raw points; ``eval/*``
  curves are not smoothed.
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
        run["evals"][m.parent.name] = _check_eval(_read_json(m), m)
    if not (meta.exists() or logs.exists() or final.exists() or run["evals"]):
        raise UserError(f"{path}: not a run folder (no run.json, logs.jsonl, final_metrics.json or "
                        f"eval/*/metrics.json in it)")
    return run


def _check_eval(rep: Any, path: Path) -> dict[str, Any]:
    """``rep`` (an ``eval/<task>/metrics.json``) has the fields the report reads; else a UserError naming them."""
    if not isinstance(rep, dict):
        raise UserError(f"{path}: expected a JSON object as written by dlmdistill evaluate")
    if not isinstance(rep.get("metric"), str):
        raise UserError(f"{path}: field 'metric' missing or not a string")
    results = rep.get("results")
    if not isinstance(results, dict) or not results:
        raise UserError(f"{path}: field 'results' missing or empty (expected step count -> results)")
    key = rep["metric"]
    for s, res in results.items():
        m = res.get("summary", {}).get(key) if isinstance(res, dict) and isinstance(res.get("summary"), dict) else None
        if not (isinstance(m, dict) and isinstance(m.get("mean"), (int, float)) and isinstance(m.get("std"), (int, float))):
            raise UserError(f"{path}: results.{s}.summary.{key} should hold numeric 'mean' and 'std'")
    return rep


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


#: generation settings compared across the rows of an evaluation table (``n`` = number of items)
SETTINGS = ["n", "gen_length", "block_length", "temperature", "cfg_scale", "remasking"]


def eval_settings(rep: dict[str, Any]) -> dict[str, Any]:
    """The item count and generation settings of an evaluation report (None where not recorded)."""
    gen = rep.get("generation") if isinstance(rep.get("generation"), dict) else {}
    out = {"n": rep.get("n")}
    for k in SETTINGS[1:]:
        out[k] = gen.get(k)
    if out["block_length"] is None and out["gen_length"] is not None and "block_length" in gen:
        out["block_length"] = out["gen_length"]  # null = one block of gen_length
    return out


def step_keys(reports: list[dict[str, Any]]) -> list[str]:
    """The step counts of the reports: numeric ones in increasing order, then others (``ar``)."""
    keys = {str(s) for rep in reports for s in rep["results"]}
    num = sorted((k for k in keys if k.isdigit()), key=int)
    return num + sorted(keys - set(num))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def eval_tables(runs: list[dict[str, Any]]) -> str:
    """One table per task: rows = runs, columns = step counts (cells = mean ± std over seeds), then the
    item count and generation settings; rows whose settings differ from the first row's are flagged."""
    tasks = sorted({t for r in runs for t in r["evals"]})
    out = []
    for task in tasks:
        reports = [(r["name"], r["evals"][task]) for r in runs if task in r["evals"]]
        steps = step_keys([rep for _, rep in reports])
        key = reports[0][1]["metric"]
        ref = eval_settings(reports[0][1])
        out.append(f"### {task} ({key}, mean ± std over seeds)\n")
        head = ["run"] + [f"{s} steps" if s.isdigit() else s for s in steps] + SETTINGS + ["settings differ"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * (len(steps) + len(SETTINGS)) + "---|")
        flagged = False
        for name, rep in reports:
            cells = []
            for s in steps:
                res = rep["results"].get(s)
                cells.append(f"{res['summary'][key]['mean']:.2f} ± {res['summary'][key]['std']:.2f}" if res else "-")
            st = eval_settings(rep)
            diff = [k for k in SETTINGS if st[k] != ref[k]]
            flagged |= bool(diff)
            cells += [_fmt(st[k]) for k in SETTINGS] + ["**yes: " + ", ".join(diff) + "**" if diff else ""]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
        if flagged:
            out.append(f"Rows marked in 'settings differ' were evaluated with other settings or item counts than "
                       f"the first row ({reports[0][0]}); their numbers are not directly comparable.\n")
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(runs: list[dict[str, Any]], key: str, path: Path, smoothing: int = 1) -> bool:
    """One figure of ``key`` against optimizer steps, a line per run (colour ``C<i>`` = i-th run in every
    figure). Training metrics: the raw logged points as faint dots under their moving average over
    ``smoothing`` points; ``eval/*`` metrics: points joined by lines, not smoothed. A run with one
    point shows as a marker. Returns False (nothing written) when no run logged ``key``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    is_eval = key.startswith("eval/")
    window = 1 if is_eval else max(1, smoothing)
    drawn = False
    for i, r in enumerate(runs):
        xs, ys = series(r, key)
        if not xs:
            continue
        color = f"C{i % 10}"
        if window > 1:
            ax.scatter(xs, ys, s=9, color=color, alpha=0.4, linewidths=0)
        ax.plot(xs, smooth(ys, window), color=color, label=r["name"], linewidth=1.5,
                marker="o" if is_eval or len(xs) == 1 else None, markersize=4)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    title = (f"{key} (moving average over {window} logged points; dots: raw values)" if window > 1
             else f"{key} (not smoothed)")
    _finish(plt, fig, ax, title, path)
    return True



def _finish(plt, fig, ax, title: str, path: Path) -> None:
    """Title, grid and legend, then save the figure to ``path`` and close it."""
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def plot_eval_steps(runs: list[dict[str, Any]], task: str, path: Path) -> bool:
    """The task's metric against the number of denoising steps (log2 axis), mean with ± std error bars
    over seeds, a line per run that evaluated ``task``; an autoregressive run (step key ``ar``) is a
    dashed horizontal line; runs whose settings differ from the first
    run's are labelled so. Returns False when no run has numeric step counts or ``ar`` results."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn, all_steps, key = False, set(), None
    horizontal = []
    ref = next(eval_settings(r["evals"][task]) for r in runs if task in r["evals"])
    for i, r in enumerate(runs):
        rep = r["evals"].get(task)
        if rep is None:
            continue
        key = rep["metric"]
        color = f"C{i % 10}"
        name = r["name"] + (" (settings differ)" if eval_settings(rep) != ref else "")
        steps = [s for s in step_keys([rep]) if s.isdigit()]
        if steps:
            m = [rep["results"][s]["summary"][key]["mean"] for s in steps]
            sd = [rep["results"][s]["summary"][key]["std"] for s in steps]
            ax.errorbar([int(s) for s in steps], m, yerr=sd, color=color, marker="o", markersize=4, capsize=3,
                        label=name)
            all_steps.update(int(s) for s in steps)
            drawn = True
        if "ar" in rep["results"]:
            horizontal.append((rep["results"]["ar"]["summary"][key]["mean"], color, f"{name} (autoregressive)"))
    if not drawn and not horizontal:
        plt.close(fig)
        return False
    for y, color, label in horizontal:
        ax.axhline(y, color=color, linestyle="--", linewidth=1.2, label=label)
    if all_steps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_steps), [str(s) for s in sorted(all_steps)])
        ax.minorticks_off()
    ax.set_xlabel("denoising steps")
    ax.set_ylabel(key)
    _finish(plt, fig, ax, f"{task}: {key} against denoising steps (mean ± std over seeds)", path)
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
        for task in sorted({t for r in runs for t in r["evals"]}):
            png = fig_dir / f"eval_steps_{task}.png"
            if plot_eval_steps(runs, task, png):
                parts += [f"### {task} against denoising steps", "",
                          f"![{task} against denoising steps]({png.relative_to(out.parent)})", ""]
    keys = metrics or metric_keys(runs)
    figs = []
    for key in keys:
        png = fig_dir / (key.replace("/", "_") + ".png")
        if plot_metric(runs, key, png, smoothing):
            figs.append((key, png))
    if figs:
        parts += ["## Curves", ""]
        if smoothing > 1:
            parts += [f"Training curves are moving averages over the last {smoothing} logged points "
                      f"(`--smoothing {smoothing}`), drawn over the raw logged values (faint dots); "
                      f"evaluation curves (`eval/*`) are not smoothed. The x axis counts optimizer steps.", ""]
        else:
            parts += ["Curves are not smoothed (`--smoothing 1`). The x axis counts optimizer steps.", ""]
        for key, png in figs:
            parts += [f"### {key}", "", f"![{key}]({png.relative_to(out.parent)})", ""]
    out.write_text("\n".join(parts) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlmdistill report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="report.md", help="Markdown file to write (figures go beside it)")
    p.add_argument("--smoothing", type=int, default=5, help="moving-average window (logged points) for training "
                   "curves; 1 = no smoothing. The raw points are drawn under the line")
    p.add_argument("--metrics", nargs="*", default=None, help="only these metrics (default: all logged)")
    a = p.parse_args(argv)
    if a.smoothing < 1:
        p.error(f"--smoothing must be >= 1 (1 = no smoothing), got {a.smoothing}")
    path = render(a.runs, a.out, a.smoothing, a.metrics)
    print(f"wrote {path}")
    return 0
