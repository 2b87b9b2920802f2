"""CPU timing of the GKA torch chunk path against the token-by-token reference (forward + backward, fp32)."""

import statistics
import time

import torch

from .gka import gka

DEFAULT_SHAPES = ((1, 256, 2, 32), (2, 512, 4, 32), (1, 1024, 2, 64))


def _time_forward_backward(inputs, backend, num_iter):
    start = time.perf_counter()
    o = gka(*inputs, num_iter=num_iter, backend=backend)
    torch.autograd.grad(o.square().mean(), inputs)
    return time.perf_counter() - start


def bench_ops(shapes=DEFAULT_SHAPES, num_iter=30, repeats=5, reference_repeats=1, num_threads=1):
    """Median forward+backward seconds of gka per backend and (B, T, H, D) shape (Dk = Dv = D).

    The reference runs a Python loop of ~num_iter ops per token forward and again backward (about
    8 s for 1x1024x2x64 at num_iter=30), so it is timed `reference_repeats` times only.
    Timing runs with `num_threads` intra-op threads (restored afterwards): these ops are small, and
    on a 2-core machine shared with other jobs, 2 threads made the small shapes up to ~100x slower.
    Returns one row per (shape, backend): {"shape", "backend", "median_ms", "tokens_per_s"}.
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        for batch, seq_len, heads, dim in shapes:
            q = torch.randn(batch, seq_len, heads, dim, generator=gen)
            k = torch.nn.functional.normalize(torch.randn(batch, seq_len, heads, dim, generator=gen), dim=-1)
            v = torch.randn(batch, seq_len, heads, dim, generator=gen)
            g = -0.1 * torch.rand(batch, seq_len, heads, generator=gen)
            alpha = torch.rand(batch, seq_len, heads, generator=gen)
            inputs = [x.requires_grad_() for x in (q, k, v, g, alpha)]
            for backend, runs in (("torch", repeats), ("reference", reference_repeats)):
                times = [_time_forward_backward(inputs, backend, num_iter) for _ in range(runs)]
                median = statistics.median(times)
                rows.append(
                    {
                        "shape": f"{batch}x{seq_len}x{heads}x{dim}",
                        "backend": backend,
                        "median_ms": 1e3 * median,
                        "tokens_per_s": batch * seq_len / median,
                    }
                )
    finally:
        torch.set_num_threads(previous_threads)
    return rows
