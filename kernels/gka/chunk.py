"""Chunk-wise parallel GKA in PyTorch (GKA.md, "Chunk-wise parallel form"). Autograd is the backward.

Per chunk of C tokens with start state H_0 (carried across chunks by a sequential scan), in-chunk
cumulative log-decay G and decay mask M[c, j] = exp(G_c - G_j) (j <= c):

    H_c = e^{G_c} H_0 + sum_{j <= c} M[c, j] k_j k_j^T

so the solver applies A_c = H_c + lam_c I to all C iterates of all chunks at once, matrix-free:

    A X = (e^G * X) H_0 + ((X K^T) * M) K + lam * X

and the readout o = scale * U_t qt_t is gated linear attention with queries qt.
"""

import torch

from ..chunking import chunk_inputs, decay_mask, from_chunks, scan_chunk_states, to_chunks
from ..gla.chunk import gla_in_chunks
from .solvers import chebyshev, conjugate_gradient, implicit_solve, ridge_bounds, ridge_solve


def chunk_gka(
    q,
    k,
    v,
    g=None,
    alpha=None,
    *,
    ridge_ratio,
    ridge_mode,
    num_iter,
    solver,
    scale,
    chunk_size,
    initial_state=None,
    output_final_state=False,
    implicit_backward=True,
):
    """Same contract as `reference_gka`. Padded tail tokens (q = k = v = 0, g = 0) change nothing.

    implicit_backward: the gradient of the iterative solves (chebyshev, cg) by implicit differentiation
    (GKA.md; no iterates kept; assumes a symmetric initial H_0, as a covariance is); False = autograd
    through the unrolled iterations, which is what the reference backend differentiates.

    For solver="exact" the per-token H_t of each chunk are materialised ([B, H, N, C, Dk, Dk]) for
    torch.linalg.solve; "chebyshev" and "cg" never form them.
    """
    seq_len = q.shape[1]
    queries, keys, values, log_decay = chunk_inputs(q, k, v, g, chunk_size)
    dtype = queries.dtype
    mask = decay_mask(log_decay)
    key_cov_init = value_key_init = None
    if initial_state is not None:
        key_cov_init, value_key_init = (state.to(dtype) for state in initial_state)

    # H_0 of every chunk [B, H, N, Dk, Dk]: the gla state scan with values = keys.
    key_cov_start, key_cov_final = scan_chunk_states(keys, keys, log_decay, key_cov_init)
    start_decay = log_decay.exp()  # e^{G_c} [B, H, N, C]

    # ||H_c||_F^2 = e^{2G_c} ||H_0||^2 + 2 e^{G_c} sum_j M[c, j] k_j^T H_0 k_j + m_c^T P m_c,
    # P = (K K^T)^2 elementwise. All three terms are >= 0 when H_0 is PSD, so no cancellation.
    start_sq_norm = (key_cov_start * key_cov_start).sum((-1, -2))[..., None]  # [B, H, N, 1]
    key_energy = ((keys @ key_cov_start) * keys).sum(-1, keepdim=True)  # k_j^T H_0 k_j [B, H, N, C, 1]
    key_gram_sq = (keys @ keys.mT) ** 2
    sq_norm = (
        start_decay**2 * start_sq_norm
        + 2 * start_decay * (mask @ key_energy)[..., 0]
        + ((mask @ key_gram_sq) * mask).sum(-1)
    )
    ridge, upper = ridge_bounds(sq_norm, ridge_ratio, ridge_mode)

    def apply_A(x, start_decay=start_decay, key_cov_start=key_cov_start, keys=keys, mask=mask, ridge=ridge):
        # Row c is (A_c x_c)^T. Multiplying by H_0^T rather than relying on H_0 = H_0^T keeps the
        # unrolled gradient of a (possibly asymmetric) initial_state identical to the reference's.
        decayed_start = (start_decay[..., None] * x) @ key_cov_start.mT
        return decayed_start + ((x @ keys.mT) * mask) @ keys + ridge * x

    def dense_A():
        key_cov = start_decay[..., None, None] * key_cov_start[:, :, :, None] + torch.einsum(
            "...cj,...jd,...je->...cde", mask, keys, keys
        )
        identity = torch.eye(keys.shape[-1], dtype=dtype, device=keys.device)
        return key_cov + ridge[..., None] * identity

    if implicit_backward and solver != "exact":
        if solver == "chebyshev":
            def solve(apply, rhs, lower, upper):
                return chebyshev(apply, rhs, lower, upper, num_iter)
            bounds = (ridge.detach(), upper.detach())
        else:
            def solve(apply, rhs):
                return conjugate_gradient(apply, rhs, num_iter)
            bounds = ()
        x = implicit_solve(solve, apply_A, queries, (start_decay, key_cov_start, keys, mask, ridge), bounds)
    else:
        x = ridge_solve(solver, apply_A, queries, ridge, upper, num_iter, dense_A)
    if alpha is not None:
        x = queries + to_chunks(alpha.to(dtype), chunk_size)[..., None] * (x - queries)
    o, value_key_final = gla_in_chunks(scale * x, keys, values, log_decay, mask, value_key_init)

    o = from_chunks(o, seq_len).to(q.dtype)
    return (o, (key_cov_final, value_key_final)) if output_final_state else o
