"""GPU timing of one GKA layer op: the Triton kernels against SDPA causal attention and the torch chunk path.

`bench_kernels` times with triton.testing.do_bench (median ms), bf16 by default, forward and
forward+backward, and reads the peak memory of each forward+backward. Needs a CUDA device.
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .gka import gka

DEFAULT_SHAPES = ((4, 2048, 8, 128), (4, 8192, 8, 128), (1, 32768, 8, 128))
# The authors' GKA kernel on an H200, bf16, median ms, forward / forward+backward (ANCHORS.md).
AUTHORS_MS = {
    (30, "4x2048x8x128"): (0.704, 3.153),
    (30, "4x8192x8x128"): (2.296, 7.356),
    (30, "1x32768x8x128"): (2.855, 10.482),
    (10, "4x2048x8x128"): (0.532, 2.915),
    (10, "4x8192x8x128"): (1.477, 5.732),
    (10, "1x32768x8x128"): (1.868, 8.754),
}
BF16_RATE_TFLOPS = 686.0  # measured bf16 matmul rate on the H200 (ANCHORS.md)


def gka_flops(batch, seq_len, heads, dim, num_iter, chunk=64, backward=True):
    """The FLOP floor of ANCHORS.md: 2 C D^2 + 4 C^2 D per Chebyshev step, chunk and head; one solve forward,
    a second in the backward."""
    chunks = batch * heads * math.ceil(seq_len / chunk)
    per_step = 2 * chunk * dim**2 + 4 * chunk**2 * dim
    return chunks * per_step * num_iter * (2 if backward else 1)


def _inputs(batch, seq_len, heads, dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    q = F.normalize(randn(batch, seq_len, heads, dim), dim=-1).to(dtype)
    k = F.normalize(randn(batch, seq_len, heads, dim), dim=-1).to(dtype)
    v = randn(batch, seq_len, heads, dim).to(dtype)
    g = F.logsigmoid(randn(batch, seq_len, heads) + 4.0) / 4  # decays ~0.995 per token
    alpha = torch.sigmoid(randn(batch, seq_len, heads))
    return [x.requires_grad_() for x in (q, k, v, g, alpha)]


def _measure(fn, inputs, grad_out, warmup, rep):
    """(forward ms, forward+backward ms, peak MiB over the forward+backward beyond the inputs)."""
    from triton.testing import do_bench

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        torch.autograd.backward(out, grad_out)
        for x in inputs:
            x.grad = None

    fwd = do_bench(forward, warmup=warmup, rep=rep, return_mode="median")
    fwd_bwd = do_bench(forward_backward, warmup=warmup, rep=rep, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd, fwd_bwd, peak


def bench_kernels(
    shapes=DEFAULT_SHAPES,
    num_iters=(30, 10),
    dtype=torch.bfloat16,
    torch_path=True,
    out_dir=None,
    warmup=25,
    rep=100,
):
    """Times gka (backend "triton", each num_iter), SDPA causal attention and (if torch_path) the torch chunk
    GKA path at num_iters[0], per (B, T, H, D) shape (Dk = Dv = D) on the current CUDA device.

    Returns rows {"shape", "op", "num_iter", "fwd_ms", "fwd_bwd_ms", "peak_mib", "fwd_bwd_vs_sdpa",
    "authors_fwd_bwd_ms", "speedup_vs_authors", "floor_ms", "vs_floor"}; with out_dir, also writes
    kernels_gpu.json and kernels_gpu.md (a markdown table) there.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_kernels needs a CUDA device")
    device = torch.device("cuda")
    rows = []
    for batch, seq_len, heads, dim in shapes:
        shape = f"{batch}x{seq_len}x{heads}x{dim}"
        inputs = _inputs(batch, seq_len, heads, dim, dtype, device)
        grad_out = torch.randn_like(inputs[2])
        q, k, v = inputs[:3]

        def sdpa(q, k, v, *_):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return out.transpose(1, 2)

        ops = [("sdpa", None, sdpa)]
        for num_iter in num_iters:
            ops.append(("gka-triton", num_iter, lambda *x, r=num_iter: gka(*x, num_iter=r, backend="triton")))
        if torch_path:
            r = num_iters[0]
            ops.append(("gka-torch", r, lambda *x, r=r: gka(*x, num_iter=r, backend="torch")))
        sdpa_fwd_bwd = None
        for name, num_iter, fn in ops:
            try:
                fwd, fwd_bwd, peak = _measure(fn, inputs, grad_out, warmup, rep)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"shape": shape, "op": name, "num_iter": num_iter, "error": "out of memory"})
                continue
            if name == "sdpa":
                sdpa_fwd_bwd = fwd_bwd
            row = {
                "shape": shape,
                "op": name,
                "num_iter": num_iter,
                "fwd_ms": fwd,
                "fwd_bwd_ms": fwd_bwd,
                "peak_mib": peak,
                "fwd_bwd_vs_sdpa": fwd_bwd / sdpa_fwd_bwd,
            }
            authors = AUTHORS_MS.get((num_iter, shape)) if dim == 128 else None
            if authors is not None and name == "gka-triton":
                row["authors_fwd_bwd_ms"] = authors[1]
                row["speedup_vs_authors"] = authors[1] / fwd_bwd
            if num_iter is not None:
                row["floor_ms"] = gka_flops(batch, seq_len, heads, dim, num_iter) / (BF16_RATE_TFLOPS * 1e9)
                row["vs_floor"] = fwd_bwd / row["floor_ms"]
            rows.append(row)
        del inputs, grad_out, q, k, v
        torch.cuda.empty_cache()
    if out_dir is not None:
        write_report(rows, out_dir)
    return rows


def markdown_table(rows) -> str:
    header = (
        "| shape | op | r | fwd ms | fwd+bwd ms | fwd+bwd / SDPA | vs authors' fwd+bwd | FLOP floor ms | peak MiB |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['op']} | {row['num_iter'] or ''} | {row['error']} | | | | | |")
            continue
        authors = ""
        if "authors_fwd_bwd_ms" in row:
            speedup = row["speedup_vs_authors"]
            relation = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
            authors = f"{row['authors_fwd_bwd_ms']:.2f} ms: {relation}"
        floor = f"{row['floor_ms']:.2f} ({row['vs_floor']:.1f}x)" if "floor_ms" in row else ""
        lines.append(
            f"| {row['shape']} | {row['op']} | {row['num_iter'] or ''} | {row['fwd_ms']:.3f} | "
            f"{row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_vs_sdpa']:.2f} | {authors} | {floor} | {row['peak_mib']:.0f} |"
        )
    return header + "\n".join(lines) + "\n"


def write_report(rows, out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    (out_dir / "kernels_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    title = f"GKA kernels, {meta['device']}, {meta['date']}, torch {meta['torch']}, bf16 median ms\n\n"
    (out_dir / "kernels_gpu.md").write_text(title + markdown_table(rows))
