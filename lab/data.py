"""Train and test sets from the task registry, as a LightningDataModule.

A set is one or more slices (task configs); each slice is generated with its own seed, checked, right-padded
to the longest slice (pad labels are -100) and tagged with its slice index for per-slice accuracy.
"""

from dataclasses import asdict

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import tasks
from lab.config import RunConfig, slice_sizes, task_slices
from lab.errors import LabError
from tasks.registry import IGNORE_INDEX as IGNORE


def slice_name(task_cfg, varying: list[str]) -> str:
    """A short label for a slice from the task keys that differ between slices, e.g. 'seq_len=128,num_kv_pairs=8'."""
    return ",".join(f"{key}={getattr(task_cfg, key)}" for key in varying) or task_cfg.name


def varying_keys(slices: list) -> list[str]:
    first = asdict(slices[0])
    return [key for key in first if any(asdict(s)[key] != first[key] for s in slices[1:])]


def data_seed(run_seed: int, slice_index: int, split: str) -> int:
    """Even seeds for training sets, odd for test sets: the two never share a generator stream."""
    return 2 * (1000 * run_seed + slice_index) + (split == "test")


def build_split(slices: list, num_per_slice: int | list[int], run_seed: int,
                split: str) -> tuple[TensorDataset, list[str]]:
    """Generate every slice with its own seed and stack them; returns the dataset and the slice names."""
    sizes = num_per_slice if isinstance(num_per_slice, list) else [num_per_slice] * len(slices)
    parts = []
    for index, (task_cfg, num_examples) in enumerate(zip(slices, sizes, strict=True)):
        try:
            # generate_examples passes `split` to tasks whose train and test sets differ (MAD) and checks the output
            inputs, labels = tasks.generate_examples(task_cfg, num_examples, data_seed(run_seed, index, split), split)
        except tasks.TaskError as err:
            raise LabError(str(err)) from None
        parts.append((inputs, labels, torch.full((len(inputs),), index, dtype=torch.long)))
    width = max(inputs.shape[1] for inputs, _, _ in parts)
    inputs = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=0) for x, _, _ in parts])
    labels = torch.cat([torch.nn.functional.pad(y, (0, width - y.shape[1]), value=IGNORE) for _, y, _ in parts])
    slice_ids = torch.cat([s for _, _, s in parts])
    varying = varying_keys(slices)
    return TensorDataset(inputs, labels, slice_ids), [slice_name(cfg, varying) for cfg in slices]


class TaskDataModule(L.LightningDataModule):
    def __init__(self, run: RunConfig):
        super().__init__()
        self.run = run
        self.train_slices = task_slices(run, "train")
        self.test_slices = task_slices(run, "test")
        self.train_sizes, self.test_sizes = slice_sizes(run, "train"), slice_sizes(run, "test")
        vocab_sizes = {s.vocab_size for s in self.train_slices + self.test_slices}
        if len(vocab_sizes) > 1:
            raise LabError(f"data slices: all slices must share task.vocab_size (got {sorted(vocab_sizes)})")
        self.vocab_size = vocab_sizes.pop()
        longest = max(s.seq_len for s in self.train_slices + self.test_slices)
        positions = run.model.max_position_embeddings
        if 0 < positions < longest:
            raise LabError(f"model.max_position_embeddings={positions}: must be 0 or >= the longest sequence "
                           f"of the data ({longest})")
        self.train_set = self.test_set = None
        self.test_slice_names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        seed = self.run.seed
        self.train_set, _ = build_split(self.train_slices, self.train_sizes, seed, "train")
        self.test_set, self.test_slice_names = build_split(self.test_slices, self.test_sizes, seed, "test")

    def train_dataloader(self) -> DataLoader:
        shuffle_rng = torch.Generator().manual_seed(self.run.seed)
        return DataLoader(self.train_set, batch_size=self.run.trainer.batch_size, shuffle=True,
                          generator=shuffle_rng, drop_last=len(self.train_set) >= self.run.trainer.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=max(self.run.trainer.batch_size, 256))
