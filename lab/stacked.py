"""Several runs that differ only in their learning rate, trained as one stacked model in one process.

Small MQAR models leave a GPU launch-bound: one process trains at a few percent of the chip's rate. Here the
members' parameters are stacked along a new leading dimension and `torch.func.vmap` runs all members'
forward and backward in the same kernels. Each member keeps what `lab train` gives it: the same init and
batches (same seed), its own AdamW state, lr schedule, gradient clipping, validation, best checkpoint,
early stop at `trainer.early_stop_acc`, TensorBoard files and summary.json in its own run directory. A member
that stops (early stop, pruned, diverged) is frozen; the stack ends when all have stopped.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from lab.config import RunConfig, flatten, to_dict
from lab.data import TaskDataModule
from lab.errors import LabError
from lab.module import compile_fresh, example_stats, lr_schedule, supervised_logits, supervised_positions
from lab.pace import Pace, validations
from lab.train import StepTimer, check_gpu_present, init_model, quiet_lightning, run_directory, write_summary

# Keys members may differ in; everything else must match (one architecture, one data stream).
MEMBER_KEYS = ("trainer.lr", "model_seed", "run_name", "experiment")
AUTOCAST = {"bf16-mixed": torch.bfloat16}
FULL_PRECISION = ("32-true", "32")
# `prune(step, metrics)` -> True stops the member (a sweep's Optuna trial decides)
PruneHook = Callable[[int, dict], bool]


class _Supervised(nn.Module):
    """Logits at the supervised positions only (flattened [B*T] index), as LabModule computes them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        return supervised_logits(self.model, inputs, flat_index)


@dataclass
class Member:
    run: RunConfig
    run_dir: object
    logger: TensorBoardLogger
    params: int
    state_size: int
    prune: PruneHook | None = None
    active: bool = True
    best_val_acc: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    final: dict = field(default_factory=dict)
    steps: int = 0
    epochs: int = 0
    pruned_at: int | None = None
    error: str | None = None
    stack_seconds: float = 0.0  # the stack's time until this member stopped


class StackedAdamW:
    """torch.optim.AdamW's update for parameters stacked over members, with one lr per member.

    lr is a [M] tensor (0 freezes a member); weight decay applies to members' matrices only, as in LabModule.
    The step count lives on the device, so a step never waits for the GPU and torch.compile never recompiles.
    """

    def __init__(self, params: dict[str, torch.Tensor], betas, weight_decay: float, eps: float = 1e-8):
        self.params = params
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.decay = {name: weight_decay if p.ndim - 1 >= 2 else 0.0 for name, p in params.items()}
        self.exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}
        self.step_count = torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        self.step_count += 1
        correction1 = 1 - self.beta1 ** self.step_count
        correction2_sqrt = (1 - self.beta2 ** self.step_count).sqrt()
        for name, param in self.params.items():
            shape = (-1,) + (1,) * (param.ndim - 1)
            member_lr = lr.view(shape).to(param.dtype)
            grad = param.grad
            param.mul_(1 - member_lr * self.decay[name])
            self.exp_avg[name].lerp_(grad, 1 - self.beta1)
            self.exp_avg_sq[name].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (self.exp_avg_sq[name].sqrt() / correction2_sqrt.to(param.dtype)).add_(self.eps)
            param.sub_(member_lr / correction1.to(param.dtype) * self.exp_avg[name] / denom)


def check_stackable(runs: list[RunConfig]) -> None:
    if not runs:
        raise LabError("stacked training needs at least one run")
    shared = [{k: v for k, v in flatten(to_dict(run)).items() if k not in MEMBER_KEYS} for run in runs]
    for index, other in enumerate(shared[1:], start=1):
        differing = sorted(k for k in shared[0].keys() | other.keys() if shared[0].get(k) != other.get(k))
        if differing:
            raise LabError(f"stacked runs may differ only in {', '.join(MEMBER_KEYS)}; run {index} also changes "
                           f"{', '.join(differing[:4])}")
    if len({run.model_seed is None for run in runs}) > 1:  # init_model: the data order differs between the two
        raise LabError("stacked runs set model_seed on every member or on none")
    trainer = runs[0].trainer
    if trainer.devices != 1 or trainer.strategy != "auto":
        raise LabError("stacked training runs in one process on one device (trainer.devices=1, strategy=auto)")
    if trainer.precision not in (*FULL_PRECISION, *AUTOCAST):
        raise LabError(f"trainer.precision={trainer.precision!r}: stacked training takes "
                       f"{', '.join((*FULL_PRECISION, *AUTOCAST))}")


def pick_device(accelerator: str) -> torch.device:
    check_gpu_present(accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator not in ("auto", "cpu"):
        raise LabError(f"trainer.accelerator={accelerator!r}: stacked training takes auto, cpu, gpu or cuda")
    return torch.device("cpu")


def train_stacked(runs: list[RunConfig], prune_hooks: list[PruneHook | None] | None = None,
                  end_by: float = 0.0) -> list[dict]:
    """Train `runs` (same config but trainer.lr) as one stacked model; one summary per member, in order.

    A member that diverges gets {"error": ...} instead of a summary (the others go on). `end_by` (a time.time()
    value, 0 = none): raise lab.pace.OutOfTime after the first steps if the stack's pace says it ends later.
    """
    began = time.perf_counter()
    quiet_lightning()
    check_stackable(runs)
    first = runs[0]
    cfg = first.trainer
    datamodule = TaskDataModule(first)  # every member sees the same data: it depends on the seed only
    device = pick_device(cfg.accelerator)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    models, members = [], []
    for run, prune in zip(runs, prune_hooks or [None] * len(runs), strict=True):
        run_dir = run_directory(run)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(run), sort_keys=False))
        L.seed_everything(run.seed, workers=True, verbose=False)  # the init `lab train` gives this run
        datamodule.setup()
        model = init_model(run, datamodule.vocab_size)
        models.append(_Supervised(model))
        logger = TensorBoardLogger(save_dir=str(run_dir.parent), name="", version=run_dir.name,
                                   default_hp_metric=False)
        members.append(Member(run, run_dir, logger, model.num_params(),
                              model.state_size(max(s.seq_len for s in datamodule.test_slices)), prune))
    params, buffers = stack_module_state(models)
    params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    base = models[0].to(device)  # gives the code; the stacked tensors replace its weights in each call
    logits_of = vmap(lambda p, b, inputs, index: functional_call(base, (p, b), (inputs, index)),
                     in_dims=(0, 0, None, None))
    optimizer = StackedAdamW(params, cfg.betas, cfg.weight_decay)

    def update(lr: torch.Tensor) -> None:
        _clip_per_member(params, cfg.grad_clip, num_members)
        optimizer.step(lr)

    # trainer.compile: training steps only (validation, no grad with a last partial batch, would compile
    # again); the update compiles too: eager, its ~10 small kernels per parameter outlast the step's math
    train_logits_of = compile_fresh(logits_of) if cfg.compile else logits_of
    train_update = torch.compile(update) if cfg.compile else update
    base_lr = torch.tensor([run.trainer.lr for run in runs], device=device)
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    total_steps = len(train_loader) * cfg.max_epochs
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    lr_factor = lr_schedule(cfg, total_steps)
    autocast = AUTOCAST.get(cfg.precision)
    num_members = len(runs)
    pace = Pace(end_by, total_steps, validations(cfg, total_steps) * len(val_loader), began) if end_by else None

    def member_logits(inputs, labels, logits_fn=logits_of):
        """Logits [M, N, vocab] at the batch's N labelled positions, their targets and the [B, T] mask (on the
        CPU, where the positions are found)."""
        mask, index, targets = supervised_positions(labels)
        inputs, index, targets = (t.to(device, non_blocking=True) for t in (inputs, index, targets))
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return logits_fn(params, buffers, inputs, index), targets, mask

    def validate(step: int, epoch: int) -> None:
        sums = torch.zeros(num_members, len(datamodule.test_slice_names), 4, dtype=torch.float64, device=device)
        with torch.no_grad():
            for inputs, labels, slice_ids in val_loader:
                logits, targets, mask = member_logits(inputs, labels)
                mask, slice_ids = mask.to(device, non_blocking=True), slice_ids.to(device, non_blocking=True)
                for m in range(num_members):
                    if members[m].active:
                        sums[m].index_add_(0, slice_ids, example_stats(logits[m], targets, mask))
        for m, member in enumerate(members):
            if member.active:
                _after_validation(member, sums[m], step, epoch, params, m, datamodule.test_slice_names)
                member.stack_seconds = time.perf_counter() - stack_started

    step, epoch, tokens = 0, 0, 0
    timer = StepTimer(device)
    active_flags, active = None, None
    stack_started = time.perf_counter()
    while epoch < cfg.max_epochs and step != cfg.max_steps and any(m.active for m in members):
        for inputs, labels, _ in train_loader:
            timer.start()
            logits, targets, _ = member_logits(inputs, labels, train_logits_of)
            num_logits = logits.shape[1]
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.repeat(num_members),
                                     reduction="none").view(num_members, num_logits).mean(1)
            if active_flags != [m.active for m in members]:  # a new tensor each step would wait for the GPU
                active_flags = [m.active for m in members]
                active = torch.tensor(active_flags, device=device)
            (losses * active).sum().backward()
            lrs = base_lr * lr_factor(step)
            train_update(lrs * active)
            for p in params.values():
                p.grad = None
            tokens += inputs.numel()
            step += 1
            timer.pending += 1
            if pace is not None:
                pace.after_step(step, timer.stop)
            if step % cfg.log_every_n_steps == 0:  # logging waits for the GPU anyway: close the timing window
                timer.stop()
                _check_finite(members, losses, step - 1, lrs)
                for m, (loss, lr) in enumerate(zip(losses.tolist(), lrs.tolist())):
                    if members[m].active:
                        members[m].logger.log_metrics({"train/loss": loss, "train/lr": lr}, step=step - 1)
            for member in members:
                if member.active:
                    member.steps, member.epochs = step, epoch
                    member.stack_seconds = time.perf_counter() - stack_started
            if cfg.val_every_n_steps and step % cfg.val_every_n_steps == 0:
                timer.stop()
                validate(step, epoch)
            if step == cfg.max_steps or not any(m.active for m in members):
                break
        else:
            epoch += 1
            for member in members:
                if member.active:
                    member.epochs = epoch
            if not cfg.val_every_n_steps and epoch % cfg.val_every_n_epochs == 0:
                timer.stop()
                validate(step, epoch - 1)
            continue
        break
    timer.stop()
    if step % cfg.log_every_n_steps:  # the last steps were not checked yet
        _check_finite(members, losses, step - 1, lrs)
    # every member trains on every batch: each member's rate is the stack's batches per second
    return [_finish(member, timer.rates(tokens), num_members) for member in members]


def _check_finite(members: list[Member], losses: torch.Tensor, step: int, lrs: torch.Tensor) -> None:
    finite = torch.isfinite(losses).tolist()
    for m, member in enumerate(members):
        if member.active and not finite[m]:
            member.active = False
            member.error = (f"DivergedError: train/loss is {losses[m].item()} at step {step} "
                            f"(lr {lrs[m].item():.3g}); try a smaller trainer.lr")


def _clip_per_member(params: dict[str, torch.Tensor], max_norm: float, num_members: int) -> None:
    """clip_grad_norm_ on each member's gradients (the norm over all of one member's parameters)."""
    if not max_norm:
        return
    with torch.no_grad():
        squares = sum(p.grad.float().pow(2).reshape(num_members, -1).sum(1) for p in params.values())
        scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params.values():
            p.grad.mul_(scale.view((-1,) + (1,) * (p.ndim - 1)).to(p.grad.dtype))


def _after_validation(member: Member, sums: torch.Tensor, step: int, epoch: int, params: dict, m: int,
                      slice_names: list[str]) -> None:
    total = sums.sum(0)
    acc, loss = (total[0] / total[1]).item(), (total[2] / total[3]).item()
    metrics = {"val/acc": acc, "val/loss": loss}
    if len(slice_names) > 1:
        metrics |= {f"val/acc_slice/{name}": (a / c).item() for name, (a, c, _, _) in zip(slice_names, sums)}
    member.final = metrics
    member.logger.log_metrics(metrics, step=step - 1)  # Lightning logs validation at the last batch's step
    if member.best_val_acc is None or acc > member.best_val_acc:
        member.best_val_acc, member.best_epoch, member.best_step = acc, epoch, step
        checkpoints = member.run_dir / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        state = {k.removeprefix("model."): v[m].detach().cpu() for k, v in params.items()}
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": step},
                   checkpoints / "best.ckpt")
    if member.run.trainer.progress == "plain":
        print(f"{member.run_dir.name}  epoch {epoch}  step {step}  val/loss {loss:.4f}  val/acc {acc:.4f}",
              flush=True)
    if acc > member.run.trainer.early_stop_acc:
        member.active = False
    elif member.prune is not None and member.prune(step, metrics):
        member.active, member.pruned_at = False, step


def _finish(member: Member, rates: dict, num_members: int) -> dict:
    if member.error:
        member.logger.finalize("failed")
        return {"error": member.error, "run_dir": str(member.run_dir)}
    run = member.run
    config = to_dict(run)
    summary = {
        "run_dir": str(member.run_dir), "model": run.model.name, "task": run.task.name, "final": member.final,
        "best_val_acc": member.best_val_acc, "best_epoch": member.best_epoch, "best_step": member.best_step,
        "epochs": member.epochs, "steps": member.steps, "params": member.params,
        "state_size_bytes": member.state_size,
        # its share of the stack's time (what a sweep's cost adds up), and the stack's time itself
        "wall_seconds": member.stack_seconds / num_members, "stack_wall_seconds": member.stack_seconds,
        **rates,  # this member's; the stack trains num_members times its tokens/s
        "stacked_members": num_members,
        "stopped_early": member.final.get("val/acc", 0.0) > run.trainer.early_stop_acc,
        "pruned_at": member.pruned_at, "config": config,
    }
    write_summary(member.logger, summary)
    return summary
