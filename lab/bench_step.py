"""`lab bench step`: where a training step of one sweep cell spends its time (torch.profiler).

The cell's run (as `lab bench sweep` builds it) trains through `lab train`'s own path (Lightning), and a
callback profiles `steps` steps after `warmup` (start-up, CUDA context, compiles left out). Per step: the wall
time, how long the GPU was busy (its kernels' and copies' summed time; no GPU: n/a), how many it ran, and the ops that
took the most device time (CPU time without a GPU). A step whose wall time far exceeds its busy time is bound by
launches and syncs, not by the GPU's work.
"""

import time

import torch
from lightning.pytorch.callbacks import Callback
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lab.config import RunConfig
from lab.errors import LabError


class _ProfileSteps(Callback):
    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.profiler = None
        self.started = 0.0
        self.seconds = 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.profiler is None:
            self._sync(pl_module)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler is not None and not self.seconds and trainer.global_step == self.warmup + self.steps:
            self._sync(pl_module)
            self.seconds = time.perf_counter() - self.started
            self.profiler.stop()


def profile_step(run: RunConfig, steps: int = 10, warmup: int = 5, top: int = 12) -> dict:
    """Profile `steps` training steps of `run` after `warmup` steps (the run must have warmup + steps)."""
    from lab.train import train

    probe = _ProfileSteps(warmup, steps)
    train(run, callbacks=[probe])
    if not probe.seconds:
        raise LabError(f"lab bench step: the run stopped before step {warmup + steps}")
    # Kernels and copies only: a record_function range (Lightning's optimizer step wraps the whole closure,
    # forward and backward) is a device event too and would count that span a second time.
    kernels = [e for e in probe.profiler.events()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    on_gpu = bool(kernels)
    by_kernel: dict[str, list[float]] = {}
    for e in kernels:
        by_kernel.setdefault(e.name, []).append(e.device_time_total)
    top_kernels = sorted(by_kernel.items(), key=lambda item: sum(item[1]), reverse=True)[:top]
    # ops by the time of the kernels they launched themselves (with no GPU: their own CPU time)
    own_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    ops = [e for e in probe.profiler.key_averages()
           if own_time(e) > 0 and not getattr(e, "is_user_annotation", False) and e.device_type == DeviceType.CPU]
    ops = sorted(ops, key=own_time, reverse=True)[:top]
    return {
        "steps": steps,
        "wall_ms": 1e3 * probe.seconds / steps,
        "gpu_busy_ms": sum(e.device_time_total for e in kernels) / 1e3 / steps if on_gpu else None,
        "kernels": len(kernels) / steps if on_gpu else None,
        "top": [{"op": e.key, "ms": own_time(e) / 1e3 / steps, "calls": e.count / steps} for e in ops],
        "top_kernels": [{"kernel": name, "ms": sum(times) / 1e3 / steps, "calls": len(times) / steps}
                        for name, times in top_kernels],
    }


def markdown(result: dict) -> str:
    busy = result["gpu_busy_ms"]
    head = f"per step, over {result['steps']} profiled steps (under the profiler): wall {result['wall_ms']:.2f} ms"
    if busy is not None:
        head += f", GPU busy {busy:.2f} ms ({100 * busy / result['wall_ms']:.0f}%), {result['kernels']:.0f} kernels and copies"
    else:
        head += " (no GPU: CPU op times below)"
    what = "ms of its kernels" if busy is not None else "ms of CPU"
    lines = [head, "", f"| op | {what} a step | calls a step |", "|---|---|---|"]
    lines += [f"| {row['op'][:70]} | {row['ms']:.3f} | {row['calls']:.1f} |" for row in result["top"]]
    if result["top_kernels"]:
        lines += ["", "| kernel | ms a step | launches a step |", "|---|---|---|"]
        lines += [f"| {row['kernel'][:90]} | {row['ms']:.3f} | {row['calls']:.1f} |" for row in result["top_kernels"]]
    return "\n".join(lines)
