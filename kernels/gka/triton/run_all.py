"""One device call: a launch-setting sweep at 4 x 8192 x 8 x 128 (per-kernel times of a few setting sets),
the fastest setting per kernel group, gpu_check with it (falling back to the defaults if it fails), per-kernel
times of the choice at 1 x 32768 and 4 x 8192, and bench_kernels (what `lab bench kernels` runs).

    python -m kernels.gka.triton.run_all     (files under $OUT)
"""

import json
import os
import sys

import torch

from ... import bench_gpu
from .. import gpu_check
from . import LAUNCH_OVERRIDES, _launch_config
from .profile import kernel_times

# Setting sets to profile; each group's settings are then taken from the set where that group was fastest.
CANDIDATES = {
    # the defaults: v11 (chosen by the 2026-11-30 07:02 UTC run over v10 and v11's fused solve variants, NOTES.md);
    # add setting sets here to race them against it
    "v11": {},
    # v10's solver (column halves at D = 128, eight wgmma groups a step) and whole-tile _chunk_contrib
    "v10": {"solver_fold": False, "contrib_halves": False},
}
# kernel group: (settings it depends on, kernels whose times it sums)
GROUPS = {
    "readout": (("readout_warps", "readout2_warps"), ("_gka_bwd_readout",)),
    "grads": (("grads_warps", "grads2_warps"), ("_gka_bwd_grads",)),
    "scan+carry": (("scan_block", "scan_depth", "scan_elem_warps", "contrib_warps", "carry_warps", "carry_partials",
                    "contrib_halves"),
                   ("_chunk_contrib", "_state_scan_elem", "_gka_bwd_carry")),
    "solver": (("fwd_warps", "bwd_warps", "solver_fold"), ("_gka_fwd_chunk", "_gka_bwd_solve")),
}
# the shape the sets are profiled at (the one short of issue 3's target)
SWEEP_SHAPE = (4, 8192, 8, 128)


def _settings(name):
    return _launch_config(128, torch.bfloat16) | CANDIDATES[name]


def main():
    out = os.environ.get("OUT")
    shape = SWEEP_SHAPE
    profiles = {}
    for name, overrides in CANDIDATES.items():
        LAUNCH_OVERRIDES.clear()
        LAUNCH_OVERRIDES.update(overrides)
        try:
            profiles[name] = kernel_times(shape)
        except Exception as error:  # noqa: BLE001 (a setting that does not compile or fit)
            print(f"{name}: {error!r}"[:300], flush=True)
            continue
        ms = profiles[name]
        print(f"== {name} {overrides}: total {sum(ms.values()):.3f} ms", flush=True)
        for kernel, t in ms.items():
            print(f"   {t:8.3f} ms  {kernel[:60]}", flush=True)
    LAUNCH_OVERRIDES.clear()
    chosen = {}
    for group, (keys, kernels) in GROUPS.items():
        timed = {name: sum(t for k, t in ms.items() if k in kernels) for name, ms in profiles.items()}
        if timed:
            best = min(timed, key=timed.get)
            chosen |= {key: _settings(best)[key] for key in keys}
            print(f"group {group}: " + ", ".join(f"{n} {t:.3f}" for n, t in timed.items()) + f" -> {best}", flush=True)
    print(f"chosen settings: {chosen}", flush=True)
    LAUNCH_OVERRIDES.update(chosen)
    status = gpu_check.main([])
    if status != 0 and chosen:
        print("gpu_check failed with the chosen settings: defaults instead", flush=True)
        LAUNCH_OVERRIDES.clear()
        chosen = {}
        status = gpu_check.main([])
    final = {}
    for shp in ((1, 32768, 8, 128), (4, 8192, 8, 128)):
        ms = kernel_times(shp)
        final["x".join(map(str, shp))] = ms
        print(f"per kernel {shp} (chosen): total {sum(ms.values()):.3f} ms", flush=True)
        for kernel, t in ms.items():
            print(f"   {t:8.3f} ms  {kernel[:60]}", flush=True)
    rows = bench_gpu.bench_kernels(out_dir=out)  # with the torch chunk path's rows, as issue 3's table wants
    if out:
        with open(os.path.join(out, "run_all.json"), "w") as f:
            json.dump({"profiles": profiles, "chosen": chosen, "final_kernels": final, "gpu_check_status": status},
                      f, indent=1)
    print(f"launch settings: {chosen}")
    print(bench_gpu.markdown_table(rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
