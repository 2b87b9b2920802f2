"""Run configuration: structured dataclasses merged from YAML files and `key=value` overrides.

The model and task sections are typed by the chosen `model.name` / `task.name`, so every key is checked
against the dataclass of that model or task, and bad input becomes one `LabError` line.
"""

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

import tasks
from lab.errors import LabError
from lab.models import ModelConfig, model_config_class

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "64-true", "bf16-true")
PROGRESS = ("auto", "rich", "plain", "none")
STRATEGIES = ("auto", "ddp")


@dataclass
class DataConfig:
    num_train: int = 10_000  # training examples per slice
    num_test: int = 1_000  # test examples per slice
    # Each slice is a dict of task overrides, e.g. [{seq_len: 128, num_kv_pairs: 8}]; empty = the task itself.
    # A slice's `num_examples` key sets its size (else num_train / num_test), as Zoology's slices have.
    # Sets that mix slices report accuracy per slice as well as overall.
    train_slices: list[Any] = field(default_factory=list)
    test_slices: list[Any] = field(default_factory=list)


@dataclass
class TrainerConfig:
    max_epochs: int = 32
    max_steps: int = -1  # -1 = no step limit
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_frac: float = 0.05  # linear warmup over this fraction of all steps, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: str = "32-true"  # bf16-mixed on a GPU
    accelerator: str = "auto"
    devices: int = 1  # > 1 with strategy=ddp: one process per device; batch_size is per device
    strategy: str = "auto"  # auto | ddp (Lightning DDP: gloo on CPU, NCCL on GPUs)
    compile: bool = False  # torch.compile the model (on an H200: 1.6-2.2x tokens/s, BENCHMARKS.md)
    early_stop_acc: float = 0.99  # stop once val/acc reaches this
    val_every_n_epochs: int = 1
    val_every_n_steps: int = 0  # > 0: validate every this many steps instead of once per epoch
    num_threads: int = 0  # CPU threads for torch ops; 0 = torch's default (one per core)
    log_every_n_steps: int = 10
    progress: str = "auto"  # auto: Rich bar in a terminal, plain log lines otherwise


@dataclass
class RunConfig:
    experiment: str = "default"  # runs/<experiment>/<run_name>/
    run_name: str = ""  # empty = <model>-<date>-<time>
    runs_dir: str = "runs"
    overwrite: bool = False  # allow reusing an existing run directory (its old files are replaced)
    seed: int = 0  # data, their order and (without model_seed) the initial weights
    # the initial weights' own seed (None = seed): runs that differ only in it train on the same batches, so a
    # sweep's seeds (sweep.seeds) stack like its lrs
    model_seed: int | None = None
    model: Any = None
    task: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def load_config(config_files: list[str] = (), overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """`base` (a config as nested dicts), YAML files (later wins), then `key=value` overrides -> a validated
    RunConfig (dataclass objects)."""
    raw = OmegaConf.create(base or {})
    for path in config_files:
        raw = OmegaConf.merge(raw, load_yaml(path))
    raw = OmegaConf.merge(raw, parse_overrides(overrides))
    model_cls = model_config_class(OmegaConf.select(raw, "model.name", default=ModelConfig.name))
    try:
        task_spec = tasks.get_task(OmegaConf.select(raw, "task.name", default="mqar"))
    except tasks.TaskError as err:
        raise LabError(f"task.name: {err}") from None
    cfg = _merge_checked(_schema(model_cls, task_spec.config_cls), raw)
    run: RunConfig = OmegaConf.to_object(cfg)
    validate(run)
    return run


@functools.cache
def _schema(model_cls: type, task_cls: type) -> DictConfig:
    """The typed defaults of a model and task pair, built once: building them is most of a load_config (a
    sweep checks hundreds of runs), and merging copies them rather than changing them."""
    return OmegaConf.structured(RunConfig(model=model_cls(), task=task_cls()))


def to_dict(run: RunConfig) -> dict:
    """The fully resolved config as plain containers (what summary.json and config.yaml hold)."""
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 64}} -> {'model.d_model': 64}; lists become strings (TensorBoard hparams)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value) if isinstance(value, (list, tuple)) or value is None else value
    return flat


def task_slices(run: RunConfig, split: str) -> list:
    """The task configs of the train or test set: one per slice, each a validated task dataclass."""
    overrides = run.data.train_slices if split == "train" else run.data.test_slices
    if not overrides:
        return [run.task]
    base = OmegaConf.structured(run.task)
    slices = []
    for i, override in enumerate(overrides):
        if not isinstance(override, dict):
            raise LabError(f"data.{split}_slices[{i}]={override!r}: each slice must be a mapping of task keys")
        if "name" in override and override["name"] != run.task.name:
            raise LabError(f"data.{split}_slices[{i}].name: slices must use the run's task ({run.task.name})")
        override = {key: value for key, value in override.items() if key != "num_examples"}  # see slice_sizes
        merged = _merge_checked(base, OmegaConf.create({"task": override}).task, where=f"data.{split}_slices[{i}]")
        slices.append(OmegaConf.to_object(merged))
    for cfg in slices:
        _validate_task(cfg)
    return slices


def slice_sizes(run: RunConfig, split: str) -> list[int]:
    """Examples per slice of the train or test set: a slice's `num_examples`, else data.num_train / num_test."""
    default = run.data.num_train if split == "train" else run.data.num_test
    overrides = run.data.train_slices if split == "train" else run.data.test_slices
    sizes = []
    for i, override in enumerate(overrides or [{}]):
        size = override.get("num_examples", default) if isinstance(override, dict) else default
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise LabError(f"data.{split}_slices[{i}].num_examples={size!r}: must be an integer >= 1")
        sizes.append(size)
    return sizes


def validate(run: RunConfig) -> None:
    run.model.validate()
    _validate_task(run.task)
    trainer = run.trainer
    for key, low in (("max_epochs", 1), ("batch_size", 1), ("devices", 1), ("val_every_n_epochs", 1),
                     ("val_every_n_steps", 0), ("log_every_n_steps", 1), ("num_threads", 0)):
        if getattr(trainer, key) < low:
            raise LabError(f"trainer.{key}={getattr(trainer, key)}: must be >= {low}")
    if trainer.lr <= 0:
        raise LabError(f"trainer.lr={trainer.lr}: must be > 0")
    if not 0 <= trainer.warmup_frac < 1:
        raise LabError(f"trainer.warmup_frac={trainer.warmup_frac}: must be in [0, 1)")
    if trainer.precision not in PRECISIONS:
        raise LabError(f"trainer.precision={trainer.precision!r}: allowed values are {', '.join(PRECISIONS)}")
    if trainer.strategy not in STRATEGIES:
        raise LabError(f"trainer.strategy={trainer.strategy!r}: allowed values are {', '.join(STRATEGIES)}")
    if trainer.devices > 1 and trainer.strategy != "ddp":
        raise LabError(f"trainer.devices={trainer.devices}: several devices train one run with trainer.strategy=ddp")
    if trainer.progress not in PROGRESS:
        raise LabError(f"trainer.progress={trainer.progress!r}: allowed values are {', '.join(PROGRESS)}")
    for key in ("num_train", "num_test"):
        if getattr(run.data, key) < 1:
            raise LabError(f"data.{key}={getattr(run.data, key)}: must be >= 1")
    for name in ("experiment", "run_name"):
        value = getattr(run, name)
        if "/" in value or value in (".", ".."):
            raise LabError(f"{name}={value!r}: must be a plain directory name (no '/')")
    if not run.experiment:
        raise LabError("experiment='': must not be empty")
    if run.model_seed is not None and run.model_seed < 0:
        raise LabError(f"model_seed={run.model_seed}: must be >= 0 (or null: the weights follow seed)")


def _validate_task(task_cfg) -> None:
    try:
        task_cfg.validate()
    except tasks.TaskError as err:
        raise LabError(str(err)) from None


def load_yaml(path: str, expected: str = "a mapping of config keys") -> DictConfig:
    """A YAML file that must hold a mapping (`expected` says which, in the error line)."""
    if not Path(path).is_file():
        raise LabError(f"--config {path}: no such file")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise LabError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise LabError(f"--config {path}: must hold {expected}")
    return loaded


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise LabError(f"{item!r}: overrides are key=value (e.g. model.d_model=128)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise LabError(f"could not parse overrides: {str(err).splitlines()[0]}") from None


def _merge_checked(schema: DictConfig, raw: DictConfig, where: str = "") -> DictConfig:
    try:
        return OmegaConf.merge(schema, raw)
    except ConfigKeyError as err:
        full_key = err.full_key or str(err.key)
        parent = full_key.rpartition(".")[0]
        node = OmegaConf.select(schema, parent) if parent else schema
        allowed = ", ".join(node.keys()) if isinstance(node, DictConfig) else "(none)"
        shown = f"{where}.{full_key}" if where else full_key
        raise LabError(f"unknown config key '{shown}'; allowed here: {allowed}") from None
    except ValidationError as err:
        key = f"{where}.{err.full_key}" if where else err.full_key
        raise LabError(omegaconf_message(err, key)) from None
    except OmegaConfBaseException as err:
        raise LabError(f"{where or 'config'}: {_first_line(err)}") from None


def omegaconf_message(err: Exception, key: str) -> str:
    """OmegaConf's error in the lab's words where it has a clearer one, else its first line."""
    first = _first_line(err)
    if "is not a ListConfig" in first:  # a scalar (or a string) given to a list key
        return f"{key}: must be a list ({key}=[a,b] on the command line, a YAML list in a file)"
    return f"{key}: {first}"


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0]
