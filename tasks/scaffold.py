"""`lab new-task NAME`: write a new task module, a run config and a test from a template.

The template is a working task (recall the first token of the sequence) so that the three files train
and pass their tests before the author changes anything; the author then rewrites the generator.
"""

import keyword
import re
from pathlib import Path
from string import Template

from tasks.registry import TASKS, TaskError

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED = {"registry", "scaffold", "tasks", "test"}


def task_files(name: str, root: Path) -> list[Path]:
    """The files `new_task(name, root)` writes: the task module, its run config and its test."""
    root = Path(root)
    return [root / "tasks" / f"{name}.py", root / "configs" / "tasks" / f"{name}.yaml",
            root / "tests" / f"test_task_{name}.py"]


def new_task(name: str, root: Path) -> list[Path]:
    """Write tasks/<name>.py, configs/tasks/<name>.yaml and tests/test_task_<name>.py under `root`.

    Raises TaskError (one line) for a name that is not a lower-case identifier, is taken by a registered
    task, or whose files exist; nothing is written then. Returns the paths written.
    """
    if not _NAME.fullmatch(name) or keyword.iskeyword(name) or name in _RESERVED:
        raise TaskError(f"task name {name!r}: must be a lower-case Python identifier (letters, digits, _), "
                        f"not a keyword or one of {', '.join(sorted(_RESERVED))}")
    if name in TASKS:
        raise TaskError(f"task name {name!r}: a task of that name is already registered "
                        f"(in {TASKS[name].generate.__module__})")
    paths = task_files(name, root)
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise TaskError(f"task name {name!r}: {', '.join(existing)} already exists; nothing written")
    class_name = "".join(part.capitalize() for part in name.split("_") if part) + "Config"
    for path, template in zip(paths, (_MODULE, _CONFIG, _TEST)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(name=name, Config=class_name))
    return paths


_MODULE = '''"""$name: a new task. Replace this docstring with the task's definition and one example.

One example (the template task: recall the first token; vocab_size=16, seq_len=8):

    inputs:  7   3   12  0   5   9   1   4
    labels: -100 -100 -100 -100 -100 -100 -100 7

The label at the last position is the first token. Rewrite `generate` for your task: it returns
(inputs, labels), int64 tensors of shape [num_examples, seq_len] with inputs in [0, vocab_size) and
labels in [0, vocab_size) where the model is scored and IGNORE_INDEX (-100) elsewhere. The label at
position t is what the model should predict after reading inputs[0..t].
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks.registry import IGNORE_INDEX, TaskError, register_task


@dataclass
class $Config:
    name: str = "$name"
    vocab_size: int = 16  # tokens are 0 .. vocab_size - 1
    seq_len: int = 16  # tokens per example

    def validate(self) -> None:
        # Raise TaskError with one line naming the parameter; `lab` shows it before anything trains.
        if self.vocab_size < 2:
            raise TaskError(f"task.vocab_size={self.vocab_size}: must be >= 2")
        if self.seq_len < 2:
            raise TaskError(f"task.seq_len={self.seq_len}: must be >= 2")


@register_task("$name", $Config)
def generate(cfg: $Config, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Recall the first token: random tokens; the label at the last position is the first token."""
    cfg.validate()
    gen = torch.Generator().manual_seed(seed)  # all randomness from this generator: same seed, same data
    # Whole tensors at once, no loop over examples: 100k examples take well under a second.
    inputs = torch.randint(cfg.vocab_size, (num_examples, cfg.seq_len), generator=gen)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, -1] = inputs[:, 0]
    return inputs, labels
'''

_CONFIG = '''# $name: a small run that trains in about a minute on a CPU.
#   lab train --config configs/tasks/$name.yaml
experiment: $name
task:
  name: $name
  vocab_size: 16
  seq_len: 16
data:
  num_train: 20000
  num_test: 500
model:
  name: attention
  d_model: 32
  num_layers: 2
  num_heads: 1
trainer:
  max_epochs: 1
  max_steps: 300
  batch_size: 64
  lr: 3.0e-3
  val_every_n_steps: 50
  early_stop_acc: 0.9
'''

_TEST = '''"""Tests of the $name task: generator invariants, parameter errors, and that a small model learns it."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lab.config import load_config
from lab.train import train
from tasks import TaskError, check_examples, get_task
from tasks.$name import $Config, generate

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tasks" / "$name.yaml")


def test_generator_invariants():
    cfg = $Config()
    inputs, labels = generate(cfg, 64, seed=0)
    assert inputs.shape == labels.shape == (64, cfg.seq_len)
    check_examples(cfg, inputs, labels)  # dtypes, vocabulary ranges, a supervised position per example
    again, _ = generate(cfg, 64, seed=0)
    other, _ = generate(cfg, 64, seed=1)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    assert get_task("$name").generate is generate


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(TaskError, match="task.vocab_size=1") as err:
        generate(replace($Config(), vocab_size=1), 4, seed=0)
    assert "\\n" not in str(err.value)


def test_a_small_model_learns_it(tmp_path):
    summary = train(load_config([CONFIG], ["trainer.progress=none", "trainer.num_threads=1",
                                           f"runs_dir={tmp_path}"]))
    chance = 1 / $Config().vocab_size
    assert summary["best_val_acc"] > chance + 0.2, summary["final"]
'''
