"""Mixed-slice training sets, per-slice test accuracy, length extrapolation and the shipped task configs."""

from pathlib import Path

import pytest

from lab.config import load_config
from lab.data import TaskDataModule
from lab.errors import LabError
from lab.train import train

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([ROOT / "configs" / "zoology_mqar.yaml", *(ROOT / "configs" / "tasks").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    run = load_config([str(path)])
    data = TaskDataModule(run)  # task, slices, slice sizes and positions are checked here
    assert data.train_sizes and data.test_sizes


def test_zoology_protocol_config():
    run = load_config([str(ROOT / "configs" / "zoology_mqar.yaml")])
    data = TaskDataModule(run)
    assert [(s.seq_len, s.num_kv_pairs) for s in data.train_slices] == [
        (64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]
    assert data.train_sizes == [100_000, 20_000, 20_000, 20_000, 20_000]
    assert [(s.seq_len, s.num_kv_pairs) for s in data.test_slices][-1] == (1024, 256)
    assert data.test_sizes == [1000] * 7


def test_mixed_slices_and_longer_test_sequences_train_end_to_end(tmp_path):
    # Zoology's protocol in miniature: two train slices of different sizes and lengths, test slices up to
    # twice the longest training length (RoPE attention, no learned positions), accuracy per test slice.
    overrides = [
        "task.vocab_size=200", "model.d_model=32", "model.num_heads=1", "data.num_test=16",
        "data.train_slices=[{seq_len: 32, num_kv_pairs: 2, num_examples: 96}, {seq_len: 64, num_kv_pairs: 4}]",
        "data.num_train=32",
        ("data.test_slices=[{seq_len: 32, num_kv_pairs: 2}, {seq_len: 64, num_kv_pairs: 4},"
         " {seq_len: 128, num_kv_pairs: 4, num_examples: 8}]"),
        "trainer.max_epochs=1", "trainer.batch_size=32", "trainer.progress=none", "trainer.num_threads=1",
        f"runs_dir={tmp_path}",
    ]
    run = load_config([], overrides)
    data = TaskDataModule(run)
    data.setup()
    assert len(data.train_set) == 96 + 32 and len(data.test_set) == 16 + 16 + 8
    assert data.test_set.tensors[0].shape[1] == 128  # padded to the longest test slice
    summary = train(run)
    assert summary["steps"] == 4
    slices = {k for k in summary["final"] if k.startswith("val/acc_slice/")}
    assert slices == {"val/acc_slice/seq_len=32,num_kv_pairs=2", "val/acc_slice/seq_len=64,num_kv_pairs=4",
                      "val/acc_slice/seq_len=128,num_kv_pairs=4"}


def test_mad_train_and_test_sets_differ_by_split(tmp_path):
    # MAD's recall tasks train on every next token and test the recall positions only.
    run = load_config([], ["task.name=mad_in_context_recall", "task.seq_len=32", "data.num_train=64",
                           "data.num_test=64"])
    data = TaskDataModule(run)
    data.setup()
    train_labels, test_labels = data.train_set.tensors[1], data.test_set.tensors[1]
    assert (train_labels != -100).sum(dim=1).eq(31).all()
    assert (test_labels != -100).sum() < (train_labels != -100).sum() / 2


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "true"])
def test_bad_slice_size_is_one_line(value):
    run = load_config([], [f"data.train_slices=[{{seq_len: 64, num_examples: {value}}}]"])
    with pytest.raises(LabError, match=r"data.train_slices\[0\].num_examples=.*: must be an integer >= 1"):
        TaskDataModule(run)


def test_slice_with_unknown_task_key_is_one_line():
    run = load_config([], ["task.name=induction_heads", "data.test_slices=[{seq_len: 64, num_kv_pairs: 4}]"])
    with pytest.raises(LabError, match=r"unknown config key 'data.test_slices\[0\].num_kv_pairs'"):
        TaskDataModule(run)
