"""MesaNet-style mixer: GKA's ridge-regression readout with a learned constant per-channel ridge and CG.

    H_t = gamma_t H_{t-1} + b_t k_t k_t^T,   U_t = gamma_t U_{t-1} + b_t v_t k_t^T
    o_t = U_t (H_t + diag(lam))^{-1} q_t

lam = softplus(p) + 0.25 per head and key channel (MesaNet's floor), solved by num_iter CG steps. The rest
is the gka mixer's layer (short conv on q, k, v, L2-normalised q and k, Mamba2-style decay, RMSNorm * SiLU
output), so against gka only the ridge (constant per channel vs adaptive a ||H_t||_F), the solver and
MesaNet's input gate b_t differ. (flash-linear-attention's MesaNet convolves only q and k and uses a
logsigmoid forget gate.)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.mesa import BACKENDS, SOLVERS, mesa
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
class MesaNetConfig(ModelConfig):
    name: str = "mesanet"
    num_heads: int = 2
    head_dim: int | None = None  # None = d_model // num_heads (keys, queries and values alike)
    gating: bool = True  # Mamba2-style per-head decay gamma_t; off = no forgetting (gamma_t = 1)
    input_gate: bool = True  # MesaNet's b_t = sigmoid(rate_proj(x)) weighting each token's k k^T and v k^T
    ridge_floor: float = 0.25  # lam = softplus(p) + ridge_floor, per head and key channel (MesaNet's 0.25)
    ridge_init: float = 1.0  # lam at initialisation (MesaNet's 1.0)
    num_iter: int = 30  # CG steps (MesaNet trains with 30)
    solver: str = "cg"  # exact: torch.linalg.solve per token (a check, not for training)
    implicit_backward: bool = True  # CG gradient by a second CG solve (as MesaNet); false = autograd through the steps
    chunk_size: int = 64  # tokens per chunk of the chunk-wise path (any T works)
    conv_size: int = 4  # short causal conv on q, k, v
    backend: str = "auto"  # kernels.mesa backend

    def validate(self) -> None:
        super().validate()
        check_heads(self)
        check_range(self, "ridge_floor", low=0, low_open=True)
        check_range(self, "ridge_init", low=self.ridge_floor, low_open=True)
        check_range(self, "num_iter", low=0)
        check_range(self, "chunk_size", low=1)
        check_range(self, "conv_size", low=1)
        check_choice(self, "solver", SOLVERS)
        check_choice(self, "backend", BACKENDS)


class MesaNetMixer(nn.Module):
    def __init__(self, cfg: MesaNetConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        inner = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.qkv_conv = ShortConv(3 * inner, cfg.conv_size)
        self.decay = MambaDecay(cfg.d_model, self.num_heads) if cfg.gating else None
        self.rate_proj = nn.Linear(cfg.d_model, self.num_heads) if cfg.input_gate else None
        # p with softplus(p) + floor = ridge_init: softplus^{-1}(y) = y + log(1 - e^{-y})
        excess = cfg.ridge_init - cfg.ridge_floor
        raw = excess + math.log(-math.expm1(-excess))
        self.ridge_param = nn.Parameter(torch.full((self.num_heads, self.head_dim), raw))
        self.out_gate_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.out_norm = Fp32RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)

    def ridge(self) -> torch.Tensor:
        """lam [H, Dk] >= ridge_floor, which bounds cond(H_t + diag(lam)) by 1 + ||H_t|| / ridge_floor."""
        return F.softplus(self.ridge_param.float()) + self.cfg.ridge_floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        heads = (batch, seq_len, self.num_heads, self.head_dim)
        q, k, v = self.qkv_conv(self.qkv_proj(x)).chunk(3, dim=-1)
        q, k, v = F.normalize(q.view(heads), dim=-1), F.normalize(k.view(heads), dim=-1), v.view(heads)
        log_decay = self.decay(x) if self.decay is not None else None
        rate = torch.sigmoid(self.rate_proj(x).float()) if self.rate_proj is not None else None
        out = mesa(
            q, k, v, log_decay, rate, ridge=self.ridge(), num_iter=self.cfg.num_iter, solver=self.cfg.solver,
            scale=1.0, chunk_size=self.cfg.chunk_size, backend=self.cfg.backend,
            implicit_backward=self.cfg.implicit_backward,
        )  # scale 1 as in MesaNet: the RMSNorm below sets the output scale anyway
        out = self.out_norm(out) * F.silu(self.out_gate_proj(x).view(heads))
        return self.o_proj(out.reshape(batch, seq_len, -1))

    def state_size(self, seq_len: int) -> int:
        """fp32 bytes a decoder keeps: H_t (Dk x Dk) and U_t (Dv x Dk) per head, plus the conv window (as gka).

        lam is a parameter, not state: it is the same for every sequence.
        """
        matrices = 2 * self.num_heads * self.head_dim**2
        return 4 * (matrices + self.qkv_conv.state_numel())
