"""`lab report <study>`: per-cell table (best over lr), Zoology-style plots, Optuna's plots, TensorBoard.

Everything goes to runs/<study>/report/: report.md, cells.csv, runs.json, *.png, and tb/ (TensorBoard).
"""

import csv
import fcntl
import json
import math
import os
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import optuna
from matplotlib.ticker import FuncFormatter, NullFormatter
from optuna.trial import TrialState

from lab.cli import human_bytes
from lab.config import to_dict
from lab.errors import LabError
from sweeps.spec import LR_KEY, MEMBER_AXES, VARIANT_KEY, Sweep, cell_key, load_sweep
from sweeps.study import create_or_load, launches, recorded_sweep
from sweeps.worker import done_count


def write_report(study_name: str, runs_dir: str = "runs", storage: str | None = None) -> dict:
    study_dir = Path(runs_dir) / study_name
    sweep_file = study_dir / "sweep.yaml"
    if sweep_file.is_file():
        sweep = load_sweep(str(sweep_file), [f"sweep.storage={storage}"] if storage else [])
    elif storage:  # a study launched elsewhere: its settings are in its storage
        sweep = recorded_sweep(study_name, storage, runs_dir)
    else:
        raise LabError(f"no sweep at {study_dir} (no sweep.yaml there); run `lab sweep` first, pass --runs-dir, "
                       "or --storage URL of a study launched elsewhere")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_or_load(sweep, create=False)
    runs = collect_runs(study, sweep)
    if not runs:
        raise LabError(f"study {study_name!r} has no finished runs yet")
    cells = best_per_cell(runs, sweep.cfg.metric, sweep.cfg.direction)
    if sweep.cfg.sampler == "grid":
        # the file's order (variants, then axes), not the order in which workers happened to finish
        order = {cell_key(c): i for i, c in enumerate(sweep.grid_cells())}
        cells.sort(key=lambda c: order.get(c["cell"], len(order)))

    out_dir = study_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    # two launchers ending one study (or a rerun) rewrite the report one after the other, never interleaved
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _write(out_dir, study_name, sweep, study, runs, cells)


def _write(out_dir: Path, study_name: str, sweep: Sweep, study, runs: list[dict], cells: list[dict]) -> dict:
    metric = sweep.cfg.metric
    rows = [cell_row(cell, metric, sweep) for cell in cells]
    mad = mad_section(runs)
    progress = (done_count(sweep, study.get_trials(deepcopy=False)), sweep.budget())
    (out_dir / "report.md").write_text(markdown(study_name, sweep, rows, runs, launches(study), progress) + mad)
    with open(out_dir / "cells.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "runs.json").write_text(json.dumps(runs, indent=2, default=str))

    figures = {
        "accuracy_vs_d_model": zoology_plot(cells, "d_model", metric),
        "accuracy_vs_state_size": zoology_plot(cells, "state_size_bytes", metric),
        "ablation": ablation_chart(cells, metric, sweep),
        **optuna_plots(study),
    }
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path.name)
    # a new tb/ replaces the old one: TensorBoard shows one copy of each figure however often the report runs
    fresh, stale = out_dir / f".tb-new-{os.getpid()}", out_dir / f".tb-old-{os.getpid()}"
    log_tensorboard(fresh, figures, rows, metric, (out_dir / "report.md").read_text())
    if (out_dir / "tb").exists():
        (out_dir / "tb").rename(stale)
    fresh.rename(out_dir / "tb")
    shutil.rmtree(stale, ignore_errors=True)
    for fig in figures.values():
        if fig is not None:
            plt.close(fig)
    return {"dir": str(out_dir), "figures": written, "cells": rows, "table": rich_table(rows, metric)}


def collect_runs(study: optuna.Study, sweep: Sweep) -> list[dict]:
    """Every trained run (complete or pruned; failures listed too), with its full config from summary.json, or,
    for a run trained on another host (a shared PostgreSQL study) or whose directory is gone, the config the sweep
    file and the trial's overrides resolve to (the same one the worker trained)."""
    runs = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if not trial.state.is_finished() or "duplicate_of" in attrs or "overrides" not in attrs:
            continue
        if trial.state == TrialState.FAIL and "error" not in attrs:
            continue  # lost with its worker; its re-run is another trial
        summary_path = Path(attrs.get("run_dir", "")) / "summary.json"
        if summary_path.is_file():
            config = json.loads(summary_path.read_text())["config"]
        else:
            config = to_dict(sweep.run_config(attrs["overrides"], **sweep.trial_placement(trial.number)))
        runs.append({
            "trial": trial.number, "state": trial.state.name.lower(), "overrides": attrs["overrides"],
            "cell": attrs.get("cell", ""), "lr": attrs["overrides"].get(LR_KEY, config.get("trainer", {}).get("lr")),
            "error": attrs.get("error"), "pruned_at": attrs.get("pruned_at"), "config": config,
            "started": trial.datetime_start, "completed": trial.datetime_complete,
            **{k: attrs.get(k) for k in ("best_val_acc", "final_val_acc", "final_val_loss", "params",
                                         "state_size_bytes", "wall_seconds", "steps", "run_dir", "stacked_with",
                                         "warmup_seconds", "train_step_ms_median")},
        })
    return runs


def best_per_cell(runs: list[dict], metric: str, direction: str) -> list[dict]:
    """Zoology's protocol: a cell (a run up to its lr and seed) scores the best of its lrs, an lr the mean over its
    seeds (`score`, with `score_std` over them and their count `seeds`); `best` is that lr's best run, whose config
    the plots and tables read. Cells keep first-seen order."""
    by_cell = defaultdict(list)
    for run in sorted(runs, key=lambda r: r["trial"]):
        by_cell[run["cell"]].append(run)
    sign = 1 if direction == "maximize" else -1
    cells = []
    for cell, members in by_cell.items():
        by_lr = defaultdict(list)
        for run in members:
            if run.get(metric) is not None and not _nan(run[metric]):
                by_lr[run["lr"]].append(run)
        means = {lr: statistics.fmean(r[metric] for r in scored) for lr, scored in by_lr.items()}
        best_lr = max(means, key=lambda lr: sign * means[lr]) if means else None
        scored = by_lr.get(best_lr, [])
        cells.append({
            "cell": cell, "overrides": {k: v for k, v in members[0]["overrides"].items() if k not in MEMBER_AXES},
            "best": max(scored, key=lambda r: sign * r[metric]) if scored else None, "runs": members,
            "score": means.get(best_lr), "seeds": len(scored),
            "score_std": statistics.stdev(r[metric] for r in scored) if len(scored) > 1 else None,
        })
    return cells


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def cell_row(cell: dict, metric: str, sweep: Sweep) -> dict:
    best = cell["best"] or {}
    config = best.get("config") or {}
    runs = cell["runs"]
    return {
        "cell": sweep.describe(cell["overrides"]) or "(base)",
        "model": config.get("model", {}).get("name", ""),
        "d_model": config.get("model", {}).get("d_model", ""),
        "seq_len": config.get("task", {}).get("seq_len", ""),
        "num_kv_pairs": config.get("task", {}).get("num_kv_pairs", ""),
        metric: round(cell["score"], 4) if best else "",  # the cell's best over its lrs (an lr: mean over seeds)
        **({f"{metric}_std": "" if cell["score_std"] is None else round(cell["score_std"], 4), "seeds": cell["seeds"]}
           if sweep.cfg.seeds else {}),
        "lr": best.get("lr", ""),
        "params": best.get("params", ""),
        "state_size_bytes": best.get("state_size_bytes", ""),
        "wall_seconds": round(sum(r.get("wall_seconds") or 0 for r in runs), 1),
        "runs": f"{sum(r['state'] == 'complete' for r in runs)} done, {sum(r['state'] == 'pruned' for r in runs)} "
                f"pruned, {sum(r['state'] == 'fail' for r in runs)} failed",
        "best_trial": best.get("trial", ""),
    }


def markdown(study_name: str, sweep, rows: list[dict], runs: list[dict], launched: list[dict],
             progress: tuple[int, int]) -> str:
    columns = list(rows[0])
    lines = [f"# Study `{study_name}`", "",
             (f"Storage `{sweep.storage_shown}`; sampler {sweep.cfg.sampler}; metric {sweep.cfg.metric} "
              f"({sweep.cfg.direction}); each cell's score is its best over lr {sweep.cfg.lrs or '(not swept)'}"
              + (f", an lr's the mean over init seeds {sweep.cfg.seeds}." if sweep.cfg.seeds else ".")),
             "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    lines += ["", time_section(runs, launched, *progress)]
    lines += stacks_section(runs, sweep)
    failures = [r for r in runs if r["error"]]
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- trial {r['trial']} ({sweep.describe(r['overrides'])}): {r['error']}" for r in failures]
    lines += ["", "Figures: " + ", ".join(f"`{n}.png`" for n in ("accuracy_vs_d_model", "accuracy_vs_state_size",
                                                                  "ablation", "optimization_history",
                                                                  "param_importances")), ""]
    return "\n".join(lines)


def time_section(runs: list[dict], launched: list[dict], done: int, budget: int) -> str:
    """How long the study took: its launches' wall time, and the runs' own training time (a stacked run's share of
    its stack), which is what one worker would need for the whole study one run after another. A study not yet
    done says how far it is, and what the rest would take at the launches' mean rate so far."""
    training = sum(r.get("wall_seconds") or 0 for r in runs)
    total = sum(launch["seconds"] for launch in launched)
    where = ", ".join(f"{launch['started']} on {launch['host']} ({launch['workers']} worker(s)"
                      + (f", GPUs {','.join(launch['gpus'])}" if launch["gpus"] else "")
                      + (f", {_counted(launch['gpu_names'])}" if launch.get("gpu_names") else "")
                      + f"): {launch['seconds']:.0f} s" for launch in launched)
    # launches recorded since 2026-12-07 know when their last trial finished; a launch cut off with its machine
    # spent the rest on runs that start again
    tail = sum(launch["seconds"] - launch["last_result_seconds"] for launch in launched if "last_result_seconds" in launch)
    return (f"Time: {total:.0f} s ({total / 3600:.2f} h) of wall time over {len(launched)} launch(es)"
            + (f" [{where}]" if launched else "")
            + (f", of which {tail:.0f} s after a launch's last finished trial (the closing report, stacks "
               f"sweep.deadline sent to a later launch, or a stack cut off with its machine, to be run again)" if tail >= 1 else "")
            + f"; the runs' training time summed: {training:.0f} s ({training / 3600:.2f} h)."
            + _progress(total - tail, done, budget))


def stacks_section(runs: list[dict], sweep: Sweep) -> list[str]:
    """Per stack of a stacked sweep (sweep.stack_lrs), in the order they started: wall time from its first member's
    start to its last member's end (model build, compile, data and validations included), its warm-up (the steps'
    time above the median step: mostly compiles), the median step of the stack, and its best member. What a
    stack costs is what decides how to split a long study into pieces."""
    stacks = defaultdict(list)
    for run in runs:
        if run.get("stacked_with") and run["started"] and run["completed"]:
            stacks[tuple(run["stacked_with"])].append(run)
    if not stacks:
        return []
    metric = sweep.cfg.metric
    sign = 1 if sweep.cfg.direction == "maximize" else -1
    lines = ["", "## Stacks", "", f"| trials | cell | wall | warm-up | step | steps | {metric}: best (lr) | started |",
             "|---|---|---|---|---|---|---|---|"]
    # runs come in trial order, so each stack's members do too
    for started, members in sorted(((min(r["started"] for r in m), m) for m in stacks.values()), key=lambda p: p[0]):
        wall = (max(r["completed"] for r in members) - started).total_seconds()
        scored = [r for r in members if r.get(metric) is not None and not _nan(r[metric])]
        best = max(scored, key=lambda r: sign * r[metric]) if scored else None
        steps = sorted(r["steps"] for r in members if r.get("steps") is not None)
        warmup = max((r["warmup_seconds"] for r in members if r.get("warmup_seconds") is not None), default=None)
        step_ms = [r["train_step_ms_median"] for r in members if r.get("train_step_ms_median")]
        lines.append(" | ".join([
            f"| {','.join(str(r['trial']) for r in members)}",
            sweep.describe({k: v for k, v in members[0]["overrides"].items() if k not in MEMBER_AXES}) or "(base)",
            f"{wall:.0f} s", "" if warmup is None else f"{warmup:.0f} s",
            f"{statistics.median(step_ms):.1f} ms" if step_ms else "",
            (f"{steps[0]}-{steps[-1]}" if steps[0] != steps[-1] else str(steps[0])) if steps else "",
            f"{best[metric]:.4f} ({best['lr']:g})" if best else "", f"{started:%Y-%m-%d %H:%M:%S}"]) + " |")
    return lines


def _progress(seconds: float, done: int, budget: int) -> str:
    if done >= budget:
        return ""
    line = f" Done: {done} of {budget} trials"
    if done and seconds:
        # a mean over the cells run so far (the launches' time up to their last result: what bought the trials);
        # cells differ (width, length, mixer), so this is a rough guide
        line += (f"; at {seconds / done:.0f} s a trial so far, the {budget - done} left would take about "
                 f"{(budget - done) * seconds / done / 3600:.1f} h more")
    return line + "."


def _counted(names: list[str]) -> str:
    """['NVIDIA H200', 'NVIDIA H200'] -> '2x NVIDIA H200'."""
    return ", ".join(f"{names.count(name)}x {name}" for name in dict.fromkeys(names))


def mad_section(runs: list[dict]) -> str:
    """MAD scores per model when the runs cover a MAD difficulty grid (tasks.mad.MAD_GRIDS): per setting the best
    accuracy over everything else swept (lr, weight decay; a run's init seeds count as one run, their mean), per
    task the mean over settings, then the mean."""
    from lab.config import flatten
    from tasks.mad import MAD_GRIDS, mad_scores

    own = {"model_seed", "run_name", "experiment", "runs_dir", "overwrite"}  # keys a run's seeds differ in
    seeds_of = defaultdict(list)  # one run, or a run's init seeds (sweep.seeds: the same config but model_seed)
    for index, run in enumerate(runs):
        if run["config"] and run.get("best_val_acc") is not None:
            flat = flatten(run["config"])
            key = index if run["config"].get("model_seed") is None else repr(
                sorted((k, v) for k, v in flat.items() if k not in own))
            seeds_of[key].append((flat, run["best_val_acc"]))
    by_model = defaultdict(list)
    for seeds in seeds_of.values():
        flat = seeds[0][0]
        by_model[flat["model.name"]].append((flat, statistics.fmean(acc for _, acc in seeds)))
    scores = {model: mad_scores(pairs) for model, pairs in by_model.items()}
    scores = {model: s for model, s in scores.items() if s}
    if not scores:
        return ""
    tasks = [t for t in MAD_GRIDS if any(t in s for s in scores.values())]
    lines = ["", "## MAD scores (accuracy x 100; a task is scored once every one of its settings has a run)", "",
             "| model | " + " | ".join(t.removeprefix("mad_") for t in tasks) + " | mean |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for model, s in sorted(scores.items()):
        cells = [f"{100 * s[t]:.1f}" if t in s else "-" for t in tasks]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {100 * s['mean']:.1f} |")
    return "\n".join(lines) + "\n"


def series_name(cell: dict) -> str:
    """What a line of the Zoology plot follows: the variant if the sweep has them, else the model."""
    overrides = cell["overrides"]
    if VARIANT_KEY in overrides:
        return str(overrides[VARIANT_KEY])
    config = (cell["best"] or {}).get("config") or {}
    return config.get("model", {}).get("name", "run")


def zoology_plot(cells: list[dict], x_key: str, metric: str):
    """Best accuracy vs d_model (or state size), a line per model/variant, a panel per (seq_len, num_kv_pairs)."""
    panels = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        best = cell["best"]
        if not best or not best.get("config"):
            continue
        config = best["config"]
        x = config["model"]["d_model"] if x_key == "d_model" else best.get("state_size_bytes")
        if x is None:
            continue
        panel = (config["task"].get("seq_len"), config["task"].get("num_kv_pairs"))
        panels[panel][series_name(cell)].append((x, cell["score"]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (panel, series) in zip(axes[0], sorted(panels.items(), key=lambda kv: str(kv[0]))):
        for name, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_title(f"seq_len {panel[0]}, kv pairs {panel[1]}" if panel[1] is not None else f"seq_len {panel[0]}")
        ax.set_xscale("log", base=2 if x_key == "d_model" else 10)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}" if x_key == "d_model" else human_bytes(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("d_model" if x_key == "d_model" else "recurrent state (bytes, fp32)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (best over lr)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def ablation_chart(cells: list[dict], metric: str, sweep: Sweep):
    scored = [c for c in cells if c["best"]]
    if not scored:
        return None
    labels = [sweep.describe(c["overrides"]) or "(base)" for c in scored]
    values = [c["score"] for c in scored]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(scored) + 1.2))
    spread = [c["score_std"] or 0.0 for c in scored]  # over init seeds, when the sweep has them
    bars = ax.barh(range(len(scored)), values, color="tab:blue", xerr=spread if any(spread) else None)
    ax.set_yticks(range(len(scored)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xlabel(f"{metric} (best over lr)")
    ax.set_xlim(0, max(1.0, max(values) * 1.1))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def optuna_plots(study: optuna.Study) -> dict:
    """Optuna's optimisation history and parameter importances (skipped while too few trials exist)."""
    import warnings

    from optuna.visualization import matplotlib as optuna_mpl

    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in (("optimization_history", optuna_mpl.plot_optimization_history),
                           ("param_importances", optuna_mpl.plot_param_importances)):
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                figures[name] = None  # e.g. importances need two complete trials and a varied parameter
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4)
            fig.tight_layout()
            figures[name] = fig
    return figures


def log_tensorboard(log_dir: Path, figures: dict, rows: list[dict], metric: str, text: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    # one writer: each SummaryWriter opened on log_dir starts another event file there
    with SummaryWriter(str(log_dir)) as writer:
        for name, fig in figures.items():
            if fig is not None:
                writer.add_figure(f"report/{name}", fig, close=False)
        writer.add_text("report/table", text)
        for index, row in enumerate(rows):
            if row[metric] == "":
                continue
            hparams = {k: (v if isinstance(v, (int, float, str)) else str(v))
                       for k, v in row.items() if k not in (metric, "runs", "best_trial", "wall_seconds")}
            writer.add_hparams(hparams, {f"hp/{metric}": row[metric], "hp/wall_seconds": row["wall_seconds"]},
                               run_name=f"cell-{index:03d}")


def rich_table(rows: list[dict], metric: str):
    from rich.table import Table

    table = Table(show_edge=False, title="best over lr per cell", title_justify="left")
    for column in ("cell", f"{metric} (best lr)", "lr", "params", "state size", "wall time", "runs"):
        table.add_column(column, justify="left" if column in ("cell", "runs") else "right")
    for row in rows:
        size = row["state_size_bytes"]
        table.add_row(row["cell"], f"{row[metric]:.3f}" if row[metric] != "" else "", f"{row['lr']:.2g}" if isinstance(row["lr"], float) else str(row["lr"]),
                      f"{row['params']:,}" if row["params"] != "" else "", human_bytes(size) if size != "" else "",
                      f"{row['wall_seconds']:.0f} s", row["runs"])
    return table
