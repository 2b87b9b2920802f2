"""Ridge solves x ~ (H + lam I)^{-1} q shared by the reference and chunk paths of `gka`.

Every function works on any leading batch shape with the vector in the last dim; `apply_A` maps
X [..., D] to A X, so callers decide how A is applied (a dense H_t, or the matrix-free chunk form).
"""

import torch

from ..common import fold_members

SOLVERS = ("chebyshev", "cg", "exact")  # what the layer offers; gradient_descent / nesterov are for studies
RIDGE_MODES = ("adaptive", "constant")

# Zero-key convention: ||H||_F := sqrt(max(sum H^2, 0) + 1e-12). A state with no (or fully decayed)
# keys then still gets a finite ridge lam > 0, and sqrt is never differentiated at 0.
NORM_EPS_SQ = 1e-12
# Guards the CG divisions so that a zero right-hand side gives x = 0 rather than 0 / 0.
CG_EPS = 1e-30


def ridge_bounds(sq_norm, ridge_ratio, ridge_mode):
    """From sum(H^2) [...] to (lam, L) [..., 1]: the ridge and the upper eigenvalue bound of H + lam I.

    lambda_max(H) <= ||H||_F, so the spectrum of H + lam I lies in [lam, ||H||_F + lam].
    """
    norm = (sq_norm.clamp_min(0) + NORM_EPS_SQ).sqrt()[..., None]
    ridge = ridge_ratio * norm if ridge_mode == "adaptive" else torch.full_like(norm, ridge_ratio)
    return ridge, norm + ridge


def chebyshev(apply_A, rhs, mu, L, num_iter, on_step=None):
    """Chebyshev semi-iteration for A x = rhs with spec(A) in [mu, L]; num_iter matvecs, no inner products.

    Starts from the optimal Richardson step 2 rhs / (L + mu) (what num_iter = 0 returns) and
    contracts the error by about (sqrt(L/mu) - 1) / (sqrt(L/mu) + 1) per step.
    `on_step(x)` (every solver here takes one) sees the start and each iterate: the solver study's hook.
    """
    step = 2 / (L + mu)
    rho_sq = ((L - mu) / (L + mu)) ** 2
    weight = 2.0
    x_prev, x = torch.zeros_like(rhs), step * rhs
    _report(on_step, x)
    for _ in range(num_iter):
        weight = 4 / (4 - rho_sq * weight)
        x, x_prev = x - weight * step * (apply_A(x) - rhs) + (weight - 1) * (x - x_prev), x
        _report(on_step, x)
    return x


def gradient_descent(apply_A, rhs, mu, L, num_iter, on_step=None):
    """Richardson / gradient descent with the optimal fixed step 2 / (L + mu): contraction (L - mu) / (L + mu)."""
    step = 2 / (L + mu)
    x = step * rhs
    _report(on_step, x)
    for _ in range(num_iter):
        x = x - step * (apply_A(x) - rhs)
        _report(on_step, x)
    return x


def nesterov(apply_A, rhs, mu, L, num_iter, on_step=None):
    """Accelerated gradient descent (Nesterov, strongly convex): step 1 / L, momentum (sqrt k - 1) / (sqrt k + 1)."""
    root = (L / mu).sqrt()
    momentum = (root - 1) / (root + 1)
    x = lookahead = rhs / L
    _report(on_step, x)
    for _ in range(num_iter):
        x_next = lookahead - (apply_A(lookahead) - rhs) / L
        lookahead = x_next + momentum * (x_next - x)
        x = x_next
        _report(on_step, x)
    return x


def _report(on_step, x):
    if on_step is not None:
        on_step(x)


def conjugate_gradient(apply_A, rhs, num_iter, on_step=None):
    """num_iter conjugate-gradient steps for A x = rhs (A symmetric positive definite) from x = 0.

    Autograd through these steps is ill-conditioned once CG has converged (A with m distinct
    eigenvalues is solved exactly in m steps, e.g. a low-rank H_t early in a sequence): every later
    step divides residual rounding noise by rounding noise. The iterate stays put; its gradient
    doesn't. Chebyshev, a fixed polynomial in A, has no such steps.
    """
    x = torch.zeros_like(rhs)
    _report(on_step, x)
    residual = direction = rhs
    res_sq = (residual * residual).sum(-1, keepdim=True)
    for _ in range(num_iter):
        a_direction = apply_A(direction)
        step = res_sq / ((direction * a_direction).sum(-1, keepdim=True) + CG_EPS)
        x = x + step * direction
        residual = residual - step * a_direction
        new_res_sq = (residual * residual).sum(-1, keepdim=True)
        direction = residual + new_res_sq / (res_sq + CG_EPS) * direction
        res_sq = new_res_sq
        _report(on_step, x)
    return x


def ridge_solve(solver, apply_A, rhs, ridge, upper, num_iter, dense_A):
    """Dispatch on `solver`; `dense_A` is a thunk returning A [..., D, D], built only for "exact"."""
    if solver == "chebyshev":
        return chebyshev(apply_A, rhs, ridge, upper, num_iter)
    if solver == "cg":
        return conjugate_gradient(apply_A, rhs, num_iter)
    return torch.linalg.solve(dense_A(), rhs)


# Dynamo cannot trace _ImplicitSolve under vmap (torch 2.11-2.13: it slices the Function's tensors with a traced
# int and fails), so torch.compile (trainer.compile, stacked models) runs the solve eagerly: a graph break
@torch.compiler.disable
def implicit_solve(solve, apply_A, rhs, params, solver_args=()):
    """x = solve(A, rhs) with the gradient of the exact solve A^{-1} rhs (implicit differentiation).

    `apply_A(x, *params)` applies A(params), which must be symmetric; `solve(apply, rhs, *solver_args)` is
    the iterative solver (its tensors, e.g. spectral bounds, are passed in `solver_args`, not captured, so
    that vmap sees them). Forward: the solve without an autograd graph. Backward (GKA.md): a second solve
    d_rhs = A^{-1} dx, then d_params = -d/dparams <d_rhs, A(params) x> by autograd through one matvec.
    No iterates are kept, and the solver's bounds (which depend on params) are not differentiated.
    Every tensor argument must lead with the same batch dimension (vmap folds its dimension into it).
    """
    return _ImplicitSolve.apply(solve, apply_A, len(solver_args), rhs, *solver_args, *params)


class _ImplicitSolve(torch.autograd.Function):
    @staticmethod
    def forward(solve, apply_A, num_solver_args, rhs, *tensors):
        solver_args, params = tensors[:num_solver_args], tensors[num_solver_args:]
        return solve(lambda y: apply_A(y, *params), rhs, *solver_args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        solve, apply_A, num_solver_args, _, *tensors = inputs
        ctx.solve, ctx.apply_A, ctx.num_solver_args = solve, apply_A, num_solver_args
        ctx.save_for_backward(output, *tensors)

    @staticmethod
    def backward(ctx, dx):
        x, *tensors = ctx.saved_tensors
        solver_args, params = tensors[:ctx.num_solver_args], tensors[ctx.num_solver_args:]
        rhs_grad = ctx.solve(lambda y: ctx.apply_A(y, *params), dx, *solver_args)  # A = A^T
        wants = ctx.needs_input_grad[4 + ctx.num_solver_args:]
        with torch.enable_grad():
            live = [p.detach().requires_grad_(w) for p, w in zip(params, wants, strict=True)]
            product = ctx.apply_A(x, *live)
            wanted = [p for p in live if p.requires_grad]
            grads = iter(torch.autograd.grad(product, wanted, grad_outputs=-rhs_grad) if wanted else ())
        param_grads = [next(grads) if w else None for w in wants]
        return (None, None, None, rhs_grad if ctx.needs_input_grad[3] else None,
                *[None] * ctx.num_solver_args, *param_grads)

    @staticmethod
    def vmap(info, in_dims, solve, apply_A, num_solver_args, rhs, *tensors):
        # Batch entries never mix, so vmap's dimension (stacked models, lab/stacked.py) folds into the
        # leading batch dimension: one solve over [members * B, ...] instead of a loop over members.
        folded = fold_members((rhs, *tensors), in_dims[3:], info.batch_size)
        x = _ImplicitSolve.apply(solve, apply_A, num_solver_args, *folded)
        return x.unflatten(0, (info.batch_size, -1)), 0
