"""Per-kernel device times of the triton GKA backend (torch.profiler), for run_all.py and sweep.py, which
race launch-setting sets with it on a GPU; NOTES.md records what they showed."""

from collections import defaultdict

import torch
import torch.nn.functional as F

from .. import gka


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
