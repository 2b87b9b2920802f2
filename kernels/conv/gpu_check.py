"""GPU check of the Triton short convolution: accuracy against the float64 reference on the GPU, the vmap rule
with per-member weights, and fwd+bwd times beside the F.conv1d path (triton.testing.do_bench, median).

    python -m kernels.conv.gpu_check      (writes conv_gpu_check.json to $OUT if set; exit 1 if a check failed)
"""

import json
import os
import sys
import time

import torch

from ..common import rel_err
from . import short_conv, triton_conv

# (batch, seq_len, channels, taps, dtype): the mqar_paper GKA cell's q, k, v conv first, then awkward sizes
CASES = [(256, 256, 384, 4, torch.bfloat16), (256, 256, 384, 4, torch.float32), (3, 1000, 130, 4, torch.float32),
         (2, 77, 50, 3, torch.float16), (4, 300, 96, 1, torch.bfloat16)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TIMED = [(256, 256, 384, 4), (256, 256, 1536, 4), (16, 4096, 768, 4)]
# the backward's (rows a program, warps) raced at TIMED[0]
BWD_SETTINGS = [(64, 4), (64, 8), (32, 4), (32, 8), (16, 4), (16, 2), (8, 2)]


def _inputs(batch, seq_len, channels, taps, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, seq_len, channels, generator=gen, device="cuda", dtype=torch.float64)
    weight = torch.randn(channels, taps, generator=gen, device="cuda", dtype=torch.float64) / taps**0.5
    bias = torch.randn(channels, generator=gen, device="cuda", dtype=torch.float64)
    return x, weight, bias


def check_case(batch, seq_len, channels, taps, dtype, seed):
    x64, w64, b64 = (t.requires_grad_() for t in _inputs(batch, seq_len, channels, taps, seed))
    want = short_conv(x64, w64, b64, backend="reference")
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x64, w64, b64], grad_out)
    x = x64.detach().to(dtype).requires_grad_()
    w, b = (t.detach().float().requires_grad_() for t in (w64, b64))
    got = short_conv(x, w, b, backend="triton")
    got_grads = torch.autograd.grad(got, [x, w, b], grad_out.to(dtype))
    errors = {"y": rel_err(got, want)} | {f"d{n}": rel_err(g, r) for n, g, r in zip("xwb", got_grads, want_grads, strict=True)}
    return {"check": "accuracy", "shape": f"{batch}x{seq_len}x{channels} K={taps}", "dtype": str(dtype)[6:],
            "errors": errors, "ok": all(e < TOL[dtype] for e in errors.values())}


def check_vmap(members=4):
    x, w, b = _inputs(members * 8, 256, 384, 4, seed=7)
    x = x.float().unflatten(0, (members, 8))
    w = torch.stack([w.float() * (m + 1) for m in range(members)])
    b = torch.stack([b.float() - m for m in range(members)])
    stacked = torch.vmap(lambda xi, wi, bi: short_conv(xi, wi, bi, backend="triton"))(x, w, b)
    one_by_one = torch.stack([short_conv(x[m], w[m], b[m], backend="triton") for m in range(members)])
    err = rel_err(stacked, one_by_one)
    return {"check": "vmap", "shape": f"{members}x8x256x384 K=4", "dtype": "float32", "errors": {"y": err},
            "ok": err == 0.0}


def time_paths(batch, seq_len, channels, taps, dtype=torch.bfloat16):
    from triton.testing import do_bench

    x, w, b = _inputs(batch, seq_len, channels, taps, seed=1)
    x = x.to(dtype).requires_grad_()
    w, b = (t.float().requires_grad_() for t in (w, b))
    grad_out = torch.randn_like(x)
    row = {"shape": f"{batch}x{seq_len}x{channels} K={taps}", "dtype": str(dtype)[6:]}
    for backend in ("torch", "triton"):
        def forward(backend=backend):
            return short_conv(x, w, b, backend=backend)

        row[backend] = do_bench(forward, return_mode="median")
        row[backend + "_fwd_bwd"] = do_bench(lambda forward=forward: forward().backward(grad_out),
                                             grad_to_none=[x, w, b], return_mode="median")
    return row


def race_backward():
    """fwd+bwd ms of the triton path at TIMED[0] per backward setting (the forward's fixed)."""
    default = triton_conv.BWD_BLOCK_T, triton_conv.BWD_WARPS
    times = {}
    try:
        for block_t, warps in BWD_SETTINGS:
            triton_conv.BWD_BLOCK_T, triton_conv.BWD_WARPS = block_t, warps
            times[f"{block_t} rows, {warps} warps"] = time_paths(*TIMED[0])["triton_fwd_bwd"]
    finally:
        triton_conv.BWD_BLOCK_T, triton_conv.BWD_WARPS = default
    return times


def main():
    start = time.time()
    results = [check_case(*case, seed=i) for i, case in enumerate(CASES)] + [check_vmap()]
    race = race_backward()
    times = [time_paths(*shape) for shape in TIMED]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.time() - start}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "conv_gpu_check.json"), "w") as f:
            json.dump({"meta": meta, "results": results, "times_ms": times, "backward_race_ms": race}, f, indent=1)
    print(f"# short_conv gpu_check, {meta['device']}, {meta['date']}")
    for r in results:
        errors = " ".join(f"{k}={v:.1e}" for k, v in r["errors"].items())
        print(f"{'OK ' if r['ok'] else 'BAD'} {r['check']:<9} {r['shape']:<20} {r['dtype']:<9} {errors}")
    print(f"\nfwd+bwd ms at {TIMED[0]} by backward setting (default {triton_conv.BWD_BLOCK_T} rows, "
          f"{triton_conv.BWD_WARPS} warps): " + ", ".join(f"{k} {v:.3f}" for k, v in race.items()))
    print("\n| shape (bf16) | torch fwd ms | triton fwd ms | torch fwd+bwd ms | triton fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for t in times:
        print(f"| {t['shape']} | {t['torch']:.3f} | {t['triton']:.3f} | {t['torch_fwd_bwd']:.3f} | "
              f"{t['triton_fwd_bwd']:.3f} |")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
