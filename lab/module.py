"""The LightningModule: next-token loss at supervised positions, Zoology's accuracy, AdamW + warmup/cosine."""

import math

import lightning as L
import torch
import torch.nn.functional as F

from lab.config import RunConfig
from lab.data import IGNORE
from lab.errors import LabError
from lab.models import LanguageModel


class DivergedError(LabError):
    """The training loss became NaN or infinite: the run cannot recover (sweeps record the trial FAILED)."""


def compile_fresh(fn):
    """torch.compile(fn) with Dynamo's caches cleared first. A sweep worker trains many models in one process;
    past Dynamo's recompile_limit (8 graphs of one function: LanguageModel.hidden_states serves every mixer and
    shape) it would silently run the rest eagerly."""
    torch._dynamo.reset()
    return torch.compile(fn)


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask [B, T], flat_index [N], targets [N]) of a batch's labelled positions, found on the CPU before the batch
    moves: boolean indexing on the GPU (nonzero) would make the CPU wait for the step before instead of queueing
    the next one."""
    mask = labels != IGNORE
    return mask, mask.flatten().nonzero().squeeze(1), labels[mask]


def supervised_logits(model: LanguageModel, inputs: torch.Tensor, flat_index: torch.Tensor, hidden_states=None):
    """Logits only where a label exists: MQAR supervises N of L positions, so the LM head stays cheap."""
    hidden = (hidden_states or model.hidden_states)(inputs)
    return model.lm_head(hidden.flatten(0, 1)[flat_index])


class LabModule(L.LightningModule):
    def __init__(self, run: RunConfig, model: LanguageModel, test_slice_names: list[str]):
        super().__init__()
        self.run = run
        self.model = model
        self.test_slice_names = test_slice_names
        self._val_sums = None  # per slice: [sum of per-example accuracy, examples, sum of loss, supervised tokens]
        self.best_val_acc: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        # trainer.compile: training steps only; validation (no grad, a last partial batch) would compile again
        self.train_hidden_states = compile_fresh(model.hidden_states) if run.trainer.compile else model.hidden_states

    def on_before_batch_transfer(self, batch, dataloader_idx):
        """(inputs, mask, flat_index, targets, slice_ids): the supervised positions found here, on the CPU."""
        inputs, labels, slice_ids = batch
        return inputs, *supervised_positions(labels), slice_ids

    def training_step(self, batch, batch_idx):
        inputs, _, flat_index, targets, _ = batch
        logits = supervised_logits(self.model, inputs, flat_index, self.train_hidden_states)
        loss = F.cross_entropy(logits.float(), targets)
        # checked at logging steps only: the check syncs with a GPU, and NaN weights stay NaN until then
        if self.global_step % self.run.trainer.log_every_n_steps == 0 and not torch.isfinite(loss):
            raise DivergedError(f"train/loss is {loss.item()} at step {self.global_step} "
                                f"(lr {self.optimizers().param_groups[0]['lr']:.3g}); try a smaller trainer.lr")
        # no GPU sync a step: a progress-bar metric is read every step (only a live bar shows it), and a float
        # would become a GPU tensor through a blocking copy (a CPU tensor stays on the CPU)
        self.log("train/loss", loss, prog_bar=self.trainer.progress_bar_callback is not None)
        self.log("train/lr", torch.tensor(self.optimizers().param_groups[0]["lr"]))
        return loss

    def on_validation_epoch_start(self):
        self._val_sums = torch.zeros(len(self.test_slice_names), 4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        inputs, mask, flat_index, targets, slice_ids = batch
        logits = supervised_logits(self.model, inputs, flat_index)
        self._val_sums.index_add_(0, slice_ids, example_stats(logits, targets, mask))

    def on_validation_epoch_end(self):
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        total = sums.sum(0)
        acc = (total[0] / total[1]).item()
        if self.best_val_acc is None or acc > self.best_val_acc:
            self.best_val_acc, self.best_epoch, self.best_step = acc, self.current_epoch, self.global_step
        # the sums are already reduced over DDP ranks: sync_dist averages equal values (and keeps Lightning quiet)
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.log("val/loss", total[2] / total[3], prog_bar=True, sync_dist=True)
        if len(self.test_slice_names) > 1:
            for name, (acc, count, _, _) in zip(self.test_slice_names, sums):
                self.log(f"val/acc_slice/{name}", acc / count, sync_dist=True)

    def configure_optimizers(self):
        trainer_cfg = self.run.trainer
        # no weight decay on norms, biases and per-head scalars (decay rates, skips): only on matrices
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": trainer_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas),
        )
        lr_factor = lr_schedule(trainer_cfg, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_schedule(trainer_cfg, total_steps: int):
    """step -> lr multiplier: linear warmup over warmup_frac of the steps, then cosine to min_lr_ratio."""
    total_steps = max(1, total_steps)
    warmup_steps = int(trainer_cfg.warmup_frac * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return trainer_cfg.min_lr_ratio + (1 - trainer_cfg.min_lr_ratio) * cosine

    return lr_factor


def example_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example [accuracy, 1, summed loss, supervised tokens] (float64) from the supervised logits.

    Zoology: accuracy is the mean over an example's supervised positions, then the mean over examples.
    """
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    token_correct = (logits.argmax(-1) == targets).double()
    row = mask.nonzero()[:, 0]
    per_example_correct = torch.zeros(len(mask), dtype=torch.float64, device=logits.device).index_add_(
        0, row, token_correct)
    per_example_count = mask.sum(1).double()
    per_example_loss = torch.zeros_like(per_example_correct).index_add_(0, row, token_loss.double())
    return torch.stack([per_example_correct / per_example_count, torch.ones_like(per_example_count),
                        per_example_loss, per_example_count], dim=1)
