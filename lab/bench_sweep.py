"""`lab bench sweep`: how fast a sweep's trials go through one machine, three ways, in one run.

- one-by-one: `lab train` of one trial (Lightning), the way a plain worker trains;
- K processes: K such trainings at once (`lab sweep --workers K`, or `--gpus 0 --per-gpu K`);
- stacked: the cell's M learning rates as one vmapped model (`sweep.stack_lrs=true`, lab/stacked.py);
- with compile=true also one-by-one and stacked under torch.compile (`trainer.compile=true`);
- with process_stack=M the K processes each train a stack of M lrs (compiled with compile=true): what
  `lab sweep --gpus 0 --per-gpu K sweep.stack_lrs=true` does.

Each variant trains `steps` steps of one sweep cell (default: the 2-layer attention, d 128, L 256 cell of
configs/sweeps/mqar_paper.yaml) with one validation at the end, and reports training tokens/s over all
members or processes, ms per step and seconds per validation. From those and the data set-up time of a full
trial it estimates trials per hour for trials of that sweep's size (its epochs, examples and validations).
"""

import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.config import RunConfig, load_config, to_dict
from lab.errors import LabError
from sweeps.spec import load_sweep

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SWEEP = ROOT / "configs" / "sweeps" / "mqar_paper.yaml"
LRS = [1e-4, 4.6e-4, 2.2e-3, 1e-2, 3e-4, 1e-3, 3e-3, 3e-2]  # the stacked members' lrs (mqar_paper's first)
DEFAULT_CELL = {"variant": "attention", "task.seq_len": 256, "task.num_kv_pairs": 16, "model.d_model": 128}


def cell_config(sweep_file: str, cell: dict, lr: float, run_name: str, runs_dir: str, steps: int | None) -> RunConfig:
    """The run of one sweep cell at one lr; `steps`: cut to that many steps in one epoch, one validation."""
    sweep = _sweep(sweep_file)
    variants = sweep.cfg.variants or {}
    if "variant" in cell and cell["variant"] not in variants:
        raise LabError(f"variant={cell['variant']}: not a variant of {sweep_file}; "
                       f"available: {', '.join(variants) or '(none: leave variant out)'}")
    variant = dict(variants.get(cell.get("variant"), {}))
    keys = {**variant, **{k: v for k, v in cell.items() if k != "variant"}, "trainer.lr": lr}
    run = sweep.run_config(keys, runs_dir=runs_dir, run_name=run_name, experiment="bench_sweep", overwrite=True)
    if steps is None:
        return run
    dotlist = [f"data.num_train={steps * run.trainer.batch_size}", "trainer.max_epochs=1", "trainer.max_steps=-1",
               "trainer.val_every_n_steps=0", "trainer.val_every_n_epochs=1", "trainer.progress=none",
               "trainer.early_stop_acc=2.0"]  # no early stop: every variant trains every step
    return load_config([], dotlist, base=to_dict(run))


@functools.cache
def _sweep(sweep_file: str):
    """Loaded (and its every cell checked) once per process, not once per run of a variant."""
    return load_sweep(sweep_file, [])


def one_by_one(run: RunConfig) -> dict:
    from lab.train import train

    started = time.perf_counter()
    summary = train(run)
    return _rates(run, summary, 1, time.perf_counter() - started)


def stacked(runs: list[RunConfig]) -> dict:
    from lab.stacked import train_stacked

    started = time.perf_counter()
    summaries = train_stacked(runs)
    return _rates(runs[0], summaries[0], len(runs), time.perf_counter() - started)


def _rates(run: RunConfig, summary: dict, members: int, wall: float) -> dict:
    """Tokens/s from the median step; the first steps' CUDA start-up and compiles (`warmup_s`, which a trial pays
    once); the validation's seconds are the run's wall time less its training steps."""
    if "error" in summary:
        raise LabError(f"lab bench sweep: {summary['error']}")
    batch_tokens = run.trainer.batch_size * run.task.seq_len
    step_ms = summary["train_step_ms_median"]
    return {"tokens_per_s": members * batch_tokens / (step_ms / 1e3), "step_ms": step_ms,
            "warmup_s": summary["warmup_seconds"],
            "val_s": max(0.0, summary.get("stack_wall_seconds", summary["wall_seconds"]) - summary["train_seconds"]),
            "wall_s": wall}


def processes(k: int, sweep_file: str, cell: dict, steps: int, members: int = 1) -> dict:
    """k concurrent trainings (one-by-one, or stacks of `members`) in their own processes; sums their tokens/s."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", "lab.bench_sweep", f"{tmp}/p{i}.json", sweep_file,
                                   json.dumps(cell), str(steps), str(members)]) for i in range(k)]
        if any(p.wait() for p in procs):
            raise LabError(f"lab bench sweep: a process of the {k}-process variant failed")
        rows = [json.loads(Path(f"{tmp}/p{i}.json").read_text()) for i in range(k)]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in rows),
            "step_ms": statistics.median(r["step_ms"] for r in rows),
            "warmup_s": statistics.median(r["warmup_s"] for r in rows),
            "val_s": statistics.median(r["val_s"] for r in rows), "wall_s": max(r["wall_s"] for r in rows)}


def full_trial(sweep_file: str, cell: dict) -> tuple[float, int, int]:
    """A full-size trial of the sweep: seconds to generate its data, its training steps, its validations."""
    from lab.data import TaskDataModule

    run = cell_config(sweep_file, cell, 1e-3, "setup", tempfile.gettempdir(), None)
    started = time.perf_counter()
    TaskDataModule(run).setup()
    setup = time.perf_counter() - started
    epochs = run.trainer.max_epochs
    steps = max(1, run.data.num_train // run.trainer.batch_size) * epochs  # the loader drops a last partial batch
    if run.trainer.max_steps > 0:
        steps = min(steps, run.trainer.max_steps)
    validations = steps // run.trainer.val_every_n_steps if run.trainer.val_every_n_steps else epochs
    return setup, steps, validations


def bench_sweep(sweep_file: str = str(DEFAULT_SWEEP), cell: dict | None = None, steps: int = 200,
                members: tuple[int, ...] = (4,), process_counts: tuple[int, ...] = (2, 4),
                compile_too: bool = False, process_stack: int = 1) -> list[dict]:
    from rich.console import Console

    console = Console()
    cell = {**DEFAULT_CELL, **(cell or {})}
    setup_s, trial_steps, trial_vals = full_trial(sweep_file, cell)
    console.print(f"cell {cell} of {sweep_file}: a full trial is {trial_steps} steps and {trial_vals} "
                  f"validations; its data take {setup_s:.1f} s to generate")
    rows = []

    def add(variant: str, trials_at_once: int, result: dict) -> None:
        trial_s = setup_s + result["warmup_s"] + trial_steps * result["step_ms"] / 1e3 + trial_vals * result["val_s"]
        row = {"variant": variant, **result, "trial_s": trial_s, "trials_per_hour": trials_at_once * 3600 / trial_s}
        rows.append(row)
        console.print(f"{variant}: {row['tokens_per_s'] / 1e6:.2f} M tokens/s, {row['step_ms']:.1f} ms/step, "
                      f"{row['warmup_s']:.0f} s warm-up, {row['val_s']:.1f} s/validation, "
                      f"~{row['trials_per_hour']:.0f} trials/hour")

    with tempfile.TemporaryDirectory() as tmp:
        for compiled in (False, True) if compile_too else (False,):
            cell_now = {**cell, "trainer.compile": compiled}
            tag = " compiled" if compiled else ""
            add(f"one-by-one{tag}", 1, one_by_one(cell_config(sweep_file, cell_now, LRS[0], "one", tmp, steps)))
            for m in members:
                add(f"stacked x{m}{tag}", m, stacked([cell_config(sweep_file, cell_now, lr, f"stack{m}-{i}", tmp,
                                                                  steps) for i, lr in enumerate(LRS[:m])]))
        for k in process_counts:
            name = f"{k} process{'es' if k > 1 else ''}"
            if process_stack == 1:
                add(name, k, processes(k, sweep_file, cell, steps))
            else:  # stacks in each process, compiled when the other variants were
                stack_cell = {**cell, "trainer.compile": compile_too}
                tag = f", stacked x{process_stack}{' compiled' if compile_too else ''}"
                add(name + tag, k * process_stack, processes(k, sweep_file, stack_cell, steps, process_stack))
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def _process(out: str, sweep_file: str, cell: str, steps: str, members: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [cell_config(sweep_file, json.loads(cell), lr, f"process{i}", tmp, int(steps))
                for i, lr in enumerate(LRS[: int(members)])]
        result = one_by_one(runs[0]) if len(runs) == 1 else stacked(runs)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _process(*sys.argv[1:])
