"""Will a run end in time? A sweep on a machine held until a fixed hour (`sweep.deadline`: a lent GPU, a job
queue's limit) times each run's first steps and stops one that would still be training then: cut off with its
machine, it would be lost whole; stopped after a few steps, it goes back to the queue for a later launch.
"""

import time
from collections.abc import Callable

import torch
from lightning.pytorch.callbacks import Callback

WARMUP_STEPS = 5  # the first steps compile and autotune: not the run's pace
MEASURED_STEPS = 20
VALIDATION_BATCH_STEPS = 0.5  # a validation batch (forward only) costs about half a training step
# a run deferred to a later launch must fit this share of a whole one (the launch's own start, the check's noise);
# a stack that does not is split, a run alone that does not fails
LAUNCH_SHARE = 0.85


class OutOfTime(Exception):
    """The run's pace says it ends after the deadline. `projected_seconds`: its whole run at that pace."""

    def __init__(self, projected_seconds: float, seconds_left: float):
        super().__init__(f"would take about {projected_seconds:.0f} s in all; {max(0.0, seconds_left):.0f} s "
                         "were left before the deadline")
        self.projected_seconds = projected_seconds
        self.seconds_left = seconds_left


class Pace:
    """Checks once, after WARMUP_STEPS + MEASURED_STEPS training steps, that the run's remaining work ends by
    `end_by` (a time.time() value); raises OutOfTime if not. Early stopping could end a run sooner: the check
    assumes it trains to its last step, so a run it passes is never cut off."""

    def __init__(self, end_by: float, total_steps: int, validation_batches: int, began: float | None = None):
        """`validation_batches`: over the whole run; `began`: the run's start (time.perf_counter()), default now."""
        self.end_by = end_by
        self.work_steps = total_steps + VALIDATION_BATCH_STEPS * validation_batches
        self.began = time.perf_counter() if began is None else began
        self.measure_from: float | None = None

    def after_step(self, step: int, sync: Callable[[], None]) -> None:
        """`step` steps done; `sync` waits for the device (called only at the two steps this reads the clock)."""
        if step not in (WARMUP_STEPS, WARMUP_STEPS + MEASURED_STEPS):
            return
        sync()
        now = time.perf_counter()
        if step == WARMUP_STEPS:
            self.measure_from = now
            return
        step_seconds = (now - self.measure_from) / MEASURED_STEPS
        remaining = max(0.0, self.work_steps - step) * step_seconds
        left = self.end_by - time.time()
        if remaining > left:
            raise OutOfTime(now - self.began + remaining, left)


def members_that_fit(projected_seconds: float, members: int, launch_seconds: float) -> int:
    """How many of a stack's `members` (1 for a run alone) fit LAUNCH_SHARE of a whole launch, a stack's time taken
    as proportional to its members; all of them when the stack fits, 0 when not even one does."""
    if projected_seconds <= LAUNCH_SHARE * launch_seconds:
        return members
    return int(members * LAUNCH_SHARE * launch_seconds / projected_seconds)


def validations(trainer_cfg, total_steps: int) -> int:
    """How many validations a run of `total_steps` makes (trainer.val_every_n_steps, else per epochs)."""
    if trainer_cfg.val_every_n_steps:
        return total_steps // trainer_cfg.val_every_n_steps
    return trainer_cfg.max_epochs // trainer_cfg.val_every_n_epochs


class PaceCallback(Callback):
    """Pace for a `lab train` run (Lightning): the check above, at the same steps; OutOfTime leaves fit()."""

    def __init__(self, end_by: float):
        self.end_by = end_by
        self.began = time.perf_counter()
        self.pace: Pace | None = None

    def on_train_start(self, trainer, pl_module):
        total = trainer.estimated_stepping_batches
        batches = validations(pl_module.run.trainer, total) * len(trainer.datamodule.val_dataloader())
        self.pace = Pace(self.end_by, total, batches, self.began)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync = torch.cuda.synchronize if pl_module.device.type == "cuda" else (lambda: None)
        self.pace.after_step(trainer.global_step, sync)
