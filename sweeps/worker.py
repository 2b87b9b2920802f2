"""A sweep worker: takes trials from the study one at a time and trains each as one `lab train` run.

Started by `lab sweep` as `python -m sweeps.worker runs/<study>/sweep.yaml <index>`; any number may run,
on any number of hosts sharing the storage.
"""

import gc
import json
import os
import shutil
import sys
import time
import traceback

import optuna
import torch
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from lab.errors import LabError
from lab.pace import OutOfTime, PaceCallback, members_that_fit
from lab.train import ddp_child, run_path, train
from sweeps.spec import MEMBER_AXES, Sweep, cell_key, load_sweep
from sweeps.study import create_or_load, mark_deferred, tag_worker, trained_runs

# A trial that did not fail for its own reasons (its worker died) is re-run; these ended for good.
SETTLED = (TrialState.COMPLETE, TrialState.PRUNED)
# A DDP trial's ranks > 0 run this worker's command again (Lightning's launcher); this names their trial.
DDP_TRIAL_ENV = "LAB_DDP_TRIAL"
# Under sweep.deadline a cell does not start when this share of the time its smaller cells took is more than the
# time left: a rough guide (a fresh machine compiles cold, early stopping ends some runs sooner), so a margin
START_SHARE = 0.75


class NotStarted(Exception):
    """A trial deferred before it started (defer_unstarted); its worker starts no more."""


class StepPruning(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, reporting at the training step instead of the epoch.

    The lab validates every n steps inside one epoch, where the stock callback's epoch index never moves.
    A pruned run stops like an early-stopped one, so its summary.json is still written. Under DDP, rank 0
    (this worker's own process, holding the trial) reports and decides; the other ranks (trial None) follow.
    """

    def __init__(self, trial: optuna.Trial | None, monitor: str):
        super().__init__(trial, monitor)
        self.pruned_at: int | None = None

    def on_fit_start(self, trainer, pl_module):
        pass  # the stock check for DDP wants the trial in every rank; here only rank 0 touches it

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        step = trainer.global_step
        prune = False
        if trainer.is_global_zero:
            self._trial.report(trainer.callback_metrics[self.monitor].item(), step=step)
            prune = self._trial.should_prune()
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune)
        if prune:
            self.pruned_at = step
            trainer.should_stop = True


def objective(sweep: Sweep, trial: optuna.Trial, threads: int, end_by: float = 0.0,
              not_started: list | None = None) -> float:
    """One trial trained alone; `not_started` gets its number if it was deferred before it started."""
    overrides, owner = describe_trial(trial, sweep)
    if owner is not None:
        trial.set_user_attr("duplicate_of", owner.number)
        if sweep.cfg.sampler == "grid":
            # two grid points that name one run (an inactive conditional axis), or the last cells taken twice
            raise optuna.TrialPruned(f"same run as trial {owner.number}")
        if owner.state == TrialState.COMPLETE:
            # a search sampler proposed a run again: tell it the known result instead of training twice
            return owner.value

    reason = defer_unstarted(sweep, trial, overrides, end_by)
    if reason:
        if not_started is not None:
            not_started.append(trial.number)
        raise NotStarted(reason)
    run = trial_run(sweep, trial.number, overrides, threads)
    pruning = StepPruning(trial, monitor=pruning_monitor(sweep))
    print(f"trial {trial.number}: {sweep.describe(overrides)}", flush=True)
    os.environ[DDP_TRIAL_ENV] = str(trial.number)
    try:
        summary = train(run, callbacks=[pruning, *([PaceCallback(end_by)] if end_by else [])])
    except OutOfTime as late:  # sweep.deadline: the trial waits for the next launch
        if members_that_fit(late.projected_seconds, 1, sweep.deadline_seconds):
            mark_deferred(trial, str(late))
        else:
            trial.set_user_attr("error", f"OutOfTime: it {late}; longer than a launch of sweep.deadline="
                                         f"{sweep.cfg.deadline}")
        shutil.rmtree(run_path(run), ignore_errors=True)
        raise
    except Exception as err:
        # NaN, out of memory, a bad cell: the trial is FAILED with its reason and the study goes on
        trial.set_user_attr("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if not isinstance(err, (LabError, torch.OutOfMemoryError)):
            traceback.print_exc()  # a bug, not a property of the cell: the worker log keeps the trace
        raise
    finally:
        os.environ.pop(DDP_TRIAL_ENV, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    twin = yield_to_older_twin(sweep, trial)
    if twin is not None:
        shutil.rmtree(run_path(run), ignore_errors=True)  # the older trial's run is this one: TensorBoard shows it once
        raise optuna.TrialPruned(f"same run as trial {twin.number}")
    value = record_summary(trial, summary, sweep.cfg.metric)
    if pruning.pruned_at is not None:
        trial.set_user_attr("pruned_at", pruning.pruned_at)
        raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
    return value


def defer_unstarted(sweep: Sweep, trial: optuna.Trial, overrides: dict, end_by: float) -> str | None:
    """Under sweep.deadline: why `trial` does not start, now marked deferred (to be ended FAILED), when this study's
    runs of cells no larger than this one took longer than the time left (by START_SHARE): it would pay its warm-up
    only to be stopped by its pace check; else None. A cell whose smaller cells took more than a whole launch starts
    all the same, for its pace check to split it (sweeps.stacking)."""
    if not end_by:
        return None
    expected = longest_smaller_run(sweep, trial.study.get_trials(deepcopy=False), overrides)
    needed, left = START_SHARE * expected, end_by - time.time()
    if not expected or needed <= left or needed > sweep.deadline_seconds:
        return None
    reason = f"not started: cells no larger took up to {expected:.0f} s; {max(0.0, left):.0f} s were left"
    mark_deferred(trial, reason)
    print(f"trial {trial.number}: {reason} before the deadline; deferred to the next launch", flush=True)
    return reason


def longest_smaller_run(sweep: Sweep, trials: list, overrides: dict) -> float:
    """The longest wall time of the study's trained runs of cells no larger than `overrides`' (0 if none): the
    same value on every key, except a number no larger on numeric ones (a shorter sequence, a narrower model,
    fewer iterations cost no more). Learning rates and seeds (a cell's members) and set labels (their keys
    count) are not compared."""
    skip = set(MEMBER_AXES) | set(sweep.set_axes)

    def no_larger(other: dict) -> bool:
        if other.keys() != overrides.keys():
            return False
        return all(key in skip or other[key] == value or (_number(other[key]) and _number(value) and other[key] <= value)
                   for key, value in overrides.items())

    return max((wall for members, wall in trained_runs(trials) if no_larger(members[0].user_attrs.get("overrides", {}))),
               default=0.0)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def yield_to_older_twin(sweep: Sweep, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """After training: an older trial of the same run, if any; this one is then recorded as its duplicate (and its
    run directory removed by the caller). Two workers that took one grid point at once can both miss the other
    (each read the study before the other recorded the run) and both train it; the younger yields, as it would
    have at the start."""
    if sweep.cfg.sampler != "grid":
        return None
    owner = _same_run(trial.study, trial.number, trial.user_attrs["run_key"])
    if owner is None or owner.number > trial.number or owner.state == TrialState.FAIL:
        return None
    trial.set_user_attr("duplicate_of", owner.number)
    return owner


def record_summary(trial: optuna.Trial, summary: dict, metric: str) -> float:
    """The run's results as the trial's user attributes; returns the value the study optimises."""
    final = summary["final"]
    metrics = {"best_val_acc": summary["best_val_acc"] or 0.0, "final_val_acc": final.get("val/acc", 0.0),
               "final_val_loss": final.get("val/loss", float("nan"))}
    for key in ("run_dir", "params", "state_size_bytes", "wall_seconds", "steps", "best_step", "stopped_early",
                "train_tokens_per_second", "warmup_seconds", "train_step_ms_median"):
        trial.set_user_attr(key, summary[key])
    for key, value in metrics.items():
        trial.set_user_attr(key, value)
    return metrics[metric]


def describe_trial(trial: optuna.Trial, sweep: Sweep) -> tuple[dict, str | None]:
    """Sample the trial's run, record it; returns its overrides and the trial that already owns that run."""
    tag_worker(trial)
    overrides = sweep.sample(trial)
    run_key = cell_key(overrides, with_lr=True)
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("run_key", run_key)
    trial.set_user_attr("cell", cell_key(overrides))
    return overrides, _same_run(trial.study, trial.number, run_key)


def trial_run(sweep: Sweep, number: int, overrides: dict, threads: int):
    placement = sweep.trial_placement(number)
    if not sweep.base_flat["trainer.num_threads"] and "trainer.num_threads" not in overrides:
        placement["trainer.num_threads"] = threads  # workers share the cores instead of each taking all
    return sweep.run_config(overrides, **placement)


def pruning_monitor(sweep: Sweep) -> str:
    # the pruner compares what the study optimises: accuracy, or the loss for final_val_loss
    return "val/loss" if sweep.cfg.metric == "final_val_loss" else "val/acc"


def ddp_rank(sweep: Sweep, study: optuna.Study, number: int, threads: int) -> None:
    """A DDP rank > 0 of trial `number`: train the same run beside rank 0, which owns the trial."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    overrides = trial.user_attrs["overrides"]
    train(trial_run(sweep, number, overrides, threads), callbacks=[StepPruning(None, pruning_monitor(sweep))])


def _same_run(study: optuna.Study, number: int, run_key: str) -> optuna.trial.FrozenTrial | None:
    for other in study.get_trials(deepcopy=False):
        if other.number == number or other.user_attrs.get("run_key") != run_key:
            continue
        if "duplicate_of" in other.user_attrs:
            continue
        # of two running trials on one run the older one trains: both deferring would lose the run
        trained = other.state in SETTLED or (other.state == TrialState.RUNNING and other.number < number)
        failed_for_good = other.state == TrialState.FAIL and "error" in other.user_attrs
        if trained or failed_for_good:
            return other
    return None


def finished(sweep: Sweep, study: optuna.Study) -> bool:
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return False
    return done_count(sweep, trials) >= sweep.budget() if sweep.cfg.n_trials is not None else (
        study.sampler.is_exhausted(study))


def done_count(sweep: Sweep, trials: list) -> int:
    """Trials that count against the budget: settled, or failed for their own reasons. A grid's skipped
    duplicates do not count (they are not cells); a search sampler's repeated proposals do (they are trials)."""
    done = [t for t in trials if t.state in SETTLED or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
    if sweep.cfg.sampler == "grid":
        done = [t for t in done if not (t.state == TrialState.PRUNED and "duplicate_of" in t.user_attrs)]
    return len(done)


def work(sweep_file: str, index: int, threads: int, start_by: float = 0.0, end_by: float = 0.0) -> None:
    """start_by: wall-clock time (time.time()) after which no trial starts; end_by: sweep.deadline's; 0 = none."""
    sweep = load_sweep(sweep_file)
    study = create_or_load(sweep, create=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if DDP_TRIAL_ENV in os.environ and ddp_child():
        ddp_rank(sweep, study, int(os.environ[DDP_TRIAL_ENV]), threads)
        return
    print(f"worker {index} on study {sweep.cfg.study} ({sweep.storage_shown})", flush=True)
    while not finished(sweep, study):
        if start_by and time.time() >= start_by:
            limits = {"time_limit": sweep.cfg.time_limit, "deadline": sweep.cfg.deadline}
            print(json.dumps({"worker": index, "stopped_by": {k: v for k, v in limits.items() if v}}), flush=True)
            return
        if sweep.cfg.stack_lrs:
            from sweeps.stacking import train_cell_stack

            started = train_cell_stack(sweep, study, threads, end_by)
        else:
            # one trial per call: the stop test above sees other workers' trials and re-queued ones
            not_started = []
            study.optimize(lambda trial, late=not_started: objective(sweep, trial, threads, end_by, late), n_trials=1,
                           catch=(Exception,))
            started = not not_started
        if not started:  # near the deadline: a smaller cell might still fit, but trying cell after cell defers many
            print(json.dumps({"worker": index, "stopped_by": {"deadline": sweep.cfg.deadline}}), flush=True)
            return
    print(json.dumps({"worker": index, "done": True}), flush=True)


if __name__ == "__main__":
    work(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(float(arg) for arg in sys.argv[4:6]))
