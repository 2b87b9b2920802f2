"""Compiles the kernels for sm_90a on a machine without a GPU and prints ptxas's register/spill report.

    TRITON_INTERPRET=0 python -m kernels.gka.triton._compile_check [bf16|fp32] [num_warps] [D]
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.gka.triton import kernels as K

INPUT_PTRS = {"q", "k", "v", "do", "dq", "dk", "dv", "o"}
STATE_PTRS = {"h_states", "u_states", "dh_local", "du_local", "dh_end", "du_end", "dh_buf", "du_buf"}
INTS = {"T", "H", "N", "D", "DV", "SIZE", "num_iter"}
FLOATS = {"scale", "ridge"}


def compile_report(fn, constexprs, dtype, num_warps, num_stages=3):
    start = time.time()
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            low_states = os.environ.get("GKA_LOWSTATES") == "1" and name in STATE_PTRS
            sig[name] = f"*{dtype}" if name in INPUT_PTRS or low_states else "*fp32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                            "num_stages": num_stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    result = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True,
                            text=True, check=False)
    info = " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", result.stderr))
    print(f"{fn.__name__:<18} warps={num_warps} {info} shared={kernel.metadata.shared} "
          f"wgmma={kernel.asm['ttgir'].count('warp_group_dot ')} {time.time() - start:.1f}s", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    dtype = argv[0] if argv else "bf16"
    warps = int(argv[1]) if len(argv) > 1 else 8
    dim = int(argv[2]) if len(argv) > 2 else 128
    only = argv[3].split(",") if len(argv) > 3 else None
    chunk = {"C": int(os.environ.get("GKA_C", "64")), "BD": dim, "DOT_PREC": os.environ.get("GKA_PREC", "tf32")}
    flags = {"HAS_G": True, "HAS_ALPHA": True}
    jobs = [
        (K._gka_fwd_chunk, {**chunk, **flags, "BDV": dim, "ADAPTIVE": True, "INTERPRET": False, "LEAN": os.environ.get("GKA_LEAN", "1") == "1", "SPLIT": True}, warps),
        (K._gka_bwd_readout, {**chunk, **flags, "BDV": dim}, warps),
        (K._gka_bwd_solve, {**chunk, **flags, "ADAPTIVE": True, "INTERPRET": False, "LEAN": os.environ.get("GKA_LEAN", "1") == "1", "SPLIT": True}, warps),
        (K._gka_bwd_carry, {**chunk, "HAS_G": True, "BDV": dim}, warps),
        (K._state_scan_fwd, {"HAS_G": True, "HAS_S0": False, "STORE_FINAL": True, "C": 64, "BR": 32, "BD": dim,
                             "DOT_PREC": os.environ.get("GKA_PREC", "tf32"), "INTERPRET": False}, 4),
        (K._state_scan_bwd, {"HAS_G": True, "HAS_FINAL": False, "C": 64, "BLOCK": 1024,
                             "INTERPRET": False}, 4),
    ]
    for fn, constexprs, nw in jobs:
        if only is None or fn.__name__ in only:
            compile_report(fn, constexprs, dtype, nw)


if __name__ == "__main__":
    main()
