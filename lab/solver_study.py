"""`lab solvers`: the paper's solver study (its Fig. 1 and Sec. 4), at any size.

Part 1, solver convergence: the ridge systems (H_t + lam_t I) x = q_t of random L2-normalised keys (gated or
not), at evenly spaced tokens; Chebyshev, conjugate gradient, gradient descent and Nesterov's accelerated GD in
fp32 and bf16; per iteration the relative residual ||A x - q|| / ||q|| and the error to the exact (float64)
solution, for the adaptive ridge lam = a ||H||_F and constant ones; and the condition numbers seen.

Part 2, gradient accuracy: for stacks of 1 and 5 GKA layers (float64), the relative error of the parameter
gradients from implicit differentiation and from autograd through the unrolled iterations (Chebyshev, CG), against
the gradient of the exact solve.

Writes runs/solvers/<name>/: results.json, report.md, residual_<dtype>.png, gradient_error.png, tb/.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kernels.gka.solvers import NORM_EPS_SQ, chebyshev, conjugate_gradient, gradient_descent, nesterov
from lab.errors import LabError

STUDY_SOLVERS = {"chebyshev": chebyshev, "cg": conjugate_gradient, "gd": gradient_descent, "nesterov": nesterov}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class SolverStudyConfig:
    name: str = "default"  # output: <runs_dir>/solvers/<name>/
    runs_dir: str = "runs"
    seed: int = 0
    batch: int = 8
    seq_len: int = 2048
    num_heads: int = 8
    head_dim: int = 128
    positions: int = 32  # tokens per sequence whose systems are solved, evenly spaced up to the last
    gated: bool = True  # log-decay g ~ -U(0, max_decay) per token and head; false = no forgetting
    max_decay: float = 0.1
    max_iter: int = 40
    solvers: list[str] = field(default_factory=lambda: list(STUDY_SOLVERS))
    adaptive_ratios: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])  # lam = a ||H||_F
    constant_ridges: list[float] = field(default_factory=lambda: [0.25, 0.05, 0.01])  # lam = c
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    grad_depths: list[int] = field(default_factory=lambda: [1, 5])  # GKA layers in the gradient study
    grad_num_iter: int = 30
    grad_batch: int = 2
    grad_seq_len: int = 128
    grad_d_model: int = 256  # 2 heads of 128: CG would end exactly within r steps on small heads
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = "cpu"  # where the solves and the gradient study run (e.g. cuda)

    def validate(self) -> None:
        for key in ("batch", "seq_len", "num_heads", "head_dim", "positions", "grad_batch", "grad_seq_len",
                    "grad_d_model", "grad_num_iter"):
            if getattr(self, key) < 1:
                raise LabError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.max_iter < 0:
            raise LabError(f"max_iter={self.max_iter}: must be >= 0")
        for name in self.solvers:
            if name not in STUDY_SOLVERS:
                raise LabError(f"solvers: unknown solver {name!r}; allowed: {', '.join(STUDY_SOLVERS)}")
        for name in self.dtypes:
            if name not in DTYPES:
                raise LabError(f"dtypes: unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
        if any(a <= 0 for a in self.adaptive_ratios + self.constant_ridges):
            raise LabError("adaptive_ratios and constant_ridges must be > 0")
        if not self.adaptive_ratios and not self.constant_ridges:
            raise LabError("give at least one ridge setting (adaptive_ratios or constant_ridges)")
        if any(d < 1 for d in self.grad_depths):
            raise LabError(f"grad_depths={self.grad_depths}: depths must be >= 1")
        if self.positions > self.seq_len:
            raise LabError(f"positions={self.positions}: must be <= seq_len={self.seq_len}")
        if self.device != "cpu" and not (self.device.startswith("cuda") and torch.cuda.is_available()):
            raise LabError(f"device={self.device!r}: allowed: cpu, or cuda[:N] on a machine with a GPU")
        if "/" in self.name or not self.name:
            raise LabError(f"name={self.name!r}: must be a plain directory name")


def ridge_problems(cfg: SolverStudyConfig):
    """Key covariances H_t [B, H, P, D, D] (float64) at P evenly spaced tokens, queries q [B, H, P, D]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.num_heads)
    keys = torch.nn.functional.normalize(torch.randn(*shape, cfg.seq_len, cfg.head_dim, generator=gen,
                                                     dtype=torch.float64), dim=-1)
    if cfg.gated:
        decay = torch.exp(-cfg.max_decay * torch.rand(*shape, cfg.seq_len, generator=gen, dtype=torch.float64))
    else:
        decay = torch.ones(*shape, cfg.seq_len, dtype=torch.float64)
    positions = torch.linspace(cfg.seq_len / cfg.positions, cfg.seq_len, cfg.positions).round().long() - 1
    key_cov = torch.zeros(*shape, cfg.head_dim, cfg.head_dim, dtype=torch.float64)
    saved = []
    wanted = set(positions.tolist())
    for t in range(cfg.seq_len):
        k = keys[:, :, t]
        key_cov = decay[:, :, t, None, None] * key_cov + k[..., :, None] * k[..., None, :]
        if t in wanted:
            saved.append(key_cov)
    queries = torch.randn(*shape, cfg.positions, cfg.head_dim, generator=gen, dtype=torch.float64)
    return torch.stack(saved, dim=2).to(cfg.device), queries.to(cfg.device), positions


def ridge_settings(cfg: SolverStudyConfig) -> list[tuple[str, str, float]]:
    return [(f"adaptive a={a:g}", "adaptive", a) for a in cfg.adaptive_ratios] + [
        (f"constant lam={c:g}", "constant", c) for c in cfg.constant_ridges]


def convergence(cfg: SolverStudyConfig, key_cov, queries, progress=None) -> list[dict]:
    """Median (and 90th percentile) relative residual and error per iteration, per setting, dtype and solver."""
    norm = (key_cov.square().sum((-1, -2)) + NORM_EPS_SQ).sqrt()[..., None]  # [B, H, P, 1]
    eye = torch.eye(cfg.head_dim, dtype=torch.float64, device=key_cov.device)
    rows = []
    for label, mode, value in ridge_settings(cfg):
        lam = value * norm if mode == "adaptive" else torch.full_like(norm, value)
        system = key_cov + lam[..., None] * eye
        exact = torch.linalg.solve(system, queries)
        eigen = torch.linalg.eigvalsh(system)
        condition = (eigen[..., -1] / eigen[..., 0]).flatten()
        for dtype_name in cfg.dtypes:
            dtype = DTYPES[dtype_name]
            system_d, rhs_d = system.to(dtype), queries.to(dtype)
            mu, upper = lam.to(dtype), (norm + lam).to(dtype)

            def apply(x, system_d=system_d):
                return (system_d @ x[..., None])[..., 0]

            for solver in cfg.solvers:
                residuals, errors = [], []

                def record(x, system=system, exact=exact, residuals=residuals, errors=errors):
                    x = x.double()
                    res = ((system @ x[..., None])[..., 0] - queries).norm(dim=-1) / queries.norm(dim=-1)
                    err = (x - exact).norm(dim=-1) / exact.norm(dim=-1)
                    residuals.append(res.flatten())
                    errors.append(err.flatten())

                if solver == "cg":
                    conjugate_gradient(apply, rhs_d, cfg.max_iter, on_step=record)
                else:
                    STUDY_SOLVERS[solver](apply, rhs_d, mu, upper, cfg.max_iter, on_step=record)
                rows.append({
                    "setting": label, "dtype": dtype_name, "solver": solver,
                    "residual_median": [r.median().item() for r in residuals],
                    "residual_p90": [r.quantile(0.9).item() for r in residuals],
                    "error_median": [e.median().item() for e in errors],
                    "error_p90": [e.quantile(0.9).item() for e in errors],
                    "condition_median": condition.median().item(), "condition_max": condition.max().item(),
                })
                if progress is not None:
                    progress()
    return rows


def gradient_accuracy(cfg: SolverStudyConfig, progress=None) -> list[dict]:
    """Relative error of the parameter gradients of a float64 GKA stack vs the exact solve's gradient."""
    from lab.models import build_model
    from lab.models.gka import GKAConfig

    vocab = 64
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    tokens = torch.randint(0, vocab, (cfg.grad_batch, cfg.grad_seq_len), generator=gen).to(cfg.device)
    rows = []
    variants = [("chebyshev", True), ("chebyshev", False), ("cg", True), ("cg", False)]
    for depth in cfg.grad_depths:
        def grads(solver, implicit, depth=depth):
            model_cfg = GKAConfig(d_model=cfg.grad_d_model, num_layers=depth, num_heads=2, solver=solver,
                                  num_iter=cfg.grad_num_iter, backend="torch", implicit_backward=implicit,
                                  max_position_embeddings=cfg.grad_seq_len)
            torch.manual_seed(cfg.seed)  # the same weights for every variant
            # backend "torch" on any device: the float64 comparison needs a float64 path (Triton has none)
            model = build_model(model_cfg, vocab).double().to(cfg.device)
            hidden = model.hidden_states(tokens)
            probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7), dtype=hidden.dtype)
            probe = probe.to(hidden.device)
            params = [p for p in model.parameters() if p.requires_grad]
            flat = torch.autograd.grad((hidden * probe).sum(), params, allow_unused=True)
            return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(flat, params)])

        exact = grads("exact", True)
        for solver, implicit in variants:
            error = ((grads(solver, implicit) - exact).norm() / exact.norm()).item()
            rows.append({"depth": depth, "solver": solver, "backward": "implicit" if implicit else "unrolled",
                         "num_iter": cfg.grad_num_iter, "relative_error": error})
            if progress is not None:
                progress()
    return rows


def run_study(cfg: SolverStudyConfig) -> dict:
    from rich.progress import Progress

    from lab.cli import console

    cfg.validate()
    out_dir = Path(cfg.runs_dir) / "solvers" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    total = len(ridge_settings(cfg)) * len(cfg.dtypes) * len(cfg.solvers) + 4 * len(cfg.grad_depths)
    out = console()
    with Progress(console=out) as progress:
        task = progress.add_task("solver study", total=total)
        def advance():
            progress.advance(task)

        key_cov, queries, positions = ridge_problems(cfg)
        conv = convergence(cfg, key_cov, queries, advance)
        grad = gradient_accuracy(cfg, advance)
    results = {"config": asdict(cfg), "positions": positions.tolist(), "convergence": conv, "gradients": grad}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    figures = {f"residual_{d}": convergence_figure(conv, cfg, d) for d in cfg.dtypes}
    figures["gradient_error"] = gradient_figure(grad)
    text = markdown(cfg, conv, grad)
    (out_dir / "report.md").write_text(text)
    write_figures(out_dir, figures, text)
    return {"dir": str(out_dir), "figures": sorted(f"{n}.png" for n in figures), "text": text}


def markdown(cfg: SolverStudyConfig, conv: list[dict], grad: list[dict]) -> str:
    marks = [k for k in (1, 5, 10, 20, 30, cfg.max_iter) if k <= cfg.max_iter]
    marks = sorted(set(marks))
    gating = f"gated (g ~ -U(0, {cfg.max_decay:g}))" if cfg.gated else "no gating"
    lines = [f"# Solver study `{cfg.name}`", "",
             (f"B={cfg.batch} T={cfg.seq_len} heads={cfg.num_heads} D={cfg.head_dim}, {cfg.positions} tokens per "
              f"sequence, {gating}, seed {cfg.seed}."),
             "Median relative error to the exact float64 solution after k iterations (residual in results.json).", "",
             "| ridge | dtype | solver | cond. median / max | " + " | ".join(f"k={k}" for k in marks) + " |",
             "|---|---|---|---|" + "---|" * len(marks)]
    for row in conv:
        lines.append(f"| {row['setting']} | {row['dtype']} | {row['solver']} | "
                     f"{row['condition_median']:.0f} / {row['condition_max']:.0f} | "
                     + " | ".join(f"{row['error_median'][k]:.1e}" for k in marks) + " |")
    lines += ["", f"Gradient error vs the exact solve (float64 GKA stack, r = {cfg.grad_num_iter}):", "",
              "| depth | solver | backward | relative error |", "|---|---|---|---|"]
    lines += [f"| {r['depth']} | {r['solver']} | {r['backward']} | {r['relative_error']:.2e} |" for r in grad]
    return "\n".join(lines) + "\n"


def convergence_figure(conv: list[dict], cfg: SolverStudyConfig, dtype: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s[0] for s in ridge_settings(cfg)]
    fig, axes = plt.subplots(2, len(settings), figsize=(3.2 * len(settings), 5.6), squeeze=False, sharex=True)
    for col, setting in enumerate(settings):
        for row in (r for r in conv if r["setting"] == setting and r["dtype"] == dtype):
            for line, key in ((0, "residual_median"), (1, "error_median")):
                axes[line][col].semilogy(range(len(row[key])), row[key], label=row["solver"])
        axes[0][col].set_title(f"{setting}\ncond. median {_cond(conv, setting, dtype)}", fontsize=9)
        axes[1][col].set_xlabel("iteration")
        for line in (0, 1):
            axes[line][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("||A x - q|| / ||q||")
    axes[1][0].set_ylabel("||x - x*|| / ||x*||")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"ridge solvers in {dtype} (median over {cfg.batch * cfg.num_heads * cfg.positions} systems)")
    fig.tight_layout()
    return fig


def _cond(conv: list[dict], setting: str, dtype: str) -> str:
    row = next(r for r in conv if r["setting"] == setting and r["dtype"] == dtype)
    return f"{row['condition_median']:.0f}"


def gradient_figure(grad: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for solver, backward in sorted({(r["solver"], r["backward"]) for r in grad}):
        rows = sorted((r for r in grad if r["solver"] == solver and r["backward"] == backward),
                      key=lambda r: r["depth"])
        ax.semilogy([r["depth"] for r in rows], [max(r["relative_error"], 1e-17) for r in rows], marker="o",
                    label=f"{solver} {backward}")
    ax.set_xlabel("GKA layers")
    ax.set_ylabel("gradient error vs exact solve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_figures(out_dir: Path, figures: dict, text: str) -> None:
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir / "tb")) as writer:
        for name, fig in figures.items():
            fig.savefig(out_dir / f"{name}.png", dpi=120, bbox_inches="tight")
            writer.add_figure(f"solvers/{name}", fig, close=False)
            plt.close(fig)
        writer.add_text("solvers/report", text)


def load_study_config(overrides: list[str]) -> SolverStudyConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        if "=" not in item:
            raise LabError(f"{item!r}: overrides are key=value (e.g. seq_len=256)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SolverStudyConfig), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        allowed = ", ".join(SolverStudyConfig.__dataclass_fields__)
        raise LabError(f"{str(err).splitlines()[0]} (keys: {allowed})") from None
    cfg = OmegaConf.to_object(merged)
    cfg.validate()
    if math.prod((cfg.batch, cfg.num_heads, cfg.positions, cfg.head_dim, cfg.head_dim)) * 8 > 8e9:
        raise LabError("the problem would hold more than 8 GB of covariances; lower batch, num_heads, positions or head_dim")
    return cfg
