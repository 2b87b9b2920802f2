"""Triton backend of `kernels.gka`: chunk-wise forward and implicit-differentiation backward (GKA.md).

`triton_gka` has the contract of `chunk_gka` for solver="chebyshev" or "cg" and q, k, v in fp32, fp16 or
bf16 (fp32 accumulation and state). The backward stores no iterates: it keeps the solution x [B, T, H, Dk]
(fp32), the per-token norms ||H_t||_F and the chunk-start states, and runs a second solve (the forward's
solver) on the incoming gradient. For Chebyshev the gradient with respect to q is exact for any num_iter
(x is a fixed polynomial of A times q); the gradient through H_t and lam_t is that of the exact solve, so it
matches autograd through the unrolled iteration once the iteration has converged (num_iter ~ 30 for
ridge_ratio = 0.02), not for a handful of steps. CG (MesaNet's solver, kernels.mesa) gets the same implicit
gradient as the torch path's implicit_backward: exact once CG has converged.

Under CUDA autocast, q, k and v are cast to the autocast dtype (F.normalize hands fp32 q, k to a bf16
layer there), so a mixer trained with bf16 autocast runs the bf16 kernels.

Files: kernels.py (the kernels), NOTES.md (versions, measurements, predictions), profile.py (per-kernel
times), sweep.py (named launch-setting sets side by side, with registers and spills), run_all.py (a race
of setting sets + gpu_check + bench in one device call),
_compile_check.py (sm_90a compile and ptxas register report on a machine without a GPU). Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors (fp32 and fp16: the interpreter's bf16 dot is
wrong).
"""

import torch
import triton

from ...common import fold_members, interpreting
from . import kernels as K

# Dot precision for fp32 inputs on the GPU ("tf32", "tf32x3" or "ieee"); fp16/bf16 use their own dtype.
# Plain tf32 left o 3e-3 from float64 at 2 x 2048 x 4 x 128 (H200); fp32 is the accuracy path, so x3.
FP32_DOT_PRECISION = "tf32x3"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOLVERS = ("chebyshev", "cg")
MAX_HEAD_DIM = 128
CHUNK_SIZES = (16, 32, 64)
FP32_CHUNK_SIZE = 32  # the chunk the GPU kernels use for fp32 inputs (see triton_gka)
# Launch settings that replace _launch_config's choices (for tuning runs; empty in normal use).
LAUNCH_OVERRIDES: dict = {}


def unsupported_reason(q, v, *, solver, chunk_size) -> str | None:
    """Why the triton backend can't take these arguments (None if it can)."""
    batch, seq_len, heads, key_dim = q.shape
    if q.numel() == 0 or v.numel() == 0:
        return "empty tensors"
    chunks = triton.cdiv(seq_len, min(chunk_size, FP32_CHUNK_SIZE)) if chunk_size else 0
    state_numel = batch * heads * chunks * key_dim * max(key_dim, v.shape[-1])
    if max(q.numel(), v.numel(), state_numel) >= 2**31:
        return "tensors of 2**31 elements or more (the kernels index with int32)"
    if solver not in SOLVERS:
        return f"solver={solver!r} (the triton backend runs {' and '.join(SOLVERS)})"
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size={chunk_size} (the triton backend takes {CHUNK_SIZES})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the triton backend takes fp32, fp16, bf16)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    if not (q.is_cuda or interpreting()):
        return "CPU tensors (set TRITON_INTERPRET=1 to run the kernels through the interpreter)"
    return None


def _block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Launch settings (warps per kernel, scan tiling, storage dtypes). Chosen from H200 profiles at
    4 x 8192 x 8 x 128 and 1 x 32768 x 8 x 128 bf16 (NOTES.md, run_all.py); LAUNCH_OVERRIDES replaces any.
    """
    low = dtype != torch.float32
    cfg = {
        # low_states: chunk states and the backward's state buffers in the input dtype (every consumer casts
        # them to it for the products anyway; the scans accumulate in fp32 registers): 12.7 vs 14.0 ms (v5).
        "low_states": low,
        # bwd_lean: the second solve's right-hand side dx and its solution y stored in the input dtype
        "bwd_lean": low,
        # read_split: the forward readout's qt as bf16 hi + lo operands (o 9.6e-3 -> 4.3e-3 from float64, v6)
        "read_split": low,
        # run_all's sweep on the H200 (2026-11-30 04:38 UTC, v9): the fastest per kernel group at 4x8192x8x128
        "scan_block": 1024, "scan_depth": 16, "scan_elem_warps": 4, "contrib_warps": 4,
        "readout_warps": 4, "readout2_warps": 4, "grads_warps": 4, "grads2_warps": 4,
        # v10 (run_all 2026-11-30 04:54 UTC): the carry's <Z, H0> + <dU, U0> as partial sums from the backward
        # scan: carry 0.469 -> 0.368 ms, scans 0.288 -> 0.364 (they write the sums), -0.025 ms at 4x8192x8x128
        "carry_partials": True,
        # v11 (run_all 2026-11-30 07:02 UTC): the solver loops on full-width tiles with E folded into the H0
        # product's operand, both products accumulating into the residual (kernels._fold_step): three wgmma
        # groups a step instead of eight; fwd chunk 1.588 -> 1.245 ms, bwd solve 1.287 -> 1.116 at 4x8192x8x128
        "solver_fold": True,
        # [C, D] tiles in column halves from this block width on (_halves)
        "halves_from": 128,
        # v11 (same run): _chunk_contrib's products in row halves (ptxas: 220 -> 158 registers at 4 warps, three
        # CTAs per SM instead of two): 0.137 -> 0.118 ms
        "contrib_halves": True,
    }
    if interpreting():
        cfg |= {"fwd_warps": 4, "bwd_warps": 4, "carry_warps": 4}
    else:
        cfg |= {
            "fwd_warps": 4 if low else 8,  # fp32 (tf32x3): 4 warps spill heavily (ptxas); bf16 at 8: 1.9x slower (v9)
            "bwd_warps": 4 if low else 8,
            "carry_warps": 8 if head_dim > 64 else 4,  # 4 warps: 2.3x slower at D = 128 (v6)
        }
    return cfg | LAUNCH_OVERRIDES


def _scan_blocks(cfg: dict, key_dim: int, value_dim: int) -> tuple[int, int]:
    """(elements a program, programs a (batch, head)) of kernels._state_scan_elem."""
    block = min(cfg["scan_block"], triton.next_power_of_2(key_dim * max(key_dim, value_dim)))
    return block, triton.cdiv(key_dim**2, block) + triton.cdiv(value_dim * key_dim, block)


def _scan_elem(h_buf, u_buf, decay, h_init, u_init, h_out, u_out, cfg, reverse, partial=None, states=None):
    """kernels._state_scan_elem over the [B, H, N, rows, Dk] buffers (in place), H's and U's in one launch;
    decay: _chunk_contrib's e^{G_last} per chunk (None without gates); partial, states: PARTIALS' buffer and the
    forward's (h_states, u_states)."""
    batch, heads, num_chunks, key_dim = h_buf.shape[:4]
    value_dim = u_buf.shape[3]
    block, blocks = _scan_blocks(cfg, key_dim, value_dim)
    h_states, u_states = (h_out, h_out) if states is None else states
    K._state_scan_elem[(blocks, batch * heads)](
        h_buf, u_buf, h_out if decay is None else decay, h_out if h_init is None else h_init,
        u_out if u_init is None else u_init, h_out, u_out, h_states, u_states, h_out if partial is None else partial,
        num_chunks, key_dim, value_dim,
        HAS_G=decay is not None, HAS_INIT=h_init is not None, REVERSE=reverse, BLOCK=block,
        DEPTH=cfg["scan_depth"], INTERPRET=interpreting(), PARTIALS=partial is not None,
        num_warps=cfg["scan_elem_warps"],
    )


def _halves(block_dim: int, cfg: dict) -> bool:
    """Whether the kernels split [C, D] tiles into column halves (halves narrower than 16 can't be dot operands).
    From 128-wide blocks only (cfg["halves_from"]), where whole tiles spill: at 32 and 64 in bf16 with 64-token
    chunks the backward's halves came out wrong on the H200 (NaN dq at D = 32, an illegal address in
    _gka_bwd_readout at D = 64; gpu_check's lab cases, 2026-11-30 07:17 UTC), while whole tiles passed and fit there anyway. The
    interpreter tests still run the halves at small widths (halves_from = 32)."""
    return block_dim >= max(32, cfg["halves_from"])


def _dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def _operands(q, k, v, g, alpha):
    """The kernels' operands: q, k, v contiguous in q's dtype, the gates in fp32 (None stays None)."""
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    g32 = None if g is None else g.float().contiguous()
    a32 = None if alpha is None else alpha.float().contiguous()
    return q.contiguous(), k, v, g32, a32


def _forward_outputs(q, v, has_g, chunk_size, cfg):
    """The forward's outputs, unwritten: o, the final states, and what the backward reads (the chunk-start
    states, the solution x, the norms, the stats, e^{G_last} per chunk: [0] without gates). The fake
    (torch.compile's shape pass) is this alone."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    num_chunks = triton.cdiv(seq_len, chunk_size)
    f32 = {"device": q.device, "dtype": torch.float32}
    state_dtype = q.dtype if cfg["low_states"] else torch.float32
    o = torch.empty(batch, seq_len, heads, value_dim, device=q.device, dtype=q.dtype)
    h_final = torch.empty(batch, heads, key_dim, key_dim, **f32)
    u_final = torch.empty(batch, heads, value_dim, key_dim, **f32)
    h_states = torch.empty(batch, heads, num_chunks, key_dim, key_dim, device=q.device, dtype=state_dtype)
    u_states = torch.empty(batch, heads, num_chunks, value_dim, key_dim, device=q.device, dtype=state_dtype)
    x = torch.empty(batch, seq_len, heads, key_dim, **f32)
    norm = torch.empty(batch, heads, num_chunks * chunk_size, **f32)
    # per token k^T H0 k and per chunk ||H0||^2 (forward), then w and H0's coefficient (_gka_bwd_grads)
    stats = torch.empty(batch, heads, 2 * (num_chunks * chunk_size + num_chunks), **f32)
    decay = torch.empty(batch, heads, num_chunks if has_g else 0, **f32)
    return o, h_final, u_final, h_states, u_states, x, norm, stats, decay


# The op as torch.library custom ops (not an autograd.Function behind torch.compiler.disable): torch.compile
# keeps them in its graph as calls it does not look into, so a compiled GKA layer is one graph, not three.
@torch.library.custom_op("lab::gka_chunk", mutates_args=())
def _gka_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
               alpha: torch.Tensor | None, h0: torch.Tensor | None, u0: torch.Tensor | None, ridge: float,
               adaptive: bool, cg: bool, num_iter: int, scale: float, chunk_size: int) -> list[torch.Tensor]:
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    cfg = _launch_config(max(key_dim, value_dim), q.dtype)
    outputs = _forward_outputs(q, v, g is not None, chunk_size, cfg)
    o, h_final, u_final, h_states, u_states, x, norm, stats, decay = outputs
    q, k, v, g32, a32 = _operands(q, k, v, g, alpha)
    h0_32 = None if h0 is None else h0.float().contiguous()
    u0_32 = None if u0 is None else u0.float().contiguous()
    num_chunks = h_states.shape[2]
    low = q.dtype != torch.float32
    bd, bdv = _block(key_dim), _block(value_dim)
    prec = _dot_precision(q.dtype)
    dummy = x  # stands in for absent optional tensors (never read: the HAS_* flags are off)

    # chunk-parallel contributions (and e^{G_last} per chunk), then an elementwise scan over the chunks
    decay = decay if g32 is not None else None
    K._chunk_contrib[(num_chunks, batch * heads)](
        k, v, dummy if g32 is None else g32, h_states, u_states, dummy if decay is None else decay,
        seq_len, heads, num_chunks, key_dim, value_dim,
        HAS_G=g32 is not None, C=chunk_size, BD=bd, BDV=bdv, DOT_PREC=prec,
        HALVES=cfg["contrib_halves"] and _halves(bd, cfg) and _halves(bdv, cfg), num_warps=cfg["contrib_warps"],
    )
    _scan_elem(h_states, u_states, decay, h0_32, u0_32, h_final, u_final, cfg, reverse=False)
    K._gka_fwd_chunk[(num_chunks, batch * heads)](
        q, k, v, dummy if g32 is None else g32, dummy if a32 is None else a32,
        h_states, u_states, x, o, norm, stats,
        seq_len, heads, num_chunks, key_dim, value_dim, float(scale), float(ridge), int(num_iter),
        ADAPTIVE=adaptive, HAS_G=g32 is not None, HAS_ALPHA=a32 is not None,
        C=chunk_size, BD=bd, BDV=bdv, DOT_PREC=prec, INTERPRET=interpreting(),
        HALVES=_halves(bd, cfg) and not cfg["solver_fold"] and not cg, READ_SPLIT=cfg["read_split"] and low,
        FOLD=cfg["solver_fold"], CG=cg, num_warps=cfg["fwd_warps"],
    )
    return list(outputs)


@_gka_chunk.register_fake
def _(q, k, v, g, alpha, h0, u0, ridge, adaptive, cg, num_iter, scale, chunk_size):
    cfg = _launch_config(max(q.shape[-1], v.shape[-1]), q.dtype)
    return list(_forward_outputs(q, v, g is not None, chunk_size, cfg))


@torch.library.custom_op("lab::gka_chunk_backward", mutates_args=())
def _gka_chunk_backward(do: torch.Tensor | None, dh_final: torch.Tensor | None, du_final: torch.Tensor | None,
                        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                        alpha: torch.Tensor | None, h_states: torch.Tensor, u_states: torch.Tensor, x: torch.Tensor,
                        norm: torch.Tensor, stats: torch.Tensor, decay: torch.Tensor, ridge: float, adaptive: bool,
                        cg: bool, num_iter: int, scale: float, chunk_size: int) -> list[torch.Tensor]:
    """dq, dk, dv (q's dtype), dg, dalpha (their inputs' dtypes; [0] where absent), dh0, du0 (fp32)."""
    q, k, v, g32, a32 = _operands(q, k, v, g, alpha)
    decay = decay if g32 is not None else None
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    num_chunks = h_states.shape[2]
    if do is None:
        do = torch.zeros_like(v)
    do = do.to(q.dtype).contiguous()
    f32 = {"device": q.device, "dtype": torch.float32}
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dk_part = torch.empty(batch, seq_len, heads, key_dim, **f32)
    dv_part = torch.empty(batch, seq_len, heads, value_dim, **f32)
    dG_part = torch.empty(batch, heads, num_chunks * chunk_size, **f32)
    dalpha = torch.empty(batch, seq_len, heads, **f32) if a32 is not None else None
    dg = torch.empty(batch, seq_len, heads, **f32) if g32 is not None else None
    dh_buf = torch.empty_like(h_states)
    du_buf = torch.empty_like(u_states)
    dh0 = torch.empty(batch, heads, key_dim, key_dim, **f32)
    du0 = torch.empty(batch, heads, value_dim, key_dim, **f32)
    cfg = _launch_config(max(key_dim, value_dim), q.dtype)
    bd, bdv = _block(key_dim), _block(value_dim)
    prec = _dot_precision(q.dtype)
    dummy = dk_part
    has_g = g32 is not None
    gp = g32 if has_g else dummy

    # bwd_lean: the second solve's right-hand side in the input dtype (bf16 inputs: ~bf16 rounding of dq).
    dx = torch.empty(batch, seq_len, heads, key_dim, device=q.device,
                     dtype=q.dtype if cfg["bwd_lean"] else torch.float32)
    dq_direct = torch.empty(batch, seq_len, heads, key_dim, **f32) if a32 is not None else dummy
    grid = (num_chunks, batch * heads)
    # the second solve's solution, for _gka_bwd_grads (whose products take it in the input dtype anyway)
    y = torch.empty(batch, seq_len, heads, key_dim, device=q.device, dtype=dx.dtype)
    halves = _halves(bd, cfg)
    for part in (1, 2):
        K._gka_bwd_readout[grid](
            q, k, v, gp, a32 if a32 is not None else dummy, u_states, x, do,
            dx, dq_direct, dk_part, dv_part, dG_part, dalpha if dalpha is not None else dummy, du_buf,
            seq_len, heads, num_chunks, key_dim, value_dim, float(scale),
            HAS_G=has_g, HAS_ALPHA=a32 is not None, C=chunk_size, BD=bd, BDV=bdv, DOT_PREC=prec, PART=part,
            HALVES=halves and part == 1, num_warps=cfg["readout_warps"] if part == 1 else cfg["readout2_warps"],
        )
    K._gka_bwd_solve[grid](
        k, gp, h_states, norm, dx, dq_direct, dq, y,
        seq_len, heads, num_chunks, key_dim, float(ridge), int(num_iter),
        ADAPTIVE=adaptive, HAS_G=has_g, HAS_ALPHA=a32 is not None, C=chunk_size, BD=bd, DOT_PREC=prec,
        INTERPRET=interpreting(), HALVES=halves and not cfg["solver_fold"] and not cg, FOLD=cfg["solver_fold"],
        CG=cg, num_warps=cfg["bwd_warps"],
    )
    for part in (1, 2):
        K._gka_bwd_grads[grid](
            k, gp, h_states, x, norm, stats, y, dk_part, dG_part, dh_buf,
            seq_len, heads, num_chunks, key_dim, float(ridge),
            ADAPTIVE=adaptive, HAS_G=has_g, C=chunk_size, BD=bd, DOT_PREC=prec, PART=part,
            HALVES=halves and part == 1, num_warps=cfg["grads_warps"] if part == 1 else cfg["grads2_warps"],
        )
    del y
    has_final = dh_final is not None or du_final is not None
    if has_final:
        dh_final = torch.zeros_like(dh0) if dh_final is None else dh_final.float().contiguous()
        du_final = torch.zeros_like(du0) if du_final is None else du_final.float().contiguous()
    # carry_partials: <Z, H0> + <dU, U0> of each chunk as the scan's per-block partial sums
    blocks = _scan_blocks(cfg, key_dim, value_dim)[1]
    partial = torch.empty(batch * heads, num_chunks, blocks, **f32) if cfg["carry_partials"] and has_g else None
    _scan_elem(dh_buf, du_buf, decay, dh_final if has_final else None, du_final if has_final else None,
               dh0, du0, cfg, reverse=True, partial=partial, states=(h_states, u_states))
    K._gka_bwd_carry[(num_chunks, batch * heads)](
        k, v, gp, h_states, u_states, dh_buf, du_buf, dk_part, dv_part, dG_part,
        dk, dv, dg if dg is not None else dummy, dummy if partial is None else partial,
        seq_len, heads, num_chunks, key_dim, value_dim, blocks,
        HAS_G=has_g, C=chunk_size, BD=bd, BDV=bdv, DOT_PREC=prec, PARTIALS=partial is not None,
        NBP=triton.next_power_of_2(blocks), num_warps=cfg["carry_warps"],
    )
    return [dq, dk, dv, _or_empty(dg, g, q), _or_empty(dalpha, alpha, q), dh0, du0]


@_gka_chunk_backward.register_fake
def _(do, dh_final, du_final, q, k, v, g, alpha, h_states, u_states, x, norm, stats, decay, ridge, adaptive,
      cg, num_iter, scale, chunk_size):
    batch, _, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    f32 = {"device": q.device, "dtype": torch.float32}
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=q.dtype)
    gates = [torch.empty_like(t) if t is not None else q.new_empty(0) for t in (g, alpha)]
    return [dq, dk, dv, *gates, torch.empty(batch, heads, key_dim, key_dim, **f32),
            torch.empty(batch, heads, value_dim, key_dim, **f32)]


def _or_empty(grad, like, q):
    # a custom op returns tensors only: an empty one (q's dtype, as the fake says) stands for an absent input's
    # gradient
    return q.new_empty(0) if like is None else grad.to(like.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, g, alpha, h0, u0, *options = inputs
    ctx.save_for_backward(q, k, v, g, alpha, *output[3:])
    ctx.options = options
    ctx.input_dtypes = tuple(None if t is None else t.dtype for t in (g, alpha, h0, u0))
    ctx.set_materialize_grads(False)


def _grads(ctx, grads):
    do, dh_final, du_final = grads[:3]  # the saved outputs' gradients are never used
    dq, dk, dv, dg, dalpha, dh0, du0 = _gka_chunk_backward(do, dh_final, du_final, *ctx.saved_tensors, *ctx.options)
    g_dtype, a_dtype, h0_dtype, u0_dtype = ctx.input_dtypes
    return (dq, dk, dv, None if g_dtype is None else dg, None if a_dtype is None else dalpha,
            None if h0_dtype is None else dh0.to(h0_dtype), None if u0_dtype is None else du0.to(u0_dtype),
            None, None, None, None, None, None)


def _vmap(info, in_dims, q, k, v, g, alpha, h0, u0, *options):
    # Batch entries never mix, so vmap's dimension (stacked models, lab/stacked.py) folds into the
    # batch dimension: one launch over [members * B, ...] instead of a loop over members.
    members = info.batch_size
    folded = fold_members((q, k, v, g, alpha, h0, u0), in_dims[:7], members)
    outputs = _gka_chunk(*folded, *options)
    # every output leads with the batch; an empty decay (no gates) has none to split
    return ([t.unflatten(0, (members, -1)) if t.numel() else t for t in outputs],
            [0 if t.numel() else None for t in outputs])


_gka_chunk.register_autograd(_grads, setup_context=_setup_context)
_gka_chunk.register_vmap(_vmap)


def triton_gka(
    q,
    k,
    v,
    g=None,
    alpha=None,
    *,
    ridge_ratio,
    ridge_mode,
    num_iter,
    scale,
    solver="chebyshev",
    chunk_size=64,
    initial_state=None,
    output_final_state=False,
):
    """Same contract as `chunk_gka` with solver "chebyshev" or "cg" (check `unsupported_reason` first)."""
    h0, u0 = (None, None) if initial_state is None else initial_state
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    chunk_size = LAUNCH_OVERRIDES.get("chunk", chunk_size)
    if q.dtype == torch.float32 and q.is_cuda:
        # fp32 operands double the shared memory of every dot; 64-token chunks overflow the H200's 227 KiB.
        # The chunk size changes only the order of the sums, not the function.
        chunk_size = min(chunk_size, FP32_CHUNK_SIZE)
    o, h_final, u_final = _gka_chunk(
        q, k, v, g, alpha, h0, u0, float(ridge_ratio), ridge_mode == "adaptive", solver == "cg", int(num_iter),
        float(scale), int(chunk_size),
    )[:3]
    return (o, (h_final, u_final)) if output_final_state else o
