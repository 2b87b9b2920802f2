"""Stacked training (lab/stacked.py): members of one stack must train exactly as they would alone."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState
from torch.func import functional_call, stack_module_state, vmap

from lab.config import load_config
from lab.errors import LabError
from lab.models import MODELS, build_model
from lab.stacked import train_stacked
from lab.train import train
from sweeps.runner import run_sweep
from sweeps.study import launches
from tests.test_sweeps import ROOT, TINY_RUN, by_state, trials_of, write_sweep

TINY = ["task.vocab_size=64", "task.seq_len=32", "task.num_kv_pairs=2", "data.num_train=512", "data.num_test=64",
        "model.d_model=16", "model.num_layers=1", "trainer.batch_size=32", "trainer.max_steps=12",
        "trainer.val_every_n_steps=4", "trainer.log_every_n_steps=2", "trainer.progress=none", "trainer.num_threads=1"]
# every mixer, and GLA with its decay per key channel as well as per head
MIXERS = {name: [f"model.name={name}"] for name in sorted(MODELS)} | {"gla_channel": ["model.name=gla", "model.gate=channel"]}


@pytest.mark.parametrize("mixer", MIXERS)
def test_vmapped_gradients_equal_each_models_own(mixer, single_thread):
    """float64: vmap over stacked parameters gives each member the gradient it gets alone."""
    torch.manual_seed(0)
    run = load_config([], [*MIXERS[mixer], "model.d_model=16", "model.num_layers=1", "task.seq_len=32"])
    models = [build_model(run.model, 64).double() for _ in range(3)]
    params, buffers = stack_module_state(models)
    tokens = torch.randint(0, 64, (2, 37))
    out = vmap(lambda p, b: functional_call(models[0], (p, b), (tokens,)))(params, buffers)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    (out.pow(2).mean((1, 2, 3)) * weights).sum().backward()
    for i, model in enumerate(models):
        (model(tokens).pow(2).mean() * weights[i]).backward()
        for key, param in model.named_parameters():
            error = (params[key].grad[i] - param.grad).abs().max() / param.grad.abs().max().clamp_min(1e-30)
            assert error < 1e-7, f"{key}: {error:.1e}"  # float64; an fp32 slip or a mixed-up member is >1e-4


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_stacks_under_bf16_autocast(mixer, single_thread):
    """The GPU runs stack under bf16 autocast; conv1d's batching rule once broke there (fp32 bias)."""
    run = load_config([], [*MIXERS[mixer], "model.d_model=16", "model.num_layers=1", "task.seq_len=32"])
    models = [build_model(run.model, 64) for _ in range(2)]
    params, buffers = stack_module_state(models)
    tokens = torch.randint(0, 64, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vmap(lambda p, b: functional_call(models[0], (p, b), (tokens,)))(params, buffers)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out.float()).all() and all(torch.isfinite(p.grad).all() for p in params.values())


@pytest.mark.parametrize("model_seeds", [None, [1, 2]])  # [1, 2]: sweep.seeds' members, same batches
def test_stack_trains_each_member_as_lab_train_does(tmp_path, single_thread, model_seeds):
    lrs = [3e-3, 1e-2]
    member = [[f"trainer.lr={lr}"] + ([f"model_seed={model_seeds[i]}"] if model_seeds else []) for i, lr in enumerate(lrs)]
    alone = [train(load_config([], TINY + member[i] + [f"runs_dir={tmp_path}", f"run_name=alone{i}"]))
             for i in range(len(lrs))]
    stacked = train_stacked([load_config([], TINY + member[i] + [f"runs_dir={tmp_path}", f"run_name=st{i}"])
                             for i in range(len(lrs))])
    for one, member in zip(alone, stacked, strict=True):
        assert member["steps"] == one["steps"] == 12 and member["best_step"] == one["best_step"]
        assert member["final"]["val/acc"] == one["final"]["val/acc"]
        assert member["final"]["val/loss"] == pytest.approx(one["final"]["val/loss"], rel=1e-5)
        run_dir = tmp_path / "default" / member["run_dir"].rsplit("/", 1)[-1]
        assert json.loads((run_dir / "summary.json").read_text())["config"]["trainer"]["lr"] in lrs
        assert (run_dir / "checkpoints" / "best.ckpt").is_file() and list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("log_every", [2, 50])  # 50: no logging step in the run, the check after the last step
def test_a_diverging_member_fails_alone(tmp_path, single_thread, log_every):
    runs = [load_config([], TINY + [f"trainer.lr={lr}", f"runs_dir={tmp_path}", f"run_name=m{i}", "trainer.grad_clip=0",
                                    "trainer.warmup_frac=0", f"trainer.log_every_n_steps={log_every}"])
            for i, lr in enumerate([1e-3, 1e12])]
    good, bad = train_stacked(runs)
    assert good["steps"] == 12 and "DivergedError" in bad["error"]


def test_pruned_member_stops_and_the_others_go_on(tmp_path, single_thread):
    runs = [load_config([], TINY + [f"trainer.lr={lr}", f"runs_dir={tmp_path}", f"run_name=m{i}"])
            for i, lr in enumerate([1e-3, 1e-2])]
    kept, pruned = train_stacked(runs, [None, lambda step, metrics: step >= 8])
    assert kept["steps"] == 12 and kept["pruned_at"] is None
    assert pruned["pruned_at"] == 8 and pruned["steps"] == 8


def test_members_must_share_everything_but_lr(tmp_path):
    runs = [load_config([], TINY + [f"runs_dir={tmp_path}", "run_name=a"]),
            load_config([], TINY + [f"runs_dir={tmp_path}", "run_name=b", "model.d_model=32"])]
    with pytest.raises(LabError, match="may differ only in trainer.lr.*model.d_model"):
        train_stacked(runs)


def test_sweep_stacks_each_cells_lrs(tmp_path):
    config = write_sweep(tmp_path, {
        "study": "stacked", "lrs": [1e-3, 1e-2, 3e-2], "stack_lrs": True,
        "variants": {"attention": {"model.name": "attention"}, "gla": {"model.name": "gla"}},
    })
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"], workers=1)
    assert summary["counts"]["complete"] == 6 and summary["counts"]["failed"] == 0, summary
    # the grid sampler counts a stack's sibling points as taken (stacking sets their grid ids): it hands none out again
    assert summary["counts"]["duplicates"] == 0, summary
    complete = by_state(trials_of(tmp_path, "stacked"), TrialState.COMPLETE)
    groups = {tuple(t.user_attrs["stacked_with"]) for t in complete}
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)  # each cell's three lrs in one stack
    assert len({t.user_attrs["run_key"] for t in complete}) == 6
    assert all(t.user_attrs["steps"] == TINY_RUN["trainer"]["max_steps"] for t in complete)
    assert all(t.duration is not None and t.duration.total_seconds() > 0 for t in complete)  # each has its start
    # the report's stack table: one row a stack, its members' trial numbers, a wall time, its best member
    table = (tmp_path / "runs" / "stacked" / "report" / "report.md").read_text().split("## Stacks")[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert sorted(row[0][2:] for row in rows) == sorted(",".join(map(str, sorted(g))) for g in groups)
    for row in rows:
        members = [t for t in complete if str(t.number) in row[0][2:].split(",")]
        best = max(members, key=lambda t: t.value)
        assert row[1] in ("attention", "gla") and row[2].endswith(" s") and row[5] == str(TINY_RUN["trainer"]["max_steps"])
        assert row[6] == f"{best.value:.4f} ({best.params['trainer.lr']:g})"


@pytest.mark.parametrize("member_axes", [("trainer.lr",), ()])
def test_grid_sampler_draws_an_untouched_cell_first(member_axes):
    """While another worker builds its stack, a new trial gets a point of a cell no trial has yet (stacked sweeps);
    a one-by-one sweep's cells are single points, so any free point does."""
    from sweeps.study import FreePointGridSampler

    same_cell = 0
    for seed in range(10):
        sampler = FreePointGridSampler({"variant": ["a", "b", "c"], "trainer.lr": [1, 2, 3, 4]}, seed=seed,
                                       member_axes=member_axes)
        study = optuna.create_study(sampler=sampler)
        first, second = study.ask(), study.ask()  # the first trial's stack is still being built
        variants = [trial.suggest_categorical("variant", ["a", "b", "c"]) for trial in (first, second)]
        same_cell += variants[0] == variants[1]
    assert same_cell == 0 if member_axes else same_cell > 0


def test_two_stacked_workers_train_every_run_once(tmp_path):
    """Two workers each take cells (a GPU shared by two stacks): every run trains once, in a stack of its cell's
    lrs; a worker that drew a point of a cell already taken records it as a duplicate and trains nothing."""
    config = write_sweep(tmp_path, {
        "study": "stacked2", "lrs": [1e-3, 1e-2, 3e-2], "stack_lrs": True,
        "variants": {"attention": {"model.name": "attention"}, "gla": {"model.name": "gla"}},
        "space": {"model.d_model": [16, 32]},
    })
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"], workers=2)
    assert summary["counts"]["complete"] == 12 and summary["counts"]["failed"] == 0, summary
    trials = trials_of(tmp_path, "stacked2")
    complete = by_state(trials, TrialState.COMPLETE)
    assert len({t.user_attrs["run_key"] for t in complete}) == 12
    groups = {tuple(t.user_attrs["stacked_with"]) for t in complete}
    assert len(groups) == 4 and all(len(g) == 3 for g in groups)
    assert all("duplicate_of" in t.user_attrs for t in by_state(trials, TrialState.PRUNED))


def test_resume_after_a_stack_is_killed(tmp_path):
    """SIGKILL the worker mid-stack (a lent GPU taken back): relaunching trains the killed cell again as one stack
    of the killed members' re-run copies, keeps the finished one, and trains no run twice."""
    run = {**TINY_RUN, "trainer": {**TINY_RUN["trainer"], "max_steps": 400, "val_every_n_steps": 100},
           "data": {"num_train": 4096, "num_test": 64}}
    config = write_sweep(tmp_path, {
        "study": "killed", "lrs": [1e-3, 1e-2], "stack_lrs": True,
        "variants": {"attention": {"model.name": "attention"}, "gla": {"model.name": "gla"}},
    }, run)
    command = [sys.executable, "-m", "lab.cli", "sweep", "--config", config, f"runs_dir={tmp_path / 'runs'}"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    storage = f"sqlite:///{tmp_path / 'runs' / 'killed' / 'study.db'}"
    victims, deadline = [], time.time() + 180
    while len(victims) < 2 and time.time() < deadline:  # the stack tags its trials one after the other
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
        except (KeyError, sqlalchemy.exc.OperationalError):
            continue  # the launcher is still creating the database
        # kill the second stack mid-training, once the first stack's members are done
        if len(by_state(trials, TrialState.COMPLETE)) == 2:
            victims = [t for t in trials if t.state == TrialState.RUNNING and "pid" in t.user_attrs]
    assert len(victims) == 2, launcher.communicate()[0]
    time.sleep(1.0)
    os.kill(victims[0].user_attrs["pid"], signal.SIGKILL)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 1, output  # runs were left

    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"])
    assert summary["counts"]["left"] == 0 and summary["counts"]["complete"] == 4, summary
    trials = trials_of(tmp_path, "killed")
    assert all(t.state == TrialState.FAIL and "error" not in t.user_attrs
               for t in trials if t.number in {v.number for v in victims})
    complete = by_state(trials, TrialState.COMPLETE)
    assert len({t.user_attrs["run_key"] for t in complete}) == len(complete) == 4
    assert {t.user_attrs["run_key"] for t in complete} >= {v.user_attrs["run_key"] for v in victims}
    assert {len(t.user_attrs["stacked_with"]) for t in complete} == {2}  # the killed cell again as one stack
    reruns = [t for t in complete if "failed_trial" in t.system_attrs]
    assert sorted(t.system_attrs["failed_trial"] for t in reruns) == sorted(v.number for v in victims)
    assert len(trials) == 6 and summary["counts"]["duplicates"] == 0
    # each launch knows when its last trial finished: the killed one at the first stack's end, before its own end
    first_stack_end = max(t.datetime_complete for t in complete if t.number < 2)
    records = launches(optuna.load_study(study_name="killed", storage=storage))
    assert len(records) == 2 and all(0 < r["last_result_seconds"] <= r["seconds"] for r in records)
    started = datetime.fromisoformat(records[0]["started"]).astimezone().replace(tzinfo=None)
    assert abs((first_stack_end - started).total_seconds() - records[0]["last_result_seconds"]) < 3


def test_model_seed_sets_the_weights_not_the_batches(tmp_path):
    from lab.train import init_model

    runs = {seed: load_config([], TINY + [f"model_seed={seed}"]) for seed in (1, 2)}
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    first = init_model(runs[1], 64).state_dict()
    assert torch.equal(torch.get_rng_state(), rng)  # the batch order, drawn later, is the same for every seed
    again, other = init_model(runs[1], 64).state_dict(), init_model(runs[2], 64).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    mixed = [load_config([], TINY + [f"runs_dir={tmp_path}", "run_name=a", "model_seed=1"]),
             load_config([], TINY + [f"runs_dir={tmp_path}", "run_name=b"])]
    with pytest.raises(LabError, match="model_seed on every member or on none"):
        train_stacked(mixed)


def test_sweep_stacks_each_cells_lrs_and_seeds(tmp_path):
    import csv

    config = write_sweep(tmp_path, {"study": "seeds", "lrs": [1e-3, 1e-2], "seeds": [0, 1], "stack_lrs": True})
    summary = run_sweep(config, [f"runs_dir={tmp_path / 'runs'}"], workers=1)
    assert summary["counts"]["complete"] == 4 and summary["counts"]["failed"] == 0, summary
    complete = by_state(trials_of(tmp_path, "seeds"), TrialState.COMPLETE)
    assert {len(t.user_attrs["stacked_with"]) for t in complete} == {4}  # the cell's 2 lrs x 2 seeds, one stack
    assert sorted((t.params["trainer.lr"], t.params["model_seed"]) for t in complete) == [
        (1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]
    with open(tmp_path / "runs" / "seeds" / "report" / "cells.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    best_lr = [t for t in complete if t.params["trainer.lr"] == float(row["lr"])]
    assert row["seeds"] == "2" and float(row["best_val_acc"]) == pytest.approx(
        sum(t.value for t in best_lr) / 2, abs=1e-4)  # an lr's score: the mean over its seeds
    assert float(row["best_val_acc_std"]) >= 0


def test_stack_lrs_needs_a_grid_with_lrs(tmp_path, capsys):
    from lab.cli import main

    config = write_sweep(tmp_path, {"study": "x", "lrs": [1e-3], "stack_lrs": True})
    assert main(["sweep", "--config", config, f"runs_dir={tmp_path}"]) == 2
    assert "sweep.stack_lrs=true" in capsys.readouterr().err


def test_lab_bench_sweep_runs_every_variant(tmp_path, capsys):
    from lab.cli import main

    out = tmp_path / "rows.json"
    assert main(["bench", "sweep", "steps=4", "members=2", "processes=1", "model.d_model=16", "task.seq_len=32",
                 "task.num_kv_pairs=2", "data.num_test=64", "trainer.accelerator=cpu", "trainer.precision=32-true",
                 "trainer.num_threads=1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["one-by-one", "stacked x2", "1 process"]
    assert all(r["tokens_per_s"] > 0 and r["trials_per_hour"] > 0 and r["warmup_s"] >= 0 for r in rows)
    assert main(["bench", "sweep", "steps=4", "members=2", "processes=1", "process_stack=2", "model.d_model=16",
                 "task.seq_len=32", "task.num_kv_pairs=2", "data.num_test=64", "trainer.accelerator=cpu",
                 "trainer.precision=32-true", "trainer.num_threads=1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())[-1]["variant"] == "1 process, stacked x2"
    assert main(["bench", "sweep", "members=0"]) == 2
    assert "every number must be >= 1" in capsys.readouterr().err
    assert main(["bench", "sweep", "variant=bogus"]) == 2  # not the base run under a name it lacks
    assert "variant=bogus: not a variant of" in capsys.readouterr().err


def test_lab_bench_step_profiles_a_cells_step(tmp_path, capsys):
    from lab.cli import main

    out = tmp_path / "step.json"
    assert main(["bench", "step", "steps=2", "warmup=1", "model.d_model=16", "task.seq_len=32", "task.num_kv_pairs=2",
                 "data.num_test=64", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.num_threads=1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["wall_ms"] > 0 and result["gpu_busy_ms"] is None  # no GPU here
    assert any(row["op"] == "aten::mm" and row["calls"] >= 1 for row in result["top"])
    assert "per step, over 2 profiled steps" in capsys.readouterr().out
    assert main(["bench", "step", "warmup=0"]) == 2
    assert "warmup=0: a whole number >= 1" in capsys.readouterr().err


def test_compiled_training_matches_eager(tmp_path, single_thread):
    """trainer.compile=true in `lab train` trains as eager does (a wrong fused kernel: a different loss)."""
    runs = [load_config([], TINY + [f"runs_dir={tmp_path}", f"run_name=r{compiled}", f"trainer.compile={compiled}"])
            for compiled in (False, True)]
    eager, compiled = train(runs[0]), train(runs[1])
    assert compiled["final"]["val/loss"] == pytest.approx(eager["final"]["val/loss"], rel=1e-4)


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_stacks_compiled(mixer, tmp_path, single_thread):
    """A compiled stack (the fastest sweep on a GPU) trains each member as the eager stack does: Dynamo once
    failed inside vmap on GKA's and MesaNet's implicit solve, which now runs as a graph break."""
    def runs(tag, compiled):
        return [load_config([], TINY + [*MIXERS[mixer], "trainer.max_steps=4", f"trainer.lr={lr}",
                                        f"runs_dir={tmp_path}", f"run_name={tag}{i}", f"trainer.compile={compiled}"])
                for i, lr in enumerate([3e-3, 1e-2])]

    for eager, compiled in zip(train_stacked(runs("e", False)), train_stacked(runs("c", True)), strict=True):
        assert "error" not in compiled, compiled.get("error")
        assert compiled["final"]["val/loss"] == pytest.approx(eager["final"]["val/loss"], rel=1e-4)


def test_each_compiled_run_compiles_afresh(tmp_path, single_thread, monkeypatch, caplog):
    """A sweep worker compiles model after model in one process: past Dynamo's recompile_limit it would quietly
    train the rest eagerly."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    for name in ("attention", "deltanet"):
        train(load_config([], TINY + [f"model.name={name}", "trainer.max_steps=2", f"runs_dir={tmp_path}",
                                      f"run_name={name}", "trainer.compile=true"]))  # stacks: the same compile_fresh
    assert "recompile_limit" not in caplog.text
