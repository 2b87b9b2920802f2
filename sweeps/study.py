"""The Optuna side of a sweep: storage, sampler, pruner, creating/loading the study, recovering dead trials."""

import os
import socket
import subprocess
import time
import warnings
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import optuna
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lab.errors import LabError
from sweeps.spec import MEMBER_AXES, Sweep

# heartbeats and trial retries are marked experimental in Optuna; they are what resuming relies on
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# Settings a study is defined by: rerunning with other values would mix two experiments in one database.
IDENTITY_KEYS = ("sampler", "seed", "pruner", "pruner_startup_trials", "pruner_warmup_steps", "metric",
                 "direction", "lrs", "variants", "space")

# what trials and launches are tagged with, and compared against each poll of a launch's monitor
HOST = socket.gethostname()


def open_storage(sweep: Sweep, create: bool = True):
    """SQLite by default (one file per study), any SQLAlchemy URL, or an Optuna journal file (*.log). `create`:
    a local file (SQLite, journal) may be made; else a missing one is an error, not a new empty database."""
    url, shown = sweep.storage_url, sweep.storage_shown
    cfg = sweep.cfg
    retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
    if "://" not in url and not url.endswith((".log", ".jsonl")):
        raise LabError(f"sweep.storage={shown!r}: give an SQLAlchemy URL (sqlite:///..., postgresql://...) "
                       "or a journal file path ending in .log")
    local = url if "://" not in url else None  # the file of a journal or SQLite storage
    if url.startswith("sqlite:///"):
        local = url.removeprefix("sqlite:///")
    if local is not None:
        if not create and not Path(local).is_file():
            raise LabError(f"storage {shown}: no such file (a study's database is made by `lab sweep`)")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        # several processes write one SQLite file: wait for the lock instead of failing at once
        engine_kwargs = {"connect_args": {"timeout": 60}}
    engine_url = url
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        # psycopg 3, a dependency (SQLAlchemy before 2.1 would look for psycopg2)
        engine_url = f"postgresql+psycopg://{rest}"
    if scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # a host that does not answer: 10 s
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                engine_url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period, heartbeat_stale_trial_callback=retry)
        except ImportError as err:
            raise LabError(f"sweep.storage={shown!r}: the database driver is not installed ({err})") from None
        except Exception as err:  # noqa: BLE001 - two processes creating the schema at once; retry, then report
            if attempt == 4:
                raise LabError(f"sweep.storage={shown!r}: cannot open ({str(err).splitlines()[0]})") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class FreePointGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, except that a new trial never gets a point already taken while one is free, and, in
    a stacked sweep, prefers a point of a cell no trial has yet.

    Optuna gives trial n the grid's point n while n is below the grid's size (one trial a point, in trial order).
    A stacked sweep (sweeps/stacking.py) creates its cell's other trials itself, each with its own point, so point
    n may be a sibling's by then; that trial would only be recorded as a duplicate. And a worker that drew a point
    of a cell whose stack another worker is still building would train that run beside it. So a trial draws from
    the points of untouched cells (a cell: a point up to `member_axes`, its lr and seed), else from the free
    points, at random from the sampler's seeded generator, as Optuna does for trials past the grid's size. (With
    no point free, Optuna's own fallback stands: a point re-evaluated, which the worker records as a duplicate.)
    """

    def __init__(self, search_space: dict, seed: int | None = None, member_axes: tuple[str, ...] = ()):
        super().__init__(search_space, seed=seed)
        cell_axes = [i for i, name in enumerate(self._param_names) if name not in member_axes]
        self._cell_of = [tuple(point[i] for i in cell_axes) for point in self._all_grids]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return super().before_trial(study, trial)  # a retried or enqueued trial keeps its point
        free = self._get_unvisited_grid_ids(study)
        touched = {self._cell_of[g] for g in set(range(len(self._all_grids))) - set(free)}
        candidates = [g for g in free if self._cell_of[g] not in touched] or free
        super().before_trial(study, trial)
        if candidates and study._storage.get_trial_system_attrs(trial._trial_id)["grid_id"] not in candidates:
            study._storage.set_trial_system_attr(trial._trial_id, "grid_id", int(self._rng.rng.choice(candidates)))


def make_sampler(sweep: Sweep) -> optuna.samplers.BaseSampler:
    cfg = sweep.cfg
    if cfg.sampler == "grid":
        return FreePointGridSampler(sweep.grid_space(), seed=cfg.seed,
                                    member_axes=MEMBER_AXES if cfg.stack_lrs else ())
    if cfg.sampler == "tpe":
        # constant_liar: parallel workers do not all propose the same point while others are running
        return optuna.samplers.TPESampler(seed=cfg.seed, constant_liar=cfg.workers > 1)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    cfg = sweep.cfg
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_steps)
    if cfg.pruner == "hyperband":
        max_steps = sweep.base_flat.get("trainer.max_steps", -1)
        return optuna.pruners.HyperbandPruner(min_resource=max(1, cfg.pruner_warmup_steps),
                                              max_resource=max_steps if max_steps > 0 else "auto")
    return optuna.pruners.NopPruner()


def identity(sweep: Sweep) -> str:
    # where a host writes its runs is no part of the experiment: hosts sharing a study may differ in it
    run = {k: v for k, v in sweep.run.items() if k != "runs_dir"}
    data = {"sweep": {k: getattr(sweep.cfg, k) for k in IDENTITY_KEYS}, "run": run}
    if sweep.cfg.seeds:  # only when set: studies made before sweep.seeds existed keep their identity
        data["sweep"]["seeds"] = list(sweep.cfg.seeds)
    return yaml.safe_dump(data, sort_keys=True)


def _without_runs_dir(recorded: str) -> str:
    """A recorded identity as identity() writes it now (studies made before runs_dir left it kept it)."""
    data = yaml.safe_load(recorded)
    data.get("run", {}).pop("runs_dir", None)
    return yaml.safe_dump(data, sort_keys=True)


def create_or_load(sweep: Sweep, create: bool) -> optuna.Study:
    """The study of this sweep. `create`: make it if new (the launcher); workers only load.

    A study made from different settings is refused: resuming must continue the same experiment.
    """
    storage = open_storage(sweep, create)
    kwargs = {"study_name": sweep.cfg.study, "storage": storage, "sampler": make_sampler(sweep),
              "pruner": make_pruner(sweep)}
    for attempt in range(5):
        try:
            if create:
                study = optuna.create_study(direction=sweep.cfg.direction, load_if_exists=True, **kwargs)
            else:
                study = optuna.load_study(**kwargs)
            break
        except KeyError:
            raise LabError(f"study {sweep.cfg.study!r} not found in {sweep.storage_shown}") from None
        except Exception as err:  # noqa: BLE001 - a concurrent creator may hold the lock; retry, then report
            if attempt == 4:
                raise LabError(f"study {sweep.cfg.study!r}: cannot create or load ({str(err).splitlines()[0]})") from None
            time.sleep(0.5 * (attempt + 1))
    wanted = identity(sweep)
    recorded = study.user_attrs.get("sweep")
    if recorded is not None:
        recorded = _without_runs_dir(recorded)
    if recorded is None and create:
        study.set_user_attr("sweep", wanted)
    elif recorded is not None and recorded != wanted:
        raise LabError(f"study {sweep.cfg.study!r} in {sweep.storage_shown} was made from different settings "
                       f"({', '.join(_differences(recorded, wanted))}); rerun with the original sweep config, "
                       "or choose another sweep.study")
    return study


def recorded_sweep(study_name: str, storage: str, runs_dir: str) -> Sweep:
    """The sweep a study was made from, rebuilt from the settings create_or_load recorded in its storage: for a
    host that reports a study it did not launch (a copied SQLite file, a shared PostgreSQL study). The trial
    budget is not recorded: a search sampler's is taken as its trials so far."""
    import tempfile

    from sweeps.spec import SweepConfig, load_sweep

    probe = Sweep(cfg=SweepConfig(study=study_name, storage=storage), run={}, base_flat={}, runs_dir=runs_dir, axes=[])
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(probe, create=False))
    except KeyError:
        raise LabError(f"study {study_name!r} not found in {probe.storage_shown}") from None
    if "sweep" not in study.user_attrs:
        raise LabError(f"study {study_name!r} in {probe.storage_shown} was not made by `lab sweep` (no settings "
                       "recorded); report it where its runs/<study>/sweep.yaml is")
    recorded = yaml.safe_load(study.user_attrs["sweep"])
    settings = {**recorded["sweep"], "study": study_name, "storage": storage}
    if settings["sampler"] != "grid":
        settings["n_trials"] = max(1, len(study.trials))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump({"sweep": settings, "run": recorded["run"]}, sort_keys=False))
        return load_sweep(str(path), [f"runs_dir={runs_dir}"])


def _differences(old: str, new: str) -> list[str]:
    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    before, after = flat(yaml.safe_load(old)), flat(yaml.safe_load(new))
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))[:5]


LAUNCH_PREFIX = "launch "
DEFERRED = "deferred"  # user attribute of a trial stopped by sweep.deadline: why
STACK_MEMBERS = "stack_members"  # user attribute: the most members a stack of this cell may take (a split stack)
REQUEUED_FROM = "requeued_from"  # system attribute of a deferred trial's WAITING copy: the deferred trial


class LaunchRecord:
    """One `lab sweep` launch's wall time, kept in the study (a user attribute per launch): a study resumed over
    several launches, hosts or days still knows how long it took in all.

    Only a launch whose workers took a trial is kept (from then on, so that a killed launcher leaves its time): a
    rerun of a finished study to rewrite its report, or one that hit its time limit before any trial, did no part
    of the sweep and would only pad its wall time."""

    def __init__(self, study: optuna.Study, cfg, placement: list[str]):
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.study = study
        self.key = f"{LAUNCH_PREFIX}{HOST} {os.getpid()} {now}"
        self.started = self.saved = time.perf_counter()
        self.took_a_trial = False
        self.last_result = None  # when a trial last finished with a result during this launch
        gpus = sorted(set(placement))
        self.info = {"host": HOST, "started": now, "workers": cfg.workers, "gpus": gpus,
                     "gpu_names": gpu_names(gpus), "stack_lrs": cfg.stack_lrs, "time_limit": cfg.time_limit,
                     "deadline": cfg.deadline}

    def trial_taken(self) -> None:
        if not self.took_a_trial:
            self.took_a_trial = True
            self.save()

    def result_in(self) -> None:
        self.last_result = time.perf_counter()

    def save(self) -> None:
        if not self.took_a_trial:
            return
        self.saved = time.perf_counter()
        record = {**self.info, "seconds": round(self.saved - self.started, 1)}
        if self.last_result is not None:
            # what came after it bought no result: the closing report, or a stack cut off with its machine
            record["last_result_seconds"] = round(self.last_result - self.started, 1)
        self.study.set_user_attr(self.key, record)

    def save_every(self, seconds: float) -> None:
        if time.perf_counter() - self.saved >= seconds:
            self.save()


def gpu_names(gpus: list[str]) -> list[str]:
    """The models of the GPUs a launch's workers see (the pinned ones; unpinned, those of this shell's
    CUDA_VISIBLE_DEVICES, else all of this host's), from nvidia-smi, so that the launcher itself never starts CUDA;
    none where nvidia-smi is missing or fails (a CPU host) or CUDA_VISIBLE_DEVICES hides every GPU."""
    if not gpus and "CUDA_VISIBLE_DEVICES" in os.environ:
        gpus = [gpu.strip() for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
        if not gpus:
            return []
    command = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    if gpus:
        command.append(f"--id={','.join(sorted(set(gpus)))}")
    try:
        listed = subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def launches(study: optuna.Study) -> list[dict]:
    """The study's launches (LaunchRecord), oldest first."""
    found = [value for key, value in study.user_attrs.items() if key.startswith(LAUNCH_PREFIX)]
    return sorted(found, key=lambda launch: launch["started"])


def launch_seconds(study: optuna.Study) -> tuple[float, int]:
    """The study's wall time summed over its launches (launches that overlapped, on several hosts, count each),
    and how many there were."""
    found = launches(study)
    return sum(launch["seconds"] for launch in found), len(found)


def tag_worker(trial: optuna.Trial) -> None:
    """Where a trial runs, so a relaunch on this host can tell a dead worker's trial from a live one."""
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid", os.getpid())


def worker_on_this_host(trial: FrozenTrial) -> int | None:
    """The pid of the worker that tagged the trial, when it ran on this host; None otherwise."""
    return trial.user_attrs.get("pid") if trial.user_attrs.get("host") == HOST else None


def recover_orphans(study: optuna.Study, max_retry: int) -> list[int]:
    """Fail, and queue a re-run of, every RUNNING trial whose worker process on this host is gone.

    The heartbeat does the same after its grace period (and across hosts); this makes a relaunch on the
    same machine resume at once. Returns the numbers of the trials recovered.
    """
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = worker_on_this_host(trial)
        if pid is None or _alive(pid):
            continue
        storage = study._storage
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another launcher recovered it first; only one re-queues it
        retry(study, storage.get_trial(trial._trial_id))  # a WAITING copy (same params) runs next
        recovered.append(trial.number)
    return recovered


def trained_runs(trials: list[FrozenTrial]) -> list[tuple[list[FrozenTrial], float]]:
    """Each run the study trained (a stack's members where the trials were stacked, else a trial alone) with its
    wall time, from its first start to its last end. Duplicates skipped at their start trained nothing."""
    runs = defaultdict(list)
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and "wall_seconds" in trial.user_attrs:
            runs[tuple(trial.user_attrs.get("stacked_with", [trial.number]))].append(trial)
    return [(members, (max(t.datetime_complete for t in members) - min(t.datetime_start for t in members))
             .total_seconds()) for members in runs.values()]


def mark_deferred(trial: optuna.Trial, reason: str, stack_members: int | None = None) -> None:
    """A trial stopped by sweep.deadline (lab/pace.py), to be ended FAILED: no error of its own, no result; the
    next launch re-queues it (requeue_deferred). `stack_members`: the most members its cell's stacks may take."""
    trial.set_user_attr(DEFERRED, reason)
    if stack_members:
        trial.set_user_attr(STACK_MEMBERS, stack_members)


def deferred_waiting(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Deferred trials no launch has re-queued yet."""
    requeued = {t.system_attrs.get(REQUEUED_FROM) for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and DEFERRED in t.user_attrs and t.number not in requeued]


def requeue_deferred(study: optuna.Study) -> list[int]:
    """A WAITING copy of each deferred trial (same params and grid point), which workers take before new points.

    Unlike a dead worker's retry, a deferral does not count against sweep.max_retry (its retry_history stays).
    Returns the numbers of the trials re-queued."""
    waiting = deferred_waiting(study.get_trials(deepcopy=False))
    for trial in waiting:
        system_attrs = {"failed_trial": trial.number, "retry_history": [], **trial.system_attrs,
                        REQUEUED_FROM: trial.number}
        user_attrs = {STACK_MEMBERS: trial.user_attrs[STACK_MEMBERS]} if STACK_MEMBERS in trial.user_attrs else {}
        study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                                            distributions=trial.distributions, user_attrs=user_attrs,
                                            system_attrs=system_attrs))
    return [t.number for t in waiting]


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (dead, not yet reaped by its parent) still answers kill(pid, 0)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True
