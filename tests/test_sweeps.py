"""Sweeps end to end: real worker processes on a real SQLite study, resume after SIGKILL, failures, pruning,
reports and bad input. Runs are tiny (a few training steps); what is tested is the bookkeeping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lab.cli import main
from lab.errors import LabError
from sweeps.report import write_report
from sweeps.runner import run_sweep
from sweeps.spec import load_sweep
from sweeps.study import launches

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = {
    "task": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 2},
    "data": {"num_train": 256, "num_test": 64},
    "model": {"name": "attention", "d_model": 16, "num_layers": 1, "num_heads": 1},
    "trainer": {"max_steps": 8, "batch_size": 32, "val_every_n_steps": 4, "log_every_n_steps": 1},
}


def write_sweep(tmp_path: Path, sweep: dict, run: dict | None = None, name: str = "sweep.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"sweep": {"threads_per_worker": 1, **sweep}, "run": run or TINY_RUN}))
    return str(path)


def trials_of(tmp_path: Path, study: str) -> list:
    storage = f"sqlite:///{tmp_path / 'runs' / study / 'study.db'}"
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def by_state(trials, state):
    return [t for t in trials if t.state == state and "duplicate_of" not in t.user_attrs]


def test_grid_two_workers_report_and_tensorboard(tmp_path):
    """Two workers on one SQLite file finish a conditional grid; every run trained once; report + TB written."""
    config = write_sweep(tmp_path, {
        "study": "grid", "lrs": [1e-3, 1e-2],
        "variants": {"attention": {"model.name": "attention"}, "gka": {"model.name": "gka", "model.num_iter": 2}},
        "space": {"model.gating": {"values": [True, False], "when": {"model.name": "gka"}}},
    })
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"], workers=2)
    assert summary["counts"]["complete"] == 6 and summary["counts"]["left"] == 0, summary
    trials = trials_of(tmp_path, "grid")
    complete = by_state(trials, TrialState.COMPLETE)
    run_keys = [t.user_attrs["run_key"] for t in complete]
    assert len(run_keys) == len(set(run_keys)) == 6  # attention x 2 lr + gka x gating x 2 lr, each once
    for trial in complete:
        assert (Path(trial.user_attrs["run_dir"]) / "summary.json").is_file()
        assert Path(trial.user_attrs["run_dir"]).name == f"trial-{trial.number}"

    report = tmp_path / "runs" / "grid" / "report"
    for name in ("report.md", "cells.csv", "runs.json", "accuracy_vs_d_model.png", "accuracy_vs_state_size.png",
                 "ablation.png", "optimization_history.png", "param_importances.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    table = (report / "report.md").read_text()
    assert "gka gating=False" in table and "attention" in table
    cell_lines = [line for line in table.splitlines() if line.startswith(("| gka", "| attention"))]
    assert len(cell_lines) == 3, table
    assert "## Stacks" not in table  # one run a trial: no stack table
    events = EventAccumulator(str(report / "tb"))
    events.Reload()
    assert {"report/ablation", "report/accuracy_vs_d_model"} <= set(events.Tags()["images"])
    cell_dirs = sorted(p.name for p in (report / "tb").iterdir() if p.is_dir())
    assert cell_dirs == ["cell-000", "cell-001", "cell-002"]
    hparams = EventAccumulator(str(report / "tb" / "cell-000"))
    hparams.Reload()
    assert hparams.PluginTagToContent("hparams")

    # the same command again: nothing left, nothing retrained; `lab report` alone rewrites the report
    again = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    assert again["counts"]["complete"] == 6
    assert len(by_state(trials_of(tmp_path, "grid"), TrialState.COMPLETE)) == 6
    (report / "report.md").unlink()
    assert main(["report", "grid", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert (report / "report.md").is_file()
    assert main(["report", "grid", "--runs-dir", str(tmp_path / "runs"), "--storage", f"sqlite:///{tmp_path / 'no.db'}"]) == 2
    # three reports written (the sweep, its rerun, `lab report`): TensorBoard holds one copy of each figure
    assert len(list((report / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in report.iterdir() if p.name.startswith(".tb")) == []

    # another host with only a copy of the database (no sweep.yaml): the settings recorded in it give the same cells
    copy = tmp_path / "copied.db"
    copy.write_bytes((tmp_path / "runs" / "grid" / "study.db").read_bytes())
    elsewhere = tmp_path / "elsewhere"
    assert main(["report", "grid", "--runs-dir", str(elsewhere)]) == 2  # no sweep.yaml and no --storage
    assert main(["report", "grid", "--runs-dir", str(elsewhere), "--storage", f"sqlite:///{tmp_path / 'no.db'}"]) == 2
    assert not (tmp_path / "no.db").exists()  # a mistyped path is not created as an empty study
    assert main(["report", "grid", "--runs-dir", str(elsewhere), "--storage", f"sqlite:///{copy}"]) == 0
    assert not (elsewhere / "grid" / "sweep.yaml").exists()
    assert sorted((elsewhere / "grid" / "report" / "cells.csv").read_text().splitlines()) == sorted(
        (report / "cells.csv").read_text().splitlines())


def test_resume_after_sigkill(tmp_path):
    """SIGKILL a worker mid-trial: relaunching re-runs that trial, keeps the finished ones, trains nothing twice."""
    run = {**TINY_RUN, "trainer": {**TINY_RUN["trainer"], "max_steps": 400, "val_every_n_steps": 100},
           "data": {"num_train": 4096, "num_test": 64}}
    config = write_sweep(tmp_path, {"study": "resume", "lrs": [1e-3, 3e-3, 1e-2]}, run)
    command = [sys.executable, "-m", "lab.cli", "sweep", "--config", config, f"runs_dir={tmp_path / 'runs'}"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    storage = f"sqlite:///{tmp_path / 'runs' / 'resume' / 'study.db'}"
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
        except (KeyError, sqlalchemy.exc.OperationalError):
            continue  # the launcher is still creating the database
        # kill the second trial mid-training, so one finished trial exists before the kill
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number >= 1 and "pid" in t.user_attrs]
        finished_before = [t for t in trials if t.state == TrialState.COMPLETE]
        if running and finished_before:
            victim = running[0]
    assert victim is not None, launcher.communicate()[0]
    time.sleep(1.0)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 1, output  # runs were left
    assert "exited with -9" in output, output

    done_before = {t.number for t in by_state(trials_of(tmp_path, "resume"), TrialState.COMPLETE)}
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    assert summary["counts"]["left"] == 0 and summary["counts"]["complete"] == 3, summary
    trials = trials_of(tmp_path, "resume")
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and "error" not in killed.user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].user_attrs["run_key"] == killed.user_attrs["run_key"]
    complete = by_state(trials, TrialState.COMPLETE)
    assert done_before <= {t.number for t in complete}  # finished trials kept, not re-run
    assert len({t.user_attrs["run_key"] for t in complete}) == len(complete) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_time_limit_stops_then_a_rerun_finishes_and_the_study_adds_up_its_launches(tmp_path, capsys):
    """sweep.time_limit: no trial starts after it (a worker needs longer than 0.2 s to start: none here). The
    study keeps the wall time of each launch that took a trial and sums them; a launch that took none (that one,
    or a rerun of the finished study that only rewrites its report) adds nothing."""
    config = write_sweep(tmp_path, {"study": "timed", "lrs": [1e-3, 1e-2]})
    runs_dir = f"runs_dir={tmp_path / 'runs'}"

    def recorded_launches():
        return launches(optuna.load_study(study_name="timed",
                                          storage=f"sqlite:///{tmp_path / 'runs' / 'timed' / 'study.db'}"))

    assert main(["sweep", "--config", config, runs_dir, "sweep.time_limit=0.2s"]) == 1
    out = capsys.readouterr().out
    assert "time limit 0.2s reached; 2 runs left: run the same command again to continue" in out, out
    assert trials_of(tmp_path, "timed") == [] and recorded_launches() == []

    assert run_sweep(config, [runs_dir, "sweep.n_trials=1"])["counts"]["complete"] == 1  # one piece
    summary = run_sweep(config, [runs_dir])  # the rest
    assert summary["counts"]["complete"] == 2 and summary["counts"]["left"] == 0 and not summary["timed_out"]
    recorded = recorded_launches()
    assert [launch["time_limit"] for launch in recorded] == [None, None]
    assert all(launch["seconds"] > 0 and launch["workers"] == 1 for launch in recorded)
    assert summary["launches"] == 2 and summary["study_seconds"] == pytest.approx(sum(v["seconds"] for v in recorded))
    assert summary["study_seconds"] > summary["seconds"]
    report = (tmp_path / "runs" / "timed" / "report" / "report.md").read_text()
    assert "over 2 launch(es)" in report and "training time summed" in report, report

    assert run_sweep(config, [runs_dir])["launches"] == 2  # finished: only the report is rewritten
    assert recorded_launches() == recorded


def test_nan_trial_fails_and_the_study_goes_on(tmp_path):
    config = write_sweep(tmp_path, {"study": "nan", "lrs": [1e-3, 1e12]})
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}", "trainer.grad_clip=0", "trainer.warmup_frac=0"])
    assert summary["counts"]["complete"] == 1 and summary["counts"]["failed"] == 1, summary
    failed = by_state(trials_of(tmp_path, "nan"), TrialState.FAIL)
    assert "DivergedError" in failed[0].user_attrs["error"] and "nan" in failed[0].user_attrs["error"].lower()
    assert "Failed runs" in (tmp_path / "runs" / "nan" / "report" / "report.md").read_text()


def test_tpe_study_prunes(tmp_path):
    """A median pruner stops runs whose validation loss trails the finished ones at the same step."""
    config = write_sweep(tmp_path, {
        "study": "tpe", "sampler": "tpe", "seed": 1, "n_trials": 6, "lrs": [], "metric": "final_val_loss",
        "direction": "minimize", "pruner": "median", "pruner_startup_trials": 1,
        "space": {"trainer.lr": {"type": "float", "low": 1e-8, "high": 1e-1, "log": True}},
    }, {**TINY_RUN, "trainer": {**TINY_RUN["trainer"], "max_steps": 16}})
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    pruned = by_state(trials_of(tmp_path, "tpe"), TrialState.PRUNED)
    assert summary["counts"]["pruned"] >= 1 and pruned, summary
    best_lr = min(by_state(trials_of(tmp_path, "tpe"), TrialState.COMPLETE), key=lambda t: t.value).params["trainer.lr"]
    assert all(t.params["trainer.lr"] < best_lr for t in pruned)  # too small to learn in 16 steps
    assert all((Path(t.user_attrs["run_dir"]) / "summary.json").is_file() for t in pruned)


@pytest.mark.parametrize(("sweep", "message"), [
    ({"study": "x", "lrs": [1e-3], "bogus": 1}, "unknown sweep key 'sweep.bogus'"),
    ({"study": "x", "lrs": [], "space": {}}, "empty search space"),
    ({"study": "x", "sampler": "annealing"}, "unknown sampler"),
    ({"study": "x", "space": {"model.d_model": []}}, "sweep.space.model.d_model: empty list"),
    ({"study": "x", "space": {"model.d_model": {"type": "int", "low": 8, "high": 64}}}, "grid sampler needs a list"),
    ({"study": "x", "sampler": "tpe"}, "needs a trial budget"),
    ({"study": "x", "space": {"model.widht": [16, 32]}}, "unknown config key 'model.widht'"),
    ({"study": "x", "variants": {"g": {"model.name": "gka", "model.num_iter": -1}}}, "model.num_iter=-1"),
    ({"study": "x", "lrs": [], "space": {"model.d_model": [16, 32], "trainer.lr": [1e-3, -1e-3]}},
     "trainer.lr=-0.001: must be > 0"),
    ({"study": "x", "space": {"model.d_model": [16, 32], "task.seq_len": [32, 4]}}, "cell {model.d_model: 16, task"),
    ({"study": "a/b"}, "plain non-empty name"),
    ({"study": "x", "seeds": [0, 0]}, "sweep.seeds=[0, 0]: distinct integers >= 0"),
    ({"study": "x", "lrs": "abc"}, "sweep.lrs: must be a list (sweep.lrs=[a,b] on the command line"),
    ({"study": "x", "space": {"model_seed": [0, 1]}}, "give init seeds as sweep.seeds"),
    ({"study": "x", "time_limit": "2 days"}, "sweep.time_limit='2 days': a duration > 0 like 600"),
    ({"study": "x", "time_limit": 0}, "sweep.time_limit='0': a duration > 0"),
])
def test_bad_sweep_rejected_before_any_trial(tmp_path, capsys, sweep, message):
    config = write_sweep(tmp_path, sweep)
    assert main(["sweep", "--config", config, f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_changed_settings_refused_and_storage_kept(tmp_path):
    config = write_sweep(tmp_path, {"study": "same", "lrs": [1e-3]})
    run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    database = tmp_path / "runs" / "same" / "study.db"
    before = database.read_bytes()
    with pytest.raises(LabError, match=r"different settings \(run.trainer.max_steps\)"):
        run_sweep(config, [f"runs_dir={tmp_path / 'runs'}", "trainer.max_steps=9"])
    assert len(trials_of(tmp_path, "same")) == 1 and database.read_bytes() == before


def test_shipped_sweeps_load():
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(str(path))
        assert sweep.budget() >= 1, path


def test_grid_cells_with_sets_conditions_and_variants(tmp_path):
    config = write_sweep(tmp_path, {
        "study": "cells", "lrs": [1e-3, 1e-2],
        "variants": {"attention": {"model.name": "attention"}, "gka": {"model.name": "gka"}},
        "space": {
            "mqar": {"sets": {"short": {"task.seq_len": 32, "task.num_kv_pairs": 2},
                              "long": {"task.seq_len": 48, "task.num_kv_pairs": 8}}},
            "model.solver": {"values": ["chebyshev", "exact"], "when": {"model.name": "gka"}},
            "model.num_iter": {"values": [1, 30], "when": {"model.solver": "chebyshev"}},
        },
    })
    sweep = load_sweep(config)
    cells = sweep.grid_cells()
    # attention: 2 mqar x 2 lr; gka: 2 mqar x (chebyshev x 2 num_iter + exact) x 2 lr
    assert len(cells) == 4 + 12 == sweep.budget()
    exact = [c for c in cells if c.get("model.solver") == "exact"]
    assert exact and all("model.num_iter" not in c for c in exact)
    run = sweep.run_config(next(c for c in cells if c.get("mqar") == "long" and c.get("model.num_iter") == 1))
    assert (run.task.seq_len, run.task.num_kv_pairs, run.model.name, run.model.num_iter) == (48, 8, "gka", 1)
    label = sweep.describe({"variant": "gka", "model.name": "gka", "mqar": "long", "task.seq_len": 48,
                            "task.num_kv_pairs": 8, "model.num_iter": 1, "trainer.lr": 0.01})
    assert label == "gka mqar=long num_iter=1 lr=0.01"


def test_hosts_may_write_runs_to_different_dirs(tmp_path):
    """runs_dir is where a host writes, not part of the study: another host's runs_dir joins the same study."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    config = write_sweep(tmp_path, {"study": "hosts", "lrs": [1e-3, 1e-2], "storage": storage})
    first = run_sweep(config, [f"runs_dir={tmp_path / 'a'}", "sweep.n_trials=1", "sweep.report=false"])
    assert first["counts"]["complete"] == 1
    second = run_sweep(config, [f"runs_dir={tmp_path / 'b'}", "sweep.report=false"])
    assert second["counts"]["complete"] == 2 and second["counts"]["left"] == 0
    assert len(list((tmp_path / "a" / "hosts").glob("trial-*"))) == len(list((tmp_path / "b" / "hosts").glob("trial-*"))) == 1

    # host b's report has host a's run (on a's disk only) with its full config: the one a trained, resolved from
    # the sweep file and the trial's overrides
    (tmp_path / "a").rename(tmp_path / "host-a")
    report = Path(write_report("hosts", str(tmp_path / "b"), storage=storage)["dir"])
    runs = {run["lr"]: run for run in json.loads((report / "runs.json").read_text())}
    assert sorted(runs) == [1e-3, 1e-2]
    trained_on_a = json.loads(next((tmp_path / "host-a" / "hosts").glob("trial-*/summary.json")).read_text())["config"]
    resolved = runs[trained_on_a["trainer"]["lr"]]["config"]
    assert resolved["runs_dir"] == str(tmp_path / "b") and resolved["trainer"].pop("num_threads") == 0
    trained_on_a["trainer"].pop("num_threads")  # the worker's share of the cores, not a setting of the run
    assert {**resolved, "runs_dir": None} == {**trained_on_a, "runs_dir": None}


def test_journal_file_storage(tmp_path):
    journal = tmp_path / "journal" / "study.log"
    config = write_sweep(tmp_path, {"study": "journal", "lrs": [1e-3, 1e-2], "storage": str(journal)})
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    assert summary["counts"]["complete"] == 2 and journal.is_file()
    assert (tmp_path / "runs" / "journal" / "report" / "report.md").is_file()


def test_two_launchers_started_at_once(tmp_path):
    """Two `lab sweep` commands on one new study: one creates it, the other loads it; no run is trained twice."""
    config = write_sweep(tmp_path, {"study": "race", "lrs": [1e-3, 3e-3, 1e-2]})
    command = [sys.executable, "-m", "lab.cli", "sweep", "--config", config, f"runs_dir={tmp_path / 'runs'}"]
    launchers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
                 for _ in range(2)]
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    complete = by_state(trials_of(tmp_path, "race"), TrialState.COMPLETE)
    assert sorted(t.params["trainer.lr"] for t in complete) == [1e-3, 3e-3, 1e-2]


def test_grid_twins_that_missed_each_other_count_once(tmp_path, monkeypatch):
    """Two workers take one grid point at once; the younger reads the study before the older records the run,
    so both train it (seen under load in CI). The younger yields when done: the run counts once."""
    from sweeps import worker
    from sweeps.study import create_or_load

    sweep = load_sweep(write_sweep(tmp_path, {"study": "twins", "lrs": [1e-3]}), [f"runs_dir={tmp_path / 'runs'}"])
    study = create_or_load(sweep, create=True)
    older, younger = study.ask(), study.ask()  # one grid point: both get it

    def train_while_the_older_records_its_run(run, callbacks):
        worker.describe_trial(older, sweep)
        return train(run, callbacks=callbacks)

    train = worker.train
    monkeypatch.setattr(worker, "train", train_while_the_older_records_its_run)
    with pytest.raises(optuna.TrialPruned, match=f"same run as trial {older.number}"):
        worker.objective(sweep, younger, threads=1)
    assert younger.user_attrs["duplicate_of"] == older.number and "duplicate_of" not in older.user_attrs
    # its run directory goes (TensorBoard would show the run twice), and its record names none
    assert "run_dir" not in younger.user_attrs
    assert not (tmp_path / "runs" / "twins" / f"trial-{younger.number}").exists()


def test_a_stacked_member_that_finds_an_older_twin_yields_the_same_way(tmp_path, monkeypatch):
    from sweeps import stacking
    from sweeps.study import create_or_load

    sweep = load_sweep(write_sweep(tmp_path, {"study": "twins", "lrs": [1e-3, 1e-2], "stack_lrs": True}),
                       [f"runs_dir={tmp_path / 'runs'}"])
    study = create_or_load(sweep, create=True)
    older = study.ask()  # stands for another worker's trial of the same run

    def twin_at_high_lr(sweep, trial):  # as if a worker elsewhere had taken lr 1e-2 while this stack trained
        return older if trial.params["trainer.lr"] == 1e-2 else None

    monkeypatch.setattr(stacking, "yield_to_older_twin", twin_at_high_lr)
    stacking.train_cell_stack(sweep, study, threads=1)
    members = {t.params["trainer.lr"]: t for t in study.get_trials() if t.number != older.number}
    assert members[1e-3].state == TrialState.COMPLETE and members[1e-2].state == TrialState.PRUNED
    assert "run_dir" not in members[1e-2].user_attrs and "best_val_acc" not in members[1e-2].user_attrs
    assert sorted(p.name for p in (tmp_path / "runs" / "twins").glob("trial-*")) == [f"trial-{members[1e-3].number}"]
