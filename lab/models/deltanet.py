"""DeltaNet and Gated DeltaNet mixers: a key-value state updated by the (gated) delta rule.

    S_t = gamma_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,    o_t = S_t q_t / sqrt(Dk)

Gated DeltaNet (Yang et al. 2024) has the Mamba2-style decay gamma_t; DeltaNet is the same layer with
gamma_t = 1. The rest is shared: short conv + SiLU on q, k, v, L2-normalised q and k, a sigmoid write
rate b_t per head, and an RMSNorm(o) * SiLU(gate) output per head.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.delta import BACKENDS, delta_rule
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
class DeltaNetConfig(ModelConfig):
    name: str = "deltanet"
    num_heads: int = 2
    head_dim: int | None = None  # query/key channels per head; None = d_model // num_heads
    expand_v: int = 1  # value channels per head = expand_v * head_dim (Zoology's Gated DeltaNet uses 2)
    gating: bool = False  # Mamba2-style per-head decay gamma_t (on = Gated DeltaNet)
    conv_size: int = 4  # short causal conv on q, k, v
    chunk_size: int = 64  # tokens per chunk of the chunk-wise path (any T works)
    backend: str = "auto"  # kernels.delta backend

    def validate(self) -> None:
        super().validate()
        check_heads(self)
        for key in ("expand_v", "conv_size", "chunk_size"):
            check_range(self, key, low=1)
        check_choice(self, "backend", BACKENDS)


@dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    name: str = "gdn"
    gating: bool = True  # Mamba2-style per-head decay gamma_t (off = DeltaNet)


class DeltaNetMixer(nn.Module):
    def __init__(self, cfg: DeltaNetConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.key_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        self.value_dim = cfg.expand_v * self.key_dim
        self.widths = [self.num_heads * self.key_dim] * 2 + [self.num_heads * self.value_dim]  # q, k, v
        self.qkv_proj = nn.Linear(cfg.d_model, sum(self.widths), bias=False)
        self.qkv_conv = ShortConv(sum(self.widths), cfg.conv_size)
        self.rate_proj = nn.Linear(cfg.d_model, self.num_heads, bias=False)  # b_t = sigmoid(.), 0.5 at init
        self.decay = MambaDecay(cfg.d_model, self.num_heads) if cfg.gating else None
        self.out_gate_proj = nn.Linear(cfg.d_model, self.widths[2], bias=False)
        self.out_norm = Fp32RMSNorm(self.value_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(self.widths[2], cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_conv(self.qkv_proj(x)).split(self.widths, dim=-1)
        # unit keys make I - b k k^T a contraction for b in [0, 1]: the state can't blow up without decay
        q = F.normalize(q.view(batch, seq_len, self.num_heads, self.key_dim), dim=-1)
        k = F.normalize(k.view(batch, seq_len, self.num_heads, self.key_dim), dim=-1)
        v = v.view(batch, seq_len, self.num_heads, self.value_dim)
        rate = torch.sigmoid(self.rate_proj(x).float())
        log_decay = self.decay(x) if self.decay is not None else None
        out = delta_rule(q, k, v, rate, log_decay, chunk_size=self.cfg.chunk_size, backend=self.cfg.backend)
        out = self.out_norm(out) * F.silu(self.out_gate_proj(x).view(out.shape))
        return self.o_proj(out.reshape(batch, seq_len, -1))

    def state_size(self, seq_len: int) -> int:
        """fp32 bytes a decoder keeps: S (Dv x Dk) per head, plus the conv window over q, k, v.

        Zoology counts num_heads * Dk * Dv for its (Gated) DeltaNet and leaves the conv window out;
        the lab adds it for every mixer that has one (gka, mamba2, gla), so the comparison stays fair.
        """
        return 4 * (self.num_heads * self.key_dim * self.value_dim + self.qkv_conv.state_numel())
