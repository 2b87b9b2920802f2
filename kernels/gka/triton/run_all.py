"""One device call: the launch-setting sweep (profile.py), then gpu_check and bench_kernels with the best.

    python -m kernels.gka.triton.run_all     (files under $OUT)
"""

import os

from ... import bench_gpu
from .. import gpu_check
from . import LAUNCH_OVERRIDES, profile


def main():
    best = profile.main([])
    LAUNCH_OVERRIDES.update(best)
    status = gpu_check.main([])
    rows = bench_gpu.bench_kernels(out_dir=os.environ.get("OUT"))
    print(f"launch settings: {best}")
    print(bench_gpu.markdown_table(rows))
    return status


if __name__ == "__main__":
    main()
