"""One training run: config -> task data -> model -> Lightning trainer -> TensorBoard + summary.json."""

import json
import logging
import os
import shutil
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from lab.config import RunConfig, flatten, to_dict
from lab.data import TaskDataModule
from lab.errors import LabError
from lab.models import build_model
from lab.module import LabModule

log = logging.getLogger("lab")

# Lightning's DDP starts ranks 1.. by running the same command again; this tells them the run directory
# rank 0 made (a fresh run name has the time in it, and the directory already exists by then).
DDP_RUN_DIR_ENV = "LAB_DDP_RUN_DIR"


def ddp_child() -> bool:
    """True in a DDP rank > 0 that Lightning started for a run of this process's parent."""
    return DDP_RUN_DIR_ENV in os.environ and os.environ.get("LOCAL_RANK", "0") != "0"


class StepTimer:
    """Training steps' wall time from a few GPU syncs (at logging steps and before validations): a sync every
    step would stop the CPU queueing the next step while the GPU runs this one. `start()` opens a window if none
    is open, the loop counts its steps in `pending`, `stop()` closes it: each of its steps counts its mean."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_seconds: list[float] = []
        self.started: float | None = None
        self.pending = 0

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def rates(self, tokens: int) -> dict:
        """A summary's timing keys: tokens/s over the timed steps, the median step, and `warmup_seconds`, the steps'
        time above the median rate: mostly the first steps' compiles and CUDA start-up, what a run pays once."""
        median = statistics.median(self.step_seconds or [0.0])
        return {"train_tokens_per_second": tokens / self.seconds if self.seconds else 0.0,
                "train_step_ms_median": 1e3 * median, "train_seconds": self.seconds,
                "warmup_seconds": max(0.0, self.seconds - median * len(self.step_seconds))}

    def stop(self) -> None:
        if self.pending:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - self.started
            self.step_seconds += [elapsed / self.pending] * self.pending
        self.started, self.pending = None, 0


class Throughput(Callback):
    """Training tokens per second, timed over training batches only (no validation, no start-up), in StepTimer
    windows that close at the logging steps (the logger waits for the GPU there anyway), before each validation
    and at the end."""

    def __init__(self):
        self.tokens = 0
        self.timer = StepTimer(torch.device("cpu"))

    def on_train_start(self, trainer, pl_module):
        self.timer = StepTimer(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.pending += 1
        self.tokens += batch[0].numel() * trainer.world_size  # DDP: every rank trains its own batch
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self.timer.stop()

    def on_validation_start(self, trainer, pl_module):
        self.timer.stop()

    def on_train_end(self, trainer, pl_module):
        self.timer.stop()

    def rates(self) -> dict:
        return self.timer.rates(self.tokens)


class PlainProgress(Callback):
    """One log line per validation, for logs and CI where a live progress bar would be noise."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        fields = [f"epoch {trainer.current_epoch}", f"step {trainer.global_step}"]
        fields += [f"{k} {metrics[k].item():.4f}" for k in ("train/loss", "val/loss", "val/acc") if k in metrics]
        print("  ".join(fields), flush=True)


def run_path(run: RunConfig) -> Path:
    """runs/<experiment>/<run_name>/ (not created)."""
    return Path(run.runs_dir) / run.experiment / run.run_name


def run_directory(run: RunConfig) -> Path:
    """runs/<experiment>/<run_name>/, created; an existing one is kept unless overwrite=true."""
    if not run.run_name:
        run.run_name = f"{run.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = run_path(run)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not run.overwrite:
            raise LabError(f"run directory {run_dir} already exists; choose another run_name or pass overwrite=true")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def progress_callbacks(mode: str) -> tuple[list[Callback], bool]:
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    if mode == "rich":
        return [RichProgressBar()], True
    return ([PlainProgress()] if mode == "plain" else []), False


def init_model(run: RunConfig, vocab_size: int):
    """The run's model, built after the data (`seed`). With model_seed, its weights come from that seed and the
    global RNG is left untouched, so the batch order drawn from it later is the same for every model_seed."""
    if run.model_seed is None:
        return build_model(run.model, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.model_seed)
        return build_model(run.model, vocab_size)


def validation_schedule(run: RunConfig) -> dict:
    if run.trainer.val_every_n_steps:
        return {"val_check_interval": run.trainer.val_every_n_steps, "check_val_every_n_epoch": None}
    return {"check_val_every_n_epoch": run.trainer.val_every_n_epochs}


def train(run: RunConfig, callbacks: list[Callback] = ()) -> dict | None:
    """Train one run and return its summary (also written to <run dir>/summary.json).

    `callbacks` are added to the trainer's own (a sweep passes its pruning callback here). Under DDP the
    ranks > 0 train too, write nothing and return None.
    """
    quiet_lightning()
    check_gpu_present(run.trainer.accelerator)
    datamodule = TaskDataModule(run)  # validates slices before anything is written
    child = ddp_child()
    run_dir = Path(os.environ[DDP_RUN_DIR_ENV]) if child else run_directory(run)
    config = to_dict(run)
    if not child:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    if run.trainer.num_threads:
        torch.set_num_threads(run.trainer.num_threads)
    L.seed_everything(run.seed, workers=True, verbose=False)
    datamodule.setup()
    model = init_model(run, datamodule.vocab_size)
    module = LabModule(run, model, datamodule.test_slice_names)

    logger = TensorBoardLogger(save_dir=str(run_dir.parent), name="", version=run_dir.name, default_hp_metric=False)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc", mode="max",
                                 save_top_k=1, enable_version_counter=False)
    # stop on the accuracy threshold only: a patience that counts validations would end step-validated runs early
    early_stop = EarlyStopping(monitor="val/acc", mode="max", stopping_threshold=run.trainer.early_stop_acc,
                               patience=sys.maxsize)
    throughput = Throughput()
    progress, bar = progress_callbacks(run.trainer.progress)
    trainer = L.Trainer(
        default_root_dir=run_dir, logger=logger, callbacks=[checkpoint, early_stop, throughput, *progress, *callbacks],
        max_epochs=run.trainer.max_epochs, max_steps=run.trainer.max_steps, precision=run.trainer.precision,
        accelerator=run.trainer.accelerator, devices=run.trainer.devices, strategy=run.trainer.strategy,
        gradient_clip_val=run.trainer.grad_clip,
        log_every_n_steps=run.trainer.log_every_n_steps, **validation_schedule(run),
        enable_progress_bar=bar, enable_model_summary=False, num_sanity_val_steps=0, deterministic=False,
    )
    started = time.perf_counter()
    environ = dict(os.environ)
    os.environ[DDP_RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        # DDP leaves LOCAL_RANK, WORLD_SIZE and MASTER_PORT behind: a next run in this process (a sweep
        # worker's next trial) would take them as an outside launcher's and start no ranks
        if not child:
            os.environ.clear()
            os.environ.update(environ)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    wall_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None

    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best_acc = module.best_val_acc
    summary = {
        "run_dir": str(run_dir),
        "model": run.model.name,
        "task": run.task.name,
        "final": final,
        "best_val_acc": best_acc,
        "best_epoch": module.best_epoch,
        "best_step": module.best_step,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "params": model.num_params(),
        "state_size_bytes": model.state_size(max(s.seq_len for s in datamodule.test_slices)),
        "wall_seconds": wall_seconds,
        **throughput.rates(),  # the median step leaves out the first steps' one-off costs, warmup_seconds is them
        # EarlyStopping stops once val/acc > early_stop_acc; its stopped_epoch is 0 for a stop in epoch 0
        "stopped_early": final.get("val/acc", 0.0) > run.trainer.early_stop_acc,
        "config": config,
    }
    write_summary(logger, summary)
    return summary


def check_gpu_present(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LabError(f"trainer.accelerator={accelerator}: this machine has no CUDA GPU "
                       "(use trainer.accelerator=cpu or auto)")


def write_summary(logger: TensorBoardLogger, summary: dict) -> None:
    """The run's config and results as TensorBoard hparams, then <run dir>/summary.json."""
    final = summary["final"]
    logger.log_hyperparams(flatten(summary["config"]), metrics={
        "hp/best_val_acc": summary["best_val_acc"] or 0.0, "hp/final_val_acc": final.get("val/acc", 0.0),
        "hp/final_val_loss": final.get("val/loss", float("nan")), "hp/params": summary["params"],
        "hp/state_size_bytes": summary["state_size_bytes"],
    })
    logger.finalize("success")
    (Path(summary["run_dir"]) / "summary.json").write_text(json.dumps(summary, indent=2))


def quiet_lightning() -> None:
    """Lightning's start-up chatter (GPU available, LOCAL_RANK, tips) hides the lab's own output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*tensorboardX.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # LabModule.on_before_batch_transfer is meant to run (TaskDataModule has no such hook)
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer` in `LightningModule`.*")
