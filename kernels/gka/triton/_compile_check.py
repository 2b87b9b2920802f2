"""Compiles the kernels for sm_90a on a machine without a GPU and prints ptxas's register/spill report.

    TRITON_INTERPRET=0 python -m kernels.gka.triton._compile_check [bf16|fp32] [solver num_warps] [D] [kernels]

(fp32 wants GKA_C=32 GKA_PREC=tf32x3, as the GPU path runs it.) Launch settings: GKA_FOLD=0 (solver_fold off: the
v10 solver), GKA_CONTRIB_HALVES=1 (contrib_halves), GKA_CG=1 (the CG solver, MesaNet's).
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
STATE_PTRS = {"h_states", "u_states", "dh_local", "du_local", "dh_end", "du_end", "dh_buf", "du_buf", "h_buf", "u_buf"}
INTS = {"T", "H", "N", "D", "DV", "SIZE", "NB", "num_iter"}
FLOATS = {"scale", "ridge"}


def compile_report(fn, constexprs, dtype, num_warps, num_stages=3):
    start = time.time()
    # constexpr parameters left out take their defaults (else they would be typed as runtime arguments)
    constexprs = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default} | constexprs
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
    # What a launch at 1 x 32768 x 8 x 128 specializes: 16-aligned pointers and ints divisible by 16 (H = 8 is
    # not). Without these attributes ptxas reports several times the real spills (no vectorized accesses).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (sig[name].startswith("*") or name in ("T", "N", "D", "DV", "SIZE"))}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
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
    low = dtype != "fp32"
    fold = os.environ.get("GKA_FOLD", "1") == "1"
    halves = dim >= 128  # _halves at the default halves_from
    cg = os.environ.get("GKA_CG") == "1"
    solver = {"HALVES": halves and not fold and not cg, "FOLD": fold, "CG": cg}
    jobs = [
        (K._gka_fwd_chunk, {**chunk, **flags, **solver, "BDV": dim, "ADAPTIVE": True, "INTERPRET": False,
                            "READ_SPLIT": low}, warps),
        (K._gka_bwd_readout, {**chunk, **flags, "BDV": dim, "PART": 1, "HALVES": halves}, 4),
        (K._gka_bwd_readout, {**chunk, **flags, "BDV": dim, "PART": 2}, 4),
        (K._gka_bwd_solve, {**chunk, **flags, **solver, "ADAPTIVE": True, "INTERPRET": False}, warps),
        (K._gka_bwd_grads, {**chunk, "HAS_G": True, "ADAPTIVE": True, "PART": 1, "HALVES": halves}, 4),
        (K._gka_bwd_grads, {**chunk, "HAS_G": True, "ADAPTIVE": True, "PART": 2}, 4),
        (K._gka_bwd_carry, {**chunk, "HAS_G": True, "BDV": dim}, 8),
        (K._chunk_contrib, {**chunk, "HAS_G": True, "BDV": dim, "HALVES": os.environ.get("GKA_CONTRIB_HALVES") == "1"},
         4),
        (K._state_scan_elem, {"HAS_G": True, "HAS_INIT": True, "REVERSE": True, "BLOCK": 1024, "DEPTH": 16,
                              "INTERPRET": False}, 4),
    ]
    for fn, constexprs, nw in jobs:
        if only is None or fn.__name__ in only:
            compile_report(fn, constexprs, dtype, nw)


if __name__ == "__main__":
    main()
