"""End to end through Lightning: real learning on MQAR, summary.json, TensorBoard files, run directories."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lab.cli import main
from lab.config import load_config
from lab.train import train

DEMO = [str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")]
FAST = ["data.num_test=500", "trainer.progress=none"]


def test_gka_learns_mqar(tmp_path):
    """The demo's MQAR (values from 64 tokens: chance 1/64), GKA as in the paper's MQAR runs, seeded."""
    overrides = FAST + ["model.name=gka", "model.gating=false", "model.alpha_connection=false",
                        "model.num_iter=10", "trainer.early_stop_acc=0.9", f"runs_dir={tmp_path}"]
    summary = train(load_config(DEMO, overrides))
    assert summary["best_val_acc"] >= 0.9, summary["final"]
    assert summary["steps"] <= 1500
    assert summary["stopped_early"] and summary["best_step"] == summary["steps"]


def test_attention_learns_mqar(tmp_path):
    """Attention on the same MQAR, with the demo's settings (one head, lr 1e-3), seeded."""
    attention = str(Path(DEMO[0]).parent / "demo" / "attention.yaml")
    overrides = FAST + ["trainer.early_stop_acc=0.9", "overwrite=false", f"runs_dir={tmp_path}"]
    summary = train(load_config(DEMO + [attention], overrides))
    assert summary["best_val_acc"] >= 0.9, summary["final"]
    assert summary["steps"] <= 1500


def test_summary_tensorboard_and_checkpoint(tmp_path, capsys):
    overrides = ["model.name=gka", "model.num_iter=2", "model.d_model=16", "task.vocab_size=80",
                 "task.seq_len=32", "data.num_train=128", "data.num_test=64", "trainer.max_epochs=2",
                 "trainer.batch_size=32", "trainer.log_every_n_steps=1", "trainer.progress=plain", f"runs_dir={tmp_path}", "experiment=exp",
                 "run_name=first", "data.test_slices=[{seq_len: 32, num_kv_pairs: 4}, {seq_len: 64, num_kv_pairs: 8}]"]
    summary = train(load_config([], overrides))
    run_dir = tmp_path / "exp" / "first"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("best_val_acc", "best_epoch", "best_step", "params", "state_size_bytes", "wall_seconds",
                "train_tokens_per_second", "final", "config"):
        assert on_disk[key] is not None, key
    assert 0 <= on_disk["best_val_acc"] <= 1 and on_disk["train_tokens_per_second"] > 0
    assert 0 <= on_disk["warmup_seconds"] < on_disk["train_seconds"] <= on_disk["wall_seconds"]
    assert on_disk["config"]["model"]["num_iter"] == 2 and on_disk["config"]["task"]["vocab_size"] == 80
    assert on_disk["final"]["val/acc"] == pytest.approx(on_disk["final"]["val/acc"])
    assert {"val/acc_slice/seq_len=32,num_kv_pairs=4", "val/acc_slice/seq_len=64,num_kv_pairs=8"} <= set(
        on_disk["final"])
    assert (run_dir / "config.yaml").exists()
    assert list((run_dir / "checkpoints").glob("best*.ckpt"))

    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/loss", "val/acc", "hp/best_val_acc"} <= scalars
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    assert b"model.num_iter" in hparams["_hparams_/session_start_info"]

    assert main(["runs", "exp", "--runs-dir", str(tmp_path)]) == 0
    assert "first" in capsys.readouterr().out
    assert main(["runs", "missing", "--runs-dir", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_too_few_learned_positions_is_rejected_before_training(tmp_path, capsys):
    code = main(["train", "model.max_position_embeddings=32", "task.seq_len=64", f"runs_dir={tmp_path}"])
    assert code == 2
    assert "model.max_position_embeddings=32: must be 0 or >= the longest sequence of the data (64)" in (
        capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_existing_run_directory_is_kept(tmp_path, capsys):
    run_dir = tmp_path / "exp" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}")
    code = main(["train", f"runs_dir={tmp_path}", "experiment=exp", "run_name=taken", "trainer.max_epochs=1"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == "{}"


def test_no_improvement_does_not_stop_a_run_early(tmp_path):
    # a frozen model (lr ~ 0) never improves val/acc; only the accuracy threshold or the budget may stop it
    overrides = ["model.d_model=16", "task.vocab_size=80", "task.seq_len=32", "data.num_train=640",
                 "data.num_test=32", "trainer.lr=1e-12", "trainer.max_epochs=1", "trainer.max_steps=12", "trainer.val_every_n_steps=2",
                 "trainer.batch_size=32", "trainer.progress=none", f"runs_dir={tmp_path}"]
    summary = train(load_config([], overrides))
    assert summary["steps"] == 12 and not summary["stopped_early"]


def test_step_timer_rates_split_off_the_warm_up():
    # one slow first window (compiles, CUDA start-up) and steady steps: the median is the steady rate, and
    # warmup_seconds what the run paid above it (a trial's one-off cost, which trials/hour must include)
    from lab.train import StepTimer

    timer = StepTimer(torch.device("cpu"))
    timer.step_seconds = [0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    rates = timer.rates(tokens=700)
    assert rates["train_step_ms_median"] == pytest.approx(100.0)
    assert rates["train_seconds"] == pytest.approx(1.5)
    assert rates["warmup_seconds"] == pytest.approx(0.8)
    assert rates["train_tokens_per_second"] == pytest.approx(700 / 1.5)
