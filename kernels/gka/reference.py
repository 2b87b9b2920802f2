"""Token-by-token GKA: materialises H_t and U_t and solves per token. The float64 test oracle."""

import torch

from ..common import compute_dtype
from .solvers import ridge_bounds, ridge_solve


def reference_gka(
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
    initial_state=None,
    output_final_state=False,
):
    """The recurrence of `gka` one token at a time, with H_t [B, H, Dk, Dk] and U_t [B, H, Dv, Dk] explicit."""
    batch, seq_len, heads, key_dim = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if initial_state is None:
        key_cov = q.new_zeros(batch, heads, key_dim, key_dim)
        value_key = q.new_zeros(batch, heads, v.shape[-1], key_dim)
    else:
        key_cov, value_key = (state.to(dtype) for state in initial_state)
    identity = torch.eye(key_dim, dtype=dtype, device=q.device)

    outputs = []
    for t in range(seq_len):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]
        if g is not None:
            gamma = g[:, t].to(dtype).exp()[..., None, None]
            key_cov, value_key = gamma * key_cov, gamma * value_key
        key_cov = key_cov + k_t[..., :, None] * k_t[..., None, :]
        value_key = value_key + v_t[..., :, None] * k_t[..., None, :]

        ridge, upper = ridge_bounds((key_cov * key_cov).sum((-1, -2)), ridge_ratio, ridge_mode)
        x_t = _solve_dense(solver, key_cov + ridge[..., None] * identity, q_t, ridge, upper, num_iter)
        query = x_t if alpha is None else q_t + alpha[:, t].to(dtype)[..., None] * (x_t - q_t)
        outputs.append(scale * (value_key @ query[..., None])[..., 0])

    o = torch.stack(outputs, dim=1).to(out_dtype)
    return (o, (key_cov, value_key)) if output_final_state else o


def _solve_dense(solver, system, rhs, ridge, upper, num_iter):
    """ridge_solve with an explicit matrix `system` = H_t + lam_t I [B, H, Dk, Dk]."""
    return ridge_solve(
        solver, lambda x: (system @ x[..., None])[..., 0], rhs, ridge, upper, num_iter, dense_A=lambda: system
    )
