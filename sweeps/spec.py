"""A sweep is data: one YAML file with a `sweep:` section (the study) and a `run:` section (the base run).

    sweep:
      study: gka_ablation                 # runs/<study>/ and the Optuna study name
      base_configs: [configs/demo.yaml]   # run config files under `run:` (like `lab train --config`)
      sampler: grid                       # grid | tpe | random
      lrs: [1.0e-3, 1.0e-2]               # every cell at each lr; a cell's score is its best (Zoology)
      seeds: [0, 1]                       # optional: every lr at each init seed (model_seed); an lr scores its mean
      variants:                           # named override sets: one categorical axis
        gka: {model.name: gka}
        no_gating: {model.name: gka, model.gating: false}
      space:                              # more axes, crossed with the variants
        model.d_model: [64, 128]                              # a list: categorical (grid axis)
        mqar: {sets: {L64: {task.seq_len: 64, task.num_kv_pairs: 4}, L128: {task.seq_len: 128, task.num_kv_pairs: 8}}}
        model.num_iter: {values: [1, 30], when: {model.name: gka}}   # sampled only when the condition holds
        trainer.weight_decay: {type: float, low: 0.0, high: 0.2}     # numeric: tpe / random only
    run:                                  # run config keys on top of base_configs
      trainer: {max_steps: 800}

A trial samples `variant`, then the space in file order, then `trainer.lr`, then `model_seed`; keys whose `when` does not hold
are left out, so two grid points can name the same run (a duplicate, skipped by the worker). An axis with
`sets` (like `variants`) chooses a named set of keys that move together, e.g. an MQAR (seq_len, kv pairs).
"""

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab.config import RunConfig, load_config, load_yaml, omegaconf_message, parse_overrides, to_dict
from lab.errors import LabError

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "hyperband")
METRICS = {"best_val_acc": "maximize", "final_val_acc": "maximize", "final_val_loss": "minimize"}
DIRECTIONS = ("maximize", "minimize")
LR_KEY = "trainer.lr"
SEED_KEY = "model_seed"  # sweep.seeds: the initial weights' seed (the data follow the run's `seed`)
MEMBER_AXES = (LR_KEY, SEED_KEY)  # what tells a cell's runs apart: a cell is a run up to its lr and seed
VARIANT_KEY = "variant"


@dataclass
class SweepConfig:
    study: str = ""  # study name: runs/<study>/ holds the database, trials and report
    base_configs: list[str] = field(default_factory=list)  # run config files merged under `run:`
    storage: str | None = None  # None = sqlite:///<runs_dir>/<study>/study.db; any SQLAlchemy URL; *.log = journal
    sampler: str = "grid"  # grid (ablations) | tpe (tuning) | random
    seed: int = 0  # sampler seed
    pruner: str = "none"  # none | median | hyperband (on val/acc at each validation)
    pruner_startup_trials: int = 4  # median: trials finished before any pruning
    pruner_warmup_steps: int = 0  # no pruning before this training step
    metric: str = "best_val_acc"  # summary.json value a trial reports: best_val_acc | final_val_acc | final_val_loss
    direction: str = "maximize"
    n_trials: int | None = None  # trial budget; grid: None = every cell at every lr
    lrs: list[float] = field(default_factory=lambda: [1e-4, 4.6e-4, 2.2e-3, 1e-2])  # [] = lr not swept
    seeds: list[int] = field(default_factory=list)  # model_seed values, each lr at each; [] = not swept
    stack_lrs: bool = False  # train a cell's lrs (x seeds) as one stacked model in one process (lab/stacked.py); grid
    variants: dict[str, Any] = field(default_factory=dict)  # name -> {run key: value}
    space: dict[str, Any] = field(default_factory=dict)  # run key -> list | {values, when} | {type, low, high, ...}
    workers: int = 1  # worker processes on this host
    gpus: list[int] = field(default_factory=list)  # GPUs the workers are pinned to (CUDA_VISIBLE_DEVICES); [] = none
    per_gpu: int = 1  # workers per GPU when gpus is set (then workers = len(gpus) * per_gpu)
    threads_per_worker: int = 0  # torch CPU threads per worker; 0 = cores / workers
    heartbeat_interval: int = 10  # seconds; a trial whose worker died is failed after grace_period and re-run
    grace_period: int = 30
    max_retry: int = 2  # re-runs of a trial whose worker died
    report: bool = True  # write runs/<study>/report/ when the study ends
    time_limit: str | None = None  # e.g. 2h, 90m, 600 (s): start no trial after this long; a rerun goes on
    # e.g. 25m: the launch must be done by then (a machine that goes back); a trial whose first steps' pace says it
    # would end later stops and goes back to the queue (lab/pace.py); a stack too long for a whole launch splits
    deadline: str | None = None


@dataclass
class Axis:
    key: str
    values: list | None = None  # categorical choices
    sets: dict[str, dict] | None = None  # label -> run keys set together (values are the labels)
    kind: str = "categorical"  # categorical | int | float
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict[str, list] = field(default_factory=dict)

    def produces(self) -> set[str]:
        return {self.key} | {key for keys in (self.sets or {}).values() for key in keys}

    def active(self, chosen: dict, base: dict) -> bool:
        return all(chosen.get(key, base.get(key)) in allowed for key, allowed in self.when.items())

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.values)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass
class Sweep:
    """A resolved sweep: its settings, the base run (as a flat dict of keys) and the axes in sampling order."""

    cfg: SweepConfig
    run: dict  # the base run config as written (files + inline + command line), nested
    base_flat: dict  # the same, resolved and flat ("model.name": ...): what `when` conditions read
    runs_dir: str
    axes: list[Axis]

    @property
    def study_dir(self) -> Path:
        return Path(self.runs_dir) / self.cfg.study

    @property
    def storage_url(self) -> str:
        return self.cfg.storage or f"sqlite:///{self.study_dir / 'study.db'}"

    @property
    def time_limit_seconds(self) -> float:
        """sweep.time_limit in seconds; 0 = none."""
        return duration_seconds(self.cfg.time_limit) if self.cfg.time_limit else 0.0

    @property
    def deadline_seconds(self) -> float:
        """sweep.deadline in seconds; 0 = none."""
        return duration_seconds(self.cfg.deadline, "sweep.deadline") if self.cfg.deadline else 0.0

    @property
    def storage_shown(self) -> str:
        """The storage URL for messages and reports: a password in it reads ***."""
        return hide_password(self.storage_url)

    def sample(self, trial) -> dict[str, Any]:
        """The run overrides of one trial: each axis whose `when` holds, after the axes its condition reads."""
        chosen: dict[str, Any] = {}
        pending = list(self.axes)
        while pending:
            # an axis is decided once no other undecided axis can still set a key its condition reads
            axis = next(a for a in pending if not any(
                set(a.when) & b.produces() for b in pending if b is not a))
            pending.remove(axis)
            if not axis.active(chosen, self.base_flat):
                continue
            value = axis.suggest(trial)
            chosen[axis.key] = value
            if axis.sets:
                chosen.update(axis.sets[value])
        return chosen

    @property
    def set_axes(self) -> dict[str, dict]:
        return {axis.key: axis.sets for axis in self.axes if axis.sets}

    def run_config(self, overrides: dict[str, Any], **extra: Any) -> RunConfig:
        """The run config of one trial: base run, then the trial's overrides, then `extra` (run_name...)."""
        items = {k: v for k, v in overrides.items() if k not in self.set_axes} | extra
        dotlist = [f"{key}={yaml_value(value)}" for key, value in items.items()]
        return load_config([], dotlist, base=self.run)

    def trial_placement(self, number: int) -> dict[str, Any]:
        """Where trial `number` trains, on this host: runs/<study>/trial-<number>/, never over an existing run."""
        return {"experiment": self.cfg.study, "run_name": f"trial-{number}", "runs_dir": self.runs_dir,
                "overwrite": False, "trainer.progress": "plain"}

    def describe(self, overrides: dict[str, Any]) -> str:
        """A short label for a run: `gka_full d_model=64 lr=0.001`: set labels, then the other axes' values."""
        sets = self.set_axes
        hidden = {key for axis, chosen_sets in sets.items() if axis in overrides
                  for key in chosen_sets.get(overrides[axis], {})}
        parts = []
        for key, value in overrides.items():
            if key == VARIANT_KEY:
                parts.append(str(value))
            elif key in sets:
                parts.append(f"{key}={value}")
            elif key not in hidden:
                parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
        return " ".join(parts)

    def grid_space(self) -> dict[str, list]:
        return {axis.key: list(axis.values) for axis in self.axes}

    def grid_cells(self) -> list[dict[str, Any]]:
        """Every distinct run of a grid sweep (conditional axes make some grid points coincide)."""
        space = self.grid_space()
        keys = list(space)
        seen, cells = set(), []
        for combo in itertools.product(*space.values()):
            point = dict(zip(keys, combo))
            overrides = self.sample(FixedTrial(point))
            marker = cell_key(overrides, with_lr=True)
            if marker not in seen:
                seen.add(marker)
                cells.append(overrides)
        return cells

    def budget(self) -> int:
        return self.cfg.n_trials if self.cfg.n_trials is not None else len(self.grid_cells())


class FixedTrial:
    """Stands in for an Optuna trial when enumerating or validating: returns the given values."""

    def __init__(self, params: dict[str, Any]):
        self.params = params

    def suggest_categorical(self, key, values):
        return self.params.get(key, values[0])

    def suggest_int(self, key, low, high, step=1, log=False):
        return self.params.get(key, low)

    def suggest_float(self, key, low, high, step=None, log=False):
        return self.params.get(key, low)


def cell_key(overrides: dict[str, Any], with_lr: bool = False) -> str:
    """A cell is a run up to its learning rate and seed: the Zoology protocol scores it by its best lr (an lr by
    its mean over seeds). with_lr: the run's own key (lr and seed included)."""
    items = {k: v for k, v in overrides.items() if with_lr or k not in MEMBER_AXES}
    return yaml.safe_dump(items, sort_keys=True, default_flow_style=True).strip()


def yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_sweep(path: str, overrides: list[str] = ()) -> Sweep:
    """Sweep YAML + `key=value` overrides (`sweep.*` keys go to the study, others to the base run)."""
    raw = load_yaml(path, expected="a mapping with `sweep:` and `run:` sections")
    unknown = set(raw.keys()) - {"sweep", "run"}
    if unknown:
        raise LabError(f"--config {path}: unknown top-level key(s) {', '.join(sorted(unknown))}; allowed: sweep, run")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise LabError(f"{item!r}: overrides are key=value (e.g. sweep.workers=2 or trainer.max_steps=100)")
    sweep_overrides = [item.removeprefix("sweep.") for item in overrides if item.startswith("sweep.")]
    run_overrides = [item for item in overrides if not item.startswith("sweep.")]

    cfg = _sweep_section(raw.get("sweep") or OmegaConf.create(), sweep_overrides)
    base_files = [str(p) for p in cfg.base_configs]
    for p in base_files:
        if not Path(p).is_file():
            raise LabError(f"sweep.base_configs: {p}: no such file")
    inline = raw.get("run") or OmegaConf.create()
    if not isinstance(inline, DictConfig):
        raise LabError(f"--config {path}: `run:` must be a mapping of run config keys")
    # files first, then the inline section, then the command line: the same layering as `lab train`.
    # The base run stays as written (unresolved), so a variant may switch model.name without inheriting
    # the keys of another model's defaults.
    raw_run = OmegaConf.create()
    for p in base_files:
        raw_run = OmegaConf.merge(raw_run, load_yaml(p))
    raw_run = OmegaConf.merge(raw_run, inline, parse_overrides(run_overrides))
    run = OmegaConf.to_container(raw_run)
    base_run = load_config([], [], base=run)
    sweep = Sweep(cfg=cfg, run=run, base_flat=flat(to_dict(base_run)), runs_dir=base_run.runs_dir, axes=_axes(cfg))
    _check_runs(sweep)
    return sweep


def _sweep_section(section, overrides: list[str]) -> SweepConfig:
    schema = OmegaConf.structured(SweepConfig)
    try:
        merged = OmegaConf.merge(schema, section, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        first = str(err).splitlines()[0]
        if "not in struct" in first or "Key '" in first and "not in" in first:
            allowed = ", ".join(f.name for f in SweepConfig.__dataclass_fields__.values())
            raise LabError(f"unknown sweep key 'sweep.{key}'; allowed: {allowed}") from None
        raise LabError(omegaconf_message(err, f"sweep.{key}")) from None
    cfg: SweepConfig = OmegaConf.to_object(merged)
    cfg.variants = _plain(cfg.variants)
    cfg.space = _plain(cfg.space)
    _validate(cfg)
    return cfg


def _plain(node):
    return OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node


def _validate(cfg: SweepConfig) -> None:
    if not cfg.study or "/" in cfg.study or cfg.study in (".", ".."):
        raise LabError(f"sweep.study={cfg.study!r}: must be a plain non-empty name (it names runs/<study>/)")
    if cfg.sampler not in SAMPLERS:
        raise LabError(f"sweep.sampler={cfg.sampler!r}: unknown sampler; allowed: {', '.join(SAMPLERS)}")
    if cfg.pruner not in PRUNERS:
        raise LabError(f"sweep.pruner={cfg.pruner!r}: unknown pruner; allowed: {', '.join(PRUNERS)}")
    if cfg.metric not in METRICS:
        raise LabError(f"sweep.metric={cfg.metric!r}: allowed: {', '.join(METRICS)}")
    if cfg.direction not in DIRECTIONS:
        raise LabError(f"sweep.direction={cfg.direction!r}: allowed: {', '.join(DIRECTIONS)}")
    if cfg.workers < 1:
        raise LabError(f"sweep.workers={cfg.workers}: must be >= 1")
    if cfg.per_gpu < 1:
        raise LabError(f"sweep.per_gpu={cfg.per_gpu}: must be >= 1")
    if len(set(cfg.gpus)) != len(cfg.gpus) or any(not isinstance(g, int) or g < 0 for g in cfg.gpus):
        raise LabError(f"sweep.gpus={cfg.gpus}: distinct GPU indices >= 0, e.g. [0, 1]")
    if cfg.n_trials is not None and cfg.n_trials < 1:
        raise LabError(f"sweep.n_trials={cfg.n_trials}: must be >= 1 (or null: every grid cell)")
    if cfg.sampler != "grid" and cfg.n_trials is None:
        raise LabError(f"sweep.n_trials: a {cfg.sampler} study needs a trial budget (e.g. sweep.n_trials=50)")
    if not cfg.space and not cfg.variants and not cfg.lrs:
        raise LabError("sweep.space: empty search space (give sweep.space, sweep.variants or sweep.lrs)")
    if cfg.lrs and LR_KEY in cfg.space:
        raise LabError(f"sweep.space.{LR_KEY}: also set by sweep.lrs; use one of them (sweep.lrs=[] to search lr)")
    if cfg.stack_lrs and (cfg.sampler != "grid" or len(cfg.lrs) * max(1, len(cfg.seeds)) < 2):
        raise LabError("sweep.stack_lrs=true: stacks a grid cell's learning rates (x seeds); needs sampler grid and "
                       "2+ runs a cell from sweep.lrs and sweep.seeds")
    if SEED_KEY in cfg.space:
        raise LabError(f"sweep.space.{SEED_KEY}: give init seeds as sweep.seeds (each lr at each seed)")
    if len(set(cfg.seeds)) != len(cfg.seeds) or any(not isinstance(x, int) or x < 0 for x in cfg.seeds):
        raise LabError(f"sweep.seeds={cfg.seeds}: distinct integers >= 0, e.g. [0, 1, 2]")
    if any(lr <= 0 for lr in cfg.lrs):
        raise LabError(f"sweep.lrs={cfg.lrs}: learning rates must be > 0")
    for name, overrides in cfg.variants.items():
        if not isinstance(overrides, dict):
            raise LabError(f"sweep.variants.{name}: must be a mapping of run keys, e.g. {{model.name: gka}}")
    if cfg.time_limit is not None:
        duration_seconds(cfg.time_limit)
    if cfg.deadline is not None:
        duration_seconds(cfg.deadline, "sweep.deadline")
    for key in ("heartbeat_interval", "grace_period"):
        if getattr(cfg, key) < 1:
            raise LabError(f"sweep.{key}={getattr(cfg, key)}: must be >= 1 second")


def _check_conditions(axes: list[Axis]) -> None:
    pending = list(axes)
    while pending:
        ready = [a for a in pending if not any(set(a.when) & b.produces() for b in pending if b is not a)]
        if not ready:
            raise LabError(f"sweep.space: the `when` conditions of {', '.join(a.key for a in pending)} depend on "
                           "each other in a cycle")
        pending.remove(ready[0])


def _axes(cfg: SweepConfig) -> list[Axis]:
    axes = []
    if cfg.variants:
        axes.append(Axis(VARIANT_KEY, values=list(cfg.variants), sets=cfg.variants))
    for key, spec in cfg.space.items():
        axes.append(_axis(key, spec, cfg.sampler))
    if cfg.lrs:
        axes.append(Axis(LR_KEY, values=[float(lr) for lr in cfg.lrs]))
    if cfg.seeds:
        axes.append(Axis(SEED_KEY, values=list(cfg.seeds)))
    _check_conditions(axes)
    return axes


def _axis(key: str, spec: Any, sampler: str) -> Axis:
    where = f"sweep.space.{key}"
    if isinstance(spec, list):
        spec = {"values": spec}
    if not isinstance(spec, dict):
        raise LabError(f"{where}: give a list of values or a mapping {{values: [...]}} / {{type, low, high}}")
    allowed = {"values", "sets", "type", "low", "high", "log", "step", "when"}
    if set(spec) - allowed:
        raise LabError(f"{where}: unknown field(s) {', '.join(sorted(set(spec) - allowed))}; allowed: {', '.join(sorted(allowed))}")
    when = {k: (v if isinstance(v, list) else [v]) for k, v in (spec.get("when") or {}).items()}
    if "sets" in spec:
        sets = spec["sets"]
        if not isinstance(sets, dict) or not sets or not all(isinstance(v, dict) for v in sets.values()):
            raise LabError(f"{where}.sets: give a non-empty mapping label -> {{run key: value, ...}}")
        return Axis(key, values=list(sets), sets=sets, when=when)
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise LabError(f"{where}: empty list of values")
        return Axis(key, values=values, when=when)
    kind = spec.get("type")
    if kind not in ("int", "float"):
        raise LabError(f"{where}: type={kind!r}; allowed: int, float (or give values: [...])")
    if sampler == "grid":
        raise LabError(f"{where}: the grid sampler needs a list of values, not a {kind} range")
    if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
        raise LabError(f"{where}: needs low < high, got low={spec.get('low')} high={spec.get('high')}")
    if spec.get("log") and spec["low"] <= 0:
        raise LabError(f"{where}: log=true needs low > 0")
    return Axis(key, kind=kind, low=spec["low"], high=spec["high"], log=bool(spec.get("log", False)),
                step=spec.get("step"), when=when)


def _check_runs(sweep: Sweep) -> None:
    """Build the run config of every grid cell (or of each variant at the axes' first values) before any trial:
    a bad key or value fails here, in one line naming the cell, not hours into the study. A run that differs
    from checked ones only in its lr and seed is skipped when those values were checked already: the config
    checks them on their own (lr > 0, seed >= 0), and a paper grid's runs are mostly such repeats."""
    if sweep.cfg.sampler == "grid":
        cells = sweep.grid_cells()
    else:
        cells = [sweep.sample(FixedTrial({VARIANT_KEY: name} if name else {})) for name in sweep.cfg.variants or [None]]
    checked_cells, checked_members = set(), set()
    for overrides in cells:
        cell, members = cell_key(overrides), {(key, overrides[key]) for key in MEMBER_AXES if key in overrides}
        if cell in checked_cells and members <= checked_members:
            continue
        checked_cells.add(cell)
        checked_members |= members
        try:
            sweep.run_config(overrides)
        except LabError as err:
            raise LabError(f"sweep cell {cell_key(overrides, with_lr=True)}: {err}") from None


def duration_seconds(text: str, key: str = "sweep.time_limit") -> float:
    """`sweep.time_limit` or `sweep.deadline`: `600`, `600s`, `90m`, `2h` or `1.5h` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
    if not match or float(match[1]) <= 0:
        raise LabError(f"{key}={text!r}: a duration > 0 like 600 (seconds), 600s, 90m or 2h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def hide_password(url: str) -> str:
    """`postgresql://lab:secret@host/db` -> `postgresql://lab:***@host/db`; anything else as given."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url
