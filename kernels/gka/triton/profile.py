"""Per-kernel device times of the triton GKA backend (torch.profiler) and a launch-setting sweep.

    python -m kernels.gka.triton.profile [B T H D]

Writes profile.json to $OUT if set. For tuning runs on a GPU; NOTES.md records what they showed.
"""

import json
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

from .. import gka
from . import LAUNCH_OVERRIDES

_A = {"fwd_warps": 4, "fwd_lean": False, "bwd_warps": 8, "bwd_lean": True, "readout_warps": 8, "carry_warps": 8,
      "scan_rows": 32, "scan_warps": 4, "scan_bwd_warps": 8, "low_states": False}
SWEEP = (
    _A,
    _A | {"low_states": True},
    {"fwd_warps": 4, "fwd_lean": True, "bwd_warps": 8, "bwd_lean": False, "readout_warps": 4, "carry_warps": 4,
     "scan_rows": 16, "scan_warps": 4, "scan_bwd_warps": 4, "low_states": True},
)
# The settings each kernel's time depends on: the best settings are picked kernel by kernel.
KERNEL_KEYS = {
    "_gka_fwd_chunk": ("fwd_warps", "fwd_lean"),
    "_gka_bwd_solve": ("bwd_warps", "bwd_lean"),
    "_gka_bwd_readout": ("readout_warps",),
    "_gka_bwd_carry": ("carry_warps",),
    "_state_scan_fwd": ("scan_rows", "scan_warps"),
    "_state_scan_bwd": ("scan_bwd_warps",),
}


def kernel_times(shape, num_iter=30, dtype=torch.bfloat16, reps=5):
    batch, seq_len, heads, dim = shape
    q = F.normalize(torch.randn(batch, seq_len, heads, dim, device="cuda"), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(batch, seq_len, heads, dim, device="cuda"), dim=-1).to(dtype).requires_grad_()
    v = torch.randn(batch, seq_len, heads, dim, device="cuda", dtype=dtype).requires_grad_()
    g = (F.logsigmoid(torch.randn(batch, seq_len, heads, device="cuda") + 4) / 4).requires_grad_()
    alpha = torch.rand(batch, seq_len, heads, device="cuda").requires_grad_()
    do = torch.randn_like(v)

    def step():
        o = gka(q, k, v, g, alpha, num_iter=num_iter, backend="triton")
        torch.autograd.backward(o, do)
        for x in (q, k, v, g, alpha):  # no grad accumulation kernels in the profile
            x.grad = None

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            totals[evt.name] += evt.device_time / 1e3 / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    shape = tuple(int(x) for x in argv[:4]) if len(argv) >= 4 else (1, 32768, 8, 128)
    results = []
    for overrides in SWEEP:
        LAUNCH_OVERRIDES.clear()
        LAUNCH_OVERRIDES.update(overrides)
        try:
            times = kernel_times(shape)
        except Exception as error:  # noqa: BLE001 (a launch setting that does not compile or fit)
            results.append({"overrides": overrides, "error": repr(error)[:300]})
            continue
        results.append({"overrides": overrides, "ms": times})
    LAUNCH_OVERRIDES.clear()
    timed = [r for r in results if "ms" in r]
    best = {}
    if timed:  # low_states changes every kernel: take the fastest total's, then the best per kernel with it
        low = min(timed, key=lambda r: sum(r["ms"].values()))["overrides"].get("low_states", False)
        timed = [r for r in timed if r["overrides"].get("low_states", False) == low]
        best["low_states"] = low
    for kernel, keys in KERNEL_KEYS.items():
        candidates = [r for r in timed if kernel in r["ms"]]
        if candidates:
            fastest = min(candidates, key=lambda r, kernel=kernel: r["ms"][kernel])
            best |= {key: fastest["overrides"][key] for key in keys if key in fastest["overrides"]}
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "profile.json"), "w") as f:
            json.dump({"shape": shape, "results": results}, f, indent=1)
    for r in results:
        print(r["overrides"], r.get("error", ""))
        for name, ms in list(r.get("ms", {}).items())[:8]:
            print(f"   {ms:8.3f} ms  {name[:70]}")
        if "ms" in r:
            print(f"   {sum(r['ms'].values()):8.3f} ms  total")
    print("best", best)
    return best


if __name__ == "__main__":
    main()
