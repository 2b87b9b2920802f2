"""Side-by-side per-kernel times of named launch-setting sets, with each compiled kernel's registers, spills,
shared memory and CTAs per SM, and (optionally) the bf16 accuracy check of gpu_check for each set.

    python -m kernels.gka.triton.sweep [--acc] [--bench] [--shape B T H D] [NAME ...]

--bench: do_bench of each named set (bf16, r = 30, every bench shape). Writes sweep.json to $OUT if set.
One device call compares candidate kernel versions (NOTES.md).
"""

import json
import os
import sys

import torch

from . import LAUNCH_OVERRIDES
from . import kernels as K
from .profile import kernel_times

CONFIGS = {
    "default": {},
    "grads-8w": {"grads_warps": 8, "grads2_warps": 8},
    "readout-8w": {"readout_warps": 8, "readout2_warps": 8},
    "scan-d8": {"scan_depth": 8},
    "carry-direct": {"carry_partials": False},
}
KERNELS = ("_gka_fwd_chunk", "_gka_bwd_solve", "_gka_bwd_grads", "_gka_bwd_readout", "_gka_bwd_carry",
           "_chunk_contrib", "_state_scan_elem")


def compiled_stats():
    """{kernel: [(warps, regs, spills, shared, CTAs per SM)]} of every compiled variant in the JIT caches."""
    props = torch.cuda.get_device_properties(0)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
    stats = {}
    for name in KERNELS:
        fn = getattr(K, name)
        rows = []
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                kernel._init_handles()
                warps = kernel.metadata.num_warps
                shared = kernel.metadata.shared
                regs = max(kernel.n_regs, 1)
                by_regs = 65536 // (((regs + 7) // 8 * 8) * 32 * warps)
                by_smem = smem_per_sm // (shared + 1024) if shared else 32
                rows.append((warps, kernel.n_regs, kernel.n_spills, shared, min(by_regs, by_smem, 64 // warps)))
        stats[name] = rows
    return stats


def clear_caches():
    for name in KERNELS:
        for cache in getattr(K, name).device_caches.values():
            cache[0].clear()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    acc = "--acc" in argv
    shape = (1, 32768, 8, 128)
    if "--shape" in argv:
        i = argv.index("--shape")
        shape = tuple(int(x) for x in argv[i + 1:i + 5])
        argv = argv[:i] + argv[i + 5:]
    names = [a for a in argv if not a.startswith("--")] or list(CONFIGS)
    results = []
    for name in names:
        LAUNCH_OVERRIDES.clear()
        LAUNCH_OVERRIDES.update(CONFIGS[name])
        clear_caches()
        row = {"name": name, "overrides": CONFIGS[name]}
        try:
            row["ms"] = kernel_times(shape)
            row["stats"] = compiled_stats()
            if acc:
                from .. import gpu_check
                row["acc"] = gpu_check.check_accuracy((2, 2048, 4, 128, 128), torch.bfloat16, seed=10)["errors"]
                fp32 = gpu_check.check_accuracy((1, 1000, 2, 96, 80), torch.float32, seed=11, initial_state=True)
                row["acc"] |= {f"fp32_{k}": v for k, v in fp32["errors"].items()}
        except Exception as error:  # noqa: BLE001
            row["error"] = repr(error)[:400]
        results.append(row)
        print(f"== {name} {CONFIGS[name]}", row.get("error", ""), flush=True)
        for kname, ms in row.get("ms", {}).items():
            print(f"   {ms:8.3f} ms  {kname[:60]}", flush=True)
        for kname, st in row.get("stats", {}).items():
            print(f"   {kname:<18} (warps, regs, spills, shared, CTAs/SM) {st}", flush=True)
        if "ms" in row:
            print(f"   {sum(row['ms'].values()):8.3f} ms  total", flush=True)
        if "acc" in row:
            print("   acc", " ".join(f"{k}={v:.1e}" for k, v in row["acc"].items()), flush=True)
        if "--bench" in argv and "error" not in row:
            bench(name, results)
    LAUNCH_OVERRIDES.clear()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump({"shape": shape, "results": results}, f, indent=1, default=str)
    return results


def bench(name, results):
    """do_bench (median ms) of the current launch settings, bf16, r = 30, every bench shape."""
    from ... import bench_gpu
    from .. import gka
    for batch, seq_len, heads, dim in bench_gpu.DEFAULT_SHAPES:
        inputs = bench_gpu._inputs(batch, seq_len, heads, dim, torch.bfloat16, torch.device("cuda"))
        fwd, fwd_bwd, peak = bench_gpu._measure(lambda *x: gka(*x, num_iter=30, backend="triton"), inputs,
                                                torch.randn_like(inputs[2]), 25, 100)
        shape_name = f"{batch}x{seq_len}x{heads}x{dim}"
        authors = bench_gpu.AUTHORS_MS[(30, shape_name)][1]
        print(f"bench {shape_name}: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd:.3f} ms "
              f"({authors / fwd_bwd:.2f}x the authors' {authors}), peak {peak:.0f} MiB [{name}]", flush=True)
        results.append({"bench": shape_name, "settings": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_mib": peak})


if __name__ == "__main__":
    main()
