"""Gated KalmaNet (GKA): gated linear attention whose query is replaced by a ridge-regression solve."""

import warnings

from ..common import check_choice, check_chunk_size, check_qkvg, check_shape
from .chunk import chunk_gka
from .reference import reference_gka
from .solvers import RIDGE_MODES, SOLVERS

BACKENDS = ("auto", "torch", "triton", "reference")


def gka(
    q,
    k,
    v,
    g=None,
    alpha=None,
    *,
    ridge_ratio=0.02,
    ridge_mode="adaptive",
    num_iter=30,
    solver="chebyshev",
    scale=None,
    chunk_size=64,
    initial_state=None,
    output_final_state=False,
    backend="auto",
    implicit_backward=True,
):
    """Gated KalmaNet, per batch element and head (GKA.md):

        H_t = gamma_t H_{t-1} + k_t k_t^T          gamma_t = exp(g_t), H [B, H, Dk, Dk]
        U_t = gamma_t U_{t-1} + v_t k_t^T          U [B, H, Dv, Dk]
        lam_t = ridge_ratio * ||H_t||_F            ("adaptive"; "constant": lam_t = ridge_ratio)
        x_t ~ (H_t + lam_t I)^{-1} q_t             by `solver`
        qt_t = q_t + alpha_t (x_t - q_t)
        o_t = scale * U_t qt_t

    Zero-key convention (every backend): ||H||_F := sqrt(max(sum H^2, 0) + 1e-12), so a state with
    zero (or fully decayed) keys still gets a finite lam > 0, and values and gradients stay finite.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv].
        g: [B, T, H] log-decay (<= 0); None means no decay.
        alpha: [B, T, H] in [0, 1]; None means 1 (the pure ridge solution).
        ridge_ratio: a > 0 of the adaptive ridge, or lam itself in "constant" mode.
        num_iter: solver steps. "chebyshev" uses the bounds mu = lam_t, L = ||H_t||_F + lam_t
            (num_iter = 0 gives x = 2 q / (L + mu)); "cg" runs num_iter conjugate-gradient steps
            from x = 0; "exact" (torch.linalg.solve) ignores it.
        scale: defaults to Dk ** -0.5.
        chunk_size: tokens per chunk of the "torch" path (any value >= 1; T needn't be a multiple).
        initial_state: (H_0 [B, H, Dk, Dk], U_0 [B, H, Dv, Dk]) or None (zeros).
        output_final_state: also return (H_T, U_T).
        backend: "torch" (chunk-wise parallel, autograd backward), "triton" (chunk-wise kernels with
            the implicit-differentiation backward; chebyshev or cg, chunk_size 16/32/64, fp32/fp16/bf16,
            head dims <= 128, implicit_backward; other options fall back to "torch" with a warning),
            "reference" (token loop, the test oracle), or "auto" ("triton" for CUDA tensors it
            supports, else "torch").
        implicit_backward: gradients of the chebyshev / cg solves by implicit differentiation (GKA.md;
            the "triton" path always does this); False = autograd through the unrolled iterations
            ("torch" only; what "reference" differentiates).
    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, (H_T, U_T)) with the states in the compute dtype
        (fp32, or float64 for float64 inputs).
    """
    check_choice("gka", "solver", solver, SOLVERS)
    check_choice("gka", "ridge_mode", ridge_mode, RIDGE_MODES)
    check_choice("gka", "backend", backend, BACKENDS)
    if num_iter < 0:
        raise ValueError(f"gka: num_iter must be >= 0, got {num_iter}")
    if ridge_ratio <= 0:
        raise ValueError(f"gka: ridge_ratio must be > 0, got {ridge_ratio}")
    check_chunk_size("gka", chunk_size)
    batch, _, heads, key_dim, value_dim = check_qkvg("gka", q, k, v, {"g": g, "alpha": alpha})
    if initial_state is not None:
        if len(initial_state) != 2:
            raise ValueError(f"gka: initial_state must be a pair (H_0, U_0), got {len(initial_state)} items")
        check_shape(
            "gka",
            "initial_state[0] (H_0)",
            initial_state[0],
            (batch, heads, key_dim, key_dim),
            "[B, H, Dk, Dk]",
        )
        check_shape(
            "gka",
            "initial_state[1] (U_0)",
            initial_state[1],
            (batch, heads, value_dim, key_dim),
            "[B, H, Dv, Dk]",
        )
    if scale is None:
        scale = key_dim**-0.5

    options = {
        "ridge_ratio": ridge_ratio,
        "ridge_mode": ridge_mode,
        "num_iter": num_iter,
        "solver": solver,
        "scale": scale,
        "initial_state": initial_state,
        "output_final_state": output_final_state,
    }
    if backend == "reference":
        return reference_gka(q, k, v, g, alpha, **options)
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from .triton import triton_gka, unsupported_reason

        reason = unsupported_reason(q, v, solver=solver, chunk_size=chunk_size)
        if not implicit_backward:
            reason = "implicit_backward=False (its backward is always implicit)"
        if reason is None:
            return triton_gka(q, k, v, g, alpha, chunk_size=chunk_size, **options)
        if backend == "triton":
            warnings.warn(f"gka: backend='triton' does not take {reason}; using the torch path", stacklevel=2)
    return chunk_gka(q, k, v, g, alpha, chunk_size=chunk_size, implicit_backward=implicit_backward, **options)
