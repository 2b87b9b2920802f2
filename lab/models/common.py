"""Pieces every mixer shares: the base model config, value checks, the short causal convolution and the
output norm."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from lab.errors import LabError


@dataclass
class ModelConfig:
    """Backbone settings; each mixer's config extends this with its own switches (`model.<key>=...`)."""

    name: str = "attention"  # which mixer the blocks use (see `lab models`)
    d_model: int = 64  # residual stream width
    num_layers: int = 2  # number of [mixer, MLP] blocks
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model (0 = no MLP)
    norm_eps: float = 1e-5
    max_position_embeddings: int = 0  # > 0: learned absolute positions added to the embeddings (Zoology's)

    def validate(self) -> None:
        check_range(self, "d_model", low=1)
        check_range(self, "max_position_embeddings", low=0)
        check_range(self, "num_layers", low=1)
        check_range(self, "mlp_ratio", low=0)


def check_range(cfg, key: str, low=None, high=None, low_open: bool = False) -> None:
    value = getattr(cfg, key)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(s for s in (lo, hi) if s)
        raise LabError(f"model.{key}={value}: must be {allowed}")


def check_choice(cfg, key: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, key)
    if value not in allowed:
        raise LabError(f"model.{key}={value!r}: allowed values are {', '.join(allowed)}")


class Fp32RMSNorm(nn.RMSNorm):
    """RMSNorm of a mixer's output, computed in fp32 at least (float64 models stay float64).

    Under bf16 autocast the kernels hand back bf16 outputs; beside the fp32 weight torch's fused RMSNorm
    refuses them and falls back to separate ops (H200, the mqar_paper GKA cell: 0.56 ms fwd+bwd a layer
    against 0.32 ms on the fp32 input, 2026-12-04). The statistics want fp32 anyway.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32)))


class ShortConv(nn.Module):
    """Depthwise causal 1-d convolution over time, `[B, T, C] -> [B, T, C]`, followed by SiLU.

    Left padding of kernel_size - 1 keeps it causal; a decoder keeps the last kernel_size - 1 inputs.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Conv1d holds the parameters (checkpoints keep their names); kernels.short_conv runs it on
        # [B, T, C] as it stands: one Triton kernel each way on a GPU, F.conv1d on a CPU
        return kernels.short_conv(x, self.conv.weight.squeeze(1), self.conv.bias)

    def state_numel(self) -> int:
        return (self.kernel_size - 1) * self.conv.in_channels


def check_heads(cfg) -> None:
    """num_heads >= 1 and head_dim either given (>= 1) or d_model // num_heads with no remainder."""
    check_range(cfg, "num_heads", low=1)
    if cfg.head_dim is None and cfg.d_model % cfg.num_heads:
        raise LabError(f"model.num_heads={cfg.num_heads}: must divide d_model={cfg.d_model} (or set model.head_dim)")
    if cfg.head_dim is not None:
        check_range(cfg, "head_dim", low=1)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class MambaDecay(nn.Module):
    """Per-head log-decay g_t = -exp(A_log) * softplus(decay_proj(x) + dt_bias) <= 0 (Mamba2's parametrisation).

    A ~ U(1, 16) and dt log-uniform in [1e-3, 0.1] at init, so the heads start at many time scales
    (the init of the mamba2 mixer; gka, gdn, deltanet and mesanet use this module).
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.decay_proj = nn.Linear(d_model, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(num_heads).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(inverse_softplus(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model] -> g [B, T, H], in fp32 (exp of a bf16 decay would round visibly)."""
        return -self.A_log.float().exp() * F.softplus(self.decay_proj(x).float() + self.dt_bias)
