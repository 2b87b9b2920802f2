"""The Gated KalmaNet mixer (GKA.md, "The layer"): per token, read out U_t (H_t + lam_t I)^{-1} q_t."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.gka import BACKENDS, RIDGE_MODES, SOLVERS
from lab.models.common import (
    Fp32RMSNorm,
    MambaDecay,
    ModelConfig,
    ShortConv,
    check_choice,
    check_heads,
    check_range,
)


@dataclass
class GKAConfig(ModelConfig):
    name: str = "gka"
    num_heads: int = 2
    head_dim: int | None = None  # None = d_model // num_heads
    gating: bool = True  # Mamba2-style per-head decay gamma_t; off = no forgetting (gamma_t = 1)
    alpha_connection: bool = True  # qt = q + alpha (x - q); off = alpha 1, the pure ridge solution
    ridge_mode: str = "adaptive"  # adaptive: lam = ridge_ratio * ||H||_F; constant: lam = ridge_ratio
    ridge_ratio: float = 0.02
    num_iter: int = 30  # solver iterations (Chebyshev or CG)
    solver: str = "chebyshev"
    chunk_size: int = 64
    conv_size: int = 4  # short causal conv on q, k, v
    backend: str = "auto"  # kernels.gka backend
    implicit_backward: bool = True  # solver gradients by implicit differentiation; false = autograd through the steps

    def validate(self) -> None:
        super().validate()
        check_heads(self)
        check_range(self, "ridge_ratio", low=0, low_open=True)
        check_range(self, "num_iter", low=0)
        check_range(self, "chunk_size", low=1)
        check_range(self, "conv_size", low=1)
        check_choice(self, "solver", SOLVERS)
        check_choice(self, "ridge_mode", RIDGE_MODES)
        check_choice(self, "backend", BACKENDS)


class GKAMixer(nn.Module):
    def __init__(self, cfg: GKAConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        inner = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.qkv_conv = ShortConv(3 * inner, cfg.conv_size)
        self.decay = MambaDecay(cfg.d_model, self.num_heads) if cfg.gating else None  # gamma_t = exp(g_t)
        if cfg.alpha_connection:
            self.alpha_proj = nn.Linear(cfg.d_model, self.num_heads)
        self.out_gate_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.out_norm = Fp32RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        heads = (batch, seq_len, self.num_heads, self.head_dim)
        q, k, v = self.qkv_conv(self.qkv_proj(x)).chunk(3, dim=-1)
        # unit-norm q and k keep ||H_t||_F bounded by the decayed token count, so lam tracks the data scale
        q = F.normalize(q.view(heads), dim=-1)
        k = F.normalize(k.view(heads), dim=-1)
        v = v.view(heads)
        log_decay = self.decay(x) if self.decay is not None else None
        alpha = torch.sigmoid(self.alpha_proj(x).float()) if self.cfg.alpha_connection else None
        out = kernels.gka(
            q, k, v, log_decay, alpha,
            ridge_ratio=self.cfg.ridge_ratio, ridge_mode=self.cfg.ridge_mode, num_iter=self.cfg.num_iter,
            solver=self.cfg.solver, chunk_size=self.cfg.chunk_size, backend=self.cfg.backend,
            implicit_backward=self.cfg.implicit_backward,
        )
        out = self.out_norm(out) * F.silu(self.out_gate_proj(x).view(heads))
        return self.o_proj(out.reshape(batch, seq_len, -1))

    def state_size(self, seq_len: int) -> int:
        """fp32 bytes a decoder keeps: H_t (Dk x Dk) and U_t (Dv x Dk) per head, plus the conv window."""
        matrices = 2 * self.num_heads * self.head_dim**2
        return 4 * (matrices + self.qkv_conv.state_numel())
