"""Triton kernels of the chunk-wise GKA forward and its implicit-differentiation backward (GKA.md).

Per (batch, head) the sequence is cut into chunks of C tokens (the last one masked). Within a chunk,
with G the in-chunk cumulative log-decay, E = e^G, M[c, j] = e^{G_c - G_j} (j <= c) and H0, U0 the
states at the chunk start:

    A_c x = E_c H0 x + sum_j M[c, j] (k_j . x) k_j + lam_c x            (the solver's matvec, C at once)
    ||H_c||^2 = E_c^2 ||H0||^2 + 2 E_c sum_j M[c, j] k_j^T H0 k_j + m_c^T (K K^T)^2 m_c
    o = scale (((Qt K^T) * M) V + E * (Qt U0^T))                         (the readout)

Launches, forward:  _chunk_contrib   (each chunk's own contribution to the next start states; chunk-parallel)
                    _state_scan_elem (an exclusive scan over the chunks of those, in place: the start states)
                    _gka_fwd_chunk   (norms, Chebyshev or CG solve, alpha-connection, readout; chunk-parallel)
backward:           _gka_bwd_readout (two launches: readout and alpha grads, the right-hand side of the second
                                      solve; then dV, dK and the chunk's dU0 contribution; chunk-parallel)
                    _gka_bwd_solve   (the second solve, with the forward's solver; chunk-parallel)
                    _gka_bwd_grads   (two launches: the grads through A and lam; then the chunk's dH0 contribution)
                    _state_scan_elem (reverse-time sum of those contributions, elementwise over the states)
                    _gka_bwd_carry   (what the carried state gradients give k, v, g; reverse cumsum of dG)

Layouts: q, k, x, dq, dk [B, T, H, Dk] and v, o, dv [B, T, H, Dv] contiguous; g, alpha [B, T, H];
states [B, H, N, rows, Dk] (fp32, or the input dtype with low_states); per-token fp32 scalars (norm, dG)
[B, H, N * C].
Dot operands are in the input dtype (fp32: tf32 or ieee per DOT_PREC), accumulation and state fp32.
"""

import triton
import triton.language as tl

# Zero-key convention shared with the torch paths (solvers.NORM_EPS_SQ).
NORM_EPS_SQ = tl.constexpr(1e-12)
# Guards CG's divisions, so a zero right-hand side (a padded token) gives x = 0 (solvers.CG_EPS).
CG_EPS = tl.constexpr(1e-30)


@triton.jit
def _chunk_decay(g, tok_offs, tmask, t_stride, HAS_G: tl.constexpr, C: tl.constexpr):
    """In-chunk cumulative log-decay G [C] (0 past the end of the sequence) and its total."""
    if HAS_G:
        gc = tl.load(g + tok_offs * t_stride, mask=tmask, other=0.0).to(tl.float32)
        G = tl.cumsum(gc, 0)
    else:
        G = tl.zeros([C], dtype=tl.float32)
    return G, tl.sum(tl.where(tl.arange(0, C) == C - 1, G, 0.0), 0)


@triton.jit
def _decay_mask(G, C: tl.constexpr):
    """M[c, j] = exp(G_c - G_j) for j <= c, else 0 (masked before the exp, so no inf * 0)."""
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    return tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))


@triton.jit
def _to_dot(x, dt: tl.constexpr, ASM: tl.constexpr):
    """x (fp32) rounded to the dot dtype; ASM (bf16 on the GPU): one cvt.rn.bf16x2 for two elements (Triton
    emitted a single-element cvt plus a byte permute for each)."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    else:
        return x.to(dt)


@triton.jit
def _to_f32(x, ASM: tl.constexpr):
    """x (dot dtype) to fp32; ASM (bf16 on the GPU): two bit operations for two elements."""
    if ASM:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def _resid_matvec(dd, u, H0T, K, M, E, DOT_PREC: tl.constexpr):
    """u + (A - lam I) dd for the C iterates dd [C, BD] (dot dtype): E * (dd H0^T) + ((dd K^T) * M) K + u."""
    u = tl.dot(dd, H0T, input_precision=DOT_PREC) * E[:, None] + u
    xs = (tl.dot(dd, tl.trans(K), input_precision=DOT_PREC) * M).to(K.dtype)
    return tl.dot(xs, K, acc=u, input_precision=DOT_PREC)


@triton.jit
def _fold_step(dd, u, x, weight, H0T, K, M, E, lam, step, rho_sq, DOT_PREC: tl.constexpr, ASM: tl.constexpr):
    """One step of _cheb_resid's FOLD form: E goes into the first product's operand, round(E * dd) H0^T, so both
    products accumulate straight into u (no [C, BD] fp32 product tile; three wgmma groups a step, the first with its
    A operand from registers). The H0 term then sees dd's rounding after the scaling (2^-9 relative, like the masked
    scores' rounding: it shrinks with the step). x holds x_{k-1} on entry: its update by dd sits between the
    products and does not depend on them, so ptxas issues it while the H0 product runs."""
    ddf = _to_f32(dd, ASM)
    u = tl.dot(_to_dot(E[:, None] * ddf, K.dtype, ASM), H0T, acc=u, input_precision=DOT_PREC)
    x += ddf
    xs = (tl.dot(dd, tl.trans(K), input_precision=DOT_PREC) * M).to(K.dtype)
    u = tl.dot(xs, K, acc=u, input_precision=DOT_PREC)
    weight = 4.0 / (4.0 - rho_sq * weight)
    d = (weight - 1.0)[:, None] * ddf - (weight * step)[:, None] * (u + lam[:, None] * x)
    return _to_dot(d, K.dtype, ASM), u, x, weight


@triton.jit
def _cheb_resid(rhs, H0T, K, M, E, lam, upper, num_iter, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
                FOLD: tl.constexpr = False):
    """num_iter Chebyshev steps for A x = rhs in residual form (the same iterates as _chebyshev in exact
    arithmetic): the products apply A to the step dd = x_k - x_{k-1}, rounded to the dot dtype, and x, the
    residual are updated with that same rounded dd, so rounding the operand is no error at all (x never
    enters a product); what rounding is left (the masked scores) scales with the shrinking step.

    u = (A - lam I) x - rhs (fp32); x fp32; dd in the dot dtype. Per step: u += (A - lam I) dd;
    d = (w - 1) dd - w s (u + lam x); dd = round(d); x += dd.
    """
    step = 2.0 / (upper + lam)
    rho = (upper - lam) / (upper + lam)
    rho_sq = rho * rho
    weight = tl.zeros_like(step) + 2.0
    b = rhs.to(tl.float32)
    dd = (step[:, None] * b).to(K.dtype)
    x = dd.to(tl.float32)
    u = -b
    ASM: tl.constexpr = (not INTERPRET) and K.dtype == tl.bfloat16  # packed conversions (_to_dot, _to_f32)
    if FOLD:  # (_fold_step; x lags one step behind dd in its loop)
        x = tl.zeros_like(u)
        if INTERPRET:
            i = 0
            while i < num_iter:
                dd, u, x, weight = _fold_step(dd, u, x, weight, H0T, K, M, E, lam, step, rho_sq, DOT_PREC, ASM)
                i += 1
        else:
            for _ in range(num_iter):
                dd, u, x, weight = _fold_step(dd, u, x, weight, H0T, K, M, E, lam, step, rho_sq, DOT_PREC, ASM)
        x += _to_f32(dd, ASM)
    elif INTERPRET:
        i = 0
        while i < num_iter:
            u = _resid_matvec(dd, u, H0T, K, M, E, DOT_PREC)
            weight = 4.0 / (4.0 - rho_sq * weight)
            d = (weight - 1.0)[:, None] * dd.to(tl.float32) - (weight * step)[:, None] * (u + lam[:, None] * x)
            dd = d.to(K.dtype)
            x += dd.to(tl.float32)
            i += 1
    else:
        for _ in range(num_iter):
            u = _resid_matvec(dd, u, H0T, K, M, E, DOT_PREC)
            weight = 4.0 / (4.0 - rho_sq * weight)
            d = (weight - 1.0)[:, None] * _to_f32(dd, ASM) - (weight * step)[:, None] * (u + lam[:, None] * x)
            dd = _to_dot(d, K.dtype, ASM)
            x += _to_f32(dd, ASM)
    return x


@triton.jit
def _halves_step(da, db, xa, xb, ua, ub, weight, step, rho_sq, lam, Ka, Kb, Haa, Hab, Hba, Hbb, M, E,
                 DOT_PREC: tl.constexpr, ASM: tl.constexpr):
    """One residual-form Chebyshev step (_cheb_resid) on column halves a, b of the [C, BD] tiles; H_rc is the
    [BD/2, BD/2] block (row half r, column half c) of H0 in the dot dtype. Half-width products keep the
    fp32 product of dd H0^T at [C, BD/2] (32 registers a thread at 4 warps), so x, u, dd, M and it fit."""
    dt = Ka.dtype
    pa = tl.dot(db, tl.trans(Hab), acc=tl.dot(da, tl.trans(Haa), input_precision=DOT_PREC),
                input_precision=DOT_PREC)
    ua = pa * E[:, None] + ua
    pb = tl.dot(db, tl.trans(Hbb), acc=tl.dot(da, tl.trans(Hba), input_precision=DOT_PREC),
                input_precision=DOT_PREC)
    ub = pb * E[:, None] + ub
    xk = tl.dot(db, tl.trans(Kb), acc=tl.dot(da, tl.trans(Ka), input_precision=DOT_PREC),
                input_precision=DOT_PREC)
    xs = (xk * M).to(dt)  # (packed cvt here, _to_dot, was 2% slower on the H200: v9)
    ua = tl.dot(xs, Ka, acc=ua, input_precision=DOT_PREC)
    ub = tl.dot(xs, Kb, acc=ub, input_precision=DOT_PREC)
    weight = 4.0 / (4.0 - rho_sq * weight)
    c_prev = (weight - 1.0)[:, None]
    c_res = (weight * step)[:, None]
    da = _to_dot(c_prev * _to_f32(da, ASM) - c_res * (ua + lam[:, None] * xa), dt, ASM)
    xa += _to_f32(da, ASM)
    db = _to_dot(c_prev * _to_f32(db, ASM) - c_res * (ub + lam[:, None] * xb), dt, ASM)
    xb += _to_f32(db, ASM)
    return da, db, xa, xb, ua, ub, weight


@triton.jit
def _cheb_halves(rhs_a, rhs_b, Ka, Kb, Haa, Hab, Hba, Hbb, M, E, lam, upper, num_iter, DOT_PREC: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """_cheb_resid on column halves (see _halves_step); returns the solution's halves (fp32)."""
    step = 2.0 / (upper + lam)
    rho = (upper - lam) / (upper + lam)
    rho_sq = rho * rho
    weight = tl.zeros_like(step) + 2.0
    ua = -rhs_a.to(tl.float32)
    ub = -rhs_b.to(tl.float32)
    da = (step[:, None] * rhs_a.to(tl.float32)).to(Ka.dtype)
    db = (step[:, None] * rhs_b.to(tl.float32)).to(Ka.dtype)
    xa = da.to(tl.float32)
    xb = db.to(tl.float32)
    ASM: tl.constexpr = (not INTERPRET) and Ka.dtype == tl.bfloat16
    if INTERPRET:
        i = 0
        while i < num_iter:
            da, db, xa, xb, ua, ub, weight = _halves_step(da, db, xa, xb, ua, ub, weight, step, rho_sq, lam,
                                                          Ka, Kb, Haa, Hab, Hba, Hbb, M, E, DOT_PREC,
                                                          ASM)
            i += 1
    else:
        for _ in range(num_iter):
            da, db, xa, xb, ua, ub, weight = _halves_step(da, db, xa, xb, ua, ub, weight, step, rho_sq, lam,
                                                          Ka, Kb, Haa, Hab, Hba, Hbb, M, E, DOT_PREC,
                                                          ASM)
    return xa, xb


@triton.jit
def _cg_step(pd, p, x, r, rr, H0T, K, M, E, lam, DOT_PREC: tl.constexpr, ASM: tl.constexpr):
    """One step of _cg. E goes into the H0 product's operand and lam p into its accumulator (as _fold_step)."""
    ap = tl.dot(_to_dot(E[:, None] * p, K.dtype, ASM), H0T, acc=lam[:, None] * p, input_precision=DOT_PREC)
    xs = (tl.dot(pd, tl.trans(K), input_precision=DOT_PREC) * M).to(K.dtype)
    ap = tl.dot(xs, K, acc=ap, input_precision=DOT_PREC)
    step = rr / (tl.sum(p * ap, 1) + CG_EPS)
    x += step[:, None] * p
    r -= step[:, None] * ap
    rr_next = tl.sum(r * r, 1)
    pd = _to_dot(r + (rr_next / (rr + CG_EPS))[:, None] * p, K.dtype, ASM)
    return pd, _to_f32(pd, ASM), x, r, rr_next


@triton.jit
def _cg(rhs, H0T, K, M, E, lam, num_iter, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """num_iter conjugate-gradient steps for A x = rhs from x = 0, one per token (row): the iterates of
    solvers.conjugate_gradient (MesaNet's solver; its step sizes are per-row inner products, so unlike Chebyshev
    it needs no spectral bounds). The direction p is rounded to the dot dtype once a step and then used rounded
    everywhere (the products, x and the residual), so x and r stay consistent (r = rhs - A x up to the masked
    scores' rounding) and the rounding only perturbs the next direction. x, r fp32.
    """
    ASM: tl.constexpr = (not INTERPRET) and K.dtype == tl.bfloat16  # packed conversions (_to_dot, _to_f32)
    r = rhs.to(tl.float32)
    x = tl.zeros_like(r)
    pd = _to_dot(r, K.dtype, ASM)
    p = _to_f32(pd, ASM)
    rr = tl.sum(r * r, 1)
    if INTERPRET:
        i = 0
        while i < num_iter:
            pd, p, x, r, rr = _cg_step(pd, p, x, r, rr, H0T, K, M, E, lam, DOT_PREC, ASM)
            i += 1
    else:
        for _ in range(num_iter):
            pd, p, x, r, rr = _cg_step(pd, p, x, r, rr, H0T, K, M, E, lam, DOT_PREC, ASM)
    return x


@triton.jit
def _tile_at(ptr, b, h, n, T, H, D, col0, C: tl.constexpr, BD: tl.constexpr):
    """_tile for the columns [col0, col0 + BD)."""
    return tl.make_block_ptr(ptr + (b * T * H + h) * D, shape=(T, D), strides=(H * D, 1),
                             offsets=(n * C, col0), block_shape=(C, BD), order=(1, 0))


@triton.jit
def _state_at(ptr, bh, n, N, R, D, row0, col0, BR: tl.constexpr, BD: tl.constexpr):
    """_state for the block at (row0, col0)."""
    return tl.make_block_ptr(ptr + (bh * N + n) * R * D, shape=(R, D), strides=(D, 1), offsets=(row0, col0),
                             block_shape=(BR, BD), order=(1, 0))


@triton.jit
def _solve_halves(rhs, rhs_dtype, k, h_states, b, h, bh, n, T, H, N, D, M, E, lam, upper, num_iter,
                  C: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """Loads the halves of the right-hand side (a [B, T, H, D] tensor), K and H0 and runs _cheb_halves."""
    BH: tl.constexpr = BD // 2
    Ka = _load(_tile_at(k, b, h, n, T, H, D, 0, C, BH))
    Kb = _load(_tile_at(k, b, h, n, T, H, D, BH, C, BH))
    dt = Ka.dtype
    Haa = _load(_state_at(h_states, bh, n, N, D, D, 0, 0, BH, BH)).to(dt)
    Hab = _load(_state_at(h_states, bh, n, N, D, D, 0, BH, BH, BH)).to(dt)
    Hba = _load(_state_at(h_states, bh, n, N, D, D, BH, 0, BH, BH)).to(dt)
    Hbb = _load(_state_at(h_states, bh, n, N, D, D, BH, BH, BH, BH)).to(dt)
    ra = _load(_tile_at(rhs, b, h, n, T, H, D, 0, C, BH))
    rb = _load(_tile_at(rhs, b, h, n, T, H, D, BH, C, BH))
    return _cheb_halves(ra, rb, Ka, Kb, Haa, Hab, Hba, Hbb, M, E, lam, upper, num_iter, DOT_PREC, INTERPRET)


@triton.jit
def _sq_norms(H0, K, M, E, DOT_PREC: tl.constexpr):
    """||H_c||_F^2 for every token of the chunk, plus the pieces the backward reuses."""
    h_sq = tl.sum(tl.sum(H0.to(tl.float32) * H0.to(tl.float32), 1), 0)
    kh = tl.dot(K, H0.to(K.dtype), input_precision=DOT_PREC)  # row j: k_j^T H0
    energy = tl.sum(kh * K.to(tl.float32), 1)  # k_j^T H0 k_j
    kk = tl.dot(K, tl.trans(K), input_precision=DOT_PREC)
    mp = tl.dot(M, kk * kk, input_precision=DOT_PREC)
    sq = E * E * h_sq + 2.0 * E * tl.sum(M * energy[None, :], 1) + tl.sum(mp * M, 1)
    return sq, h_sq, kh, energy, kk, mp


@triton.jit
def _chunk_contrib(
    k, v, g, h_states, u_states, decay_out, T, H, N, D, DV,
    HAS_G: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DOT_PREC: tl.constexpr,
    HALVES: tl.constexpr = False,
):
    """Chunk-parallel half of the forward state scan: writes chunk n's own contributions to the next start
    states, (K * e^{G_last - G})^T K into h_states[n] and (V * e^{G_last - G})^T K into u_states[n]
    (_state_scan_elem then turns them into the start states in place), and with gates e^{G_last} of the chunk
    into decay_out [B, H, N] (both scans read it: one load a chunk). Grid (N, B * H).
    HALVES (BD, BDV >= 32): each contribution in two row halves ([BD/2, BD] fp32 products, not [BD, BD])."""
    n, bh, b, h, t, tmask = _chunk_ids(T, H, C)
    K = _load(_tile(k, b, h, n, T, H, D, C, BD))
    G, g_last = _chunk_decay(g + b * T * H + h, t, tmask, H, HAS_G, C)
    to_end = tl.exp(g_last - G)
    if HAS_G:
        tl.store(decay_out + bh * N + n, tl.exp(g_last))
    if HALVES:
        BH: tl.constexpr = BD // 2
        BVH: tl.constexpr = BDV // 2
        for half in tl.static_range(2):
            kd = (_load(_tile_at(k, b, h, n, T, H, D, half * BH, C, BH)).to(tl.float32) * to_end[:, None]).to(K.dtype)
            tl.store(_state_at(h_states, bh, n, N, D, D, half * BH, 0, BH, BD),
                     tl.dot(tl.trans(kd), K, input_precision=DOT_PREC).to(h_states.dtype.element_ty),
                     boundary_check=(0, 1))
        for half in tl.static_range(2):
            vd = (_load(_tile_at(v, b, h, n, T, H, DV, half * BVH, C, BVH)).to(tl.float32) * to_end[:, None]).to(K.dtype)
            tl.store(_state_at(u_states, bh, n, N, DV, D, half * BVH, 0, BVH, BD),
                     tl.dot(tl.trans(vd), K, input_precision=DOT_PREC).to(u_states.dtype.element_ty),
                     boundary_check=(0, 1))
    else:
        kd = (K.to(tl.float32) * to_end[:, None]).to(K.dtype)
        tl.store(_state(h_states, bh, n, N, D, D, BD, BD),
                 tl.dot(tl.trans(kd), K, input_precision=DOT_PREC).to(h_states.dtype.element_ty),
                 boundary_check=(0, 1))
        V = _load(_tile(v, b, h, n, T, H, DV, C, BDV))
        vd = (V.to(tl.float32) * to_end[:, None]).to(K.dtype)
        tl.store(_state(u_states, bh, n, N, DV, D, BDV, BD),
                 tl.dot(tl.trans(vd), K, input_precision=DOT_PREC).to(u_states.dtype.element_ty),
                 boundary_check=(0, 1))


@triton.jit
def _affine_then(a1, b1, a2, b2):
    """x -> a1 x + b1, then x -> a2 x + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _chunk_gate_total(decay, chunks, N, bh, HAS_G: tl.constexpr):
    """e^{G_last} of each chunk in `chunks` (a [R] tensor; 1 for chunks outside [0, N)), from the [B, H, N]
    buffer _chunk_contrib wrote."""
    if HAS_G:
        valid = (chunks >= 0) & (chunks < N)
        return tl.load(decay + bh * N + chunks, mask=valid, other=1.0)
    else:
        return tl.full(chunks.shape, 1.0, tl.float32)


@triton.jit
def _scan_elem_group(p0, carry, base, decay, offs, mask, N, SIZE, bh, sbase, partial, pid, NB, HAS_G: tl.constexpr,
                     REVERSE: tl.constexpr, BLOCK: tl.constexpr, DEPTH: tl.constexpr, PARTIALS: tl.constexpr):
    """Walk positions p0 .. p0 + DEPTH - 1 of _state_scan_elem; returns the carry after them.

    [BLOCK, DEPTH] tiles: the loads vectorize along the elements (axis 0), so every thread holds all DEPTH chunks
    of its elements and the scan runs in its registers (the [DEPTH, BLOCK] orientation scanned across lanes and
    converted layouts through shared memory: 255 registers, 131 kB, 2.2x slower on the H200, v9).
    """
    rows = tl.arange(0, DEPTH)
    pos = p0 + rows  # walk positions of this group
    prev = pos - 1  # row i applies the map of the chunk at walk position pos - 1 (row 0: identity)
    prev_ok = (rows >= 1) & (prev < N)
    if REVERSE:
        chunk = N - 1 - pos
        prev_chunk = N - 1 - prev
    else:
        chunk = pos
        prev_chunk = prev
    ep = _chunk_gate_total(decay, tl.where(prev_ok, prev_chunk, -1), N, bh, HAS_G)
    last_pos = p0 + DEPTH - 1
    if REVERSE:
        last_chunk = N - 1 - last_pos
    else:
        last_chunk = last_pos
    l_last = tl.load(base + last_chunk * SIZE + offs, mask=mask & (last_pos < N), other=0.0).to(tl.float32)
    e_last = tl.sum(tl.where(rows == 0, _chunk_gate_total(decay, tl.where(rows == 0, last_chunk, -1), N, bh, HAS_G),
                             0.0), 0)
    lt = tl.load(base + prev_chunk[None, :] * SIZE + offs[:, None], mask=prev_ok[None, :] & mask[:, None],
                 other=0.0).to(tl.float32)
    ea, eb = tl.associative_scan((tl.broadcast_to(ep[None, :], [BLOCK, DEPTH]), lt), 1, _affine_then)
    excl = ea * carry[:, None] + eb  # the value before this column's chunk
    tl.debug_barrier()  # every load of the group done before its stores (columns i and i - 1 share a chunk)
    tl.store(base + chunk[None, :] * SIZE + offs[:, None], excl.to(base.dtype.element_ty),
             mask=(pos < N)[None, :] & mask[:, None])
    if PARTIALS:  # this block's part of <buf[n], states[n]> for each chunk n of the group
        sv = tl.load(sbase + chunk[None, :] * SIZE + offs[:, None], mask=(pos < N)[None, :] & mask[:, None],
                     other=0.0).to(tl.float32)
        tl.store(partial + (bh * N + chunk) * NB + pid, tl.sum(excl * sv, 0), mask=pos < N)
    v_last = tl.sum(tl.where((rows == DEPTH - 1)[None, :], excl, 0.0), 1)
    carry = tl.where(last_pos < N, e_last * v_last + l_last, v_last)
    return carry


@triton.jit
def _state_scan_elem(
    h_buf, u_buf, decay, h_init, u_init, h_out, u_out, h_states, u_states, partial, N, D, DV,
    HAS_G: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr, DEPTH: tl.constexpr,
    INTERPRET: tl.constexpr, PARTIALS: tl.constexpr = False,
):
    """Exclusive linear scan over the chunks, in place, elementwise over [B, H, N, rows, Dk] buffers of
    per-chunk contributions l_n (H's and U's in one launch), walking n = 0..N-1 (or N-1..0 if REVERSE):
    v = init; for each n: buf[n] <- v; v <- e^{G_last,n} v + l_n; out <- v (e^{G_last,n} from _chunk_contrib's decay).
    Forward: l_n = chunk n's own state contribution, buf[n] <- its start state, out = final state.
    Backward: l_n = the chunk's local state gradient, buf[n] <- the gradient at its end, out = grad of the
    initial state. DEPTH chunks at a time: their loads all go out before one associative scan over them
    (row i of a group carries the map of the chunk before it, so every load of a group is of a chunk the
    group itself overwrites afterwards). Grid (blocks of H's then U's elements, B * H).
    PARTIALS (backward): also writes each block's part of <buf[n], h_states[n]> (H's blocks) or <buf[n], u_states[n]>
    (U's blocks) to partial [B * H, N, blocks], which _gka_bwd_carry sums (the gradient through the chunk's start).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    num_h_blocks = tl.cdiv(D * D, BLOCK)
    NB = num_h_blocks + tl.cdiv(DV * D, BLOCK)
    if pid < num_h_blocks:
        buf = h_buf
        init = h_init
        out = h_out
        states = h_states
        SIZE = D * D
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    else:
        buf = u_buf
        init = u_init
        out = u_out
        states = u_states
        SIZE = DV * D
        offs = (pid - num_h_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    base = buf + bh * N * SIZE
    sbase = states + bh * N * SIZE
    if HAS_INIT:
        carry = tl.load(init + bh * SIZE + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    if INTERPRET:
        p0 = 0
        while p0 < N:
            carry = _scan_elem_group(p0, carry, base, decay, offs, mask, N, SIZE, bh, sbase, partial, pid, NB, HAS_G,
                                     REVERSE, BLOCK, DEPTH, PARTIALS)
            p0 += DEPTH
    else:
        for p0 in range(0, N, DEPTH):
            carry = _scan_elem_group(p0, carry, base, decay, offs, mask, N, SIZE, bh, sbase, partial, pid, NB, HAS_G,
                                     REVERSE, BLOCK, DEPTH, PARTIALS)
    tl.store(out + bh * SIZE + offs, carry, mask=mask)


@triton.jit
def _gka_fwd_chunk(
    q, k, v, g, alpha, h_states, u_states, x_out, o, norm_out, stats_out,
    T, H, N, D, DV, scale, ridge, num_iter,
    ADAPTIVE: tl.constexpr, HAS_G: tl.constexpr, HAS_ALPHA: tl.constexpr,
    C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
    HALVES: tl.constexpr, READ_SPLIT: tl.constexpr = False, FOLD: tl.constexpr = False, CG: tl.constexpr = False,
):
    """One chunk of one (batch, head): norms, Chebyshev (CG: conjugate-gradient) solve, alpha-connection, readout.
    Grid (N, B * H). Without HALVES (BD < 32, FOLD or CG): full-width tiles, the solver on the H0 tile the norms
    loaded (FOLD: the _fold_step form that accumulates both products into u)."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = n * C + tl.arange(0, C)
    tmask = t < T

    K = _load(_tile(k, b, h, n, T, H, D, C, BD))
    G, _ = _chunk_decay(g + b * T * H + h, t, tmask, H, HAS_G, C)
    M = _decay_mask(G, C)
    E = tl.exp(G)
    H0 = _load(_state(h_states, bh, n, N, D, D, BD, BD))
    sq, h_sq, _, energy, _, _ = _sq_norms(H0, K, M, E, DOT_PREC)
    # for _gka_bwd_grads: k_j^T H0 k_j per token, ||H0||^2 per chunk
    stats = stats_out + bh * 2 * (N * C + N)
    tl.store(stats + t, energy)
    tl.store(stats + N * C + n, h_sq)
    norm = tl.sqrt(tl.maximum(sq, 0.0) + NORM_EPS_SQ)
    if ADAPTIVE:
        lam = ridge * norm
    else:
        lam = tl.zeros_like(norm) + ridge
    tl.store(norm_out + bh * N * C + t, norm)

    if HALVES:  # the solver on column halves (BD >= 32)
        BH: tl.constexpr = BD // 2
        Xa, Xb = _solve_halves(q, q, k, h_states, b, h, bh, n, T, H, N, D, M, E, lam, norm + lam, num_iter,
                               C, BD, DOT_PREC, INTERPRET)
        tl.store(_tile_at(x_out, b, h, n, T, H, D, 0, C, BH), Xa, boundary_check=(0, 1))
        tl.store(_tile_at(x_out, b, h, n, T, H, D, BH, C, BH), Xb, boundary_check=(0, 1))
        if HAS_ALPHA:
            a = tl.load(alpha + (b * T + t) * H + h, mask=tmask, other=0.0).to(tl.float32)
            Qa = _load(_tile_at(q, b, h, n, T, H, D, 0, C, BH)).to(tl.float32)
            Qb = _load(_tile_at(q, b, h, n, T, H, D, BH, C, BH)).to(tl.float32)
            Xa = Qa + a[:, None] * (Xa - Qa)
            Xb = Qb + a[:, None] * (Xb - Qb)
        dt = K.dtype
        qa = Xa.to(dt)
        qb = Xb.to(dt)
        Ka = _load(_tile_at(k, b, h, n, T, H, D, 0, C, BH))
        Kb = _load(_tile_at(k, b, h, n, T, H, D, BH, C, BH))
        scores = tl.dot(qb, tl.trans(Kb), acc=tl.dot(qa, tl.trans(Ka), input_precision=DOT_PREC),
                        input_precision=DOT_PREC)
        V = _load(_tile(v, b, h, n, T, H, DV, C, BDV))
        U0a = _load(_state_at(u_states, bh, n, N, DV, D, 0, 0, BDV, BH)).to(dt)
        U0b = _load(_state_at(u_states, bh, n, N, DV, D, 0, BH, BDV, BH)).to(dt)
        out = tl.dot(qb, tl.trans(U0b), acc=tl.dot(qa, tl.trans(U0a), input_precision=DOT_PREC),
                     input_precision=DOT_PREC)
        if READ_SPLIT:
            # qt's rounding to the dot dtype, as a second (lo) operand: the readout's largest error
            la = (Xa - qa.to(tl.float32)).to(dt)
            lb = (Xb - qb.to(tl.float32)).to(dt)
            scores = tl.dot(lb, tl.trans(Kb), acc=tl.dot(la, tl.trans(Ka), acc=scores, input_precision=DOT_PREC),
                            input_precision=DOT_PREC)
            out = tl.dot(lb, tl.trans(U0b), acc=tl.dot(la, tl.trans(U0a), acc=out, input_precision=DOT_PREC),
                         input_precision=DOT_PREC)
        scores = scores * M
        out = out * E[:, None]
        out = tl.dot(scores.to(dt), V, acc=out, input_precision=DOT_PREC)
    else:
        Q = _load(_tile(q, b, h, n, T, H, D, C, BD)).to(tl.float32)
        if CG:
            X = _cg(Q, tl.trans(H0).to(K.dtype), K, M, E, lam, num_iter, DOT_PREC, INTERPRET)
        else:
            X = _cheb_resid(Q, tl.trans(H0).to(K.dtype), K, M, E, lam, norm + lam, num_iter, DOT_PREC, INTERPRET,
                            FOLD)
        if FOLD:  # as in _gka_bwd_solve: the tiles after the loop addressed through an opaque zero
            n = n + tl.program_id(2)
            t = n * C + tl.arange(0, C)
            tmask = t < T
            Q = _load(_tile(q, b, h, n, T, H, D, C, BD)).to(tl.float32)  # loaded again: not live across the loop
        tl.store(_tile(x_out, b, h, n, T, H, D, C, BD), X, boundary_check=(0, 1))
        if HAS_ALPHA:
            a = tl.load(alpha + (b * T + t) * H + h, mask=tmask, other=0.0).to(tl.float32)
            X = Q + a[:, None] * (X - Q)

        V = _load(_tile(v, b, h, n, T, H, DV, C, BDV))
        U0T = tl.trans(_load(_state(u_states, bh, n, N, DV, D, BDV, BD)).to(K.dtype))
        qt = X.to(K.dtype)
        scores = tl.dot(qt, tl.trans(K), input_precision=DOT_PREC)
        out = tl.dot(qt, U0T, input_precision=DOT_PREC)
        if READ_SPLIT:  # as in the HALVES branch
            lo = (X - qt.to(tl.float32)).to(K.dtype)
            scores = tl.dot(lo, tl.trans(K), acc=scores, input_precision=DOT_PREC)
            out = tl.dot(lo, U0T, acc=out, input_precision=DOT_PREC)
        scores = scores * M
        out = out * E[:, None]
        out = tl.dot(scores.to(K.dtype), V, acc=out, input_precision=DOT_PREC)
    tl.store(_tile(o, b, h, n, T, H, DV, C, BDV), (scale * out).to(o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _tile(ptr, b, h, n, T, H, D, C: tl.constexpr, BD: tl.constexpr):
    """Block pointer to the [C, BD] tile of chunk n of a [B, T, H, D] tensor (rows past T, cols past D
    masked).

    Block pointers keep the address arithmetic at each load/store instead of [C, BD] offset tensors
    that would stay live in registers across the solver loop."""
    return _tile_at(ptr, b, h, n, T, H, D, 0, C, BD)


@triton.jit
def _state(ptr, bh, n, N, R, D, BR: tl.constexpr, BD: tl.constexpr):
    """Block pointer to the [R, D] state of chunk n of a [B, H, N, R, D] buffer."""
    return _state_at(ptr, bh, n, N, R, D, 0, 0, BR, BD)


@triton.jit
def _load(block_ptr):
    """A block-pointer load with everything past the tensor's edges read as 0."""
    return tl.load(block_ptr, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _chunk_ids(T, H, C: tl.constexpr):
    """Program ids of a chunk-parallel launch, grid (N, B * H): (n, b * H + h, b, h, tokens, token mask)."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = n * C + tl.arange(0, C)
    tmask = t < T
    return n, bh, b, h, t, tmask


@triton.jit
def _readout_rhs(q, k, v, alpha, u_states, x_saved, do, dx_out, dq_direct, dG_part, dalpha, M, E, b, h, bh, n, t, tmask,
                 T, H, N, D, DV, scale, HAS_ALPHA: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                 BDV: tl.constexpr, DOT_PREC: tl.constexpr):
    """_gka_bwd_readout PART 1 on column halves: writes dx = alpha dqt (the second solve's right-hand side),
    (1 - alpha) dqt, dalpha and the readout's dG (see _gka_bwd_readout)."""
    dt = k.dtype.element_ty
    BH: tl.constexpr = BD // 2
    dO = _load(_tile(do, b, h, n, T, H, DV, C, BDV))
    V = _load(_tile(v, b, h, n, T, H, DV, C, BDV))
    dov = tl.dot(dO, tl.trans(V), input_precision=DOT_PREC) * M  # (dO V^T) * M
    dovd = dov.to(dt)
    if HAS_ALPHA:
        a = tl.load(alpha + (b * T + t) * H + h, mask=tmask, other=0.0).to(tl.float32)
        da = tl.zeros([C], dtype=tl.float32)
    dE = tl.zeros([C], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for half in tl.static_range(2):
        c0 = half * BH
        X = _load(_tile_at(x_saved, b, h, n, T, H, D, c0, C, BH))
        if HAS_ALPHA:
            xq = X - _load(_tile_at(q, b, h, n, T, H, D, c0, C, BH)).to(tl.float32)
            qt = X - (1.0 - a)[:, None] * xq
        else:
            qt = X
        Kh = _load(_tile_at(k, b, h, n, T, H, D, c0, C, BH))
        scores = tl.dot(qt.to(dt), tl.trans(Kh), acc=scores, input_precision=DOT_PREC)
        do_u0 = tl.dot(dO, _load(_state_at(u_states, bh, n, N, DV, D, 0, c0, BDV, BH)).to(dt),
                       input_precision=DOT_PREC)
        dE += tl.sum(do_u0 * qt, 1)
        dqt = scale * tl.dot(dovd, Kh, acc=E[:, None] * do_u0, input_precision=DOT_PREC)
        if HAS_ALPHA:
            dx = a[:, None] * dqt
            da += tl.sum(dqt * xq, 1)
            tl.store(_tile_at(dq_direct, b, h, n, T, H, D, c0, C, BH), dqt - dx, boundary_check=(0, 1))
        else:
            dx = dqt
        tl.store(_tile_at(dx_out, b, h, n, T, H, D, c0, C, BH), dx.to(dx_out.dtype.element_ty),
                 boundary_check=(0, 1))
    if HAS_ALPHA:
        tl.store(dalpha + (b * T + t) * H + h, da, mask=tmask)
    R = scale * dov * scores
    tl.store(dG_part + bh * N * C + t, tl.sum(R, 1) - tl.sum(R, 0) + E * (scale * dE))


@triton.jit
def _gka_bwd_readout(
    q, k, v, g, alpha, u_states, x_saved, do,
    dx_out, dq_direct, dk_part, dv_part, dG_part, dalpha, du_local,
    T, H, N, D, DV, scale,
    HAS_G: tl.constexpr, HAS_ALPHA: tl.constexpr,
    C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DOT_PREC: tl.constexpr, PART: tl.constexpr,
    HALVES: tl.constexpr = False,
):
    """Backward of the readout o = scale (((qt K^T) * M) V + E * (qt U0^T)) and of qt = q + alpha (x - q).

    dqt = scale (((dO V^T) * M) K + E * (dO U0)); writes dx = alpha dqt (the right-hand side of the second
    solve), (1 - alpha) dqt, dalpha, the readout's dK, dV and dG, and the chunk's dU0 contribution.
    PART 1: dx, (1 - alpha) dqt, dalpha, dG; PART 2: dV, dK, dU0 (recomputing qt, dO V^T, qt K^T): two
    launches with fewer live tiles. HALVES (with PART 1, BD >= 32): every [C, BD] fp32 tile in column halves.
    """
    n, bh, b, h, t, tmask = _chunk_ids(T, H, C)
    K = _load(_tile(k, b, h, n, T, H, D, C, BD))
    dt = K.dtype
    G, _ = _chunk_decay(g + b * T * H + h, t, tmask, H, HAS_G, C)
    M = _decay_mask(G, C)
    E = tl.exp(G)
    if HALVES:  # PART 1 only
        _readout_rhs(q, k, v, alpha, u_states, x_saved, do, dx_out, dq_direct, dG_part, dalpha, M, E, b, h, bh, n, t,
                     tmask, T, H, N, D, DV, scale, HAS_ALPHA, C, BD, BDV, DOT_PREC)
    else:
        # Ordered so that at most ~three [C, BD] fp32 tiles are live (v5's order spilled 9 kB a thread).
        X = _load(_tile(x_saved, b, h, n, T, H, D, C, BD))
        if HAS_ALPHA:
            a = tl.load(alpha + (b * T + t) * H + h, mask=tmask, other=0.0).to(tl.float32)
            Q = _load(_tile(q, b, h, n, T, H, D, C, BD)).to(tl.float32)
            xq = X - Q
            qt = Q + a[:, None] * xq
        else:
            qt = X
        dO = _load(_tile(do, b, h, n, T, H, DV, C, BDV))
        qtd = qt.to(dt)
        V = _load(_tile(v, b, h, n, T, H, DV, C, BDV))
        dov = tl.dot(dO, tl.trans(V), input_precision=DOT_PREC) * M  # (dO V^T) * M
        if PART != 2:
            do_u0 = tl.dot(dO, _load(_state(u_states, bh, n, N, DV, D, BDV, BD)).to(dt), input_precision=DOT_PREC)
            dE = scale * tl.sum(do_u0 * qt, 1)  # row c: (U0^T do_c)^T . qt_c
            dqt = scale * tl.dot(dov.to(dt), K, acc=E[:, None] * do_u0, input_precision=DOT_PREC)
            if HAS_ALPHA:
                dx = a[:, None] * dqt
                tl.store(dalpha + (b * T + t) * H + h, tl.sum(dqt * xq, 1), mask=tmask)
                tl.store(_tile(dq_direct, b, h, n, T, H, D, C, BD), dqt - dx, boundary_check=(0, 1))
            else:
                dx = dqt
            tl.store(_tile(dx_out, b, h, n, T, H, D, C, BD), dx.to(dx_out.dtype.element_ty), boundary_check=(0, 1))
        scores = tl.dot(qtd, tl.trans(K), input_precision=DOT_PREC)  # qt K^T
        if PART != 2:
            R = scale * dov * scores  # dM * M of the readout (dov carries M)
            tl.store(dG_part + bh * N * C + t, tl.sum(R, 1) - tl.sum(R, 0) + E * dE)
        if PART != 1:
            dV = scale * tl.dot(tl.trans((scores * M).to(dt)), dO, input_precision=DOT_PREC)
            tl.store(_tile(dv_part, b, h, n, T, H, DV, C, BDV), dV, boundary_check=(0, 1))
            dK = scale * tl.dot(tl.trans(dov.to(dt)), qtd, input_precision=DOT_PREC)
            tl.store(_tile(dk_part, b, h, n, T, H, D, C, BD), dK, boundary_check=(0, 1))
            # dU0 = scale (dO * E)^T qt in two row halves ([BDV/2, BD] fp32 each: the full [BDV, BD] tile alone took
            # half the registers at 4 warps and spilled)
            BVH: tl.constexpr = BDV // 2
            for half in tl.static_range(2):
                dOh = _load(_tile_at(do, b, h, n, T, H, DV, half * BVH, C, BVH))
                du0 = scale * tl.dot(tl.trans((dOh.to(tl.float32) * E[:, None]).to(dt)), qtd, input_precision=DOT_PREC)
                tl.store(_state_at(du_local, bh, n, N, DV, D, half * BVH, 0, BVH, BD),
                         du0.to(du_local.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _gka_bwd_solve(
    k, g, h_states, norm_saved, dx_in, dq_direct, dq, y_out,
    T, H, N, D, ridge, num_iter,
    ADAPTIVE: tl.constexpr, HAS_G: tl.constexpr, HAS_ALPHA: tl.constexpr,
    C: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr, HALVES: tl.constexpr,
    FOLD: tl.constexpr = False, CG: tl.constexpr = False,
):
    """The second solve Y = A^{-1} dx (Chebyshev with the forward's bounds, or CG): writes Y (for _gka_bwd_grads)
    and dq = (1 - alpha) dqt + Y. Nothing but the solver is live here (the grads are a separate launch), so
    the solver loop keeps its registers. Grid (N, B * H). FOLD (without HALVES): _fold_step's form.
    """
    n, bh, b, h, t, tmask = _chunk_ids(T, H, C)
    G, _ = _chunk_decay(g + b * T * H + h, t, tmask, H, HAS_G, C)
    M = _decay_mask(G, C)
    E = tl.exp(G)
    norm = tl.load(norm_saved + bh * N * C + t)
    if ADAPTIVE:
        lam = ridge * norm
    else:
        lam = tl.zeros_like(norm) + ridge
    if HALVES:  # the solver on column halves (BD >= 32)
        BH: tl.constexpr = BD // 2
        Ya, Yb = _solve_halves(dx_in, dx_in, k, h_states, b, h, bh, n, T, H, N, D, M, E, lam, norm + lam,
                               num_iter, C, BD, DOT_PREC, INTERPRET)
        tl.store(_tile_at(y_out, b, h, n, T, H, D, 0, C, BH), Ya.to(y_out.dtype.element_ty), boundary_check=(0, 1))
        tl.store(_tile_at(y_out, b, h, n, T, H, D, BH, C, BH), Yb.to(y_out.dtype.element_ty),
                 boundary_check=(0, 1))
        if HAS_ALPHA:
            Ya += _load(_tile_at(dq_direct, b, h, n, T, H, D, 0, C, BH))
            Yb += _load(_tile_at(dq_direct, b, h, n, T, H, D, BH, C, BH))
        tl.store(_tile_at(dq, b, h, n, T, H, D, 0, C, BH), Ya.to(dq.dtype.element_ty), boundary_check=(0, 1))
        tl.store(_tile_at(dq, b, h, n, T, H, D, BH, C, BH), Yb.to(dq.dtype.element_ty), boundary_check=(0, 1))
    else:
        K = _load(_tile(k, b, h, n, T, H, D, C, BD))
        H0T = tl.trans(_load(_state(h_states, bh, n, N, D, D, BD, BD))).to(K.dtype)
        dx = _load(_tile(dx_in, b, h, n, T, H, D, C, BD))
        if CG:
            Y = _cg(dx, H0T, K, M, E, lam, num_iter, DOT_PREC, INTERPRET)
        else:
            Y = _cheb_resid(dx, H0T, K, M, E, lam, norm + lam, num_iter, DOT_PREC, INTERPRET, FOLD)
        if FOLD:
            # tiles after the loop addressed through an opaque zero (the grid has no third axis): else the compiler
            # reuses the address and mask tensors of the loads before the loop and keeps them live (spilled) across it
            n = n + tl.program_id(2)
            t = n * C + tl.arange(0, C)
        tl.store(_tile(y_out, b, h, n, T, H, D, C, BD), Y.to(y_out.dtype.element_ty), boundary_check=(0, 1))
        if HAS_ALPHA:
            Y += _load(_tile(dq_direct, b, h, n, T, H, D, C, BD))
        tl.store(_tile(dq, b, h, n, T, H, D, C, BD), Y.to(dq.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _ridge_path(K, M, E, yx, norm_saved, sbase, bh, n, t, N, ridge, C: tl.constexpr, DOT_PREC: tl.constexpr):
    """The adaptive ridge's gradient weights of a chunk: s_c = d(loss)/d||H_c||^2 from lam_c = a ||H_c||
    (d||H_c||^2 = a (-y_c . x_c) / (2 ||H_c||), yx = y_c . x_c; 0 where the chunk formula's ||H_c||^2 was
    negative, as the forward clamped it), with the pieces of that formula: k_j^T H0 k_j and ||H0||^2 (the
    forward's stats at sbase), K K^T, M (K K^T)^2 and sum_j M[c, j] k_j^T H0 k_j."""
    norm = tl.load(norm_saved + bh * N * C + t)
    s = ridge * -yx / (2.0 * norm)
    energy = tl.load(sbase + t)  # k_j^T H0 k_j, from the forward
    h_sq = tl.load(sbase + N * C + n)  # ||H0||^2
    kk = tl.dot(K, tl.trans(K), input_precision=DOT_PREC)
    mp = tl.dot(M, kk * kk, input_precision=DOT_PREC)
    me = tl.sum(M * energy[None, :], 1)
    sq = E * E * h_sq + 2.0 * E * me + tl.sum(mp * M, 1)
    return tl.where(sq >= 0.0, s, 0.0), energy, h_sq, kk, mp, me


@triton.jit
def _dh0_store(Y, K, E, w, c_h0, k, x_saved, h_states, dh_local, b, h, bh, n, T, H, N, D, ADAPTIVE: tl.constexpr,
               C: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Writes the chunk's dH0 contribution -(Y E)^T X (+ 2 sum_j w_j k_j k_j^T + c_h0 H0 in adaptive mode) to
    dh_local in column halves; Y [C, BD] fp32, K the chunk's keys, w and c_h0 the ridge path's weights."""
    BH: tl.constexpr = BD // 2
    dt = K.dtype
    ye = (-Y * E[:, None]).to(dt)
    if ADAPTIVE:
        kw = (K.to(tl.float32) * (2.0 * w)[:, None]).to(dt)
    for half in tl.static_range(2):
        col0 = half * BH
        Xh = _load(_tile_at(x_saved, b, h, n, T, H, D, col0, C, BH)).to(dt)
        dh0 = tl.dot(tl.trans(ye), Xh, input_precision=DOT_PREC)
        if ADAPTIVE:
            Kh = _load(_tile_at(k, b, h, n, T, H, D, col0, C, BH))
            H0h = _load(_state_at(h_states, bh, n, N, D, D, 0, col0, BD, BH)).to(tl.float32)
            dh0 = tl.dot(tl.trans(kw), Kh, acc=dh0 + c_h0 * H0h, input_precision=DOT_PREC)
        tl.store(_state_at(dh_local, bh, n, N, D, D, 0, col0, BD, BH), dh0.to(dh_local.dtype.element_ty),
                 boundary_check=(0, 1))


@triton.jit
def _gka_bwd_grads(
    k, g, h_states, x_saved, norm_saved, stats, y_in, dk_part, dG_part, dh_local,
    T, H, N, D, ridge,
    ADAPTIVE: tl.constexpr, HAS_G: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
    PART: tl.constexpr, HALVES: tl.constexpr = False,
):
    """The grads of dA_c = -y_c x_c^T (Y from _gka_bwd_solve) through A_c = E_c H0 + sum_j M[c, j] k_j k_j^T
    + lam_c I and, in adaptive mode, through lam_c = a ||H_c||_F and the chunk formula for ||H_c||_F^2.
    Adds to dK and dG of the readout and writes the chunk's dH0 contribution. Grid (N, B * H).
    PART 1: all but dH0 (w and the H0 coefficient go to stats); PART 2: dH0 only (two lighter launches; one
    launch for both was 0.04 ms slower at 1 x 32768, v7).

    With s_c = d(loss)/d||H_c||^2 the norm path is dH_c += 2 s_c H_c: dH0 gains 2 sum_c s_c E_c^2 H0
    + 2 sum_j w_j k_j k_j^T and dk_j gains 4 w_j H0 k_j + 4 ((M^T diag(s) M) * (K K^T)) K, w = M^T (s E)
    (H0 symmetric). Phases ordered so that at most ~two [C, BD] fp32 tiles are live (a 64-row dot gains
    nothing from 8 warps: Triton stacks both warpgroups on the same rows); dH0 in two column halves.
    HALVES (with PART 1, BD >= 32): X, Y, dK and the products with H0 in column halves ([C, BD/2] fp32 tiles).
    """
    n, bh, b, h, t, tmask = _chunk_ids(T, H, C)
    BH: tl.constexpr = BD // 2
    G, _ = _chunk_decay(g + b * T * H + h, t, tmask, H, HAS_G, C)
    E = tl.exp(G)
    sbase = stats + bh * 2 * (N * C + N)  # energy (N C), ||H0||^2 (N), w (N C), H0's coefficient (N)
    if HALVES:  # PART 1 only
        K = _load(_tile(k, b, h, n, T, H, D, C, BD))
        dt = K.dtype
        M = _decay_mask(G, C)
        Yd = _load(_tile(y_in, b, h, n, T, H, D, C, BD)).to(dt)
        yx = tl.zeros_like(E)
        dE = tl.zeros_like(E)
        for half in tl.static_range(2):
            c0 = half * BH
            Xh = _load(_tile_at(x_saved, b, h, n, T, H, D, c0, C, BH))
            yx += tl.sum(_load(_tile_at(y_in, b, h, n, T, H, D, c0, C, BH)).to(tl.float32) * Xh, 1)
            yh0 = tl.dot(Yd, _load(_state_at(h_states, bh, n, N, D, D, 0, c0, BD, BH)).to(dt),
                         input_precision=DOT_PREC)  # columns c0.. of Y H0
            dE -= tl.sum(yh0 * Xh, 1)  # -y_c^T H0 x_c
        dg_row = tl.zeros_like(E)
        dg_col = tl.zeros_like(E)
        if ADAPTIVE:
            s, energy, h_sq, kk, mp, me = _ridge_path(K, M, E, yx, norm_saved, sbase, bh, n, t, N, ridge, C, DOT_PREC)
            dE += s * (2.0 * E * h_sq + 2.0 * me)
            w = tl.sum(M * (s * E)[:, None], 0)
            r = 2.0 * s[:, None] * (E[:, None] * energy[None, :] + mp) * M
            dg_row += tl.sum(r, 1)
            dg_col += tl.sum(r, 0)
            dpk = (4.0 * tl.dot(tl.trans(M * s[:, None]), M, input_precision=DOT_PREC) * kk).to(dt)
            kw = (K.to(tl.float32) * (4.0 * w)[:, None]).to(dt)
            tl.store(sbase + N * C + N + t, w)
            tl.store(sbase + 2 * N * C + N + n, 2.0 * tl.sum(s * E * E, 0))
        xk = tl.zeros([C, C], dtype=tl.float32)
        yk = tl.zeros([C, C], dtype=tl.float32)
        for half in tl.static_range(2):
            c0 = half * BH
            Kh = _load(_tile_at(k, b, h, n, T, H, D, c0, C, BH))
            xk = tl.dot(_load(_tile_at(x_saved, b, h, n, T, H, D, c0, C, BH)).to(dt), tl.trans(Kh), acc=xk,
                        input_precision=DOT_PREC)
            yk = tl.dot(_load(_tile_at(y_in, b, h, n, T, H, D, c0, C, BH)).to(dt), tl.trans(Kh), acc=yk,
                        input_precision=DOT_PREC)
        r = -xk * yk * M
        dg_row += tl.sum(r, 1)
        dg_col += tl.sum(r, 0)
        dG_ptr = dG_part + bh * N * C + t
        tl.store(dG_ptr, tl.load(dG_ptr) + dg_row - dg_col + E * dE)
        xkm = tl.trans((-xk * M).to(dt))
        ykm = tl.trans((-yk * M).to(dt))
        for half in tl.static_range(2):
            c0 = half * BH
            Xh = _load(_tile_at(x_saved, b, h, n, T, H, D, c0, C, BH)).to(dt)
            Yh = _load(_tile_at(y_in, b, h, n, T, H, D, c0, C, BH)).to(dt)
            dK = tl.dot(ykm, Xh, acc=tl.dot(xkm, Yh, input_precision=DOT_PREC), input_precision=DOT_PREC)
            if ADAPTIVE:
                Kh = _load(_tile_at(k, b, h, n, T, H, D, c0, C, BH))
                H0c = _load(_state_at(h_states, bh, n, N, D, D, 0, c0, BD, BH)).to(dt)
                dK = tl.dot(dpk, Kh, acc=tl.dot(kw, H0c, acc=dK, input_precision=DOT_PREC),
                            input_precision=DOT_PREC)
            dk_tile = _tile_at(dk_part, b, h, n, T, H, D, c0, C, BH)
            tl.store(dk_tile, _load(dk_tile) + dK, boundary_check=(0, 1))
    elif PART == 1:
        K = _load(_tile(k, b, h, n, T, H, D, C, BD))
        dt = K.dtype
        M = _decay_mask(G, C)
        H0 = _load(_state(h_states, bh, n, N, D, D, BD, BD)).to(dt)
        # dE and y . x
        X = _load(_tile(x_saved, b, h, n, T, H, D, C, BD))
        xd = X.to(dt)
        Y = _load(_tile(y_in, b, h, n, T, H, D, C, BD)).to(tl.float32)
        yx = tl.sum(Y * X, 1)
        dE = -tl.sum(Y * tl.dot(xd, tl.trans(H0), input_precision=DOT_PREC), 1)  # -y_c^T H0 x_c
        yd = Y.to(dt)
        dg_row = tl.zeros_like(E)  # sum_j (dM * M)[c, j] and sum_c (dM * M)[c, j]: dG = row - col + E dE
        dg_col = tl.zeros_like(E)
        if ADAPTIVE:
            s, energy, h_sq, kk, mp, me = _ridge_path(K, M, E, yx, norm_saved, sbase, bh, n, t, N, ridge, C, DOT_PREC)
            dE += s * (2.0 * E * h_sq + 2.0 * me)
            w = tl.sum(M * (s * E)[:, None], 0)  # w_j = sum_c s_c E_c M[c, j]
            r = 2.0 * s[:, None] * (E[:, None] * energy[None, :] + mp) * M  # the norm path's dM * M
            dg_row += tl.sum(r, 1)
            dg_col += tl.sum(r, 0)
            dp = tl.dot(tl.trans(M * s[:, None]), M, input_precision=DOT_PREC)  # M^T diag(s) M
            dpk = (4.0 * dp * kk).to(dt)
            # dK: 4 w_j H0 k_j + 4 ((M^T diag(s) M) * K K^T) K
            dK = tl.dot(dpk, K, acc=tl.dot((K.to(tl.float32) * (4.0 * w)[:, None]).to(dt), H0,
                                           input_precision=DOT_PREC), input_precision=DOT_PREC)
            tl.store(sbase + N * C + N + t, w)
            tl.store(sbase + 2 * N * C + N + n, 2.0 * tl.sum(s * E * E, 0))
        else:
            dK = tl.zeros([C, BD], dtype=tl.float32)
        xk = tl.dot(xd, tl.trans(K), input_precision=DOT_PREC)
        yk = tl.dot(yd, tl.trans(K), input_precision=DOT_PREC)
        r = -xk * yk * M
        dg_row += tl.sum(r, 1)
        dg_col += tl.sum(r, 0)
        dK = tl.dot(tl.trans((-xk * M).to(dt)), yd, acc=dK, input_precision=DOT_PREC)
        dK = tl.dot(tl.trans((-yk * M).to(dt)), xd, acc=dK, input_precision=DOT_PREC)
        dk_tile = _tile(dk_part, b, h, n, T, H, D, C, BD)
        tl.store(dk_tile, _load(dk_tile) + dK, boundary_check=(0, 1))
        dG_ptr = dG_part + bh * N * C + t
        tl.store(dG_ptr, tl.load(dG_ptr) + dg_row - dg_col + E * dE)
    else:
        # dH0 = -(Y E)^T X (+ 2 sum_j w_j k_j k_j^T + 2 sum_c s_c E_c^2 H0), column halves
        K = _load(_tile(k, b, h, n, T, H, D, C, BD))
        Y = _load(_tile(y_in, b, h, n, T, H, D, C, BD)).to(tl.float32)
        if ADAPTIVE:
            w = tl.load(sbase + N * C + N + t)
            c_h0 = tl.load(sbase + 2 * N * C + N + n)
        else:
            w = tl.zeros_like(E)
            c_h0 = 0.0
        _dh0_store(Y, K, E, w, c_h0, k, x_saved, h_states, dh_local, b, h, bh, n, T, H, N, D, ADAPTIVE, C, BD,
                   DOT_PREC)


@triton.jit
def _gka_bwd_carry(
    k, v, g, h_states, u_states, dh_end, du_end, dk_part, dv_part, dG_part, dk, dv, dg, partial,
    T, H, N, D, DV, NB,
    HAS_G: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DOT_PREC: tl.constexpr,
    PARTIALS: tl.constexpr = False, NBP: tl.constexpr = 1,
):
    """Adds what the state gradients at the chunk end (Z, dU) give k, v and G, then dg = reverse cumsum of dG.

    H_end = e^{G_last} H0 + sum_j e^{G_last - G_j} k_j k_j^T, U_end likewise with v_j k_j^T. Grid (N, B * H).
    (A column / row halves version, no [BD, BD] tile live, ran slower on the H200: 0.57-0.61 vs 0.47 ms, v9.)
    PARTIALS: <Z, H0> + <dU, U0> summed from the backward scan's NB partial sums a chunk (NBP >= NB, a power of 2)
    instead of from the [BD, BD] tiles here.
    """
    n, bh, b, h, t, tmask = _chunk_ids(T, H, C)
    K = _load(_tile(k, b, h, n, T, H, D, C, BD))
    V = _load(_tile(v, b, h, n, T, H, DV, C, BDV))
    dt = K.dtype
    G, g_last = _chunk_decay(g + b * T * H + h, t, tmask, H, HAS_G, C)
    to_end = tl.exp(g_last - G)
    Z = _load(_state(dh_end, bh, n, N, D, D, BD, BD)).to(dt)
    dU = _load(_state(du_end, bh, n, N, DV, D, BDV, BD)).to(dt)
    # row j: ((Z + Z^T) k_j)^T (k_j^T Z k_j is half its product with k_j)
    kzz = tl.dot(K, tl.trans(Z), acc=tl.dot(K, Z, input_precision=DOT_PREC), input_precision=DOT_PREC)
    vdu = tl.dot(V, dU, input_precision=DOT_PREC)  # row j: (dU^T v_j)^T
    dK = to_end[:, None] * (kzz + vdu)
    dK += _load(_tile(dk_part, b, h, n, T, H, D, C, BD))
    tl.store(_tile(dk, b, h, n, T, H, D, C, BD), dK.to(dk.dtype.element_ty), boundary_check=(0, 1))
    if HAS_G:
        energy = to_end * tl.sum((0.5 * kzz + vdu) * K.to(tl.float32), 1)  # e^{G_last - G_j} (k^T Z k + v^T dU k)
    kdut = tl.dot(K, tl.trans(dU), input_precision=DOT_PREC)  # row j: (dU k_j)^T
    dV = to_end[:, None] * kdut
    dV += _load(_tile(dv_part, b, h, n, T, H, DV, C, BDV))
    tl.store(_tile(dv, b, h, n, T, H, DV, C, BDV), dV.to(dv.dtype.element_ty), boundary_check=(0, 1))

    if HAS_G:
        if PARTIALS:
            blocks = tl.arange(0, NBP)
            through_start = tl.exp(g_last) * tl.sum(tl.load(partial + (bh * N + n) * NB + blocks, mask=blocks < NB,
                                                            other=0.0), 0)
        else:
            H0 = _load(_state(h_states, bh, n, N, D, D, BD, BD))
            U0 = _load(_state(u_states, bh, n, N, DV, D, BDV, BD))
            through_start = tl.exp(g_last) * (tl.sum(tl.sum(Z.to(tl.float32) * H0.to(tl.float32), 1), 0)
                                              + tl.sum(tl.sum(dU.to(tl.float32) * U0.to(tl.float32), 1), 0))
        dG = tl.load(dG_part + bh * N * C + t) - energy
        dG += tl.where(tl.arange(0, C) == C - 1, tl.sum(energy, 0) + through_start, 0.0)
        # g_t enters G_c for every c >= t of the chunk.
        dg_t = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG
        tl.store(dg + (b * T + t) * H + h, dg_t, mask=tmask)
