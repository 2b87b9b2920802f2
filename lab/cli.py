"""`lab`: the one command for every user-facing action. Bad input -> `error: ...` on stderr, exit 2."""

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from lab.errors import LabError

USAGE_EXAMPLES = """examples:
  lab train --config configs/demo.yaml model.name=gka model.num_iter=10
  lab tasks | lab models | lab new-task my_task
  lab runs demo
  lab sweep --config configs/sweeps/demo.yaml --workers 2
  lab report demo
  lab solvers seq_len=512 batch=2
  lab tb
  lab bench ops | lab bench mixers | lab bench kernels (GPU) | lab bench sweep | lab bench step"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `lab train --config a.yaml x=1 --config b.yaml y=2`: overrides may come on both sides of --config
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("train", "sweep") or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        return args.handler(args) or 0
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="GKA synthetic-task lab.", epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train one run (key=value overrides)")
    train.add_argument("--config", action="append", default=[], metavar="YAML",
                       help="config file; repeat to layer several (later wins)")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(handler=cmd_train)

    sweep = commands.add_parser("sweep", help="run or resume an Optuna study (key=value: sweep.* or run keys)")
    sweep.add_argument("--config", required=True, metavar="YAML", help="sweep file (sections sweep: and run:)")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes (default: sweep.workers)")
    sweep.add_argument("--gpus", type=gpu_list, default=None, metavar="0,1,...",
                       help="pin the workers to these GPUs (default: sweep.gpus)")
    sweep.add_argument("--per-gpu", type=int, default=None, metavar="K",
                       help="workers per GPU with --gpus (default: sweep.per_gpu, 1)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value")
    sweep.set_defaults(handler=cmd_sweep)

    report = commands.add_parser("report", help="write runs/<study>/report/ (table, plots, TensorBoard)")
    report.add_argument("study")
    report.add_argument("--runs-dir", default="runs")
    report.add_argument("--storage", default=None, help="storage URL if not the one in runs/<study>/sweep.yaml "
                        "(without that file: the study's settings come from its database)")
    report.set_defaults(handler=cmd_report)

    solvers = commands.add_parser("solvers", help="the solver study: convergence and gradient accuracy (key=value)")
    solvers.add_argument("overrides", nargs="*", metavar="key=value")
    solvers.set_defaults(handler=cmd_solvers)

    new_task = commands.add_parser("new-task", help="write a new task (generator, config, test) from a template")
    new_task.add_argument("name", help="task name: a lower-case Python identifier")
    new_task.set_defaults(handler=cmd_new_task)

    commands.add_parser("tasks", help="list tasks with their parameters").set_defaults(handler=cmd_tasks)
    commands.add_parser("models", help="list models with their parameters").set_defaults(handler=cmd_models)

    runs = commands.add_parser("runs", help="table of the runs of an experiment (from summary.json)")
    runs.add_argument("experiment")
    runs.add_argument("--runs-dir", default="runs")
    runs.set_defaults(handler=cmd_runs)

    tb = commands.add_parser("tb", help="start TensorBoard on runs/ at 127.0.0.1")
    tb.add_argument("--logdir", default="runs")
    tb.add_argument("--port", type=int, default=6006)
    tb.set_defaults(handler=cmd_tb)

    bench = commands.add_parser("bench", help="benchmarks: ops (GKA op backends, CPU), mixers (training tokens/s), "
                                              "kernels (Triton GKA vs SDPA and the torch path, GPU), sweep "
                                              "(a sweep cell's trials/hour, three ways), step (a cell's step profile)")
    bench.add_argument("what", choices=["ops", "mixers", "kernels", "sweep", "step"])
    bench.add_argument("--out", default=None, help="write the rows as JSON here")
    bench.add_argument("settings", nargs="*", metavar="key=value",
                       help="sweep: sweep=FILE steps=N members=4,8 processes=2,4 process_stack=4 compile=true "
                            "and cell keys (variant=gka model.d_model=64 task.seq_len=128 ...); step: sweep=FILE "
                            "steps=N warmup=N top=N compile=true and cell keys")
    bench.set_defaults(handler=cmd_bench)
    return parser


def cmd_train(args) -> int:
    from lab.config import load_config
    from lab.train import train

    run = load_config(args.config, args.overrides)
    summary = train(run)
    if summary is None:  # a DDP rank > 0: rank 0 reports
        return 0
    print_summaries([summary])
    print(f"run directory: {summary['run_dir']}  (TensorBoard: lab tb)")
    return 0


def gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices separated by commas, e.g. 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct GPU indices >= 0, e.g. 0,1")
    return gpus


def cmd_sweep(args) -> int:
    from sweeps.runner import run_sweep

    summary = run_sweep(args.config, args.overrides, workers=args.workers, gpus=args.gpus, per_gpu=args.per_gpu)
    return 0 if not summary["counts"]["left"] else 1


def cmd_report(args) -> int:
    from sweeps.report import write_report

    report = write_report(args.study, args.runs_dir, storage=args.storage)
    console().print(report["table"])
    print(f"report: {report['dir']}  ({', '.join(report['figures'])}; TensorBoard: lab tb --logdir {report['dir']})")
    return 0


def cmd_solvers(args) -> int:
    from lab.solver_study import load_study_config, run_study

    result = run_study(load_study_config(args.overrides))
    print(result["text"])
    print(f"wrote {result['dir']}: results.json, report.md, {', '.join(result['figures'])}, tb/")
    return 0


def cmd_new_task(args) -> int:
    import tasks
    from tasks.scaffold import new_task

    # the files go next to the lab's own tasks/, configs/ and tests/ (an editable install: the checkout)
    root = Path(tasks.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise LabError(f"lab new-task writes into the lab's source checkout, and {root} is not one "
                       "(install the lab with `pip install -e .`, as the Makefile does)")
    try:
        written = new_task(args.name, root)
    except tasks.TaskError as err:
        raise LabError(str(err)) from None
    name = args.name
    print(f"wrote {', '.join(str(p.relative_to(root)) for p in written)}")
    print(f"next: write the task in tasks/{name}.py (docs/adding-a-task.md), then")
    print(f"  lab train --config configs/tasks/{name}.yaml")
    print(f"  .venv/bin/python -m pytest tests/test_task_{name}.py -q")
    return 0


def cmd_tasks(args) -> int:
    import tasks

    for spec in tasks.TASKS.values():
        print_dataclass(f"task.name={spec.name}", spec.description, spec.config_cls, prefix="task")
    return 0


def cmd_models(args) -> int:
    from lab.models import MODELS

    for name, (config_cls, mixer_cls) in MODELS.items():
        doc = (sys.modules[mixer_cls.__module__].__doc__ or "").strip().splitlines()[0]
        print_dataclass(f"model.name={name}", doc, config_cls, prefix="model")
    return 0


def console():
    """Rich console; piped output (logs, CI) gets a wide fixed width instead of Rich's 80 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def print_dataclass(title: str, description: str, config_cls, prefix: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    comments = field_comments(config_cls)
    table = Table(title=escape(f"{title}: {description}"), title_justify="left", show_edge=False)
    for column in ("key", "type", "default", "meaning"):
        table.add_column(column)
    for f in fields(config_cls):
        if f.name == "name":
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        type_name = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
        table.add_row(f"{prefix}.{f.name}", type_name, escape(repr(default)), escape(comments.get(f.name, "")))
    console().print(table)
    print()


def field_comments(config_cls) -> dict[str, str]:
    """The `# ...` comment after each field in the dataclass source: the lab documents keys in one place."""
    import inspect

    comments = {}
    for klass in reversed(config_cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            code, _, comment = line.partition("  # ")
            name = code.strip().split(":")[0]
            if comment and name.isidentifier():
                comments[name] = comment.strip()
    return comments


def cmd_runs(args) -> int:
    root = Path(args.runs_dir) / args.experiment
    summaries = [json.loads(p.read_text()) for p in sorted(root.glob("*/summary.json"))]
    if not summaries:
        raise LabError(f"no finished runs under {root} (a finished run has a summary.json)")
    print_summaries(summaries)
    print(f"TensorBoard logs: {root}  (view: lab tb --logdir {root})")
    return 0


def print_summaries(summaries: list[dict]) -> None:
    from rich.table import Table

    table = Table(show_edge=False)
    for column in ("run", "model", "params", "state size", "best val acc", "final val acc", "epochs",
                   "wall time", "train tokens/s"):
        table.add_column(column, justify="left" if column in ("run", "model") else "right")
    for s in summaries:
        table.add_row(
            Path(s["run_dir"]).name, s["model"], f"{s['params']:,}", human_bytes(s["state_size_bytes"]),
            f"{s['best_val_acc']:.3f}" if s["best_val_acc"] is not None else "-",
            f"{s['final'].get('val/acc', float('nan')):.3f}", str(s["epochs"]),
            f"{s['wall_seconds']:.0f} s", f"{s['train_tokens_per_second']:,.0f}",
        )
    console().print(table)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def cmd_tb(args) -> int:
    import time

    from tensorboard import program

    Path(args.logdir).mkdir(parents=True, exist_ok=True)
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", args.logdir, "--host", "127.0.0.1", "--port", str(args.port),
                              "--load_fast", "false"])
    try:
        url = board.launch()
    except program.TensorBoardServerException as err:
        raise LabError(f"--port {args.port}: could not start TensorBoard ({err.msg})") from None
    print(f"TensorBoard on {args.logdir}: {url}  (Ctrl-C to stop)", flush=True)
    while True:
        time.sleep(3600)


def bench_sweep_command(settings: list[str]) -> list[dict]:
    from lab.bench_sweep import bench_sweep

    values, sweep_file, compile_too = _cell_settings(settings)

    def numbers(key: str, default: tuple[int, ...], low: int = 1) -> tuple[int, ...]:
        value = values.pop(key, None)
        if value is None:
            return default
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            parsed = tuple(int(v) for v in items)
        except ValueError:
            raise LabError(f"{key}={value}: give whole numbers, e.g. {key}=2,4") from None
        if any(n < low for n in parsed):
            raise LabError(f"{key}={value}: every number must be >= {low}")
        return tuple(n for n in parsed if n)  # processes=0: no multi-process variant

    (steps,) = numbers("steps", (200,))
    (process_stack,) = numbers("process_stack", (1,))
    rows = bench_sweep(sweep_file, cell=values, steps=steps, members=numbers("members", (4,)),
                       process_counts=numbers("processes", (2, 4), low=0), compile_too=compile_too,
                       process_stack=process_stack)
    console().print(markdown_rows(rows))
    return rows


def _cell_settings(settings: list[str]) -> tuple[dict, str, bool]:
    """lab bench sweep / step `key=value` settings as flat keys, less `sweep=FILE` and `compile=true|false`,
    which come back beside them."""
    from omegaconf import OmegaConf

    from lab.bench_sweep import DEFAULT_SWEEP
    from lab.config import parse_overrides
    from sweeps.spec import flat

    values = flat(OmegaConf.to_container(parse_overrides(settings)))
    compiled = values.pop("compile", False)
    if not isinstance(compiled, bool):
        raise LabError(f"compile={compiled}: true or false")
    return values, str(values.pop("sweep", DEFAULT_SWEEP)), compiled


def bench_step_command(settings: list[str]) -> dict:
    """`lab bench step`: a profile of one sweep cell's training step (lab/bench_step.py)."""
    import tempfile

    from lab.bench_step import markdown, profile_step
    from lab.bench_sweep import DEFAULT_CELL, LRS, cell_config

    values, sweep_file, compiled = _cell_settings(settings)
    counts = {}
    for key, default in (("steps", 10), ("warmup", 5), ("top", 12)):
        value = values.pop(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LabError(f"{key}={value}: a whole number >= 1")
        counts[key] = value
    cell = {**DEFAULT_CELL, **values, "trainer.compile": compiled}
    with tempfile.TemporaryDirectory() as tmp:
        run = cell_config(sweep_file, cell, LRS[0], "step", tmp, counts["warmup"] + counts["steps"])
        console().print(f"profiling {counts['steps']} steps of {cell} after {counts['warmup']}")
        result = profile_step(run, steps=counts["steps"], warmup=counts["warmup"], top=counts["top"])
    console().print(markdown(result))
    return result


def markdown_rows(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from lab import bench

    if args.what == "kernels":
        import torch

        if not torch.cuda.is_available():
            raise LabError("lab bench kernels times the Triton kernels on a CUDA GPU; this machine has none "
                           "(CPU benchmarks: lab bench ops | lab bench mixers)")
        from kernels.bench_gpu import bench_kernels, markdown_table

        out_dir = Path(args.out).parent if args.out else Path("runs") / "bench"
        rows = bench_kernels(out_dir=str(out_dir))
        print(markdown_table(rows))
        print(f"wrote {out_dir}/kernels_gpu.json and kernels_gpu.md")
        return 0
    if args.what == "sweep":
        rows = bench_sweep_command(args.settings)
    elif args.what == "step":
        rows = bench_step_command(args.settings)
    elif args.settings:
        raise LabError(f"lab bench {args.what} takes no key=value settings")
    else:
        rows = bench.run(args.what)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
