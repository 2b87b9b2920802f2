"""One study shared by two hosts through PostgreSQL: two independent `lab sweep` launchers, each with its own
runs directory, finish one grid; every cell is trained exactly once. Needs a PostgreSQL server: the URL in
LAB_TEST_POSTGRES_URL (CI's .ci/run starts one), or the server binaries, with which
scripts/postgres-test-server.sh starts a throwaway one here; with neither, the test is skipped."""

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lab.cli import main
from sweeps.spec import cell_key, load_sweep
from sweeps.study import create_or_load, open_storage
from sweeps.worker import done_count

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "scripts" / "postgres-test-server.sh"
TINY_RUN = {
    "task": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 2},
    "data": {"num_train": 512, "num_test": 64},
    "model": {"name": "attention", "num_layers": 1, "num_heads": 1},
    "trainer": {"max_steps": 24, "batch_size": 32, "val_every_n_steps": 12, "log_every_n_steps": 4},
}


def _server_binaries() -> bool:
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"], "initdb").is_file()
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("LAB_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not _server_binaries():
        pytest.skip("no PostgreSQL: set LAB_TEST_POSTGRES_URL or install it (apt-get install postgresql)")
    # under /tmp: as root, the server runs as the `postgres` user, who must reach the directory
    directory = tempfile.mkdtemp(prefix="lab-pg-")
    started = subprocess.run([str(SERVER_SCRIPT), "start", directory], check=False, capture_output=True,
                             text=True)
    if started.returncode:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"{SERVER_SCRIPT.name} start failed: {started.stderr.strip()}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(SERVER_SCRIPT), "stop", directory], check=True)


def test_two_hosts_share_one_postgres_study(tmp_path, postgres_url):
    """Two launchers started at once, as two hosts (each its own runs/): no cell lost or trained twice."""
    study_name = f"pg_{uuid.uuid4().hex[:10]}"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": {
        "study": study_name, "lrs": [1e-3, 3e-3, 1e-2], "space": {"model.d_model": [16, 32]},
        "threads_per_worker": 1, "storage": postgres_url,
    }, "run": TINY_RUN}))
    sweep = load_sweep(str(config))
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        launchers = []
        for host in hosts:
            host.mkdir()
            # runs_dir is the default `runs`, in each host's directory: what a second machine would have
            command = [sys.executable, "-m", "lab.cli", "sweep", "--config", str(config), "--workers", "1"]
            launchers.append(subprocess.Popen(command, cwd=host, env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
        assert [launcher.returncode for launcher in launchers] == [0, 0], outputs

        trials = create_or_load(sweep, create=False).get_trials()
        cells = {cell_key(c, with_lr=True) for c in sweep.grid_cells()}
        assert len(cells) == sweep.budget() == 6
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        duplicates = [t for t in trials if t.state != TrialState.COMPLETE]
        # every cell trained exactly once; the only other trials are grid points both hosts took at the end
        assert sorted(t.user_attrs["run_key"] for t in complete) == sorted(cells), outputs
        assert "duplicate_of" not in str([t.user_attrs for t in complete])
        by_number = {t.number: t for t in complete}
        for trial in duplicates:
            assert trial.state == TrialState.PRUNED, (trial.number, trial.state, trial.user_attrs)
            owner = by_number[trial.user_attrs["duplicate_of"]]
            assert owner.user_attrs["run_key"] == trial.user_attrs["run_key"]
        assert len(complete) + len(duplicates) == len(trials) and done_count(sweep, trials) == sweep.budget()

        # each run is on the one host that trained it, with its summary; a duplicate keeps no run directory (a twin
        # that missed its older trial at the start, both reading the study at once, trained, then yielded and
        # removed its own)
        assert not [t.number for t in duplicates if "run_dir" in t.user_attrs], outputs
        trial_dirs = sorted(p for host in hosts for p in (host / "runs" / study_name).glob("trial-*"))
        assert sorted(p.name for p in trial_dirs) == sorted(f"trial-{t.number}" for t in complete)
        per_host = [len(list((host / "runs" / study_name).glob("trial-*"))) for host in hosts]
        assert min(per_host) >= 1, f"one host trained every run ({per_host}): the study was not shared"
        for trial in complete:
            run_dir = Path(trial.user_attrs["run_dir"])
            if not run_dir.is_absolute():
                run_dir = next(host / run_dir for host in hosts if (host / run_dir).is_dir())
            assert (run_dir / "summary.json").is_file(), run_dir

        # both launchers print the same totals: 6 complete, nothing failed, lost or left; the duplicates as far as
        # each saw them (a twin of the other host's may still have been training when its last cell was done)
        for output in outputs:
            text = " ".join(output.split())
            totals = re.search(rf"study {study_name}: 6 complete, 0 pruned, 0 failed, (\d+) duplicates, "
                               r"0 lost, 0 deferred, 0 left", text)
            assert totals and int(totals[1]) <= len(duplicates), output
    finally:
        optuna.delete_study(study_name=study_name, storage=open_storage(sweep))


def test_postgres_url_with_no_server_is_one_line_error(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": {"study": "nowhere", "lrs": [1e-3]}, "run": TINY_RUN}))
    url = f"postgresql://lab:lab@127.0.0.1:{port}/lab_test"
    command = ["sweep", "--config", str(config), f"sweep.storage={url}", f"runs_dir={tmp_path / 'runs'}"]
    assert main(command) == 2
    err = capsys.readouterr().err
    shown = url.replace("lab:lab@", "lab:***@")  # the password never printed
    assert err.startswith(f"error: sweep.storage={shown!r}: cannot open (") and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
