"""Task registry: every synthetic task is a config dataclass plus a generator function.

A task module declares

    @dataclass
    class MyConfig:
        name: str = "my_task"     # must default to the registered name
        vocab_size: int = 256
        seq_len: int = 64
        def validate(self) -> None: ...   # raise TaskError for impossible parameters

    @register_task("my_task", MyConfig)
    def generate_my_task(cfg: MyConfig, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
        '''One-line description shown by `lab tasks`.'''
        cfg.validate()
        ...

and `check_examples` verifies what a generator returns before anything trains on it.

A generator that also takes a `split` keyword ("train" or "test") may make the two sets differ beyond
their seeds (MAD trains on every next token but tests only the recall positions); `generate_examples`
passes it where the generator accepts it, and checks the output.
"""

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value that the loss and the metrics skip


class TaskError(ValueError):
    """An impossible task parameter or malformed generator output; the message is one line."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config_cls: type  # dataclass holding the task's parameters
    generate: Callable[[Any, int, int], tuple[Tensor, Tensor]]  # (cfg, num_examples, seed) -> (inputs, labels)
    description: str  # first line of the generator's docstring
    takes_split: bool = False  # the generator accepts split="train" | "test"


TASKS: dict[str, TaskSpec] = {}

# Fields the rest of the lab reads from every task config.
_REQUIRED_FIELDS = ("name", "vocab_size", "seq_len")


def register_task(name: str, config_cls: type) -> Callable:
    """Decorator registering `generate(cfg, num_examples, seed) -> (inputs, labels)` under `name`."""
    _check_config_cls(name, config_cls)

    def decorator(generate: Callable) -> Callable:
        previous = TASKS.get(name)
        # Re-importing the same module (e.g. a reload) may re-register; two modules may not share a name.
        if previous is not None and previous.generate.__module__ != generate.__module__:
            raise TaskError(
                f"task '{name}' is registered twice: in {previous.generate.__module__} "
                f"and in {generate.__module__}"
            )
        doc = inspect.getdoc(generate) or ""
        takes_split = "split" in inspect.signature(generate).parameters
        TASKS[name] = TaskSpec(name, config_cls, generate, description=doc.split("\n")[0],
                               takes_split=takes_split)
        return generate

    return decorator


def _check_config_cls(name: str, config_cls: type) -> None:
    # Fail at import time, where the task author is looking, rather than mid-experiment.
    if not dataclasses.is_dataclass(config_cls):
        raise TaskError(f"task '{name}': config class {config_cls.__name__} must be a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for required in _REQUIRED_FIELDS:
        if required not in fields:
            raise TaskError(f"task '{name}': config class {config_cls.__name__} lacks field '{required}'")
    if fields["name"].default != name:
        raise TaskError(
            f"task '{name}': {config_cls.__name__}.name defaults to {fields['name'].default!r}, "
            f"expected {name!r}"
        )
    if not callable(getattr(config_cls, "validate", None)):
        raise TaskError(f"task '{name}': config class {config_cls.__name__} lacks a validate() method")


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise TaskError(f"unknown task '{name}'; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


SPLITS = ("train", "test")


def generate_examples(cfg, num_examples: int, seed: int, split: str = "train") -> tuple[Tensor, Tensor]:
    """`num_examples` checked examples of the task `cfg.name` for the train or test set."""
    if split not in SPLITS:
        raise TaskError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if num_examples < 1:
        raise TaskError(f"num_examples={num_examples}: must be >= 1")
    spec = get_task(cfg.name)
    if spec.takes_split:
        inputs, labels = spec.generate(cfg, num_examples, seed, split=split)
    else:
        inputs, labels = spec.generate(cfg, num_examples, seed)
    check_examples(cfg, inputs, labels)
    return inputs, labels


def check_examples(cfg, inputs: Tensor, labels: Tensor) -> None:
    """Raise TaskError unless (inputs, labels) is well-formed generator output for `cfg`."""
    task = f"task '{cfg.name}'"
    for what, tensor in (("inputs", inputs), ("labels", labels)):
        if not isinstance(tensor, Tensor):
            raise TaskError(f"{task}: {what} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.dtype != torch.int64:
            raise TaskError(f"{task}: {what} has dtype {tensor.dtype}, expected torch.int64")
        if tensor.dim() != 2 or tensor.shape[1] != cfg.seq_len or tensor.shape[0] == 0:
            raise TaskError(
                f"{task}: {what} has shape {list(tensor.shape)}, "
                f"expected [num_examples >= 1, seq_len={cfg.seq_len}]"
            )
    if inputs.shape != labels.shape:
        raise TaskError(f"{task}: inputs shape {list(inputs.shape)} != labels shape {list(labels.shape)}")

    bad = (inputs < 0) | (inputs >= cfg.vocab_size)
    if bad.any():
        i, t = bad.nonzero()[0].tolist()
        raise TaskError(
            f"{task}: inputs[{i}, {t}]={inputs[i, t].item()} is outside [0, vocab_size={cfg.vocab_size})"
        )
    supervised = labels != IGNORE_INDEX
    bad = supervised & ((labels < 0) | (labels >= cfg.vocab_size))
    if bad.any():
        i, t = bad.nonzero()[0].tolist()
        raise TaskError(
            f"{task}: labels[{i}, {t}]={labels[i, t].item()} is neither {IGNORE_INDEX} "
            f"nor in [0, vocab_size={cfg.vocab_size})"
        )
    unsupervised = ~supervised.any(dim=1)
    if unsupervised.any():
        i = unsupervised.nonzero()[0].item()
        raise TaskError(
            f"{task}: example {i} has no supervised label (all {IGNORE_INDEX}); "
            f"{unsupervised.sum().item()} of {len(labels)} examples are like this"
        )
