"""One run across several processes with Lightning DDP (two gloo processes on the CPU), in `lab train` and
in a sweep, where the pruning callback must stop every rank."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.test_sweeps import TINY_RUN, by_state, trials_of, write_sweep

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.num_threads=1"]


def lab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # a subprocess: Lightning starts rank 1 by running this same command line again
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                            "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


def test_lab_train_two_gloo_processes(tmp_path):
    result = lab("train", "task.vocab_size=64", "task.seq_len=32", "task.num_kv_pairs=2", "data.num_train=512",
                 "data.num_test=64", "model.d_model=16", "model.num_layers=1", "trainer.batch_size=32",
                 "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.progress=plain",
                 f"runs_dir={tmp_path}", "experiment=ddp", *DDP, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "ddp").iterdir())
    assert len(runs) == 1  # rank 1 wrote into rank 0's run directory, not a second one
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["config"]["trainer"]["devices"] == 2
    assert result.stdout.count("run directory:") == 1  # one summary, from rank 0
    assert result.stdout.count("step 3 ") == 1  # one progress line per validation, not one per rank


def test_sweep_prunes_ddp_trials(tmp_path):
    """Each trial runs on two gloo ranks; the median pruner's decision (made on rank 0) stops both."""
    config = write_sweep(tmp_path, {
        "study": "ddp", "sampler": "tpe", "seed": 1, "n_trials": 5, "lrs": [], "metric": "final_val_loss",
        "direction": "minimize", "pruner": "median", "pruner_startup_trials": 1, "workers": 1,
        "space": {"trainer.lr": {"type": "float", "low": 1e-8, "high": 1e-1, "log": True}},
    }, {**TINY_RUN, "trainer": {**TINY_RUN["trainer"], "max_steps": 16, "accelerator": "cpu", "devices": 2,
                                "strategy": "ddp"}})
    result = lab("sweep", "--config", config, f"runs_dir={tmp_path / 'runs'}", "sweep.report=false", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = trials_of(tmp_path, "ddp")
    assert len(trials) == 5 and not by_state(trials, TrialState.FAIL), [t.user_attrs for t in trials]
    pruned = by_state(trials, TrialState.PRUNED)
    assert pruned, [(t.state, t.params) for t in trials]
    for trial in pruned:
        summary = json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())
        assert summary["steps"] == trial.user_attrs["pruned_at"] < 16  # both ranks stopped there
    study_dirs = sorted(p.name for p in (tmp_path / "runs" / "ddp").glob("trial-*"))
    assert study_dirs == sorted(f"trial-{t.number}" for t in trials)  # no rank started a trial of its own
    assert optuna.load_study(study_name="ddp", storage=f"sqlite:///{tmp_path / 'runs/ddp/study.db'}").trials
