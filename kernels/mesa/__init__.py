"""MesaNet's readout: GKA's ridge-regression state with a constant per-channel ridge, solved by CG.

The chunk path is kernels.gka itself. A per-channel ridge diag(lam) is a scalar ridge after a diagonal
change of variables: with D = diag(sqrt(lam)),

    (H + D^2)^{-1} q = D^{-1} (D^{-1} H D^{-1} + I)^{-1} D^{-1} q
    D^{-1} H D^{-1} = sum_i eta_i (D^{-1} k_i) (D^{-1} k_i)^T

and U (H + D^2)^{-1} q = U' (H' + I)^{-1} q' with primed keys k / sqrt(lam), query q / sqrt(lam) and the
same values. So `gka` with ridge_mode="constant", ridge_ratio=1 on rescaled q, k computes MesaNet
exactly; CG on the rescaled system is CG on the original preconditioned by diag(lam) (a Jacobi-like
preconditioner; it converges to the same solution as plain CG, in different iterates).
"""

from ..common import check_choice, check_qkvg, check_shape, compute_dtype
from ..gka import gka
from .reference import reference_mesa

BACKENDS = ("auto", "torch", "triton", "reference")
SOLVERS = ("cg", "exact")


def mesa(
    q,
    k,
    v,
    g=None,
    beta=None,
    *,
    ridge,
    num_iter=30,
    solver="cg",
    scale=None,
    chunk_size=64,
    initial_state=None,
    output_final_state=False,
    backend="auto",
    implicit_backward=True,
):
    """MesaNet, per batch element and head:

        H_t = gamma_t H_{t-1} + b_t k_t k_t^T          gamma_t = exp(g_t), H [B, H, Dk, Dk]
        U_t = gamma_t U_{t-1} + b_t v_t k_t^T          U [B, H, Dv, Dk]
        x_t ~ (H_t + diag(ridge))^{-1} q_t             num_iter CG steps preconditioned by diag(ridge), or exact
        o_t = scale * U_t x_t

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv].
        g: [B, T, H] log-decay (<= 0); None means no decay.
        beta: [B, T, H] input gate b_t > 0 (MesaNet's sigmoid gate); None means 1.
        ridge: [H, Dk] per-head, per-channel ridge lam > 0 (constant over time).
        num_iter: CG steps from x = 0 (ignored by solver="exact").
        scale: defaults to Dk ** -0.5 (MesaNet's layer uses 1).
        chunk_size, backend: as in `gka`, which runs on the rescaled inputs ("auto": its Triton kernels, CG
            included, for CUDA tensors they take, else its torch path).
        implicit_backward: as in `gka`: the CG gradient by implicit differentiation (a second CG solve,
            as MesaNet trains; exact only once CG has converged); False = autograd through the CG steps,
            which is what "reference" differentiates.
        initial_state: (H_0, U_0) or None; output_final_state: also return (H_T, U_T), in the
            original (not rescaled) coordinates.
    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, (H_T, U_T)) with the states in the compute dtype.
    """
    check_choice("mesa", "solver", solver, SOLVERS)
    check_choice("mesa", "backend", backend, BACKENDS)
    if num_iter < 0:
        raise ValueError(f"mesa: num_iter must be >= 0, got {num_iter}")
    batch, _, heads, key_dim, value_dim = check_qkvg("mesa", q, k, v, {"g": g, "beta": beta})
    check_shape("mesa", "ridge", ridge, (heads, key_dim), "[H, Dk]")
    if initial_state is not None:
        if len(initial_state) != 2:
            raise ValueError(f"mesa: initial_state must be a pair (H_0, U_0), got {len(initial_state)} items")
        check_shape("mesa", "initial_state[0] (H_0)", initial_state[0], (batch, heads, key_dim, key_dim),
                    "[B, H, Dk, Dk]")
        check_shape("mesa", "initial_state[1] (U_0)", initial_state[1], (batch, heads, value_dim, key_dim),
                    "[B, H, Dv, Dk]")
    if scale is None:
        scale = key_dim**-0.5

    options = {"num_iter": num_iter, "solver": solver, "scale": scale, "output_final_state": output_final_state}
    if backend == "reference":
        return reference_mesa(q, k, v, g, beta, ridge=ridge, initial_state=initial_state, **options)

    # Rescale in the compute dtype: dividing bf16 inputs by sqrt(lam) before the upcast would lose bits.
    dtype = compute_dtype(q.dtype)
    root = ridge.to(dtype).sqrt()  # sqrt(lam) [H, Dk]
    gate = 1.0 if beta is None else beta.to(dtype).sqrt()[..., None]  # b_t enters H and U once each
    queries, keys, values = q.to(dtype) / root, gate * k.to(dtype) / root, gate * v.to(dtype)
    if initial_state is not None:
        key_cov, value_key = (state.to(dtype) for state in initial_state)
        initial_state = (key_cov / (root[:, :, None] * root[:, None, :]), value_key / root[:, None, :])
    result = gka(
        queries, keys, values, g, None, ridge_ratio=1.0, ridge_mode="constant", chunk_size=chunk_size,
        initial_state=initial_state, backend=backend, implicit_backward=implicit_backward, **options,
    )
    if not output_final_state:
        return result.to(q.dtype)
    o, (key_cov, value_key) = result
    return o.to(q.dtype), (key_cov * (root[:, :, None] * root[:, None, :]), value_key * root[:, None, :])
