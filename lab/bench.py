"""`lab bench`: CPU figures for BENCHMARKS.md. Medians of repeated timings, variants side by side in one run.

- ops: forward+backward of the GKA op, torch chunk path vs the token-by-token reference.
- mixers: training tokens/s of each model at the `make demo` size (one optimizer step = forward, backward,
  AdamW), measured on the bare model so Lightning's per-step overhead is not in the figure. On a GPU:
  each mixer at a mqar_paper size, eager and torch.compile'd, plus its fp32 GPU error against float64.
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
from lab.module import compile_fresh

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# every registered mixer with a demo config (configs/demo/<name>.yaml), timed at the demo size
DEMO_MODELS = tuple(name for name in MODELS if (CONFIGS / "demo" / f"{name}.yaml").exists())


def run(what: str) -> list[dict]:
    console = make_console()
    threads = 1 if what == "ops" else torch.get_num_threads()  # kernels.bench times ops on one thread
    console.print(f"machine: {platform.processor() or platform.machine()}, {threads} torch thread(s), "
                  f"torch {torch.__version__}")
    if what == "ops":
        rows = bench_ops()
    else:
        rows = bench_mixers_gpu() if torch.cuda.is_available() else bench_mixers()
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


def bench_mixers_gpu(steps: int = 20, warmup: int = 5) -> list[dict]:
    """Every mixer on the GPU at a mqar_paper size (2 layers, d 128, L 256, batch 256, vocab 8192, bf16
    autocast): eager and torch.compile'd training tokens/s, and the fp32 GPU loss and gradients against
    float64 on the CPU (same weights, same batch)."""
    device = torch.device("cuda")
    rows = []
    for name in MODELS:
        run_cfg = load_config([], [f"model.name={name}", "model.d_model=128", "model.num_layers=2",
                                   "task.vocab_size=8192", "task.seq_len=256", "task.num_kv_pairs=16"])
        task = run_cfg.task
        inputs, labels = tasks.get_task(task.name).generate(task, 256, seed=0)
        mask = labels != IGNORE
        torch.manual_seed(0)
        model = build_model(run_cfg.model, task.vocab_size)
        try:
            row = {"model": name, **_gpu_parity(model, inputs[:8], labels[:8], device)}
        except Exception as err:  # noqa: BLE001 - reported in the row; the other mixers still run
            row = {"model": name, "parity_error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
        model = model.to(device)
        inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
        for variant in ("eager", "compiled"):
            try:
                forward = compile_fresh(model.hidden_states) if variant == "compiled" else model.hidden_states
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                times = []
                for step in range(warmup + steps):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = F.cross_entropy(model.lm_head(forward(inputs)[mask]).float(), labels[mask])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    torch.cuda.synchronize()
                    if step >= warmup:
                        times.append(time.perf_counter() - start)
                row[f"{variant}_tokens_per_s"] = inputs.numel() / statistics.median(times)
            except Exception as err:  # noqa: BLE001 - a mixer that does not compile is a finding, not a crash
                row[f"{variant}_tokens_per_s"] = float("nan")
                row[f"{variant}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        row["compile_speedup"] = row["compiled_tokens_per_s"] / row["eager_tokens_per_s"]
        rows.append(row)
        print(row, flush=True)
    return rows


def _gpu_parity(model, inputs, labels, device) -> dict:
    """Relative error of the fp32 GPU loss and gradient (norm of the difference / norm) against float64 CPU."""
    import copy

    results = {}
    for label, net, dev, dtype in (("gpu", copy.deepcopy(model).to(device), device, torch.float32),
                                   ("cpu64", copy.deepcopy(model).double(), torch.device("cpu"), torch.float64)):
        mask = labels != IGNORE
        logits = net.lm_head(net.hidden_states(inputs.to(dev))[mask.to(dev)])
        loss = F.cross_entropy(logits.to(dtype), labels.to(dev)[mask.to(dev)])
        loss.backward()
        grads = torch.cat([p.grad.flatten().double().cpu() for p in net.parameters()])
        results[label] = (loss.double().cpu(), grads)
    (loss_gpu, grad_gpu), (loss_ref, grad_ref) = results["gpu"], results["cpu64"]
    return {"fp32_loss_rel_err": (abs(loss_gpu - loss_ref) / abs(loss_ref)).item(),
            "fp32_grad_rel_err": ((grad_gpu - grad_ref).norm() / grad_ref.norm()).item()}
