"""gka backend="triton" under the Triton interpreter (TRITON_INTERPRET=1, set in conftest), fp32 on CPU: the
same kernels that run on the GPU, against the float64 token-by-token reference.

Forward within 1e-4 relative; gradients within 1e-2 of autograd through the reference's unrolled Chebyshev
iteration. The triton backward is implicit differentiation (the exact solve's gradient), so it matches
the unrolled one only once the iteration has converged: at num_iter = 30 dH_0 is off by ~1e-2 (checked
at 60 iterations instead), and dq matches at any num_iter (x is a fixed polynomial of A times q). Against
the torch path's implicit backward (the same mathematics) everything agrees to 1e-4 at any num_iter.
Shapes stay tiny (T <= 130, D <= 33): the interpreter runs every op through numpy.
"""

import warnings
import zlib

import pytest
import torch
from test_kernels_gka import make_inputs as gka_inputs

from kernels import gka
from kernels.gka import triton as gka_triton

pytestmark = pytest.mark.usefixtures("single_thread")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(seed, seq_len, *, batch=1, heads=2, key_dim=20, value_dim=24, **options):
    """The float64 inputs of the torch-path tests, at the interpreter's small default sizes."""
    inputs = gka_inputs(seed, seq_len, batch=batch, heads=heads, key_dim=key_dim, value_dim=value_dim,
                        reset_frac=0.1, no_decay_frac=0.2, past_tokens=6, **options)
    return {name: None if x is None else x.detach() for name, x in inputs.items()}  # plain tensors to edit


def outputs_and_grads(inputs, dtype, **kwargs):
    """o, H_T, U_T and the grads of a random projection of all three w.r.t. every input, computed in dtype
    (None: as given)."""
    leaves = {n: x.detach().to(dtype or x.dtype).requires_grad_() for n, x in inputs.items() if x is not None}
    state = (leaves["H_0"], leaves["U_0"]) if "H_0" in leaves else None
    o, (key_cov, value_key) = gka(
        leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves.get("alpha"),
        initial_state=state, output_final_state=True, **kwargs,
    )
    gen = torch.Generator().manual_seed(1234)
    loss = sum((x.double() * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum()
               for x in (o, key_cov, value_key))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "H_T": key_cov, "U_T": value_key, **{f"d{n}": g for n, g in zip(leaves, grads, strict=True)}}


CASES = {
    # name: (seq_len, make_inputs options, gka options, grads to skip at the 1e-2 tolerance)
    "cheb30-state-chunk32": (100, {"initial_state": True}, {"num_iter": 30, "chunk_size": 32}, {"dH_0"}),
    "cheb30-T-odd-chunk64": (130, {"key_dim": 33, "value_dim": 17}, {"num_iter": 30}, set()),
    "cheb30-batch2-D16": (45, {"batch": 2, "key_dim": 16, "value_dim": 16, "initial_state": True},
                          {"num_iter": 30, "chunk_size": 16}, {"dH_0"}),
    "cheb30-no-gate-no-alpha": (70, {"gates": None, "alpha": False}, {"num_iter": 30, "chunk_size": 16}, set()),
    "cheb30-constant-ridge": (
        90, {"initial_state": True}, {"num_iter": 30, "ridge_mode": "constant", "ridge_ratio": 0.25,
                                      "chunk_size": 32}, set(),
    ),
    "cheb60-state": (70, {"initial_state": True, "key_dim": 16, "value_dim": 16},
                     {"num_iter": 60, "chunk_size": 32}, set()),
    "cheb30-T=1": (1, {"initial_state": True}, {"num_iter": 30}, {"dH_0"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case):
    seq_len, input_options, options, skip = CASES[case]
    inputs = make_inputs(zlib.crc32(case.encode()), seq_len, **input_options)
    fast = outputs_and_grads(inputs, torch.float32, backend="triton", **options)
    slow = outputs_and_grads(inputs, torch.float64, backend="reference", **options)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.isfinite(fast[name]).all(), name
        if name in ("o", "H_T", "U_T"):
            assert fast[name].dtype == torch.float32
            assert rel_err(fast[name], slow[name]) < 1e-4, name
        elif name not in skip:
            assert rel_err(fast[name], slow[name]) < 1e-2, name
    if "dH_0" in skip:  # the implicit dH_0 at 30 steps: ~1e-2 from the unrolled one, 1e-5 at 60 (cheb60)
        assert rel_err(fast["dH_0"], slow["dH_0"]) < 5e-2


@pytest.mark.parametrize("num_iter", [0, 5, 30])
def test_triton_matches_torch_implicit_backward(num_iter):
    # The torch path's implicit_backward (the default) is the same mathematics by autograd through one
    # matvec: every output and gradient agrees at any num_iter, dH_0 included.
    inputs = make_inputs(31 + num_iter, 70, initial_state=True)
    fast = outputs_and_grads(inputs, torch.float32, backend="triton", num_iter=num_iter, chunk_size=32)
    slow = outputs_and_grads(inputs, torch.float64, backend="torch", num_iter=num_iter, chunk_size=32)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert rel_err(fast[name], slow[name]) < 1e-4, name


CG_CASES = {
    # name: (seq_len, make_inputs options, gka options)
    "cg30-state-chunk32": (100, {"initial_state": True}, {"num_iter": 30, "chunk_size": 32}),
    "cg5-T-odd-chunk64": (130, {"key_dim": 33, "value_dim": 17}, {"num_iter": 5}),
    "cg30-batch2-D16-constant": (45, {"batch": 2, "key_dim": 16, "value_dim": 16, "initial_state": True},
                                 {"num_iter": 30, "chunk_size": 16, "ridge_mode": "constant", "ridge_ratio": 1.0}),
    "cg1-no-gate-no-alpha": (70, {"gates": None, "alpha": False}, {"num_iter": 1, "chunk_size": 16}),
}


@pytest.mark.parametrize("case", list(CG_CASES))
def test_cg_matches_torch_implicit_backward_and_reference(case):
    # solver="cg" (MesaNet's): the Triton kernels against the float64 torch path with its implicit backward (the
    # same mathematics: a second CG solve), every output and gradient; the forward against the reference.
    seq_len, input_options, options = CG_CASES[case]
    inputs = make_inputs(zlib.crc32(case.encode()), seq_len, **input_options)
    fast = outputs_and_grads(inputs, torch.float32, backend="triton", solver="cg", **options)
    slow = outputs_and_grads(inputs, torch.float64, backend="torch", solver="cg", **options)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.isfinite(fast[name]).all(), name
        assert rel_err(fast[name], slow[name]) < 1e-4, name
    options.pop("chunk_size", None)
    reference = outputs_and_grads(inputs, torch.float64, backend="reference", solver="cg", **options)
    for name in ("o", "H_T", "U_T"):
        assert rel_err(fast[name], reference[name]) < 1e-4, name


@pytest.mark.parametrize("num_iter", [0, 1, 64])
def test_any_num_iter_forward_and_dq(num_iter):
    # Forward is the same polynomial for every num_iter; so is dq = p(A) dx. dk, dv, dg are the implicit
    # ones (exact-solve gradients), compared only for finiteness below 30 steps.
    inputs = make_inputs(7 + num_iter, 50, heads=1, alpha=False)
    fast = outputs_and_grads(inputs, torch.float32, backend="triton", num_iter=num_iter, chunk_size=16)
    slow = outputs_and_grads(inputs, torch.float64, backend="reference", num_iter=num_iter)
    for name in ("o", "H_T", "U_T", "dq", "dv"):
        assert rel_err(fast[name], slow[name]) < 1e-4, name
    for name in fast:
        assert torch.isfinite(fast[name]).all(), name
    if num_iter == 64:
        for name in ("dk", "dg"):
            assert rel_err(fast[name], slow[name]) < 1e-4, name


def test_state_carries_across_calls():
    inputs = make_inputs(11, 80, heads=1, initial_state=True)
    names = ("q", "k", "v", "g", "alpha")
    args = [inputs[n].float() for n in names]
    state = (inputs["H_0"].float(), inputs["U_0"].float())
    full, full_state = gka(*args, initial_state=state, output_final_state=True, backend="triton", chunk_size=16)
    split = 37  # not chunk aligned
    first, mid_state = gka(*[x[:, :split] for x in args], initial_state=state, output_final_state=True,
                           backend="triton", chunk_size=16)
    second, end_state = gka(*[x[:, split:] for x in args], initial_state=mid_state, output_final_state=True,
                            backend="triton", chunk_size=16)
    assert rel_err(torch.cat([first, second], dim=1), full) < 1e-5
    for a, b in zip(end_state, full_state, strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("g_value", [0.0, -30.0])
def test_zero_keys_and_extreme_gates_stay_finite(g_value):
    # g = 0: H_t only grows; g = -30: H decays to ~1e-13 between keys and ||H|| hits the 1e-6 floor;
    # zero keys leave H = 0 exactly (lam = 2e-8). The torch path follows the same conventions.
    inputs = make_inputs(13, 96, heads=1, key_dim=16, value_dim=16, gates=None)
    inputs["k"][:, :20] = 0
    inputs["k"][:, ::3] = 0
    inputs["g"] = torch.full((1, 96, 1), g_value, dtype=torch.float64)
    fast = outputs_and_grads(inputs, torch.float32, backend="triton", chunk_size=32)
    slow = outputs_and_grads(inputs, torch.float64, backend="torch", chunk_size=32)
    for name in fast:
        assert torch.isfinite(fast[name]).all(), name
    assert rel_err(fast["o"], slow["o"]) < 1e-4


def test_all_zero_keys_give_zero_output():
    inputs = make_inputs(5, 40, heads=1, key_dim=16, value_dim=16)
    inputs["k"].zero_()
    fast = outputs_and_grads(inputs, torch.float32, backend="triton", chunk_size=16)
    assert torch.equal(fast["o"], torch.zeros_like(fast["o"]))
    for name in fast:
        assert torch.isfinite(fast[name]).all(), name


def test_dispatch():
    q = torch.randn(1, 8, 1, 16)
    k = torch.nn.functional.normalize(torch.randn(1, 8, 1, 16), dim=-1)
    v = torch.randn(1, 8, 1, 16)
    with pytest.warns(UserWarning, match="backend='triton' does not take solver='exact'"):
        exact = gka(q, k, v, solver="exact", backend="triton")
    assert torch.allclose(exact, gka(q, k, v, solver="exact", backend="torch"))
    with pytest.warns(UserWarning, match="chunk_size=48"):
        gka(q, k, v, chunk_size=48, backend="triton")
    with pytest.warns(UserWarning, match="implicit_backward=False"):
        gka(q, k, v, implicit_backward=False, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" on CPU tensors is the torch path, silently
        assert torch.equal(gka(q, k, v, backend="auto"), gka(q, k, v, backend="torch"))


@pytest.mark.parametrize("low_states", [False, True])
def test_fp16_low_precision_path(low_states, monkeypatch):
    # fp16 inputs take the GPU's low-precision path (the solver's steps rounded to the input dtype in residual
    # form, the readout's qt as hi + lo parts, dx and y stored in fp16; optionally the chunk states in fp16);
    # the interpreter's fp16 dot is exact enough to check it.
    monkeypatch.setitem(gka_triton.LAUNCH_OVERRIDES, "low_states", low_states)
    inputs = make_inputs(21, 100, heads=1, key_dim=32, value_dim=32)
    inputs = {n: None if x is None else x.half().double() if n in ("q", "k", "v") else x for n, x in inputs.items()}
    leaves = {n: x for n, x in inputs.items() if x is not None}
    fast = outputs_and_grads({n: x.half() if n in ("q", "k", "v") else x.float() for n, x in leaves.items()}
                             | {"H_0": None, "U_0": None}, None, backend="triton", chunk_size=32)
    slow = outputs_and_grads(inputs, torch.float64, backend="reference")
    assert fast["o"].dtype == torch.float16 and fast["dq"].dtype == torch.float16
    for name in ("o", "dq", "dk", "dv", "dg", "dalpha"):
        assert rel_err(fast[name], slow[name]) < 1e-2, name


def test_vmap_folds_members_into_the_batch():
    """Stacked models (lab/stacked.py) vmap the op: each member's output and grads are what it gets alone."""
    from torch.func import vmap

    members = [make_inputs(seed, 40, initial_state=True, key_dim=16, value_dim=16) for seed in (3, 4)]
    names = [n for n in ("q", "k", "v", "g", "alpha", "H_0", "U_0") if members[0].get(n) is not None]
    stacked = {n: torch.stack([m[n] for m in members]).float().requires_grad_() for n in names}
    options = {"num_iter": 30, "chunk_size": 16, "backend": "triton"}

    def op(q, k, v, g, alpha, h0, u0):
        o, (key_cov, value_key) = gka(q, k, v, g, alpha, initial_state=(h0, u0), output_final_state=True, **options)
        return o, key_cov, value_key

    outputs = vmap(op)(*(stacked[n] for n in names))
    weights = [torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) for x in outputs]
    sum((x * w).sum() for x, w in zip(outputs, weights, strict=True)).backward()
    for index, member in enumerate(members):
        alone = {n: member[n].float().requires_grad_() for n in names}
        own = op(*(alone[n] for n in names))
        sum((x * w[index]).sum() for x, w in zip(own, weights, strict=True)).backward()
        for got, want in zip(outputs, own, strict=True):
            assert rel_err(got[index], want) < 1e-6
        for n in names:
            assert rel_err(stacked[n].grad[index], alone[n].grad) < 1e-6, n


@pytest.mark.parametrize("gated", [True, False])
def test_torch_compile_keeps_one_graph(gated):
    """The Triton op is a torch.library custom op: Dynamo traces through it (fullgraph, no graph break), alone and
    stacked under vmap, with eager's outputs and gradients; opcheck checks its schema, fake and autograd rules."""
    from kernels.gka.triton import _gka_chunk

    ungated = {} if gated else {"gates": None, "alpha": False}
    # one head, two chunks (the last one partial): every call runs the interpreter, and opcheck makes many
    inputs = make_inputs(17, 21, heads=1, initial_state=True, key_dim=16, value_dim=12, **ungated)
    names = [n for n in ("q", "k", "v", "g", "alpha", "H_0", "U_0") if inputs.get(n) is not None]
    args = [inputs[n].float() for n in names]
    options = {"num_iter": 4, "chunk_size": 16, "backend": "triton"}
    qkv = [a.clone().requires_grad_() for a in args[:3]]
    gates = args[3:5] if gated else [None, None]
    torch.library.opcheck(_gka_chunk, (*qkv, *gates, *args[-2:], 0.02, True, False, 4, 0.25, 16))

    def layer(q, k, v, *rest):
        g, alpha = rest[:2] if gated else (None, None)
        o, (key_cov, _) = gka(q * 1.5, k, v, g, alpha, initial_state=tuple(rest[-2:]), output_final_state=True,
                              **options)
        return o.sin(), key_cov

    stacked = [torch.stack([a, a.flip(0) * 0.5]) for a in args]  # two members, each its own batch
    for fn, call_args in ((layer, args), (torch.vmap(layer), stacked)):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        results = []
        for run in (compiled, fn):
            leaves = [a.clone().requires_grad_() for a in call_args]
            o, key_cov = run(*leaves)
            results.append((o, key_cov, *torch.autograd.grad(o.square().sum() + key_cov.sum(), leaves)))
        for got, want in zip(*results, strict=True):
            assert rel_err(got, want) < 1e-6


def test_inductor_compiles_conv_and_gka_around_the_ops():
    """trainer.compile's backend (Inductor) on a short conv feeding GKA, alone and stacked under vmap: both custom
    ops stay opaque calls inside one generated graph (fullgraph), with eager's values and gradients."""
    from kernels import short_conv

    inputs = make_inputs(23, 21, heads=1, key_dim=16, value_dim=16)  # two chunks, the last one partial
    q, k, v, g, alpha = (inputs[n].float() for n in ("q", "k", "v", "g", "alpha"))
    weight = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))

    def layer(q, k, v, g, alpha, weight):
        mixed = short_conv(v.flatten(2), weight, backend="triton").unflatten(2, v.shape[2:])
        return gka(q * 1.1, k, mixed, g, alpha, backend="triton", num_iter=4, chunk_size=16).square().sum()

    scales = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1, 1)
    stacked = (*(t.expand(3, *t.shape) for t in (q, k)), v * scales, *(t.expand(3, *t.shape) for t in (g, alpha)))
    for fn, args in ((layer, (q, k, v, g, alpha, weight)),
                     (torch.vmap(layer, in_dims=(0, 0, 0, 0, 0, None)), (*stacked, weight))):
        torch._dynamo.reset()
        results = []
        for run in (torch.compile(fn, fullgraph=True), fn):
            leaves = [a.clone().requires_grad_() for a in args]
            out = run(*leaves)
            results.append((out, *torch.autograd.grad(out.sum(), leaves)))
        for got, want in zip(*results, strict=True):
            assert rel_err(got, want) < 1e-5


LAUNCH_VARIANTS = {
    # launch settings the GPU may run (kernels/gka/triton/__init__.py, _launch_config): each must give the default's
    # outputs and grads. Small scan tiles: several element blocks and several groups of chunks per scan.
    "scan-tiles": {"scan_block": 128, "scan_depth": 2},
    "carry-direct": {"carry_partials": False, "scan_block": 256, "scan_depth": 2},
    # column halves (the GPU takes them from 128-wide blocks on): with the v11 solver, and with v10's halves solver
    "halves": {"halves_from": 32, "contrib_halves": True},
    "v10-solver-halves": {"solver_fold": False, "contrib_halves": False, "halves_from": 32},
}


@pytest.mark.parametrize("variant", list(LAUNCH_VARIANTS))
def test_launch_variants_agree(variant, monkeypatch):
    inputs = make_inputs(41, 100, heads=1, key_dim=33, value_dim=40, initial_state=True)
    options = {"backend": "triton", "num_iter": 30, "chunk_size": 32}
    base = outputs_and_grads(inputs, torch.float32, **options)
    for key, value in LAUNCH_VARIANTS[variant].items():
        monkeypatch.setitem(gka_triton.LAUNCH_OVERRIDES, key, value)
    other = outputs_and_grads(inputs, torch.float32, **options)
    for name in base:
        assert rel_err(other[name], base[name]) < 1e-5, name
