"""Token-by-token MesaNet readout: materialises H_t, U_t and solves per token. The float64 test oracle."""

import torch

from ..common import compute_dtype

# Guards the CG divisions (zero right-hand side gives x = 0), as kernels.gka.solvers does.
CG_EPS = 1e-30


def reference_mesa(
    q, k, v, g=None, beta=None, *, ridge, num_iter, solver, scale, initial_state=None, output_final_state=False
):
    """The recurrence of `mesa` one token at a time, with H_t [B, H, Dk, Dk] and U_t [B, H, Dv, Dk] explicit.

    solver="cg" runs `preconditioned_cg` with the preconditioner diag(ridge): these are exactly the
    iterates of plain CG on the rescaled system that the chunk path hands to kernels.gka.
    """
    batch, seq_len, heads, key_dim = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, ridge = q.to(dtype), k.to(dtype), v.to(dtype), ridge.to(dtype)
    if initial_state is None:
        key_cov = q.new_zeros(batch, heads, key_dim, key_dim)
        value_key = q.new_zeros(batch, heads, v.shape[-1], key_dim)
    else:
        key_cov, value_key = (state.to(dtype) for state in initial_state)

    outputs = []
    for t in range(seq_len):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]
        if g is not None:
            gamma = g[:, t].to(dtype).exp()[..., None, None]
            key_cov, value_key = gamma * key_cov, gamma * value_key
        rate = 1.0 if beta is None else beta[:, t].to(dtype)[..., None, None]
        key_cov = key_cov + rate * k_t[..., :, None] * k_t[..., None, :]
        value_key = value_key + rate * v_t[..., :, None] * k_t[..., None, :]

        system = key_cov + torch.diag_embed(ridge.expand(batch, heads, key_dim))  # H_t + diag(lam)
        if solver == "exact":
            x_t = torch.linalg.solve(system, q_t)
        else:
            x_t = preconditioned_cg(system, q_t, ridge, num_iter)
        outputs.append(scale * (value_key @ x_t[..., None])[..., 0])

    o = torch.stack(outputs, dim=1).to(out_dtype)
    return (o, (key_cov, value_key)) if output_final_state else o


def preconditioned_cg(system, rhs, preconditioner, num_iter):
    """num_iter steps of CG for system x = rhs from x = 0, preconditioned by the diagonal `preconditioner`."""
    x = torch.zeros_like(rhs)
    residual = rhs
    z = residual / preconditioner
    direction = z
    res_dot = (residual * z).sum(-1, keepdim=True)
    for _ in range(num_iter):
        a_direction = (system @ direction[..., None])[..., 0]
        step = res_dot / ((direction * a_direction).sum(-1, keepdim=True) + CG_EPS)
        x = x + step * direction
        residual = residual - step * a_direction
        z = residual / preconditioner
        new_res_dot = (residual * z).sum(-1, keepdim=True)
        direction = z + new_res_dot / (res_dot + CG_EPS) * direction
        res_dot = new_res_dot
    return x
