"""`sweep.deadline` (lab/pace.py): a run whose first steps say it would end after the deadline stops and waits for
the next launch; no run is cut off with its machine, none is lost, none trains twice."""

import time
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.trial import TrialState

import sweeps.runner
import sweeps.stacking
import sweeps.worker
from lab.cli import main
from lab.config import load_config
from lab.pace import MEASURED_STEPS, WARMUP_STEPS, OutOfTime, Pace
from lab.stacked import train_stacked
from sweeps.runner import _summary, _write_sweep_file, run_sweep, shortest_run_seconds
from sweeps.spec import load_sweep
from sweeps.stacking import train_cell_stack
from sweeps.study import DEFERRED, STACK_MEMBERS, create_or_load, requeue_deferred
from sweeps.worker import longest_smaller_run, objective, work
from tests.test_stacked import TINY
from tests.test_sweeps import TINY_RUN, by_state, trials_of, write_sweep

CHECK_STEP = WARMUP_STEPS + MEASURED_STEPS
LONG_RUN = {**TINY_RUN, "trainer": {**TINY_RUN["trainer"], "max_steps": 40, "val_every_n_steps": 20}}


def _paced(end_in: float, step_seconds: float, total_steps: int = 1000) -> None:
    pace = Pace(time.time() + end_in, total_steps, validation_batches=0)
    pace.after_step(WARMUP_STEPS, lambda: None)
    time.sleep(step_seconds * MEASURED_STEPS)
    pace.after_step(CHECK_STEP, lambda: None)


def test_pace_stops_a_run_that_would_end_late():
    with pytest.raises(OutOfTime) as late:
        _paced(end_in=1.0, step_seconds=0.01)  # ~9.8 s of steps left, 1 s to go
    assert 9.5 < late.value.projected_seconds < 60 and late.value.seconds_left < 1.0
    _paced(end_in=300.0, step_seconds=0.01)  # ends in time: no error


def test_pace_checks_once_and_only_syncs_there():
    syncs = []
    pace = Pace(time.time() - 1, total_steps=10_000, validation_batches=0)  # already late
    for step in range(1, WARMUP_STEPS + 1):
        pace.after_step(step, lambda step=step: syncs.append(step))
    assert syncs == [WARMUP_STEPS]
    with pytest.raises(OutOfTime):
        pace.after_step(CHECK_STEP, lambda: syncs.append(CHECK_STEP))
    pace.after_step(CHECK_STEP + 1, lambda: syncs.append(-1))
    assert syncs == [WARMUP_STEPS, CHECK_STEP]


def test_a_stack_in_time_trains_as_without_a_deadline(tmp_path, single_thread):
    def stack(name, **kwargs):
        runs = [load_config([], TINY + [f"trainer.lr={lr}", "trainer.max_steps=30", f"runs_dir={tmp_path}",
                                        f"run_name={name}{i}"]) for i, lr in enumerate([3e-3, 1e-2])]
        return train_stacked(runs, **kwargs)

    with pytest.raises(OutOfTime):
        stack("late", end_by=time.time() + 0.01)
    for free, paced in zip(stack("free"), stack("paced", end_by=time.time() + 3600), strict=True):
        assert paced["steps"] == free["steps"] == 30 and paced["final"] == free["final"]
        assert paced["best_val_acc"] == free["best_val_acc"]


def _stacked_study(tmp_path, deadline="10m"):
    config = write_sweep(tmp_path, {
        "study": "paced", "lrs": [1e-3, 1e-2, 3e-2, 1e-1], "stack_lrs": True, "deadline": deadline,
        "variants": {"attention": {"model.name": "attention"}, "gla": {"model.name": "gla"}},
    })
    sweep = load_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    return sweep, create_or_load(sweep, create=True)


def _late_once(monkeypatch, projected_seconds):
    """train_stacked as it is, except that its first call reports a pace of `projected_seconds` for its stack."""
    real, calls = sweeps.stacking.train_stacked, []

    def stacked(runs, hooks, end_by):
        calls.append(len(runs))
        if len(calls) == 1:
            raise OutOfTime(projected_seconds, seconds_left=10.0)
        return real(runs, hooks, 0.0)

    monkeypatch.setattr(sweeps.stacking, "train_stacked", stacked)
    return calls


def test_a_late_stack_waits_for_the_next_launch_and_trains_whole(tmp_path, monkeypatch):
    sweep, study = _stacked_study(tmp_path)
    calls = _late_once(monkeypatch, projected_seconds=100.0)  # fits a 10-minute launch, not what is left of it
    train_cell_stack(sweep, study, threads=1, end_by=time.time() + 10)
    deferred = study.get_trials()
    assert len(deferred) == 4 and all(t.state == TrialState.FAIL and DEFERRED in t.user_attrs
                                      and "error" not in t.user_attrs and STACK_MEMBERS not in t.user_attrs
                                      for t in deferred)
    assert not list((tmp_path / "runs" / "paced").glob("trial-*"))  # nothing of theirs is left on disk
    assert sorted(requeue_deferred(study)) == [t.number for t in deferred] and requeue_deferred(study) == []

    train_cell_stack(sweep, study, threads=1)  # the next launch: the re-queued trials first, as one stack
    assert calls == [4, 4]
    trials = study.get_trials()
    complete = by_state(trials, TrialState.COMPLETE)
    assert len(trials) == 8 and len(complete) == 4
    assert {t.user_attrs["run_key"] for t in complete} == {t.user_attrs["run_key"] for t in deferred}
    assert sorted(t.system_attrs["requeued_from"] for t in complete) == [t.number for t in deferred]
    assert all(t.system_attrs["retry_history"] == [] for t in complete)  # a deferral is no retry of sweep.max_retry


def test_a_stack_too_long_for_any_launch_splits(tmp_path, monkeypatch):
    sweep, study = _stacked_study(tmp_path)
    calls = _late_once(monkeypatch, projected_seconds=1200.0)  # twice a 10-minute launch: stacks of 1 fit
    train_cell_stack(sweep, study, threads=1, end_by=time.time() + 10)
    assert {t.user_attrs[STACK_MEMBERS] for t in study.get_trials()} == {1}
    requeue_deferred(study)
    for _ in range(4):
        train_cell_stack(sweep, study, threads=1)
    assert calls == [4, 1, 1, 1, 1]
    complete = by_state(study.get_trials(), TrialState.COMPLETE)
    assert len(complete) == 4 and len({t.user_attrs["run_key"] for t in complete}) == 4
    assert len(study.get_trials()) == 8  # no new grid point was drawn while the split cell waited


def test_a_stack_too_long_even_alone_fails_with_its_reason(tmp_path, monkeypatch):
    sweep, study = _stacked_study(tmp_path, deadline="60s")
    _late_once(monkeypatch, projected_seconds=1000.0)  # a quarter of it, one run alone, is still 250 s
    train_cell_stack(sweep, study, threads=1, end_by=time.time() + 10)
    trials = study.get_trials()
    assert all(t.state == TrialState.FAIL and t.user_attrs["error"].startswith("OutOfTime:") for t in trials)
    assert "sweep.deadline=60s" in trials[0].user_attrs["error"] and requeue_deferred(study) == []


def _late_trial_alone(tmp_path, deadline):
    """A one-by-one sweep of one run whose trial starts 0.01 s before the deadline: (sweep, study, that trial)."""
    config = write_sweep(tmp_path, {"study": "alone", "lrs": [1e-2], "deadline": deadline}, LONG_RUN)
    sweep = load_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    study = create_or_load(sweep, create=True)
    study.optimize(lambda trial: objective(sweep, trial, 1, end_by=time.time() + 0.01), n_trials=1,
                   catch=(Exception,))
    return sweep, study, study.get_trials()[0]


def test_a_late_trial_alone_waits_for_the_next_launch(tmp_path, single_thread):
    """One-by-one trials (Lightning) pace themselves the same way."""
    sweep, study, late = _late_trial_alone(tmp_path, "10m")
    assert late.state == TrialState.FAIL and DEFERRED in late.user_attrs and "error" not in late.user_attrs
    assert requeue_deferred(study) == [late.number]
    study.optimize(lambda trial: objective(sweep, trial, 1), n_trials=1)
    rerun = study.get_trials()[1]
    assert rerun.state == TrialState.COMPLETE and rerun.system_attrs["requeued_from"] == late.number
    assert rerun.user_attrs["steps"] == 40


def test_lab_sweep_passes_the_deadline_to_its_workers(tmp_path):
    """End to end: runs far too long for the deadline stop at their pace check and say why."""
    run = {**TINY_RUN, "trainer": {**TINY_RUN["trainer"], "max_steps": 1_000_000, "max_epochs": 10_000,
                                           "val_every_n_steps": 0}}
    config = write_sweep(tmp_path, {"study": "e2e", "lrs": [1e-2, 3e-2], "stack_lrs": True, "deadline": "60s",
                                    "variants": {"attention": {"model.name": "attention"}}}, run)
    started = time.perf_counter()
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    assert time.perf_counter() - started < 60  # stopped at the check, not at the deadline
    assert summary["counts"]["failed"] == 2 and summary["counts"]["lost"] == 0, summary
    trials = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'runs' / 'e2e' / 'study.db'}")
    assert all("OutOfTime" in t.user_attrs["error"] for t in trials.get_trials())


def test_deadline_must_be_a_duration(tmp_path):
    from lab.errors import LabError

    config = write_sweep(tmp_path, {"study": "bad", "lrs": [1e-2], "deadline": "soon"})
    with pytest.raises(LabError, match=r"^sweep.deadline='soon': a duration > 0"):
        load_sweep(config, [])


def test_a_trial_alone_too_long_for_any_launch_fails_with_its_reason(tmp_path, single_thread):
    _, study, trial = _late_trial_alone(tmp_path, "0.01")
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"].startswith("OutOfTime: it would take")
    assert DEFERRED not in trial.user_attrs and requeue_deferred(study) == []


def test_shortest_run_is_a_whole_stack_and_skips_what_trained_nothing():
    study = optuna.create_study()
    t0 = datetime(2026, 12, 7, 12, 0, 0)

    def add(state, start, end, **attrs):
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, state=state, value=0.5 if state == TrialState.COMPLETE else None, values=None,
            datetime_start=t0 + timedelta(seconds=start), datetime_complete=t0 + timedelta(seconds=end), params={},
            distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=0))

    assert shortest_run_seconds(study) == 0.0
    add(TrialState.COMPLETE, 0, 40, wall_seconds=40.0)  # alone
    add(TrialState.COMPLETE, 100, 120, wall_seconds=15.0, stacked_with=[1, 2])  # a stack of two: 100 to 130
    add(TrialState.PRUNED, 101, 130, wall_seconds=15.0, stacked_with=[1, 2])
    add(TrialState.PRUNED, 200, 201, duplicate_of=0)  # skipped at its start
    add(TrialState.FAIL, 300, 305)  # deferred or failed
    assert shortest_run_seconds(study) == 30.0


def test_no_run_starts_in_the_deadlines_last_seconds_of_the_shortest_run(tmp_path, monkeypatch, capsys):
    """A launch left less time than any run of the study took starts none (it would only be deferred)."""
    monkeypatch.setattr(sweeps.runner, "shortest_run_seconds", lambda study: 3600.0)
    config = write_sweep(tmp_path, {"study": "short", "lrs": [1e-3, 1e-2], "deadline": "10m"})
    assert main(["sweep", "--config", config, f"runs_dir={tmp_path / 'runs'}"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "no run starts in the deadline's last 3600 s" in out, out
    assert "deadline 10m reached; 2 runs left: run the same command again to continue" in out, out
    assert trials_of(tmp_path, "short") == []
    worker_log = (tmp_path / "runs" / "short" / "logs" / "worker-0.log").read_text()
    assert '"stopped_by": {"deadline": "10m"}' in worker_log, worker_log


def _trained(study, overrides, seconds, number=0):
    """A run the study trained, of `overrides`, that took `seconds`."""
    end = datetime(2026, 12, 7, 12, 0, 0)
    study.add_trial(optuna.trial.FrozenTrial(
        number=number, state=TrialState.COMPLETE, value=0.5, values=None, datetime_start=end - timedelta(seconds=seconds),
        datetime_complete=end, params={}, distributions={}, user_attrs={"overrides": overrides, "wall_seconds": seconds},
        system_attrs={}, intermediate_values={}, trial_id=0))


def test_smaller_cells_are_those_no_larger_on_every_number_and_alike_on_the_rest(tmp_path):
    config = write_sweep(tmp_path, {"study": "sizes", "lrs": [1e-3, 1e-2], "variants": {"a": {}, "b": {}},
                                    "space": {"mqar": {"sets": {"L16": {"task.seq_len": 16}}}}})
    sweep = load_sweep(config, [])
    study = optuna.create_study()
    cell = {"variant": "a", "model.name": "gla", "mqar": "L256", "task.seq_len": 256, "model.d_model": 128,
            "trainer.lr": 1e-3}
    for seconds, changes in [
        (10, {"mqar": "L64", "task.seq_len": 64, "model.d_model": 32, "trainer.lr": 1e-2}),  # smaller, other lr
        (20, {"model.d_model": 128}),  # the same cell (an earlier launch)
        (900, {"model.d_model": 256}),  # wider
        (901, {"mqar": "L512", "task.seq_len": 512, "model.d_model": 32}),  # longer
        (902, {"variant": "b", "model.name": "attention"}),  # another mixer
        (903, {"model.d_model": True}),  # not a number
    ]:
        _trained(study, {**cell, **changes}, seconds)
    _trained(study, {k: v for k, v in cell.items() if k != "model.d_model"}, 904)  # other keys: another cell
    assert longest_smaller_run(sweep, study.get_trials(), cell) == 20.0
    assert longest_smaller_run(sweep, study.get_trials(), {**cell, "model.d_model": 64}) == 10.0
    assert longest_smaller_run(sweep, study.get_trials(), {**cell, "task.seq_len": 32}) == 0.0


def test_a_cell_whose_smaller_cells_took_longer_than_is_left_does_not_start(tmp_path, monkeypatch):
    """It would pay its compile only to be stopped at its pace check: deferred at once, and its worker stops."""
    sweep, study = _stacked_study(tmp_path)
    for variant in ("attention", "gla"):
        _trained(study, {"variant": variant, "model.name": variant, "trainer.lr": 1e-3}, 100.0)
    calls = _late_once(monkeypatch, projected_seconds=100.0)
    assert train_cell_stack(sweep, study, threads=1, end_by=time.time() + 60) is False  # 75 s of 100 expected
    assert calls == []
    refused = study.get_trials()[2:]
    assert len(refused) == 1 and refused[0].state == TrialState.FAIL and "error" not in refused[0].user_attrs
    assert refused[0].user_attrs[DEFERRED].startswith("not started: cells no larger took up to 100 s; ")
    assert requeue_deferred(study) == [refused[0].number]

    # with the time a run of that size needs, or more than a whole launch expected (its pace check splits it), it
    # starts: here the re-queued trial as the first of a whole stack
    assert train_cell_stack(sweep, study, threads=1, end_by=time.time() + 76) is True and calls == [4]
    assert len(study.get_trials()) == 2 + 1 + 4
    _trained(study, {"variant": "gla", "model.name": "gla", "trainer.lr": 1e-3}, 801.0)
    _trained(study, {"variant": "attention", "model.name": "attention", "trainer.lr": 1e-3}, 801.0)
    assert train_cell_stack(sweep, study, threads=1, end_by=time.time() + 60) is True and calls == [4, 4]


def test_a_trial_alone_is_not_started_either(tmp_path, single_thread):
    config = write_sweep(tmp_path, {"study": "alone", "lrs": [1e-2], "deadline": "10m"}, LONG_RUN)
    sweep = load_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    study = create_or_load(sweep, create=True)
    _trained(study, {"trainer.lr": 1e-3}, 100.0)
    not_started = []
    study.optimize(lambda trial: objective(sweep, trial, 1, time.time() + 60, not_started), n_trials=1,
                   catch=(Exception,))
    refused = study.get_trials()[1]
    assert not_started == [refused.number] and refused.state == TrialState.FAIL
    assert DEFERRED in refused.user_attrs and "error" not in refused.user_attrs
    assert not list((tmp_path / "runs" / "alone").glob("trial-*"))


def test_a_worker_stops_at_a_cell_not_started_and_the_launch_says_the_deadline_did(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweeps.worker, "longest_smaller_run", lambda sweep, trials, overrides: 100.0)
    config = write_sweep(tmp_path, {"study": "big", "lrs": [1e-3, 1e-2], "deadline": "10m"})
    sweep = load_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    study = create_or_load(sweep, create=True)
    work(str(_write_sweep_file(sweep)), 0, 1, end_by=time.time() + 60)
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("not started: cells no larger took up to 100 s") == 1, out
    assert out.endswith('{"worker": 0, "stopped_by": {"deadline": "10m"}}'), out
    assert len(study.get_trials()) == 1  # it tried no other cell
    summary = _summary(sweep, study, 1.0, start_by=time.time() + 600)
    assert summary["timed_out"] and summary["counts"]["deferred"] == 1
