"""The ridge solvers of the solver study against theory, and `lab solvers` end to end at a tiny size."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kernels.gka.solvers import chebyshev, conjugate_gradient, gradient_descent, nesterov
from lab.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def spd_problem(eigenvalues, seed=0, batch=6):
    """A = Q diag(eigenvalues) Q^T (random orthogonal Q, float64), a batch of right-hand sides."""
    gen = torch.Generator().manual_seed(seed)
    dim = len(eigenvalues)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ basis.T
    rhs = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return matrix, rhs, torch.linalg.solve(matrix, rhs.T).T


def run_solver(name, matrix, rhs, mu, upper, steps):
    iterates = []
    apply = lambda x: x @ matrix  # A is symmetric
    mu = torch.full((rhs.shape[0], 1), float(mu), dtype=torch.float64)
    upper = torch.full_like(mu, float(upper))
    if name == "cg":
        conjugate_gradient(apply, rhs, steps, on_step=iterates.append)
    else:
        {"chebyshev": chebyshev, "gd": gradient_descent, "nesterov": nesterov}[name](
            apply, rhs, mu, upper, steps, on_step=iterates.append)
    return iterates


@pytest.mark.parametrize("name", ["chebyshev", "cg", "gd", "nesterov"])
def test_each_solver_reaches_the_exact_solution(name):
    matrix, rhs, exact = spd_problem(torch.linspace(1.0, 4.0, 24))
    iterates = run_solver(name, matrix, rhs, 1.0, 4.0, 80)
    assert len(iterates) == 81  # the start and every step
    assert ((iterates[-1] - exact).norm() / exact.norm()).item() < 1e-10


def test_iteration_counts_follow_theory_on_a_known_spectrum():
    """Errors are polynomials in A applied to the first error: Chebyshev's is bounded by 1 / T_{k+1}(sigma),
    gradient descent's by ((kappa - 1) / (kappa + 1))^(k+1), and CG needs about sqrt(kappa) times fewer
    steps than GD, like Chebyshev."""
    kappa = 100.0
    matrix, rhs, exact = spd_problem(torch.linspace(1.0, kappa, 64))
    errors = {name: [((x - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
                     for x in run_solver(name, matrix, rhs, 1.0, kappa, 60)] for name in ("chebyshev", "gd", "cg")}
    sigma = torch.tensor((kappa + 1) / (kappa - 1), dtype=torch.float64)
    for k in range(61):
        chebyshev_bound = 1 / torch.cosh((k + 1) * torch.acosh(sigma)).item()
        assert errors["chebyshev"][k] <= chebyshev_bound * (1 + 1e-6) + 1e-13, k
        assert errors["gd"][k] <= ((kappa - 1) / (kappa + 1)) ** (k + 1) * (1 + 1e-6), k
    # after 40 steps: Chebyshev ~ 2 (9/11)^41 ~ 5e-4, GD ~ (99/101)^41 ~ 0.44
    assert errors["chebyshev"][40] < 1e-3 and errors["gd"][40] > 0.3
    assert errors["cg"][40] < errors["chebyshev"][40]


def test_lab_solvers_writes_its_files(tmp_path, capsys):
    args = ["solvers", "batch=1", "seq_len=64", "num_heads=2", "head_dim=16", "positions=4", "max_iter=12",
            "grad_depths=[1,2]", "grad_num_iter=8", "grad_seq_len=16", "grad_d_model=16", "num_threads=1",
            "constant_ridges=[0.25]", "adaptive_ratios=[0.02]", f"runs_dir={tmp_path}", "name=tiny"]
    assert main(args) == 0
    out_dir = tmp_path / "solvers" / "tiny"
    results = json.loads((out_dir / "results.json").read_text())
    assert len(results["convergence"]) == 2 * 2 * 4  # 2 ridge settings x 2 dtypes x 4 solvers
    for row in results["convergence"]:
        assert len(row["error_median"]) == 13 and row["condition_median"] >= 1
        if row["dtype"] == "float32" and row["solver"] in ("chebyshev", "cg"):
            assert row["error_median"][-1] < row["error_median"][0]
    assert len(results["gradients"]) == 2 * 4
    assert all(0 <= r["relative_error"] < 1 for r in results["gradients"])
    for name in ("report.md", "residual_float32.png", "residual_bfloat16.png", "gradient_error.png"):
        assert (out_dir / name).stat().st_size > 0, name
    events = EventAccumulator(str(out_dir / "tb"))
    events.Reload()
    assert "solvers/gradient_error" in events.Tags()["images"]
    assert "| constant lam=0.25 | bfloat16 | cg |" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "message"), [
    ("solvers=[newton]", "unknown solver 'newton'"),
    ("dtypes=[float8]", "unknown dtype 'float8'"),
    ("positions=0", "positions=0: must be >= 1"),
    ("bogus=1", "bogus"),
    ("device=tpu", "device='tpu': allowed: cpu, or cuda"),
])
def test_lab_solvers_bad_input(capsys, override, message):
    assert main(["solvers", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
