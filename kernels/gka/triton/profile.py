"""Per-kernel device times of the triton GKA backend (torch.profiler) and a launch-setting sweep.

    python -m kernels.gka.triton.profile [B T H D]    (each setting set of SWEEP)

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

# Setting sets main() profiles (run_all.py has the sweep that picks settings per kernel group).
SWEEP = ({}, {"grads_warps": 8, "grads2_warps": 8})


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
    return results


if __name__ == "__main__":
    main()
