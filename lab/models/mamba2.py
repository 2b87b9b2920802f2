"""A Mamba2-style mixer: scalar-decay selective SSM (SSD) with a short conv and a SiLU output gate."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from lab.errors import LabError
from lab.models.common import Fp32RMSNorm, ModelConfig, ShortConv, check_range, inverse_softplus


@dataclass
class Mamba2Config(ModelConfig):
    name: str = "mamba2"
    d_state: int = 16  # N: size of the B / C projections (state is head_dim x d_state per head)
    expand: int = 2  # inner width = expand * d_model
    head_dim: int = 32  # P: channels per head; heads = inner width / head_dim
    conv_size: int = 4
    chunk_size: int = 64

    def validate(self) -> None:
        super().validate()
        for key in ("d_state", "expand", "head_dim", "conv_size", "chunk_size"):
            check_range(self, key, low=1)
        if (self.expand * self.d_model) % self.head_dim:
            raise LabError(
                f"model.head_dim={self.head_dim}: must divide expand * d_model = {self.expand * self.d_model}"
            )


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.d_inner = cfg.expand * cfg.d_model
        self.d_state = cfg.d_state
        self.head_dim = cfg.head_dim
        self.num_heads = self.d_inner // cfg.head_dim
        self.chunk_size = cfg.chunk_size
        # one projection gives the output gate z, the conv input (x, B, C) and the per-head step size dt
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner + 2 * cfg.d_state + self.num_heads, bias=False)
        self.conv = ShortConv(self.d_inner + 2 * cfg.d_state, cfg.conv_size)
        self.A_log = nn.Parameter(torch.empty(self.num_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(self.num_heads).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(inverse_softplus(dt))
        self.skip = nn.Parameter(torch.ones(self.num_heads))  # Mamba's D: a per-head residual x -> y
        self.out_norm = Fp32RMSNorm(self.d_inner, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * self.d_state, self.num_heads], -1)
        xs, B, C = self.conv(xbc).split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias)  # [B, T, H]
        log_decay = -self.A_log.float().exp() * dt
        xs = xs.view(batch, seq_len, self.num_heads, self.head_dim)
        # SSD with one B / C group is gated linear attention with q = C, k = B, v = dt * x, no 1/sqrt(d) scale
        shared = (batch, seq_len, self.num_heads, self.d_state)
        y = kernels.gla(
            C[:, :, None].expand(shared), B[:, :, None].expand(shared), xs * dt[..., None].to(xs.dtype),
            log_decay, scale=1.0, chunk_size=self.chunk_size,
        )
        y = y + xs * self.skip[:, None].to(xs.dtype)
        y = self.out_norm(y.reshape(batch, seq_len, self.d_inner) * F.silu(z))
        return self.out_proj(y)

    def state_size(self, seq_len: int) -> int:
        """fp32 bytes a decoder keeps: the head_dim x d_state state per head, plus the conv window."""
        return 4 * (self.num_heads * self.head_dim * self.d_state + self.conv.state_numel())
