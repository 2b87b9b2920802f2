"""`lab sweep`: create or resume the study, start the workers, show one line per finished trial, summarise."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from lab.errors import LabError
from sweeps.spec import Sweep, load_sweep
from sweeps.study import (
    DEFERRED,
    LaunchRecord,
    create_or_load,
    deferred_waiting,
    launch_seconds,
    recover_orphans,
    requeue_deferred,
    trained_runs,
    worker_on_this_host,
)
from sweeps.worker import done_count

POLL_SECONDS = 1.0
LAUNCH_SAVE_SECONDS = 60.0


def run_sweep(config: str, overrides: list[str], workers: int | None = None, gpus: list[int] | None = None,
              per_gpu: int | None = None) -> dict:
    from lab.cli import console

    sweep = load_sweep(config, overrides)
    if workers is not None:
        if workers < 1:
            raise LabError(f"--workers {workers}: must be >= 1")
        sweep.cfg.workers = workers
    if gpus is not None:
        sweep.cfg.gpus = gpus
    if per_gpu is not None:
        if per_gpu < 1:
            raise LabError(f"--per-gpu {per_gpu}: must be >= 1")
        sweep.cfg.per_gpu = per_gpu
    placement = gpu_placement(sweep, workers_given=workers is not None)
    if sweep.cfg.deadline and sweep.base_flat.get("trainer.devices", 1) > 1:
        raise LabError("sweep.deadline with trainer.devices > 1: a DDP trial's ranks cannot stop together on the "
                       "deadline yet; leave out sweep.deadline or train each trial on one device")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_or_load(sweep, create=True)
    _refuse_foreign_trials(sweep, study)
    out = console()
    for number in recover_orphans(study, sweep.cfg.max_retry):
        out.print(f"trial {number}: its worker had died; re-queued")
    deferred = requeue_deferred(study)
    if deferred:
        out.print(f"trials {', '.join(map(str, deferred))}: deferred by an earlier launch's deadline; re-queued first")
    sweep_file = _write_sweep_file(sweep)

    budget = sweep.budget()
    on_gpus = f" on GPUs {','.join(sorted(set(placement), key=placement.index))}" if placement else ""
    out.print(f"study {sweep.cfg.study}: {budget} runs ({sweep.cfg.sampler} sampler), {sweep.cfg.workers} "
              f"worker(s){on_gpus}, storage {sweep.storage_shown}")
    started, now = time.perf_counter(), time.time()
    # workers start no trial after the time limit, and none that would end after the deadline (wall clock: the
    # times travel to them as numbers)
    start_by = now + sweep.time_limit_seconds if sweep.time_limit_seconds else 0.0
    end_by = 0.0
    if sweep.deadline_seconds:
        end_by = now + sweep.deadline_seconds
        # nor one in the deadline's last seconds, fewer than the study's shortest run took: it would pay its
        # warm-up only to be deferred
        shortest = shortest_run_seconds(study)
        if shortest:
            out.print(f"no run starts in the deadline's last {shortest:.0f} s (the study's shortest run so far)")
        start_by = min(start_by or end_by, end_by - shortest)
    launch = LaunchRecord(study, sweep.cfg, placement)
    procs = _start_workers(sweep, sweep_file, placement, start_by, end_by)
    try:
        _monitor(sweep, study, procs, budget, out, launch)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait()
        launch.save()
        raise LabError(f"interrupted; the trials that were running re-run when you start "
                       f"`lab sweep --config {config}` again") from None
    launch.save()
    summary = _summary(sweep, study, time.perf_counter() - started, start_by)
    _print_summary(summary, out)
    if sweep.cfg.report and summary["counts"]["complete"]:
        from sweeps.report import write_report

        report = write_report(sweep.cfg.study, sweep.runs_dir, storage=sweep.cfg.storage)
        out.print(report["table"])
        out.print(f"report: {report['dir']}  (TensorBoard: lab tb --logdir {sweep.study_dir})")
        summary["report"] = report["dir"]
    return summary


def shortest_run_seconds(study: optuna.Study) -> float:
    """The shortest wall time of a run this study trained (a stack's, where the trials were stacked); 0 if none."""
    return min((wall for _, wall in trained_runs(study.get_trials(deepcopy=False))), default=0.0)


def _refuse_foreign_trials(sweep: Sweep, study: optuna.Study) -> None:
    """Trial directories with no trials in the database belong to another study: never write over them."""
    if study.get_trials(deepcopy=False):
        return
    stray = sorted(p.name for p in sweep.study_dir.glob("trial-*"))
    if stray:
        raise LabError(f"{sweep.study_dir} holds trial directories ({', '.join(stray[:3])}...) but study "
                       f"{sweep.cfg.study!r} in {sweep.storage_shown} has no trials; move them away or choose "
                       "another sweep.study")


def _write_sweep_file(sweep: Sweep) -> Path:
    """runs/<study>/sweep.yaml: the resolved sweep, self-contained (base configs merged in), for the workers."""
    data = {"sweep": {**vars(sweep.cfg), "base_configs": []}, "run": sweep.run}
    path = sweep.study_dir / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)  # atomic: a worker never reads half a file
    return path


def gpu_placement(sweep: Sweep, workers_given: bool) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each worker ([] = no pinning); sets sweep.cfg.workers to match.

    Indices count the GPUs this process sees, so they map through an outer CUDA_VISIBLE_DEVICES.
    """
    cfg = sweep.cfg
    if not cfg.gpus:
        return []
    import torch

    visible = torch.cuda.device_count()
    wrong = [g for g in cfg.gpus if g >= visible]
    if wrong:
        raise LabError(f"--gpus {','.join(map(str, cfg.gpus))}: no GPU {wrong[0]} here ({visible} visible: "
                       f"indices 0..{visible - 1})" if visible else f"--gpus {','.join(map(str, cfg.gpus))}: "
                       "this machine has no CUDA GPU (torch.cuda.device_count() is 0)")
    if sweep.base_flat.get("trainer.devices", 1) > 1:
        raise LabError("--gpus with trainer.devices > 1: each worker sees one GPU; run DDP trials without --gpus")
    wanted = len(cfg.gpus) * cfg.per_gpu
    if workers_given and cfg.workers != wanted:
        raise LabError(f"--workers {cfg.workers} with --gpus {','.join(map(str, cfg.gpus))} --per-gpu "
                       f"{cfg.per_gpu}: that is {wanted} workers; leave out --workers or make them agree")
    cfg.workers = wanted
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = outer.split(",") if outer else [str(i) for i in range(visible)]
    # worker i on GPU i mod n: the first len(gpus) workers spread over all GPUs before any doubles up
    return [names[cfg.gpus[i % len(cfg.gpus)]].strip() for i in range(wanted)]


def _start_workers(sweep: Sweep, sweep_file: Path, placement: list[str], start_by: float,
                   end_by: float) -> list[subprocess.Popen]:
    logs = sweep.study_dir / "logs"
    logs.mkdir(exist_ok=True)
    threads = sweep.cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // sweep.cfg.workers)
    procs = []
    for index in range(sweep.cfg.workers):
        log = open(logs / f"worker-{index}.log", "a")  # noqa: SIM115 - the child writes it until it exits
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if placement:
            env["CUDA_VISIBLE_DEVICES"] = placement[index]
        # own session: Ctrl-C reaches the launcher only, which stops the workers itself
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sweeps.worker", str(sweep_file), str(index), str(threads), repr(start_by),
             repr(end_by)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env))
        log.close()
    return procs


def _monitor(sweep: Sweep, study: optuna.Study, procs: list[subprocess.Popen], budget: int, out,
             launch: LaunchRecord) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    reported = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    earlier = set(reported)
    pids = {proc.pid for proc in procs}
    dead = []  # workers whose crash was reported
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=out, transient=False) as progress:
        bar = progress.add_task(sweep.cfg.study, total=budget, completed=done_count(sweep, study.get_trials(deepcopy=False)))
        while True:
            alive = [p for p in procs if p.poll() is None]
            for proc in procs:
                if proc.returncode not in (None, 0) and proc not in dead:
                    dead.append(proc)
                    lost = recover_orphans(study, sweep.cfg.max_retry)
                    progress.console.print(f"[red]worker {procs.index(proc)} exited with {proc.returncode}[/] "
                                           f"(log: {sweep.study_dir / 'logs'}); re-queued trials: {lost or 'none'}")
            for trial in study.get_trials(deepcopy=False):
                if not launch.took_a_trial and trial.number not in earlier and worker_on_this_host(trial) in pids:
                    launch.trial_taken()
                if trial.state.is_finished() and trial.number not in reported:
                    reported.add(trial.number)
                    if trial.state != TrialState.FAIL or "error" in trial.user_attrs:  # not a lost one
                        launch.result_in()
                    progress.console.print(trial_line(trial, sweep))
            progress.update(bar, completed=min(budget, done_count(sweep, study.get_trials(deepcopy=False))))
            if not alive:
                return
            launch.save_every(LAUNCH_SAVE_SECONDS)  # a launcher that is killed still leaves its time
            time.sleep(POLL_SECONDS)


def trial_line(trial: FrozenTrial, sweep: Sweep) -> str:
    attrs = trial.user_attrs
    metric = sweep.cfg.metric
    label = sweep.describe(attrs.get("overrides", {}))
    head = f"trial {trial.number:>3}"
    if "duplicate_of" in attrs:
        known = f", {metric} {trial.value:.3f}" if trial.state == TrialState.COMPLETE else ""
        return f"{head}  [dim]skipped  same run as trial {attrs['duplicate_of']}{known}[/]  {label}"
    if trial.state == TrialState.COMPLETE:
        return (f"{head}  [green]done[/]     {metric} {trial.value:.3f}  {label}  "
                f"({attrs.get('steps')} steps, {attrs.get('wall_seconds', 0):.0f} s)")
    if trial.state == TrialState.PRUNED:
        return f"{head}  [yellow]pruned[/]   at step {attrs.get('pruned_at')}  {label}"
    if "error" in attrs:
        return f"{head}  [red]FAILED[/]   {attrs['error']}  {label}"
    if DEFERRED in attrs:
        return f"{head}  [yellow]deferred[/] {attrs[DEFERRED]}; the next launch runs it first  {label}"
    return f"{head}  [red]lost[/]     its worker died; re-queued  {label}"


def _summary(sweep: Sweep, study: optuna.Study, seconds: float, start_by: float = 0.0) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = {
        "complete": sum(t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED and "duplicate_of" not in t.user_attrs for t in trials),
        "failed": sum(t.state == TrialState.FAIL and "error" in t.user_attrs for t in trials),
        "duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
        "lost": sum(t.state == TrialState.FAIL and not {"error", DEFERRED} & t.user_attrs.keys() for t in trials),
        "deferred": len(deferred_waiting(trials)),  # re-queued by the next launch
        "left": max(0, sweep.budget() - done_count(sweep, study.get_trials(deepcopy=False))),
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        pick = max if sweep.cfg.direction == "maximize" else min
        trial = pick(complete, key=lambda t: t.value)
        best = {"trial": trial.number, "value": trial.value, "run": sweep.describe(trial.user_attrs.get("overrides", {})),
                "run_dir": trial.user_attrs.get("run_dir")}
    study_seconds, launches = launch_seconds(study)
    # a trial deferred this launch says the deadline stopped it, even one before start_by (not started: its smaller
    # cells took longer than was left, sweeps.worker.defer_unstarted)
    limit_hit = bool(start_by) and time.time() >= start_by or counts["deferred"] > 0
    return {"study": sweep.cfg.study, "storage": sweep.storage_shown, "counts": counts, "best": best,
            "metric": sweep.cfg.metric, "seconds": seconds, "study_seconds": study_seconds, "launches": launches,
            "time_limit": sweep.cfg.time_limit, "deadline": sweep.cfg.deadline,
            "timed_out": limit_hit and counts["left"] > 0}


def _print_summary(summary: dict, out) -> None:
    counts = summary["counts"]
    out.print(f"study {summary['study']}: " + ", ".join(f"{n} {k}" for k, n in counts.items())
              + f"  ({summary['seconds']:.0f} s)")
    if summary["launches"] > 1:
        out.print(f"study time: {summary['study_seconds']:.0f} s over {summary['launches']} launches")
    if summary["best"]:
        best = summary["best"]
        out.print(f"best: trial {best['trial']}  {summary['metric']} {best['value']:.3f}  {best['run']}")
    if counts["left"]:
        limits = [f"{name} {summary[key]}" for name, key in (("time limit", "time_limit"), ("deadline", "deadline"))
                  if summary[key]]
        reason = f"{', '.join(limits)} reached; " if summary["timed_out"] else ""
        out.print(f"{reason}{counts['left']} runs left: run the same command again to continue")
