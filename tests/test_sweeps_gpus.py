"""`lab sweep --gpus 0,1 --per-gpu K`: which GPU each worker process sees, and the errors (no GPU needed)."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile

import pytest
import torch

from lab.cli import main
from sweeps import runner
from sweeps.report import time_section
from sweeps.spec import load_sweep
from sweeps.study import gpu_names
from tests.test_sweeps import ROOT, write_sweep


@pytest.fixture
def sweep(tmp_path):
    return load_sweep(write_sweep(tmp_path, {"study": "gpus", "lrs": [1e-3, 1e-2]}), [f"runs_dir={tmp_path}"])


def test_workers_spread_over_gpus_then_double_up(sweep, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sweep.cfg.gpus, sweep.cfg.per_gpu = [1, 3], 2
    assert runner.gpu_placement(sweep, workers_given=False) == ["1", "3", "1", "3"]
    assert sweep.cfg.workers == 4


def test_indices_map_through_an_outer_cuda_visible_devices(sweep, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    sweep.cfg.gpus = [1]
    assert runner.gpu_placement(sweep, workers_given=False) == ["7"]


def test_each_worker_process_gets_its_gpu(sweep, monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(subprocess, "Popen",
                        lambda cmd, **kw: started.append((kw["env"]["CUDA_VISIBLE_DEVICES"], cmd[-1])))
    sweep.cfg.workers = 3
    sweep.study_dir.mkdir(parents=True)
    runner._start_workers(sweep, tmp_path / "sweep.yaml", ["0", "1", "0"], start_by=0.0, end_by=0.0)
    # each worker also gets the launch's deadline (0.0: no time limit)
    assert started == [("0", "0.0"), ("1", "0.0"), ("0", "0.0")]


@pytest.mark.parametrize(("count", "gpus", "workers", "message"), [
    (0, [0], None, "this machine has no CUDA GPU"),
    (2, [0, 2], None, "no GPU 2 here (2 visible"),
    (2, [0, 1], 3, "that is 2 workers"),
])
def test_bad_gpu_requests(sweep, monkeypatch, count, gpus, workers, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    sweep.cfg.gpus = gpus
    if workers:
        sweep.cfg.workers = workers
    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        runner.gpu_placement(sweep, workers_given=workers is not None)


def test_cli_rejects_a_bad_gpu_list(tmp_path, capsys):
    config = write_sweep(tmp_path, {"study": "gpus", "lrs": [1e-3]})
    with pytest.raises(SystemExit):
        main(["sweep", "--config", config, "--gpus", "0,x"])
    assert "GPU indices separated by commas" in capsys.readouterr().err
    assert main(["sweep", "--config", config, f"runs_dir={tmp_path}", "--gpus", "0"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_launch_records_its_gpu_models(tmp_path, monkeypatch):
    """The launch record names the pinned GPUs' models (nvidia-smi, so the launcher starts no CUDA context) and
    the report's Time line shows them; a host without nvidia-smi records none."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nprintf "NVIDIA H200\\nNVIDIA H200\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert gpu_names(["1", "0", "1"]) == ["NVIDIA H200", "NVIDIA H200"]
    assert "--id=0,1" in (fake.parent / "args").read_text()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # unpinned workers see what this shell sees
    assert gpu_names([]) == ["NVIDIA H200", "NVIDIA H200"]
    assert "--id=3" in (fake.parent / "args").read_text()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: nothing to name
    assert gpu_names([]) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    launch = {"started": "2026-12-06T03:00:00Z", "host": "gpu-1", "workers": 4, "gpus": ["0", "1"],
              "gpu_names": ["NVIDIA H200", "NVIDIA H200"], "seconds": 600.0}
    assert "(4 worker(s), GPUs 0,1, 2x NVIDIA H200): 600 s" in time_section([], [launch], 10, 10)
    assert "Done:" not in time_section([], [launch], 10, 10)  # a finished study: no progress line
    assert time_section([], [launch], 6, 112).endswith(
        " Done: 6 of 112 trials; at 100 s a trial so far, the 106 left would take about 2.9 h more.")
    assert "of which" not in time_section([], [launch], 10, 10)  # a launch recorded before the field existed
    cut = {**launch, "seconds": 995.1, "last_result_seconds": 517.0}  # its last stack cut off with the machine
    assert "): 995 s], of which 478 s after a launch's last finished trial" in time_section([], [launch, cut], 10, 10)
    # the rate so far leaves the tail out: (600 + 517) s for 6 trials
    assert time_section([], [launch, cut], 6, 112).endswith("at 186 s a trial so far, the 106 left would take about 5.5 h more.")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert gpu_names([]) == []


def test_sweep_in_pieces_script_runs_a_launch_and_backs_up_the_live_database(tmp_path):
    """scripts/sweep-in-pieces.sh: a detached launch on the live database, then a consistent copy of it in OUT;
    a second call (no LIMIT or DEADLINE) starts nothing and copies again."""
    config = write_sweep(tmp_path, {"study": "pieces", "lrs": [1e-3, 1e-2]})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path / "out"), "WAIT": "240",
           "LAB": f"{sys.executable} -m lab.cli"}
    script = str(ROOT / "scripts" / "sweep-in-pieces.sh")

    def call(**extra):
        return subprocess.run(["bash", script, config], cwd=tmp_path, env=env | extra, capture_output=True, text=True,
                              timeout=300, check=True).stdout

    # a compile cache from an earlier piece (CACHE) is unpacked before the launch and packed again after it
    (tmp_path / "runs" / "compile-cache" / "triton").mkdir(parents=True)
    (tmp_path / "runs" / "compile-cache" / "triton" / "kernel.cubin").write_text("earlier piece")
    subprocess.run(["tar", "czf", "cache.tgz", "runs/compile-cache"], cwd=tmp_path, check=True)
    shutil.rmtree(tmp_path / "runs")
    first = call(LIMIT="10m", DEADLINE="20m", CACHE="cache.tgz")
    assert "time limit 10m, deadline 20m" in first and "no launch running" in first, first
    assert "compile cache unpacked from cache.tgz" in first and "compile cache: 0 MiB in $OUT" in first, first
    with tarfile.open(tmp_path / "out" / "compile-cache.tgz") as cache:
        assert "runs/compile-cache/triton/kernel.cubin" in cache.getnames()
    backup = sqlite3.connect(tmp_path / "out" / "study.backup.db")
    assert backup.execute("select state, count(*) from trials group by state").fetchall() == [("COMPLETE", 2)]
    launch = json.loads(backup.execute("select value_json from study_user_attributes where key like 'launch %'")
                        .fetchone()[0])
    assert launch["time_limit"] == "10m" and launch["deadline"] == "20m"
    assert (tmp_path / "runs" / "live" / "study.db").exists() and (tmp_path / "out" / "runs.tgz").exists()
    with tarfile.open(tmp_path / "out" / "runs.tgz") as runs:
        names = runs.getnames()
    assert "runs/pieces/trial-0/summary.json" in names and "runs/live/study.db" not in names
    assert not [name for name in names if "compile-cache" in name]
    second = call()
    assert "launched" not in second and "trials by state: [('COMPLETE', 2)]" in second, second
