"""`sweep.stack_lrs`: a worker takes one grid cell and trains all its learning rates (times its `sweep.seeds`, if
any) as one stacked model.

The first trial comes from the sampler as usual; the cell's other runs become trials of their own, created
RUNNING by this worker (so no other worker takes them), each reported, pruned and recorded like a trial
trained alone. The stacked training itself is `lab.stacked.train_stacked`.

Under `sweep.deadline`, a stack whose first steps say it would end after the deadline stops there: its trials are
deferred (FAILED, no error) and the next launch re-queues them first (sweeps.study.requeue_deferred). A stack that
would not fit even a whole launch is split: its re-queued trials carry how many members a stack of them may take.
A cell whose smaller cells took longer than is left does not start at all (sweeps.worker.defer_unstarted).
"""

import itertools
import shutil
import threading
import traceback
from datetime import datetime

import optuna
import torch
from optuna.distributions import CategoricalDistribution
from optuna.storages import BaseStorage, fail_stale_trials
from optuna.trial import FrozenTrial, Trial, TrialState

from lab.errors import LabError
from lab.pace import OutOfTime, members_that_fit
from lab.stacked import train_stacked
from lab.train import run_path
from sweeps.spec import LR_KEY, MEMBER_AXES, SEED_KEY, Sweep
from sweeps.study import STACK_MEMBERS, mark_deferred
from sweeps.worker import (
    defer_unstarted,
    describe_trial,
    pruning_monitor,
    record_summary,
    trial_run,
    yield_to_older_twin,
)


def train_cell_stack(sweep: Sweep, study: optuna.Study, threads: int, end_by: float = 0.0) -> bool:
    """One cell's stack; `end_by` (time.time(), 0 = none): sweep.deadline's hour, see the module's doc. False if
    the cell was deferred before it started (sweeps.worker.defer_unstarted), True otherwise."""
    fail_stale_trials(study)  # what study.optimize does before each trial: re-queue dead hosts' trials
    first = study.ask()
    members = []  # (trial, overrides)
    overrides, owner = describe_trial(first, sweep)
    if owner is not None:  # the grid named a run already taken (see worker.objective)
        first.set_user_attr("duplicate_of", owner.number)
        _tell(study, first, state=TrialState.PRUNED)
        return True
    if defer_unstarted(sweep, first, overrides, end_by):
        _tell(study, first, state=TrialState.FAIL)
        return False
    members.append((first, overrides))
    limit = first.user_attrs.get(STACK_MEMBERS)  # a split stack: its siblings are re-queued trials
    for point in _other_members(sweep, overrides):
        if limit and len(members) >= limit:
            break
        params = {**first.params, **point}
        sibling = _claim_waiting(study, params) if limit else _new_running_trial(study, first, params)
        if sibling is None:
            continue  # another stack took it
        sibling_overrides, owner = describe_trial(sibling, sweep)
        if owner is not None:  # trained or being trained elsewhere (the older trial of a run trains)
            sibling.set_user_attr("duplicate_of", owner.number)
            _tell(study, sibling, state=TrialState.PRUNED)
            continue
        members.append((sibling, sibling_overrides))

    runs = [trial_run(sweep, trial.number, member_overrides, threads) for trial, member_overrides in members]
    monitor = pruning_monitor(sweep)
    hooks = [_prune_hook(trial, monitor) for trial, _ in members]
    cell = sweep.describe({k: v for k, v in overrides.items() if k not in MEMBER_AXES})
    labels = ", ".join(" ".join(f"{key.rsplit('.', 1)[-1]} {o[key]:g}" for key in MEMBER_AXES if key in o)
                       for _, o in members)
    print(f"trials {', '.join(str(t.number) for t, _ in members)}: {cell} at {labels}, stacked", flush=True)
    beat = _Heartbeat(study._storage, [trial._trial_id for trial, _ in members], sweep.cfg.heartbeat_interval)
    try:
        summaries = train_stacked(runs, hooks, end_by)
    except OutOfTime as late:
        _defer_stack(study, sweep, members, runs, late)
        return True
    except Exception as err:  # noqa: BLE001 - out of memory, a bug: every member fails, the study goes on
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if not isinstance(err, (LabError, torch.OutOfMemoryError)):
            traceback.print_exc()
        for trial, _ in members:
            trial.set_user_attr("error", message)
            _tell(study, trial, state=TrialState.FAIL)
        return True
    finally:
        beat.stop()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for (trial, _), run, summary in zip(members, runs, summaries, strict=True):
        trial.set_user_attr("stacked_with", [t.number for t, _ in members])
        if "error" in summary:
            trial.set_user_attr("error", summary["error"])
            _tell(study, trial, state=TrialState.FAIL)
            continue
        if yield_to_older_twin(sweep, trial) is not None:
            shutil.rmtree(run_path(run), ignore_errors=True)  # the older trial's run is this one
            _tell(study, trial, state=TrialState.PRUNED)
            continue
        value = record_summary(trial, summary, sweep.cfg.metric)
        if summary["pruned_at"] is not None:
            trial.set_user_attr("pruned_at", summary["pruned_at"])
            _tell(study, trial, state=TrialState.PRUNED)
        else:
            _tell(study, trial, value)
    return True


def _tell(study: optuna.Study, trial: Trial, value: float | None = None, state: TrialState | None = None) -> None:
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:
        # GridSampler.after_trial calls study.stop() at the grid's last point, which only works inside
        # study.optimize; the trial's state is stored before that (optuna's _tell), and finished() stops us
        if "Study.stop" not in str(err):
            raise


def _other_members(sweep: Sweep, overrides: dict) -> list[dict]:
    """The cell's other runs as {lr, model_seed} points: each lr at each seed, but the first trial's."""
    axes = {key: values for key, values in ((LR_KEY, [float(lr) for lr in sweep.cfg.lrs]),
                                           (SEED_KEY, list(sweep.cfg.seeds))) if values}
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    return [point for point in points if any(point[key] != overrides[key] for key in point)]


def _defer_stack(study: optuna.Study, sweep: Sweep, members: list, runs: list, late: OutOfTime) -> None:
    """Stop a stack that would end after sweep.deadline; its trials wait for the next launch, split into smaller
    stacks if even a whole launch is too short for this one (a stack's time taken as proportional to its members,
    which holds where a cell keeps the GPU busy; others stack with little extra time and fit whole)."""
    fit = members_that_fit(late.projected_seconds, len(members), sweep.deadline_seconds)
    print(f"trials {', '.join(str(t.number) for t, _ in members)}: {late}; "
          + (f"deferred to the next launch, in stacks of {fit}" if fit else "too long for any launch"), flush=True)
    for (trial, _), run in zip(members, runs, strict=True):
        if fit:
            mark_deferred(trial, str(late), fit if fit < len(members) else None)
        else:
            trial.set_user_attr("error", f"OutOfTime: its stack of {len(members)} {late}; at that pace one run "
                                         f"alone needs more than a launch of sweep.deadline={sweep.cfg.deadline}")
        _tell(study, trial, state=TrialState.FAIL)
        shutil.rmtree(run_path(run), ignore_errors=True)


def _claim_waiting(study: optuna.Study, params: dict) -> Trial | None:
    """A WAITING trial with these params (a re-run copy), taken: WAITING -> RUNNING fails if another worker took it
    first."""
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if waiting.params == params and study._storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
            return Trial(study, waiting._trial_id)
    return None


def _new_running_trial(study: optuna.Study, first: Trial, params: dict) -> Trial:
    """A RUNNING trial of this worker with these params; a grid sampler counts its grid point as taken.

    A member of a stack whose worker died, or deferred, has a WAITING re-run copy; that copy is taken, so the
    re-run is the trial that trains."""
    waiting = _claim_waiting(study, params)
    if waiting is not None:
        return waiting
    system_attrs = {}
    sampler = study.sampler
    first_attrs = study._storage.get_trial_system_attrs(first._trial_id)
    if isinstance(sampler, optuna.samplers.GridSampler) and "grid_id" in first_attrs:
        # GridSampler marks a trial's point by its index in its grid (system attribute `grid_id`); without
        # it, the sampler would hand this point out again, to be skipped as a duplicate. The first trial's
        # point also holds the axes its cell leaves inactive, which `params` lacks.
        point = list(sampler._all_grids[first_attrs["grid_id"]])
        for key in MEMBER_AXES:
            if key in sampler._param_names:
                point[sampler._param_names.index(key)] = params[key]
        system_attrs = {"search_space": first_attrs["search_space"],
                        "grid_id": sampler._all_grids.index(tuple(point))}
    distributions = {name: first.distributions.get(name) or CategoricalDistribution([value])
                     for name, value in params.items()}
    # a start time, as study.ask gives a trial (Optuna's own naive local time): its duration is the stack's
    template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                           datetime_complete=None, params=params, distributions=distributions, user_attrs={},
                           system_attrs=system_attrs, intermediate_values={}, trial_id=-1)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return Trial(study, trial_id)


def _prune_hook(trial: Trial, monitor: str):
    def prune(step: int, metrics: dict) -> bool:
        trial.report(metrics[monitor], step=step)
        return trial.should_prune()

    return prune


class _Heartbeat:
    """Heartbeats for every member trial while the stack trains (study.optimize does this for one trial)."""

    def __init__(self, storage: BaseStorage, trial_ids: list[int], interval: int):
        self._stop = threading.Event()
        self._thread = None
        if getattr(storage, "is_heartbeat_enabled", lambda: False)():
            self._thread = threading.Thread(target=self._beat, args=(storage, trial_ids, interval), daemon=True)
            self._thread.start()

    def _beat(self, storage, trial_ids, interval) -> None:
        while True:
            for trial_id in trial_ids:
                storage.record_heartbeat(trial_id)
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
