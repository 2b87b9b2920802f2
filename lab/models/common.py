"""Pieces every mixer shares: the base model config, value checks, and the short causal convolution."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


class ShortConv(nn.Module):
    """Depthwise causal 1-d convolution over time, `[B, T, C] -> [B, T, C]`, followed by SiLU.

    Left padding of kernel_size - 1 keeps it causal; a decoder keeps the last kernel_size - 1 inputs.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        return F.silu(self.conv(x.transpose(1, 2))[..., :seq_len].transpose(1, 2))

    def state_numel(self) -> int:
        return (self.kernel_size - 1) * self.conv.in_channels
