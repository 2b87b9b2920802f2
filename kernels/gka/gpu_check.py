"""GPU correctness check of the triton GKA backend, and a 3-step training smoke of the gka mixer.

    python -m kernels.gka.gpu_check [--quick | --cg]

1. Accuracy at real shapes: fp32 (tf32 products), bf16 and fp16 triton forward + backward against the
   torch chunk path in float64 on the GPU (itself checked against the token-by-token reference in
   tests/test_kernels_gka.py), and the triton forward against the token-by-token float64 reference.
   Relative errors ||a - b|| / ||b|| of o, the final states and every gradient.
   Also at the lab's own shapes (LAB_CASES: head dims 16-64, with and without gate and alpha), each in
   its own process (`--case N` runs one; GKA_GPU_CHECK_OVERRIDES='{"key": value}' sets launch settings).
2. Safety: zero keys, a decay of exactly 1 (g = 0) and g = -30 (decay ~1e-13) over 32k tokens, bf16:
   outputs and grads must be finite.
   Also solver="cg" with a constant ridge (MesaNet's solve, which kernels.mesa hands to these kernels).
   `--cg`: only the CG checks (and a 256x512x2x128x128 bf16 one) and the smokes, about a minute.
3. Smoke: 3 AdamW steps of a 2-layer gka LM and of a mesanet LM (bf16 autocast) through backend "auto" on
   CUDA, counting the calls that reached the triton kernels.

Prints a table and writes gpu_check.json to $OUT (if set). Exit status 1 if a check failed.
"""

import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ..common import rel_err
from . import gka

# Tolerances of issue 3: fp32 forward within 1e-3 (tf32 products), bf16 within 1e-2. Gradients are the
# implicit ones: they differ from autograd through 30 unrolled steps by up to ~1e-2 (dH_0 most); dalpha
# (sum of dqt * (x - q)) loses most to cancellation.
TOL = {torch.float32: {"fwd": 1e-3, "grad": 2e-2}, torch.bfloat16: {"fwd": 1e-2, "grad": 3e-2},
       torch.float16: {"fwd": 1e-2, "grad": 3e-2}}


def make_inputs(batch, seq_len, heads, key_dim, value_dim, seed, initial_state=False, device="cuda", gated=True):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device, dtype=torch.float64)

    u = rand(batch, seq_len, heads)
    inputs = {
        "q": F.normalize(randn(batch, seq_len, heads, key_dim), dim=-1),
        "k": F.normalize(randn(batch, seq_len, heads, key_dim), dim=-1),
        "v": randn(batch, seq_len, heads, value_dim),
        # the layer's gate range: mostly slow decay, some fast, a few near-resets
        "g": torch.where(u < 0.02, -20.0, torch.where(u < 0.2, -0.5 * u, -0.02 * u)) if gated else None,
        "alpha": rand(batch, seq_len, heads) if gated else None,
        "H_0": None,
        "U_0": None,
    }
    if initial_state:
        past = F.normalize(randn(batch, heads, 16, key_dim), dim=-1)
        inputs["H_0"] = past.mT @ past
        inputs["U_0"] = randn(batch, heads, value_dim, key_dim)
    return inputs


def outputs_and_grads(inputs, dtype, backend, num_iter=30, **options):
    leaves = {n: x.detach().to(dtype if n in "qkv" else torch.float32 if dtype != torch.float64 else dtype)
              for n, x in inputs.items() if x is not None}
    for x in leaves.values():
        x.requires_grad_()
    state = (leaves["H_0"], leaves["U_0"]) if "H_0" in leaves else None
    o, (h_final, u_final) = gka(
        leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves.get("alpha"),
        initial_state=state, output_final_state=True, num_iter=num_iter, backend=backend, **options,
    )
    gen = torch.Generator(device=o.device).manual_seed(99)
    loss = sum((x.double() * torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float64)).sum()
               for x in (o, h_final, u_final))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "H_T": h_final, "U_T": u_final, **{f"d{n}": gr for n, gr in zip(leaves, grads, strict=True)}}


def round_to(inputs, dtype):
    """q, k, v rounded to dtype (what the kernel computes with), kept in float64."""
    return {n: x.to(dtype).double() if n in ("q", "k", "v") else x for n, x in inputs.items()}


def check_accuracy(shape, dtype, seed, initial_state=False, num_iter=30, gated=True, cg=False):
    """Against float64 on the same (dtype-rounded) q, k, v: the kernel's own error. The rounding of the
    inputs alone moves o by ~3e-3 in bf16 (conditioning up to 51), reported as "o_vs_unrounded".
    gated=False: no decay and no alpha-connection (g = alpha = None), the ablation's "plain" layer.
    cg: MesaNet's solve (kernels.mesa): CG with the constant ridge 1 of its rescaled system at initialisation."""
    options = {"solver": "cg", "ridge_mode": "constant", "ridge_ratio": 1.0} if cg else {}
    batch, seq_len, heads, key_dim, value_dim = shape
    inputs = round_to(make_inputs(batch, seq_len, heads, key_dim, value_dim, seed, initial_state, gated=gated), dtype)
    ref = outputs_and_grads(inputs, torch.float64, "torch", num_iter, **options)
    out = outputs_and_grads(inputs, dtype, "triton", num_iter, **options)
    errors = {name: rel_err(out[name], ref[name]) for name in ref}
    unrounded = make_inputs(batch, seq_len, heads, key_dim, value_dim, seed, initial_state, gated=gated)
    with torch.no_grad():
        args = [unrounded[n] for n in ("q", "k", "v", "g", "alpha")]
        state = None if unrounded["H_0"] is None else (unrounded["H_0"], unrounded["U_0"])
        o_exact = gka(*args, initial_state=state, num_iter=num_iter, backend="torch", **options)
    extra = {"o_vs_unrounded": rel_err(out["o"], o_exact)}
    finite = all(torch.isfinite(x).all().item() for x in out.values())
    tol = TOL[dtype]
    ok = finite and all(err < (tol["fwd"] if name in ("o", "H_T", "U_T") else tol["grad"])
                        for name, err in errors.items())
    return {"check": ("accuracy" if gated else "accuracy-plain") + ("-cg" if cg else ""),
            "shape": "x".join(map(str, shape)), "dtype": str(dtype).split(".")[-1], "num_iter": num_iter,
            "initial_state": initial_state, "errors": errors | extra, "finite": finite, "ok": ok}


# The shapes the lab's sweeps train at: mqar_paper's d_model 32..256 over 2 heads (head dims 16..128), L up to
# 512, batch 256; its gka variant is the plain layer (no decay, no alpha). T = 300 is not a multiple of the chunk.
LAB_CASES = [
    ((256, 256, 2, 64, 64), torch.bfloat16, False),
    ((64, 512, 2, 32, 32), torch.bfloat16, False),
    ((64, 128, 2, 16, 16), torch.bfloat16, False),
    ((8, 300, 2, 64, 64), torch.bfloat16, True),
    ((8, 300, 2, 32, 32), torch.bfloat16, True),
    ((8, 300, 2, 16, 16), torch.bfloat16, True),
    ((8, 300, 2, 64, 64), torch.float16, True),
    ((4, 300, 2, 64, 48), torch.float32, False),
    ((4, 300, 2, 16, 16), torch.float32, True),
]
_OVERRIDES_ENV = "GKA_GPU_CHECK_OVERRIDES"  # LAUNCH_OVERRIDES handed to an isolated case (run_all sets them)


def check_isolated(index):
    """LAB_CASES[index] in its own process, kernels launched synchronously: a kernel fault (an illegal address)
    poisons the CUDA context of the process it happens in, and would fail every later check here."""
    from .triton import LAUNCH_OVERRIDES

    env = os.environ | {"CUDA_LAUNCH_BLOCKING": "1", _OVERRIDES_ENV: json.dumps(LAUNCH_OVERRIDES)}
    proc = subprocess.run([sys.executable, "-m", "kernels.gka.gpu_check", "--case", str(index)],
                          check=False, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    shape, dtype, gated = LAB_CASES[index]
    lines = [line for line in proc.stderr.splitlines() if "Error" in line] or [f"exit status {proc.returncode}"]
    return {"check": "accuracy" if gated else "accuracy-plain", "shape": "x".join(map(str, shape)),
            "dtype": str(dtype).split(".")[-1], "ok": False, "error": lines[-1][:200], "stderr": proc.stderr[-4000:]}


def run_case(index):
    from .triton import LAUNCH_OVERRIDES

    LAUNCH_OVERRIDES.update(json.loads(os.environ.get(_OVERRIDES_ENV, "{}")))
    shape, dtype, gated = LAB_CASES[index]
    print(json.dumps(check_accuracy(shape, dtype, seed=20 + index, gated=gated)))
    return 0


def check_token_reference(shape, dtype, seed):
    """The triton forward against the token-by-token float64 reference (forward only: the loop is slow)."""
    batch, seq_len, heads, key_dim, value_dim = shape
    inputs = round_to(make_inputs(batch, seq_len, heads, key_dim, value_dim, seed), dtype)
    args = [inputs[n] for n in ("q", "k", "v", "g", "alpha")]
    with torch.no_grad():
        ref = gka(*args, backend="reference")
        out = gka(*[x.to(dtype) if i < 3 else x.float() for i, x in enumerate(args)], backend="triton")
    err = rel_err(out, ref)
    return {"check": "token-reference", "shape": "x".join(map(str, shape)), "dtype": str(dtype).split(".")[-1],
            "errors": {"o": err}, "ok": err < TOL[dtype]["fwd"]}


def check_extremes(seq_len=32768, heads=2, dim=128):
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(5)
    for case in ("decay-1", "decay-1e-13", "zero-keys", "zero-key-prefix+decay-1"):
        q = F.normalize(torch.randn(1, seq_len, heads, dim, device="cuda", generator=gen), dim=-1)
        k = F.normalize(torch.randn(1, seq_len, heads, dim, device="cuda", generator=gen), dim=-1)
        v = torch.randn(1, seq_len, heads, dim, device="cuda", generator=gen)
        g = torch.zeros(1, seq_len, heads, device="cuda")
        if case == "decay-1e-13":
            g.fill_(-30.0)
        if case == "zero-keys":
            k.zero_()
        if case == "zero-key-prefix+decay-1":
            k[:, :1000] = 0
            k[:, ::3] = 0
        alpha = torch.rand(1, seq_len, heads, device="cuda", generator=gen)
        leaves = [x.to(torch.bfloat16) if i < 3 else x for i, x in enumerate((q, k, v, g, alpha))]
        leaves = [x.requires_grad_() for x in leaves]
        o = gka(*leaves, backend="triton")
        grads = torch.autograd.grad(o.float().square().mean(), leaves)
        finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(x).all()) for x in grads)
        rows.append({"check": "extreme", "shape": f"1x{seq_len}x{heads}x{dim}", "dtype": "bfloat16",
                     "case": case, "finite": finite, "ok": finite})
    return rows


def smoke_name(mixer: str) -> str:
    return "mixer-smoke" if mixer == "gka" else f"{mixer}-smoke"


def check_mixer_smoke(mixer="gka", steps=3):
    """3 AdamW steps of a 2-layer gka (or mesanet: CG) LM on random tokens, bf16 autocast, backend "auto"."""
    from kernels.gka import triton as gka_triton
    from lab.models import build_model
    from lab.models.gka import GKAConfig
    from lab.models.mesanet import MesaNetConfig

    calls = {"n": 0}
    original = gka_triton.triton_gka

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    gka_triton.triton_gka = counted
    try:
        torch.manual_seed(0)
        cfg = (GKAConfig if mixer == "gka" else MesaNetConfig)(d_model=256, num_layers=2, num_heads=2)
        model = build_model(cfg, vocab_size=512).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, 512, (4, 1025), device="cuda")
        losses = []
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, 512), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
            opt.step()
            losses.append(loss.item())
    finally:
        gka_triton.triton_gka = original
    ok = grads_finite and all(math.isfinite(x) and abs(x) < 1e4 for x in losses) and calls["n"] >= steps * 2
    return {"check": smoke_name(mixer), "losses": losses, "triton_calls": calls["n"], "grads_finite": grads_finite,
            "ok": ok}


def gka_checks(quick):
    """GKA's own solve: accuracy at real and lab shapes, the token-by-token reference, and (unless quick) extremes."""
    results = []
    shapes = [(2, 2048, 4, 128, 128), (1, 1000, 2, 96, 80)] if not quick else [(1, 1000, 2, 96, 80)]
    for dtype in (torch.float32, torch.bfloat16):
        for i, shape in enumerate(shapes):
            results.append(check_accuracy(shape, dtype, seed=10 + i, initial_state=i == 1))
    results.append(check_accuracy((2, 2048, 4, 128, 128), torch.float32, seed=3, num_iter=10))
    results.append(check_accuracy((1, 1000, 2, 96, 80), torch.float16, seed=13, initial_state=True))
    results.extend(check_isolated(i) for i in range(len(LAB_CASES) if not quick else 2))
    results.append(check_token_reference((1, 512, 2, 128, 128), torch.float32, seed=4))
    results.append(check_token_reference((1, 512, 2, 128, 128), torch.bfloat16, seed=4))
    if not quick:
        results.extend(check_extremes())
    return results


def cg_checks(whole_batch):
    """MesaNet's CG (kernels.mesa runs on these kernels on a GPU) at its mqar_paper head dims, and fp32;
    whole_batch adds a whole mqar_paper batch at its largest head dim."""
    results = [check_accuracy((1, 1000, 2, 96, 80), torch.float32, seed=17, initial_state=True, cg=True)]
    cg_shapes = [(8, 300, 2, 64, 64), (8, 300, 2, 128, 128), (64, 128, 2, 16, 16)]
    if whole_batch:
        cg_shapes.append((256, 512, 2, 128, 128))
    results.extend(check_accuracy(shape, torch.bfloat16, seed=19, cg=True) for shape in cg_shapes)
    return results


def smoke_checks():
    results = []
    for mixer in ("gka", "mesanet"):
        try:
            results.append(check_mixer_smoke(mixer))
        except ImportError as error:  # lab needs omegaconf
            results.append({"check": smoke_name(mixer), "ok": False, "error": repr(error)})
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    cg_only = "--cg" in argv
    torch.backends.cuda.matmul.allow_tf32 = False  # the float64 reference doesn't care; keep torch exact
    if "--case" in argv:
        return run_case(int(argv[argv.index("--case") + 1]))
    start = time.time()
    results = ([] if cg_only else gka_checks(quick)) + cg_checks(whole_batch=cg_only) + smoke_checks()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.time() - start}
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"# gka triton gpu_check, {meta['device']}, {meta['date']}")
    for r in results:
        errs = " ".join(f"{k}={v:.1e}" for k, v in r.get("errors", {}).items())
        extra = r.get("case") or (f"losses={[round(x, 3) for x in r['losses']]} calls={r['triton_calls']}"
                                  if "losses" in r else r.get("error", ""))
        print(f"{'OK ' if r['ok'] else 'BAD'} {r['check']:<15} {r.get('shape', ''):<18} {r.get('dtype', ''):<8} "
              f"r={r.get('num_iter', '')} {extra} {errs}")
    for r in results:
        if "stderr" in r:
            print(f"--- {r['check']} {r['shape']} {r['dtype']}: stderr (last 4000 characters)\n{r['stderr']}")
            break
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
