"""`lab bench`: CPU figures for BENCHMARKS.md. Medians of repeated timings, variants side by side in one run.

- ops: forward+backward of the GKA op, torch chunk path vs the token-by-token reference.
- mixers: training tokens/s of each model at the `make demo` size (one optimizer step = forward, backward,
  AdamW), measured on the bare model so Lightning's per-step overhead is not in the figure.
"""

import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

import tasks
from lab.cli import console as make_console
from lab.config import load_config
from lab.data import IGNORE
from lab.models import MODELS, build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# every registered mixer with a demo config (configs/demo/<name>.yaml), timed at the demo size
DEMO_MODELS = tuple(name for name in MODELS if (CONFIGS / "demo" / f"{name}.yaml").exists())


def run(what: str) -> list[dict]:
    console = make_console()
    threads = 1 if what == "ops" else torch.get_num_threads()  # kernels.bench times ops on one thread
    console.print(f"machine: {platform.processor() or platform.machine()}, {threads} torch thread(s), "
                  f"torch {torch.__version__}")
    rows = bench_ops() if what == "ops" else bench_mixers()
    table = Table(show_edge=False)
    for column in rows[0]:
        table.add_column(column, justify="left" if isinstance(rows[0][column], str) else "right")
    for row in rows:
        table.add_row(*(f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    return rows


def bench_ops() -> list[dict]:
    from kernels.bench import bench_ops as kernel_bench

    return kernel_bench()


def bench_mixers(steps: int = 20, warmup: int = 3) -> list[dict]:
    rows = []
    for name in DEMO_MODELS:
        run_cfg = load_config([str(CONFIGS / "demo.yaml"), str(CONFIGS / "demo" / f"{name}.yaml")])
        task = run_cfg.task
        inputs, labels = tasks.get_task(task.name).generate(task, run_cfg.trainer.batch_size, seed=0)
        torch.manual_seed(0)
        model = build_model(run_cfg.model, task.vocab_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mask = labels != IGNORE
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            loss = F.cross_entropy(model.lm_head(model.hidden_states(inputs)[mask]), labels[mask])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"model": name, "params": model.num_params(), "batch x seq_len": f"{inputs.shape[0]}x{inputs.shape[1]}",
                     "median_step_ms": 1e3 * median, "train_tokens_per_s": inputs.numel() / median})
    return rows
